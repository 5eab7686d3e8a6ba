"""Application metrics (cAdvisor's collector manager): configs, parsers, and scrapes of real HTTP(S)
servers: Python servers on loopback for the unit tests, busybox httpd inside real Docker containers
for the end-to-end ones.

The unit tests give the manager a proc tree of their own (tmp_path/proc): the host's pid 1 and a
"container" task 4242 with a root directory of its own, holding the config, and ns/net pointing at
our own network namespace, like a ``--network host`` container.

Docker arrangement: the test dockerd runs with ``--bridge=none``, so no container has an address
the host can reach. Two arrangements cover what a collector meets:

- ``network_mode="host"``: busybox httpd in the container listens on a free host port and the
  config's ``http://localhost:<port>/...`` reaches it without entering any namespace;
- ``network_mode="none"``: httpd listens on the container's own loopback; the collector creates its
  socket inside the container's network namespace. A decoy server on the host's loopback, same
  port, serving other values, proves the answer came from the container.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families as parse_text

from exporter.app import App
from exporter.clock import FakeClock
from exporter.collectors import (
    CollectorConfigError,
    CollectorManager,
    GenericCollector,
    GenericConfig,
    PrometheusCollector,
    PrometheusConfig,
    ScrapeError,
    parse_config,
    read_in_root,
)
from exporter.config import ConfigError
from exporter.models import ContainerStats, CustomMetricSpec
from tests.infra.procs import free_port
from tests.test_fs import du_bytes
from tests.test_pipeline import app_config, wait_for

FIXTURES = Path(__file__).parent / "fixtures" / "collectors"
METRICS = (FIXTURES / "metrics.prom").read_bytes()
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
WHERE = "container /docker/abc: /etc/ce/collector.json (label io.cadvisor.metric.app)"
LABEL = "io.cadvisor.metric."
CONTAINER = "/docker/abc"
LOGGER = "exporter.collectors"


def values_of(values: dict[str, list[Any]] | None) -> dict[str, list[tuple[dict[str, str], float]]]:
    assert values is not None
    return {name: sorted(((v.labels, v.value) for v in vs), key=repr) for name, vs in values.items()}


# -- servers ---------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: Pages

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        server = self.server
        server.hits += 1
        if server.delay_s:
            time.sleep(server.delay_s)
        page = server.pages.get(self.path)
        if page is None:
            self.send_error(404)
            return
        content_type, body = page
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class Pages(ThreadingHTTPServer):
    """A real HTTP(S) server on loopback serving ``pages`` (path → (content type, body))."""

    daemon_threads = True

    def __init__(self, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.pages: dict[str, tuple[str, bytes]] = {}
        self.delay_s = 0.0
        self.hits = 0
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="test-pages", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gives up (timeout tests) is expected

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join()


@pytest.fixture
def pages() -> Iterator[Callable[..., Pages]]:
    started: list[Pages] = []

    def factory(port: int = 0, tls: ssl.SSLContext | None = None) -> Pages:
        server = Pages(port, tls)
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.socket.fileno() >= 0:
            server.stop()


# -- a proc tree of our own ---------------------------------------------------------------------------


class FakeHost:
    """proc_root with pid 1 (the host) and container task 4242; ``container()`` gives the object
    the manager's listener calls pass (name, ref.labels, reader.cgroup.procs.path)."""

    PID = 4242

    def __init__(self, base: Path) -> None:
        self.proc = base / "proc"
        (self.proc / "1" / "root").mkdir(parents=True)  # the host's root
        task = self.proc / str(self.PID)
        (task / "ns").mkdir(parents=True)
        (task / "ns" / "net").symlink_to("/proc/self/ns/net")
        self.root = task / "root"
        self.root.mkdir()
        self.procs = base / "cgroup.procs"
        self.procs.write_text(f"{self.PID}\n")

    def write(self, path: str, data: str | bytes) -> None:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.encode() if isinstance(data, str) else data)

    def container(self, labels: dict[str, str], name: str = CONTAINER) -> Any:
        procs = SimpleNamespace(path=str(self.procs))
        return SimpleNamespace(name=name, ref=SimpleNamespace(labels=labels), reader=SimpleNamespace(cgroup=SimpleNamespace(procs=procs)))


class RecordingScheduler:
    """The three Scheduler calls the manager makes; the tests run the jobs themselves."""

    def __init__(self) -> None:
        self.jobs: dict[str, Callable[[], None]] = {}
        self.intervals: dict[str, float] = {}

    def add(self, job_id: str, fn: Callable[[], None], interval_s: float, first_run_in_s: float | None = None) -> None:
        self.jobs[job_id] = fn
        self.intervals[job_id] = interval_s

    def reschedule(self, job_id: str, interval_s: float) -> None:
        if job_id in self.jobs:
            self.intervals[job_id] = interval_s

    def remove(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        self.intervals.pop(job_id, None)


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def scheduler() -> RecordingScheduler:
    return RecordingScheduler()


@pytest.fixture
def make_manager(host: FakeHost, scheduler: RecordingScheduler, clock: FakeClock) -> Iterator[Callable[..., CollectorManager]]:
    made: list[CollectorManager] = []

    def factory(**kwargs: Any) -> CollectorManager:
        kwargs.setdefault("timeout_s", 2.0)
        manager = CollectorManager(host.proc, scheduler, clock, **kwargs)  # type: ignore[arg-type]
        made.append(manager)
        return manager

    yield factory
    for manager in made:
        manager.close()


def prometheus_config(port: int, **extra: Any) -> str:
    return json.dumps({"type": "prometheus", "endpoint": f"http://localhost:{port}/metrics", **extra})


def scrape_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and "scrape failed" in r.getMessage()]


