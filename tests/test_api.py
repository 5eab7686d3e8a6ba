"""The HTTP API on a real exporter: real cgroups, a real Docker container, real HTTP.

Every answer is checked against the cache it was made from and, where it makes sense, against
the kernel's files read right after.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter

import exporter
from exporter.api.context import ApiContext
from exporter.api.server import ApiServer, HealthPolicy, create_app
from exporter.app import App
from exporter.clock import Clock, FakeClock
from exporter.config import Config
from exporter.models import ContainerStats
from tests.infra import workloads
from tests.test_pipeline import app_config, wait_for

pytestmark = pytest.mark.root
MIB = 1024 * 1024
GO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")

# cAdvisor's JSON field names (info/v1, info/v2), for the shape checks.
V1_STATS_KEYS = {"timestamp", "cpu", "diskio", "memory", "network", "task_stats", "processes", "resctrl", "cpuset"}
V1_SPEC_KEYS = {
    "creation_time", "has_cpu", "cpu", "has_memory", "memory", "has_hugetlb", "has_network", "has_processes",
    "processes", "has_filesystem", "has_diskio", "has_custom_metrics",
}
V2_SPEC_KEYS = V1_SPEC_KEYS
MEMORY_KEYS = {
    "usage", "max_usage", "cache", "rss", "swap", "mapped_file", "working_set", "failcnt", "container_data", "hierarchical_data",
}
CPU_KEYS = {"usage", "cfs", "schedstat", "load_average"}
DEPRECATED_KEYS = {
    "timestamp", "has_cpu", "cpu", "has_diskio", "diskio", "has_memory", "memory", "has_hugetlb", "has_network", "network",
    "has_processes", "processes", "has_filesystem", "has_load", "load_stats", "has_custom_metrics", "resctrl",
}
PROCESS_INFO_KEYS = {
    "user", "pid", "parent_pid", "start_time", "percent_cpu", "percent_mem", "rss", "virtual_size", "status",
    "running_time", "cgroup_path", "cmd", "fd_count", "psr",
}
MACHINE_KEYS = {
    "timestamp", "num_cores", "num_physical_cores", "num_sockets", "cpu_frequency_khz", "memory_capacity", "swap_capacity",
    "memory_by_type", "hugepages", "machine_id", "system_uuid", "boot_id", "filesystems", "disk_map", "network_devices",
    "topology", "cloud_provider", "instance_type", "instance_id",
}
ATTRIBUTES_KEYS = {
    "kernel_version", "container_os_version", "docker_version", "docker_api_version", "cadvisor_version", "num_cores",
    "cpu_frequency_khz", "memory_capacity", "machine_id", "system_uuid", "hugepages", "filesystems", "disk_map",
    "network_devices", "topology", "cloud_provider", "instance_type",
}


# --------------------------------------------------------------------------------------------
# A running exporter with its API
# --------------------------------------------------------------------------------------------
@dataclass
class Api:
    app: App
    ctx: ApiContext
    server: ApiServer
    http: httpx.Client

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.get(path, **kwargs)

    def json(self, path: str, **kwargs: Any) -> Any:
        response = self.http.get(path, **kwargs)
        assert response.status_code == 200, f"{path}: {response.status_code} {response.text}"
        assert response.headers["content-type"].startswith("application/json")
        return response.json()

    def raw_get(self, raw_path: str) -> tuple[int, bytes]:
        """GET with the path sent byte for byte (httpx would resolve dot segments itself)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
        try:
            conn.putrequest("GET", raw_path, skip_accept_encoding=True)
            conn.endheaders()
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def records(self, name: str) -> list[ContainerStats]:
        return self.app.cache.recent(name)

    def wait_records(self, name: str, n: int, timeout_s: float = 10.0) -> list[ContainerStats]:
        return wait_for(lambda: (r := self.records(name)) and len(r) >= n and r, timeout_s, f"{n} records of {name}")


def api_config(tmp_path: Path, **overrides: Any) -> Config:
    defaults = {"allow_dynamic_housekeeping": False, "storage_driver": ["jsonl"], "state_dir": str(tmp_path / "state")}
    return app_config(tmp_path, **{**defaults, **overrides})


