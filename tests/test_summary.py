"""StatsSummary against numpy on the same samples.

Reference definitions: every sample stands for the interval since the previous one (the first for
one nominal housekeeping interval); the CPU rate is delta total_ns / delta t in millicores;
percentiles are numpy's time-weighted inverted CDF. Results are integers (rounded), hence the
0.5 allowances.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from exporter.clock import FakeClock
from exporter.models import ContainerReference, ContainerStats, CpuStats, MemoryStats
from exporter.summary import DAY_MINUTES, DerivedStats, InstantUsage, Percentiles, StatsSummary

BASE = 1_700_000_040.0  # a whole minute
DAY_S = 86_400.0
MIB = 1 << 20
REF = ContainerReference(name="/docker/abc", id="abc")
QUANTILES = {"fifty": 0.5, "ninety": 0.9, "ninetyfive": 0.95}


def record(ts: float, total_ns: int | None, working_set: int | None, seq: int = 1) -> ContainerStats:
    return ContainerStats(
        timestamp=datetime.fromtimestamp(ts, UTC),
        machine_id="m" * 32,
        hostname="host",
        record_id=f"r{seq}",
        run_id="r" * 32,
        seq=seq,
        container=REF,
        cpu=None if total_ns is None else CpuStats(total_ns=total_ns),
        memory=None if working_set is None else MemoryStats(working_set_bytes=working_set),
    )


class Stream:
    """Sample times, the CPU counter and the working set, plus the reference per-sample values."""

    def __init__(self, ts: np.ndarray, total_ns: np.ndarray, working_set: np.ndarray, nominal_s: float) -> None:
        self.ts = ts
        self.total_ns = total_ns
        self.working_set = working_set
        dt = np.diff(ts)
        # rate of the interval ending at sample k (k >= 1), computed as the summary does
        self.rate = np.concatenate([[np.nan], np.diff(total_ns) / dt / 1e6])
        self.weight = np.concatenate([[nominal_s], dt])

    def feed(self, summary: StatsSummary, clock: FakeClock, stop: float | None = None) -> None:
        for k in range(len(self.ts)):
            ts = float(self.ts[k])
            if stop is not None and ts > stop:
                break
            clock.advance(ts - clock.time())
            summary.add_sample(record(ts, int(self.total_ns[k]), int(self.working_set[k]), seq=k + 1))

    def select(self, start: float, end: float) -> np.ndarray:
        return (self.ts >= start) & (self.ts < end)


def realistic_stream(seconds: float, interval_s: float = 1.0, seed: int = 1, intervals: np.ndarray | None = None) -> Stream:
    """A web service's CPU (daily cycle, noise, a 2-minute batch job every 15 minutes, rare
    spikes) and a working set that grows in a sawtooth (cache fills, then is trimmed)."""
    rng = np.random.default_rng(seed)
    if intervals is None:
        ts = BASE + np.arange(0.0, seconds, interval_s)
    else:
        ts = BASE + np.concatenate([[0.0], np.cumsum(np.resize(intervals, int(seconds)))])
        ts = ts[ts < BASE + seconds]
    t = ts - BASE
    cpu_mc = 300 + 200 * np.sin(2 * np.pi * t / DAY_S) + rng.gamma(2.0, 40.0, t.size)
    cpu_mc += np.where(t % 900 < 120, 1200.0, 0.0)
    cpu_mc += np.where(rng.random(t.size) < 0.002, rng.uniform(1000, 4000, t.size), 0.0)
    dt = np.diff(t, prepend=t[0])
    total_ns = 5_000_000_000_000 + np.cumsum(np.round(cpu_mc * 1e6 * dt)).astype(np.int64)
    working_set = 300 * MIB + 400 * MIB * (t % 1500) / 1500 + 50 * MIB * np.sin(2 * np.pi * t / DAY_S)
    working_set = (working_set + rng.normal(0, 2 * MIB, t.size)).astype(np.int64)
    return Stream(ts, total_ns, working_set, interval_s)


def percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    return float(np.percentile(values, min(max(q, 0.0), 1.0) * 100, weights=weights, method="inverted_cdf"))


def assert_exact(p: Percentiles, values: np.ndarray, weights: np.ndarray) -> None:
    assert p.present
    assert abs(p.mean - np.average(values, weights=weights)) <= 0.5
    assert abs(p.max - values.max()) <= 0.5
    for field, q in QUANTILES.items():
        assert abs(getattr(p, field) - percentile(values, weights, q)) <= 0.5, field


def assert_close(p: Percentiles, values: np.ndarray, weights: np.ndarray, rank_error: float = 0.01) -> None:
    """Mean and max exact up to float32 storage; each percentile a true percentile of the samples
    within ``rank_error`` of the one asked for."""
    assert p.present
    mean = np.average(values, weights=weights)
    assert abs(p.mean - mean) <= 0.5 + 1e-6 * mean
    assert abs(p.max - values.max()) <= 0.5 + 1e-6 * values.max()
    for field, q in QUANTILES.items():
        low = percentile(values, weights, q - rank_error)
        high = percentile(values, weights, q + rank_error)
        assert low - 0.5 <= getattr(p, field) <= high + 0.5, (field, low, getattr(p, field), high)


def fresh(interval_s: float = 1.0, start: float = BASE) -> tuple[StatsSummary, FakeClock]:
    clock = FakeClock(start)
    return StatsSummary(clock, interval_s), clock


def test_no_samples_nothing_present_in_cadvisor_shape() -> None:
    summary, _ = fresh()
    derived = summary.derived()
    for window in (derived.minute_usage, derived.hour_usage, derived.day_usage):
        assert window.percent_complete == 0
        assert not window.cpu.present and not window.memory.present
    assert derived.latest_usage.cpu == 0 and derived.latest_usage.memory == 0
    data = derived.model_dump(mode="json")
    assert set(data) == {"timestamp", "latest_usage", "minute_usage", "hour_usage", "day_usage"}
    assert set(data["latest_usage"]) == {"cpu", "memory"}
    assert set(data["day_usage"]) == {"percent_complete", "cpu", "memory"}
    assert set(data["day_usage"]["cpu"]) == {"present", "mean", "max", "fifty", "ninety", "ninetyfive"}
    assert DerivedStats.model_validate_json(derived.model_dump_json()) == derived


def test_one_sample_has_memory_but_no_cpu_rate() -> None:
    summary, _ = fresh()
    summary.add_sample(record(BASE + 5, 1_000_000, 123 * MIB))
    derived = summary.derived()
    minute = derived.minute_usage
    assert minute.memory.present and minute.memory.mean == minute.memory.max == minute.memory.ninetyfive == 123 * MIB
    assert not minute.cpu.present
    assert derived.latest_usage == InstantUsage(cpu=0, memory=123 * MIB)
    assert derived.timestamp == datetime.fromtimestamp(BASE + 5, UTC)


@pytest.mark.parametrize("intervals", [None, np.array([1.0, 1.0, 2.0, 4.0, 1.0, 0.5, 0.5, 3.0])], ids=["1s", "mixed"])
def test_minute_window_is_exact(intervals: np.ndarray | None) -> None:
    stream = realistic_stream(600, intervals=intervals, seed=3)
    summary, clock = fresh()
    for stop in (BASE + 59.5, BASE + 200.0, BASE + 431.0, BASE + 599.0):
        stream.feed(summary, clock, stop)
        clock.advance(stop - clock.time())
        derived = summary.derived()
        sel = (stream.ts > stop - 60) & (stream.ts <= stop)
        has_rate = sel & ~np.isnan(stream.rate)
        assert_exact(derived.minute_usage.cpu, stream.rate[has_rate], stream.weight[has_rate])
        assert_exact(derived.minute_usage.memory, stream.working_set[sel].astype(float), stream.weight[sel])
        assert derived.minute_usage.percent_complete == min(100, int(stream.weight[sel].sum() * 100 / 60 + 1e-9))
        last = np.nonzero(stream.ts <= stop)[0][-1]
        assert derived.latest_usage.cpu == round(stream.rate[last])
        assert derived.latest_usage.memory == stream.working_set[last]


def test_hour_and_day_within_documented_error() -> None:
    stream = realistic_stream(DAY_S, seed=11)
    summary, clock = fresh()
    stream.feed(summary, clock)
    clock.advance(BASE + DAY_S - clock.time())
    derived = summary.derived()
    for window, start in ((derived.hour_usage, BASE + DAY_S - 3600), (derived.day_usage, BASE)):
        sel = stream.select(start, BASE + DAY_S)
        has_rate = sel & ~np.isnan(stream.rate)
        assert window.percent_complete == 100
        assert_close(window.cpu, stream.rate[has_rate], stream.weight[has_rate])
        assert_close(window.memory, stream.working_set[sel].astype(float), stream.weight[sel])
    # What cAdvisor reports for the same day: percentiles of the minutes' 90th percentiles.
    minutes = ((stream.ts[1:] - BASE) // 60).astype(int)
    ninetieth = [np.percentile(stream.rate[1:][minutes == m], 90, method="inverted_cdf") for m in range(1440)]
    cadvisor_fifty = np.percentile(ninetieth, 50, method="weibull")
    true_fifty = percentile(stream.rate[1:], stream.weight[1:], 0.5)
    assert abs(cadvisor_fifty - true_fifty) > 10 * abs(derived.day_usage.cpu.fifty - true_fifty) + 1


def test_hour_window_at_dynamic_intervals_weights_by_time() -> None:
    """Busy for 20 minutes (sampled every second), idle for 40 (sampled every 60 s, dynamic
    housekeeping at its maximum): time, not the number of samples, decides mean and median."""
    busy = BASE + np.arange(0.0, 1200.0)
    idle = BASE + 1259.0 + np.arange(0.0, 2400.0, 60.0)
    ts = np.concatenate([busy, idle])
    rate = np.where(ts < BASE + 1200, 1000.0, 2.0)
    dt = np.diff(ts, prepend=ts[0])
    total_ns = 10**12 + np.cumsum(np.round(rate * 1e6 * dt)).astype(np.int64)
    working_set = np.where(ts < BASE + 1200, 900 * MIB, 200 * MIB).astype(np.int64)
    stream = Stream(ts, total_ns, working_set, 1.0)
    clock = FakeClock(BASE)
    summary = StatsSummary(clock, 1.0, max_housekeeping_interval_s=60.0)
    stream.feed(summary, clock)
    clock.advance(BASE + 3600 - clock.time())
    hour = summary.derived().hour_usage
    has_rate = ~np.isnan(stream.rate)
    assert hour.percent_complete == 100
    assert_close(hour.cpu, stream.rate[has_rate], stream.weight[has_rate])
    assert_close(hour.memory, working_set.astype(float), stream.weight)
    assert np.mean(stream.rate[has_rate]) > 950  # per sample, the busy third would dominate
    # (1199 s x 1000 + 2400 s x 2) / 3599 s; two thirds of the time idle
    assert (hour.cpu.mean, hour.cpu.fifty, hour.memory.fifty) == (334, 2, 200 * MIB)


def test_percent_complete_for_partial_windows_and_a_full_day() -> None:
    summary, clock = fresh(interval_s=10.0)
    total_ns = 0
    seen = {}
    for k in range(int(DAY_S / 10)):
        ts = BASE + 9.0 + 10.0 * k  # each sample at the end of the 10 s it stands for
        total_ns += 2_500_000_000  # 250 millicores
        clock.advance(ts - clock.time())
        summary.add_sample(record(ts, total_ns, 64 * MIB, seq=k + 1))
        elapsed = ts + 1 - BASE
        if elapsed in (1800.0, 12 * 3600.0, DAY_S):
            clock.advance(1)  # the minute of the last sample is complete
            seen[elapsed] = summary.derived()
    half_hour, half_day, day = seen[1800.0], seen[12 * 3600.0], seen[DAY_S]
    assert (
        half_hour.minute_usage.percent_complete,
        half_hour.hour_usage.percent_complete,
        half_hour.day_usage.percent_complete,
    ) == (100, 50, 2)
    assert (half_day.hour_usage.percent_complete, half_day.day_usage.percent_complete) == (100, 50)
    assert (day.hour_usage.percent_complete, day.day_usage.percent_complete) == (100, 100)
    assert day.day_usage.cpu == Percentiles(present=True, mean=250, max=250, fifty=250, ninety=250, ninetyfive=250)
    assert day.day_usage.memory.fifty == day.day_usage.memory.max == 64 * MIB
    # A day later without samples, nothing is left in any window.
    clock.advance(DAY_S)
    later = summary.derived()
    assert later.day_usage.percent_complete == 0 and not later.day_usage.cpu.present and not later.minute_usage.memory.present


def test_gap_is_neither_covered_nor_a_rate() -> None:
    """The exporter stops for 30 minutes while the container burns 4 cores: that interval's
    average must not show up as a sample, and the hour is half covered."""
    summary, clock = fresh()
    total_ns = 0
    seq = 0

    def run(start: float, seconds: int) -> None:
        nonlocal total_ns, seq
        for k in range(seconds):
            ts = start + k
            total_ns += 500_000_000  # 500 millicores
            seq += 1
            clock.advance(ts - clock.time())
            summary.add_sample(record(ts, total_ns, 100 * MIB, seq=seq))

    run(BASE, 600)
    total_ns += 4 * 1800 * 10**9
    run(BASE + 2400, 1200)
    clock.advance(BASE + 3600 - clock.time())
    hour = summary.derived().hour_usage
    assert hour.percent_complete == 50  # 600 + 1200 s sampled; the first sample after the gap stands for 1 s
    assert hour.cpu.max == 500 and hour.cpu.mean == 500
    assert summary.cpu_resets == 0


def test_cpu_counter_reset_gives_no_rate() -> None:
    summary, clock = fresh()
    total_ns = 7 * 10**12
    for k in range(120):
        ts = BASE + k
        total_ns = 300_000_000 if k == 90 else total_ns + 300_000_000  # restarted at k == 90
        clock.advance(ts - clock.time())
        summary.add_sample(record(ts, total_ns, (50 + k) * MIB, seq=k + 1))
    clock.advance(1)
    derived = summary.derived()
    assert summary.cpu_resets == 1
    for usage in (derived.minute_usage, derived.hour_usage):
        cpu = usage.cpu
        assert (cpu.mean, cpu.max, cpu.fifty, cpu.ninetyfive) == (300, 300, 300, 300)
    assert derived.hour_usage.memory.max == 169 * MIB
    assert derived.hour_usage.percent_complete == 3  # 120 s of 3600, the reset interval included


def test_missing_values_are_skipped() -> None:
    """No memory controller, and every other CPU read failed: the rate spans the 2 s since the
    last CPU value, and memory is simply absent."""
    summary, clock = fresh()
    for k in range(600):
        clock.advance(BASE + k - clock.time())
        summary.add_sample(record(BASE + k, 10**9 * k if k % 2 == 0 else None, None, seq=k + 1))
    clock.advance(1)
    derived = summary.derived()
    for usage in (derived.minute_usage, derived.hour_usage):
        assert usage.cpu == Percentiles(present=True, mean=1000, max=1000, fifty=1000, ninety=1000, ninetyfive=1000)
        assert not usage.memory.present
    assert derived.hour_usage.percent_complete == 16  # 598 s of rates (the first CPU value has none)


def test_idle_container_stays_exactly_zero() -> None:
    summary, clock = fresh(interval_s=1.0)
    for k in range(0, 7200, 60):  # idle: dynamic housekeeping at its 60 s maximum
        clock.advance(BASE + k - clock.time())
        summary.add_sample(record(BASE + k, 42_000_000, 8 * MIB, seq=k + 1))
    clock.advance(60)
    hour = summary.derived().hour_usage
    assert hour.percent_complete == 100
    assert hour.cpu == Percentiles(present=True)
    assert hour.memory == Percentiles(present=True, mean=8 * MIB, max=8 * MIB, fifty=8 * MIB, ninety=8 * MIB, ninetyfive=8 * MIB)


def test_reading_does_not_change_the_result() -> None:
    """derived() summarizes a finished minute on the fly; samples stamped later in that minute
    (the clock read before the record was stamped) still count."""
    stream = realistic_stream(1800, seed=5)
    quiet, clock_a = fresh()
    stream.feed(quiet, clock_a)
    busy, clock_b = fresh()
    for k in range(len(stream.ts)):
        ts = float(stream.ts[k])
        clock_b.advance(ts + 2.5 - clock_b.time())  # reads 2.5 s ahead of the records
        busy.add_sample(record(ts, int(stream.total_ns[k]), int(stream.working_set[k]), seq=k + 1))
        busy.derived()
    end = BASE + 1800
    clock_a.advance(end - clock_a.time())
    clock_b.advance(end - clock_b.time())
    a, b = quiet.derived(), busy.derived()
    assert a == b
    assert a.hour_usage.percent_complete == 50 and a.hour_usage.cpu.present


def test_history_is_bounded_to_a_day() -> None:
    summary, clock = fresh(interval_s=60.0)
    for k in range(1500):
        ts = BASE + 60.0 * k
        clock.advance(ts - clock.time())
        summary.add_sample(record(ts, k * 6 * 10**9, 10 * MIB, seq=k + 1))
    assert summary.minutes_kept() == DAY_MINUTES
    assert summary.nbytes() < 1.25 * DAY_MINUTES * 56 + 4096
    clock.advance(60)
    day = summary.derived().day_usage
    assert day.percent_complete == 100 and day.cpu.mean == 100


def test_clock_stepped_back() -> None:
    summary, clock = fresh()
    for k in range(300):
        clock.advance(BASE + k - clock.time())
        summary.add_sample(record(BASE + k, k * 10**8, MIB, seq=k + 1))
    summary.add_sample(record(BASE + 250, 10**12, MIB))  # a small step back: ignored
    assert summary.ignored_samples == 1 and summary.resets == 0
    summary.add_sample(record(BASE + 299.005, 10**12, MIB))  # 5 ms after the last one: ignored
    assert summary.ignored_samples == 2
    clock.advance(1)
    assert summary.derived().hour_usage.percent_complete == 8  # 300 s kept
    summary.add_sample(record(BASE - 7200, 10**12, 2 * MIB))  # two hours back: start afresh
    assert summary.resets == 1
    derived = summary.derived()
    assert derived.latest_usage.memory == 2 * MIB and derived.latest_usage.cpu == 0
    assert not derived.hour_usage.memory.present