# -- configs --------------------------------------------------------------------------------------


def test_cadvisor_documented_configs_parse() -> None:
    nginx = parse_config((FIXTURES / "nginx.json").read_bytes(), "nginx", WHERE)
    assert isinstance(nginx, GenericConfig)
    assert nginx.endpoint.url == "http://localhost:8000/nginx_status"
    assert (nginx.endpoint.address, nginx.endpoint.port, nginx.endpoint.target) == ("127.0.0.1", 8000, "/nginx_status")
    # The smallest polling_frequency that is set: 10 (seconds) and "5s".
    assert nginx.interval_s(1.0) == 5.0
    assert [m.spec for m in nginx.metrics_config] == [
        CustomMetricSpec(name="activeConnections", type="gauge", format="int", units="number of active connections"),
        CustomMetricSpec(name="reading", type="gauge", format="int", units="number of reading connections"),
        CustomMetricSpec(name="requests", type="counter", format="float", units="requests"),
    ]

    # No "type": a label named prometheus-* means Prometheus, as in cAdvisor.
    prom = parse_config((FIXTURES / "prometheus.json").read_bytes(), "prometheus-app", WHERE)
    assert isinstance(prom, PrometheusConfig)
    assert prom.endpoint.url == "http://localhost:9100/metrics"
    assert prom.interval_s(1.0) == 15.0 and prom.declared == 2
    # Unset polling frequency: cAdvisor's minimum, 1 s.
    assert parse_config(b'{"endpoint": "http://[::1]:9/m?x=1", "type": "prometheus"}', "x", WHERE).interval_s(1.0) == 1.0

    with pytest.raises(CollectorConfigError) as err:
        parse_config((FIXTURES / "prometheus.json").read_bytes(), "app", WHERE)
    assert str(err.value).startswith(WHERE + ": a generic config needs metrics_config rules")
    assert '"type": "prometheus"' in str(err.value)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (b"{", "not valid JSON: Expecting property name"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'{"type": "jolokia", "endpoint": "http://localhost/"}', "unknown type 'jolokia'"),
        (b'{"type": "prometheus", "endpoint": "http://10.0.0.8:9100/metrics"}', "host '10.0.0.8' is not allowed: endpoints are container-local"),
        (b'{"type": "prometheus", "endpoint": "ftp://localhost/metrics"}', "expected an http:// or https:// URL"),
        (b'{"type": "prometheus", "endpoint": {"protocol": "http", "path": "/m"}}', "needs both protocol and port"),
        (b'{"type": "prometheus", "endpoint": "http://localhost/", "polling_frequency": "soon"}', "key 'polling_frequency': expected a duration"),
        (b'{"type": "prometheus", "endpoint": "http://localhost/", "metric_config": []}', "unknown key 'metric_config'"),
        (b'{"endpoint": "http://localhost/", "metrics_config": [{"name": "a", "regex": "a: \\\\d+"}]}', "key 'metrics_config.0.regex': regular expression 'a: \\\\d+' has no group"),
        (b'{"endpoint": "http://localhost/", "metrics_config": [{"name": "a", "regex": "(["}]}', "invalid regular expression"),
        (b'{"endpoint": "http://localhost/", "metrics_config": [{"name": "a", "regex": "(1)"}, {"name": "a", "regex": "(2)"}]}', "metric(s) defined twice: a"),
        (b'{"endpoint": "http://localhost/", "metrics_config": [{"name": "a", "regex": "(1)", "data_type": "double"}]}', "key 'metrics_config.0.data_type'"),
    ],
)
def test_config_errors_name_the_container_and_the_file(config: bytes, message: str) -> None:
    with pytest.raises(CollectorConfigError) as err:
        parse_config(config, "app", WHERE)
    assert str(err.value).startswith(WHERE + ": ")
    assert message in str(err.value)


# -- parsers --------------------------------------------------------------------------------------


def test_prometheus_text_keeps_names_labels_and_types_as_served() -> None:
    config = parse_config(b'{"type": "prometheus", "endpoint": "http://localhost:1/metrics"}', "app", WHERE)
    assert isinstance(config, PrometheusConfig)
    scrape = PrometheusCollector(config, 100).parse(METRICS, "text/plain; version=0.0.4", NOW)
    assert scrape.error is None
    assert values_of(scrape.values) == {
        "app_requests_total": [({"code": "200", "method": "get"}, 1027.0), ({"code": "500", "method": "get"}, 3.0)],
        "app_queue_depth": [({}, 12.5)],
        "app_errors": [({}, 4.0)],  # typed counter without _total: the name as served, not prometheus_client's
        "app_latency_seconds_bucket": [({"le": "+Inf"}, 100.0), ({"le": "0.1"}, 80.0), ({"le": "1"}, 95.0)],
        "app_latency_seconds_sum": [({}, 17.5)],
        "app_latency_seconds_count": [({}, 100.0)],
        # app_ratio{quantile="0.5"} is NaN: JSON records cannot carry it.
        "app_ratio_sum": [({}, 0.0)],
        "app_ratio_count": [({}, 0.0)],
        "app_started_seconds": [({}, 1.7e9)],
    }
    types = {s.name: s.type for s in scrape.specs}
    assert types == {
        "app_requests_total": "counter", "app_queue_depth": "gauge", "app_errors": "counter",
        "app_latency_seconds_bucket": "counter", "app_latency_seconds_sum": "counter", "app_latency_seconds_count": "counter",
        "app_ratio_sum": "counter", "app_ratio_count": "counter", "app_started_seconds": "gauge",
    }
    assert scrape.values["app_queue_depth"][0].timestamp == NOW
    assert scrape.values["app_started_seconds"][0].timestamp == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)  # its own


