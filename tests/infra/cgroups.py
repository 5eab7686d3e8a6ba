"""Scratch cgroups for tests: made in every resource hierarchy, removed with everything in them.

A scratch cgroup is named ``/cetest-<owner pid>-<hex8>``. The owner pid (the pytest process that
made it) lets the session sweep remove its own leftovers and those of dead sessions while leaving
alone the cgroups of another test session running at the same time on this machine.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.infra.procs import alive

CGROUP_ROOT = Path("/sys/fs/cgroup")
NAME_PREFIX = "cetest-"
UNIFIED = "unified"
V1_RESOURCE_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "blkio", "pids")
# cgroup2 names of the same controllers ("io" took over from blkio).
V2_CONTROLLERS = ("cpu", "cpuset", "memory", "io", "pids")

_OWNED_NAME_RE = re.compile(r"^cetest-(?P<owner>\d+)-[0-9a-f]{8}$")
# Other helpers also make cetest-* cgroups under names of their own, with no owner in them
# (tests/test_watcher.py: "cetest-watch-<hex>"). Such a cgroup is only taken for a leftover once
# it is older than any one test may run (pytest timeout: 300 s); a cgroup dir's mtime is its
# creation time, bumped when a child is made or removed.
OWNERLESS_STALE_AFTER_S = 900.0


class CgroupSetupError(RuntimeError):
    pass


@dataclass(frozen=True)
class Hierarchies:
    """Where each controller is mounted. ``v1`` maps a controller name to its hierarchy root."""

    root: Path
    v1: dict[str, Path]
    unified: Path | None
    pure_v2: bool

    def roots(self) -> list[Path]:
        """Distinct hierarchy roots, co-mounted controllers ("cpu,cpuacct") counted once."""
        seen: dict[str, Path] = {}
        for path in self.v1.values():
            seen.setdefault(os.path.realpath(path), path)
        if self.unified is not None:
            seen.setdefault(os.path.realpath(self.unified), self.unified)
        return list(seen.values())


def detect_hierarchies(root: Path = CGROUP_ROOT) -> Hierarchies:
    if (root / "cgroup.controllers").exists():
        return Hierarchies(root=root, v1={}, unified=root, pure_v2=True)
    v1: dict[str, Path] = {}
    for controller in V1_RESOURCE_CONTROLLERS:
        if (root / controller / "cgroup.procs").exists():
            v1[controller] = root / controller
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            # Co-mounted controllers without the usual per-controller symlinks.
            for controller in entry.name.split(","):
                if controller in V1_RESOURCE_CONTROLLERS and (entry / "cgroup.procs").exists():
                    v1.setdefault(controller, entry)
    unified = root / UNIFIED
    return Hierarchies(
        root=root,
        v1=v1,
        unified=unified if (unified / "cgroup.controllers").exists() else None,
        pure_v2=False,
    )


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise PermissionError(f"{what} needs root (CI runs the suite as root; so must you)")


def new_name(owner_pid: int | None = None) -> str:
    owner = os.getpid() if owner_pid is None else owner_pid
    return f"/{NAME_PREFIX}{owner}-{uuid.uuid4().hex[:8]}"


def _write(path: Path, value: str) -> None:
    # One write() per value: the cgroup file API takes a value per write call.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read_pids(procs_file: Path) -> set[int]:
    try:
        return {int(line) for line in procs_file.read_text().split()}
    except FileNotFoundError:
        return set()


def _subtree_deepest_first(top: Path) -> list[Path]:
    if not top.is_dir():
        return []
    dirs = [Path(d) for d, _, _ in os.walk(top)]
    return sorted(dirs, key=lambda p: len(p.parts), reverse=True)


def remove_cgroup_dirs(tops: Sequence[Path], *, timeout_s: float = 10.0) -> None:
    """Kill every process in the subtrees under ``tops`` and rmdir them, deepest first."""
    deadline = time.monotonic() + timeout_s
    me = os.getpid()
    while True:
        pids: set[int] = set()
        for top in tops:
            for d in _subtree_deepest_first(top):
                pids |= _read_pids(d / "cgroup.procs")
        if me in pids:
            raise CgroupSetupError(f"refusing to SIGKILL the test runner itself (pid {me}) found in {tops}")
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise CgroupSetupError(f"processes {sorted(pids)} still in {[str(t) for t in tops]} after SIGKILL")
        time.sleep(0.02)
    for top in tops:
        for d in _subtree_deepest_first(top):
            rmdir_when_free(d, timeout_s=max(deadline - time.monotonic(), 0.0))


def rmdir_when_free(path: Path, *, timeout_s: float = 10.0) -> None:
    """rmdir a cgroup whose tasks are gone or going; a missing directory is fine."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            # A killed task leaves the css_set asynchronously; rmdir says EBUSY until then.
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class ScratchCgroup:
    """A cgroup of the same name in every resource hierarchy of this machine.

    Not named Test*: pytest would try to collect it from any test module that imports it.
    """

    def __init__(self, hierarchies: Hierarchies, name: str) -> None:
        if not name.startswith("/"):
            raise ValueError(f"cgroup name must be absolute, got {name!r}")
        self.hierarchies = hierarchies
        self.name = name
        self._procs: list[subprocess.Popen[Any]] = []
        self._removed = False
        rel = name.strip("/")
        self._dirs: list[Path] = [root / rel for root in hierarchies.roots()]

    # --- creation -------------------------------------------------------------------------------

    def _create(self) -> None:
        h = self.hierarchies
        made: list[Path] = []
        try:
            if h.pure_v2:
                assert h.unified is not None
                _enable_v2_controllers(self.path(UNIFIED).parent)
            for d in self._dirs:
                d.mkdir()
                made.append(d)
            cpuset = h.v1.get("cpuset")
            if cpuset is not None:
                # A v1 cpuset starts with empty cpus/mems and refuses tasks until both are set.
                d = self.path("cpuset")
                for f in ("cpuset.cpus", "cpuset.mems"):
                    _write(d / f, (d.parent / f).read_text().strip())
        except BaseException:
            remove_cgroup_dirs(made)
            raise

    def create_child(self, leaf: str) -> ScratchCgroup:
        """A nested cgroup ``<name>/<leaf>``, removed together with this one.

        On cgroup2, make children before putting processes in this cgroup: the "no internal
        processes" rule forbids enabling controllers for children of a populated cgroup.
        """
        child = ScratchCgroup(self.hierarchies, f"{self.name}/{leaf.strip('/')}")
        child._create()
        return child

    # --- paths and files ------------------------------------------------------------------------

    def path(self, controller: str) -> Path:
        """This cgroup's directory in ``controller``'s hierarchy ("unified" for the cgroup2 tree)."""
        h = self.hierarchies
        rel = self.name.strip("/")
        if h.pure_v2:
            if controller == UNIFIED or controller in V2_CONTROLLERS or controller in V1_RESOURCE_CONTROLLERS:
                assert h.unified is not None
                return h.unified / rel
        elif controller == UNIFIED:
            if h.unified is not None:
                return h.unified / rel
        elif controller in h.v1:
            return h.v1[controller] / rel
        have = [UNIFIED] if h.unified is not None else []
        raise KeyError(f"no {controller!r} hierarchy on this host (have: {sorted(h.v1) + have})")

    @property
    def dirs(self) -> list[Path]:
        """One directory per distinct hierarchy."""
        return list(self._dirs)

    def read(self, controller: str, filename: str) -> str:
        return (self.path(controller) / filename).read_text()

    def write(self, controller: str, filename: str, value: str) -> None:
        _write(self.path(controller) / filename, value)

    # --- processes ------------------------------------------------------------------------------

    def add_pid(self, pid: int) -> None:
        for d in self._dirs:
            _write(d / "cgroup.procs", str(pid))

    def pids(self) -> set[int]:
        """Processes directly in this cgroup, in any hierarchy."""
        found: set[int] = set()
        for d in self._dirs:
            found |= _read_pids(d / "cgroup.procs")
        return found

    def spawn(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` already inside this cgroup: it joins between fork and exec."""
        procs_files = [str(d / "cgroup.procs") for d in self._dirs]

        def join_cgroup() -> None:
            pid = str(os.getpid()).encode()
            for f in procs_files:
                fd = os.open(f, os.O_WRONLY)
                try:
                    os.write(fd, pid)
                finally:
                    os.close(fd)

        try:
            proc = subprocess.Popen(list(argv), preexec_fn=join_cgroup, **popen_kwargs)
        except subprocess.SubprocessError as exc:
            raise CgroupSetupError(f"could not start {argv[0]!r} inside {self.name} (writing {procs_files})") from exc
        self._procs.append(proc)
        return proc

    # --- limits ---------------------------------------------------------------------------------

    def set_memory_limit(self, limit_bytes: int) -> None:
        if self.hierarchies.pure_v2:
            self.write("memory", "memory.max", str(limit_bytes))
        else:
            self.write("memory", "memory.limit_in_bytes", str(limit_bytes))

    def set_cpu_quota(self, quota_us: int, period_us: int = 100_000) -> None:
        """CFS bandwidth: ``quota_us`` of CPU time per ``period_us``; a negative quota lifts it."""
        if self.hierarchies.pure_v2:
            quota = "max" if quota_us < 0 else str(quota_us)
            self.write("cpu", "cpu.max", f"{quota} {period_us}")
        else:
            self.write("cpu", "cpu.cfs_period_us", str(period_us))
            self.write("cpu", "cpu.cfs_quota_us", str(-1 if quota_us < 0 else quota_us))

    # --- teardown -------------------------------------------------------------------------------

    def remove(self, *, timeout_s: float = 10.0) -> None:
        """SIGKILL everything inside (children included), reap what we spawned, rmdir everywhere."""
        if self._removed:
            return
        remove_cgroup_dirs(self._dirs, timeout_s=timeout_s)
        for proc in self._procs:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self._removed = True

    def exists(self) -> bool:
        return any(d.exists() for d in self._dirs)

    def __enter__(self) -> ScratchCgroup:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"ScratchCgroup({self.name!r})"


def _enable_v2_controllers(parent: Path) -> None:
    available = set((parent / "cgroup.controllers").read_text().split())
    enabled = set((parent / "cgroup.subtree_control").read_text().split())
    for controller in V2_CONTROLLERS:
        if controller in available and controller not in enabled:
            _write(parent / "cgroup.subtree_control", f"+{controller}")


def create_cgroup(name: str | None = None, *, root: Path = CGROUP_ROOT) -> ScratchCgroup:
    """Make a scratch cgroup (default name ``/cetest-<pid>-<hex8>``) in every resource hierarchy."""
    require_root("creating a test cgroup")
    hierarchies = detect_hierarchies(root)
    if not hierarchies.roots():
        raise CgroupSetupError(f"no cgroup hierarchies found under {root}")
    cgroup = ScratchCgroup(hierarchies, name or new_name())
    cgroup._create()
    return cgroup


def leftover_cgroups(
    root: Path = CGROUP_ROOT, *, owner_pid: int | None = None, stale_after_s: float = OWNERLESS_STALE_AFTER_S
) -> Iterator[Path]:
    """Top-level ``cetest-*`` dirs owned by ``owner_pid`` (default: this process) or a dead owner,
    and ownerless ``cetest-*`` dirs untouched for ``stale_after_s``."""
    me = os.getpid() if owner_pid is None else owner_pid
    now = time.time()
    for hroot in detect_hierarchies(root).roots():
        for entry in sorted(hroot.iterdir()):
            if not entry.name.startswith(NAME_PREFIX) or not entry.is_dir():
                continue
            m = _OWNED_NAME_RE.match(entry.name)
            if m is None:
                try:
                    stale = now - entry.stat().st_mtime > stale_after_s
                except FileNotFoundError:
                    continue
                if stale:
                    yield entry
            elif int(m.group("owner")) == me or not alive(int(m.group("owner"))):
                yield entry


def sweep_leftover_cgroups(
    root: Path = CGROUP_ROOT, *, owner_pid: int | None = None, stale_after_s: float = OWNERLESS_STALE_AFTER_S
) -> list[Path]:
    """Remove what ``leftover_cgroups`` finds; returns the directories removed."""
    found = list(leftover_cgroups(root, owner_pid=owner_pid, stale_after_s=stale_after_s))
    if found:
        remove_cgroup_dirs(found)
    return found


def proc_cgroups(pid: int, proc_root: Path = Path("/proc")) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as controller → path; the cgroup2 line is keyed "unified"."""
    result: dict[str, str] = {}
    for line in (proc_root / str(pid) / "cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            result[UNIFIED] = path
        for controller in controllers.split(","):
            if controller:
                result[controller] = path
    return result
