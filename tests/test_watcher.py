"""scan() and CgroupWatcher over plain directory trees and real cgroup hierarchies."""

from __future__ import annotations

import logging
import os
import resource
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from exporter.discovery.watcher import CgroupWatcher, scan
from tests.infra import cgroups as cg_infra

LOGGER = "exporter.discovery.watcher"
CGROUP = Path("/sys/fs/cgroup")
HIERARCHIES = ("cpu", "memory", "unified")
INOTIFY = Path("/proc/sys/fs/inotify")


def wait_for(cond: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def at(root: Path, name: str) -> Path:
    return root / name.lstrip("/")


def rmdir_retry(path: Path) -> None:
    cg_infra.rmdir_when_free(path, timeout_s=2.0)


def remove_cgroup_tree(top: Path) -> None:
    if not top.exists():
        return
    for dirpath, _, _ in os.walk(top, topdown=False):
        rmdir_retry(Path(dirpath))


@dataclass
class Recorder:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    overflows: int = 0

    def overflow(self) -> None:
        self.overflows += 1


@pytest.fixture
def make_watcher() -> Iterator[Callable[..., tuple[CgroupWatcher, Recorder]]]:
    watchers: list[CgroupWatcher] = []

    def make(roots: list[Path], on_added: Callable[[str], object] | None = None) -> tuple[CgroupWatcher, Recorder]:
        rec = Recorder()
        watcher = CgroupWatcher(roots, on_added or rec.added.append, rec.removed.append, on_overflow=rec.overflow)
        watchers.append(watcher)
        return watcher, rec

    yield make
    for watcher in watchers:
        watcher.stop()


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A plain directory on tmpfs when there is one: ext4 takes seconds for 16k mkdirs."""
    shm = Path("/dev/shm")
    if not os.access(shm, os.W_OK):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="cetest-watch-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def settle(rec: Recorder, root: Path, name: str) -> None:
    """Return once the watcher has handled every event queued so far: an inotify instance has one
    queue in event order, so a marker directory reported means all earlier events were handled."""
    marker = f"{name.rstrip('/')}/settle-{uuid.uuid4().hex[:8]}"
    at(root, marker).mkdir()
    try:
        assert wait_for(lambda: marker in rec.added), "watcher did not report the settle marker"
    finally:
        rmdir_retry(at(root, marker))


def kernel_watches() -> int:
    """inotify watches held by this process, as the kernel counts them."""
    count = 0
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            text = Path(f"/proc/self/fdinfo/{fd}").read_text()
        except OSError:
            continue
        count += text.count("inotify wd:")
    return count


def warnings_from_watcher(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# --- scan() over plain directories ---------------------------------------------------------------


def test_scan_lists_directories_only_without_following_symlinks(tmp_path: Path) -> None:
    (tmp_path / "a/b/c").mkdir(parents=True)
    (tmp_path / "a/d").mkdir()
    (tmp_path / "a/b/file").write_text("x")
    (tmp_path / "a/link").symlink_to(tmp_path / "a/b")
    other = tmp_path / "other"
    (other / "only-here").mkdir(parents=True)

    assert scan([tmp_path / "a"]) == {"/", "/b", "/b/c", "/d"}
    assert scan([tmp_path / "a", other]) == {"/", "/b", "/b/c", "/d", "/only-here"}
    assert scan([tmp_path / "missing", tmp_path / "a/b/file"]) == set()


def test_scan_skips_directories_vanishing_mid_walk(tmp_path: Path) -> None:
    (tmp_path / "stable/x").mkdir(parents=True)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            (tmp_path / "churn/a/b/c").mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp_path / "churn", ignore_errors=True)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        results = [scan([tmp_path]) for _ in range(300)]
    finally:
        stop.set()
        thread.join()
    possible = {"/", "/stable", "/stable/x", "/churn", "/churn/a", "/churn/a/b", "/churn/a/b/c"}
    for names in results:
        assert {"/", "/stable", "/stable/x"} <= names <= possible


# --- CgroupWatcher over plain directories --------------------------------------------------------


def test_watcher_reports_trees_renames_and_removals(tmp_path: Path, make_watcher) -> None:
    (tmp_path / "old/child").mkdir(parents=True)
    watcher, rec = make_watcher([tmp_path])
    watcher.start()
    assert watcher.known() == {"/", "/old", "/old/child"}
    assert watcher.watches == 3

    (tmp_path / "a/b/c/d").mkdir(parents=True)
    assert wait_for(lambda: "/a/b/c/d" in rec.added)
    assert rec.added == ["/a", "/a/b", "/a/b/c", "/a/b/c/d"]  # parents first, existing tree not reported

    (tmp_path / "a").rename(tmp_path / "z")
    assert wait_for(lambda: "/z/b/c/d" in rec.added and "/a" in rec.removed)
    assert rec.removed == ["/a/b/c/d", "/a/b/c", "/a/b", "/a"]  # children first
    assert rec.added[4:] == ["/z", "/z/b", "/z/b/c", "/z/b/c/d"]

    (tmp_path / "z/b/c/d/e").mkdir()  # the moved tree is watched under its new name
    assert wait_for(lambda: "/z/b/c/d/e" in rec.added)

    shutil.rmtree(tmp_path / "z")
    assert wait_for(lambda: "/z" in rec.removed)
    assert Counter(rec.removed[4:]) == Counter(["/z/b/c/d/e", "/z/b/c/d", "/z/b/c", "/z/b", "/z"])
    assert watcher.known() == {"/", "/old", "/old/child"}
    assert wait_for(lambda: watcher.watches == 3 and kernel_watches() == 3)


def test_sync_takes_the_rescan_as_truth_but_rechecks_differences(tmp_path: Path, make_watcher) -> None:
    (tmp_path / "a").mkdir()
    watcher, rec = make_watcher([tmp_path])
    watcher.start()
    known = watcher.known()
    known.add("/not-mine")
    assert "/not-mine" not in watcher.known()  # known() is a snapshot

    # "/a" is missing from the rescan but still exists: created after the caller scanned; kept.
    # "/ghost" is in the rescan but gone since; dropped. "/b" exists and is taken.
    (tmp_path / "b").mkdir()
    settle(rec, tmp_path, "/")
    watcher.sync({"/", "/ghost", "/b"})
    assert watcher.known() == {"/", "/a", "/b"}
    assert not watcher.needs_rescan


def test_stop_returns_promptly(tmp_path: Path, make_watcher) -> None:
    watcher, _ = make_watcher([tmp_path])
    watcher.start()
    assert watcher.running
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 1.0
    assert not watcher.running
    watcher.stop()  # idempotent


def test_queue_overflow_asks_for_a_rescan_and_recovers_after_sync(fast_dir: Path, make_watcher, caplog) -> None:
    queue_max = int((INOTIFY / "max_queued_events").read_text())
    if queue_max > 100_000:
        pytest.skip(f"max_queued_events is {queue_max}; too many directories to overflow it")
    entered, release = threading.Event(), threading.Event()
    added: list[str] = []

    def blocking_on_added(name: str) -> None:
        if name == "/block":
            entered.set()
            release.wait(10)
        added.append(name)

    watcher, rec = make_watcher([fast_dir], on_added=blocking_on_added)
    watcher.start()
    (fast_dir / "block").mkdir()
    assert entered.wait(2)
    count = queue_max + 50
    for i in range(count):
        (fast_dir / f"d{i}").mkdir()
    release.set()

    assert wait_for(lambda: watcher.needs_rescan and rec.overflows == 1, timeout_s=10)
    assert watcher.degraded and watcher.running
    assert f"/d{count - 1}" not in added  # its event was lost
    assert len(warnings_from_watcher(caplog)) == 1
    assert "max_queued_events" in warnings_from_watcher(caplog)[0].getMessage()

    watcher.sync(scan([fast_dir]))
    assert not watcher.needs_rescan
    assert wait_for(lambda: not watcher.degraded, timeout_s=5)  # missing watches added again
    (fast_dir / f"d{count - 1}/late").mkdir()
    assert wait_for(lambda: f"/d{count - 1}/late" in added)
    assert watcher.known() == scan([fast_dir])


def test_instance_limit_degrades_without_raising(tmp_path: Path, make_watcher, caplog) -> None:
    watcher, _ = make_watcher([tmp_path])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open(os.devnull, os.O_RDONLY)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # the next descriptor fails with EMFILE
    try:
        watcher.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert watcher.degraded and not watcher.running
    [warning] = warnings_from_watcher(caplog)
    assert "max_user_instances" in warning.getMessage() and "periodic rescan" in warning.getMessage()
    (tmp_path / "a").mkdir()
    watcher.sync(scan([tmp_path]))
    assert watcher.known() == {"/", "/a"}


# --- real cgroups ------------------------------------------------------------------------------


@dataclass
class CgroupTree:
    name: str  # "/cetest-watch-<random>"
    roots: list[Path]

    def mkdir(self, rel: str, *hierarchies: str) -> None:
        for h in hierarchies or HIERARCHIES:
            at(CGROUP / h, f"{self.name}/{rel}").mkdir(parents=True)

    def rmdir(self, rel: str, *hierarchies: str) -> None:
        for h in hierarchies or HIERARCHIES:
            rmdir_retry(at(CGROUP / h, f"{self.name}/{rel}"))


@pytest.fixture
def cgroups() -> Iterator[CgroupTree]:
    # Like the shared fixtures in conftest.py: fail, never skip, when the machine lacks something.
    if os.geteuid() != 0 or not all(os.access(CGROUP / h, os.W_OK) for h in HIERARCHIES):
        pytest.fail(f"needs root and writable {', '.join(HIERARCHIES)} hierarchies under {CGROUP}", pytrace=False)
    tree = CgroupTree(f"/cetest-watch-{uuid.uuid4().hex[:8]}", [CGROUP / h for h in HIERARCHIES])
    for root in tree.roots:
        at(root, tree.name).mkdir()
    try:
        yield tree
    finally:
        for root in tree.roots:
            remove_cgroup_tree(at(root, tree.name))


class WatchLimit:
    """fs.inotify.max_user_watches, saved so that it can always be restored."""

    path = INOTIFY / "max_user_watches"

    def __init__(self) -> None:
        self.saved = self.path.read_text().strip()

    def lower(self, value: int) -> None:
        self.path.write_text(str(value))

    def restore(self) -> None:
        self.path.write_text(self.saved)


@pytest.fixture
def watch_limit() -> Iterator[WatchLimit]:
    limit = WatchLimit()
    try:
        yield limit
    finally:
        limit.restore()


@pytest.mark.root
def test_scan_finds_test_cgroups(cgroups: CgroupTree) -> None:
    cgroups.mkdir("a/b", "cpu", "memory")
    cgroups.mkdir("a", "unified")
    names = scan(cgroups.roots)
    assert {"/", cgroups.name, f"{cgroups.name}/a", f"{cgroups.name}/a/b"} <= names
    unified = scan([CGROUP / "unified"])
    assert f"{cgroups.name}/a" in unified and f"{cgroups.name}/a/b" not in unified


@pytest.mark.root
def test_child_in_two_hierarchies_is_reported_once(cgroups: CgroupTree, make_watcher) -> None:
    watcher, rec = make_watcher(cgroups.roots)
    watcher.start()
    assert cgroups.name in watcher.known()
    child = f"{cgroups.name}/c1"
    cgroups.mkdir("c1", "cpu", "memory")
    assert wait_for(lambda: child in rec.added)
    settle(rec, CGROUP / "memory", cgroups.name)
    assert rec.added.count(child) == 1
    assert cgroups.name not in rec.added  # existed before start()


@pytest.mark.root
def test_nested_tree_created_quickly_is_fully_reported(cgroups: CgroupTree, make_watcher) -> None:
    busy, release = threading.Event(), threading.Event()
    gate = f"{cgroups.name}/gate"
    added: list[str] = []

    def on_added(name: str) -> None:
        added.append(name)
        if name == gate:
            busy.set()
            release.wait(5)

    watcher, rec = make_watcher(cgroups.roots, on_added=on_added)
    watcher.start()
    levels = [f"{cgroups.name}/n1", f"{cgroups.name}/n1/n2", f"{cgroups.name}/n1/n2/n3", f"{cgroups.name}/n1/n2/n3/n4"]
    cgroups.mkdir("n1/n2/n3/n4", "cpu")
    assert wait_for(lambda: all(name in added for name in levels))
    cgroups.mkdir("n1/n2/n3/n4", "memory", "unified")

    # A tree made while the watcher is busy: only n1's creation is an event, the rest is found by listing.
    cgroups.mkdir("gate", "cpu")
    assert busy.wait(2)
    deeper = [f"{cgroups.name}/m1", f"{cgroups.name}/m1/m2", f"{cgroups.name}/m1/m2/m3"]
    cgroups.mkdir("m1/m2/m3", "memory")
    release.set()
    assert wait_for(lambda: all(name in added for name in deeper))

    cgroups.mkdir("settle", "unified")
    assert wait_for(lambda: f"{cgroups.name}/settle" in added)
    assert [n for n in added if n.startswith(f"{cgroups.name}/n1")] == levels
    assert [n for n in added if n.startswith(f"{cgroups.name}/m1")] == deeper


@pytest.mark.root
def test_removed_once_gone_from_every_hierarchy(cgroups: CgroupTree, make_watcher) -> None:
    watcher, rec = make_watcher(cgroups.roots)
    watcher.start()
    baseline = watcher.watches
    assert kernel_watches() == baseline
    child = f"{cgroups.name}/c2"
    cgroups.mkdir("c2", "cpu", "memory")
    assert wait_for(lambda: child in rec.added)
    assert wait_for(lambda: watcher.watches == baseline + 2)

    cgroups.rmdir("c2", "cpu")
    settle(rec, CGROUP / "cpu", cgroups.name)
    assert child not in rec.removed
    assert child in watcher.known()

    cgroups.rmdir("c2", "memory")
    assert wait_for(lambda: child in rec.removed)
    settle(rec, CGROUP / "cpu", cgroups.name)
    assert rec.removed.count(child) == 1
    assert child not in watcher.known()
    # kernfs sends no IN_IGNORED on rmdir; the watcher must drop both watches itself.
    assert wait_for(lambda: watcher.watches == baseline and kernel_watches() == baseline)

    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 1.0 and not watcher.running


@pytest.mark.root
def test_failing_callback_does_not_stop_discovery(cgroups: CgroupTree, make_watcher, caplog) -> None:
    seen: list[str] = []

    def on_added(name: str) -> None:
        seen.append(name)
        if name.endswith("/bad"):
            raise RuntimeError("callback bug")

    watcher, rec = make_watcher(cgroups.roots, on_added=on_added)
    watcher.start()
    cgroups.mkdir("bad", "cpu")
    cgroups.mkdir("good", "cpu")
    assert wait_for(lambda: f"{cgroups.name}/good" in seen)
    assert f"{cgroups.name}/bad" in seen and watcher.running
    assert any(r.name == LOGGER and r.levelno == logging.ERROR and r.exc_info for r in caplog.records)


@pytest.mark.root
def test_watch_limit_degrades_once_and_keeps_working(
    cgroups: CgroupTree, make_watcher, watch_limit: WatchLimit, caplog
) -> None:
    watcher, rec = make_watcher(cgroups.roots)
    watcher.start()
    d1, d2, late = f"{cgroups.name}/d1", f"{cgroups.name}/d2", f"{cgroups.name}/d1/late"
    watch_limit.lower(1)  # below what is in use: every new watch fails with ENOSPC
    try:
        cgroups.mkdir("d1", "cpu")
        cgroups.mkdir("d2", "memory")
        # Creations in directories already watched are still reported, though d1 and d2 are unwatched.
        assert wait_for(lambda: d1 in rec.added and d2 in rec.added)
        settle(rec, CGROUP / "cpu", cgroups.name)  # its own watch fails too
    finally:
        watch_limit.restore()
    [warning] = warnings_from_watcher(caplog)
    assert "max_user_watches = 1" in warning.getMessage() and "periodic rescan" in warning.getMessage()
    assert watcher.degraded and watcher.running

    # The caller's rescan finds what the watcher could not see and lets it watch again.
    cgroups.mkdir("d1/unseen", "cpu")
    watcher.sync(scan(cgroups.roots))
    assert f"{cgroups.name}/d1/unseen" in watcher.known()
    assert wait_for(lambda: not watcher.degraded)
    cgroups.mkdir("d1/late", "cpu")
    assert wait_for(lambda: late in rec.added)
    assert len(warnings_from_watcher(caplog)) == 1