def test_prometheus_filter_limit_and_garbage() -> None:
    keep = PrometheusConfig.model_validate(
        {"endpoint": "http://localhost:1/", "metrics_config": ["app_requests_total", "app_latency_seconds", "app_missing"]}
    )
    scrape = PrometheusCollector(keep, 100).parse(METRICS, "text/plain", NOW)
    # A family name keeps the whole family; a sample name that sample.
    assert set(scrape.values) == {"app_requests_total", "app_latency_seconds_bucket", "app_latency_seconds_sum", "app_latency_seconds_count"}

    everything = PrometheusConfig.model_validate({"endpoint": "http://localhost:1/"})
    # An endpoint that answers in OpenMetrics is read as OpenMetrics: names as served.
    om = PrometheusCollector(everything, 100).parse(
        b"# TYPE jobs counter\njobs_total{queue=\"a\"} 3\n# TYPE temp gauge\ntemp 21.5\n# EOF\n",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        NOW,
    )
    assert values_of(om.values) == {"jobs_total": [({"queue": "a"}, 3.0)], "temp": [({}, 21.5)]}
    assert {s.name: s.type for s in om.specs} == {"jobs_total": "counter", "temp": "gauge"}

    with pytest.raises(ScrapeError) as err:
        PrometheusCollector(everything, 3).parse(METRICS, "text/plain", NOW)
    assert err.value.kind == "limit" and "more than 3 metrics (application_metrics_count_limit)" in str(err.value)
    with pytest.raises(ScrapeError) as err:
        PrometheusCollector(everything, 100).parse(b"<html><body>It works!</body></html>\n", "text/html", NOW)
    assert err.value.kind == "parse" and "not in the Prometheus text format" in str(err.value)


def test_generic_regexes_over_nginx_status() -> None:
    config = parse_config((FIXTURES / "nginx.json").read_bytes(), "nginx", WHERE)
    assert isinstance(config, GenericConfig)
    collector = GenericCollector(config)
    scrape = collector.parse((FIXTURES / "nginx_status.txt").read_bytes(), "text/plain", NOW)
    assert scrape.error is None
    assert values_of(scrape.values) == {"activeConnections": [({}, 291.0)], "reading": [({}, 6.0)], "requests": [({}, 31070465.0)]}
    assert scrape.values["reading"][0].timestamp == NOW

    # What matches is kept; what does not is one error naming each metric.
    partial = collector.parse(b"Active connections: 12\nReading: x Writing: 1\n", "text/plain", NOW)
    assert values_of(partial.values) == {"activeConnections": [({}, 12.0)]}
    assert partial.error is not None and partial.error.kind == "parse"
    assert "no match for regex 'Reading: ([0-9]+) .*' of metric reading" in str(partial.error)
    assert "of metric requests" in str(partial.error)

    ints = GenericCollector(GenericConfig.model_validate(
        {"endpoint": "http://localhost/", "metrics_config": [{"name": "n", "data_type": "int", "regex": "n=(\\S+)"}]}
    ))
    bad = ints.parse(b"n=2.5", "text/plain", NOW)
    assert bad.values == {} and "metric n: '2.5' is not an int" in str(bad.error)


# -- files inside a container ------------------------------------------------------------------------


def test_config_files_resolve_inside_the_container_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc" / "ce").mkdir(parents=True)
    (root / "etc" / "os-release").write_text("the container's os-release\n")
    (root / "etc" / "ce" / "abs").symlink_to("/etc/os-release")  # through /proc/<pid>/root: the host's
    (root / "etc" / "ce" / "rel").symlink_to("../../../../../../../etc/os-release")
    (root / "var").mkdir()
    (root / "var" / "run").symlink_to("/etc")  # a symlinked directory, as /var/run → /run in many images
    assert Path("/etc/os-release").read_text() != "the container's os-release\n"
    for path in ("/etc/ce/abs", "/etc/ce/rel", "/var/run/ce/../os-release", "/../../etc/./os-release"):
        assert read_in_root(root, path) == b"the container's os-release\n", path

    (root / "etc" / "loop").symlink_to("/etc/loop")
    with pytest.raises(OSError, match="too many levels of symbolic links"):
        read_in_root(root, "/etc/loop")
    os.mkfifo(root / "etc" / "fifo")  # opening a FIFO for reading would block
    with pytest.raises(OSError, match="not a regular file"):
        read_in_root(root, "/etc/fifo")
    with pytest.raises(IsADirectoryError):
        read_in_root(root, "/etc/ce/")
    with pytest.raises(FileNotFoundError):
        read_in_root(root, "/etc/ce/missing.json")
    (root / "big").write_bytes(b"x" * 2000)
    with pytest.raises(OSError, match="larger than 1000 bytes"):
        read_in_root(root, "/big", limit=1000)


