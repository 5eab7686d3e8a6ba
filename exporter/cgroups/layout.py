"""Which cgroup hierarchies exist under a root: pure v2, v1, or hybrid (v1 + unified)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

# Controllers whose files we read; a v1 hierarchy is recognised by the files it holds, so a
# fixture tree or an unusual mount name ("cpu,cpuacct") works the same as /sys/fs/cgroup.
V1_CONTROLLERS: dict[str, str] = {
    "cpu": "cpu.shares",
    "cpuacct": "cpuacct.usage",
    "cpuset": "cpuset.cpus",
    "memory": "memory.usage_in_bytes",
    "blkio": "blkio.weight",
    "pids": "pids.max",
}
_BLKIO_MARKERS = ("blkio.weight", "blkio.throttle.io_service_bytes", "blkio.bfq.weight", "blkio.reset_stats")


class NoCgroupsError(RuntimeError):
    pass


@dataclass(frozen=True)
class CgroupLayout:
    root: Path
    mode: str  # "v1", "v2" or "hybrid"
    v1: dict[str, Path] = field(default_factory=dict)
    unified: Path | None = None

    def discovery_roots(self) -> list[Path]:
        """Hierarchies whose directory trees define the set of containers."""
        return list(self._discovery_roots)

    @cached_property
    def _discovery_roots(self) -> tuple[Path, ...]:
        # Asked on every container's creation and removal; realpath costs an lstat per part.
        if self.mode == "v2":
            assert self.unified is not None
            return (self.unified,)
        seen: dict[str, Path] = {}
        for path in self.v1.values():
            seen.setdefault(os.path.realpath(path), path)
        return tuple(seen.values())

    def v1_path(self, controller: str, name: str) -> Path | None:
        base = self.v1.get(controller)
        return None if base is None else join(base, name)

    def unified_path(self, name: str) -> Path | None:
        return None if self.unified is None else join(self.unified, name)


def join(base: Path, name: str) -> Path:
    rel = name.strip("/")
    return base / rel if rel else base


def _v1_controllers(path: Path) -> set[str]:
    # The mount's directory name usually lists its controllers ("cpu,cpuacct"); the files tell
    # for any other name. Some roots hold no files of their controller (pids has none at the root).
    found = {c for c in path.name.split(",") if c in V1_CONTROLLERS}
    for controller, marker in V1_CONTROLLERS.items():
        if controller == "blkio":
            if any((path / m).exists() for m in _BLKIO_MARKERS):
                found.add("blkio")
        elif (path / marker).exists():
            found.add(controller)
    return found


def detect_layout(root: str | Path) -> CgroupLayout:
    root = Path(root)
    if (root / "cgroup.controllers").exists():
        return CgroupLayout(root=root, mode="v2", unified=root)
    if not root.is_dir():
        raise NoCgroupsError(f"cgroup root {root} is not a directory")
    v1: dict[str, Path] = {}
    unified: Path | None = None
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir():
            continue
        path = Path(entry.path)
        if (path / "cgroup.controllers").exists():
            unified = path
            continue
        if not (path / "cgroup.procs").exists():
            continue
        for controller in _v1_controllers(path):
            # Prefer the plain name ("cpu") over a co-mount's symlink target ("cpu,cpuacct").
            if controller not in v1 or entry.name == controller:
                v1[controller] = path
    if not v1:
        if unified is not None:
            return CgroupLayout(root=root, mode="v2", unified=unified)
        raise NoCgroupsError(f"no cgroup hierarchy found under {root}")
    return CgroupLayout(root=root, mode="hybrid" if unified else "v1", v1=v1, unified=unified)
