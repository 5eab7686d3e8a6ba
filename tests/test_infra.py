"""The shared fixtures do what they say, against the real kernel and a real dockerd."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import docker.errors
import pytest
from docker.models.containers import Container

from tests.infra import docker as docker_infra
from tests.infra.cgroups import ScratchCgroup, create_cgroup, new_name, proc_cgroups, sweep_leftover_cgroups
from tests.infra.procs import pids_mentioning
from tests.infra.workloads import MIB, start_cpu_burner, start_memory_hog

pytestmark = pytest.mark.root

MakeCgroup = Callable[..., ScratchCgroup]


def _memory_file(cg: ScratchCgroup, v1: str, v2: str) -> str:
    return cg.read("memory", v2 if cg.hierarchies.pure_v2 else v1).strip()


def test_spawned_process_is_in_the_cgroup_from_exec(make_cgroup: MakeCgroup) -> None:
    cg = make_cgroup()
    # cat reads its own membership right after exec: it must already be inside.
    out = cg.spawn(["cat", "/proc/self/cgroup"], stdout=subprocess.PIPE, text=True).communicate(timeout=10)[0]
    membership = {c: p for line in out.splitlines() for c, p in [line.split(":", 2)[1:]]}
    if cg.hierarchies.unified is not None:
        assert membership[""] == cg.name
    if not cg.hierarchies.pure_v2:
        assert membership["cpu"] == cg.name
        assert membership["memory"] == cg.name


def test_long_running_process_is_listed_and_accounted(make_cgroup: MakeCgroup) -> None:
    cg = make_cgroup()
    burner = start_cpu_burner(cg)
    assert burner.pid in cg.pids()
    for controller in ("cpu", "memory"):
        assert burner.pid in {int(p) for p in cg.read(controller, "cgroup.procs").split()}
        assert proc_cgroups(burner.pid)[controller if not cg.hierarchies.pure_v2 else "unified"] == cg.name
    if not cg.hierarchies.pure_v2:
        deadline = time.monotonic() + 5
        while int(cg.read("cpuacct", "cpuacct.usage")) < 50_000_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert int(cg.read("cpuacct", "cpuacct.usage")) >= 50_000_000


def test_cpuset_of_new_cgroup_is_usable(make_cgroup: MakeCgroup) -> None:
    cg = make_cgroup()
    if cg.hierarchies.pure_v2:
        pytest.skip("cgroup2 cpusets inherit the parent's CPUs; nothing to copy")
    parent = cg.path("cpuset").parent
    assert cg.read("cpuset", "cpuset.cpus").strip() == (parent / "cpuset.cpus").read_text().strip() != ""
    assert cg.read("cpuset", "cpuset.mems").strip() == (parent / "cpuset.mems").read_text().strip() != ""


def test_memory_limit_reads_back(make_cgroup: MakeCgroup) -> None:
    cg = make_cgroup()
    cg.set_memory_limit(64 * MIB)
    assert int(_memory_file(cg, "memory.limit_in_bytes", "memory.max")) == 64 * MIB


def test_memory_hog_is_charged_to_the_cgroup(make_cgroup: MakeCgroup) -> None:
    cg = make_cgroup()
    hog = start_memory_hog(cg, 64)
    assert hog.poll() is None
    assert int(_memory_file(cg, "memory.usage_in_bytes", "memory.current")) >= 64 * MIB


def test_memory_limit_binds(make_cgroup: MakeCgroup) -> None:
    cg = make_cgroup()
    cg.set_memory_limit(32 * MIB)
    if not cg.hierarchies.pure_v2 and (cg.path("memory") / "memory.memsw.limit_in_bytes").exists():
        cg.write("memory", "memory.memsw.limit_in_bytes", str(32 * MIB))  # no escape into swap
    elif cg.hierarchies.pure_v2 and (cg.path("memory") / "memory.swap.max").exists():
        cg.write("memory", "memory.swap.max", "0")
    with pytest.raises(RuntimeError, match="exited with -9"):
        start_memory_hog(cg, 128)


def test_cpu_quota_throttles(make_cgroup: MakeCgroup) -> None:
    cg = make_cgroup()
    cg.set_cpu_quota(10_000, 100_000)
    if cg.hierarchies.pure_v2:
        assert cg.read("cpu", "cpu.max").split() == ["10000", "100000"]
    else:
        assert int(cg.read("cpu", "cpu.cfs_quota_us")) == 10_000
        assert int(cg.read("cpu", "cpu.cfs_period_us")) == 100_000
    start_cpu_burner(cg)
    deadline = time.monotonic() + 5
    throttled = 0
    while time.monotonic() < deadline:
        stat = dict(line.split() for line in cg.read("cpu", "cpu.stat").splitlines())
        throttled = int(stat["nr_throttled"])
        if throttled >= 2:
            break
        time.sleep(0.1)
    assert throttled >= 2


def test_remove_kills_everything_and_leaves_no_directory(make_cgroup: MakeCgroup) -> None:
    cg = make_cgroup()
    child = cg.create_child("inner")
    outer_proc = start_cpu_burner(cg)
    inner_proc = child.spawn(["sleep", "600"])
    # A grandchild the cgroup did not spawn itself must be killed too.
    shell = cg.spawn(["sh", "-c", "sleep 600 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    assert shell.stdout is not None
    grandchild = int(shell.stdout.readline())
    dirs = cg.dirs + child.dirs
    assert all(d.is_dir() for d in dirs)

    cg.remove()

    assert [d for d in dirs if d.exists()] == []
    assert outer_proc.returncode == -9 and shell.returncode == -9
    assert inner_proc.wait(5) == -9  # killed by the parent's removal; reaped here, its Popen is child's
    assert not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]
    child.remove()  # already gone with its parent: a no-op that must not raise


def test_sweep_removes_dead_sessions_leftovers_only() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root", pytrace=False)
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = create_cgroup(new_name(owner_pid=dead.pid))
    alive_other = create_cgroup(new_name(owner_pid=1))  # pid 1 never dies: another live session
    tag = uuid.uuid4().hex[:8]
    ownerless_young = create_cgroup(f"/cetest-young-{tag}")  # another helper's, in use right now
    ownerless_stale = create_cgroup(f"/cetest-stale-{tag}")
    for d in ownerless_stale.dirs:
        os.utime(d, (time.time() - 3600,) * 2)
    try:
        sleeper = subprocess.Popen(["sleep", "600"])
        leftover.add_pid(sleeper.pid)
        removed = sweep_leftover_cgroups()
        assert set(leftover.dirs + ownerless_stale.dirs) <= set(removed)
        assert not leftover.exists() and not ownerless_stale.exists()
        assert sleeper.wait(5) == -9
        assert alive_other.exists() and ownerless_young.exists()
    finally:
        for cg in (leftover, alive_other, ownerless_young, ownerless_stale):
            cg.remove()
    assert not alive_other.exists() and not ownerless_young.exists()


@pytest.mark.docker
def test_docker_engine_answers(docker_engine: docker_infra.DockerEngine) -> None:
    assert docker_engine.endpoint.startswith("unix://")
    assert docker_engine.client.ping() is True
    assert docker_engine.client.version()["ApiVersion"]


@pytest.mark.docker
def test_busybox_echo(busybox_image: str, make_container: Callable[..., Container]) -> None:
    container = make_container(busybox_image, ["echo", "hi"])
    assert container.wait(timeout=30)["StatusCode"] == 0
    assert container.logs() == b"hi\n"
    assert container.labels[docker_infra.TEST_LABEL] == "1"
    assert container.labels[docker_infra.OWNER_LABEL] == str(os.getpid())


@pytest.mark.docker
def test_busybox_applets_work(busybox_image: str, make_container: Callable[..., Container]) -> None:
    container = make_container(busybox_image, ["sh", "-c", "yes | head -n 3; dd if=/dev/zero bs=1k count=4 2>/dev/null | wc -c"])
    assert container.wait(timeout=30)["StatusCode"] == 0
    assert container.logs().split() == [b"y", b"y", b"y", b"4096"]


@pytest.mark.docker
def test_container_sweep_spares_live_owners(docker_engine: docker_infra.DockerEngine, busybox_image: str) -> None:
    client = docker_engine.client
    mine = docker_infra.run_container(client, busybox_image, ["sleep", "600"])
    other = docker_infra.run_container(client, busybox_image, ["sleep", "600"], labels={docker_infra.OWNER_LABEL: "1"})
    try:
        assert mine.name in docker_infra.sweep_test_containers(client)
        names = {c.name for c in client.containers.list(all=True, filters={"label": f"{docker_infra.TEST_LABEL}=1"})}
        assert mine.name not in names
        assert other.name in names
    finally:
        for container in (mine, other):
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass


@pytest.mark.docker
def test_private_dockerd_starts_and_stops_cleanly(tmp_path: Path) -> None:
    """The start/stop path the session takes on a machine where no engine runs yet."""
    if os.geteuid() != 0:
        pytest.fail("needs root", pytrace=False)
    socket_path = tmp_path / "docker.sock"
    daemon = docker_infra.start_dockerd(socket_path)
    try:
        assert daemon.is_ours()
        assert docker_infra.ping(daemon.endpoint)
    finally:
        daemon.stop()
    assert not Path(f"/proc/{daemon.pid}").exists()
    assert not daemon.tmpdir.exists()
    assert not socket_path.exists()
    assert pids_mentioning(f"{daemon.tmpdir}/") == []
    assert docker_infra.mounts_under(daemon.tmpdir) == []