# -- the manager on a proc tree of our own ------------------------------------------------------------


def test_prometheus_values_flow_and_follow_the_endpoint(host, scheduler, clock, make_manager, pages, caplog) -> None:
    server = pages()
    server.pages["/metrics"] = ("text/plain; version=0.0.4", METRICS)
    host.write("/etc/ce/collector.json", prometheus_config(server.port, polling_frequency="2s", metrics_config=["app_queue_depth", "app_requests_total"]))
    manager = make_manager()
    container = host.container({LABEL + "app": "/etc/ce/collector.json", "team": "metrics"})
    caplog.set_level(logging.INFO, LOGGER)

    manager.container_added(container)
    job_id = "collector:/docker/abc:app"
    assert list(scheduler.jobs) == [job_id] and scheduler.intervals[job_id] == 1.0  # looking for the config
    assert manager.latest(CONTAINER) is None and manager.specs(CONTAINER) == []

    manager.poll(CONTAINER)
    assert scheduler.intervals[job_id] == 2.0  # the config's polling_frequency
    assert values_of(manager.latest(CONTAINER)) == {
        "app_queue_depth": [({}, 12.5)],
        "app_requests_total": [({"code": "200", "method": "get"}, 1027.0), ({"code": "500", "method": "get"}, 3.0)],
    }
    assert {(s.name, s.type) for s in manager.specs(CONTAINER)} == {("app_queue_depth", "gauge"), ("app_requests_total", "counter")}
    assert manager.latest("/docker/other") is None
    assert any(f"{CONTAINER}: /etc/ce/collector.json (label {LABEL}app): collecting prometheus metrics from http://localhost:{server.port}/metrics every 2s" in r.getMessage() for r in caplog.records)

    # The next scrape sees the endpoint's new values; a metric no longer served is gone.
    server.pages["/metrics"] = ("text/plain", b"app_queue_depth 3\n")
    clock.advance(2)
    manager.poll(CONTAINER)
    assert values_of(manager.latest(CONTAINER)) == {"app_queue_depth": [({}, 3.0)]}
    stats = manager.stats()
    assert stats["configs_loaded"] == 1 and stats["scrapes"] == 2 and stats.get("scrape_errors", 0) == 0
    assert stats["collectors_active"] == 1 and server.hits == 2

    manager.container_removed(container)
    assert scheduler.jobs == {} and manager.latest(CONTAINER) is None and manager.stats()["collectors_active"] == 0


def test_stopped_endpoint_counted_logged_once_and_values_expire(host, scheduler, clock, make_manager, pages, caplog) -> None:
    server = pages()
    port = server.port
    server.pages["/metrics"] = ("text/plain", b"app_queue_depth 7\n")
    host.write("/etc/ce/collector.json", prometheus_config(port, polling_frequency="1s"))
    manager = make_manager()
    manager.container_added(host.container({LABEL + "app": "/etc/ce/collector.json"}))
    manager.poll(CONTAINER)
    assert values_of(manager.latest(CONTAINER)) == {"app_queue_depth": [({}, 7.0)]}

    server.stop()
    caplog.set_level(logging.INFO, LOGGER)
    for i in range(3):
        clock.advance(1)
        manager.poll(CONTAINER)
        if i == 0:  # one interval old: still the current value
            assert values_of(manager.latest(CONTAINER)) == {"app_queue_depth": [({}, 7.0)]}
    stats = manager.stats()
    assert stats["scrape_errors"] == 3 and stats["scrape_errors_connect"] == 3
    failures = scrape_failures(caplog)
    assert failures == [
        f"container {CONTAINER}: /etc/ce/collector.json (label {LABEL}app): scrape failed: http://localhost:{port}/metrics: "
        "connection refused; further failures are counted, not logged"
    ]
    assert manager.latest(CONTAINER) is None  # three intervals old: not reported as current

    # Back up: the next scrape brings values again, and the recovery is logged.
    server = pages(port)
    server.pages["/metrics"] = ("text/plain", b"app_queue_depth 8\n")
    clock.advance(1)
    manager.poll(CONTAINER)
    assert values_of(manager.latest(CONTAINER)) == {"app_queue_depth": [({}, 8.0)]}
    assert any("scraping works again after 3 failed scrapes" in r.getMessage() for r in caplog.records)
    assert len(scrape_failures(caplog)) == 1


def test_http_errors_are_counted_by_kind(host, make_manager, pages, caplog) -> None:
    server = pages()
    server.pages["/metrics"] = ("text/html", b"<html>It works!</html>\n")
    host.write("/etc/ce/404.json", json.dumps({"type": "prometheus", "endpoint": f"http://localhost:{server.port}/nothing"}))
    host.write("/etc/ce/html.json", prometheus_config(server.port))
    manager = make_manager()
    manager.container_added(host.container({LABEL + "missing": "/etc/ce/404.json", LABEL + "html": "/etc/ce/html.json"}))
    manager.poll(CONTAINER)
    stats = manager.stats()
    assert stats["scrape_errors"] == 2 and stats["scrape_errors_http"] == 1 and stats["scrape_errors_parse"] == 1
    assert manager.latest(CONTAINER) is None
    failures = sorted(scrape_failures(caplog))
    assert f"(label io.cadvisor.metric.missing): scrape failed: http://localhost:{server.port}/nothing answered HTTP 404 Not Found" in failures[0]
    assert "(label io.cadvisor.metric.html): scrape failed: not in the Prometheus text format: invalid metric name" in failures[1]


