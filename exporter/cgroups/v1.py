"""cgroup v1 controllers: parsers of the kernel's text, and a per-container reader."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exporter.cgroups.files import (
    CgroupFile,
    MalformedFile,
    OpenFiles,
    int_value,
    parse_flat,
    parse_int,
    parse_int_list,
    read_bytes,
    working_set_bytes,
)
from exporter.cgroups.layout import CgroupLayout
from exporter.models import CpuSpec, MemorySpec

USER_HZ = os.sysconf("SC_CLK_TCK")
NS_PER_TICK = 1_000_000_000 // USER_HZ


def parse_blkio(data: bytes, path: str = "?") -> dict[tuple[int, int], tuple[int, int]]:
    """blkio.*io_service_bytes / io_serviced → {(major, minor): (read, write)}."""
    out: dict[tuple[int, int], tuple[int, int]] = {}
    for line in data.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue  # the trailing "Total N" line
        op = parts[1]
        if op != b"Read" and op != b"Write":
            continue
        dev, _, minor = parts[0].partition(b":")
        try:
            key = (int(dev), int(minor))
            value = int(parts[2])
        except ValueError:
            raise MalformedFile(path, f"bad blkio line {line[:60]!r}") from None
        read, write = out.get(key, (0, 0))
        out[key] = (read + value, write) if op == b"Read" else (read, write + value)
    return out


class V1Reader(OpenFiles):
    """Reads one container's v1 controller files through descriptors kept open."""

    def __init__(self, layout: CgroupLayout, name: str) -> None:
        self.name = name
        self.dirs = [p for p in (layout.v1_path(c, name) for c in layout.v1) if p is not None and p.is_dir()]

        def f(controller: str, filename: str) -> CgroupFile | None:
            path = layout.v1_path(controller, name)
            return None if path is None else CgroupFile.open(path / filename)

        # usage_percpu holds the exact per-cpu runtime; its sum is cpuacct.usage. The user/system
        # split is tick-sampled in every file that has it (usage_all too, since Linux 5.16), so
        # the short cpuacct.stat is enough for it.
        self.usage_percpu = f("cpuacct", "cpuacct.usage_percpu")
        self.usage = None if self.usage_percpu is not None else f("cpuacct", "cpuacct.usage")
        self.cpuacct_stat = f("cpuacct", "cpuacct.stat")
        self.cpu_stat = f("cpu", "cpu.stat")
        self.mem_usage = f("memory", "memory.usage_in_bytes")
        self.mem_max_usage = f("memory", "memory.max_usage_in_bytes")
        self.mem_stat = f("memory", "memory.stat")
        self.mem_failcnt = f("memory", "memory.failcnt")
        self.mem_oom_control = f("memory", "memory.oom_control")
        self.blkio_bytes, self.blkio_ops = self._open_blkio(f)
        self.pids_current = f("pids", "pids.current")
        # Any hierarchy lists the tasks; prefer cpu, which every container has.
        procs_dir = next((layout.v1_path(c, name) for c in ("cpu", "cpuacct", "memory", "pids") if c in layout.v1), None)
        self.procs = CgroupFile.open(procs_dir / "cgroup.procs") if procs_dir else None
        self.tasks = CgroupFile.open(procs_dir / "tasks") if procs_dir else None

    @staticmethod
    def _open_blkio(f: Callable[[str, str], CgroupFile | None]) -> tuple[CgroupFile | None, CgroupFile | None]:
        # The throttle files count every bio for every scheduler; the CFQ/BFQ ones only exist for
        # their scheduler. Recursive variants include children, like the memory "total_" values.
        for bytes_name, ops_name in (
            ("blkio.throttle.io_service_bytes_recursive", "blkio.throttle.io_serviced_recursive"),
            ("blkio.throttle.io_service_bytes", "blkio.throttle.io_serviced"),
            ("blkio.io_service_bytes_recursive", "blkio.io_serviced_recursive"),
            ("blkio.bfq.io_service_bytes_recursive", "blkio.bfq.io_serviced_recursive"),
        ):
            b = f("blkio", bytes_name)
            if b is not None:
                return b, f("blkio", ops_name)
        return None, None

    def cpu(self, percpu: bool) -> dict[str, Any] | None:
        """Fields of :class:`CpuStats`."""
        stats: dict[str, Any] = {}
        if self.usage_percpu is not None:
            per_cpu = parse_int_list(self.usage_percpu.read(), self.usage_percpu.path)
            stats["total_ns"] = sum(per_cpu)
            if percpu:
                stats["per_cpu_ns"] = per_cpu
        elif self.usage is not None:
            stats["total_ns"] = parse_int(self.usage.read(), self.usage.path)
        if self.cpuacct_stat is not None:
            path = self.cpuacct_stat.path
            ticks = parse_flat(self.cpuacct_stat.read(), path)
            user, system = int_value(ticks, b"user", path), int_value(ticks, b"system", path)
            stats["user_ns"] = None if user is None else user * NS_PER_TICK
            stats["system_ns"] = None if system is None else system * NS_PER_TICK
        if self.cpu_stat is not None:
            path = self.cpu_stat.path
            throttle = parse_flat(self.cpu_stat.read(), path)
            stats["periods"] = int_value(throttle, b"nr_periods", path)
            stats["throttled_periods"] = int_value(throttle, b"nr_throttled", path)
            stats["throttled_time_ns"] = int_value(throttle, b"throttled_time", path)
        return stats or None

    def memory(self) -> dict[str, Any] | None:
        """Fields of :class:`MemoryStats`."""
        if self.mem_usage is None:
            return None
        usage = parse_int(self.mem_usage.read(), self.mem_usage.path)
        if self.mem_stat is not None:
            path = self.mem_stat.path
            stat = parse_flat(self.mem_stat.read(), path)
            # Hierarchical "total_" values include children, which is what a container's figure
            # means; use_hierarchy=0 (old kernels) only has the local ones.
            prefix = b"total_" if b"total_rss" in stat else b""

            def value(key: bytes) -> int | None:
                return int_value(stat, prefix + key, path)
        else:

            def value(key: bytes) -> int | None:
                return None

        inactive_file = value(b"inactive_file")
        working_set = working_set_bytes(usage, inactive_file)
        events = None
        if self.mem_oom_control is not None:
            oom = parse_flat(self.mem_oom_control.read(), self.mem_oom_control.path)
            # "oom_kill" appeared in Linux 4.13; older kernels only say under_oom.
            if b"oom_kill" in oom:
                events = {"oom_kill": int_value(oom, b"oom_kill", self.mem_oom_control.path)}
        return {
            "usage_bytes": usage,
            "max_usage_bytes": parse_int(self.mem_max_usage.read(), self.mem_max_usage.path) if self.mem_max_usage else None,
            "working_set_bytes": working_set,
            "rss_bytes": value(b"rss"),
            "cache_bytes": value(b"cache"),
            "swap_bytes": value(b"swap"),
            "mapped_file_bytes": value(b"mapped_file"),
            "failcnt": parse_int(self.mem_failcnt.read(), self.mem_failcnt.path) if self.mem_failcnt else None,
            "pgfault": value(b"pgfault"),
            "pgmajfault": value(b"pgmajfault"),
            "events": events,
        }

    def diskio(self) -> dict[tuple[int, int], tuple[int, int, int, int]] | None:
        """{(major, minor): (read_bytes, write_bytes, read_ops, write_ops)}"""
        if self.blkio_bytes is None:
            return None
        by_bytes = parse_blkio(self.blkio_bytes.read(), self.blkio_bytes.path)
        by_ops = parse_blkio(self.blkio_ops.read(), self.blkio_ops.path) if self.blkio_ops else {}
        out = {}
        for key in by_bytes.keys() | by_ops.keys():
            rb, wb = by_bytes.get(key, (0, 0))
            ro, wo = by_ops.get(key, (0, 0))
            out[key] = (rb, wb, ro, wo)
        return out


