"""Cost of per-container summary statistics (exporter/summary.py).

Feeds one StatsSummary a simulated day of samples at a 1 s housekeeping interval (records built
outside the timed region) and reports

  * add_sample: mean µs per call, median, p99, and the calls that closed a minute (the only
    ones that sort: the minute's samples are summarized);
  * derived(): a full day of history, first call (hour and day computed) and cached calls;
  * memory held per container after a day: bytes in the arrays, and what tracemalloc sees.

Usage: python bench/summary.py [--hours 24] [--interval 1.0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.clock import FakeClock  # noqa: E402
from exporter.models import ContainerReference, ContainerStats, CpuStats, MemoryStats  # noqa: E402
from exporter.summary import StatsSummary  # noqa: E402

BASE = 1_700_000_040.0
REF = ContainerReference(name="/docker/bench", id="bench")


def records(seconds: float, interval_s: float):
    """A CPU rate that moves (so every sample has a rate) and a sawtooth working set."""
    total_ns = 0
    k = 0
    t = 0.0
    while t < seconds:
        total_ns += int((300 + (k * 7919) % 500) * 1e6 * interval_s)
        working_set = (300 << 20) + ((k * 104729) % 1500) * 4096
        yield ContainerStats(
            timestamp=datetime.fromtimestamp(BASE + t, UTC),
            machine_id="m" * 32,
            hostname="bench",
            record_id=str(k),
            run_id="r" * 32,
            seq=k + 1,
            container=REF,
            cpu=CpuStats(total_ns=total_ns),
            memory=MemoryStats(working_set_bytes=working_set),
        )
        k += 1
        t = k * interval_s


def feed(summary: StatsSummary, clock: FakeClock, seconds: float, interval_s: float) -> tuple[list[int], list[int]]:
    plain: list[int] = []
    closing: list[int] = []
    minute = None
    for record in records(seconds, interval_s):
        ts = record.timestamp.timestamp()
        clock.advance(ts - clock.time())
        start = time.perf_counter_ns()
        summary.add_sample(record)
        elapsed = time.perf_counter_ns() - start
        this_minute = int(ts // 60)
        (closing if minute is not None and this_minute != minute else plain).append(elapsed)
        minute = this_minute
    return plain, closing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--interval", type=float, default=1.0, help="housekeeping interval, seconds")
    args = parser.parse_args()
    seconds = args.hours * 3600

    clock = FakeClock(BASE)
    summary = StatsSummary(clock, args.interval)
    plain, closing = feed(summary, clock, seconds, args.interval)
    every = plain + closing
    print(f"add_sample over {len(every)} samples ({args.hours:g} h at {args.interval:g} s):")
    print(f"  mean {statistics.fmean(every) / 1000:.2f} µs per call (minute summaries included)")
    print(f"  median {statistics.median(plain) / 1000:.2f} µs, p99 {sorted(plain)[int(len(plain) * 0.99)] / 1000:.2f} µs")
    print(f"  closing a minute: median {statistics.median(closing) / 1000:.1f} µs ({len(closing)} calls)")

    clock.advance(1)
    start = time.perf_counter()
    summary.derived()
    cold = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(100):
        summary.derived()
    warm = (time.perf_counter() - start) / 100
    print(
        f"derived() with {summary.minutes_kept()} minutes of history: {cold * 1e3:.1f} ms computing hour and day, {warm * 1e6:.0f} µs cached"
    )

    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    clock2 = FakeClock(BASE)
    other = StatsSummary(clock2, args.interval)
    feed(other, clock2, seconds, args.interval)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    held = sum(stat.size_diff for stat in after.compare_to(before, "filename") if "summary.py" in stat.traceback[0].filename)
    print(f"memory per container: {other.nbytes() / 1024:.1f} KiB in arrays, {held / 1024:.1f} KiB allocated by summary.py")


if __name__ == "__main__":
    main()