def test_generic_collector_reads_a_json_status_page(host, make_manager, pages) -> None:
    server = pages()
    server.pages["/status.json"] = ("application/json", (FIXTURES / "status.json").read_bytes())
    host.write("/etc/ce/status.json", json.dumps({
        "endpoint": {"protocol": "http", "port": server.port, "path": "/status.json"},
        "metrics_config": [
            {"name": "active", "metric_type": "gauge", "units": "connections", "data_type": "int", "regex": '"active":\\s*([0-9]+)'},
            {"name": "load", "data_type": "float", "polling_frequency": "3s", "regex": '"load":\\s*([0-9.]+)'},
            {"name": "uptime", "metric_type": "cumulative", "units": "seconds", "data_type": "int", "regex": '"uptime_seconds":\\s*(\\d+)'},
        ],
    }))
    manager = make_manager()
    manager.container_added(host.container({LABEL + "status": "/etc/ce/status.json"}))
    manager.poll(CONTAINER)
    assert values_of(manager.latest(CONTAINER)) == {"active": [({}, 7.0)], "load": [({}, 0.25)], "uptime": [({}, 3600.0)]}
    assert manager.specs(CONTAINER) == [
        CustomMetricSpec(name="active", type="gauge", format="int", units="connections"),
        CustomMetricSpec(name="load", type="gauge", format="float"),
        CustomMetricSpec(name="uptime", type="counter", format="int", units="seconds"),
    ]

    server.pages["/status.json"] = ("application/json", b'{"active": 9, "load": 1.5, "uptime_seconds": 3601}')
    manager.poll(CONTAINER)
    assert values_of(manager.latest(CONTAINER)) == {"active": [({}, 9.0)], "load": [({}, 1.5)], "uptime": [({}, 3601.0)]}


def test_count_limit_refuses_configs(host, scheduler, make_manager, pages, caplog) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    server = pages()
    server.pages["/metrics"] = ("text/plain", METRICS)
    host.write("/etc/ce/three.json", prometheus_config(server.port, metrics_config=["a", "b", "c"]))
    manager = make_manager(count_limit=2)
    manager.container_added(host.container({LABEL + "app": "/etc/ce/three.json"}))
    manager.poll(CONTAINER)
    assert manager.stats()["configs_refused"] == 1 and "configs_loaded" not in manager.stats()
    assert scheduler.jobs == {} and manager.latest(CONTAINER) is None and server.hits == 0
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"container {CONTAINER}: /etc/ce/three.json (label {LABEL}app): too many metrics defined: 3, limit 2 "
        "(application_metrics_count_limit); its metrics are not collected"
    ]

    # The limit is per container: two configs of two metrics each do not fit in three.
    caplog.clear()
    rule = {"name": "x", "regex": "(?m)^app_queue_depth (\\S+)"}
    two = {"endpoint": f"http://localhost:{server.port}/metrics", "metrics_config": [rule, {**rule, "name": "y"}]}
    host.write("/etc/ce/one.json", json.dumps(two))
    host.write("/etc/ce/two.json", json.dumps(two))
    other = make_manager(count_limit=3)
    other.container_added(host.container({LABEL + "one": "/etc/ce/one.json", LABEL + "two": "/etc/ce/two.json"}, name="/docker/two"))
    other.poll("/docker/two")
    assert other.stats()["configs_loaded"] == 1 and other.stats()["configs_refused"] == 1
    assert values_of(other.latest("/docker/two")) == {"x": [({}, 12.5)], "y": [({}, 12.5)]}
    refused = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(refused) == 1 and "too many metrics defined: 2 besides the container's other 2, limit 3" in refused[0]

    # Without metrics_config a Prometheus endpoint is checked at every scrape, as cAdvisor does.
    host.write("/etc/ce/all.json", prometheus_config(server.port))
    third = make_manager(count_limit=3)
    third.container_added(host.container({LABEL + "app": "/etc/ce/all.json"}, name="/docker/three"))
    third.poll("/docker/three")
    assert third.latest("/docker/three") is None and third.stats()["scrape_errors_limit"] == 1


