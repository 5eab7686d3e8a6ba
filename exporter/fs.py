"""Filesystems: the mount table, the machine's disks (statvfs), and containers' writable layers (du)."""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from exporter.models import FilesystemInfo, FilesystemStats

log = logging.getLogger(__name__)

# Filesystems without a disk of their own (or read-only images) are never machine filesystems,
# whatever their source says (a tmpfs may be named "/dev/shm").
PSEUDO_FSTYPES = frozenset({
    "autofs", "binfmt_misc", "bpf", "cgroup", "cgroup2", "configfs", "debugfs", "devpts", "devtmpfs",
    "efivarfs", "fuse.lxcfs", "fusectl", "hugetlbfs", "iso9660", "mqueue", "nsfs", "overlay", "proc",
    "pstore", "ramfs", "rpc_pipefs", "securityfs", "selinuxfs", "squashfs", "sysfs", "tmpfs", "tracefs",
})
# Disk filesystems whose source need not be a /dev path (a zfs dataset is "pool/name").
DISK_FSTYPES = frozenset({"btrfs", "xfs", "zfs"})

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of /proc/<pid>/mountinfo."""

    device: str
    mountpoint: str
    fstype: str
    major: int
    minor: int
    options: tuple[str, ...] = ()
    super_options: tuple[str, ...] = ()
    root: str = "/"


def _unescape(field_text: str) -> str:
    # The kernel's mangle() writes space, tab, newline and backslash as \040 \011 \012 \134.
    if "\\" not in field_text:
        return field_text
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field_text)


def _options(text: str) -> tuple[str, ...]:
    return tuple(_unescape(o) for o in text.split(",")) if text else ()


def parse_mountinfo(text: str) -> list[Mount]:
    """Mounts of a mountinfo file; malformed lines are skipped.

    Line format (proc(5)): ``id parent major:minor root mountpoint options [optional...] - fstype
    source super_options``.
    """
    mounts = []
    for line in text.splitlines():
        # Fields are separated by exactly one space; an empty source shows as an empty field.
        parts = line.split(" ")
        try:
            sep = parts.index("-", 6)
            major, _, minor = parts[2].partition(":")
            mounts.append(
                Mount(
                    device=_unescape(parts[sep + 2]),
                    mountpoint=_unescape(parts[4]),
                    fstype=parts[sep + 1],
                    major=int(major),
                    minor=int(minor),
                    options=_options(parts[5]),
                    super_options=_options(parts[sep + 3]) if len(parts) > sep + 3 else (),
                    root=_unescape(parts[3]),
                )
            )
        except (ValueError, IndexError):
            if line.strip():
                log.debug("skipping malformed mountinfo line %r", line[:120])
    return mounts


def read_mounts(proc_root: Path, pid: str = "self") -> list[Mount] | None:
    """Mount table of a process (``1`` for the host's when proc_root is the host's /proc), or None."""
    try:
        with open(proc_root / pid / "mountinfo", "rb") as f:
            return parse_mountinfo(os.fsdecode(f.read()))
    except OSError:
        return None


def is_machine_filesystem(mount: Mount) -> bool:
    # "fuse.<subtype>" is sshfs, lxcfs, gvfs and the like (source often "/dev/fuse"); a FUSE
    # filesystem on a disk (ntfs-3g) mounts as "fuseblk" and stays.
    if mount.fstype in PSEUDO_FSTYPES or mount.fstype == "fuse" or mount.fstype.startswith("fuse."):
        return False
    return mount.device.startswith("/dev/") or mount.fstype in DISK_FSTYPES or mount.fstype.startswith("ext")


def machine_filesystems(mounts: Iterable[Mount]) -> list[Mount]:
    """Disk-backed filesystems, one per device (the mount with the shortest mountpoint), in table order.

    Bind mounts and btrfs subvolumes share their device's source, so they collapse into one entry.
    """
    best: dict[str, Mount] = {}
    for mount in mounts:
        if not is_machine_filesystem(mount):
            continue
        kept = best.get(mount.device)
        if kept is None or len(mount.mountpoint) < len(kept.mountpoint):
            best[mount.device] = mount
    return list(best.values())


def host_path(rootfs: Path, mountpoint: str) -> Path:
    """Where a host mountpoint is visible to us when the host's / is mounted at rootfs."""
    return rootfs / mountpoint.lstrip("/")


def _statvfs(mount: Mount, rootfs: Path, failures: dict[str, int] | None) -> os.statvfs_result | None:
    try:
        return os.statvfs(host_path(rootfs, mount.mountpoint))
    except OSError as exc:
        count = 1
        if failures is not None:
            count = failures.get(mount.mountpoint, 0) + 1
            failures[mount.mountpoint] = count
        if count == 1:
            log.warning("cannot statvfs %s (%s) under %s: %s", mount.mountpoint, mount.device, rootfs, exc)
        return None


