"""Delivery end to end: the exporter on real cgroups, every store for real, faults injected.

The jsonl sink runs beside the stores in the same exporter and is the reference: every record
it got must reach every store.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from exporter.app import App
from exporter.config import Config
from sinks.protocol import AUTH, UNREACHABLE
from tests.test_pipeline import wait_for

pytestmark = pytest.mark.root


@dataclass
class Ref:
    """A record as the jsonl sink wrote it."""

    record_id: str
    run_id: str
    name: str
    container_id: str
    seq: int
    ts: datetime
    position: int


def reference(path: Path) -> list[Ref]:
    out = []
    stats_lines = [r for r in map(json.loads, path.read_text().splitlines()) if "event_type" not in r]
    for position, r in enumerate(stats_lines):
        c = r["container"]
        out.append(Ref(r["record_id"], r["run_id"], c["name"], c["id"] or c["name"], r["seq"], datetime.fromisoformat(r["timestamp"]), position))
    return out


def assert_gapless(refs: list[Ref]) -> None:
    by: dict[tuple[str, str], list[int]] = defaultdict(list)
    for ref in refs:
        by[(ref.run_id, ref.name)].append(ref.seq)
    for key, seqs in by.items():
        assert sorted(seqs) == list(range(1, len(seqs) + 1)), key


class Stores:
    """The four stores, each with the sink settings that point at it and a way to read back
    which records it holds (record id → how many times)."""

    def __init__(self, influxdb_v1: Any, database: str, victoria_metrics: Any, kafka_broker: Any, opensearch_server: Any) -> None:
        self.influx, self.db = influxdb_v1, database
        self.vm = victoria_metrics
        self.kafka = kafka_broker
        self.es = opensearch_server
        tag = uuid.uuid4().hex[:8]
        self.topic = kafka_broker.create_topic(f"ce-faults-{tag}", partitions=3)
        self.index = f"ce-faults-{tag}-stats"

    def sink_config(self, timeout: str = "5s") -> dict[str, Any]:
        common = {"timeout": timeout, "max_backoff": "1s", "buffer_duration": "200ms", "shutdown_timeout": "5s"}
        return {
            "influxdb": {**common, "api": "v1", "url": self.influx.url, "database": self.db},
            "kafka": {**common, "bootstrap_servers": [self.kafka.bootstrap], "topic": self.topic},
            "elasticsearch": {
                **common, "hosts": [self.es.url], "compatibility": "opensearch",
                "index": self.index + "-%Y.%m.%d", "events_index": self.index + "-events-%Y.%m.%d",
                "template_name": self.index,
            },
        }

    def in_influx(self) -> Counter[str]:
        """InfluxDB keeps one point per series and time, so a record cannot be there twice;
        each of its points (cpu, memory, ...) carries its record_id."""
        rows = self.influx.rows('SELECT "record_id" FROM /^container_/', db=self.db)
        return Counter({row["record_id"]: 1 for row in rows if row.get("record_id")})

    def in_kafka(self) -> Counter[str]:
        return Counter(dict(m.headers)["record_id"].decode() for m in self.kafka.consume(self.topic))  # stats only: events have their own topic

    def in_es(self) -> Counter[str]:
        return Counter(hit["_id"] for hit in self.es.search(self.index + "-2*"))  # the dated stats indices

    def in_vm(self, refs: list[Ref]) -> Counter[str]:
        """VictoriaMetrics keeps no string fields: a record is found by cgroup and timestamp."""
        # nanoseconds arrive, milliseconds are kept (truncated)
        wanted = {(r.name, int(r.ts.timestamp()) * 1000 + r.ts.microsecond // 1000): r.record_id for r in refs}
        found: Counter[str] = Counter()
        for series in self.vm.export('{__name__=~"container_.*",cgroup!=""}'):
            for ts, n in Counter(series.timestamps_ms).items():
                rid = wanted.get((series.labels.get("cgroup"), ts))
                if rid is not None:
                    found[rid] = max(found[rid], n)  # a record written twice repeats its samples
        return found


@pytest.fixture
def stores(influxdb_v1, influxdb_v1_database, victoria_metrics, kafka_broker, opensearch_server) -> Iterator[Stores]:
    s = Stores(influxdb_v1, influxdb_v1_database, victoria_metrics, kafka_broker, opensearch_server)
    try:
        yield s
    finally:
        for server in (influxdb_v1, victoria_metrics, kafka_broker):
            server.restore()
        opensearch_server.resume()


def app_config(tmp_path: Path, stores: Stores, drivers: list[str], **overrides: Any) -> Config:
    sinks = {name: settings for name, settings in stores.sink_config().items() if name in drivers}
    sinks["jsonl"] = {"path": str(tmp_path / "reference.jsonl"), "buffer_duration": "100ms"}
    for name, extra in overrides.pop("sink_overrides", {}).items():
        sinks[name] = {**sinks.get(name, {}), **extra}
    data: dict[str, Any] = {
        "housekeeping_interval": "500ms",
        "allow_dynamic_housekeeping": False,
        "global_housekeeping_interval": "1h",
        "docker_endpoint": "unix:///nonexistent/docker.sock",
        "state_dir": str(tmp_path / "state"),
        "listen_ip": "127.0.0.1",
        "port": 0,
        "storage_driver": ["jsonl", *drivers],
        "sinks": sinks,
    }
    data.update(overrides)
    return Config.model_validate(data)


def drained(app: App) -> bool:
    return all(not w.degraded and w.stats.queue_depth == 0 for w in app.hub.workers)


def worker(app: App, name: str) -> Any:
    return next(w for w in app.hub.workers if w.name == name)


ALL = ["influxdb", "kafka", "elasticsearch"]


def assert_all_delivered(stores: Stores, refs: list[Ref], drivers: list[str], exactly_once: set[str]) -> dict[str, int]:
    """Every reference record is in every store; in ``exactly_once`` stores only once.
    Returns the duplicates seen per store."""
    ids = {r.record_id for r in refs}
    held = {"influxdb": stores.in_influx, "kafka": stores.in_kafka, "elasticsearch": stores.in_es}
    duplicates = {}
    for name in drivers:
        got = wait_for(lambda n=name: (c := held[n]()) and ids <= set(c) and c, 30, f"every record in {name}")
        assert ids <= set(got), f"{name} lacks {len(ids - set(got))} records"
        duplicates[name] = sum(n - 1 for rid, n in got.items() if rid in ids)
        if name in exactly_once:
            assert duplicates[name] == 0, f"{name} holds duplicates"
    return duplicates


def test_every_record_arrives_exactly_once(tmp_path, stores):
    app = App(app_config(tmp_path, stores, ALL))
    app.start()
    time.sleep(4)
    wait_for(lambda: drained(app), 30, "delivery")
    app.stop()
    refs = reference(tmp_path / "reference.jsonl")
    assert len(refs) >= 20
    assert_gapless(refs)
    assert_all_delivered(stores, refs, ALL, exactly_once=set(ALL))
    for w in app.hub.workers:
        assert w.stats.dropped == 0 and w.stats.spool_pending == 0, (w.name, w.summary())
    # Kafka keys are container ids (the cgroup name for raw cgroups); values are the records.
    by_id = {r.record_id: r for r in refs}
    for message in stores.kafka.consume(stores.topic):
        ref = by_id[dict(message.headers)["record_id"].decode()]
        assert message.key.decode() == ref.container_id
        assert json.loads(message.value)["seq"] == ref.seq


def test_v2_write_path_reaches_victoria_metrics(tmp_path, stores):
    config = app_config(
        tmp_path, stores, ["influxdb"],
        sink_overrides={"influxdb": {"api": "v2", "url": stores.vm.url, "token": "t", "org": "o", "bucket": "b"}},
    )
    app = App(config)
    app.start()
    time.sleep(3)
    wait_for(lambda: drained(app), 30, "delivery")
    app.stop()
    refs = reference(tmp_path / "reference.jsonl")
    ids = {r.record_id for r in refs}
    found = wait_for(lambda: (f := stores.in_vm(refs)) and set(f) == ids and f, 30, "every record in VictoriaMetrics")
    assert set(found) == ids
    assert set(found.values()) == {1}


def test_store_paused_20s_loses_nothing_and_collection_keeps_its_cadence(tmp_path, stores, frozen_heap):
    """influxd and Kafka are stopped (SIGSTOP) for 20 s; 10 s later OpenSearch too, for 20 s.
    While one pair is frozen the other keeps receiving; nothing is lost; collection never
    slows down."""
    app = App(app_config(tmp_path, stores, ALL))
    app.start()
    try:
        time.sleep(2)
        stores.influx.pause()
        stores.kafka.pause()
        paused_a = time.monotonic()
        time.sleep(10)
        es_sent = worker(app, "elasticsearch").stats.sent
        stores.es.pause()
        time.sleep(paused_a + 20 - time.monotonic())
        stores.influx.resume()
        stores.kafka.resume()
        influx_sent = worker(app, "influxdb").stats.sent
        time.sleep(10)
        stores.es.resume()
        # While the others were frozen, OpenSearch and influxd kept taking records.
        assert es_sent > 0 and worker(app, "influxdb").stats.sent > influx_sent
        wait_for(lambda: drained(app), 60, "the spools to drain")
    finally:
        stores.influx.resume()
        stores.kafka.resume()
        stores.es.resume()
        app.stop()
    refs = reference(tmp_path / "reference.jsonl")
    assert_gapless(refs)
    duplicates = assert_all_delivered(stores, refs, ALL, exactly_once={"influxdb", "elasticsearch"})
    # Cadence: no gap between a container's samples beyond one and a half intervals.
    by_name: dict[str, list[float]] = defaultdict(list)
    for ref in refs:
        by_name[ref.name].append(ref.ts.timestamp())
    start = min(ref.ts.timestamp() for ref in refs)
    for name, stamps in by_name.items():
        stamps.sort()
        gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        worst = max(range(len(gaps)), key=gaps.__getitem__)
        assert gaps[worst] < 0.75, f"{name}: {gaps[worst]:.3f} s between samples {stamps[worst] - start:.2f} s into the run"
    assert app.scheduler.stats.skipped_overlap == 0
    for w in app.hub.workers:
        assert w.stats.dropped == 0, w.summary()
    spooled = {w.name: w.stats.spooled for w in app.hub.workers}
    assert spooled["influxdb"] > 0 and spooled["kafka"] > 0 and spooled["elasticsearch"] > 0
    # A batch in flight when Kafka froze can be written twice (the broker completes it after
    # the client gave up); each copy carries the same record_id header.
    logging.getLogger(__name__).info("duplicates after the pause: %s", duplicates)


def test_store_down_across_an_exporter_restart(tmp_path, stores):
    """Stores killed; the exporter runs, stops, starts again while they are down; stores come
    back: every spooled record of both runs arrives, no gap in seq."""
    stores.influx.stop(kill=True)
    stores.kafka.stop(kill=True)
    stores.es.stop()
    config = app_config(tmp_path, stores, ALL)
    first = App(config)
    first.start()
    time.sleep(3)
    first.stop()
    for w in first.hub.workers:
        if w.name != "jsonl":
            assert w.stats.sent == 0 and w.stats.spool_pending > 0 and w.stats.dropped == 0, w.summary()
    second = App(config)
    second.start()
    try:
        time.sleep(2)
        stores.influx.start()
        stores.kafka.start()
        stores.kafka.create_topic(stores.topic, partitions=3)  # the broker keeps topics in memory
        stores.es.start()
        wait_for(lambda: drained(second), 90, "the spools of both runs to drain")
    finally:
        second.stop()
    refs = reference(tmp_path / "reference.jsonl")
    assert len({r.run_id for r in refs}) == 2
    assert_gapless(refs)
    assert_all_delivered(stores, refs, ALL, exactly_once=set(ALL))
    for w in second.hub.workers:
        assert w.stats.dropped == 0, w.summary()


def test_outage_longer_than_the_spool_drops_the_oldest_and_counts(tmp_path, stores):
    stores.es.stop()
    config = app_config(
        tmp_path, stores, ["elasticsearch"],
        housekeeping_interval="100ms",
        event_storage_event_limit="default=0",  # stats only, so the reference covers every spooled record
        sink_overrides={"elasticsearch": {"spool_max_bytes": 60_000}},
    )
    app = App(config)
    app.start()
    try:
        wait_for(lambda: worker(app, "elasticsearch").stats.dropped_reasons.get("spool full", 0) > 0, 60, "the spool to overflow")
        time.sleep(1)
        stores.es.start()
        wait_for(lambda: drained(app), 60, "the spool to drain")
    finally:
        app.stop()
    refs = reference(tmp_path / "reference.jsonl")
    stats = worker(app, "elasticsearch").stats
    got = stores.in_es()
    delivered = [r for r in refs if r.record_id in got]
    lost = [r for r in refs if r.record_id not in got]
    assert stats.dropped == stats.dropped_reasons["spool full"] == len(lost) > 0
    assert len(delivered) + stats.dropped == len(refs)
    # the oldest went first
    assert max(r.position for r in lost) < min(r.position for r in delivered)


def test_wrong_credentials_and_unknown_host_are_reported_once_and_counted(tmp_path, stores, influxdb_v1_auth, caplog):
    config = app_config(
        tmp_path, stores, ALL,
        sink_overrides={
            "influxdb": {"url": influxdb_v1_auth.url, "username": "admin", "password": "wrong", "timeout": "1s"},
            "kafka": {"bootstrap_servers": ["no-such-broker.invalid:9092"], "timeout": "1s"},
            "elasticsearch": {"hosts": ["http://no-such-node.invalid:9200"], "timeout": "1s"},
        },
    )
    app = App(config)
    with caplog.at_level(logging.INFO):
        app.start()
        time.sleep(6)
        jsonl_sent = worker(app, "jsonl").stats.sent
        app.stop()
    assert jsonl_sent > 20, "collection carried on"
    expected = {"influxdb": AUTH, "kafka": UNREACHABLE, "elasticsearch": UNREACHABLE}
    for name, category in expected.items():
        stats = worker(app, name).stats
        assert stats.errors_by_category.get(category, 0) >= 2, (name, stats.errors_by_category)
        assert stats.sent == 0 and stats.dropped == 0 and stats.spool_pending > 0, worker(app, name).summary()
        lines = [r for r in caplog.records if r.levelno >= logging.ERROR and f"sink {name}:" in r.getMessage()]
        assert len(lines) == 1, [r.getMessage() for r in lines]
        assert f"({category})" in lines[0].getMessage()


def test_events_reach_the_stores_and_a_disabled_type_reaches_none(tmp_path, stores, make_cgroup):
    """containerCreation set to 0: absent from the API and from the real Kafka events topic;
    deletions arrive there, keyed by container."""
    import httpx

    events_topic = stores.kafka.create_topic(f"ce-events-{uuid.uuid4().hex[:8]}")
    config = app_config(
        tmp_path, stores, ["kafka", "elasticsearch"],
        event_storage_event_limit="default=100000,containerCreation=0",
        sink_overrides={"kafka": {"events_topic": events_topic}},
    )
    app = App(config)
    app.start()
    try:
        cgroups = [make_cgroup() for _ in range(3)]
        for cg in cgroups:
            wait_for(lambda cg=cg: app.manager.get(cg.name), 5, "discovery")
        for cg in cgroups:
            cg.remove()
        names = {cg.name for cg in cgroups}
        wait_for(lambda: all(app.manager.get(n) is None for n in names), 5, "removal")
        url = f"http://127.0.0.1:{app.api.port}/api/v1.3/events/"
        answer = httpx.get(url, params={"all_events": "true", "subcontainers": "true", "max_events": "-1"}).json()
        mine = [e for e in answer if e["container_name"] in names]
        assert {e["event_type"] for e in mine} == {"containerDeletion"}
        assert {e["container_name"] for e in mine} == names
        wait_for(lambda: drained(app), 30, "delivery")
    finally:
        app.stop()
    messages = stores.kafka.consume(events_topic, count=3)
    types = Counter(json.loads(m.value)["event_type"] for m in messages)
    assert types == Counter({"containerDeletion": len(messages)}) and len(messages) >= 3
    mine = [m for m in messages if json.loads(m.value)["container_name"] in names]
    assert len(mine) == 3
    for m in mine:
        assert m.key.decode() == json.loads(m.value)["container_name"]  # raw cgroups: their name is their id
        assert dict(m.headers)["record_type"] == b"event"
    es_events = stores.es.search(stores.index + "-events-*")
    assert {h["_source"]["container_name"] for h in es_events} >= names
    assert {h["_source"]["event_type"] for h in es_events} == {"containerDeletion"}
