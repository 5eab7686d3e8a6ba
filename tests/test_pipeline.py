"""The whole pipeline on real cgroups: discovery → housekeeping → cache → jsonl sink."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.app import App
from exporter.cache import InMemoryCache
from exporter.cgroups.files import parse_flat_keyed
from exporter.cgroups.layout import detect_layout
from exporter.cgroups.procs import ProcReader
from exporter.clock import FakeClock
from exporter.config import Config
from exporter.discovery.factories import RawFactory
from exporter.housekeeping import Scheduler
from exporter.manager import Identity, Manager
from tests.infra import workloads

pytestmark = pytest.mark.root
MIB = 1024 * 1024


def wait_for(predicate: Callable[[], Any], timeout_s: float = 5.0, what: str = "the condition") -> Any:
    """The first truthy value of ``predicate``; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def app_config(tmp_path: Path, **overrides: Any) -> Config:
    data: dict[str, Any] = {
        "global_housekeeping_interval": "1h",  # discovery must come from inotify
        "docker_endpoint": "unix:///nonexistent/docker.sock",
        "listen_ip": "127.0.0.1",
        "port": 0,
        "sinks": {"jsonl": {"path": str(tmp_path / "stats.jsonl"), "buffer_duration": "100ms"}},
    }
    data.update(overrides)
    return Config.model_validate(data)


@pytest.fixture
def start_app(tmp_path: Path) -> Iterator[Callable[..., App]]:
    apps: list[App] = []

    def start(**overrides: Any) -> App:
        app = App(app_config(tmp_path, **overrides))
        app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop()


def test_new_cgroup_is_discovered_by_inotify_within_2s(start_app, make_cgroup):
    app = start_app()
    rescans = app.rescans
    cg = make_cgroup()
    created = time.monotonic()
    wait_for(lambda: app.manager.get(cg.name), 2.0, f"{cg.name} to be discovered")
    assert time.monotonic() - created < 2.0
    assert app.rescans == rescans, "the periodic rescan found it, not the watcher"
    assert not app.watcher.degraded
    # The job runs and records reach the cache and then the jsonl file.
    wait_for(lambda: app.cache.latest(cg.name), 3.0, "a first record")


def test_cpu_rate_of_a_burner_is_one_core(start_app, make_cgroup):
    app = start_app(allow_dynamic_housekeeping=False)
    cg = make_cgroup()
    workloads.start_cpu_burner(cg)
    wait_for(lambda: len(app.cache.recent(cg.name)) >= 5, 10.0, "5 records")
    records = app.cache.recent(cg.name)
    first, last = records[1], records[-1]  # the first sample may predate the burner's start
    elapsed_s = (last.timestamp - first.timestamp).total_seconds()
    assert elapsed_s >= 2.0
    rate_cores = (last.cpu.total_ns - first.cpu.total_ns) / 1e9 / elapsed_s
    assert rate_cores == pytest.approx(1.0, rel=0.15)
    # per-cpu adds up to the total (both are the kernel's exact runtime)
    assert sum(last.cpu.per_cpu_ns) == last.cpu.total_ns
    assert last.cpu.user_ns + last.cpu.system_ns == pytest.approx(last.cpu.total_ns, rel=0.05)


def test_memory_usage_and_working_set_match_the_kernel(start_app, make_cgroup):
    app = start_app()
    cg = make_cgroup()
    workloads.start_memory_hog(cg, 64)
    started = time.time()
    record = wait_for(
        lambda: (r := app.cache.latest(cg.name)) and r.timestamp.timestamp() > started + 0.1 and r,
        5.0,
        "a record taken after the allocation",
    )
    assert record.memory.usage_bytes >= 64 * MIB
    assert record.memory.rss_bytes >= 64 * MIB
    # Independent reference: the kernel's own files, read now (the allocator is idle).
    usage = int(cg.read("memory", "memory.usage_in_bytes"))
    stat = parse_flat_keyed(cg.read("memory", "memory.stat").encode())
    assert record.memory.usage_bytes == pytest.approx(usage, abs=256 * 1024)
    assert record.memory.working_set_bytes == pytest.approx(usage - stat["total_inactive_file"], abs=256 * 1024)
    assert record.memory.rss_bytes == pytest.approx(stat["total_rss"], abs=256 * 1024)
    assert record.processes.threads == 1 and record.processes.pids_current == 1


def test_removed_cgroup_loses_job_and_cache_within_2s(start_app, make_cgroup):
    app = start_app()
    cg = make_cgroup()
    wait_for(lambda: app.cache.latest(cg.name), 3.0, "a first record")
    assert cg.name in app.scheduler.job_ids()
    cg.remove()
    removed = time.monotonic()
    wait_for(
        lambda: app.manager.get(cg.name) is None and cg.name not in app.cache and cg.name not in app.scheduler.job_ids(),
        2.0,
        "job and cache entry to go",
    )
    assert time.monotonic() - removed < 2.0


def test_container_vanishing_under_its_job_is_cleaned_up(start_app, make_cgroup, caplog):
    app = start_app(allow_dynamic_housekeeping=False)
    cg = make_cgroup()
    wait_for(lambda: app.cache.latest(cg.name), 3.0, "a first record")
    app.watcher.stop()  # only the job itself can notice now
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        cg.remove()
        wait_for(lambda: app.manager.get(cg.name) is None, 3.0, "the job to find its cgroup gone")
    assert cg.name not in app.scheduler.job_ids() and cg.name not in app.cache
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert app.scheduler.stats.errors == 0


