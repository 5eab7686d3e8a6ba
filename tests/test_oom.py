"""OOM kills: kmsg parsing on captured and kernel-format lines, the watcher on a stand-in pipe,
and real OOM kills (a limited cgroup, a Docker container run with --memory 16m)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from exporter.clock import FakeClock, SystemClock
from exporter.discovery.docker import parse_docker_time
from exporter.events import EventManager, EventRequest, StoragePolicy
from exporter.manager import Identity
from exporter.oom import (
    LineJoiner,
    OomInfo,
    OomParser,
    OomWatcher,
    parse_killed_line,
    parse_kmsg,
    parse_legacy_task_line,
    parse_oom_kill_line,
    parse_record,
    split_records,
)
from tests.infra.workloads import memory_hog_argv
from tests.test_events import events_app  # noqa: F401 - fixture
from tests.test_pipeline import wait_for

FIXTURES = Path(__file__).parent / "fixtures" / "kmsg"
MIB = 1024 * 1024
DOCKER_ID = "b9ab81cc7cf5a2ccb3669274faa7232120f4a203d5fdc07c233cef18c222bbb4"
LEGACY_ID = "4e1f1c3b5bc4a6a27d7c7e2b90c8fbd3d9f6f1e1b52b3cba6e9b56f3f7b6a0c1"
SCOPE = "/system.slice/docker-0b6cf6c1a4e4c7a0a4d1f0f9a9c0d5b5e3f2b1a09c8d7e6f5a4b3c2d1e0f9a8b.scope"
POD = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5d8e.slice"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def summary(info: OomInfo) -> tuple[object, ...]:
    return (info.memcg, info.container, info.pid, info.process_name, info.constraint, info.global_oom)


# -- parsing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("memcg-oom-6.18-hybrid.kmsg", [("/cetest-31582-1ef9d340", "/cetest-31582-1ef9d340", 31583, "python", "CONSTRAINT_MEMCG", False)]),
        ("docker-oom-6.18-hybrid.kmsg", [(f"/docker/{DOCKER_ID}", f"/docker/{DOCKER_ID}", 8128, "dd", "CONSTRAINT_MEMCG", False)]),
        ("legacy-4.14-docker.kmsg", [(f"/docker/{LEGACY_ID}", f"/docker/{LEGACY_ID}", 4242, "python", None, False)]),
        ("legacy-3.10-split.kmsg", [(SCOPE, SCOPE, 9001, "stress", None, False)]),
        ("global-oom-5.10.kmsg", [("/", "/user.slice/user-1000.slice/session-2.scope", 77001, "chrome", "CONSTRAINT_NONE", True)]),
        (
            "v2-nested-and-spoofed-5.15.kmsg",
            [
                (POD, f"{POD}/cri-containerd-9f2c.scope", 31337, "java", "CONSTRAINT_MEMCG", False),
                ("/system.slice/app.scope", "/system.slice/app.scope", 4711, "node,v2 (x)", "CONSTRAINT_MEMCG", False),
            ],
        ),
        ("boot-6.18.kmsg", []),
    ],
)
def test_captures_and_kernel_formats(name, expected):
    infos = parse_kmsg(fixture(name), timestamp=123.0)
    assert [summary(i) for i in infos] == expected
    assert all(i.timestamp == 123.0 for i in infos)


def test_oom_amid_other_subsystems_is_found_once():
    mixed = fixture("boot-6.18.kmsg") + fixture("docker-oom-6.18-hybrid.kmsg") + fixture("boot-6.18.kmsg")
    assert [i.pid for i in parse_kmsg(mixed)] == [8128]


def test_userspace_records_cannot_fake_an_oom():
    """Facility 1 (user): what anyone may write to /dev/kmsg. Only kernel records count."""
    records = [parse_record(r) for r in split_records(fixture("v2-nested-and-spoofed-5.15.kmsg"))[:2]]
    assert [(r.facility, r.level) for r in records if r] == [(1, 4), (1, 6)]
    assert {i.pid for i in parse_kmsg(fixture("v2-nested-and-spoofed-5.15.kmsg"))} == {31337, 4711}


def test_record_parsing_dictionary_and_escapes():
    (raw,) = [r for r in split_records(fixture("boot-6.18.kmsg")) if b"_OSC: OS supports" in r]
    record = parse_record(raw)
    assert record is not None
    assert (record.facility, record.level, record.seq, record.usec, record.flags) == (0, 6, 193, 295137, "-")
    assert record.message.startswith("acpi PNP0A08:00: _OSC: OS supports")
    assert "SUBSYSTEM" not in record.message  # dictionary lines are not part of the text
    escaped = parse_record(b"6,90,241219,-;rcu: \\x09RCU restricting CPUs\n")
    assert escaped is not None and escaped.message == "rcu: \tRCU restricting CPUs"
    assert parse_record(b"not a record") is None
    assert parse_record(b"x,1,2,-;text") is None


def test_line_parsers():
    fields = parse_oom_kill_line(
        "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=abc,mems_allowed=0,"
        "oom_memcg=/kubepods/pod1,task_memcg=/kubepods/pod1/c1,task=manager,pid=966,uid=0"
    )
    assert fields is not None
    assert (fields["oom_memcg"], fields["task_memcg"], fields["task"], fields["pid"], fields["global"]) == (
        "/kubepods/pod1",
        "/kubepods/pod1/c1",
        "manager",
        "966",
        None,
    )
    assert parse_oom_kill_line("oom-kill: something else") is None
    assert parse_legacy_task_line("Task in /mem2 killed as a result of limit of /mem3") == ("/mem2", "/mem3")
    assert parse_legacy_task_line("Task in  killed") is None
    # cAdvisor's process name cases.
    for name in ("foo", "python3.4", "foo-bar", "Plex Media Server", "x86_64-pc-linux-gnu-c++-5.4.0", "[", "()", '"with quotes"'):
        line = f"Killed process 1234 ({name}) total-vm:1460016kB, anon-rss:1414008kB, file-rss:4kB"
        assert parse_killed_line(line) == (1234, name)
    assert parse_killed_line("Memory cgroup out of memory: Killed process 7 (a b) total-vm:1kB") == (7, "a b")
    # Not kills: the candidate line of old kernels, the reaper's report.
    assert parse_killed_line("Memory cgroup out of memory: Kill process 13536 (m) score 996 or sacrifice child") is None
    assert parse_killed_line("oom_reaper: reaped process 4242 (python), now anon-rss:0kB, file-rss:0kB") is None


def test_summary_line_and_killed_line_are_one_kill():
    parser = OomParser()
    lines = [
        "x invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
        "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=a,mems_allowed=0,oom_memcg=/a,task_memcg=/a/w,task=x,pid=5,uid=0",
        "Memory cgroup out of memory: Killed process 5 (x) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:1kB oom_score_adj:0",
        "oom_reaper: reaped process 5 (x), now anon-rss:0kB, file-rss:0kB, shmem-rss:0kB",
        # Legacy style, without a summary line.
        "y invoked oom-killer: gfp_mask=0xd0, order=0, oom_score_adj=0",
        "Task in /b killed as a result of limit of /b",
        "Killed process 6 (y) total-vm:1kB, anon-rss:1kB, file-rss:0kB",
        # A summary whose victim had already let go of its memory: no kill, no event.
        "z invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
        "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=c,mems_allowed=0,oom_memcg=/c,task_memcg=/c,task=z,pid=7,uid=0",
        # 4.19: the summary names the parent, a child is killed instead.
        "p invoked oom-killer: gfp_mask=0x6000c0(GFP_KERNEL), nodemask=(null), order=0, oom_score_adj=0",
        "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/d,task_memcg=/d,task=p,pid=8,uid=0",
        "Memory cgroup out of memory: Kill process 8 (p) score 1000 or sacrifice child",
        "Killed process 9 (child) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB",
    ]
    infos = [info for line in lines if (info := parser.feed(line, 1.0))]
    assert [(i.pid, i.process_name, i.memcg, i.container, i.invoked_by, i.constraint) for i in infos] == [
        (5, "x", "/a", "/a/w", "x", "CONSTRAINT_MEMCG"),
        (6, "y", "/b", "/b", "y", None),
        (9, "child", "/d", "/d", "p", "CONSTRAINT_MEMCG"),
    ]


def test_line_joiner_reassembles_split_records():
    joiner = LineJoiner()
    records = [parse_record(r) for r in split_records(fixture("legacy-3.10-split.kmsg"))]
    lines = [line for r in records if r for line in joiner.push(r)] + joiner.flush()
    assert "stress cpuset=/ mems_allowed=0" in lines
    assert f"Task in {SCOPE} killed as a result of limit of {SCOPE}" in lines


# -- the watcher on a pipe standing in for /dev/kmsg ---------------------------------------------------
def renumber(data: bytes, first_seq: int) -> bytes:
    out = []
    for i, raw in enumerate(split_records(data)):
        prefix, seq, rest = raw.split(b",", 2)
        out.append(b",".join([prefix, str(first_seq + i).encode(), rest]))
    return b"\n".join(out) + b"\n"


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "kmsg"
    os.mkfifo(path)
    return path


def test_watcher_reopens_after_an_error_without_replaying(fifo):
    clock = FakeClock()
    seen: list[OomInfo] = []
    watcher = OomWatcher(seen.append, clock, kmsg_path=fifo, poll_interval_s=0.05, initial_backoff_s=0.05, max_backoff_s=0.2)
    watcher.start()
    try:
        with open(fifo, "wb") as writer:
            writer.write(fixture("docker-oom-6.18-hybrid.kmsg"))
        wait_for(lambda: seen, 3.0, "the first OOM")
        assert watcher.counts() == {f"/docker/{DOCKER_ID}": 1}
        # The writer hung up: end of data, an error for the watcher, which reopens.
        wait_for(lambda: watcher.read_errors >= 1, 3.0, "the read error")
        clock.advance(60)
        with open(fifo, "wb") as writer:
            # Records already seen (sequence numbers up to the last one read) are skipped...
            writer.write(fixture("docker-oom-6.18-hybrid.kmsg"))
            # ...new ones are not.
            writer.write(renumber(fixture("legacy-4.14-docker.kmsg"), 10_000))
        wait_for(lambda: len(seen) >= 2, 3.0, "the second OOM")
        time.sleep(0.2)
        assert [i.pid for i in seen] == [8128, 4242]
        assert seen[1].timestamp == clock.time()
        assert watcher.reopens >= 1
        assert watcher.counts() == {f"/docker/{DOCKER_ID}": 1, f"/docker/{LEGACY_ID}": 1}
        assert watcher.running
    finally:
        started = time.monotonic()
        watcher.stop()
    assert not watcher.running
    assert time.monotonic() - started < 2.0


def test_watcher_survives_a_failing_callback(fifo):
    calls: list[int] = []

    def broken(info: OomInfo) -> None:
        calls.append(info.pid)
        raise RuntimeError("bug")

    watcher = OomWatcher(broken, FakeClock(), kmsg_path=fifo, poll_interval_s=0.05, initial_backoff_s=0.05)
    watcher.start()
    try:
        with open(fifo, "wb") as writer:
            writer.write(fixture("v2-nested-and-spoofed-5.15.kmsg"))
        wait_for(lambda: len(calls) == 2, 3.0, "both OOMs despite the failing callback")
        assert watcher.callback_errors == 2
        assert sum(watcher.counts().values()) == 2
    finally:
        watcher.stop()


def test_watcher_retries_a_missing_device(tmp_path):
    missing = tmp_path / "no-kmsg"
    watcher = OomWatcher(lambda info: None, FakeClock(), kmsg_path=missing, initial_backoff_s=0.05, max_backoff_s=0.1)
    watcher.start(wait_s=2.0)
    try:
        wait_for(lambda: watcher.last_error is not None, 2.0, "the open error")
        assert "no-kmsg" in (watcher.last_error or "")
        assert watcher.running
        os.mkfifo(missing)
        wait_for(lambda: watcher.reopens >= 1, 3.0, "the device to be opened")
    finally:
        watcher.stop()


# -- real OOM kills ----------------------------------------------------------------------------------
def limit_memory(cg, limit_bytes: int) -> None:
    """Memory limit, and swap out of the way so the allocator is killed rather than swapped."""
    cg.set_memory_limit(limit_bytes)
    directory = cg.path("memory")
    if (directory / "memory.memsw.limit_in_bytes").exists():
        cg.write("memory", "memory.memsw.limit_in_bytes", str(limit_bytes))
    elif (directory / "memory.swap.max").exists():
        cg.write("memory", "memory.swap.max", "0")


def kmsg_ooms_so_far() -> list[OomInfo]:
    """Every OOM still in the kernel's buffer, read from its start by a separate reader."""
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    chunks = []
    try:
        while True:
            try:
                chunks.append(os.read(fd, 16384))
            except BlockingIOError:
                break
            except BrokenPipeError:
                continue
    finally:
        os.close(fd)
    return parse_kmsg(b"".join(chunks))


