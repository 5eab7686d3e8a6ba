"""Per-container summary statistics: cAdvisor's v2 ``DerivedStats`` (the /api/v2.x/summary payload).

For CPU (usage rate in millicores) and memory (working set bytes) over the last minute, hour and
day: time-weighted mean, max, 50th/90th/95th percentiles and the share of the window that samples
cover (``percent_complete``).

Samples
    Each ``add_sample`` record stands for the interval since the previous one: the CPU rate is
    ``delta total_ns / delta t`` over that interval, the working set is the value read at its end,
    and both are weighted by the interval's length. A container sampled every second while busy
    and every 60 s while idle (dynamic housekeeping) is thus weighted by time, not by how often it
    was sampled. The first sample of a run, and the first after a gap longer than twice the
    largest housekeeping interval (a stopped or suspended exporter), has no CPU rate and stands
    for one nominal housekeeping interval; a gap is not counted as covered. A CPU counter that
    goes down (the cgroup was recreated) gives no rate for that interval. A sample stamped less
    than 10 ms after the previous one is ignored (cAdvisor's rule); a wall clock stepped back
    more than a minute starts the history afresh, a smaller step ignores samples until time
    catches up.

Percentiles
    Time-weighted inverted CDF, the definition ``numpy.percentile(x, q, weights=w,
    method="inverted_cdf")`` implements: the smallest value v such that samples <= v cover at
    least q of the sampled time. With equal intervals this is the order statistic x_(ceil(q*n)).
    (cAdvisor interpolates at (n+1)q; the two differ by less than one step between neighbouring
    samples.) Values are reported as integers, rounded to nearest, as cAdvisor's JSON has them.

Windows
    minute: the raw samples stamped in the 60 s up to now (the clock's time, or the latest
    sample's if later); exact.
    hour, day: the last 60 and 1440 completed wall-clock minutes. A sample counts in the minute it
    is stamped in, so a window's edges are accurate to one housekeeping interval.
    percent_complete: covered seconds / window seconds, rounded down (a container that started
    30 minutes ago has hour percent_complete 50 and day 2).

Hour and day: method and error
    When a minute completes, its raw samples are reduced to a summary per resource: total weight,
    time-weighted mean, and the inverted-CDF quantiles at levels 0 (min), .25, .5, .75, .9, .95
    and 1 (max). The hour and day statistics come from those summaries:

    * mean (weighted by each minute's covered time) and max are exact, up to float32 storage
      (relative error < 1e-7);
    * percentiles are those of the mixture of the minutes' distributions, each modelled as a CDF
      that passes through its stored quantiles and is linear between them (a zero-width step is a
      point mass, so a minute idle at exactly 0 stays exact).

    Error bound, in rank: at a value x, a minute's modelled CDF is exact outside the minute's
    range and at its stored quantiles, and off by at most the gap between the two stored levels
    around x otherwise (.25 below its 75th percentile, .15 up to its 90th, .05 above); the
    mixture's error is the time-weighted average of these. So a returned percentile is a true
    percentile within 25 points in the worst (adversarial) case, within 5 points where it lies
    above the 90th percentile of every minute whose range contains it, and exact when all minutes
    share one distribution. Measured (bench data and tests/test_summary.py: a CPU rate with noise,
    batch bursts and spikes over a daily cycle, a working-set sawtooth, 1 s and mixed intervals):
    rank error below 0.4 points, value error below 0.5 %. Minutes split between two far-apart
    modes (busy/idle within the minute) reach about 2 points, which on such data is a large value
    error. The tests assert 1 point.

    cAdvisor instead keeps 60 minute records, so its "day" never covers more than an hour
    (percent_complete <= 4), and computes every hour/day percentile as a percentile of the
    minutes' 90th percentiles.

Cost
    ``add_sample`` is O(1), about 2 µs (bench/summary.py): a few float operations and appends to
    arrays; once per minute, the minute's samples (60 at a 1 s interval) are sorted into its
    summary (about 40 µs). Memory: 56 bytes per minute of history in arrays (the quantiles between
    min and max are 16-bit fractions of the minute's range), about 81 KiB per container after a
    day, plus the raw samples of the last minute (40 bytes each). ``derived()`` sorts the stored
    summaries: about 1 ms for an hour and 15 ms for a full day of history, outside the lock, and
    cached until the next minute completes; a cached call costs about 50 µs.
"""

