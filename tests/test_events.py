"""Events: storage policy, store and queries, stream watchers, the HTTP endpoints, and creation /
deletion events of real cgroups and real Docker containers through a running App."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests

from exporter.app import App
from exporter.clock import FakeClock
from exporter.events import (
    EventManager,
    EventRequest,
    StoragePolicy,
    WatchClosed,
    cadvisor_event,
    event_record_id,
    events_router,
    parse_event_request,
    parse_storage_policy,
)
from exporter.manager import Identity
from exporter.models import EVENT_TYPES, ContainerReference, Event, EventData
from exporter.oom import OomWatcher
from tests.test_pipeline import app_config, wait_for

IDENTITY = Identity("machine-1", "host-1", "run-1")
T0 = 1_700_000_000.0


def make_manager(
    clock: FakeClock | None = None,
    policy: StoragePolicy | None = None,
    sink: Callable[[Event], None] | None = None,
    **kwargs: Any,
) -> EventManager:
    return EventManager(policy or StoragePolicy(), IDENTITY, clock or FakeClock(T0), sink=sink, **kwargs)


def ev(manager: EventManager, name: str, event_type: str, at: float, **data: Any) -> Event:
    return manager.event(name, event_type, at, EventData(**data))


# -- storage policy: parsing ---------------------------------------------------------------------------
def test_policy_parses_cadvisor_syntax():
    policy = parse_storage_policy("default=24h,oom=72h", "default=100000,containerCreation=1000")
    assert policy.max_age_s("oom") == 72 * 3600
    assert policy.max_age_s("oomKill") == 24 * 3600
    assert policy.max_age_s("containerCreation") == 24 * 3600
    assert policy.max_events("containerCreation") == 1000
    assert policy.max_events("oom") == 100000
    assert all(policy.enabled(t) for t in EVENT_TYPES)


def test_policy_defaults_and_overrides_without_default():
    policy = parse_storage_policy("oomKill=90m", "containerDeletion=-1")
    assert policy.max_age_s("oomKill") == 5400
    assert policy.max_age_s("oom") == 24 * 3600  # cAdvisor's default default
    assert policy.max_events("containerDeletion") == -1  # no count limit
    assert policy.max_events("oom") == 100000
    assert parse_storage_policy("", "") == StoragePolicy()


def test_policy_zero_disables_a_type():
    policy = parse_storage_policy("default=24h,oom=0", "default=10,oomKill=0")
    assert not policy.enabled("oom")
    assert not policy.enabled("oomKill")
    assert policy.enabled("containerCreation")
    assert not parse_storage_policy("default=24h", "default=0").enabled("containerDeletion")


@pytest.mark.parametrize(
    ("age", "count", "flag", "part"),
    [
        ("default", "default=1", "event_storage_age_limit", "'default'"),
        ("default=24h,oom=", "default=1", "event_storage_age_limit", "'oom='"),
        ("default=24h,oops=1h", "default=1", "event_storage_age_limit", "'oops=1h'"),
        ("oom=soon", "default=1", "event_storage_age_limit", "'oom=soon'"),
        ("oom=-1h", "default=1", "event_storage_age_limit", "'oom=-1h'"),
        ("oom=1h,oom=2h", "default=1", "event_storage_age_limit", "'oom=2h'"),
        ("default=24h", "default=1,oomKill=1.5", "event_storage_event_limit", "'oomKill=1.5'"),
        ("default=24h", "default=1,oomKill=1=2", "event_storage_event_limit", "'oomKill=1=2'"),
        ("default=24h", "containercreation=5", "event_storage_event_limit", "'containercreation=5'"),
    ],
)
def test_policy_bad_syntax_names_the_setting_and_the_part(age, count, flag, part):
    with pytest.raises(ValueError) as info:
        parse_storage_policy(age, count)
    message = str(info.value)
    assert message.startswith(flag + ":"), message
    assert part in message, message


# -- policy applied before store, sink and watchers --------------------------------------------------
def test_disabled_type_is_never_stored_sunk_or_streamed():
    sunk: list[Event] = []
    manager = make_manager(policy=parse_storage_policy("default=24h", "default=100,oomKill=0"), sink=sunk.append)
    watch = manager.watch(EventRequest())
    assert not manager.add(ev(manager, "/a", "oomKill", T0, pid=1, process_name="x"))
    assert manager.add(ev(manager, "/a", "oom", T0, pid=1, process_name="x"))
    everything = EventRequest(max_events=-1)
    assert [e.event_type for e in manager.query(everything)] == ["oom"]
    assert [e.event_type for e in sunk] == ["oom"]
    assert watch.get(0.1).event_type == "oom"
    assert watch.get(0.05) is None  # the oomKill never reached the watcher
    assert manager.stats.dropped_disabled == {"oomKill": 1}
    assert manager.store.count("oomKill") == 0


def test_age_limit_zero_also_disables():
    sunk: list[Event] = []
    manager = make_manager(policy=parse_storage_policy("default=24h,containerCreation=0", "default=100"), sink=sunk.append)
    assert not manager.add(ev(manager, "/a", "containerCreation", T0))
    assert sunk == [] and manager.query(EventRequest(max_events=-1)) == []
    assert manager.stats.dropped_disabled == {"containerCreation": 1}


def test_count_limit_keeps_the_newest_per_type():
    sunk: list[Event] = []
    clock = FakeClock(T0)
    manager = make_manager(clock, parse_storage_policy("default=24h", "default=100,containerCreation=3"), sink=sunk.append)
    for i in range(5):
        manager.add(ev(manager, f"/c{i}", "containerCreation", T0 + i))
        manager.add(ev(manager, f"/c{i}", "containerDeletion", T0 + i, exit_code=0))
    creations = manager.query(EventRequest(event_types=frozenset({"containerCreation"}), max_events=-1))
    assert [e.container_name for e in creations] == ["/c2", "/c3", "/c4"]
    assert manager.store.count("containerDeletion") == 5  # other types keep the default limit
    assert manager.store.evicted == 2
    assert len(sunk) == 10  # the count limit bounds memory, not what reaches the sinks


def test_age_limit_expires_with_time_without_new_events():
    clock = FakeClock(T0)
    manager = make_manager(clock, parse_storage_policy("default=24h,oom=1h", "default=100"))
    manager.add(ev(manager, "/a", "oom", T0, pid=5, process_name="p"))
    manager.add(ev(manager, "/a", "containerCreation", T0))
    clock.advance(3599)
    assert manager.expire() == 0
    clock.advance(2)
    assert manager.expire() == 1  # the oom is past 1 h; nothing new had to arrive
    assert manager.store.count("oom") == 0 and manager.store.count("containerCreation") == 1
    clock.advance(23 * 3600)
    # Lazy expiry: a query alone drops what has aged out.
    assert manager.query(EventRequest(max_events=-1)) == []
    assert len(manager.store) == 0
    assert manager.store.expired == 2


def test_event_older_than_its_age_limit_on_arrival_is_dropped_not_sunk():
    sunk: list[Event] = []
    clock = FakeClock(T0)
    manager = make_manager(clock, parse_storage_policy("default=24h", "default=100"), sink=sunk.append)
    # A container created two days before the exporter started: its creation is past retention.
    assert not manager.add(ev(manager, "/old", "containerCreation", T0 - 2 * 86400))
    assert manager.add(ev(manager, "/new", "containerCreation", T0 - 3600))
    assert [e.container_name for e in sunk] == ["/new"]
    assert manager.stats.dropped_too_old == 1


# -- queries -----------------------------------------------------------------------------------------
@pytest.fixture
def populated() -> EventManager:
    manager = make_manager()
    rows = [
        ("/a", "containerCreation", 0),
        ("/a/b", "containerCreation", 1),
        ("/ab", "containerCreation", 2),
        ("/a/b", "oom", 3),
        ("/a/b", "oomKill", 4),
        ("/a", "containerDeletion", 5),
        ("/", "containerCreation", -100),
    ]
    for name, event_type, offset in rows:
        manager.add(ev(manager, name, event_type, T0 + offset))
    return manager


def names(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.container_name, e.event_type) for e in events]


def test_query_by_container_and_subcontainers(populated):
    assert names(populated.query(EventRequest(container_name="/a", max_events=-1))) == [
        ("/a", "containerCreation"),
        ("/a", "containerDeletion"),
    ]
    sub = populated.query(EventRequest(container_name="/a", include_subcontainers=True, max_events=-1))
    assert [n for n, _ in names(sub)] == ["/a", "/a/b", "/a/b", "/a/b", "/a"]  # not "/ab"
    everything = populated.query(EventRequest(container_name="/", include_subcontainers=True, max_events=-1))
    assert len(everything) == 7
    assert names(populated.query(EventRequest(container_name="/", max_events=-1))) == [("/", "containerCreation")]


def test_query_time_range_is_inclusive_and_sorted(populated):
    start = datetime.fromtimestamp(T0 + 1, UTC)
    end = datetime.fromtimestamp(T0 + 4, UTC)
    got = populated.query(EventRequest(start=start, end=end, max_events=-1))
    assert [e.timestamp for e in got] == [datetime.fromtimestamp(T0 + i, UTC) for i in (1, 2, 3, 4)]
    # The root's creation (older than everything, stored out of order) sorts first.
    assert populated.query(EventRequest(max_events=-1))[0].container_name == "/"


def test_query_max_events_and_types(populated):
    assert len(populated.query(EventRequest())) == 7  # default 10
    last2 = populated.query(EventRequest(max_events=2))
    assert names(last2) == [("/a/b", "oomKill"), ("/a", "containerDeletion")]  # the most recent
    assert populated.query(EventRequest(max_events=0)) == []
    ooms = populated.query(EventRequest(event_types=frozenset({"oom", "oomKill"}), max_events=-1))
    assert names(ooms) == [("/a/b", "oom"), ("/a/b", "oomKill")]
    assert populated.query(EventRequest(event_types=frozenset())) == []


def test_record_id_is_deterministic():
    manager = make_manager()
    a = manager.event("/x", "oom", T0 + 0.5)
    b = manager.event("/x", "oom", T0 + 0.5)
    assert a.record_id == b.record_id == event_record_id("machine-1", "/x", "oom", 1_700_000_000_500_000)
    assert manager.event("/x", "oomKill", T0 + 0.5).record_id != a.record_id
    assert manager.event("/y", "oom", T0 + 0.5).record_id != a.record_id


def test_cadvisor_json_shape():
    manager = make_manager()
    oom = manager.event("/docker/abc", "oomKill", T0 + 0.5, EventData(pid=42, process_name="dd", constraint="CONSTRAINT_MEMCG"))
    assert cadvisor_event(oom) == {
        "container_name": "/docker/abc",
        "timestamp": "2023-11-14T22:13:20.5Z",
        "event_type": "oomKill",
        "event_data": {"oom": {"pid": 42, "process_name": "dd", "constraint": "CONSTRAINT_MEMCG"}},
    }
    deletion = manager.event("/x", "containerDeletion", T0, EventData(exit_code=137))
    assert cadvisor_event(deletion)["event_data"] == {"deletion": {"exit_code": 137}}
    assert cadvisor_event(deletion)["timestamp"] == "2023-11-14T22:13:20Z"
    assert cadvisor_event(manager.event("/x", "containerCreation", T0))["event_data"] == {}
    # The sink record carries the container reference (Kafka keys on it) and the identity.
    assert oom.container is not None and oom.container.name == "/docker/abc"
    assert (oom.machine_id, oom.hostname) == ("machine-1", "host-1")


# -- watchers ----------------------------------------------------------------------------------------
def test_watch_filters_and_delivers_in_order():
    manager = make_manager()
    watch = manager.watch(EventRequest(container_name="/a", include_subcontainers=True, event_types=frozenset({"oom"})))
    manager.add(ev(manager, "/a/x", "oom", T0, pid=1, process_name="p"))
    manager.add(ev(manager, "/b", "oom", T0 + 1, pid=2, process_name="p"))
    manager.add(ev(manager, "/a", "containerCreation", T0 + 2))
    manager.add(ev(manager, "/a", "oom", T0 + 3, pid=3, process_name="p"))
    assert [watch.get(0.1).event_data.pid for _ in range(2)] == [1, 3]
    assert watch.get(0.05) is None
    watch.close()
    with pytest.raises(WatchClosed):
        watch.get(0.05)
    assert manager.watchers == 0
    with pytest.raises(ValueError):
        manager.watch(EventRequest(start=datetime.fromtimestamp(T0, UTC)))


def test_stalled_watcher_is_dropped_and_never_blocks_producers(frozen_heap):
    manager = make_manager(watch_queue_size=100)
    stalled = manager.watch(EventRequest())  # never read
    events = [ev(manager, f"/c{i % 50}", "containerCreation", T0 + i * 0.001) for i in range(10_000)]
    latencies: list[float] = []

    def produce() -> None:
        for event in events:
            t = time.perf_counter()
            manager.add(event)
            latencies.append(time.perf_counter() - t)

    producer = threading.Thread(target=produce)
    started = time.perf_counter()
    producer.start()
    producer.join(30)
    elapsed = time.perf_counter() - started
    assert not producer.is_alive()
    assert len(latencies) == 10_000
    assert max(latencies) < 0.05, f"an add() took {max(latencies) * 1000:.1f} ms"
    assert elapsed < 5.0
    assert stalled.dropped and stalled.closed
    assert manager.stats.watchers_dropped == 1
    assert manager.watchers == 0
    assert len(manager.query(EventRequest(max_events=-1))) == 10_000
    # The stalled client sees its stream end (no queued backlog to replay).
    with pytest.raises(WatchClosed, match="did not keep up"):
        stalled.get(0.1)


# -- HTTP parameters (pure) ----------------------------------------------------------------------------
def test_http_parameters_follow_cadvisor():
    request, stream = parse_event_request("docker/abc", {})
    assert request.container_name == "/docker/abc"
    assert request.event_types == frozenset()  # cAdvisor selects no type unless asked
    assert request.max_events == 10 and not stream and not request.include_subcontainers
    request, stream = parse_event_request(
        "",
        {
            "all_events": "true",
            "stream": "1",
            "subcontainers": "T",
            "max_events": "-1",
            "start_time": "2024-05-01T12:00:00Z",
            "end_time": "2024-05-01T14:00:00.123456789+02:00",
        },
    )
    assert request.container_name == "/" and stream and request.include_subcontainers
    assert request.event_types == frozenset(EVENT_TYPES)
    assert request.max_events == -1
    assert request.start == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert request.end == datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    request, _ = parse_event_request("/a", {"start_time": "2024-05-01T14:00:00 02:00"})  # an unescaped "+"
    assert request.start == datetime(2024, 5, 1, 12, tzinfo=UTC)
    request, _ = parse_event_request("/a", {"oom_events": "true", "oom_kill_events": "true", "creation_events": "false"})
    assert request.event_types == frozenset({"oom", "oomKill"})
    for bad in ({"stream": "yes"}, {"max_events": "ten"}, {"start_time": "2024-05-01"}, {"end_time": "2024-05-01T12:00:00"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            parse_event_request("/", bad)


# -- HTTP: a real uvicorn server -----------------------------------------------------------------------
class Server:
    """uvicorn serving ``routers`` on 127.0.0.1 in a thread."""

    def __init__(self, routers: list[Any], sndbuf: int | None = None) -> None:
        import uvicorn
        from fastapi import FastAPI

        app = FastAPI()
        for router in routers:
            app.include_router(router)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sndbuf is not None:  # inherited by accepted connections: a small send buffer
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 10.0, "uvicorn to start")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(*routers: Any, sndbuf: int | None = None) -> Server:
        server = Server(list(routers), sndbuf)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_http_query_returns_cadvisor_json(serve):
    manager = make_manager(FakeClock(time.time()))
    now = time.time()
    manager.add(ev(manager, "/docker/abc", "containerCreation", now - 10))
    manager.add(ev(manager, "/docker/abc", "oomKill", now - 5, pid=7, process_name="dd"))
    manager.add(ev(manager, "/other", "oomKill", now - 4, pid=8, process_name="x"))
    aliases = {"/web": "/docker/abc"}
    server = serve(events_router(manager, aliases.get))
    for version in ("v1.3", "v2.0"):
        body = requests.get(server.url(f"/api/{version}/events/docker/abc?all_events=true"), timeout=5).json()
        assert [e["event_type"] for e in body] == ["containerCreation", "oomKill"]
        assert body[1]["event_data"] == {"oom": {"pid": 7, "process_name": "dd"}}
        assert set(body[0]) == {"container_name", "timestamp", "event_type", "event_data"}
    # An alias is resolved; no type selected → nothing (as cAdvisor); subcontainers of the root.
    assert len(requests.get(server.url("/api/v1.3/events/web?oom_kill_events=true"), timeout=5).json()) == 1
    assert requests.get(server.url("/api/v1.3/events/docker/abc"), timeout=5).json() == []
    everything = requests.get(server.url("/api/v2.0/events?all_events=true&subcontainers=true&max_events=-1"), timeout=5).json()
    assert len(everything) == 3
    bad = requests.get(server.url("/api/v1.3/events/?max_events=lots"), timeout=5)
    assert bad.status_code == 400 and "max_events" in bad.text
    bad = requests.get(server.url("/api/v1.3/events/?stream=true&all_events=true&start_time=2024-01-01T00:00:00Z"), timeout=5)
    assert bad.status_code == 400 and "start_time" in bad.text


def hang_up(response: requests.Response) -> None:
    """Leave as a client does: shut the connection down (a bare close() from another thread
    leaves the reader's recv() holding the socket open until its timeout)."""
    response.raw.connection.sock.shutdown(socket.SHUT_RDWR)
    response.close()


def read_stream(response: requests.Response, into: list[dict[str, Any]]) -> None:
    try:
        for line in response.iter_lines():
            if line:
                into.append(json.loads(line))
    except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError, AttributeError):
        pass  # closed by the test