def context_of(app: App, started_at: float | None = None) -> ApiContext:
    """What exporter/app.py builds for the API."""
    return ApiContext(
        config=app.config,
        manager=app.manager,
        cache=app.cache,
        machine_info=app.machine_info,
        version_info=app.version_info,
        sinks=app.hub.workers,
        scheduler=app.scheduler,
        started_at=time.time() if started_at is None else started_at,
        watcher_degraded=lambda: app.watcher.degraded,
    )


@pytest.fixture
def start_api(tmp_path: Path) -> Iterator[Callable[..., Api]]:
    running: list[Api] = []

    def start(
        *, health: HealthPolicy | None = None, clock: Clock | None = None, routers: tuple[APIRouter, ...] = (),
        middleware: tuple[tuple[type, dict[str, Any]], ...] = (), **overrides: Any,
    ) -> Api:
        config = api_config(tmp_path, **overrides)
        app = App(config)
        app.start()
        ctx = context_of(app)
        server = ApiServer(create_app(ctx, routers, middleware, health=health, clock=clock), config.listen_ip, config.port)
        try:
            server.start()
        except BaseException:
            app.stop()
            raise
        api = Api(app, ctx, server, httpx.Client(base_url=server.url, timeout=30))
        running.append(api)
        return api

    yield start
    for api in running:
        api.http.close()
        api.server.stop()
        api.app.stop(deadline_s=1.0)


@pytest.fixture
def api(start_api: Callable[..., Api]) -> Api:
    return start_api()


def by_timestamp(records: list[ContainerStats]) -> dict[str, ContainerStats]:
    from exporter.api.cadvisor import go_time

    return {go_time(r.timestamp): r for r in records}