def test_records_reach_jsonl_with_gapless_seq(start_app, make_cgroup, tmp_path):
    app = start_app(allow_dynamic_housekeeping=False)
    cg = make_cgroup()
    workloads.start_cpu_burner(cg)
    wait_for(lambda: len(app.cache.recent(cg.name)) >= 3, 6.0, "3 records")
    app.stop()
    lines = [r for r in map(json.loads, (tmp_path / "stats.jsonl").read_text().splitlines()) if "event_type" not in r]
    mine = [r for r in lines if r["container"]["name"] == cg.name]
    assert len(mine) >= 3
    assert [r["seq"] for r in mine] == list(range(1, len(mine) + 1))
    assert {r["run_id"] for r in lines} == {app.identity.run_id}
    assert all(r["machine_id"] == app.machine_info.machine_id for r in lines)


def test_dynamic_housekeeping_with_injected_clock(make_cgroup):
    """An idle container's interval doubles up to the max; activity resets it."""
    clock = FakeClock()
    layout = detect_layout("/sys/fs/cgroup")
    scheduler = Scheduler(workers=1)  # not started: the test drives the job itself
    manager = Manager(
        layout=layout,
        factories=[RawFactory()],
        cache=InMemoryCache(120, 1000, clock),
        scheduler=scheduler,
        identity=Identity("m", "h", "r"),
        clock=clock,
        proc=ProcReader("/proc"),
        metrics=frozenset({"cpu", "memory", "diskIO", "process"}),
        housekeeping_interval_s=1.0,
        max_housekeeping_interval_s=8.0,
        allow_dynamic_housekeeping=True,
    )
    cg = make_cgroup()
    assert manager.create(cg.name, first_run_in_s=3600)
    job = manager.job(cg.name)
    intervals = []
    for _ in range(6):
        job()
        intervals.append(scheduler.job_interval(cg.name))
        clock.advance(intervals[-1])
    # first sample counts as a change; then idle: 2, 4, 8, capped at 8
    assert intervals == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    workloads.start_cpu_burner(cg)
    time.sleep(0.2)  # let the burner use some CPU
    job()
    assert scheduler.job_interval(cg.name) == 1.0
    records = manager.cache.recent(cg.name)
    assert [r.seq for r in records] == list(range(1, 8))
    stamps = [r.timestamp.timestamp() for r in records]
    assert [round(b - a, 6) for a, b in zip(stamps, stamps[1:], strict=False)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    manager.stop()


@pytest.fixture
def netns_pair():
    """Two network namespaces joined by a veth pair; the first end is "ce0" with 10.213.0.1."""
    import subprocess
    import uuid

    tag = uuid.uuid4().hex[:6]
    a, b = f"cetest-{tag}-a", f"cetest-{tag}-b"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", a)
    ip("netns", "add", b)
    try:
        for ns in (a, b):
            # No IPv6 autoconfiguration chatter moving the counters while we compare them.
            ip("netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        ip("-n", a, "link", "add", "ce0", "type", "veth", "peer", "name", "ce1", "netns", b)
        ip("-n", a, "addr", "add", "10.213.0.1/24", "dev", "ce0")
        ip("-n", b, "addr", "add", "10.213.0.2/24", "dev", "ce1")
        ip("-n", a, "link", "set", "ce0", "up")
        ip("-n", b, "link", "set", "ce1", "up")
        yield a, b
    finally:
        subprocess.run(["ip", "netns", "del", a], capture_output=True)
        subprocess.run(["ip", "netns", "del", b], capture_output=True)


def test_network_counters_of_a_container_with_its_own_namespace(start_app, make_cgroup, netns_pair):
    import subprocess
    import sys

    ns_a, ns_b = netns_pair
    app = start_app(allow_dynamic_housekeeping=False)
    cg = make_cgroup()
    cg.spawn(["ip", "netns", "exec", ns_a, "sleep", "3600"], stdin=subprocess.DEVNULL)
    sender = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor _ in range(200): s.sendto(b'x' * 1000, ('10.213.0.1', 9))"
    subprocess.run(["ip", "netns", "exec", ns_b, sys.executable, "-c", sender], check=True, timeout=30)
    sent = time.time()
    record = wait_for(
        lambda: (r := app.cache.latest(cg.name)) and r.timestamp.timestamp() > sent + 0.3 and r, 5.0, "a record after the traffic"
    )

    def kernel(counter: str) -> int:
        out = subprocess.run(["ip", "netns", "exec", ns_a, "cat", f"/sys/class/net/ce0/statistics/{counter}"],
                             check=True, capture_output=True, text=True)
        return int(out.stdout)

    assert [i.name for i in record.network] == ["ce0"]  # lo is left out
    iface = record.network[0]
    assert iface.rx_packets >= 200 and iface.rx_bytes >= 200 * 1000
    for field in ("rx_bytes", "rx_packets", "rx_errors", "rx_dropped", "tx_bytes", "tx_packets", "tx_errors", "tx_dropped"):
        assert getattr(iface, field) == kernel(field), field
    # A cgroup whose tasks share the host's namespace has no traffic of its own.
    other = make_cgroup()
    workloads.start_cpu_burner(other)
    assert wait_for(lambda: app.cache.latest(other.name), 3.0, "a record").network is None


def test_self_usage_is_logged_when_asked(start_app, caplog):
    with caplog.at_level(logging.INFO, logger="exporter.app"):
        start_app(log_self_usage=True, global_housekeeping_interval="1s")
        wait_for(lambda: any("self usage:" in r.getMessage() for r in caplog.records), 5.0, "a self usage line")
    line = next(r.getMessage() for r in caplog.records if "self usage:" in r.getMessage())
    assert "cpu" in line and "rss" in line and "containers" in line