def filesystem_stats(
    mounts: Iterable[Mount],
    rootfs: Path = Path("/"),
    now: datetime | None = None,
    failures: dict[str, int] | None = None,
) -> list[FilesystemStats]:
    """Capacity and usage of each mount, as ``df`` computes them; unreadable mounts are skipped.

    Pass the same ``failures`` dict on every call: a mount's first failure is logged at WARNING and
    repeats are only counted there (without it every failure is logged).
    """
    measured_at = now or datetime.now(UTC)
    out = []
    for mount in mounts:
        st = _statvfs(mount, rootfs, failures)
        if st is None:
            continue
        frsize = st.f_frsize or st.f_bsize
        # btrfs (and some network filesystems) report f_files = 0: no fixed inode table.
        has_inodes = st.f_files > 0
        out.append(
            FilesystemStats(
                device=mount.device,
                mountpoint=mount.mountpoint,
                type=mount.fstype,
                capacity_bytes=st.f_blocks * frsize,
                usage_bytes=(st.f_blocks - st.f_bfree) * frsize,
                available_bytes=st.f_bavail * frsize,
                inodes=st.f_files if has_inodes else None,
                inodes_free=st.f_ffree if has_inodes else None,
                inodes_used=st.f_files - st.f_ffree if has_inodes else None,
                measured_at=measured_at,
            )
        )
    return out


def filesystem_info(
    mounts: Iterable[Mount], rootfs: Path = Path("/"), failures: dict[str, int] | None = None
) -> list[FilesystemInfo]:
    """Static description of each mount for MachineInfo; unreadable mounts are skipped."""
    out = []
    for mount in mounts:
        st = _statvfs(mount, rootfs, failures)
        if st is None:
            continue
        out.append(
            FilesystemInfo(
                device=mount.device,
                mountpoint=mount.mountpoint,
                type=mount.fstype,
                capacity_bytes=st.f_blocks * (st.f_frsize or st.f_bsize),
                inodes=st.f_files or None,
            )
        )
    return out


class _DirEntries(Iterator[os.DirEntry[str]], Protocol):
    def close(self) -> None: ...


