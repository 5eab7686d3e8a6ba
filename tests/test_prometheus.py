"""Prometheus metrics: a live exporter on real cgroups (and a real Docker container), the router
served by a real uvicorn server, scraped over HTTP and parsed with prometheus_client's parsers."""

from __future__ import annotations

import gzip
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client import REGISTRY, exposition
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from prometheus_client.samples import Sample

from exporter.api.context import ApiContext
from exporter.api.prometheus import (
    CONTENT_TYPE_OPENMETRICS,
    CONTENT_TYPE_TEXT,
    ContainerCollector,
    make_registry,
    render,
    router,
)
from exporter.app import App
from exporter.models import CustomMetricSpec, CustomMetricValue, DiskIoDevice
from tests.infra import workloads
from tests.test_api import context_of
from tests.test_pipeline import app_config, wait_for

pytestmark = pytest.mark.root
MIB = 1024 * 1024
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)

# Family (as exposed in the text format) → (type, the metric's own labels).
CONTAINER_FAMILIES = {
    "container_last_seen": ("gauge", set()),
    "container_cpu_user_seconds_total": ("counter", set()),
    "container_cpu_system_seconds_total": ("counter", set()),
    "container_cpu_usage_seconds_total": ("counter", {"cpu"}),
    "container_cpu_cfs_periods_total": ("counter", set()),
    "container_cpu_cfs_throttled_periods_total": ("counter", set()),
    "container_cpu_cfs_throttled_seconds_total": ("counter", set()),
    "container_cpu_load_average_10s": ("gauge", set()),
    "container_memory_cache": ("gauge", set()),
    "container_memory_rss": ("gauge", set()),
    "container_memory_mapped_file": ("gauge", set()),
    "container_memory_swap": ("gauge", set()),
    "container_memory_failcnt": ("counter", set()),
    "container_memory_usage_bytes": ("gauge", set()),
    "container_memory_max_usage_bytes": ("gauge", set()),
    "container_memory_working_set_bytes": ("gauge", set()),
    "container_memory_failures_total": ("counter", {"failure_type", "scope"}),
    "container_oom_events_total": ("counter", set()),
    "container_fs_inodes_free": ("gauge", {"device"}),
    "container_fs_inodes_total": ("gauge", {"device"}),
    "container_fs_limit_bytes": ("gauge", {"device"}),
    "container_fs_usage_bytes": ("gauge", {"device"}),
    "container_network_receive_bytes_total": ("counter", {"interface"}),
    "container_network_receive_packets_total": ("counter", {"interface"}),
    "container_network_receive_packets_dropped_total": ("counter", {"interface"}),
    "container_network_receive_errors_total": ("counter", {"interface"}),
    "container_network_transmit_bytes_total": ("counter", {"interface"}),
    "container_network_transmit_packets_total": ("counter", {"interface"}),
    "container_network_transmit_packets_dropped_total": ("counter", {"interface"}),
    "container_network_transmit_errors_total": ("counter", {"interface"}),
    "container_processes": ("gauge", set()),
    "container_file_descriptors": ("gauge", set()),
    "container_threads": ("gauge", set()),
    "container_threads_max": ("gauge", set()),
    "container_pressure_cpu_waiting_seconds_total": ("counter", set()),
    "container_pressure_cpu_stalled_seconds_total": ("counter", set()),
    "container_pressure_memory_waiting_seconds_total": ("counter", set()),
    "container_pressure_memory_stalled_seconds_total": ("counter", set()),
    "container_pressure_io_waiting_seconds_total": ("counter", set()),
    "container_pressure_io_stalled_seconds_total": ("counter", set()),
    "container_start_time_seconds": ("gauge", set()),
    "container_spec_cpu_period": ("gauge", set()),
    "container_spec_cpu_quota": ("gauge", set()),
    "container_spec_cpu_shares": ("gauge", set()),
    "container_spec_memory_limit_bytes": ("gauge", set()),
    "container_spec_memory_reservation_limit_bytes": ("gauge", set()),
    "container_spec_memory_swap_limit_bytes": ("gauge", set()),
}
MACHINE_FAMILIES = ["machine_cpu_cores", "machine_cpu_physical_cores", "machine_cpu_sockets", "machine_memory_bytes", "machine_swap_bytes"]