from __future__ import annotations

import math
import threading
from array import array
from bisect import bisect_left, bisect_right
from datetime import UTC, datetime
from itertools import pairwise

from pydantic import Field

from exporter.clock import Clock
from exporter.models import ContainerStats, Record

MINUTE_S = 60.0
HOUR_MINUTES = 60
DAY_MINUTES = 1440
MIN_INTERVAL_S = 0.01  # cAdvisor: "elapsed time too small" below 10 ms
BACKSTEP_RESET_S = 60.0
NS_PER_MILLICORE_S = 1e6  # one millicore for one second is 1e6 ns of CPU time

# Quantile levels kept per minute. The gaps bound the hour/day percentile error (see above).
LEVELS = (0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0)
_GAPS = tuple(b - a for a, b in pairwise(LEVELS))
_INNER = len(LEVELS) - 2  # stored as 16-bit fractions of [min, max]
_CODE_MAX = 65535
_TARGETS = (0.5, 0.9, 0.95)  # fifty, ninety, ninetyfive: stored levels, so identical minutes give exact results
_P50, _P90, _P95 = (LEVELS.index(q) for q in _TARGETS)
_COMPACT_AT = 64  # drop expired entries from the arrays' heads in batches


class Percentiles(Record):
    """cAdvisor v2 ``Percentiles``: millicores for CPU, bytes for memory."""

    present: bool = False
    mean: int = 0
    max: int = 0
    fifty: int = 0
    ninety: int = 0
    ninetyfive: int = 0


class Usage(Record):
    """cAdvisor v2 ``Usage``: one window."""

    percent_complete: int = 0
    cpu: Percentiles = Field(default_factory=Percentiles)
    memory: Percentiles = Field(default_factory=Percentiles)


class InstantUsage(Record):
    """cAdvisor v2 ``InstantUsage``: the latest sample (CPU rate 0 when it has none)."""

    cpu: int = 0
    memory: int = 0


class DerivedStats(Record):
    """cAdvisor v2 ``DerivedStats``; ``timestamp`` is the latest sample's time."""

    timestamp: datetime
    latest_usage: InstantUsage = Field(default_factory=InstantUsage)
    minute_usage: Usage = Field(default_factory=Usage)
    hour_usage: Usage = Field(default_factory=Usage)
    day_usage: Usage = Field(default_factory=Usage)


def _weighted_quantiles(values: list[float], weights: list[float]) -> tuple[float, list[float]]:
    """Time-weighted mean and inverted-CDF quantiles at ``LEVELS`` of non-empty ``values``."""
    order = sorted(range(len(values)), key=values.__getitem__)
    cum = 0.0
    cums = []
    weighted = 0.0
    for i in order:
        w = weights[i]
        cum += w
        cums.append(cum)
        weighted += w * values[i]
    total = cum
    points = [values[order[0]]]
    k = 0
    last = len(order) - 1
    for level in LEVELS[1:-1]:
        # numpy normalizes the cumulative weights first; dividing the same way gives its results.
        while k < last and cums[k] / total < level:
            k += 1
        points.append(values[order[k]])
    points.append(values[order[-1]])
    return weighted / total, points


def _percentiles(mean: float, maximum: float, fifty: float, ninety: float, ninetyfive: float) -> Percentiles:
    return Percentiles(
        present=True, mean=round(mean), max=round(maximum), fifty=round(fifty), ninety=round(ninety), ninetyfive=round(ninetyfive)
    )


def _raw_percentiles(values: list[float], weights: list[float]) -> Percentiles:
    if not values:
        return Percentiles()
    mean, points = _weighted_quantiles(values, weights)
    return _percentiles(mean, points[-1], points[_P50], points[_P90], points[_P95])


def _percent(covered_s: float, window_s: float) -> int:
    return max(0, min(100, math.floor(covered_s * 100.0 / window_s + 1e-9)))


