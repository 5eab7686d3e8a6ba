"""The InfluxDB sink against real servers: influxd 1.x (api = "v1", read back with InfluxQL) and
VictoriaMetrics (api = "v2" through its /api/v2/write, read back with /api/v1/export).

The records are this host's real cgroup samples (``App.collect_once``), copied with distinct
timestamps, sequence numbers and record ids; one copy is dressed up as a labelled Docker
container with a disk so that every stat group and tag is exercised.
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from exporter.models import ContainerReference, ContainerStats, DiskIoDevice, Envelope
from sinks.influxdb import InfluxDBSettings, InfluxDBSink
from sinks.protocol import AUTH, ERROR, REJECTED, THROTTLED, UNREACHABLE, PartialFailure, SinkError
from tests.infra.influx import InfluxDB1, Series, VictoriaMetrics
from tests.infra.procs import free_port
from tests.records import collect_host_records

DOCKER_ID = "f" * 12 + "0123456789abcdef" * 3 + "0" * 4
LABELS = {"app": "shop front", "tier": "web,blue", "unlisted": "never written"}
LABEL_TAGS = ["app", "tier", "missing"]
ROOT = Path(__file__).resolve().parent.parent
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# -- records ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host_records() -> list[ContainerStats]:
    """One real record per cgroup of this host, plus a labelled "Docker container" with a disk."""
    records = collect_host_records()
    assert records, "collect_once found no cgroups on this host"
    assert any(r.cpu and r.cpu.total_ns for r in records), "no record with CPU figures"
    assert any(r.memory and r.memory.usage_bytes for r in records), "no record with memory figures"
    richest = max(records, key=lambda r: bool(r.network) + bool(r.filesystem) + bool(r.pressure) + bool(r.cpu))
    dressed = richest.model_copy(
        update={
            "container": ContainerReference(
                name=f"/docker/{DOCKER_ID}",
                id=DOCKER_ID,
                aliases=["web-1", DOCKER_ID],
                namespace="docker",
                runtime="docker",
                labels=LABELS,
                image="nginx:1.25",
            ),
            "diskio": [DiskIoDevice(major=8, minor=0, device="sda", read_bytes=4096, write_bytes=8192, read_ops=3, write_ops=5)],
        }
    )
    return [*records, dressed]


def make_batch(base: list[ContainerStats], copies: int, host: str) -> list[ContainerStats]:
    """``copies`` samples of every base record: 1 s apart, seq 1..copies, fresh record ids, the
    CPU total moved by the copy number so that each record's value is its own."""
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    out = []
    for k in range(copies):
        for j, r in enumerate(base):
            cpu = r.cpu
            if cpu is not None and cpu.total_ns is not None:
                cpu = cpu.model_copy(update={"total_ns": cpu.total_ns + k})
            ts = t0 + timedelta(seconds=k, milliseconds=j, microseconds=123)
            out.append(r.model_copy(update={"timestamp": ts, "seq": k + 1, "record_id": uuid.uuid4().hex, "hostname": host, "cpu": cpu}))
    return out


def ns(ts: datetime) -> int:
    return (ts - _EPOCH) // timedelta(microseconds=1) * 1000


def container_name(r: ContainerStats) -> str:
    return r.container.aliases[0] if r.container.aliases else r.container.name


def unique_host() -> str:
    return f"host-{uuid.uuid4().hex[:10]}"


# -- sinks -----------------------------------------------------------------------------------------


def v1_settings(server: InfluxDB1, db: str, **kw: Any) -> InfluxDBSettings:
    return InfluxDBSettings(api="v1", url=server.url, database=db, timeout=kw.pop("timeout", 10), **kw)


def v2_settings(server: VictoriaMetrics, **kw: Any) -> InfluxDBSettings:
    kw.setdefault("token", "unused-by-victoria-metrics")
    return InfluxDBSettings(api="v2", url=server.url, org="test-org", bucket="test-bucket", timeout=kw.pop("timeout", 10), **kw)


def write(settings: InfluxDBSettings, records: list[Any], batch_size: int = 0) -> InfluxDBSink:
    sink = InfluxDBSink(settings)
    sink.open()
    try:
        step = batch_size or len(records)
        for i in range(0, len(records), step):
            sink.write_batch(records[i : i + step])
        sink.flush()
    finally:
        sink.close()
    return sink


def write_error(settings: InfluxDBSettings, records: list[Any], expected: type[SinkError] = SinkError) -> tuple[Any, float]:
    """The error (of type ``expected``) a write of ``records`` raises, and how long it took."""
    sink = InfluxDBSink(settings)
    sink.open()
    start = time.monotonic()
    try:
        with pytest.raises(expected) as info:
            sink.write_batch(records)
    finally:
        sink.close()
    return info.value, time.monotonic() - start