def test_config_looked_for_until_it_appears_then_given_up(host, scheduler, clock, make_manager, pages, caplog) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    server = pages()
    server.pages["/metrics"] = ("text/plain", b"up 1\n")
    manager = make_manager()
    host.procs.write_text("")  # the cgroup exists before its first task
    manager.container_added(host.container({LABEL + "late": "/etc/ce/late.json", LABEL + "never": "/etc/ce/never.json"}))
    manager.poll(CONTAINER)
    assert manager.stats()["collectors_pending"] == 2

    # The runtime's helpers, whose root is still the host's (pid 1's) or ours, are not trusted
    # with the path: it would name a host file.
    (host.proc / "1" / "root" / "etc" / "ce").mkdir(parents=True)
    (host.proc / "1" / "root" / "etc" / "ce" / "late.json").write_text(prometheus_config(server.port))
    for pid, root in ((77, host.proc / "1" / "root"), (78, Path("/"))):
        (host.proc / str(pid)).mkdir()
        (host.proc / str(pid) / "root").symlink_to(root)
    host.procs.write_text("77\n78\n")
    manager.poll(CONTAINER)
    assert manager.stats()["collectors_pending"] == 2 and server.hits == 0

    host.procs.write_text(f"77\n78\n{host.PID}\n")
    host.write("/etc/ce/late.json", prometheus_config(server.port))
    clock.advance(30)
    manager.poll(CONTAINER)
    assert values_of(manager.latest(CONTAINER)) == {"up": [({}, 1.0)]}
    assert manager.stats()["collectors_pending"] == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    clock.advance(31)
    manager.poll(CONTAINER)
    assert manager.stats()["configs_missing"] == 1 and manager.stats()["collectors_pending"] == 0
    assert list(scheduler.jobs) == ["collector:/docker/abc:late"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"container {CONTAINER}: /etc/ce/never.json (label {LABEL}never): not found in the container after 60 s "
        "(No such file or directory); its metrics are not collected"
    ]


def test_labels_arriving_late_or_changing(host, scheduler, make_manager) -> None:
    manager = make_manager()
    manager.container_added(host.container({}))
    assert scheduler.jobs == {} and manager.stats()["collectors_pending"] == 0
    manager.container_updated(host.container({LABEL + "a": "/a.json", LABEL + "b": "/b.json", LABEL: "/nameless.json"}))
    assert sorted(scheduler.jobs) == ["collector:/docker/abc:a", "collector:/docker/abc:b"]
    manager.container_updated(host.container({LABEL + "a": "/a.json"}))
    assert list(scheduler.jobs) == ["collector:/docker/abc:a"]


def test_slow_endpoint_never_blocks_the_scheduler_job(host, scheduler, make_manager, pages, frozen_heap) -> None:
    server = pages()
    server.pages["/metrics"] = ("text/plain", b"up 1\n")
    server.delay_s = 3.0
    host.write("/etc/ce/collector.json", prometheus_config(server.port))
    manager = make_manager(timeout_s=0.5)
    manager.container_added(host.container({LABEL + "app": "/etc/ce/collector.json"}))
    job = scheduler.jobs["collector:/docker/abc:app"]

    started = time.monotonic()
    job()  # what a housekeeping thread runs: it hands the scrape over and returns
    job()  # the scrape is still running: this run is skipped, not queued
    assert time.monotonic() - started < 0.2
    assert manager.stats()["scrapes_skipped"] == 1
    wait_for(lambda: manager.stats().get("scrape_errors_timeout"), 2.5, "the scrape to time out")
    assert time.monotonic() - started < 2.0  # the timeout, not the server's 3 s
    assert manager.latest(CONTAINER) is None


# -- TLS ---------------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for localhost and a client certificate, from the openssl CLI."""
    d = tmp_path_factory.mktemp("certs")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN={ca}", cwd=d)
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, cn in (("server", "localhost"), ("client", "container-exporter")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}


def mtls_server(pages: Callable[..., Pages], certs: dict[str, Path]) -> Pages:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs["server_pem"], certs["server_key"])
    ctx.load_verify_locations(certs["ca_pem"])
    ctx.verify_mode = ssl.CERT_REQUIRED  # no client certificate, no answer
    server = pages(tls=ctx)
    server.pages["/metrics"] = ("text/plain", b"secure_requests_total 42\n")
    return server


def test_mtls_with_the_collector_certificate(host, make_manager, pages, certs, caplog) -> None:
    server = mtls_server(pages, certs)
    host.write("/etc/ce/collector.json", prometheus_config(server.port).replace("http://", "https://"))
    labels = {LABEL + "app": "/etc/ce/collector.json"}

    with_cert = make_manager(cert=certs["client_pem"], key=certs["client_key"])
    with_cert.container_added(host.container(labels))
    with_cert.poll(CONTAINER)
    assert values_of(with_cert.latest(CONTAINER)) == {"secure_requests_total": [({}, 42.0)]}

    caplog.set_level(logging.INFO, LOGGER)
    without = make_manager()
    without.container_added(host.container(labels, name="/docker/plain"))
    without.poll("/docker/plain")
    assert without.latest("/docker/plain") is None and without.stats()["scrape_errors_tls"] == 1
    (failure,) = scrape_failures(caplog)
    assert f"https://localhost:{server.port}/metrics: TLS " in failure
    # The server's "certificate required" alert, or (when the server closes with our request
    # unread, and the kernel resets the connection) the same advice without it.
    assert "client certificate" in failure and "set collector_cert and collector_key" in failure


