"""Container discovery from the cgroup filesystem: a full rescan and a recursive inotify watcher.

A container name is a cgroup path relative to its hierarchy root ("/", "/docker/<id>"). In v1 the
same name exists in several hierarchies; the watcher reports it once when it first appears in any
of them and as removed once it is gone from all of them.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import select
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from inotify_simple import INotify, flags

log = logging.getLogger(__name__)

_MASK = flags.CREATE | flags.DELETE | flags.MOVED_FROM | flags.MOVED_TO | flags.ONLYDIR | flags.DONT_FOLLOW
_APPEARED = flags.CREATE | flags.MOVED_TO
_VANISHED = flags.DELETE | flags.MOVED_FROM
# ENODEV: a kernfs directory removed while we hold it open.
_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENODEV})


def scan(roots: Sequence[str | os.PathLike[str]]) -> set[str]:
    """Names of all cgroup directories under any of ``roots`` ("/" for a root that exists)."""
    names: set[str] = set()
    for root in roots:
        stack = [("/", os.fspath(root))]
        while stack:
            name, path = stack.pop()
            try:
                with os.scandir(path) as entries:
                    subdirs = [e for e in entries if e.is_dir(follow_symlinks=False)]
            except OSError as exc:
                if exc.errno in _GONE:
                    continue
                raise
            names.add(name)
            prefix = "/" if name == "/" else name + "/"
            for entry in subdirs:
                try:
                    nlink = entry.stat(follow_symlinks=False).st_nlink
                except OSError as exc:
                    if exc.errno in _GONE:
                        continue
                    raise
                # kernfs (like ext4 and tmpfs) counts subdirectories in a directory's link count
                # (2 + subdirs), so a leaf cgroup needs no listing: one stat instead of a readdir
                # of its 20-50 control files. Filesystems that do not count report 1.
                if nlink == 2:
                    names.add(prefix + entry.name)
                else:
                    stack.append((prefix + entry.name, entry.path))
    return names


class CgroupWatcher:
    """Reports cgroups created and removed under ``roots``, on its own thread.

    Names present at ``start()`` are known but not reported: the caller takes them from ``scan()``
    and hands every periodic rescan to ``sync()``. When inotify runs out (watch or instance limit,
    queue overflow) the watcher logs one WARNING, sets ``degraded`` and keeps what it has; after an
    overflow ``needs_rescan`` is set and ``on_overflow`` called so the caller can rescan early.
    """

    def __init__(
        self,
        roots: Sequence[str | os.PathLike[str]],
        on_added: Callable[[str], object],
        on_removed: Callable[[str], object],
        *,
        on_overflow: Callable[[], object] | None = None,
        proc_root: str | os.PathLike[str] = "/proc",
    ) -> None:
        self._roots = [os.fspath(r).rstrip("/") or "/" for r in roots]
        self._on_added = on_added
        self._on_removed = on_removed
        self._on_overflow = on_overflow
        self._proc_root = Path(proc_root)
        self._lock = threading.Lock()
        self._known: set[str] = set()
        self._wds: dict[int, tuple[int, str]] = {}  # watch descriptor -> (root index, name)
        self._watched: dict[str, int] = {}  # directory path -> watch descriptor
        self._inotify: INotify | None = None
        self._wake: int | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._degraded = False
        self._needs_rescan = False
        self._rewatch_pending = False
        self._warned: set[str] = set()

    @property
    def degraded(self) -> bool:
        """True while some directories may be unwatched or events were lost; the rescan covers them."""
        return self._degraded

    @property
    def needs_rescan(self) -> bool:
        """True after an event queue overflow until the next ``sync()``."""
        return self._needs_rescan

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def watches(self) -> int:
        """Number of inotify watches held."""
        with self._lock:
            return len(self._wds)

    def known(self) -> set[str]:
        with self._lock:
            return set(self._known)

    def start(self) -> None:
        if self._thread is not None or self._stopping.is_set():
            raise RuntimeError("CgroupWatcher.start() called twice")
        self._roots = _distinct(self._roots)
        try:
            self._inotify = INotify()
            self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except OSError as exc:
            self._close()
            self._degrade(
                "instances",
                "cannot create an inotify instance (%s; %s = %s, open files soft limit = %d); "
                "container discovery falls back to the periodic rescan",
                exc.strerror,
                self._limit_path("max_user_instances"),
                self._limit("max_user_instances"),
                resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            )
            return
        with self._lock:
            for i in range(len(self._roots)):
                self._watch_tree(i, "/", [], report=False)
        self._thread = threading.Thread(target=self._run, name="cgroup-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 1.0) -> None:
        self._stopping.set()
        thread = self._thread
        if thread is not None:
            if self._wake is not None:
                os.eventfd_write(self._wake, 1)
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("cgroup watcher thread did not stop within %.1f s", timeout_s)
                return
        self._close()

    def sync(self, names: Iterable[str]) -> None:
        """Take a rescan's result as the truth (re-checked for what changed since), clear ``needs_rescan``."""
        present = set(names)
        with self._lock:
            for name in present - self._known:
                if self._exists(name):
                    self._known.add(name)
            for name in self._known - present:
                if not self._exists(name):
                    self._known.discard(name)
            self._needs_rescan = False
            wake = self._degraded and self._thread is not None and self._wake is not None
            self._rewatch_pending = self._rewatch_pending or wake
        if wake:
            assert self._wake is not None
            os.eventfd_write(self._wake, 1)

    def _run(self) -> None:
        assert self._inotify is not None and self._wake is not None
        poller = select.poll()
        poller.register(self._inotify.fileno(), select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        while not self._stopping.is_set():
            poller.poll()
            if self._stopping.is_set():
                break
            try:
                os.eventfd_read(self._wake)
            except BlockingIOError:
                pass
            try:
                events = self._inotify.read(timeout=0)
            except OSError:
                log.exception("cannot read inotify events; container discovery falls back to the periodic rescan")
                self._degraded = True
                break
            notes: list[tuple[str, str]] = []
            with self._lock:
                for event in events:
                    try:
                        self._handle(event.wd, event.mask, event.name, notes)
                    except Exception:  # one bad event must not end discovery
                        log.exception("cannot handle inotify event %r", event)
                if self._rewatch_pending:
                    self._rewatch_pending = False
                    self._rewatch(notes)
            self._deliver(notes)

    def _handle(self, wd: int, mask: int, child: str, notes: list[tuple[str, str]]) -> None:
        if mask & flags.Q_OVERFLOW:
            self._needs_rescan = True
            self._degrade(
                "overflow",
                "inotify event queue overflowed (%s = %s); container discovery relies on the next rescan",
                self._limit_path("max_queued_events"),
                self._limit("max_queued_events"),
            )
            notes.append(("overflow", ""))
            return
        if mask & flags.IGNORED:
            self._forget(wd)
            return
        where = self._wds.get(wd)
        if where is None or not mask & flags.ISDIR:
            return
        i, parent = where
        name = _child(parent, child)
        if mask & _APPEARED:
            self._watch_tree(i, name, notes)
        elif mask & _VANISHED:
            moved = bool(mask & flags.MOVED_FROM)
            self._unwatch(_path(self._roots[i], name), subtree=moved)
            self._drop_if_gone(name, notes, subtree=moved or self._degraded)

    def _watch_tree(self, i: int, top: str, notes: list[tuple[str, str]], report: bool = True) -> bool:
        """Watch ``top`` and everything below it, reporting names not known yet; False if out of watches.

        Each directory is watched before it is listed, so a child created in between is either
        listed or announced by an event.
        """
        root = self._roots[i]
        watching = self._inotify is not None
        complete = True
        stack = [top]
        while stack:
            name = stack.pop()
            path = _path(root, name)
            fresh = True
            if watching:
                assert self._inotify is not None
                try:
                    wd = self._inotify.add_watch(path, _MASK)
                except OSError as exc:
                    if exc.errno in _GONE:
                        continue
                    complete = watching = False
                    self._watch_failed(path, exc)
                else:
                    # add_watch on an inode already watched returns its existing descriptor.
                    fresh = wd not in self._wds
                    self._wds[wd] = (i, name)
                    self._watched[path] = wd
            if name not in self._known:
                self._known.add(name)
                if report:
                    notes.append(("added", name))
            if not fresh:
                continue
            prefix = "/" if name == "/" else name + "/"
            try:
                with os.scandir(path) as entries:
                    stack.extend(prefix + e.name for e in entries if e.is_dir(follow_symlinks=False))
            except OSError as exc:
                if exc.errno not in _GONE:
                    raise
        return complete

    def _watch_failed(self, path: str, exc: OSError) -> None:
        if exc.errno == errno.ENOSPC:
            self._degrade(
                "watches",
                "inotify watch limit reached (%s = %s) while watching %s; container discovery falls "
                "back to the periodic rescan for directories not watched",
                self._limit_path("max_user_watches"),
                self._limit("max_user_watches"),
                path,
            )
        else:
            self._degrade(
                "watch-error",
                "cannot watch %s (%s); container discovery falls back to the periodic rescan there",
                path,
                exc.strerror,
            )

    def _unwatch(self, path: str, subtree: bool) -> None:
        # A removed cgroup directory keeps its watch (and its pinned inode) until inotify_rm_watch:
        # kernfs does not send IN_IGNORED on rmdir as ext4 or tmpfs do (seen on 6.18).
        doomed = [path]
        if subtree:
            doomed += [p for p in self._watched if p.startswith(path + "/")]
        assert self._inotify is not None
        for p in doomed:
            wd = self._watched.pop(p, None)
            if wd is None:
                continue
            self._wds.pop(wd, None)
            try:
                self._inotify.rm_watch(wd)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # already removed by the kernel
                    raise

    def _forget(self, wd: int) -> None:
        where = self._wds.pop(wd, None)
        if where is None:
            return
        path = _path(self._roots[where[0]], where[1])
        if self._watched.get(path) == wd:
            del self._watched[path]

    def _drop_if_gone(self, name: str, notes: list[tuple[str, str]], subtree: bool) -> None:
        doomed = [name]
        if subtree:
            doomed = sorted((k for k in self._known if k.startswith(name + "/")), reverse=True) + doomed
        for n in doomed:
            if n in self._known and not self._exists(n):
                self._known.discard(n)
                notes.append(("removed", n))

    def _rewatch(self, notes: list[tuple[str, str]]) -> None:
        """Watch known directories that are not watched (after a watch failure or lost events)."""
        for name in sorted(self._known):
            for i, root in enumerate(self._roots):
                if _path(root, name) not in self._watched and not self._watch_tree(i, name, notes):
                    return
        self._degraded = False
        self._warned.clear()
        log.info("inotify watches restored; container discovery is event-driven again")

    def _deliver(self, notes: list[tuple[str, str]]) -> None:
        for kind, name in notes:
            try:
                if kind == "added":
                    self._on_added(name)
                elif kind == "removed":
                    self._on_removed(name)
                elif self._on_overflow is not None:
                    self._on_overflow()
            except Exception:  # the caller's bug must not end discovery
                log.exception("cgroup watcher callback failed (%s %s)", kind, name)

    def _degrade(self, kind: str, msg: str, *args: object) -> None:
        self._degraded = True
        if kind in self._warned:
            log.debug(msg, *args)
        else:
            self._warned.add(kind)
            log.warning(msg, *args)

    def _exists(self, name: str) -> bool:
        return any(os.path.isdir(_path(root, name)) for root in self._roots)

    def _limit_path(self, limit: str) -> Path:
        return self._proc_root / "sys/fs/inotify" / limit

    def _limit(self, limit: str) -> str:
        try:
            return self._limit_path(limit).read_text().strip()
        except OSError:
            return "unknown"

    def _close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        if self._wake is not None:
            os.close(self._wake)
            self._wake = None
        with self._lock:
            self._wds.clear()
            self._watched.clear()


def _path(root: str, name: str) -> str:
    return root if name == "/" else root + name


def _child(parent: str, child: str) -> str:
    return "/" + child if parent == "/" else parent + "/" + child


def _distinct(roots: list[str]) -> list[str]:
    """Roots without repeats; a co-mounted v1 hierarchy reachable twice would share watches."""
    seen: set[object] = set()
    out = []
    for root in roots:
        try:
            st = os.stat(root)
            key: object = (st.st_dev, st.st_ino)
        except OSError:
            key = root
        if key not in seen:
            seen.add(key)
            out.append(root)
    return out