@pytest.fixture
def oom_events() -> Iterator[tuple[EventManager, OomWatcher]]:
    clock = SystemClock()
    manager = EventManager(StoragePolicy(), Identity("m", "h", "r"), clock)
    watcher = OomWatcher(manager.add_oom, clock)
    yield manager, watcher
    watcher.stop()
    manager.stop()


def oom_pair(manager: EventManager, name: str) -> tuple[list, list]:
    def of(event_type: str) -> list:
        return manager.query(EventRequest(container_name=name, event_types=frozenset({event_type}), max_events=-1))

    return of("oom"), of("oomKill")


@pytest.mark.root
def test_real_cgroup_oom_kill_and_no_replay_of_earlier_ones(oom_events, make_cgroup):
    manager, watcher = oom_events
    # An OOM kill before the watcher starts: it is in the kernel's buffer, and must not be replayed.
    before = make_cgroup()
    limit_memory(before, 32 * MIB)
    old = before.spawn(memory_hog_argv(100), stdout=subprocess.DEVNULL)
    assert old.wait(30) == -9
    wait_for(lambda: any(i.pid == old.pid for i in kmsg_ooms_so_far()), 3.0, "the earlier OOM in the kernel log")

    watcher.start()
    assert watcher.running
    cg = make_cgroup()
    limit_memory(cg, 32 * MIB)
    proc = cg.spawn(memory_hog_argv(100), stdout=subprocess.DEVNULL)
    oom, kill = wait_for(lambda: all(oom_pair(manager, cg.name)) and oom_pair(manager, cg.name), 3.0, "oom and oomKill events")
    assert proc.wait(5) == -9
    assert len(oom) == 1 and len(kill) == 1
    assert kill[0].event_data.pid == proc.pid == oom[0].event_data.pid
    assert kill[0].event_data.process_name == Path(sys.executable).name[:15]
    assert kill[0].event_data.constraint == "CONSTRAINT_MEMCG"
    assert abs(kill[0].timestamp.timestamp() - time.time()) < 3.0
    assert watcher.counts().get(cg.name) == 1
    assert watcher.oom_counts().get(cg.name) == 1
    # The earlier kill was not replayed.
    assert before.name not in watcher.counts()
    assert oom_pair(manager, before.name) == ([], [])