class _Minutes:
    """Per-minute summaries in parallel arrays, oldest first, entries [first, len) live."""

    __slots__ = ("minute", "weight", "floats", "codes", "first")

    def __init__(self) -> None:
        self.minute = array("i")
        # per resource r (0 cpu, 1 memory): weight[2i+r] seconds; floats[6i+3r..] mean, min, max;
        # codes[2*_INNER*i + _INNER*r ..] the inner quantiles as fractions of [min, max]
        self.weight = array("f")
        self.floats = array("f")
        self.codes = array("H")
        self.first = 0

    def append(self, minute: int, summaries: tuple[tuple[float, float, list[float]] | None, ...]) -> None:
        self.minute.append(minute)
        for summary in summaries:
            if summary is None:
                self.weight.append(0.0)
                self.floats.extend((0.0, 0.0, 0.0))
                self.codes.extend([0] * _INNER)
                continue
            weight, mean, points = summary
            low, high = points[0], points[-1]
            span = high - low
            self.weight.append(weight)
            self.floats.extend((mean, low, high))
            if span > 0.0:
                self.codes.extend([round((p - low) / span * _CODE_MAX) for p in points[1:-1]])
            else:
                self.codes.extend([0] * _INNER)

    def expire(self, oldest: int) -> None:
        minute = self.minute
        first = bisect_left(minute, oldest, self.first)
        self.first = first
        if first >= _COMPACT_AT:
            del minute[:first]
            del self.weight[: 2 * first]
            del self.floats[: 6 * first]
            del self.codes[: 2 * _INNER * first]
            self.first = 0

    def __len__(self) -> int:
        return len(self.minute) - self.first

    def window(self, start: int, end: int) -> _Snapshot:
        """A copy of the entries with start <= minute < end."""
        lo = bisect_left(self.minute, start, self.first)
        hi = bisect_left(self.minute, end, lo)
        return _Snapshot(
            self.minute[lo:hi],
            self.weight[2 * lo : 2 * hi],
            self.floats[6 * lo : 6 * hi],
            self.codes[2 * _INNER * lo : 2 * _INNER * hi],
        )

    def nbytes(self) -> int:
        return sum(a.buffer_info()[1] * a.itemsize for a in (self.minute, self.weight, self.floats, self.codes))


class _Snapshot(_Minutes):
    __slots__ = ()

    def __init__(self, minute: array[int], weight: array[float], floats: array[float], codes: array[int]) -> None:
        self.minute, self.weight, self.floats, self.codes, self.first = minute, weight, floats, codes, 0

    def usage(self, start: int, window_minutes: int) -> Usage:
        """The mixture of the entries from ``start`` on (the snapshot is ordered by minute)."""
        lo = bisect_left(self.minute, start)
        covered = 0.0
        weight = self.weight
        for i in range(lo, len(self.minute)):
            covered += max(weight[2 * i], weight[2 * i + 1])
        return Usage(
            percent_complete=_percent(covered, window_minutes * MINUTE_S),
            cpu=self._mixture(lo, 0),
            memory=self._mixture(lo, 1),
        )

    def _mixture(self, lo: int, r: int) -> Percentiles:
        weight, floats, codes = self.weight, self.floats, self.codes
        positions: list[float] = []
        slopes: list[float] = []
        jumps: list[float] = []
        total = 0.0
        weighted = 0.0
        maximum = -math.inf
        for i in range(lo, len(self.minute)):
            w = weight[2 * i + r]
            if w <= 0.0:
                continue
            base = 6 * i + 3 * r
            mean, low, high = floats[base], floats[base + 1], floats[base + 2]
            total += w
            weighted += w * mean
            if high > maximum:
                maximum = high
            if high == low:
                positions.append(low)
                slopes.append(0.0)
                jumps.append(w)
                continue
            scale = (high - low) / _CODE_MAX
            cbase = 2 * _INNER * i + _INNER * r
            a = low
            for j in range(len(_GAPS)):
                b = low + codes[cbase + j] * scale if j < _INNER else high
                mass = w * _GAPS[j]
                if b > a:
                    slope = mass / (b - a)
                    positions.append(a)
                    slopes.append(slope)
                    jumps.append(0.0)
                    positions.append(b)
                    slopes.append(-slope)
                    jumps.append(0.0)
                else:
                    positions.append(a)
                    slopes.append(0.0)
                    jumps.append(mass)
                a = b
        if total <= 0.0:
            return Percentiles()
        found = _sweep(positions, slopes, jumps, [p * total for p in _TARGETS], maximum)
        return _percentiles(weighted / total, maximum, *found)