@dataclass(eq=False)
class _Walk:
    """State of one container's writable layer: the last complete result and the walk in progress."""

    name: str
    upper_dir: Path
    device: str
    interval_s: float
    due_at: float
    last: FilesystemStats | None = None
    # The walk in progress; started_at is None when idle.
    started_at: float | None = None
    cancelled: bool = False
    dev: int = 0
    usage_bytes: int = 0
    inodes: int = 0
    seen_inodes: set[int] = field(default_factory=set)
    pending_dirs: list[str] = field(default_factory=list)
    entries: _DirEntries | None = None

    def reset(self) -> None:
        """Drop the walk in progress (its open directory included)."""
        if self.entries is not None:
            self.entries.close()
        self.entries = None
        self.started_at = None
        self.seen_inodes = set()
        self.pending_dirs = []

    def begin(self, now: float) -> bool:
        """Start a walk; False when the upper dir is gone."""
        try:
            st = os.lstat(self.upper_dir)
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            return False
        self.started_at = now
        self.dev = st.st_dev
        self.usage_bytes = st.st_blocks * 512
        self.inodes = 1
        self.seen_inodes = set()
        self.pending_dirs = [str(self.upper_dir)]
        self.entries = None
        return True

    def advance(self, budget: int) -> tuple[int, bool]:
        """Visit up to ``budget`` entries; returns (entries visited, walk finished)."""
        used = 0
        while used < budget:
            if self.entries is None:
                if not self.pending_dirs:
                    return used, True
                path = self.pending_dirs.pop()
                try:
                    self.entries = os.scandir(path)
                except OSError as exc:
                    # Removed (or made unreadable) since we saw it: du reports and goes on.
                    log.debug("writable layer %s: cannot list %s: %s", self.name, path, exc)
                    continue
            try:
                entry = next(self.entries)
            except (StopIteration, OSError):
                self.entries.close()
                self.entries = None
                continue
            used += 1
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_dev != self.dev:
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if not is_dir and st.st_nlink > 1:
                if st.st_ino in self.seen_inodes:
                    continue
                self.seen_inodes.add(st.st_ino)
            self.usage_bytes += st.st_blocks * 512
            self.inodes += 1
            if is_dir:
                self.pending_dirs.append(entry.path)
        return used, False

    def root_still_there(self) -> bool:
        try:
            st = os.lstat(self.upper_dir)
        except OSError:
            return False
        return st.st_dev == self.dev and stat.S_ISDIR(st.st_mode)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class WritableLayerUsage:
    """Disk usage of containers' writable layers (overlay2 upper dirs), measured like ``du -s -B1 -x``.

    Walks are incremental (``step`` visits at most ``entries_per_step`` entries, resuming where it
    stopped) and rate-limited (a layer is walked again ``interval_s`` after its previous walk
    finished). A walk taking longer than ``slow_walk_s`` doubles that layer's interval up to
    ``max_interval_s`` (default 20 x interval_s, cAdvisor's fsHandler cap for its doubling when du
    fails or times out); a fast walk halves it back toward ``interval_s``.
    """

    def __init__(
        self,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        entries_per_step: int = 2000,
        max_interval_s: float | None = None,
        slow_walk_s: float = 1.0,
        step_pause_s: float = 0.01,
        idle_pause_s: float = 0.5,
        wall_clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if entries_per_step < 1:
            raise ValueError("entries_per_step must be at least 1")
        self.interval_s = interval_s
        self.max_interval_s = 20 * interval_s if max_interval_s is None else max(max_interval_s, interval_s)
        self.entries_per_step = entries_per_step
        self.slow_walk_s = slow_walk_s
        self.step_pause_s = step_pause_s
        self.idle_pause_s = idle_pause_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._step_lock = threading.Lock()
        self._walks: dict[str, _Walk] = {}
        self._active: _Walk | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def track(self, name: str, upper_dir: Path, device: str = "overlay") -> None:
        """Start measuring a layer (due at once); re-tracking the same dir keeps its data."""
        with self._lock:
            old = self._walks.get(name)
            if old is not None and old.upper_dir == upper_dir and old.device == device:
                return
            if old is not None:
                self._drop(old)
            self._walks[name] = _Walk(name, upper_dir, device, self.interval_s, due_at=self._clock())

    def untrack(self, name: str) -> None:
        with self._lock:
            walk = self._walks.pop(name, None)
            if walk is not None:
                self._drop(walk)

    def _drop(self, walk: _Walk) -> None:
        # Called with the lock held. The walker thread owns the walk it is advancing; it closes it.
        walk.cancelled = True
        if walk is not self._active:
            walk.reset()

    def usage(self, name: str) -> FilesystemStats | None:
        """Result of the last complete walk, or None before the first one finished."""
        with self._lock:
            walk = self._walks.get(name)
            return None if walk is None else walk.last

    def interval_of(self, name: str) -> float | None:
        """Current (possibly backed-off) interval of a layer."""
        with self._lock:
            walk = self._walks.get(name)
            return None if walk is None else walk.interval_s

    def tracked(self) -> list[str]:
        with self._lock:
            return list(self._walks)

    def _next_walk(self, now: float) -> _Walk | None:
        # A walk in progress goes first, so at most one directory is held open between steps.
        due = None
        for walk in self._walks.values():
            if walk.started_at is not None:
                return walk
            if walk.due_at <= now and (due is None or walk.due_at < due.due_at):
                due = walk
        return due

    def step(self) -> bool:
        """Visit at most ``entries_per_step`` entries of due walks; False when nothing was due."""
        with self._step_lock:
            budget = self.entries_per_step
            worked = False
            while budget > 0:
                with self._lock:
                    walk = self._next_walk(self._clock())
                    if walk is None:
                        break
                    self._active = walk
                worked = True
                try:
                    if walk.started_at is None and not walk.begin(self._clock()):
                        budget -= 1
                        self._finish(walk, gone=True)
                        continue
                    used, done = walk.advance(budget)
                    budget -= used
                    if done:
                        self._finish(walk, gone=not walk.root_still_there())
                finally:
                    with self._lock:
                        self._active = None
                        if walk.cancelled:
                            walk.reset()
            return worked

    def _finish(self, walk: _Walk, gone: bool) -> None:
        now = self._clock()
        measured_at = self._wall_clock()
        with self._lock:
            if walk.cancelled:
                return
            started_at = walk.started_at if walk.started_at is not None else now
            if gone:
                # The container is being removed (or restarted): keep the last complete value.
                log.debug("writable layer %s: %s is gone", walk.name, walk.upper_dir)
            else:
                walk.last = FilesystemStats(
                    device=walk.device,
                    mountpoint=str(walk.upper_dir),
                    usage_bytes=walk.usage_bytes,
                    inodes_used=walk.inodes,
                    measured_at=measured_at,
                )
                duration_s = now - started_at
                if duration_s > self.slow_walk_s:
                    walk.interval_s = min(walk.interval_s * 2, self.max_interval_s)
                    log.info(
                        "writable layer %s: walk took %.1f s, interval now %.0f s",
                        walk.name, duration_s, walk.interval_s,
                    )
                else:
                    walk.interval_s = max(walk.interval_s / 2, self.interval_s)
            walk.reset()
            walk.due_at = now + walk.interval_s

    def start(self) -> None:
        """Run ``step`` in a daemon thread until ``stop``."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="writable-layer-usage", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and drop walks in progress (they restart from scratch)."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        thread.join()
        self._thread = None
        with self._step_lock, self._lock:
            for walk in self._walks.values():
                walk.reset()

    def _run(self) -> None:
        errors = 0
        while not self._stop.is_set():
            try:
                worked = self.step()
            except Exception:
                errors += 1
                if errors == 1:
                    log.exception("writable layer walker failed; further failures are counted")
                worked = False
            self._stop.wait(self.step_pause_s if worked else self.idle_pause_s)