def test_tls_ca_file_from_the_container_verifies_the_server(host, make_manager, pages, certs, caplog) -> None:
    server = mtls_server(pages, certs)
    host.write("/etc/ce/ca.pem", certs["ca_pem"].read_bytes())
    host.write("/etc/ce/other-ca.pem", certs["other-ca_pem"].read_bytes())
    for name, ca in (("good", "/etc/ce/ca.pem"), ("bad", "/etc/ce/other-ca.pem")):
        host.write(f"/etc/ce/{name}.json", json.dumps({
            "type": "prometheus",
            "endpoint": {"url": f"https://localhost:{server.port}/metrics", "tls": {"ca_file": ca}},
        }))
    manager = make_manager(cert=certs["client_pem"], key=certs["client_key"])
    caplog.set_level(logging.INFO, LOGGER)
    manager.container_added(host.container({LABEL + "good": "/etc/ce/good.json"}))
    manager.container_added(host.container({LABEL + "bad": "/etc/ce/bad.json"}, name="/docker/bad"))
    manager.poll(CONTAINER)
    manager.poll("/docker/bad")
    assert values_of(manager.latest(CONTAINER)) == {"secure_requests_total": [({}, 42.0)]}
    assert manager.latest("/docker/bad") is None
    (failure,) = scrape_failures(caplog)
    assert "/etc/ce/bad.json" in failure and "CERTIFICATE_VERIFY_FAILED" in failure.upper()


def test_collector_certificate_settings_are_checked_at_start(host, scheduler, clock, certs, tmp_path) -> None:
    with pytest.raises(ConfigError, match="collector_cert and collector_key must be set together"):
        CollectorManager(host.proc, scheduler, clock, cert=certs["client_pem"])  # type: ignore[arg-type]
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="cannot be used"):
        CollectorManager(host.proc, scheduler, clock, cert=tmp_path / "junk.pem", key=certs["client_key"])  # type: ignore[arg-type]


# -- real Docker containers, a real exporter ----------------------------------------------------------


@pytest.fixture
def exporter_app(docker_engine, tmp_path: Path) -> Iterator[tuple[App, CollectorManager]]:
    """The exporter as app.py wires it: its own collector manager feeds the records."""
    app = App(app_config(tmp_path, allow_dynamic_housekeeping=False, docker_only=True, docker_endpoint=docker_engine.endpoint))
    app.start()
    yield app, app.collectors
    app.stop()


