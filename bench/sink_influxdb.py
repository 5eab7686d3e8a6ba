"""InfluxDB sink throughput: records/s of ``InfluxDBSink.write_batch`` next to the raw client.

For each API and batch size (100, 1000, 5000 records) it times, batch by batch in turn:

  * ours: ``write_batch(records)``, conversion to line protocol included;
  * raw:  the same kind of records (same shapes, other timestamps), turned into line protocol
    *before* the clock starts, sent by the bare client: influxdb-client's synchronous
    ``WriteApi.write`` of the pre-built text for v2 (its enable_gzip compresses at level 9; ours
    at level 1), a plain urllib3 POST to /write for v1 (gzip level 1, as ours, when gzip is on).

Rates are the batch size over the median batch time (see measure()). The machine's other load
moves them by 10-20% from run to run; the ratio in one run is the figure to read.

Servers: influxd 1.x for v1, VictoriaMetrics' /api/v2/write for v2 (no InfluxDB 2.x here),
started on 127.0.0.1 in a throw-away directory by tests/infra/influx.py and stopped at the end.
The records are this host's real cgroup samples, copied with distinct timestamps.

Usage: python bench/sink_influxdb.py [--sizes 100 1000 5000] [--records 20000] [--rounds 5] [--no-gzip] [--layout cadvisor] [--api v1 v2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.models import ContainerStats  # noqa: E402
from sinks.influxdb import InfluxDBSettings, InfluxDBSink, LineEncoder  # noqa: E402
from tests.records import collect_host_records  # noqa: E402


@dataclass
class Result:
    api: str
    batch_size: int
    records: int
    points: int
    ours_rps: float
    raw_rps: float

    @property
    def ratio(self) -> float:
        return self.ours_rps / self.raw_rps if self.raw_rps else float("nan")


class RecordSource:
    """Copies of the base records with timestamps never handed out before (1 ms apart per copy)."""

    def __init__(self, base: Sequence[ContainerStats]) -> None:
        self.base = list(base)
        self.t0 = datetime.now(UTC) - timedelta(days=1)
        self.copy = 0

    def take(self, n: int) -> list[ContainerStats]:
        out: list[ContainerStats] = []
        while len(out) < n:
            ts = self.t0 + timedelta(milliseconds=self.copy)
            self.copy += 1
            for r in self.base:
                out.append(r.model_copy(update={"timestamp": ts, "seq": self.copy, "record_id": uuid.uuid4().hex}))
        return out[:n]


def raw_sender(settings: InfluxDBSettings) -> tuple[Callable[[bytes], None], Callable[[], None]]:
    """The bare client: send one pre-built line protocol body."""
    timeout_s = float(settings.timeout)
    if settings.api == "v2":
        from influxdb_client import InfluxDBClient, WritePrecision
        from influxdb_client.client.write_api import SYNCHRONOUS

        client = InfluxDBClient(
            url=settings.url, token=settings.token or "", org=settings.org, timeout=int(timeout_s * 1000), enable_gzip=settings.gzip
        )
        api = client.write_api(write_options=SYNCHRONOUS)

        def send_v2(body: bytes) -> None:
            api.write(bucket=settings.bucket, org=settings.org, record=body, write_precision=WritePrecision.NS)

        return send_v2, client.close

    import urllib3

    pool = urllib3.PoolManager(num_pools=1, maxsize=1, retries=False, timeout=urllib3.Timeout(total=timeout_s))
    url = f"{settings.url}/write?db={settings.database}&precision=ns"
    headers = {"Content-Type": "text/plain; charset=utf-8"}
    if settings.gzip:
        headers["Content-Encoding"] = "gzip"

    def send_v1(body: bytes) -> None:
        if settings.gzip:
            compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
            body = compressor.compress(body) + compressor.flush()
        response = pool.request("POST", url, body=body, headers=headers)
        if response.status >= 300:
            raise RuntimeError(f"raw write: HTTP {response.status}: {response.data[:300]!r}")

    return send_v1, pool.clear


def measure(
    settings: InfluxDBSettings, source: RecordSource, batch_size: int, *, records: int = 20_000, rounds: int = 5
) -> Result:
    """records/s of our sink and of the raw client at one batch size.

    Each round sends ``records`` records both ways (fresh timestamps every time), one batch ours,
    one batch raw, in turn, the first of each pair alternating, so that the server's background
    work falls on both alike. The rate is
    the batch size over the median time of a batch: the servers' periodic stalls (VictoriaMetrics
    flushes its buffers every second, influxd snapshots its cache and fsyncs its WAL) hit a few
    batches at random, many times longer than the rest, and would otherwise decide the ratio.
    """
    n_batches = max(1, records // batch_size)
    sink = InfluxDBSink(settings)
    sink.open()
    send_raw, close_raw = raw_sender(settings)
    encoder = LineEncoder(settings)
    ours_s: list[float] = []
    raw_s: list[float] = []
    points = 0
    try:
        for _ in range(rounds):
            batches = [source.take(batch_size) for _ in range(n_batches)]
            bodies = []
            for _ in range(n_batches):
                lines = encoder.encode(source.take(batch_size))
                points += len(lines)
                bodies.append("".join(lines).encode())
            for i, (batch, body) in enumerate(zip(batches, bodies, strict=True)):
                # Which of the two goes first alternates: a store still busy with the last write
                # slows the next one, and with a fixed order that would always be the same side.
                steps = [(sink.write_batch, batch, ours_s), (send_raw, body, raw_s)]
                for send, payload, times in steps if i % 2 == 0 else reversed(steps):
                    start = time.perf_counter()
                    send(payload)
                    times.append(time.perf_counter() - start)
    finally:
        sink.close()
        close_raw()
    return Result(
        settings.api,
        batch_size,
        n_batches * batch_size,
        points // rounds,
        batch_size / statistics.median(ours_s),
        batch_size / statistics.median(raw_s),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--records", type=int, default=20_000, help="records per round and method (at least one batch)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-gzip", action="store_true")
    parser.add_argument("--layout", choices=["default", "cadvisor"], default="default")
    parser.add_argument("--api", choices=["v1", "v2"], nargs="+", default=["v1", "v2"])
    args = parser.parse_args(argv)

    from tests.infra.influx import Servers

    base = collect_host_records()
    print(f"{len(base)} real records per sample on this host; gzip {'off' if args.no_gzip else 'on'}; layout {args.layout}")
    with Servers() as servers:
        influxd = servers.influxdb_v1()
        influxd.create_database("bench")
        vm = servers.victoria_metrics()
        targets = {
            "v1 (influxd 1.x /write)": InfluxDBSettings(api="v1", url=influxd.url, database="bench", gzip=not args.no_gzip, layout=args.layout),
            "v2 (VictoriaMetrics /api/v2/write)": InfluxDBSettings(
                api="v2", url=vm.url, org="bench", bucket="bench", token="x", gzip=not args.no_gzip, layout=args.layout
            ),
        }
        print(f"{'target':36} {'batch':>6} {'points/rec':>10} {'ours rec/s':>11} {'raw rec/s':>11} {'ours/raw':>8}")
        for label, settings in targets.items():
            if settings.api not in args.api:
                continue
            source = RecordSource(base)
            measure(settings, source, 100, records=1000, rounds=1)  # warm up: connections, shards, series
            for size in args.sizes:
                r = measure(settings, source, size, records=max(args.records, size), rounds=args.rounds)
                print(
                    f"{label:36} {size:>6} {r.points / r.records:>10.1f} {r.ours_rps:>11,.0f} {r.raw_rps:>11,.0f} {r.ratio:>8.2f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
