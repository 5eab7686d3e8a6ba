"""One container's stats from its cgroup (v1, v2 or hybrid) and its tasks in /proc."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from exporter.cgroups import v1, v2
from exporter.cgroups.files import (
    CgroupFile,
    ContainerGone,
    MalformedFile,
    ReopeningFile,
    first_pid,
    is_gone_error,
    parse_pressure,
)
from exporter.cgroups.layout import CgroupLayout, join
from exporter.cgroups.procs import LoadAverage, NetDevReader, ProcReader
from exporter.models import (
    ContainerSpec,
    CpuStats,
    DiskIoDevice,
    MemoryStats,
    NetworkInterface,
    PressureStats,
    ProcessStats,
)

log = logging.getLogger(__name__)

# Metric groups, named as cAdvisor's --disable_metrics names them.
METRIC_KINDS = frozenset(
    {"cpu", "percpu", "cpuLoad", "memory", "diskIO", "network", "process", "pressure", "disk", "oom_event"}
)

MalformedHandler = Callable[[str, MalformedFile], None]


class DeviceNames:
    """major:minor → block device name, from /sys/dev/block; cached."""

    def __init__(self, sys_root: str | Path = "/sys") -> None:
        self._root = Path(sys_root) / "dev" / "block"
        self._names: dict[tuple[int, int], str | None] = {}

    def name(self, major: int, minor: int) -> str | None:
        key = (major, minor)
        if key not in self._names:
            try:
                self._names[key] = os.path.basename(os.readlink(self._root / f"{major}:{minor}"))
            except OSError:
                self._names[key] = None
        return self._names[key]


class ContainerReader:
    """Reads everything the kernel says about one container, section by section.

    A malformed file unsets its section (reported through ``on_malformed``); a vanished cgroup
    raises :class:`ContainerGone`.
    """

    def __init__(
        self,
        layout: CgroupLayout,
        name: str,
        proc: ProcReader,
        devices: DeviceNames,
        metrics: frozenset[str],
        on_malformed: MalformedHandler,
        host_netns: int | None = None,
    ) -> None:
        self.layout = layout
        self.name = name
        self.metrics = metrics
        self._proc = proc
        self._devices = devices
        self._on_malformed = on_malformed
        self.cgroup, self._psi = self._open_files()
        if not self.cgroup.dirs:
            _close_files(self.cgroup, self._psi)
            raise ContainerGone(name)
        self._track_dirs()
        # A runtime creates a container's directory in one hierarchy after another, and we may
        # be told about the first one: look again for the others during the first reads.
        self._settle_reads = self.SETTLE_READS if self._missing else 0
        self.is_root = name == "/"
        self._net: NetDevReader | None = None
        if "network" in metrics:
            # The root container is the host: its traffic is the host's. Any other container
            # sharing the host's namespace has no traffic of its own.
            self._net = NetDevReader(proc, None if self.is_root else host_netns)
        self._load = LoadAverage() if "cpuLoad" in metrics and "cpu" in metrics else None
        self._percpu = "percpu" in metrics

    SETTLE_READS = 10

    def _hierarchy_dirs(self) -> list[Path]:
        dirs = [join(p, self.name) for p in self.layout.discovery_roots()]
        if self.layout.mode == "hybrid" and self.layout.unified is not None and "pressure" in self.metrics:
            dirs.append(join(self.layout.unified, self.name))
        return dirs

    def _track_dirs(self) -> None:
        self._dir_inodes = [(d, os.stat(d).st_ino) for d in self.cgroup.dirs]
        self._missing = [d for d in self._hierarchy_dirs() if not d.is_dir()]

    def _open_files(self) -> tuple[v1.V1Reader | v2.V2Reader, list[tuple[str, CgroupFile | ReopeningFile]]]:
        layout, name = self.layout, self.name
        cgroup = v2.V2Reader(layout, name) if layout.mode == "v2" else v1.V1Reader(layout, name)
        psi: list[tuple[str, CgroupFile | ReopeningFile]] = []
        if "pressure" in self.metrics and layout.unified is not None:
            base = join(layout.unified, name)
            for kind in ("cpu", "memory", "io"):
                file = CgroupFile.open(base / f"{kind}.pressure")
                if file is not None:
                    psi.append((kind, file))
        return cgroup, psi

    def _settle(self) -> None:
        self._settle_reads -= 1
        if not any(d.is_dir() for d in self._missing):
            return
        old_cgroup, old_psi = self.cgroup, self._psi
        self.cgroup, self._psi = self._open_files()
        _close_files(old_cgroup, old_psi)
        self._track_dirs()
        if not self._missing:
            self._settle_reads = 0

    def close(self) -> None:
        _close_files(self.cgroup, self._psi)
        if self._net is not None:
            self._net.close()

    def spec(self) -> ContainerSpec:
        module = v2 if self.layout.mode == "v2" else v1
        try:
            cpu, memory, pids_limit = module.read_spec(self.layout, self.name)
        except MalformedFile as exc:
            self._on_malformed(self.name, exc)
            return ContainerSpec(creation_time=self.creation_time())
        return ContainerSpec(creation_time=self.creation_time(), cpu=cpu, memory=memory, pids_limit=pids_limit)

    def creation_time(self) -> datetime | None:
        """Earliest change time of the container's cgroup directories."""
        times = []
        for d in self.cgroup.dirs:
            try:
                st = os.stat(d)
            except OSError:
                continue
            times.append(min(st.st_ctime, st.st_mtime))
        return datetime.fromtimestamp(min(times), UTC) if times else None

    def _section(self, fn: Callable[[], object]) -> object:
        try:
            return fn()
        except MalformedFile as exc:
            self._on_malformed(self.name, exc)
            return None
        except OSError as exc:
            if not is_gone_error(exc):
                raise
            if self._replaced():
                raise ContainerGone(self.name) from exc
            # The cgroup is still there but a file went away: "echo 0 > cgroup.pressure"
            # (Linux 6.1+) hides the *.pressure files and their open descriptors fail for good.
            self._on_malformed(self.name, MalformedFile(self.name, f"a file became unreadable ({exc.strerror})"))
            return None

    def _replaced(self) -> bool:
        """The cgroup's directories are gone, or were recreated (a restarted container)."""
        for path, inode in self._dir_inodes:
            try:
                if os.stat(path).st_ino != inode:
                    return True
            except OSError:
                return True
        return False

    def read(self, now_s: float) -> dict[str, Any]:
        """Sections of a :class:`ContainerStats` (cpu, memory, ...) as plain dicts and lists.

        Building the record from these in one validation is several times cheaper than
        building each nested model on its own; :meth:`read_models` gives the typed view.
        """
        if self._settle_reads:
            self._settle()
        m = self.metrics
        cg = self.cgroup
        section = self._section
        out: dict[str, Any] = {}
        procs = section(cg.procs.read) if cg.procs is not None else None
        tasks = section(cg.threads) if self._load is not None or "process" in m else None
        if "cpu" in m:
            cpu = section(lambda: cg.cpu(self._percpu))
            if cpu is not None and self._load is not None and tasks is not None:
                cpu["load_average_milli"] = int(self._load.update(self._proc.runnable(tasks.split()), now_s) * 1000)
            out["cpu"] = cpu
        if "memory" in m:
            out["memory"] = section(cg.memory)
        if "diskIO" in m:
            out["diskio"] = section(self._diskio)
        if "process" in m:
            out["processes"] = section(lambda: self._processes(procs, tasks))
        if self._net is not None:
            out["network"] = section(lambda: self._network(procs))
        if self._psi:
            out["pressure"] = section(self._pressure)
        return out

    def read_models(self, now_s: float) -> dict[str, Any]:
        """:meth:`read`, each section validated into its model."""
        return {key: _SECTIONS[key].validate_python(value) for key, value in self.read(now_s).items()}

    def _diskio(self) -> list[dict[str, Any]] | None:
        devices = self.cgroup.diskio()
        if devices is None:
            return None
        name = self._devices.name
        return [
            {
                "major": major, "minor": minor, "device": name(major, minor),
                "read_bytes": rb, "write_bytes": wb, "read_ops": ro, "write_ops": wo,
            }
            for (major, minor), (rb, wb, ro, wo) in sorted(devices.items())
        ]

    def _processes(self, procs: bytes | None, tasks: bytes | None) -> dict[str, Any]:
        return {
            "processes": procs.count(b"\n") if procs is not None else None,
            "pids_current": self.cgroup.pids(),
            "threads": tasks.count(b"\n") if tasks is not None else None,
            "open_fds": self._proc.open_fds(procs.split()) if procs is not None else None,
        }

    def _network(self, procs: bytes | None) -> list[dict[str, Any]] | None:
        assert self._net is not None
        pid = 1 if self.is_root else (first_pid(procs) if procs is not None else None)
        return self._net.read(pid)

    def _pressure(self) -> dict[str, Any]:
        return {kind: parse_pressure(file.read(), file.path) for kind, file in self._psi}


def _close_files(cgroup: v1.V1Reader | v2.V2Reader, psi: list[tuple[str, CgroupFile | ReopeningFile]]) -> None:
    cgroup.close()
    for _, file in psi:
        file.close()


_SECTIONS: dict[str, TypeAdapter[Any]] = {
    "cpu": TypeAdapter(CpuStats | None),
    "memory": TypeAdapter(MemoryStats | None),
    "diskio": TypeAdapter(list[DiskIoDevice] | None),
    "processes": TypeAdapter(ProcessStats | None),
    "network": TypeAdapter(list[NetworkInterface] | None),
    "pressure": TypeAdapter(PressureStats | None),
}