# --------------------------------------------------------------------------------------------
# The server itself
# --------------------------------------------------------------------------------------------
def test_server_binds_port_zero_installs_no_signal_handlers_and_stops(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    app = App(api_config(tmp_path))  # not started: the server needs none of it running
    server = ApiServer(create_app(context_of(app)), "127.0.0.1", 0)
    server.start()
    try:
        assert server.port != 0
        with httpx.Client(base_url=server.url) as client:
            assert client.get("/api/v2.0/version").json() == exporter.__version__
        assert {s: signal.getsignal(s) for s in before} == before
        assert any(t.name == "api-server" for t in threading.enumerate())
    finally:
        server.stop()
    assert not any(t.name == "api-server" for t in threading.enumerate())
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_busy_port_fails_in_start(tmp_path):
    app = App(api_config(tmp_path))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        server = ApiServer(create_app(context_of(app)), "127.0.0.1", port)
        with pytest.raises(OSError):
            server.start()


def test_routers_and_middleware_are_generic_first_middleware_outermost(start_api):
    extra = APIRouter()

    @extra.get("/extra")
    def extra_route() -> dict[str, str]:
        return {"extra": "yes"}

    class Tag:
        def __init__(self, app: Any, tag: str) -> None:
            self.app, self.tag = app, tag

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            async def tagged(message: Any) -> None:
                if message["type"] == "http.response.start":
                    # Innermost appends first: the outermost one's tag ends up last.
                    message.setdefault("headers", []).append((b"x-tag", self.tag.encode()))
                await send(message)

            await self.app(scope, receive, tagged)

    api = start_api(routers=(extra,), middleware=((Tag, {"tag": "outer"}), (Tag, {"tag": "inner"})))
    response = api.get("/extra")
    assert response.json() == {"extra": "yes"}
    assert response.headers.get_list("x-tag") == ["inner", "outer"]
    # Validation errors are 400 for the passed-in routers too, and the spec says so.
    spec = api.json("/openapi.json")
    assert "/extra" in spec["paths"]
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            assert "422" not in op["responses"], f"{method} {path} documents 422"
    assert "400" in spec["paths"]["/api/v2.0/stats/{name}"]["get"]["responses"]


# --------------------------------------------------------------------------------------------
# /healthz
# --------------------------------------------------------------------------------------------
def test_healthz_healthy(api):
    api.wait_records("/", 1)
    response = api.get("/healthz")
    assert response.status_code == 200, response.text
    health = response.json()
    assert health["status"] == "ok" and health["problems"] == []
    collection = health["collection"]
    assert collection["containers"] == len(api.app.manager.names())
    assert collection["watcher_degraded"] is False
    assert 0 <= collection["root_record_age_s"] <= collection["stale_after_s"] == 3.0
    assert set(collection["scheduler"]) == {"skipped_overlap", "missed", "errors"}
    [sink] = health["sinks"]
    assert sink["name"] == "jsonl" and sink["status"] == "ok" and sink["degraded"] is False
    assert {"queue_depth", "spool_pending", "dropped", "last_success_age_s", "last_error"} <= set(sink)
    wait_for(lambda: api.get("/healthz").json()["sinks"][0]["last_success_age_s"] is not None, 5.0, "a first jsonl write")


def test_healthz_unhealthy_when_root_record_is_stale(start_api):
    clock = FakeClock(start=time.time())
    api = start_api(clock=clock)
    api.wait_records("/", 1)
    clock.advance(time.time() - clock.time())  # now, the newest record is fresh
    assert api.get("/healthz").status_code == 200
    clock.advance(30)  # as if housekeeping had stalled for 30 s
    response = api.get("/healthz")
    assert response.status_code == 503
    health = response.json()
    assert health["status"] == "unhealthy" and health["collection"]["status"] == "unhealthy"
    assert health["collection"]["root_record_age_s"] > 30
    assert any("root container's newest record" in p for p in health["problems"])


def test_healthz_unhealthy_when_a_sink_keeps_failing(start_api):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    api = start_api(
        health=HealthPolicy(sink_failing_s=2.0),
        storage_driver=["jsonl", "influxdb"],
        sinks={
            "jsonl": {"path": "/dev/null", "buffer_duration": "100ms"},
            "influxdb": {"api": "v1", "url": f"http://127.0.0.1:{closed_port}", "timeout": "200ms",
                         "buffer_duration": "100ms", "shutdown_timeout": "0s"},
        },
    )
    influx = next(w for w in api.app.hub.workers if w.name == "influxdb")
    wait_for(lambda: influx.degraded, 10.0, "the influxdb sink to fail")
    health = api.get("/healthz").json()
    sinks = {s["name"]: s for s in health["sinks"]}
    if health["status"] == "degraded":  # within sink_failing_s: reported, still 200
        assert sinks["influxdb"]["status"] == "degraded"
    assert sinks["influxdb"]["degraded"] is True and "unreachable" in sinks["influxdb"]["last_error"]
    assert sinks["jsonl"]["status"] == "ok"
    response = wait_for(lambda: (r := api.get("/healthz")).status_code == 503 and r, 10.0, "503 from /healthz")
    health = response.json()
    sinks = {s["name"]: s for s in health["sinks"]}
    assert sinks["influxdb"]["status"] == "unhealthy" and sinks["influxdb"]["not_delivering_for_s"] > 2.0
    assert sinks["influxdb"]["last_success_age_s"] is None
    assert health["collection"]["status"] == "ok"
    assert [p for p in health["problems"] if p.startswith("sink influxdb")]


# --------------------------------------------------------------------------------------------
# cAdvisor's v2.0 API
# --------------------------------------------------------------------------------------------
def test_v2_stats_memory_equals_the_cache_and_the_kernel(api, make_cgroup):
    cg = make_cgroup()
    workloads.start_memory_hog(cg, 48)
    allocated = time.time()
    wait_for(lambda: (r := api.app.cache.latest(cg.name)) and r.timestamp.timestamp() > allocated + 0.1, 5.0, "a record after the allocation")
    answer = api.json(f"/api/v2.0/stats{cg.name}", params={"count": 1})
    usage_now = int(cg.read("memory", "memory.usage_in_bytes"))
    assert list(answer) == [cg.name]
    [stat] = answer[cg.name]
    assert DEPRECATED_KEYS <= set(stat)
    assert GO_TIME.match(stat["timestamp"])
    record = by_timestamp(api.records(cg.name))[stat["timestamp"]]
    memory = stat["memory"]
    assert set(memory) == MEMORY_KEYS
    assert memory["usage"] == record.memory.usage_bytes >= 48 * MIB
    assert memory["working_set"] == record.memory.working_set_bytes
    assert memory["rss"] == record.memory.rss_bytes and memory["cache"] == record.memory.cache_bytes
    assert memory["container_data"]["pgfault"] == record.memory.pgfault
    assert memory["usage"] == pytest.approx(usage_now, abs=512 * 1024)
    assert stat["has_cpu"] and set(stat["cpu"]) == CPU_KEYS
    assert stat["cpu"]["usage"]["total"] == record.cpu.total_ns
    assert stat["cpu"]["usage"]["per_cpu_usage"] == record.cpu.per_cpu_ns
    assert stat["has_processes"] and stat["processes"]["threads_current"] == record.processes.pids_current == 1
    assert stat["has_network"] is False  # a cgroup in the host's network namespace has no traffic of its own


def test_v2_stats_count_and_recursive(api, make_cgroup):
    parent = make_cgroup()
    child = parent.create_child("leaf")
    api.wait_records(parent.name, 4)
    api.wait_records(child.name, 4)

    answer = api.json(f"/api/v2.0/stats{parent.name}", params={"count": 3, "recursive": "true"})
    assert set(answer) == {parent.name, child.name}
    for name, stats in answer.items():
        cached = [s for s in by_timestamp(api.records(name))]
        got = [s["timestamp"] for s in stats]
        assert len(got) == 3 and got == sorted(got)
        assert set(got) <= set(cached)
        # The newest three at the time of the request: no newer record is left out before them.
        assert cached.index(got[0]) + 2 == cached.index(got[-1])
        # cpu_inst: none for the first sample, the rate between samples for the others.
        assert "cpu_inst" not in stats[0] and "cpu_inst" in stats[1]
        a, b = by_timestamp(api.records(name))[got[0]], by_timestamp(api.records(name))[got[1]]
        dt_ns = (b.timestamp - a.timestamp).total_seconds() * 1e9
        assert stats[1]["cpu_inst"]["usage"]["total"] == int((b.cpu.total_ns - a.cpu.total_ns) / dt_ns * 1e9)

    assert set(api.json(f"/api/v2.0/stats{parent.name}", params={"count": 3})) == {parent.name}
    assert api.json(f"/api/v2.0/stats{parent.name}", params={"count": 0}) == {parent.name: []}
    before = len(api.records(parent.name))
    default = api.json(f"/api/v2.0/stats{parent.name}")[parent.name]
    assert min(64, before) <= len(default) <= min(64, len(api.records(parent.name)))  # a record may land meanwhile
    everything = api.json("/api/v2.0/stats/", params={"recursive": "true", "count": 1})
    assert {"/", parent.name, child.name} <= set(everything) <= api.app.manager.names()


def test_v2_spec_reports_the_limits_set_on_the_cgroup(start_api, make_cgroup):
    cg = make_cgroup()
    cg.write("memory", "memory.limit_in_bytes", str(64 * MIB))
    cg.write("cpu", "cpu.cfs_period_us", "100000")
    cg.write("cpu", "cpu.cfs_quota_us", "50000")
    cg.write("cpu", "cpu.shares", "512")
    api = start_api()  # discovers the cgroup with its limits already set
    wait_for(lambda: api.app.manager.get(cg.name), 5.0, f"{cg.name} to be monitored")
    spec = api.json(f"/api/v2.0/spec{cg.name}")[cg.name]
    assert V2_SPEC_KEYS <= set(spec)
    assert spec["memory"]["limit"] == 64 * MIB
    assert spec["cpu"] == {"limit": 512, "max_limit": 500, "mask": cg.read("cpuset", "cpuset.cpus").strip(), "quota": 50000, "period": 100000}
    assert spec["has_cpu"] and spec["has_memory"] and spec["has_diskio"] and spec["has_processes"]
    assert GO_TIME.match(spec["creation_time"])
    created = datetime.fromtimestamp(min(os.stat(d).st_ctime for d in cg.dirs), UTC)
    assert abs(datetime.fromisoformat(spec["creation_time"]) - created) < timedelta(seconds=1)
    # v1's spec is the same translation
    v1 = api.json(f"/api/v1.3/containers{cg.name}")["spec"]
    assert v1["memory"] == spec["memory"] and v1["cpu"] == spec["cpu"]
    assert V1_SPEC_KEYS <= set(v1) and "aliases" not in v1


def test_v2_summary_serves_each_containers_statistics(api, make_cgroup):
    cg = make_cgroup()
    workloads.start_cpu_burner(cg)
    container = wait_for(lambda: api.app.manager.get(cg.name), 5.0, "the cgroup to be monitored")
    wait_for(lambda: len(api.app.cache.recent(cg.name)) >= 3, 10.0, "three samples")
    answer = api.json(f"/api/v2.0/summary{cg.name}")
    derived = answer[cg.name]
    expected = container.summary.derived()
    assert set(derived) == {"timestamp", "latest_usage", "minute_usage", "hour_usage", "day_usage"}
    minute = derived["minute_usage"]
    assert minute["cpu"]["present"] is True and minute["memory"]["present"] is True
    assert 0 < minute["percent_complete"] <= 100
    # a CPU burner: about one core, in millicores
    assert 500 <= minute["cpu"]["mean"] <= 1200
    assert minute["cpu"]["max"] >= minute["cpu"]["ninetyfive"] >= minute["cpu"]["fifty"]
    assert derived["hour_usage"]["percent_complete"] <= minute["percent_complete"]
    assert derived["latest_usage"]["memory"] == expected.latest_usage.memory or derived["latest_usage"]["memory"] > 0
    # recursive from the cgroup: just it (it has no children)
    assert set(api.json(f"/api/v2.0/summary{cg.name}", params={"recursive": "true"})) == {cg.name}
    assert api.get("/api/v2.0/summary/no-such-container").status_code == 404


def test_v2_ps_lists_the_processes_of_a_cgroup(api, make_cgroup):
    cg = make_cgroup()
    proc = cg.spawn(["sleep", "300"])
    wait_for(lambda: api.app.manager.get(cg.name), 5.0, "the cgroup to be monitored")
    processes = api.json(f"/api/v2.0/ps{cg.name}")
    assert [p["pid"] for p in processes] == [proc.pid]
    [p] = processes
    assert set(p) == PROCESS_INFO_KEYS
    assert p["cmd"] == "sleep" and p["parent_pid"] == os.getpid() and p["user"] == "root"
    assert p["cgroup_path"] == ""  # cAdvisor fills it only for the root container
    stat = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    assert p["rss"] == int(stat[21]) * os.sysconf("SC_PAGE_SIZE")
    assert p["virtual_size"] == int(stat[20])
    assert p["fd_count"] == len(os.listdir(f"/proc/{proc.pid}/fd"))
    assert p["status"][0] in "SR" and re.match(r"^\d\d:\d\d(:\d\d)?$|^[A-Z][a-z]{2}\d\d$|^\d{4}$", p["start_time"])
    assert p["running_time"] == "00:00:00"
    # The root lists every process, with its cgroup path.
    everything = {q["pid"]: q for q in api.json("/api/v2.0/ps/")}
    assert everything[proc.pid]["cgroup_path"] == cg.name
    assert os.getpid() in everything and 1 in everything


def test_v2_machine_attributes_version_storage(api):
    machine = api.json("/api/v2.0/machine")
    assert MACHINE_KEYS <= set(machine) and machine == api.json("/api/v1.3/machine")
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert machine["memory_capacity"] == int(meminfo["MemTotal"].split()[0]) * 1024
    assert machine["num_cores"] == os.cpu_count()
    assert machine["machine_id"] == api.app.machine_info.machine_id
    assert {f["device"] for f in machine["filesystems"]} == {f.device for f in api.app.machine_info.filesystems}
    attributes = api.json("/api/v2.0/attributes")
    assert set(attributes) == ATTRIBUTES_KEYS
    assert attributes["kernel_version"] == os.uname().release and attributes["num_cores"] == os.cpu_count()
    assert api.json("/api/v2.0/version") == exporter.__version__
    api.wait_records("/", 1)
    storage = api.json("/api/v2.0/storage")
    root = api.app.cache.latest("/")
    assert {f["device"]: f["capacity"] for f in storage} == {f.device: f.capacity_bytes for f in root.filesystem}
    assert api.get("/api/v2.0/storage", params={"label": "root"}).status_code == 404


# --------------------------------------------------------------------------------------------
# v2.1
# --------------------------------------------------------------------------------------------
def test_v21_stats_and_machinestats(api, make_cgroup):
    cg = make_cgroup()
    api.wait_records(cg.name, 3)
    answer = api.json(f"/api/v2.1/stats{cg.name}", params={"count": 2})
    assert list(answer) == [cg.name]
    info = answer[cg.name]
    assert set(info) == {"spec", "stats"} and V2_SPEC_KEYS <= set(info["spec"])
    first, second = info["stats"]
    cached = by_timestamp(api.records(cg.name))
    assert cached[second["timestamp"]].memory.usage_bytes == second["memory"]["usage"]
    assert "cpu_inst" not in first and second["cpu_inst"]["usage"]["total"] >= 0
    assert "network" not in second and "load_stats" not in second  # only sections that hold data
    # The root is the machine: never in v2.1 stats, always in machinestats.
    assert "/" not in api.json("/api/v2.1/stats/", params={"recursive": "true", "count": 1})
    api.wait_records("/", 2)
    machine = api.json("/api/v2.1/machinestats", params={"count": 2})
    root = by_timestamp(api.records("/"))
    stamps = list(root)
    assert len(machine) == 2 and stamps.index(machine[0]["timestamp"]) + 1 == stamps.index(machine[1]["timestamp"])
    assert machine[-1]["memory"]["usage"] == root[machine[-1]["timestamp"]].memory.usage_bytes
    assert machine[-1]["network"]["interfaces"] and "filesystem" in machine[-1]


# --------------------------------------------------------------------------------------------
# v1.3
# --------------------------------------------------------------------------------------------
def test_v1_containers_get_and_post(api, make_cgroup):
    parent = make_cgroup()
    child = parent.create_child("leaf")
    records = api.wait_records(parent.name, 4)
    api.wait_records(child.name, 1)
    before = len(api.records(parent.name))
    info = api.json(f"/api/v1.3/containers{parent.name}")
    assert info["name"] == parent.name
    assert info["subcontainers"] == [{"name": child.name}]
    assert min(60, before) <= len(info["stats"]) <= min(60, len(api.records(parent.name)))
    stat = info["stats"][-1]
    assert V1_STATS_KEYS <= set(stat)
    assert set(stat["network"]) >= {"name", "rx_bytes", "tx_bytes", "tcp", "tcp6", "udp", "udp6", "tcp_advanced"}
    cached = by_timestamp(api.records(parent.name))
    # cAdvisor reports what was not read as 0 (a first sample can come before every hierarchy has the cgroup)
    assert stat["cpu"]["usage"]["total"] == (cached[stat["timestamp"]].cpu.total_ns or 0)

    posted = api.http.post(f"/api/v1.3/containers{parent.name}", json={"num_stats": 2}).json()
    assert len(posted["stats"]) == 2
    # A time window: only the records inside it, as many as num_stats allows.
    window = {"num_stats": -1, "start": records[1].timestamp.isoformat(), "end": records[2].timestamp.isoformat()}
    posted = api.http.post(f"/api/v1.3/containers{parent.name}", json=window).json()
    assert [s["timestamp"] for s in posted["stats"]] == list(by_timestamp(records[1:3]))
    # Go clients send Go's zero time for "no bound".
    zero = {"num_stats": 3, "start": "0001-01-01T00:00:00Z", "end": "0001-01-01T00:00:00Z"}
    assert len(api.http.post(f"/api/v1.3/containers{parent.name}", json=zero).json()["stats"]) == 3
    # A GET with a body is honoured too; the root container is "/".
    assert len(api.http.request("GET", f"/api/v1.3/containers{parent.name}", json={"num_stats": 1}).json()["stats"]) == 1
    root = api.json("/api/v1.3/containers/")
    assert root["name"] == "/" and {"name": parent.name} in root["subcontainers"]
    assert api.http.post("/api/v1.3/containers", json={"num_stats": 0}).json().get("stats") is None


def test_v1_subcontainers(api, make_cgroup):
    parent = make_cgroup()
    child = parent.create_child("leaf")
    api.wait_records(parent.name, 1)
    api.wait_records(child.name, 1)
    infos = api.http.post(f"/api/v1.3/subcontainers{parent.name}", json={"num_stats": 1}).json()
    assert [i["name"] for i in infos] == [parent.name, child.name]
    assert [len(i["stats"]) for i in infos] == [1, 1]
    assert infos[0]["subcontainers"] == [{"name": child.name}] and "subcontainers" not in infos[1]


# --------------------------------------------------------------------------------------------
# Errors and names
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [
        "/api/v1.3/containers/nope", "/api/v1.3/subcontainers/nope", "/api/v1.3/docker/nope",
        "/api/v2.0/stats/nope", "/api/v2.0/spec/nope", "/api/v2.0/summary/nope", "/api/v2.0/ps/nope",
        "/api/v2.1/stats/nope", "/api/v2.0/stats/nope?type=docker", "/api/v2.0/stats/nope?recursive=true",
    ],
)
def test_unknown_container_is_404_with_a_message(api, path):
    response = api.get(path)
    assert response.status_code == 404
    assert "nope" in response.json()["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/v2.0/stats/?type=dockerid", "/api/v2.0/stats/?count=abc", "/api/v2.0/stats/?count=-1",
        "/api/v2.0/stats/?recursive=maybe", "/api/v2.1/machinestats?count=1.5", "/api/v2.0/spec/?type=",
        "/api/v2.0/stats/docker?type=docker&recursive=true", "/api/v2.0/stats/?count=4294967296",
    ],
)
def test_bad_parameters_are_400(api, path):
    response = api.get(path)
    assert response.status_code == 400, response.text
    assert response.json()["detail"]