# -- a page, parsed ---------------------------------------------------------------------------------
@dataclass
class Page:
    content_type: str
    text: str
    openmetrics: bool = False
    types: dict[str, str] = field(default_factory=dict)  # sample name → family type
    docs: dict[str, str] = field(default_factory=dict)  # sample name → help
    by_name: dict[str, list[Sample]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        families = parse_openmetrics(self.text) if self.openmetrics else parse_text(self.text)
        for family in families:
            for sample in family.samples:
                self.types[sample.name] = family.type
                self.docs[sample.name] = family.documentation
                self.by_name.setdefault(sample.name, []).append(sample)

    def samples(self, name: str, **labels: str) -> list[Sample]:
        return [s for s in self.by_name.get(name, []) if all(s.labels.get(k, "") == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        found = self.samples(name, **labels)
        assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
        return found[0].value

    def has_family(self, text_name: str) -> bool:
        return f"# TYPE {text_name} " in self.text


def parsed(name: str, typ: str) -> str:
    """The sample name prometheus_client's parsers give: counters always end in _total."""
    return name if typ != "counter" or name.endswith("_total") else name + "_total"


def fetch(url: str, accept: str | None = None, accept_encoding: str | None = None) -> tuple[Any, bytes]:
    request = urllib.request.Request(url)
    if accept is not None:
        request.add_header("Accept", accept)
    if accept_encoding is not None:
        request.add_header("Accept-Encoding", accept_encoding)
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        return response.headers, response.read()


def scrape(url: str, accept: str | None = None) -> Page:
    headers, body = fetch(url, accept)
    content_type = headers["Content-Type"]
    return Page(content_type, body.decode(), openmetrics=content_type.startswith("application/openmetrics-text"))


# -- a live exporter behind a real HTTP server -----------------------------------------------------
@dataclass
class Live:
    app: App
    ctx: ApiContext
    url: str

    def stable_scrape(self, *names: str, accept: str | None = None) -> tuple[Page, dict[str, Any]]:
        """A page scraped while none of ``names`` got a new record, and those records."""
        for _ in range(20):
            before = {n: self.app.cache.latest(n) for n in names}
            page = scrape(self.url, accept)
            after = {n: self.app.cache.latest(n) for n in names}
            if all(before[n] is after[n] for n in names):
                return page, before
        raise AssertionError(f"records of {names} changed during every scrape")


class MetricsServer:
    """uvicorn on a random port, in a thread, serving a FastAPI app with our router."""

    def __init__(self, ctx: ApiContext) -> None:
        api = FastAPI()
        api.include_router(router(ctx))
        config = uvicorn.Config(api, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.endpoint = ctx.config.prometheus_endpoint

    def start(self) -> str:
        self.thread.start()
        wait_for(lambda: self.server.started, 10.0, "uvicorn to start")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}{self.endpoint}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Callable[..., Live]]:
    started: list[tuple[App, MetricsServer]] = []

    def start(**overrides: Any) -> Live:
        app = App(app_config(tmp_path, **{"allow_dynamic_housekeeping": False, **overrides}))
        app.start()
        ctx = context_of(app)
        server = MetricsServer(ctx)
        started.append((app, server))
        return Live(app, ctx, server.start())

    yield start
    for app, server in started:
        server.stop()
        app.stop()


def record_with(app: App, name: str, predicate: Callable[[Any], bool], timeout_s: float, what: str) -> Any:
    return wait_for(lambda: (r := app.cache.latest(name)) is not None and predicate(r) and r, timeout_s, what)


def start_oom_then_burn(make_container: Callable[..., Any], image: str, name: str, **kwargs: Any) -> Any:
    """A 64 MiB container whose first process is OOM-killed, then a CPU burner at half a core."""
    return make_container(
        image,
        ["sh", "-c", "tail /dev/zero; exec yes > /dev/null"],  # tail keeps the endless "line" in memory
        name=name,
        mem_limit="64m",
        nano_cpus=500_000_000,
        **kwargs,
    )


# -- tests ------------------------------------------------------------------------------------------
@pytest.mark.docker
def test_docker_container_series_equal_the_cached_record(live, docker_engine, busybox_image, make_container):
    lv = live(docker_endpoint=docker_engine.endpoint, enable_load_reader=True, docker_env_metadata_whitelist=["GREETING"])
    name = f"ce-prom-{uuid.uuid4().hex[:8]}"
    start_oom_then_burn(
        make_container, busybox_image, name,
        labels={"app": "web", "com.example.team": "metrics"}, environment={"GREETING": "hello"},
    )
    found = wait_for(lambda: lv.app.manager.resolve("docker", name), 5.0, f"docker container {name}")
    cid = found.name
    record_with(
        lv.app, cid,
        lambda r: r.memory.events.oom_kill >= 1 and (r.cpu.throttled_periods or 0) > 0 and r.cpu.load_average_milli is not None,
        20.0, "an OOM kill and throttling in the records",
    )
    record_with(lv.app, "/", lambda r: True, 5.0, "a record of the root container")
    t0 = time.time()
    page, records = lv.stable_scrape(cid, "/")
    t1 = time.time()
    rec, root = records[cid], records["/"]
    spec = found.spec
    assert page.content_type == CONTENT_TYPE_TEXT

    # Names, types, cAdvisor's exact text names and help texts.
    for family, (typ, _) in CONTAINER_FAMILIES.items():
        assert page.has_family(family), f"{family} missing"
        assert page.types[parsed(family, typ)] == typ, family
    # A counter without _total, exactly as cAdvisor writes it (the parser adds _total).
    assert "# TYPE container_memory_failcnt counter\ncontainer_memory_failcnt{" in page.text
    assert page.docs["container_memory_working_set_bytes"] == "Current working set in bytes."
    assert page.docs["container_cpu_usage_seconds_total"] == "Cumulative cpu time consumed in seconds."

    # One label set per family: the union of every container's labels, empty where a container has none.
    base_keys: set[str] | None = None
    for family, (typ, own) in CONTAINER_FAMILIES.items():
        keys = {frozenset(s.labels) for s in page.by_name[parsed(family, typ)]}
        assert len(keys) == 1, f"{family} has several label sets: {keys}"
        family_base = set(next(iter(keys))) - own
        base_keys = family_base if base_keys is None else base_keys
        assert family_base == base_keys, family
    assert base_keys is not None
    assert {"id", "name", "image", "container_label_app", "container_label_com_example_team", "container_env_GREETING"} <= base_keys
    mine = dict(id=cid)
    labels = page.samples("container_memory_usage_bytes", **mine)[0].labels
    assert labels["name"] == name and labels["image"] == busybox_image
    assert labels["container_label_app"] == "web" and labels["container_label_com_example_team"] == "metrics"
    assert labels["container_env_GREETING"] == "hello"
    root_labels = page.samples("container_memory_usage_bytes", id="/")[0].labels
    assert root_labels.get("container_label_app", "") == "" and root_labels.get("name", "") == ""

    # CPU: exact floats (repr round-trips), one series per CPU the container ran on.
    cpu = rec.cpu
    per_cpu = {s.labels["cpu"]: s.value for s in page.samples("container_cpu_usage_seconds_total", **mine)}
    assert per_cpu == {f"cpu{i:02d}": ns / 1e9 for i, ns in enumerate(cpu.per_cpu_ns) if ns}
    assert sum(per_cpu.values()) == pytest.approx(cpu.total_ns / 1e9, rel=1e-12)
    assert page.value("container_cpu_user_seconds_total", **mine) == cpu.user_ns / 1e9
    assert page.value("container_cpu_system_seconds_total", **mine) == cpu.system_ns / 1e9
    assert page.value("container_cpu_cfs_periods_total", **mine) == cpu.periods > 0
    assert page.value("container_cpu_cfs_throttled_periods_total", **mine) == cpu.throttled_periods > 0
    assert page.value("container_cpu_cfs_throttled_seconds_total", **mine) == cpu.throttled_time_ns / 1e9
    assert page.value("container_cpu_load_average_10s", **mine) == cpu.load_average_milli  # x1000, as cAdvisor
    # The root container has no CFS quota: no cfs series (cAdvisor's condition).
    assert page.samples("container_cpu_cfs_periods_total", id="/") == []

    # Memory, after an OOM kill under a 64 MiB limit.
    mem = rec.memory
    assert page.value("container_memory_usage_bytes", **mine) == mem.usage_bytes
    assert page.value("container_memory_working_set_bytes", **mine) == mem.working_set_bytes
    assert page.value("container_memory_max_usage_bytes", **mine) == mem.max_usage_bytes >= 60 * MIB
    assert page.value("container_memory_rss", **mine) == mem.rss_bytes
    assert page.value("container_memory_cache", **mine) == mem.cache_bytes
    assert page.value("container_memory_mapped_file", **mine) == mem.mapped_file_bytes
    assert page.value("container_memory_swap", **mine) == mem.swap_bytes
    assert page.value("container_memory_failcnt_total", **mine) == mem.failcnt > 0
    assert page.value("container_oom_events_total", **mine) == mem.events.oom_kill == 1
    failures = {(s.labels["failure_type"], s.labels["scope"]): s.value for s in page.samples("container_memory_failures_total", **mine)}
    assert failures == {
        (kind, scope): value
        for scope in ("container", "hierarchy")
        for kind, value in (("pgfault", mem.pgfault), ("pgmajfault", mem.pgmajfault))
    }

    # Processes: sh exec'd yes after the OOM kill.
    # (a fork in flight can make it two for a moment: compare with the record, not a constant)
    assert page.value("container_threads", **mine) == rec.processes.threads >= 1
    assert page.value("container_processes", **mine) == rec.processes.processes >= 1
    assert page.value("container_file_descriptors", **mine) == rec.processes.open_fds
    assert page.value("container_threads_max", **mine) == (rec.processes.pids_limit or 0)

    # Spec: docker run --memory 64m --cpus 0.5.
    assert page.value("container_spec_memory_limit_bytes", **mine) == 67108864
    assert page.value("container_spec_cpu_quota", **mine) == 50000
    assert page.value("container_spec_cpu_period", **mine) == 100000
    assert page.value("container_spec_cpu_shares", **mine) == spec.cpu.shares
    assert page.value("container_spec_memory_reservation_limit_bytes", **mine) == (spec.memory.reservation_bytes or 0)
    assert page.value("container_spec_memory_swap_limit_bytes", **mine) == (spec.memory.swap_limit_bytes or 0)
    assert page.value("container_start_time_seconds", **mine) == spec.creation_time.timestamp()
    assert int(t0) <= page.value("container_last_seen", **mine) <= t1

    # The root container: network (the test dockerd runs with --bridge=none: containers only have
    # lo, which is not reported), filesystems and pressure (PSI through the unified hierarchy).
    assert root.network
    for iface in root.network:
        for metric, value in (
            ("container_network_receive_bytes_total", iface.rx_bytes),
            ("container_network_receive_packets_total", iface.rx_packets),
            ("container_network_receive_errors_total", iface.rx_errors),
            ("container_network_receive_packets_dropped_total", iface.rx_dropped),
            ("container_network_transmit_bytes_total", iface.tx_bytes),
            ("container_network_transmit_packets_total", iface.tx_packets),
            ("container_network_transmit_errors_total", iface.tx_errors),
            ("container_network_transmit_packets_dropped_total", iface.tx_dropped),
        ):
            assert page.value(metric, id="/", interface=iface.name) == value, (metric, iface.name)
    assert root.filesystem and root.pressure and root.pressure.cpu
    for fs in root.filesystem:
        assert page.value("container_fs_usage_bytes", id="/", device=fs.device) == fs.usage_bytes
        assert page.value("container_fs_limit_bytes", id="/", device=fs.device) == fs.capacity_bytes
        assert page.value("container_fs_inodes_total", id="/", device=fs.device) == fs.inodes
        assert page.value("container_fs_inodes_free", id="/", device=fs.device) == fs.inodes_free
    psi = root.pressure
    assert page.value("container_pressure_cpu_waiting_seconds_total", id="/") == psi.cpu.some.total_us / 1e6
    assert page.value("container_pressure_memory_stalled_seconds_total", id="/") == psi.memory.full.total_us / 1e6
    assert page.value("container_pressure_io_waiting_seconds_total", id="/") == psi.io.some.total_us / 1e6

    # Machine and version.
    m, v = lv.app.machine_info, lv.app.version_info
    for family in MACHINE_FAMILIES:
        assert page.types[family] == "gauge"
    machine = dict(machine_id=m.machine_id)
    assert page.value("machine_cpu_cores", **machine) == m.num_cores
    assert page.value("machine_memory_bytes", **machine) == m.memory_capacity_bytes
    assert page.value("machine_swap_bytes", **machine) == m.swap_capacity_bytes
    assert page.value("machine_cpu_physical_cores", **machine) == m.num_physical_cores
    assert page.value("machine_cpu_sockets", **machine) == m.num_sockets
    (version,) = page.samples("container_exporter_version_info")
    assert version.value == 1
    assert version.labels["kernelVersion"] == v.kernel_version and version.labels["osVersion"] == v.os_version
    assert version.labels["dockerVersion"] == v.docker_version and v.docker_version


@pytest.mark.docker
def test_only_whitelisted_labels_without_store_container_labels(live, docker_engine, busybox_image, make_container):
    lv = live(docker_endpoint=docker_engine.endpoint, store_container_labels=False, whitelisted_container_labels=["app"])
    name = f"ce-prom-{uuid.uuid4().hex[:8]}"
    make_container(busybox_image, ["sleep", "3600"], name=name, labels={"app": "web", "team": "metrics"})
    found = wait_for(lambda: lv.app.manager.resolve("docker", name), 5.0, f"docker container {name}")
    record_with(lv.app, found.name, lambda r: True, 5.0, "a first record")
    page, _ = lv.stable_scrape(found.name)
    assert page.samples("container_memory_usage_bytes", id=found.name)[0].labels["container_label_app"] == "web"
    assert "container_label_team" not in page.text
    assert "container_label_container_exporter_test" not in page.text  # the test session's own labels
    # Still one label set per family: raw cgroups carry the whitelisted label, empty.
    assert {frozenset(s.labels) for s in page.by_name["container_memory_usage_bytes"]} == {
        frozenset({"id", "name", "image", "container_label_app"})
    }


def test_disable_metrics_removes_their_families(live, make_cgroup):
    disabled = ["memory", "network", "percpu", "process", "pressure", "disk", "oom_event"]
    lv = live(disable_metrics=disabled)
    cg = make_cgroup()
    workloads.start_cpu_burner(cg)
    record = record_with(lv.app, cg.name, lambda r: (r.cpu.total_ns or 0) > 0, 5.0, "CPU time in a record")
    page, records = lv.stable_scrape(cg.name)
    record = records[cg.name]
    # percpu off: one series per container, cpu="total", the cgroup's whole CPU time.
    assert {s.labels["cpu"] for s in page.by_name["container_cpu_usage_seconds_total"]} == {"total"}
    assert page.value("container_cpu_usage_seconds_total", id=cg.name) == record.cpu.total_ns / 1e9 > 0
    for prefix in ("container_memory_", "container_network_", "container_threads", "container_file_descriptors",
                   "container_pressure_", "container_fs_", "container_oom_events", "container_cpu_load_average"):
        assert f"# TYPE {prefix}" not in page.text, prefix
    # Spec families stay, as in cAdvisor; the memory limit of a fresh cgroup is unlimited → 0.
    assert page.value("container_spec_memory_limit_bytes", id=cg.name) == 0
    assert page.value("container_spec_cpu_period", id=cg.name) == record_spec(lv, cg.name).cpu.period_us

    # And "cpu" removes the cpu families: a collector over the same live exporter, cpu disabled.
    ctx = replace(lv.ctx, config=lv.app.config.model_copy(update={"disable_metrics": [*disabled, "cpu"]}))
    text = render(_Fixed(list(ContainerCollector(ctx).collect()))).decode()
    assert "container_cpu_" not in text
    assert f'container_spec_cpu_period{{id="{cg.name}"' in text


def record_spec(lv: Live, name: str) -> Any:
    container = lv.app.manager.get(name)
    assert container is not None
    return container.spec


class _Fixed:
    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> list[Any]:
        return self.families


def test_self_metrics_sinks_housekeeping_process(live, make_cgroup):
    lv = live()
    make_cgroup()
    worker = lv.app.hub.workers[0]
    wait_for(lambda: worker.stats.sent > 0, 10.0, "the jsonl sink to deliver")
    lv.ctx.collection_stats["last_collection_duration_s"] = 0.25
    sent_before, batches_before = worker.stats.sent, worker.stats.batches
    page = scrape(lv.url)
    sent_after, batches_after = worker.stats.sent, worker.stats.batches

    sink = dict(sink="jsonl")
    assert sent_before <= page.value("container_exporter_sent_records_total", **sink) <= sent_after
    assert page.types["container_exporter_sent_records_total"] == "counter"
    assert batches_before <= page.value("container_exporter_batch_latency_seconds_count", **sink) <= batches_after
    assert page.value("container_exporter_batch_latency_seconds_sum", **sink) > 0
    assert page.value("container_exporter_queue_capacity", **sink) == worker.settings.queue_size
    assert page.value("container_exporter_degraded", **sink) == 0
    assert page.value("container_exporter_failed_writes_total", **sink) == 0
    assert page.value("container_exporter_spool_pending_records", **sink) == 0
    assert page.value("container_exporter_last_success_timestamp_seconds", **sink) == pytest.approx(time.time(), abs=30)
    assert page.value("container_exporter_housekeeping_jobs") >= 2  # "/" and the scratch cgroup at least
    assert page.value("container_exporter_housekeeping_job_errors_total") == lv.app.scheduler.stats.errors
    assert page.value("container_exporter_last_collection_duration_seconds") == 0.25
    assert page.value("container_exporter_watcher_degraded") == 0
    assert page.value("process_resident_memory_bytes") > 10 * MIB
    assert page.value("process_cpu_seconds_total") > 0
    # The scrape itself is measured, from the second scrape on.
    assert "container_exporter_scrape_duration_seconds" not in page.text
    second = scrape(lv.url)
    assert second.value("container_exporter_scrape_duration_seconds_count") == 1
    assert second.value("container_exporter_last_scrape_size_bytes") == len(page.text.encode())
    # Nothing went to prometheus_client's global registry.
    assert REGISTRY.get_sample_value("container_exporter_housekeeping_jobs") is None


def test_openmetrics_on_request_text_otherwise_and_gzip(live, make_cgroup):
    lv = live()
    cg = make_cgroup()
    workloads.start_cpu_burner(cg)
    record_with(lv.app, cg.name, lambda r: (r.cpu.total_ns or 0) > 0, 5.0, "CPU time in a record")

    text = scrape(lv.url)
    assert text.content_type == CONTENT_TYPE_TEXT
    om = scrape(lv.url, accept=PROMETHEUS_ACCEPT)  # what Prometheus sends
    assert om.content_type == CONTENT_TYPE_OPENMETRICS
    assert om.text.endswith("# EOF\n")
    # OpenMetrics counters end in _total, cAdvisor's failcnt too (as Go's client writes it).
    assert "# TYPE container_memory_failcnt counter\n" in om.text
    assert om.types["container_memory_failcnt_total"] == "counter"
    assert om.samples("container_memory_failcnt_total", id=cg.name)
    assert om.types["container_cpu_usage_seconds_total"] == "counter"
    assert "# TYPE container_cpu_usage_seconds counter\n" in om.text
    # The same series in both formats (values move between the two scrapes).
    text_series = {(n.removesuffix("_total"), frozenset(s.labels.items())) for n, ss in text.by_name.items() for s in ss}
    om_series = {(n.removesuffix("_total"), frozenset(s.labels.items())) for n, ss in om.by_name.items() for s in ss}
    volatile = ("container_exporter_", "process_")
    assert {s for s in text_series if not s[0].startswith(volatile)} == {s for s in om_series if not s[0].startswith(volatile)}
    assert scrape(lv.url, accept="text/plain;version=0.0.4").content_type == CONTENT_TYPE_TEXT

    headers, body = fetch(lv.url, accept_encoding="gzip, deflate")
    assert headers["Content-Encoding"] == "gzip"
    page = Page(headers["Content-Type"], gzip.decompress(body).decode())
    assert page.samples("container_memory_usage_bytes", id=cg.name)


def test_encoder_agrees_with_prometheus_client(live, make_cgroup):
    """Our encoder and prometheus_client's, on the very same families, give the same series."""
    lv = live()
    cg = make_cgroup()
    workloads.start_cpu_burner(cg)
    record_with(lv.app, cg.name, lambda r: True, 5.0, "a first record")
    families = list(make_registry(lv.ctx).collect())
    fixed = _Fixed(families)

    def series(text: str, openmetrics: bool) -> set[tuple[str, str, frozenset[tuple[str, str]], float]]:
        parsed = parse_openmetrics(text) if openmetrics else parse_text(text)
        return {(f.type, s.name, frozenset(s.labels.items()), s.value) for f in parsed for s in f.samples}

    ours = series(render(fixed).decode(), False)
    # (prometheus_client's text encoder writes container_memory_failcnt_total; its parser reads both as that.)
    theirs = series(exposition.generate_latest(fixed).decode(), False)
    assert ours == theirs
    names = {name for _, name, _, _ in ours}
    assert {"container_cpu_usage_seconds_total", "container_memory_working_set_bytes", "machine_cpu_cores"} <= names
    assert any(dict(labels).get("id") == cg.name for _, _, labels, _ in ours)
    assert series(render(fixed, openmetrics=True).decode(), True) == series(om_exposition.generate_latest(fixed).decode(), True)


def test_custom_metrics_and_diskio_of_a_record(live, make_cgroup):
    """Application metrics and block I/O, from a record of a live container given those sections
    (this machine's block devices account no I/O to cgroups, and no collector is configured)."""
    lv = live()
    cg = make_cgroup()
    real = record_with(lv.app, cg.name, lambda r: True, 5.0, "a first record")
    container = lv.app.manager.get(cg.name)
    container.spec.custom_metrics = [
        CustomMetricSpec(name="requests_served", type="counter", format="int"),
        CustomMetricSpec(name="queue_length"),
    ]
    injected = real.model_copy(
        update={
            "timestamp": real.timestamp + timedelta(hours=1),  # newer than any tick of this test
            "custom_metrics": {
                "requests_served": [
                    CustomMetricValue(labels={"path": "/a", "method": "GET"}, value=12),
                    CustomMetricValue(labels={"path": "/b"}, value=3),
                ],
                "queue_length": [CustomMetricValue(value=2.5)],
                "container_memory_rss": [CustomMetricValue(value=1)],  # taken by a built-in family
            },
            "diskio": [DiskIoDevice(major=254, minor=0, device="vda", read_bytes=8 * MIB, write_bytes=MIB, read_ops=8, write_ops=1)],
        }
    )
    lv.app.cache.add_stats(injected)
    assert lv.app.cache.latest(cg.name) is injected

    page = scrape(lv.url)
    mine = dict(id=cg.name)
    assert "# TYPE requests_served counter\nrequests_served{" in page.text  # named as the application named it
    assert page.value("requests_served_total", app_path="/a", app_method="GET", **mine) == 12
    assert page.value("requests_served_total", app_path="/b", app_method="", **mine) == 3
    assert page.types["queue_length"] == "gauge" and page.value("queue_length", **mine) == 2.5
    assert page.docs["queue_length"] == "Custom application metric."
    assert set(page.samples("requests_served_total", **mine)[0].labels) == {"id", "name", "image", "app_method", "app_path"}
    assert page.text.count("# TYPE container_memory_rss ") == 1
    assert page.value("container_memory_rss", **mine) == injected.memory.rss_bytes
    om = scrape(lv.url, accept="application/openmetrics-text; version=1.0.0")
    assert om.value("requests_served_total", app_path="/a", app_method="GET", **mine) == 12

    disk = dict(device="/dev/vda", **mine)
    assert page.value("container_fs_reads_bytes_total", **disk) == 8 * MIB
    assert page.value("container_fs_writes_bytes_total", **disk) == MIB
    assert page.value("container_fs_reads_total", **disk) == 8
    assert page.value("container_fs_writes_total", **disk) == 1
    for family in ("container_fs_reads_bytes_total", "container_fs_writes_total"):
        assert page.types[family] == "counter"