def test_stalled_http_client_is_dropped_producers_keep_pace(serve, frozen_heap):
    manager = make_manager(FakeClock(time.time()), watch_queue_size=200)
    server = serve(events_router(manager, lambda name: None), sndbuf=32 * 1024)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", server.port))
    client.sendall(b"GET /api/v1.3/events/?stream=true&all_events=true&subcontainers=true HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: manager.watchers == 1, 5.0, "the stream to be registered")
    now = time.time()
    latencies: list[float] = []
    deadline = time.monotonic() + 20
    i = 0
    # Never read by the client: the socket buffers fill, the server's send waits, the watch's
    # queue fills and the watch is dropped. The producer never waits for any of it.
    while manager.stats.watchers_dropped == 0 and time.monotonic() < deadline and i < 300_000:
        event = ev(manager, f"/c{i % 100}", "containerCreation", now + i * 1e-6)
        t = time.perf_counter()
        manager.add(event)
        latencies.append(time.perf_counter() - t)
        i += 1
        if i % 500 == 0:
            time.sleep(0.001)  # let the server thread run
    client.close()
    assert manager.stats.watchers_dropped == 1, f"not dropped after {i} events"
    assert max(latencies) < 0.05, f"an add() took {max(latencies) * 1000:.1f} ms"
    wait_for(lambda: manager.watchers == 0, 5.0, "the dropped watch to be gone")


def test_stream_delivers_events_live_over_http(serve):
    manager = make_manager(FakeClock(time.time()))
    server = serve(events_router(manager, lambda name: None))
    got: list[dict[str, Any]] = []
    response = requests.get(server.url("/api/v1.3/events/a?stream=true&oom_kill_events=true&subcontainers=true"), stream=True, timeout=10)
    assert response.status_code == 200
    reader = threading.Thread(target=read_stream, args=(response, got), daemon=True)
    reader.start()
    wait_for(lambda: manager.watchers == 1, 5.0, "the stream to be registered")
    for i in range(3):
        sent = time.monotonic()
        manager.add(ev(manager, f"/a/{i}", "oomKill", time.time(), pid=100 + i, process_name="p"))
        manager.add(ev(manager, "/b", "oomKill", time.time(), pid=1, process_name="p"))  # not wanted
        wait_for(lambda n=i: len(got) == n + 1, 2.0, f"event {i} on the stream")
        assert time.monotonic() - sent < 2.0
    assert [e["event_data"]["oom"]["pid"] for e in got] == [100, 101, 102]
    assert [e["container_name"] for e in got] == ["/a/0", "/a/1", "/a/2"]
    hang_up(response)
    wait_for(lambda: manager.watchers == 0, 2.0, "the server to notice the client left")


# -- creation and deletion through a running App ------------------------------------------------------
class EventsApp:
    """A running App, its EventManager and OomWatcher, and every event handed to its sinks."""

    def __init__(self, app: App, events: EventManager, oom: OomWatcher, sunk: list[Event]) -> None:
        self.app, self.events, self.oom, self.sunk = app, events, oom, sunk

    def of(self, name: str, event_type: str) -> list[Event]:
        return self.events.query(EventRequest(container_name=name, event_types=frozenset({event_type}), max_events=-1))


@pytest.fixture
def events_app(tmp_path: Path) -> Iterator[Callable[..., EventsApp]]:
    started: list[EventsApp] = []

    def start(**overrides: Any) -> EventsApp:
        app = App(app_config(tmp_path, **overrides))
        assert app.oom is not None, "oom_event is on by default"
        sunk: list[Event] = []
        forward = app.events.sink

        def sink(event: Event) -> None:
            sunk.append(event)
            if forward is not None:
                forward(event)

        app.events.sink = sink
        app.start()
        wrapped = EventsApp(app, app.events, app.oom, sunk)
        started.append(wrapped)
        return wrapped

    yield start
    for wrapped in started:
        wrapped.app.stop()
        assert not wrapped.oom.running


@pytest.mark.root
def test_real_cgroup_creation_and_deletion_events(events_app, make_cgroup, tmp_path):
    ea = events_app()
    cg = make_cgroup()
    creation = wait_for(lambda: ea.of(cg.name, "containerCreation"), 3.0, "a creation event")[0]
    container = ea.app.manager.get(cg.name)
    assert container is not None
    assert creation.timestamp == container.spec.creation_time  # stamped with the creation time
    assert creation.container is not None and creation.container.name == cg.name
    cg.remove()
    deletion = wait_for(lambda: ea.of(cg.name, "containerDeletion"), 3.0, "a deletion event")[0]
    assert deletion.event_data.exit_code == -1
    assert deletion.timestamp >= creation.timestamp
    assert abs(deletion.timestamp.timestamp() - time.time()) < 5
    # Both reached the sink, and through the hub the jsonl file.
    assert {(e.container_name, e.event_type) for e in ea.sunk} >= {(cg.name, "containerCreation"), (cg.name, "containerDeletion")}
    jsonl = tmp_path / "stats.jsonl"

    def in_file() -> set[str]:
        if not jsonl.exists():
            return set()
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line]
        return {r["event_type"] for r in rows if r.get("container_name") == cg.name}

    wait_for(lambda: in_file() == {"containerCreation", "containerDeletion"}, 5.0, "the events in the jsonl file")