def _read_int(path: Path | None) -> int | None:
    if path is None:
        return None
    data = read_bytes(path)
    if data is None:
        return None
    value = data.strip()
    if value in (b"-1", b"max", b""):
        return None
    return parse_int(data, path)


def _read_str(path: Path | None) -> str | None:
    if path is None:
        return None
    data = read_bytes(path)
    if data is None:
        return None
    return data.decode().strip() or None


def read_spec(layout: CgroupLayout, name: str) -> tuple[CpuSpec, MemorySpec, int | None]:
    cpu_dir = layout.v1_path("cpu", name)
    mem_dir = layout.v1_path("memory", name)
    cpuset_dir = layout.v1_path("cpuset", name)
    pids_dir = layout.v1_path("pids", name)
    quota = _read_int(cpu_dir / "cpu.cfs_quota_us" if cpu_dir else None)
    period = _read_int(cpu_dir / "cpu.cfs_period_us" if cpu_dir else None)
    cpu = CpuSpec(
        shares=_read_int(cpu_dir / "cpu.shares" if cpu_dir else None),
        quota_us=quota,
        period_us=period,
        limit_cores=quota / period if quota and period else None,
        cpuset_cpus=_read_str(cpuset_dir / "cpuset.cpus" if cpuset_dir else None),
        cpuset_mems=_read_str(cpuset_dir / "cpuset.mems" if cpuset_dir else None),
    )
    memory = MemorySpec(
        limit_bytes=_read_int(mem_dir / "memory.limit_in_bytes" if mem_dir else None),
        reservation_bytes=_read_int(mem_dir / "memory.soft_limit_in_bytes" if mem_dir else None),
        swap_limit_bytes=_read_int(mem_dir / "memory.memsw.limit_in_bytes" if mem_dir else None),
    )
    return cpu, memory, _read_int(pids_dir / "pids.max" if pids_dir else None)