# -- v1: influxd 1.x -------------------------------------------------------------------------------


def by_key(rows: list[dict[str, Any]], *keys: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        key = tuple(row.get(k) for k in keys)
        assert key not in out, f"two points for {key}"
        out[key] = row
    return out


@pytest.mark.parametrize("gzip", [True, False], ids=["gzip", "plain"])
def test_v1_every_record_arrives_once_with_its_values(
    influxdb_v1: InfluxDB1, influxdb_v1_database: str, host_records: list[ContainerStats], gzip: bool
) -> None:
    db = influxdb_v1_database
    records = make_batch(host_records, copies=6, host=unique_host())
    write(v1_settings(influxdb_v1, db, gzip=gzip, label_tags=LABEL_TAGS), records, batch_size=20)

    # CPU: one point per record that has CPU figures, each record once, values and time its own.
    with_cpu = [r for r in records if r.cpu and r.cpu.total_ns is not None]
    rows = influxdb_v1.rows("SELECT * FROM container_cpu", db=db)
    assert Counter(row["record_id"] for row in rows) == Counter(r.record_id for r in with_cpu)
    cpu_rows = by_key(rows, "record_id")
    for r in with_cpu:
        row = cpu_rows[(r.record_id,)]
        assert row["time"] == ns(r.timestamp)
        assert (row["total_ns"], row["user_ns"], row["system_ns"]) == (r.cpu.total_ns, r.cpu.user_ns, r.cpu.system_ns)
        assert row["seq"] == r.seq
        assert row["cgroup"] == r.container.name
        assert row["container_name"] == container_name(r)
        assert row["host"] == r.hostname and row["machine_id"] == r.machine_id
    # Per container: seq 1..6, once each.
    seqs: dict[str, list[int]] = {}
    for row in rows:
        seqs.setdefault(row["cgroup"], []).append(row["seq"])
    assert {c: sorted(s) for c, s in seqs.items()} == {r.container.name: [1, 2, 3, 4, 5, 6] for r in with_cpu}

    per_cpu = by_key(influxdb_v1.rows("SELECT * FROM container_cpu_per_cpu", db=db), "record_id", "cpu")
    expected_per_cpu = {(r.record_id, str(i)): v for r in records if r.cpu and r.cpu.per_cpu_ns for i, v in enumerate(r.cpu.per_cpu_ns)}
    assert {k: row["usage_ns"] for k, row in per_cpu.items()} == expected_per_cpu

    memory = by_key(influxdb_v1.rows("SELECT * FROM container_memory", db=db), "record_id")
    with_memory = [r for r in records if r.memory]
    assert len(memory) == len(with_memory)
    for r in with_memory:
        row = memory[(r.record_id,)]
        assert (row["usage_bytes"], row["working_set_bytes"], row["cache_bytes"], row["pgfault"]) == (
            r.memory.usage_bytes,
            r.memory.working_set_bytes,
            r.memory.cache_bytes,
            r.memory.pgfault,
        )

    network = by_key(influxdb_v1.rows("SELECT * FROM container_network", db=db), "record_id", "interface")
    expected_net = {(r.record_id, n.name): (n.rx_bytes, n.tx_bytes, n.rx_packets, n.tx_errors) for r in records for n in r.network or ()}
    assert expected_net, "no record with network figures on this host"
    assert {k: (v["rx_bytes"], v["tx_bytes"], v["rx_packets"], v["tx_errors"]) for k, v in network.items()} == expected_net

    diskio = by_key(influxdb_v1.rows("SELECT * FROM container_diskio", db=db), "record_id", "major", "minor")
    expected_io = {(r.record_id, str(d.major), str(d.minor)): (d.device, d.read_bytes, d.write_bytes, d.read_ops, d.write_ops) for r in records for d in r.diskio or ()}
    assert {k: (v["device"], v["read_bytes"], v["write_bytes"], v["read_ops"], v["write_ops"]) for k, v in diskio.items()} == expected_io

    processes = by_key(influxdb_v1.rows("SELECT * FROM container_processes", db=db), "record_id")
    for r in records:
        if r.processes and r.processes.threads is not None:
            assert processes[(r.record_id,)]["threads"] == r.processes.threads

    pressure = by_key(influxdb_v1.rows("SELECT * FROM container_pressure", db=db), "record_id", "resource", "kind")
    expected_psi = {
        (r.record_id, resource, kind): (line.avg10, line.avg300, line.total_us)
        for r in records
        if r.pressure
        for resource in ("cpu", "memory", "io")
        if getattr(r.pressure, resource)
        for kind in ("some", "full")
        if (line := getattr(getattr(r.pressure, resource), kind))
    }
    assert {k: (v["avg10"], v["avg300"], v["total_us"]) for k, v in pressure.items()} == expected_psi

    filesystem = by_key(influxdb_v1.rows("SELECT * FROM container_filesystem", db=db), "record_id", "device")
    expected_fs = {(r.record_id, f.device): (f.usage_bytes, f.capacity_bytes, f.mountpoint) for r in records for f in r.filesystem or ()}
    assert {k: (v["usage_bytes"], v["capacity_bytes"], v["mountpoint"]) for k, v in filesystem.items()} == expected_fs

    # Integers stay integers, the PSI averages are floats, the id is a string.
    assert influxdb_v1.field_keys(db, "container_cpu")["total_ns"] == "integer"
    assert influxdb_v1.field_keys(db, "container_cpu")["record_id"] == "string"
    assert influxdb_v1.field_keys(db, "container_pressure")["avg10"] == "float"


def test_v1_tags_labels_and_container_id_field(influxdb_v1: InfluxDB1, influxdb_v1_database: str, host_records: list[ContainerStats]) -> None:
    db = influxdb_v1_database
    records = make_batch(host_records, copies=2, host=unique_host())
    write(v1_settings(influxdb_v1, db, label_tags=LABEL_TAGS), records)

    rows = influxdb_v1.rows(f"SELECT * FROM container_memory WHERE cgroup = '/docker/{DOCKER_ID}'", db=db)
    assert len(rows) == 2
    for row in rows:
        assert row["container_name"] == "web-1"
        assert row["namespace"] == "docker" and row["runtime"] == "docker" and row["image"] == "nginx:1.25"
        assert row["label_app"] == "shop front" and row["label_tier"] == "web,blue"
        assert row["container_id"] == DOCKER_ID  # a field by default
    tag_keys = influxdb_v1.tag_keys(db, "container_memory")
    assert {"host", "machine_id", "container_name", "cgroup", "namespace", "runtime", "image", "label_app", "label_tier"} <= tag_keys
    assert "label_unlisted" not in tag_keys and "label_missing" not in tag_keys and "container_id" not in tag_keys
    assert influxdb_v1.field_keys(db, "container_memory")["container_id"] == "string"
    # A record without labels or id has no such tags and no container_id field.
    root = influxdb_v1.rows("SELECT * FROM container_memory WHERE cgroup = '/'", db=db)
    assert root and all(row.get("label_app") is None and row.get("container_id") is None for row in root)


def test_v1_container_id_as_tag(influxdb_v1: InfluxDB1, influxdb_v1_database: str, host_records: list[ContainerStats]) -> None:
    db = influxdb_v1_database
    records = make_batch(host_records, copies=2, host=unique_host())
    write(v1_settings(influxdb_v1, db, container_id_as_tag=True), records)

    assert "container_id" in influxdb_v1.tag_keys(db, "container_cpu")
    assert "container_id" not in influxdb_v1.field_keys(db, "container_cpu")
    rows = influxdb_v1.rows(f"SELECT total_ns, container_id FROM container_cpu WHERE container_id = '{DOCKER_ID}'", db=db)
    assert len(rows) == 2


def test_v1_awkward_names_and_values_round_trip(influxdb_v1: InfluxDB1, influxdb_v1_database: str, host_records: list[ContainerStats]) -> None:
    db = influxdb_v1_database
    [record] = make_batch(host_records[-1:], copies=1, host="host with spaces,commas=equals")
    ref = record.container.model_copy(
        update={
            "aliases": ['web "1", α=β'],
            "labels": {"app": "a b,c=d", "path": "C:\\"},
            "image": "registry:5000/img:1 2",
            "id": 'id"with\\quote',
        }
    )
    write(v1_settings(influxdb_v1, db, label_tags=["app", "path"]), [record.model_copy(update={"container": ref})])

    [row] = influxdb_v1.rows("SELECT * FROM container_memory", db=db)
    assert row["host"] == "host with spaces,commas=equals"
    assert row["container_name"] == 'web "1", α=β'
    assert row["label_app"] == "a b,c=d"
    assert row["image"] == "registry:5000/img:1 2"
    assert row["container_id"] == 'id"with\\quote'  # a string field: quote and backslash escaped
    # InfluxDB 1.x cannot take a tag value ending in a backslash, escaped or not: it is dropped.
    assert row["label_path"] == "C:"
    assert row["usage_bytes"] == record.memory.usage_bytes


CADVISOR_SERIES = {
    "cpu_usage_total",
    "cpu_usage_system",
    "cpu_usage_user",
    "cpu_usage_per_cpu",
    "memory_usage",
    "memory_max_usage",
    "memory_cache",
    "memory_rss",
    "memory_swap",
    "memory_mapped_file",
    "memory_working_set",
    "memory_failcnt",
    "memory_failure",
    "rx_bytes",
    "rx_errors",
    "tx_bytes",
    "tx_errors",
    "fs_usage",
    "fs_limit",
}


def test_v1_cadvisor_layout(influxdb_v1: InfluxDB1, influxdb_v1_database: str, host_records: list[ContainerStats]) -> None:
    db = influxdb_v1_database
    host = unique_host()
    records = make_batch(host_records, copies=3, host=host)
    write(v1_settings(influxdb_v1, db, layout="cadvisor", label_tags=["app"]), records)

    measurements = set(influxdb_v1.measurements(db))
    assert CADVISOR_SERIES <= measurements
    assert not any(m.startswith("container_") for m in measurements)
    # load_average only where the reader measured it.
    assert ("load_average" in measurements) == any(r.cpu and r.cpu.load_average_milli is not None for r in records)

    for measurement in CADVISOR_SERIES:
        assert set(influxdb_v1.field_keys(db, measurement)) == {"value"}, measurement
        assert {"machine", "container_name"} <= influxdb_v1.tag_keys(db, measurement)

    totals = by_key(influxdb_v1.rows("SELECT * FROM cpu_usage_total", db=db), "container_name", "time")
    expected = {(container_name(r), ns(r.timestamp)): r.cpu.total_ns for r in records if r.cpu and r.cpu.total_ns is not None}
    assert {k: v["value"] for k, v in totals.items()} == expected
    assert {row["machine"] for row in totals.values()} == {host}

    working_set = by_key(influxdb_v1.rows("SELECT * FROM memory_working_set", db=db), "container_name", "time")
    assert {k: v["value"] for k, v in working_set.items()} == {
        (container_name(r), ns(r.timestamp)): r.memory.working_set_bytes for r in records if r.memory and r.memory.working_set_bytes is not None
    }

    per_cpu = by_key(influxdb_v1.rows("SELECT * FROM cpu_usage_per_cpu", db=db), "container_name", "instance", "time")
    assert {k: v["value"] for k, v in per_cpu.items()} == {
        (container_name(r), str(i), ns(r.timestamp)): v for r in records if r.cpu and r.cpu.per_cpu_ns for i, v in enumerate(r.cpu.per_cpu_ns)
    }

    rx = by_key(influxdb_v1.rows("SELECT * FROM rx_bytes", db=db), "container_name", "time")
    assert {k: v["value"] for k, v in rx.items()} == {(container_name(r), ns(r.timestamp)): r.network[0].rx_bytes for r in records if r.network}

    fs = by_key(influxdb_v1.rows("SELECT * FROM fs_limit", db=db), "container_name", "device", "time")
    assert {k: (v["value"], v["type"]) for k, v in fs.items()} == {
        (container_name(r), f.device, ns(r.timestamp)): (f.capacity_bytes, "limit") for r in records for f in r.filesystem or ()
    }
    failures = influxdb_v1.rows("SELECT * FROM memory_failure", db=db)
    assert {(row["failure_type"], row["scope"]) for row in failures} == {("pgfault", "hierarchical"), ("pgmajfault", "hierarchical")}

    # cAdvisor writes container labels as tags under their own names (ours: the listed ones).
    labelled = influxdb_v1.rows("SELECT * FROM memory_usage WHERE container_name = 'web-1'", db=db)
    assert len(labelled) == 3 and all(row["app"] == "shop front" for row in labelled)


def test_v1_wrong_credentials_are_auth_errors(influxdb_v1_auth: InfluxDB1, host_records: list[ContainerStats]) -> None:
    server = influxdb_v1_auth
    db = f"auth_{uuid.uuid4().hex[:8]}"
    server.create_database(db)
    records = make_batch(host_records, copies=1, host=unique_host())

    for credentials in ({"username": server.admin_user, "password": "wrong"}, {"username": "nobody", "password": "x"}, {}):
        error, _ = write_error(v1_settings(server, db, **credentials), records)
        assert error.category == AUTH and error.retryable, (credentials, error)
        assert "401" in str(error)

    write(v1_settings(server, db, username=server.admin_user, password=server.admin_password), records)
    assert len(server.rows("SELECT * FROM container_cpu", db=db)) == sum(1 for r in records if r.cpu and r.cpu.total_ns is not None)


def test_v1_field_type_conflict_is_a_partial_failure_naming_the_records(
    influxdb_v1: InfluxDB1, influxdb_v1_database: str, host_records: list[ContainerStats]
) -> None:
    db = influxdb_v1_database
    records = make_batch(host_records, copies=2, host=unique_host())
    # Someone else made usage_bytes a float in this shard (same week as the records).
    status, body = influxdb_v1.write_lines(f"container_memory,host=other usage_bytes=1.5 {ns(records[0].timestamp)}", db=db)
    assert status == 204, body

    error, _ = write_error(v1_settings(influxdb_v1, db), records, PartialFailure)
    expected = [i for i, r in enumerate(records) if r.memory and r.memory.usage_bytes is not None]
    assert expected
    assert error.rejected == expected and error.failed == []
    assert error.category == REJECTED and not error.retryable
    assert "usage_bytes" in str(error)
    # Everything else was stored.
    assert len(influxdb_v1.rows("SELECT * FROM container_cpu", db=db)) == sum(1 for r in records if r.cpu and r.cpu.total_ns is not None)
    assert influxdb_v1.rows(f"SELECT * FROM container_memory WHERE host = '{records[0].hostname}'", db=db) == []


def test_v1_unparsable_point_rejects_only_its_record(
    influxdb_v1: InfluxDB1, influxdb_v1_database: str, host_records: list[ContainerStats]
) -> None:
    db = influxdb_v1_database
    records = make_batch(host_records, copies=2, host=unique_host())
    bad = next(i for i, r in enumerate(records) if r.memory and r.memory.usage_bytes is not None)
    # A u64 counter past int64: line protocol 1.x has no unsigned integers, influxd refuses the line.
    records[bad] = records[bad].model_copy(update={"memory": records[bad].memory.model_copy(update={"usage_bytes": 2**64 - 1})})

    error, _ = write_error(v1_settings(influxdb_v1, db), records, PartialFailure)
    assert error.rejected == [bad] and error.category == REJECTED and not error.retryable
    assert "out of range" in str(error), str(error)
    memory = influxdb_v1.rows("SELECT record_id FROM container_memory", db=db)
    assert sorted(row["record_id"] for row in memory) == sorted(r.record_id for i, r in enumerate(records) if r.memory and i != bad)


def test_v1_missing_database_is_kept_for_retry(influxdb_v1: InfluxDB1, host_records: list[ContainerStats]) -> None:
    error, _ = write_error(v1_settings(influxdb_v1, "no_such_db"), make_batch(host_records, copies=1, host=unique_host()))
    assert error.retryable and error.category == ERROR
    assert "404" in str(error) and "database not found" in str(error)


class FakeEvent(Envelope):
    """Stands in for the Event model that does not exist yet."""

    timestamp: datetime
    hostname: str
    machine_id: str
    event_type: str
    container: ContainerReference
    data: dict[str, int | str] = {}


class SomethingElse(Envelope):
    value: int


def test_v1_events_are_written_generically_and_unknown_records_skipped(
    influxdb_v1: InfluxDB1, influxdb_v1_database: str, host_records: list[ContainerStats]
) -> None:
    db = influxdb_v1_database
    stats = make_batch(host_records, copies=1, host=unique_host())
    dressed = stats[-1]
    event = FakeEvent(
        timestamp=dressed.timestamp + timedelta(milliseconds=1),
        hostname=dressed.hostname,
        machine_id=dressed.machine_id,
        event_type="oom_kill",
        container=dressed.container,
        data={"pid": 4242, "process_name": 'stress "vm"'},
    )
    sink = write(v1_settings(influxdb_v1, db, label_tags=LABEL_TAGS), [*stats, event, SomethingElse(value=1)])

    assert sink.encoder.unknown_types == {"SomethingElse": 1}
    rows = influxdb_v1.rows("SELECT * FROM container_events", db=db)
    assert len(rows) == 1
    row = rows[0]
    assert row["time"] == ns(event.timestamp)
    assert row["event_type"] == "oom_kill" and row["data_pid"] == 4242 and row["data_process_name"] == 'stress "vm"'
    assert row["container_name"] == "web-1" and row["label_app"] == "shop front" and row["container_id"] == DOCKER_ID
    assert len(influxdb_v1.rows("SELECT * FROM container_cpu", db=db)) == sum(1 for r in stats if r.cpu and r.cpu.total_ns is not None)


# -- v2: VictoriaMetrics ---------------------------------------------------------------------------


def find(series: list[Series], name: str, **labels: str) -> Series:
    """The one series called ``name`` whose labels include ``labels``."""
    found = [s for s in series if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) == 1, f"{len(found)} series {name} {labels}"
    return found[0]


def ms(ts: datetime) -> int:
    return ns(ts) // 1_000_000


@pytest.mark.parametrize("gzip", [True, False], ids=["gzip", "plain"])
def test_v2_every_record_arrives_once_with_its_values(victoria_metrics: VictoriaMetrics, host_records: list[ContainerStats], gzip: bool) -> None:
    host = unique_host()
    records = make_batch(host_records, copies=5, host=host)
    write(v2_settings(victoria_metrics, gzip=gzip, label_tags=LABEL_TAGS), records, batch_size=16)

    series = victoria_metrics.export(f'{{host="{host}"}}')
    by_cgroup: dict[str, list[ContainerStats]] = {}
    for r in records:
        by_cgroup.setdefault(r.container.name, []).append(r)

    for cgroup, recs in by_cgroup.items():
        with_cpu = [r for r in recs if r.cpu and r.cpu.total_ns is not None]
        if with_cpu:
            # Every record exactly once (VictoriaMetrics keeps repeats, so a duplicate would show).
            seq = find(series, "container_cpu_seq", cgroup=cgroup)
            assert seq.values == [1, 2, 3, 4, 5]
            assert seq.timestamps_ms == [ms(r.timestamp) for r in with_cpu]
            assert find(series, "container_cpu_total_ns", cgroup=cgroup).values == [r.cpu.total_ns for r in with_cpu]
            assert find(series, "container_cpu_system_ns", cgroup=cgroup).values == [r.cpu.system_ns for r in with_cpu]
        with_memory = [r for r in recs if r.memory and r.memory.usage_bytes is not None]
        if with_memory:
            assert find(series, "container_memory_usage_bytes", cgroup=cgroup).values == [r.memory.usage_bytes for r in with_memory]
            assert find(series, "container_memory_working_set_bytes", cgroup=cgroup).values == [r.memory.working_set_bytes for r in with_memory]
            assert find(series, "container_memory_seq", cgroup=cgroup).values == [r.seq for r in with_memory]
        for interface in {n.name for r in recs for n in r.network or ()}:
            nets = [(r, n) for r in recs for n in r.network or () if n.name == interface]
            assert find(series, "container_network_rx_bytes", cgroup=cgroup, interface=interface).values == [n.rx_bytes for _, n in nets]
            assert find(series, "container_network_tx_packets", cgroup=cgroup, interface=interface).values == [n.tx_packets for _, n in nets]

    assert any(r.network for r in records), "no record with network figures on this host"
    dressed = f"/docker/{DOCKER_ID}"
    reads = [s for s in victoria_metrics.export(f'container_diskio_read_bytes{{host="{host}"}}')]
    assert [(s.labels["cgroup"], s.labels["device"], s.labels["major"], s.values) for s in reads] == [(dressed, "sda", "8", [4096.0] * 5)]


def test_v2_tags_labels_and_container_id(victoria_metrics: VictoriaMetrics, host_records: list[ContainerStats]) -> None:
    dressed = f"/docker/{DOCKER_ID}"
    for as_tag in (False, True):
        host = unique_host()
        write(v2_settings(victoria_metrics, label_tags=LABEL_TAGS, container_id_as_tag=as_tag), make_batch(host_records, copies=2, host=host))
        [cpu] = victoria_metrics.export(f'container_cpu_total_ns{{host="{host}",cgroup="{dressed}"}}')
        assert cpu.labels["container_name"] == "web-1"
        assert cpu.labels["label_app"] == "shop front" and cpu.labels["label_tier"] == "web,blue"
        assert cpu.labels["namespace"] == "docker" and cpu.labels["image"] == "nginx:1.25"
        assert "label_unlisted" not in cpu.labels and "label_missing" not in cpu.labels
        assert cpu.labels.get("container_id") == (DOCKER_ID if as_tag else None)
        assert len(cpu.values) == 2


def test_v2_cadvisor_layout(victoria_metrics: VictoriaMetrics, host_records: list[ContainerStats]) -> None:
    host = unique_host()
    records = make_batch(host_records, copies=3, host=host)
    write(v2_settings(victoria_metrics, layout="cadvisor"), records)

    series = victoria_metrics.export(f'{{machine="{host}"}}')
    # VictoriaMetrics names a series <measurement>_<field>; cAdvisor's field is always "value".
    names = {s.name for s in series}
    assert {f"{m}_value" for m in CADVISOR_SERIES} <= names
    assert all(name.endswith("_value") for name in names)
    assert all("host" not in s.labels and "cgroup" not in s.labels for s in series)
    totals = {s.labels["container_name"]: s for s in series if s.name == "cpu_usage_total_value"}
    for r in records:
        if r.cpu and r.cpu.total_ns is not None:
            s = totals[container_name(r)]
            assert r.cpu.total_ns in s.values and ms(r.timestamp) in s.timestamps_ms
    assert {len(s.values) for s in totals.values()} == {3}


def test_v2_wrong_credentials_are_auth_errors(victoria_metrics_auth: VictoriaMetrics, host_records: list[ContainerStats]) -> None:
    error, _ = write_error(v2_settings(victoria_metrics_auth, token="wrong"), make_batch(host_records, copies=1, host=unique_host()))
    assert error.category == AUTH and error.retryable
    assert "401" in str(error)


# -- unreachable, paused -------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["v1", "v2"])
@pytest.mark.parametrize("url", ["closed-port", "http://no-such-host.invalid:8086"])
def test_unreachable_server_fails_fast_and_retryable(api: str, url: str, host_records: list[ContainerStats]) -> None:
    if url == "closed-port":
        url = f"http://127.0.0.1:{free_port()}"
    settings = InfluxDBSettings(api=api, url=url, org="o", token="t", timeout=5)
    error, elapsed = write_error(settings, make_batch(host_records, copies=1, host=unique_host()))
    assert error.category == UNREACHABLE and error.retryable, error
    # A refused connection fails at once; name resolution is up to the system's resolver (".invalid"
    # is answered without asking anyone on a sane one), and no retries stack up on either.
    assert elapsed < 10.0  # fails fast rather than waiting out retries; a hang guard, not a speed check
    assert ("cannot resolve" if "invalid" in url else "cannot connect") in str(error)


def test_v1_paused_server_times_out_then_recovers(influxdb_v1: InfluxDB1, influxdb_v1_database: str, host_records: list[ContainerStats]) -> None:
    records = make_batch(host_records, copies=1, host=unique_host())
    settings = v1_settings(influxdb_v1, influxdb_v1_database, timeout=1)
    influxdb_v1.pause()
    try:
        error, elapsed = write_error(settings, records)
    finally:
        influxdb_v1.resume()
    assert error.retryable and error.category == UNREACHABLE, error
    assert 0.9 <= elapsed < 10.0  # waited for the timeout, and did not hang
    write(settings, records)  # the same records, once the server answers again
    assert len(influxdb_v1.rows("SELECT * FROM container_cpu", db=influxdb_v1_database)) == sum(1 for r in records if r.cpu and r.cpu.total_ns is not None)


def test_v2_paused_server_times_out_then_recovers(victoria_metrics: VictoriaMetrics, host_records: list[ContainerStats]) -> None:
    host = unique_host()
    records = make_batch(host_records, copies=1, host=host)
    settings = v2_settings(victoria_metrics, timeout=1)
    victoria_metrics.pause()
    try:
        error, elapsed = write_error(settings, records)
    finally:
        victoria_metrics.resume()
    assert error.retryable and error.category == UNREACHABLE, error
    assert 0.9 <= elapsed < 10.0  # waited for the timeout, and did not hang
    write(settings, records)
    assert len(victoria_metrics.export(f'container_cpu_total_ns{{host="{host}"}}')) == sum(1 for r in host_records if r.cpu and r.cpu.total_ns is not None)


# -- HTTP statuses no real server here gives on demand ---------------------------------------------


class _Canned(http.server.BaseHTTPRequestHandler):
    responses: dict[str, tuple[int, dict[str, str], bytes]] = {}
    seen: list[tuple[str, dict[str, str], int]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        key = self.server.server_address[1]  # type: ignore[index]
        status, headers, body = self.responses[str(key)]
        self.seen.append((self.path, dict(self.headers), length))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def canned_server() -> Iterator[Any]:
    """A plain HTTP server on 127.0.0.1 answering every POST with the status it is given."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    port = str(server.server_address[1])

    def answer(status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> str:
        _Canned.responses[port] = (status, headers or {}, body)
        return f"http://127.0.0.1:{port}"

    try:
        yield answer
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize("api", ["v1", "v2"])
@pytest.mark.parametrize(
    ("status", "headers", "body", "category", "retryable", "retry_after"),
    [
        (429, {"Retry-After": "7"}, b'{"error":"too many requests"}', THROTTLED, True, 7.0),
        (503, {"Retry-After": "Fri, 01 Jan 2100 00:00:00 GMT"}, b"", THROTTLED, True, "future"),
        (503, {}, b"busy", THROTTLED, True, None),
        (500, {}, b'{"error":"engine: cache maximum memory size exceeded"}', ERROR, True, None),
        (502, {}, b"bad gateway", ERROR, True, None),
        (403, {}, b'{"code":"forbidden","message":"insufficient permissions"}', AUTH, True, None),
        (400, {}, b'{"code":"invalid","message":"unable to parse points"}', REJECTED, False, None),
        (413, {}, b'{"code":"request too large"}', REJECTED, False, None),
        (301, {"Location": "https://elsewhere/write"}, b"", ERROR, True, None),
    ],
)
def test_http_statuses_map_to_categories(
    canned_server: Any, host_records: list[ContainerStats], api: str, status: int, headers: dict[str, str], body: bytes,
    category: str, retryable: bool, retry_after: Any,
) -> None:  # fmt: skip
    url = canned_server(status, headers, body)
    error, _ = write_error(InfluxDBSettings(api=api, url=url, org="o", token="t", timeout=5), make_batch(host_records, copies=1, host="h"))
    assert (error.category, error.retryable) == (category, retryable), error
    assert str(status) in str(error)
    if retry_after == "future":
        assert error.retry_after_s is not None and error.retry_after_s > 86400
    else:
        assert error.retry_after_s == retry_after
    path, sent_headers, length = _Canned.seen[-1]
    assert path.startswith("/api/v2/write?" if api == "v2" else "/write?") and "precision=ns" in path
    assert sent_headers.get("Content-Encoding") == "gzip" and length > 0


def test_settings_import_without_the_client_library_and_the_sink_says_what_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['influxdb_client'] = None\n"  # as if not installed
        "from sinks.influxdb import InfluxDBSettings, InfluxDBSink\n"
        "from sinks.registry import MissingDependency\n"
        "settings = InfluxDBSettings(api='v1', url='http://127.0.0.1:1')\n"
        "try:\n"
        "    InfluxDBSink(settings)\n"
        "except MissingDependency as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "pip install 'container-exporter[influxdb]'" in result.stdout


# -- the test servers' controls (the fault tests build on them) -----------------------------------


def test_influxd_controls_are_idempotent_and_keep_port_and_data(influxdb_v1: InfluxDB1, influxdb_v1_database: str) -> None:
    db = influxdb_v1_database
    status, body = influxdb_v1.write_lines("probe,t=a v=1i 1000", db=db)
    assert status == 204, body
    url, pid = influxdb_v1.url, influxdb_v1.pid
    try:
        influxdb_v1.pause()
        influxdb_v1.pause()
        assert influxdb_v1.paused and not influxdb_v1.ready()
        influxdb_v1.resume()
        influxdb_v1.resume()
        assert influxdb_v1.ready() and influxdb_v1.pid == pid
        influxdb_v1.pause()
        influxdb_v1.stop()  # from paused: must not hang
        influxdb_v1.stop()
        assert not influxdb_v1.running and not influxdb_v1.ready()
        influxdb_v1.start()
        influxdb_v1.start()
        assert influxdb_v1.url == url and influxdb_v1.pid != pid
        assert influxdb_v1.rows("SELECT v FROM probe", db=db) == [{"time": 1000, "v": 1, "_measurement": "probe"}]
        influxdb_v1.stop(kill=True)
        influxdb_v1.start()
        assert influxdb_v1.rows("SELECT v FROM probe", db=db)[0]["v"] == 1  # the WAL survives SIGKILL
    finally:
        influxdb_v1.restore()


def test_victoria_metrics_controls_keep_port_and_data(victoria_metrics: VictoriaMetrics) -> None:
    name = f"probe_{uuid.uuid4().hex[:8]}"
    status, _, body = victoria_metrics.request("POST", "/write", body=f"{name},t=a v=7i {int(time.time()) * 10**9}".encode())
    assert status == 204, body
    url = victoria_metrics.url
    try:
        victoria_metrics.pause()
        assert not victoria_metrics.ready()
        victoria_metrics.stop()  # from paused; SIGTERM lets it flush
        victoria_metrics.start()
        assert victoria_metrics.url == url
        [series] = victoria_metrics.export(f"{name}_v")
        assert series.values == [7] and series.labels == {"t": "a"}
    finally:
        victoria_metrics.restore()
