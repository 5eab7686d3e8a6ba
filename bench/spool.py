"""Spool throughput: appends/s and peek+ack/s for ~1.3 KB JSON records in batches of 1000.

For each fsync policy: append batches for a few seconds (or up to --max-records), reopen the
spool (recovery checks every record), then drain it with peek(batch) + ack. The directory
should be on the disk the spool will live on (default: a temporary directory in /var/tmp).

Usage: python bench/spool.py [--seconds 3] [--batch 1000] [--max-records 200000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sinks.spool import Spool  # noqa: E402

POLICIES = ("never", "batch", "always")


def payload(i: int) -> bytes:
    record = {
        "timestamp": "2026-05-09T07:35:25.123456Z",
        "machine_id": "m" * 32,
        "hostname": "host-01",
        "record_id": f"/docker/{i:064x}-{i}",
        "seq": i,
        "container": {"name": f"/docker/{i % 500:064x}", "labels": {"app": "web", "tier": "frontend"}},
        "cpu": {"total_ns": i * 1_000_003, "user_ns": i * 700_001, "system_ns": i * 300_001, "throttled_periods": i % 7},
        "memory": {"usage_bytes": 4096 * i, "working_set_bytes": 2048 * i, "rss_bytes": 1024 * i, "cache_bytes": 512 * i},
        "network": [{"name": "eth0", "rx_bytes": i * 1500, "tx_bytes": i * 900, "rx_packets": i, "tx_packets": i}],
    }
    data = json.dumps(record).encode()
    return data + b" " * max(0, 1300 - len(data))


def run(directory: Path, policy: str, seconds: float, batch: int, max_records: int) -> dict[str, float]:
    batches = [[payload(b * batch + i) for i in range(batch)] for b in range(8)]
    record_bytes = sum(len(p) for p in batches[0]) / batch
    os.sync()  # don't let the previous policy's dirty pages slow this one's fsyncs
    spool = Spool(directory, 64 * 1024**3, policy)  # type: ignore[arg-type]
    appended = 0
    started = time.perf_counter()
    while appended < max_records and time.perf_counter() - started < seconds:
        spool.append(batches[(appended // batch) % len(batches)])
        appended += batch
    append_s = time.perf_counter() - started
    spool.close()

    started = time.perf_counter()
    spool = Spool(directory, 64 * 1024**3, policy)  # type: ignore[arg-type]
    recover_s = time.perf_counter() - started
    assert len(spool) == appended

    started = time.perf_counter()
    delivered = 0
    while True:
        cursor, records = spool.peek(batch)
        if not records:
            break
        delivered += len(records)
        spool.ack(cursor)
    drain_s = time.perf_counter() - started
    assert delivered == appended and len(spool) == 0
    spool.close()
    return {
        "records": appended,
        "record_bytes": record_bytes,
        "append_per_s": appended / append_s,
        "append_mb_s": appended * record_bytes / append_s / 1e6,
        "batch_ms": append_s / (appended / batch) * 1000,
        "recover_s": recover_s,
        "drain_per_s": delivered / drain_s,
        "drain_mb_s": delivered * record_bytes / drain_s / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="append for this long per policy")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--max-records", type=int, default=200_000, help="append at most this many per policy")
    parser.add_argument("--dir", type=Path, default=None, help="where to create the spool directories")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="spool-bench-", dir=args.dir or "/var/tmp"))
    try:
        print(f"spool in {base}; records of ~1.3 KB in batches of {args.batch}")
        print(
            f"{'fsync':>7} {'records':>8} {'appends/s':>10} {'MB/s':>6} {'ms/batch':>9} {'reopen s':>9} {'peek+ack/s':>11} {'MB/s':>6}"
        )
        for policy in POLICIES:
            r = run(base / policy, policy, args.seconds, args.batch, args.max_records)
            shutil.rmtree(base / policy)
            print(
                f"{policy:>7} {r['records']:>8.0f} {r['append_per_s']:>10.0f} {r['append_mb_s']:>6.0f} {r['batch_ms']:>9.2f}"
                f" {r['recover_s']:>9.3f} {r['drain_per_s']:>11.0f} {r['drain_mb_s']:>6.0f}"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