def _sweep(positions: list[float], slopes: list[float], jumps: list[float], targets: list[float], maximum: float) -> list[float]:
    """Smallest x with F(x) >= target for each (ascending) target, F being the mass at or below x:
    point masses ``jumps`` and densities that change by ``slopes`` at ``positions``."""
    found: list[float] = []
    n_targets = len(targets)
    mass = 0.0
    density = 0.0
    x = positions[0] if positions else 0.0
    for k in sorted(range(len(positions)), key=positions.__getitem__):
        pos = positions[k]
        if density > 0.0 and pos > x:
            reached = mass + density * (pos - x)
            while len(found) < n_targets and reached >= targets[len(found)]:
                found.append(min(pos, x + (targets[len(found)] - mass) / density))
            mass = reached
        x = pos
        mass += jumps[k]
        density += slopes[k]
        while len(found) < n_targets and mass >= targets[len(found)]:
            found.append(pos)
        if len(found) == n_targets:
            break
    while len(found) < n_targets:  # rounding left the last target a hair above the total mass
        found.append(maximum)
    return found


class StatsSummary:
    """Minute, hour and day usage of one container, fed one record per housekeeping tick."""

    def __init__(self, clock: Clock, housekeeping_interval_s: float, max_housekeeping_interval_s: float = 60.0) -> None:
        self.clock = clock
        self.nominal_s = housekeeping_interval_s
        self.max_gap_s = 2.0 * max(housekeeping_interval_s, max_housekeeping_interval_s)
        self.ignored_samples = 0  # too close to the previous one, or stamped before it
        self.cpu_resets = 0
        self.resets = 0  # wall clock stepped back: history dropped
        self._lock = threading.Lock()
        self._minutes = _Minutes()
        self._version = 0  # bumped when a minute is added: invalidates the hour/day cache
        self._cache: tuple[tuple[int, int, int], Usage, Usage] | None = None
        self._init_samples()

    def _init_samples(self) -> None:
        # Raw samples of the last minute (and of the minute being filled, a subset), oldest first;
        # [_first, len) are live. NaN: no value.
        self._ts = array("d")
        self._cpu = array("d")
        self._cpu_w = array("d")
        self._mem = array("d")
        self._mem_w = array("d")
        self._first = 0
        self._accepted = 0
        self._last_ts: float | None = None
        self._cpu_ts: float | None = None
        self._cpu_ns = 0
        self._pending: int | None = None  # the minute being filled
        self._latest_cpu = math.nan
        self._latest_mem = math.nan

    # -- hot path -----------------------------------------------------------------------------
    def add_sample(self, record: ContainerStats) -> None:
        """Take one housekeeping record (its timestamp, cpu.total_ns, memory.working_set_bytes)."""
        cpu = record.cpu
        total_ns = cpu.total_ns if cpu is not None else None
        memory = record.memory
        working_set = memory.working_set_bytes if memory is not None else None
        if total_ns is None and working_set is None:
            return
        t = record.timestamp.timestamp()
        with self._lock:
            self._add(t, total_ns, working_set)

    def _add(self, t: float, total_ns: int | None, working_set: int | None) -> None:
        last = self._last_ts
        interval = self.nominal_s
        if last is not None:
            elapsed = t - last
            if elapsed < MIN_INTERVAL_S:
                if elapsed >= -BACKSTEP_RESET_S:
                    self.ignored_samples += 1
                    return
                self.resets += 1
                self._minutes = _Minutes()
                self._version += 1
                self._init_samples()
            elif elapsed <= self.max_gap_s:
                interval = elapsed
        rate = math.nan
        cpu_w = 0.0
        if total_ns is not None:
            cpu_ts = self._cpu_ts
            if cpu_ts is not None:
                elapsed = t - cpu_ts
                if total_ns < self._cpu_ns:
                    self.cpu_resets += 1
                elif elapsed <= self.max_gap_s:
                    rate = (total_ns - self._cpu_ns) / elapsed / NS_PER_MILLICORE_S
                    cpu_w = elapsed
            self._cpu_ts = t
            self._cpu_ns = total_ns
        minute = int(t // MINUTE_S)
        if minute != self._pending:
            if self._pending is not None:
                self._close_minute(minute)
            self._pending = minute
        ts = self._ts
        horizon = t - MINUTE_S
        first = self._first
        while first < len(ts) and ts[first] <= horizon:
            first += 1
        if first >= _COMPACT_AT:
            for column in (ts, self._cpu, self._cpu_w, self._mem, self._mem_w):
                del column[:first]
            first = 0
        self._first = first
        ts.append(t)
        self._cpu.append(rate)
        self._cpu_w.append(cpu_w)
        mem = math.nan if working_set is None else float(working_set)
        self._mem.append(mem)
        self._mem_w.append(0.0 if working_set is None else interval)
        self._last_ts = t
        self._accepted += 1
        self._latest_cpu = rate
        self._latest_mem = mem

    def _close_minute(self, next_minute: int) -> None:
        """Summarize the pending minute (its samples are the newest raw ones) into the history."""
        minutes = self._minutes
        minutes.append(self._pending, self._pending_summaries())  # type: ignore[arg-type]
        minutes.expire(next_minute - DAY_MINUTES)
        self._version += 1

    def _pending_summaries(self) -> tuple[tuple[float, float, list[float]] | None, ...]:
        start = bisect_left(self._ts, self._pending * MINUTE_S, self._first)  # type: ignore[operator]
        return (
            _summarize(self._cpu, self._cpu_w, start),
            _summarize(self._mem, self._mem_w, start),
        )

    # -- reading ------------------------------------------------------------------------------
    def derived(self) -> DerivedStats:
        """The minute, hour and day usage as of now; windows without samples are not present."""
        with self._lock:
            last = self._last_ts
            now = self.clock.time() if last is None else max(self.clock.time(), last)
            end = int(now // MINUTE_S)  # windows end before the current minute
            # The pending minute is complete once the clock has left it; it is summarized here
            # but added to the history only by the next sample, which may still be stamped in it.
            pending = self._pending if self._pending is not None and self._pending < end else None
            key = (end, self._version, self._accepted if pending is not None else -1)
            cached = self._cache if self._cache is not None and self._cache[0] == key else None
            if cached is None:
                snapshot = self._minutes.window(end - DAY_MINUTES, end)
                if pending is not None:
                    snapshot.append(pending, self._pending_summaries())
            minute_usage = self._minute_usage(now)
            latest = InstantUsage(
                cpu=0 if math.isnan(self._latest_cpu) else round(self._latest_cpu),
                memory=0 if math.isnan(self._latest_mem) else round(self._latest_mem),
            )
        if cached is not None:
            _, hour_usage, day_usage = cached
        else:
            hour_usage = snapshot.usage(end - HOUR_MINUTES, HOUR_MINUTES)
            day_usage = snapshot.usage(end - DAY_MINUTES, DAY_MINUTES)
            with self._lock:
                self._cache = (key, hour_usage, day_usage)
        return DerivedStats(
            timestamp=datetime.fromtimestamp(now if last is None else last, UTC),
            latest_usage=latest,
            minute_usage=minute_usage,
            hour_usage=hour_usage,
            day_usage=day_usage,
        )

    def _minute_usage(self, now: float) -> Usage:
        start = bisect_right(self._ts, now - MINUTE_S, self._first)
        end = bisect_right(self._ts, now, start)
        values: tuple[list[float], list[float]] = ([], [])
        weights: tuple[list[float], list[float]] = ([], [])
        covered = 0.0
        for i in range(start, end):
            cpu_w, mem_w = self._cpu_w[i], self._mem_w[i]
            covered += max(cpu_w, mem_w)
            if cpu_w > 0.0:
                values[0].append(self._cpu[i])
                weights[0].append(cpu_w)
            if mem_w > 0.0:
                values[1].append(self._mem[i])
                weights[1].append(mem_w)
        return Usage(
            percent_complete=_percent(covered, MINUTE_S),
            cpu=_raw_percentiles(values[0], weights[0]),
            memory=_raw_percentiles(values[1], weights[1]),
        )

    # -- introspection ------------------------------------------------------------------------
    def minutes_kept(self) -> int:
        with self._lock:
            return len(self._minutes)

    def nbytes(self) -> int:
        """Bytes held in arrays (history and raw samples)."""
        with self._lock:
            raw = sum(a.buffer_info()[1] * a.itemsize for a in (self._ts, self._cpu, self._cpu_w, self._mem, self._mem_w))
            return self._minutes.nbytes() + raw


def _summarize(values: array[float], weights: array[float], start: int) -> tuple[float, float, list[float]] | None:
    picked: list[float] = []
    picked_w: list[float] = []
    for i in range(start, len(values)):
        w = weights[i]
        if w > 0.0:
            picked.append(values[i])
            picked_w.append(w)
    if not picked:
        return None
    mean, points = _weighted_quantiles(picked, picked_w)
    return math.fsum(picked_w), mean, points