@pytest.mark.root
def test_stream_receives_real_cgroup_events_live(events_app, make_cgroup, serve):
    ea = events_app()
    server = serve(events_router(ea.events, lambda name: None))
    got: list[dict[str, Any]] = []
    response = requests.get(server.url("/api/v2.0/events/?stream=true&all_events=true&subcontainers=true"), stream=True, timeout=10)
    threading.Thread(target=read_stream, args=(response, got), daemon=True).start()
    wait_for(lambda: ea.events.watchers == 1, 5.0, "the stream to be registered")
    cg = make_cgroup()

    def seen(event_type: str) -> bool:
        return any(e["container_name"] == cg.name and e["event_type"] == event_type for e in got)

    wait_for(lambda: seen("containerCreation"), 3.0, "the creation event on the stream")
    cg.remove()
    wait_for(lambda: seen("containerDeletion"), 3.0, "the deletion event on the stream")
    deletion = next(e for e in got if e["container_name"] == cg.name and e["event_type"] == "containerDeletion")
    assert deletion["event_data"] == {"deletion": {"exit_code": -1}}
    hang_up(response)
    wait_for(lambda: ea.events.watchers == 0, 2.0, "the server to notice the client left")


@pytest.mark.root
def test_disabled_type_absent_from_api_and_sink_in_a_running_app(events_app, make_cgroup, serve):
    ea = events_app(event_storage_event_limit="default=1000,containerCreation=0")
    server = serve(events_router(ea.events, lambda name: None))
    cg = make_cgroup()
    wait_for(lambda: ea.app.manager.get(cg.name), 3.0, "discovery")
    cg.remove()
    wait_for(lambda: ea.of(cg.name, "containerDeletion"), 3.0, "the deletion event")
    body = requests.get(server.url(f"/api/v1.3/events{cg.name}?all_events=true"), timeout=5).json()
    assert [e["event_type"] for e in body] == ["containerDeletion"]
    assert all(e.event_type != "containerCreation" for e in ea.sunk)
    assert ea.events.stats.dropped_disabled.get("containerCreation", 0) >= 1