def test_bad_container_info_requests_are_400(api):
    for body in (b"{not json", b'{"num_stats": -2}', b'{"num_stats": "many"}', b'{"start": "yesterday"}',
                 b'{"start": "2030-01-01T00:00:00Z", "end": "2020-01-01T00:00:00Z"}'):
        for method in ("POST", "GET"):
            response = api.http.request(method, "/api/v1.3/containers/", content=body, headers={"content-type": "application/json"})
            assert response.status_code == 400, (method, body, response.text)


def test_path_traversal_stays_inside_the_container_tree(api, make_cgroup):
    cg = make_cgroup()
    api.wait_records(cg.name, 1)
    leaf = cg.name.strip("/")

    def stats_keys(raw_path: str) -> tuple[int, Any]:
        status, body = api.raw_get(raw_path)
        import json

        return status, json.loads(body)

    # Dot segments and repeated slashes resolve lexically, never above "/".
    assert stats_keys("/api/v2.0/stats/../../../../etc?count=1") == (404, {"detail": "unknown container '/etc'"})
    assert stats_keys("/api/v2.0/stats/%2e%2e/%2e%2e/%2e%2e/etc/passwd?count=1")[0] == 404
    status, body = stats_keys("/api/v2.0/stats/..%2f..%2f..%2f?count=1")
    assert status == 200 and list(body) == ["/"]
    status, body = stats_keys(f"/api/v2.0/stats//{leaf}//./?count=1")
    assert status == 200 and list(body) == [cg.name]
    status, body = stats_keys(f"/api/v2.0/stats/{leaf}/../{leaf}?count=1")
    assert status == 200 and list(body) == [cg.name]
    status, body = stats_keys(f"/api/v1.3/containers/{leaf}/../../../..")
    assert status == 200 and body["name"] == "/"
    # Real directories that are not containers are not found: names are registry keys only.
    for raw in ("/api/v2.0/stats/sys/fs/cgroup", "/api/v2.0/ps/..%2f..%2fproc%2f1", "/api/v2.0/spec/memory", "/api/v1.3/containers/%2e%2e%2fetc"):
        assert api.raw_get(raw)[0] == 404, raw
    assert api.raw_get("/api/v1.3/docker/..%2f..%2fetc")[0] == 404