@pytest.mark.root
@pytest.mark.docker
def test_real_docker_oom_kill_names_the_container_and_exit_code(events_app, docker_engine, busybox_image, make_container):  # noqa: F811
    ea = events_app(docker_endpoint=docker_engine.endpoint, docker_only=True)
    name = f"ce-oom-{uuid.uuid4().hex[:8]}"
    # dd's 64 MiB block buffer is written by read(), so its pages are charged: 16 MiB is exceeded.
    container = make_container(
        busybox_image,
        ["sh", "-c", "sleep 3; exec dd if=/dev/zero of=/dev/null bs=64M count=1"],
        name=name,
        mem_limit="16m",
    )
    found = wait_for(lambda: ea.app.manager.resolve("docker", name), 3.0, "the docker container")
    container.reload()
    pid = container.attrs["State"]["Pid"]  # exec: dd keeps the shell's pid
    assert pid > 0
    oom, kill = wait_for(lambda: all(oom_pair(ea.events, found.name)) and oom_pair(ea.events, found.name), 8.0, "oom and oomKill")
    assert kill[0].event_data.pid == pid and kill[0].event_data.process_name == "dd"
    assert oom[0].container_name == kill[0].container_name == found.name
    assert found.name.endswith(container.id)
    assert kill[0].container is not None and kill[0].container.id == container.id  # Kafka's key
    assert ea.oom.counts().get(found.name) == 1
    deletion = wait_for(lambda: ea.of(found.name, "containerDeletion"), 10.0, "the deletion event")[0]
    assert deletion.event_data.exit_code == 137
    container.reload()
    state = container.attrs["State"]
    assert state["OOMKilled"] is True and state["ExitCode"] == 137
    finished = parse_docker_time(state["FinishedAt"])
    assert finished is not None
    assert abs(kill[0].timestamp - finished) < timedelta(seconds=3), "the OOM was reported within 3 s of the kill"
    # The events reached the sinks too.
    assert {"oom", "oomKill", "containerCreation", "containerDeletion"} <= {e.event_type for e in ea.sunk if e.container_name == found.name}


def test_watcher_stop_is_prompt_on_a_quiet_log(fifo):
    watcher = OomWatcher(lambda info: None, FakeClock(), kmsg_path=fifo, poll_interval_s=0.2)
    watcher.start()
    writer = open(fifo, "wb")  # noqa: SIM115 - a writer attached: the pipe is quiet, not at its end
    try:
        time.sleep(0.3)
        started = time.monotonic()
        watcher.stop()
        assert time.monotonic() - started < 1.0
        assert not watcher.running
        assert watcher.read_errors == 0
    finally:
        writer.close()
