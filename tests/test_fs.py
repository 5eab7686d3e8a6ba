"""Mount table, statvfs and writable-layer usage against the real kernel, df and du."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from exporter.fs import (
    Mount,
    WritableLayerUsage,
    filesystem_info,
    filesystem_stats,
    machine_filesystems,
    parse_mountinfo,
    read_mounts,
)

FIXTURES = Path(__file__).parent / "fixtures" / "machine"
MiB = 1 << 20


def fixture_mounts() -> list[Mount]:
    return parse_mountinfo((FIXTURES / "mountinfo").read_text())


# --- mountinfo ---------------------------------------------------------------------------------


def test_parse_mountinfo_fixture_fields_and_escapes() -> None:
    mounts = fixture_mounts()
    assert len(mounts) == len((FIXTURES / "mountinfo").read_text().splitlines()) == 18
    by_point = {m.mountpoint: m for m in mounts}

    root = by_point["/"]
    assert (root.device, root.fstype, root.major, root.minor) == ("/dev/nvme0n1p2", "ext4", 259, 2)
    assert root.options == ("rw", "relatime")
    assert root.super_options == ("rw", "errors=remount-ro")

    bind = by_point["/mnt/my disk\ttab\\back"]
    assert bind.root == "/srv/exports"
    assert bind.device == "/dev/nvme0n1p2"

    # Four optional fields before the separator.
    usb = by_point["/media/usb stick"]
    assert (usb.fstype, usb.device, usb.major, usb.minor) == ("xfs", "/dev/sdc1", 8, 33)

    # No optional fields at all.
    overlay = by_point["/var/lib/docker/overlay2/abc/merged"]
    assert overlay.fstype == "overlay"
    assert "upperdir=/var/lib/docker/overlay2/abc/diff" in overlay.super_options

    # An empty source is an empty field between two single spaces.
    user_run = by_point["/run/user/1000"]
    assert (user_run.device, user_run.fstype) == ("", "tmpfs")
    assert "uid=1000" in user_run.super_options

    assert by_point["/srv/home"].root == "/@home"


def test_parse_mountinfo_skips_garbage_lines() -> None:
    text = "not a mountinfo line\n\n" + (FIXTURES / "mountinfo").read_text().splitlines()[4] + "\n"
    mounts = parse_mountinfo(text)
    assert [m.mountpoint for m in mounts] == ["/"]


def _findmnt() -> dict[str, tuple[str, str]]:
    out = subprocess.run(
        ["findmnt", "--json", "--list", "-o", "TARGET,FSTYPE,MAJ:MIN"],
        check=True, capture_output=True, text=True,
    ).stdout
    return {fs["target"]: (fs["fstype"], fs["maj:min"]) for fs in json.loads(out)["filesystems"]}


@pytest.mark.skipif(shutil.which("findmnt") is None, reason="needs findmnt (util-linux)")
def test_parse_mountinfo_real_matches_findmnt() -> None:
    # Containers may come and go meanwhile: compare only mounts present before and after findmnt.
    before = read_mounts(Path("/proc"))
    reference = _findmnt()
    after = read_mounts(Path("/proc"))
    assert before and after
    stable = {m.mountpoint: m for m in before if m in set(after)}
    assert "/" in stable
    root_dev = os.stat("/").st_dev
    assert (stable["/"].major, stable["/"].minor) == (os.major(root_dev), os.minor(root_dev))
    compared = 0
    for point, mount in stable.items():
        if point in reference:
            assert reference[point] == (mount.fstype, f"{mount.major}:{mount.minor}"), point
            compared += 1
    assert compared == len(stable)


@pytest.fixture
def tmpfs_with_odd_name(tmp_path: Path) -> Iterator[Path]:
    target = tmp_path / "odd name\twith tab\\and backslash"
    target.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "exp-test", str(target)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {done.stderr.decode().strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_parse_mountinfo_real_octal_escapes(tmpfs_with_odd_name: Path) -> None:
    mounts = read_mounts(Path("/proc"))
    assert mounts is not None
    raw = Path("/proc/self/mountinfo").read_text()
    assert "odd\\040name\\011with\\040tab\\134and\\040backslash" in raw
    matching = [m for m in mounts if m.mountpoint == str(tmpfs_with_odd_name)]
    assert len(matching) == 1
    assert (matching[0].fstype, matching[0].device) == ("tmpfs", "exp-test")
    st = os.stat(tmpfs_with_odd_name)
    assert (matching[0].major, matching[0].minor) == (os.major(st.st_dev), os.minor(st.st_dev))


def test_read_mounts_missing_proc_gives_none(tmp_path: Path) -> None:
    assert read_mounts(tmp_path) is None


# --- machine filesystems -----------------------------------------------------------------------


def test_machine_filesystems_fixture() -> None:
    kept = machine_filesystems(fixture_mounts())
    assert [(m.mountpoint, m.device, m.fstype) for m in kept] == [
        ("/", "/dev/nvme0n1p2", "ext4"),  # its bind mount at /mnt/my disk... collapses into it
        ("/boot/efi", "/dev/nvme0n1p1", "vfat"),
        ("/data", "/dev/sda1", "btrfs"),  # the /srv/home subvolume shares the device
        ("/tank", "tank/data", "zfs"),
        ("/media/usb stick", "/dev/sdc1", "xfs"),
    ]


def test_machine_filesystems_keeps_shortest_mountpoint() -> None:
    long_first = Mount("/dev/sdb1", "/var/lib/docker", "ext4", 8, 17)
    short = Mount("/dev/sdb1", "/var", "ext4", 8, 17)
    assert machine_filesystems([long_first, short]) == [short]


def test_machine_filesystems_real_root_is_there() -> None:
    mounts = read_mounts(Path("/proc"))
    assert mounts is not None
    kept = machine_filesystems(mounts)
    assert len({m.device for m in kept}) == len(kept)
    assert not {m.fstype for m in kept} & {"proc", "sysfs", "tmpfs", "overlay", "cgroup", "cgroup2"}
    source = subprocess.run(
        ["df", "--output=source", "/"], check=True, capture_output=True, text=True
    ).stdout.split()[-1]
    if source.startswith("/dev/"):
        assert any(m.mountpoint == "/" and m.device == source for m in kept)


# --- statvfs -----------------------------------------------------------------------------------


def _df(path: str) -> dict[str, int]:
    out = subprocess.run(
        ["df", "-B1", "--output=size,used,avail,itotal,iused", path],
        check=True, capture_output=True, text=True,
    ).stdout.splitlines()[-1]
    size, used, avail, itotal, iused = (int(x) for x in out.split())
    return {"size": size, "used": used, "avail": avail, "itotal": itotal, "iused": iused}


def test_filesystem_stats_root_matches_df() -> None:
    root = Mount("/dev/root", "/", "ext4", 0, 0)
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    # Other writers may be busy: df must fall between two samples taken around it.
    [first] = filesystem_stats([root], now=now)
    df = _df("/")
    [second] = filesystem_stats([root], now=now)
    slack = 64 * MiB

    assert first.capacity_bytes == df["size"]
    assert first.inodes == df["itotal"]
    assert first.inodes_used is not None and first.inodes_free is not None
    assert first.inodes_used + first.inodes_free == first.inodes
    used = sorted([first.usage_bytes, second.usage_bytes])
    assert used[0] - slack <= df["used"] <= used[1] + slack
    assert first.available_bytes is not None and second.available_bytes is not None
    avail = sorted([first.available_bytes, second.available_bytes])
    assert avail[0] - slack <= df["avail"] <= avail[1] + slack
    inodes_used = sorted([first.inodes_used, second.inodes_used or 0])
    assert inodes_used[0] - 1000 <= df["iused"] <= inodes_used[1] + 1000
    assert (first.device, first.mountpoint, first.type, first.measured_at) == ("/dev/root", "/", "ext4", now)


def test_filesystem_stats_reports_host_path_but_stats_under_rootfs(tmp_path: Path) -> None:
    (tmp_path / "srv" / "data").mkdir(parents=True)
    mount = Mount("/dev/sdz1", "/srv/data", "ext4", 8, 1)
    [stats] = filesystem_stats([mount], rootfs=tmp_path)
    [info] = filesystem_info([mount], rootfs=tmp_path)
    reference = os.statvfs(tmp_path)
    assert stats.mountpoint == info.mountpoint == "/srv/data"
    assert stats.capacity_bytes == info.capacity_bytes == reference.f_blocks * reference.f_frsize
    assert info.inodes == reference.f_files


def test_unreadable_mount_is_skipped_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    good = Mount("/dev/root", "/", "ext4", 0, 0)
    gone = Mount("/dev/sdq1", "/no/such/mountpoint", "xfs", 65, 1)
    failures: dict[str, int] = {}
    with caplog.at_level(logging.WARNING, logger="exporter.fs"):
        for _ in range(3):
            stats = filesystem_stats([gone, good], failures=failures)
            assert [s.mountpoint for s in stats] == ["/"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len([r for r in warnings if "/no/such/mountpoint" in r.getMessage()]) == 1
    assert failures == {"/no/such/mountpoint": 3}


def test_filesystem_info_root_matches_df() -> None:
    [info] = filesystem_info([Mount("/dev/root", "/", "ext4", 0, 0)])
    df = _df("/")
    assert (info.capacity_bytes, info.inodes) == (df["size"], df["itotal"])


# --- writable layers ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _write(path: Path, size: int) -> None:
    path.write_bytes(os.urandom(size))


def make_layer(root: Path, outside: Path) -> Path:
    """A tree with files of known sizes, hard links, symlinks, a sparse file and nested dirs."""
    root.mkdir()
    for size in (0, 1, 4095, 4096, 4097, 10_000, MiB + 3):
        _write(root / f"file_{size}", size)
    nested = root / "a" / "b" / "c" / "d"
    nested.mkdir(parents=True)
    (root / "a" / "empty").mkdir()
    _write(nested / "deep", 70_000)
    for i in range(40):
        _write(root / "a" / f"small_{i}", 100 * i)
    # Hard links: one inode with three names in two directories, and one with two.
    _write(root / "linked3", 50_000)
    os.link(root / "linked3", root / "a" / "linked3_b")
    os.link(root / "linked3", nested / "linked3_c")
    _write(root / "a" / "b" / "linked2", 9_000)
    os.link(root / "a" / "b" / "linked2", root / "linked2_again")
    # Symlinks must not be followed: one to a big file outside, one to a dir, one dangling.
    _write(outside / "big_outside", 3 * MiB)
    (root / "to_big").symlink_to(outside / "big_outside")
    (root / "to_dir").symlink_to(outside)
    (root / "dangling").symlink_to(root / "nowhere")
    (root / ("long_target_" + "x" * 20)).symlink_to("y" * 200)
    # Sparse: 8 MiB apparent, one block written.
    with open(root / "sparse", "wb") as f:
        f.seek(8 * MiB)
        f.write(b"x")
    os.mkfifo(root / "fifo")
    return root


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-s", "-B1", "-x", str(path)], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[0])


def du_inodes(path: Path) -> int:
    out = subprocess.run(["du", "-s", "--inodes", "-x", str(path)], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[0])


def count_entries(path: Path) -> int:
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(path))


def run_until_idle(usage: WritableLayerUsage, limit: int = 10_000) -> int:
    steps = 0
    while usage.step():
        steps += 1
        assert steps < limit, "walk never finished"
    return steps


@pytest.fixture
def layer(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    return make_layer(tmp_path / "diff", outside)


def test_layer_usage_matches_du(layer: Path) -> None:
    wall = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)
    usage = WritableLayerUsage(interval_s=60, clock=FakeClock(), wall_clock=lambda: wall)
    usage.track("c1", layer)
    assert usage.usage("c1") is None
    run_until_idle(usage)
    stats = usage.usage("c1")
    assert stats is not None
    assert stats.usage_bytes == du_bytes(layer)
    assert stats.inodes_used == du_inodes(layer)
    # Every entry plus the dir itself, but the three extra hard-link names count once.
    assert stats.inodes_used == count_entries(layer) + 1 - 3
    assert (stats.device, stats.mountpoint, stats.measured_at) == ("overlay", str(layer), wall)


def test_layer_usage_is_incremental(layer: Path) -> None:
    entries = count_entries(layer)
    usage = WritableLayerUsage(interval_s=60, clock=FakeClock(), entries_per_step=7)
    usage.track("c1", layer)
    assert usage.step() is True
    assert usage.usage("c1") is None
    steps = 1 + run_until_idle(usage)
    assert steps >= entries // 7
    stats = usage.usage("c1")
    assert stats is not None
    assert (stats.usage_bytes, stats.inodes_used) == (du_bytes(layer), du_inodes(layer))


def test_step_budget_is_shared_between_layers(tmp_path: Path) -> None:
    trees = []
    for name in ("x", "y"):
        root = tmp_path / name
        root.mkdir()
        for i in range(5):
            _write(root / f"f{i}", 10)
        trees.append(root)
    usage = WritableLayerUsage(interval_s=60, clock=FakeClock(), entries_per_step=8)
    usage.track("x", trees[0])
    usage.track("y", trees[1])
    usage.step()  # x's 5 entries, then 3 of y's
    assert usage.usage("x") is not None and usage.usage("y") is None
    usage.step()
    assert usage.usage("y") is not None
    assert usage.step() is False


def test_second_walk_waits_for_interval(layer: Path) -> None:
    clock = FakeClock()
    usage = WritableLayerUsage(interval_s=10, clock=clock, entries_per_step=1000)
    usage.track("c1", layer)
    run_until_idle(usage)
    first = usage.usage("c1")
    assert first is not None

    _write(layer / "new_file", 200_000)
    clock.now += 9.9
    assert usage.step() is False
    assert usage.usage("c1") == first

    clock.now += 0.2
    assert usage.step() is True
    run_until_idle(usage)
    second = usage.usage("c1")
    assert second is not None
    assert second.usage_bytes == du_bytes(layer) > first.usage_bytes
    assert second.inodes_used == first.inodes_used + 1


def test_slow_walk_backs_off_up_to_max(layer: Path) -> None:
    clock = FakeClock()
    usage = WritableLayerUsage(interval_s=10, clock=clock, entries_per_step=10, max_interval_s=35)

    def slow_walk() -> None:
        while usage.step():
            clock.now += 0.5  # every step "takes" half a second

    assert WritableLayerUsage(interval_s=10).max_interval_s == 200  # cAdvisor's 20x cap
    usage.track("c1", layer)
    slow_walk()
    assert usage.interval_of("c1") == 20
    finished = clock.now
    clock.now = finished + 19
    assert usage.step() is False
    clock.now = finished + 20
    slow_walk()
    assert usage.interval_of("c1") == 35  # 40, capped
    clock.now += 35
    slow_walk()
    assert usage.interval_of("c1") == 35

    # A fast walk halves the interval back toward interval_s.
    clock.now += 35
    run_until_idle(usage)
    assert usage.interval_of("c1") == 17.5
    clock.now += 17.5
    run_until_idle(usage)
    assert usage.interval_of("c1") == 10


def test_layer_deleted_mid_walk_keeps_last_value(layer: Path) -> None:
    clock = FakeClock()
    usage = WritableLayerUsage(interval_s=10, clock=clock, entries_per_step=3)
    usage.track("c1", layer)
    usage.step()
    usage.step()
    shutil.rmtree(layer)
    run_until_idle(usage)
    assert usage.usage("c1") is None

    layer.mkdir()
    for i in range(10):
        _write(layer / f"f{i}", 5000)
    clock.now += 10
    run_until_idle(usage)
    complete = usage.usage("c1")
    assert complete is not None and complete.usage_bytes == du_bytes(layer)

    clock.now += 10
    usage.step()
    shutil.rmtree(layer)
    run_until_idle(usage)
    assert usage.usage("c1") == complete


def test_subdirectory_deleted_mid_walk_still_completes(layer: Path) -> None:
    usage = WritableLayerUsage(interval_s=10, clock=FakeClock(), entries_per_step=2)
    usage.track("c1", layer)
    usage.step()
    before = count_entries(layer) + 1
    shutil.rmtree(layer / "a")
    run_until_idle(usage)
    stats = usage.usage("c1")
    assert stats is not None
    assert du_inodes(layer) <= stats.inodes_used <= before


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_untrack_mid_walk_closes_the_directory(layer: Path) -> None:
    usage = WritableLayerUsage(interval_s=10, clock=FakeClock(), entries_per_step=3)
    fds = _open_fds()
    usage.track("c1", layer)
    usage.step()
    assert _open_fds() == fds + 1  # the directory being listed stays open between steps
    usage.untrack("c1")
    assert _open_fds() == fds
    assert usage.usage("c1") is None
    assert usage.step() is False
    assert usage.tracked() == []


def test_retrack_with_new_dir_starts_over(tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    _write(second / "f", 100_000)
    usage = WritableLayerUsage(interval_s=10, clock=FakeClock())
    usage.track("c1", first)
    run_until_idle(usage)
    assert usage.usage("c1") is not None
    usage.track("c1", first)
    assert usage.usage("c1") is not None
    usage.track("c1", second)
    assert usage.usage("c1") is None
    run_until_idle(usage)
    stats = usage.usage("c1")
    assert stats is not None and stats.usage_bytes == du_bytes(second)


@pytest.fixture
def layer_with_mount(layer: Path) -> Iterator[Path]:
    inner = layer / "a" / "mnt"
    inner.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "exp-test", str(inner)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {done.stderr.decode().strip()}")
    try:
        _write(inner / "on_tmpfs", 2 * MiB)
        yield layer
    finally:
        subprocess.run(["umount", str(inner)], check=True)


def test_walk_does_not_cross_filesystems(layer_with_mount: Path) -> None:
    usage = WritableLayerUsage(interval_s=10, clock=FakeClock())
    usage.track("c1", layer_with_mount)
    run_until_idle(usage)
    stats = usage.usage("c1")
    assert stats is not None
    assert stats.usage_bytes == du_bytes(layer_with_mount)
    assert stats.inodes_used == du_inodes(layer_with_mount)
    crossing = subprocess.run(["du", "-s", "-B1", str(layer_with_mount)], check=True, capture_output=True, text=True)
    assert int(crossing.stdout.split()[0]) >= stats.usage_bytes + 2 * MiB


def test_thread_measures_and_stops(layer: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    usage = WritableLayerUsage(interval_s=0.05, entries_per_step=16, step_pause_s=0.001, idle_pause_s=0.01)
    usage.track("c1", layer)
    usage.start()
    try:
        # Callers hammer the public API while the walker runs.
        for i in range(2000):
            usage.track(f"t{i % 7}", other)
            usage.usage("c1")
            if i % 3 == 0:
                usage.untrack(f"t{i % 7}")
        deadline = 500
        while usage.usage("c1") is None and deadline:
            threading.Event().wait(0.01)
            deadline -= 1
    finally:
        usage.stop()
    stats = usage.usage("c1")
    assert stats is not None
    assert (stats.usage_bytes, stats.inodes_used) == (du_bytes(layer), du_inodes(layer))
    assert not any(t.name == "writable-layer-usage" for t in threading.enumerate())