# --------------------------------------------------------------------------------------------
# Docker
# --------------------------------------------------------------------------------------------
@pytest.mark.docker
def test_docker_endpoints_by_name_and_id(start_api, docker_engine, busybox_image, make_container):
    api = start_api(docker_endpoint=docker_engine.endpoint, docker_env_metadata_whitelist=["GREETING"])
    name = f"ce-test-{uuid.uuid4().hex[:8]}"
    container = make_container(busybox_image, ["sleep", "300"], name=name, labels={"app": "api-test"},
                               environment={"GREETING": "hi"}, mem_limit="32m")
    found = wait_for(lambda: api.app.manager.resolve("docker", name), 5.0, f"docker container {name}")
    api.wait_records(found.name, 2)

    everything = api.json("/api/v1.3/docker/")
    assert found.name in everything
    info = everything[found.name]
    assert info["namespace"] == "docker" and info["aliases"] == [name, container.id] and info["id"] == container.id
    assert info["spec"]["labels"]["app"] == "api-test" and info["spec"]["envs"] == {"GREETING": "hi"}
    assert info["spec"]["image"] == busybox_image and info["spec"]["memory"]["limit"] == 32 * MIB
    for alias in (name, container.id, container.id[:12]):
        one = api.json(f"/api/v1.3/docker/{alias}")
        assert list(one) == [found.name], alias
        posted = api.http.post(f"/api/v1.3/docker/{alias}", json={"num_stats": 1}).json()
        assert len(posted[found.name]["stats"]) == 1

    stats = api.json(f"/api/v2.0/stats/{name}", params={"type": "docker", "count": 1})
    assert list(stats) == [found.name]
    cached = by_timestamp(api.records(found.name))
    [stat] = stats[found.name]
    assert stat["memory"]["usage"] == cached[stat["timestamp"]].memory.usage_bytes
    spec = api.json(f"/api/v2.0/spec/{container.id}", params={"type": "docker"})[found.name]
    assert spec["aliases"] == [name, container.id] and spec["namespace"] == "docker"
    # "/docker/<name>" as a cgroup name finds the container wherever its cgroup is.
    assert list(api.json(f"/api/v2.0/stats/docker/{name}", params={"count": 1})) == [found.name]
    all_docker = api.json("/api/v2.0/stats/", params={"type": "docker", "recursive": "true", "count": 1})
    assert found.name in all_docker and all(api.app.manager.get(n).ref.namespace == "docker" for n in all_docker)
    v21 = api.json(f"/api/v2.1/stats/{name}", params={"type": "docker", "count": 1})
    assert v21[found.name]["spec"]["labels"]["app"] == "api-test"
    # ps: the container's process, as Docker sees it
    container.reload()
    processes = api.json(f"/api/v2.0/ps/{name}", params={"type": "docker"})
    assert [p["pid"] for p in processes] == [container.attrs["State"]["Pid"]] and processes[0]["cmd"] == "sleep"
    assert api.get("/api/v1.3/docker/no-such-container").status_code == 404