@pytest.mark.root
@pytest.mark.docker
def test_docker_container_events_carry_docker_exit_code(events_app, docker_engine, busybox_image, make_container):
    ea = events_app(docker_endpoint=docker_engine.endpoint, docker_only=True)
    name = f"ce-ev-{uuid.uuid4().hex[:8]}"
    container = make_container(busybox_image, ["sh", "-c", "sleep 1; exit 3"], name=name)
    found = wait_for(lambda: ea.app.manager.resolve("docker", name), 3.0, "the docker container")
    creation = wait_for(lambda: ea.of(found.name, "containerCreation"), 3.0, "a creation event")[0]
    assert creation.container is not None and creation.container.id == container.id
    assert creation.timestamp == found.spec.creation_time
    deletion = wait_for(lambda: ea.of(found.name, "containerDeletion"), 10.0, "a deletion event")[0]
    assert deletion.event_data.exit_code == 3
    assert deletion.container is not None and deletion.container.id == container.id


def test_deletion_of_a_container_docker_forgot_is_minus_one():
    class Forgetful:
        def inspect(self, cid: str) -> None:
            return None

    class Unreachable:
        def inspect(self, cid: str) -> None:
            raise ConnectionError("down")

    class Slow:
        """Shows the container running twice before the exit is recorded."""

        def __init__(self) -> None:
            self.calls = 0

        def inspect(self, cid: str) -> dict[str, Any]:
            self.calls += 1
            running = self.calls < 3
            return {"State": {"Running": running, "Status": "running" if running else "exited", "ExitCode": 0 if running else 137}}

    for docker, expected in ((Forgetful(), -1), (Unreachable(), -1), (Slow(), 137)):
        manager = make_manager(docker=docker)  # type: ignore[arg-type]
        assert manager.docker_exit_code("abc") == expected
    waited = make_manager(docker=Slow(), exit_code_wait_s=0.0)  # type: ignore[arg-type]
    assert waited.docker_exit_code("abc") == -1  # still running when the wait is over


def test_creation_falls_back_to_now_without_a_creation_time():
    clock = FakeClock(T0)
    manager = make_manager(clock)
    container = SimpleNamespace(name="/x", spec=SimpleNamespace(creation_time=None), ref=ContainerReference(name="/x"))
    manager.container_added(container)  # type: ignore[arg-type]
    (event,) = manager.query(EventRequest(max_events=-1))
    assert event.timestamp == datetime.fromtimestamp(T0, UTC)
    created = datetime.fromtimestamp(T0, UTC) - timedelta(hours=1)
    container = SimpleNamespace(name="/y", spec=SimpleNamespace(creation_time=created), ref=ContainerReference(name="/y"))
    manager.container_added(container)  # type: ignore[arg-type]
    assert manager.query(EventRequest(container_name="/y"))[0].timestamp == created
    # A raw container's deletion: no Docker to ask.
    manager.container_removed(container)  # type: ignore[arg-type]
    assert manager.query(EventRequest(container_name="/y", event_types=frozenset({"containerDeletion"})))[0].event_data.exit_code == -1