def exporter_samples(app: App) -> dict[str, list[Any]]:
    """The exporter's /metrics: sample name → samples."""
    assert app.api is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{app.api.port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list[Any]] = {}
    for family in parse_text(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


SERVE = (
    'mkdir -p /www /etc/ce && printf "%s" "$METRICS" > /www/metrics && printf "%s" "$STATUS" > /www/status.json '
    '&& printf "%s" "$PROM_CONFIG" > /etc/ce/prometheus.json && printf "%s" "$STATUS_CONFIG" > /etc/ce/status.json '
)

@pytest.mark.root
@pytest.mark.docker
def test_docker_container_endpoint_on_the_host_network(exporter_app, busybox_image, make_container, caplog) -> None:
    app, collectors = exporter_app
    caplog.set_level(logging.INFO, LOGGER)
    port = free_port()
    status_config = {
        "endpoint": f"http://localhost:{port}/status.json",
        "metrics_config": [
            {"name": "status_active", "data_type": "int", "polling_frequency": "1s", "regex": '"active":\\s*([0-9]+)'},
            {"name": "status_load", "data_type": "float", "regex": '"load":\\s*([0-9.]+)'},
        ],
    }
    name = f"ce-test-{uuid.uuid4().hex[:8]}"
    container = make_container(
        busybox_image,
        ["sh", "-c", SERVE + f"&& httpd -p {port} -h /www && exec sleep 3600"],  # httpd forks: it can be stopped alone
        name=name,
        network_mode="host",
        labels={LABEL + "app": "/etc/ce/prometheus.json", LABEL + "status": "/etc/ce/status.json"},
        environment={
            "METRICS": METRICS.decode(),
            "STATUS": (FIXTURES / "status.json").read_text(),
            "PROM_CONFIG": prometheus_config(port, polling_frequency="1s"),
            "STATUS_CONFIG": json.dumps(status_config),
        },
    )
    found = wait_for(lambda: app.manager.resolve("docker", name), 10.0, f"docker container {name}")
    cgroup = found.name

    def latest() -> dict[str, Any] | None:
        values = collectors.latest(cgroup)
        return values_of(values) if values else None

    wait_for(lambda: (latest() or {}).keys() >= {"app_queue_depth", "status_active"}, 15.0, "both collectors' values")
    values = latest()
    assert values is not None
    assert values["app_queue_depth"] == [({}, 12.5)]
    assert values["app_requests_total"] == [({"code": "200", "method": "get"}, 1027.0), ({"code": "500", "method": "get"}, 3.0)]
    assert values["app_latency_seconds_bucket"] == [({"le": "+Inf"}, 100.0), ({"le": "0.1"}, 80.0), ({"le": "1"}, 95.0)]
    assert values["status_active"] == [({}, 7.0)] and values["status_load"] == [({}, 0.25)]
    assert sorted(app.scheduler.job_ids()).count(f"collector:{cgroup}:app") == 1
    assert app.scheduler.job_interval(f"collector:{cgroup}:status") == 1.0

    # The exporter's own /metrics, once a housekeeping tick has put them in a record.
    def exported() -> dict[str, list[Any]] | None:
        samples = exporter_samples(app)
        return samples if "app_queue_depth" in samples and "status_active" in samples else None

    samples = wait_for(exported, 10.0, "custom metrics on the exporter's /metrics")
    (depth,) = [s for s in samples["app_queue_depth"] if s.labels["id"] == cgroup]
    assert depth.value == 12.5 and depth.labels["name"] == name
    requests = {s.labels["app_code"]: s.value for s in samples["app_requests_total"] if s.labels["id"] == cgroup}
    assert requests == {"200": 1027.0, "500": 3.0}
    assert [s.value for s in samples["status_active"] if s.labels["id"] == cgroup] == [7.0]
    record = app.cache.latest(cgroup)
    assert record is not None and record.custom_metrics is not None
    assert record.custom_metrics["status_load"][0].value == 0.25

    # A new file in the container: the next poll reports it.
    result = container.exec_run(
        ["sh", "-c", 'printf "%s" "$M" > /www/metrics.new && mv /www/metrics.new /www/metrics'],
        environment={"M": "# TYPE app_queue_depth gauge\napp_queue_depth 99\n"},
    )
    assert result.exit_code == 0, result.output
    wait_for(lambda: (latest() or {}).get("app_queue_depth") == [({}, 99.0)], 5.0, "the new value")
    assert "app_requests_total" not in (latest() or {})

    # The endpoint stops: the error is counted and logged once, and the values go stale and vanish.
    result = container.exec_run(["sh", "-c", "kill $(pidof httpd)"])
    assert result.exit_code == 0, result.output
    wait_for(lambda: latest() is None, 6.0, "stale values to disappear")
    wait_for(lambda: collectors.stats().get("scrape_errors_connect", 0) >= 4, 6.0, "more failed scrapes")
    failures = [m for m in scrape_failures(caplog) if cgroup in m]
    assert len(failures) == 2  # once per collector
    assert any(f"(label {LABEL}app): scrape failed: http://localhost:{port}/metrics: connection refused" in m for m in failures)

    container.remove(force=True)
    wait_for(lambda: app.manager.get(cgroup) is None, 10.0, "the container's removal")
    assert not [j for j in app.scheduler.job_ids() if j.startswith(f"collector:{cgroup}:")]
    assert collectors.stats()["collectors_active"] == 0


@pytest.mark.root
@pytest.mark.docker
def test_docker_container_endpoint_in_its_own_network_namespace(exporter_app, busybox_image, make_container, pages) -> None:
    app, collectors = exporter_app
    decoy = pages()  # the host's loopback, same port as the container's server, other values
    decoy.pages["/metrics"] = ("text/plain", b"app_queue_depth -1\n")
    port = decoy.port
    name = f"ce-test-{uuid.uuid4().hex[:8]}"
    make_container(
        busybox_image,
        ["sh", "-c", SERVE + f"&& exec httpd -f -p 127.0.0.1:{port} -h /www"],
        name=name,
        network_mode="none",
        labels={LABEL + "prometheus-app": "/etc/ce/prometheus.json"},
        environment={
            "METRICS": "app_queue_depth 12.5\n",
            "STATUS": "{}",
            # No "type": the label name says Prometheus, as in cAdvisor.
            "PROM_CONFIG": json.dumps({"endpoint": f"http://localhost:{port}/metrics", "polling_frequency": "1s"}),
            "STATUS_CONFIG": "{}",
        },
    )
    found = wait_for(lambda: app.manager.resolve("docker", name), 10.0, f"docker container {name}")
    values = wait_for(lambda: collectors.latest(found.name), 15.0, "values from the container's own loopback")
    assert values_of(values) == {"app_queue_depth": [({}, 12.5)]}
    assert decoy.hits == 0


@pytest.mark.root
@pytest.mark.docker
def test_once_scrapes_endpoints_and_measures_the_writable_layer(docker_engine, busybox_image, make_container, tmp_path) -> None:
    """``once`` starts no background work: it scrapes and walks in its own thread, so its
    records carry what ``run``'s records carry."""
    port = free_port()
    name = f"ce-test-{uuid.uuid4().hex[:8]}"
    container = make_container(
        busybox_image,
        ["sh", "-c", SERVE + "&& dd if=/dev/zero of=/blob bs=1M count=4 && touch /done "
         f"&& exec httpd -f -p 127.0.0.1:{port} -h /www"],
        name=name,
        network_mode="none",
        labels={LABEL + "prometheus-app": "/etc/ce/prometheus.json"},
        environment={
            "METRICS": "app_queue_depth 12.5\n",
            "STATUS": "{}",
            "PROM_CONFIG": json.dumps({"endpoint": f"http://localhost:{port}/metrics"}),
            "STATUS_CONFIG": "{}",
        },
    )

    def serving() -> bool:
        result = container.exec_run(["wget", "-q", "-O", "-", f"http://127.0.0.1:{port}/metrics"])
        return result.exit_code == 0 and b"app_queue_depth" in result.output

    wait_for(serving, 10.0, "httpd in the container")
    config = tmp_path / "once.toml"
    config.write_text(f'docker_only = true\ndocker_endpoint = "{docker_engine.endpoint}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "once", "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr
    records = [ContainerStats.model_validate_json(line) for line in result.stdout.splitlines()]
    (mine,) = [r for r in records if name in r.container.aliases]
    assert mine.custom_metrics is not None, result.stderr
    assert [(v.labels, v.value) for v in mine.custom_metrics["app_queue_depth"]] == [({}, 12.5)]
    (layer,) = mine.filesystem or []
    upper = Path(layer.mountpoint)
    assert upper.name == "diff" and (upper / "done").exists()
    assert layer.usage_bytes == du_bytes(upper) >= 4 * 1024 * 1024