# --------------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------------
def test_profiling_endpoints_are_404_when_disabled(api):
    for path in ("/debug/", "/debug/threads", "/debug/memory", "/debug/profile?seconds=1"):
        assert api.get(path).status_code == 404, path
    assert not any(p.startswith("/debug") for p in api.json("/openapi.json")["paths"])


def test_profiling_endpoints(start_api):
    api = start_api(enable_profiling=True)
    assert "/debug/profile" in api.get("/debug/").text
    threads = api.get("/debug/threads")
    assert threads.status_code == 200 and threads.headers["content-type"].startswith("text/plain")
    assert 'Thread "api-server"' in threads.text and 'Thread "housekeeping-0"' in threads.text
    assert 'File "' in threads.text

    try:
        first = api.get("/debug/memory", params={"top": 5}).text
        assert "started it now" in first
        blobs = [bytearray(100_000) for _ in range(50)]  # noqa: F841 - 5 MB the next snapshot must show
        second = api.get("/debug/memory", params={"top": 5}).text
        assert "#1:" in second and "#6:" not in second and "MiB traced" in second
    finally:
        assert api.get("/debug/memory/stop").text == "tracemalloc stopped\n"

    # A thread of ours busy in Python during the profile: the sampler must see it.
    stop = time.monotonic() + 1.5  # outlives the 1 s profile

    def spin() -> None:
        while time.monotonic() < stop:
            sum(range(1000))

    spinner = threading.Thread(target=spin, name="spinner")
    spinner.start()
    profile = api.get("/debug/profile", params={"seconds": 1, "hz": 100})
    spinner.join()
    assert profile.status_code == 200
    samples = int(profile.headers["x-profile-samples"])
    assert 30 <= samples <= 105  # 100 Hz for 1 s; a busy GIL may delay some
    lines = profile.text.splitlines()
    assert lines and all(re.match(r"^\S.* \d+$", line) for line in lines)
    spinner_samples = sum(int(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("spinner;") and "spin (" in line)
    assert spinner_samples >= samples // 2  # the sampler sees other threads, not only itself
    assert any(line.startswith("housekeeping-0;") for line in lines)
    assert not any(line.startswith("debug-profiler;") for line in lines)
    for bad in ({"seconds": 61}, {"seconds": 0}, {"hz": 5000, "seconds": 1}):
        assert api.get("/debug/profile", params=bad).status_code == 400
