"""cgroup v2 (unified) controllers: parsers of the kernel's text, and a per-container reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.cgroups.files import (
    CgroupFile,
    MalformedFile,
    OpenFiles,
    int_value,
    parse_flat,
    parse_int,
    read_bytes,
    working_set_bytes,
)
from exporter.cgroups.layout import CgroupLayout, join
from exporter.models import CpuSpec, MemorySpec

_IO_KEYS = frozenset({b"rbytes", b"wbytes", b"rios", b"wios"})


def parse_io_stat(data: bytes, path: str = "?") -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """io.stat → {(major, minor): (rbytes, wbytes, rios, wios)}."""
    out = {}
    for line in data.splitlines():
        parts = line.split()
        if not parts:
            continue
        dev, sep, minor = parts[0].partition(b":")
        if not sep:
            raise MalformedFile(path, f"expected 'major:minor key=value...', got {line[:60]!r}")
        values: dict[bytes, int] = {}
        for item in parts[1:]:
            key, _, raw = item.partition(b"=")
            # The root's lines also carry iocost's "cost.vrate=100.00" and friends.
            if key not in _IO_KEYS:
                continue
            try:
                values[key] = int(raw)
            except ValueError:
                raise MalformedFile(path, f"bad number in {item[:40]!r}") from None
        try:
            major_minor = (int(dev), int(minor))
        except ValueError:
            raise MalformedFile(path, f"bad device {parts[0][:20]!r}") from None
        out[major_minor] = (
            values.get(b"rbytes", 0),
            values.get(b"wbytes", 0),
            values.get(b"rios", 0),
            values.get(b"wios", 0),
        )
    return out


def parse_cpu_max(data: bytes, path: str = "?") -> tuple[int | None, int | None]:
    """cpu.max → (quota_us or None for "max", period_us)."""
    parts = data.split()
    if len(parts) != 2:
        raise MalformedFile(path, f"expected '<quota|max> <period>', got {data[:40]!r}")
    try:
        period = int(parts[1])
        quota = None if parts[0] == b"max" else int(parts[0])
    except ValueError:
        raise MalformedFile(path, f"bad number in {data[:40]!r}") from None
    return quota, period


def weight_to_shares(weight: int) -> int:
    """The inverse of the runtimes' shares→weight mapping (runc, crun, systemd)."""
    return 2 + ((weight - 1) * 262142) // 9999


class V2Reader(OpenFiles):
    """Reads one container's unified-hierarchy files through descriptors kept open."""

    def __init__(self, layout: CgroupLayout, name: str) -> None:
        assert layout.unified is not None
        self.name = name
        base = join(layout.unified, name)
        self.dirs = [base] if base.is_dir() else []

        def f(filename: str) -> CgroupFile | None:
            return CgroupFile.open(base / filename)

        self.cpu_stat = f("cpu.stat")
        self.mem_current = f("memory.current")
        self.mem_peak = f("memory.peak")
        self.mem_stat = f("memory.stat")
        self.mem_swap = f("memory.swap.current")
        self.mem_events = f("memory.events")
        self.io_stat = f("io.stat")
        self.pids_current = f("pids.current")
        self.procs = f("cgroup.procs")
        self.tasks = f("cgroup.threads")

    def cpu(self, percpu: bool) -> dict[str, Any] | None:
        """Fields of :class:`CpuStats`; v2 has no per-cpu figures."""
        if self.cpu_stat is None:
            return None
        path = self.cpu_stat.path
        stat = parse_flat(self.cpu_stat.read(), path)

        def ns(key: bytes) -> int | None:
            value = int_value(stat, key, path)
            return None if value is None else value * 1000

        return {
            "total_ns": ns(b"usage_usec"),
            "user_ns": ns(b"user_usec"),
            "system_ns": ns(b"system_usec"),
            # The cpu controller adds the throttling keys only where it is enabled.
            "periods": int_value(stat, b"nr_periods", path),
            "throttled_periods": int_value(stat, b"nr_throttled", path),
            "throttled_time_ns": ns(b"throttled_usec"),
        }

    def memory(self) -> dict[str, Any] | None:
        """Fields of :class:`MemoryStats`."""
        if self.mem_current is None:
            return None
        usage = parse_int(self.mem_current.read(), self.mem_current.path)
        stat: dict[bytes, bytes] = {}
        path = "?"
        if self.mem_stat is not None:
            path = self.mem_stat.path
            stat = parse_flat(self.mem_stat.read(), path)
        inactive_file = int_value(stat, b"inactive_file", path)
        working_set = working_set_bytes(usage, inactive_file)
        events = None
        if self.mem_events is not None:
            epath = self.mem_events.path
            ev = parse_flat(self.mem_events.read(), epath)
            events = {key: int_value(ev, key.encode(), epath) for key in ("low", "high", "max", "oom", "oom_kill")}
        return {
            "usage_bytes": usage,
            # memory.peak exists since Linux 5.19.
            "max_usage_bytes": parse_int(self.mem_peak.read(), self.mem_peak.path) if self.mem_peak else None,
            "working_set_bytes": working_set,
            "rss_bytes": int_value(stat, b"anon", path),
            "cache_bytes": int_value(stat, b"file", path),
            "swap_bytes": parse_int(self.mem_swap.read(), self.mem_swap.path) if self.mem_swap else None,
            "mapped_file_bytes": int_value(stat, b"file_mapped", path),
            "pgfault": int_value(stat, b"pgfault", path),
            "pgmajfault": int_value(stat, b"pgmajfault", path),
            "events": events,
        }

    def diskio(self) -> dict[tuple[int, int], tuple[int, int, int, int]] | None:
        if self.io_stat is None:
            return None
        return parse_io_stat(self.io_stat.read(), self.io_stat.path)


def _read(path: Path) -> bytes | None:
    data = read_bytes(path)
    return data if data is not None and data.strip() else None


def read_spec(layout: CgroupLayout, name: str) -> tuple[CpuSpec, MemorySpec, int | None]:
    assert layout.unified is not None
    base = join(layout.unified, name)

    def int_file(filename: str) -> int | None:
        data = _read(base / filename)
        return None if data is None else parse_int(data, base / filename)

    def str_file(*filenames: str) -> str | None:
        for filename in filenames:
            data = _read(base / filename)
            if data is not None:
                return data.decode().strip()
        return None

    quota = period = None
    cpu_max = _read(base / "cpu.max")
    if cpu_max is not None:
        quota, period = parse_cpu_max(cpu_max, base / "cpu.max")
    weight = int_file("cpu.weight")
    cpu = CpuSpec(
        weight=weight,
        shares=weight_to_shares(weight) if weight is not None else None,
        quota_us=quota,
        period_us=period,
        limit_cores=quota / period if quota and period else None,
        cpuset_cpus=str_file("cpuset.cpus.effective", "cpuset.cpus"),
        cpuset_mems=str_file("cpuset.mems.effective", "cpuset.mems"),
    )
    low = int_file("memory.low")
    memory = MemorySpec(
        limit_bytes=int_file("memory.max"),
        reservation_bytes=low or None,
        swap_limit_bytes=int_file("memory.swap.max"),
    )
    return cpu, memory, int_file("pids.max")
