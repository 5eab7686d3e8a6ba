"""Records/s of every sink's write_batch next to its raw client, at a few batch sizes.

Runs bench/sink_influxdb.py (influxd 1.6.7 and VictoriaMetrics), bench/sink_kafka.py (tansu) and
bench/sink_elasticsearch.py (osmem-server), each starting its own servers on 127.0.0.1, and
measures the jsonl sink against plain file writes of the same pre-serialized lines here.
Each script prints its own table; the raw client sends pre-serialized payloads in the same run.
Run it on an otherwise idle machine: the stores share the two cores with the clients.

Usage: python bench/sinks.py [--sizes 100 1000 5000] [--only influxdb kafka elasticsearch jsonl]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.models import ContainerStats  # noqa: E402
from sinks.jsonl import JsonlSettings, JsonlSink  # noqa: E402
from tests.records import collect_host_records  # noqa: E402

SCRIPTS = {
    "influxdb": "bench/sink_influxdb.py",
    "kafka": "bench/sink_kafka.py",
    "elasticsearch": "bench/sink_elasticsearch.py",
}


def jsonl(sizes: list[int], total: int = 50_000) -> None:
    base = collect_host_records()
    records: list[ContainerStats] = []
    while len(records) < total:
        for r in base:
            records.append(r.model_copy(update={"seq": len(records) + 1}))
    payloads = [r.json_bytes() for r in records]  # encoded once, as the cache does in the exporter
    print(f"jsonl sink vs raw file writes ({total} records, JSON already encoded for both)")
    print(f"{'batch':>6} {'ours rec/s':>12} {'raw rec/s':>12} {'ours/raw':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            batches = [records[i : i + size] for i in range(0, total, size)]
            raw_batches = [payloads[i : i + size] for i in range(0, total, size)]
            ours_s, raw_s = [], []
            for _ in range(5):  # alternate, best of five: page-cache writeback makes single runs noisy
                sink = JsonlSink(JsonlSettings(path=Path(tmp) / "ours.jsonl", max_bytes=1 << 40))
                sink.open()
                t0 = time.perf_counter()
                for batch in batches:
                    sink.write_batch(batch)
                sink.close()
                ours_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                with open(Path(tmp) / "raw.jsonl", "ab") as f:
                    for raw_batch in raw_batches:
                        f.write(b"".join(p + b"\n" for p in raw_batch))
                        f.flush()
                raw_s.append(time.perf_counter() - t0)
                for name in ("ours.jsonl", "raw.jsonl"):
                    (Path(tmp) / name).unlink()
            ours, raw = total / min(ours_s), total / min(raw_s)
            print(f"{size:>6} {ours:>12.0f} {raw:>12.0f} {ours / raw:>9.2f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--only", nargs="+", choices=[*SCRIPTS, "jsonl"], default=[*SCRIPTS, "jsonl"])
    args = parser.parse_args()
    failed = 0
    for name in args.only:
        print(f"\n=== {name}", flush=True)
        if name == "jsonl":
            jsonl(args.sizes)
            continue
        result = subprocess.run([sys.executable, SCRIPTS[name], "--sizes", *map(str, args.sizes)], cwd=ROOT)
        failed += result.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
