"""The Elasticsearch/OpenSearch sink against a real server (osmem-server, OpenSearch API), and against
a scripted HTTP server for the answers osmem cannot give (auth, 429, per-item 5xx, old servers, TLS).

The records are real: read from this host's cgroups by the exporter itself, then copied with
distinct seq, timestamp and record_id where a test needs many.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
import typing
import uuid
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from exporter.models import ContainerReference, ContainerStats, CpuStats, Envelope
from sinks.elasticsearch import (
    ElasticsearchSettings,
    ElasticsearchSink,
    events_mappings,
    stats_mappings,
    template_pattern,
)
from sinks.protocol import AUTH, ERROR, REJECTED, THROTTLED, UNREACHABLE, PartialFailure, SinkError, retry_after_seconds
from tests.infra.opensearch import (
    ELASTICSEARCH_INFO,
    OpenSearchServer,
    Received,
    Reply,
    ScriptedHttpServer,
    make_certificate,
)
from tests.infra.procs import free_port
from tests.records import collect_host_records, copies

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_LABELS = {
    "app": "web",
    "com.docker.compose.project": "shop",
    "com.docker.compose.project.working_dir": "/srv/shop",
    "com.docker.compose.service": "frontend",
}
OPENSEARCH_INFO = {
    "name": "node-1",
    "cluster_name": "scripted",
    "version": {"distribution": "opensearch", "number": "2.19.0"},
    "tagline": "The OpenSearch Project: https://opensearch.org/",
}


# --- records -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host_records() -> list[ContainerStats]:
    records = collect_host_records()
    assert records, "the exporter read no container on this host (not even /)"
    return records


def expected_source(record: Envelope, *, dedot: bool = True) -> dict[str, Any]:
    """What the document of ``record`` must hold: the record's JSON, labels dedotted, @timestamp."""
    doc = json.loads(record.json_bytes())
    if dedot and "container" in doc:
        doc["container"]["labels"] = {k.replace(".", "_"): v for k, v in doc["container"]["labels"].items()}
    return doc


def assert_document_is(source: dict[str, Any], record: Envelope) -> None:
    source = dict(source)
    stamp = source.pop("@timestamp")
    assert datetime.fromisoformat(stamp) == record.timestamp  # type: ignore[attr-defined]
    assert source == expected_source(record)


def leaf_paths(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every non-null leaf of a JSON document; list items under the list's path."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaf_paths(item, f"{prefix}{key}.")
    elif isinstance(value, list):
        for item in value:
            yield from leaf_paths(item, prefix)
    elif value is not None:
        yield prefix.rstrip("."), value


def model_paths(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Dotted path of every field of a model, nested models included."""
    for name, field in model.model_fields.items():
        inner = [a for a in (*typing.get_args(field.annotation), field.annotation) if isinstance(a, type)]
        inner += [b for a in typing.get_args(field.annotation) for b in typing.get_args(a) if isinstance(b, type)]
        nested = next((a for a in inner if issubclass(a, BaseModel)), None)
        if nested is not None:
            yield from model_paths(nested, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def mapped_type(mapping: dict[str, Any], path: str) -> str | None:
    node: dict[str, Any] = mapping
    for part in path.split("."):
        node = node.get("properties", {}).get(part)
        if node is None:
            return None
    return node.get("type", "object")


# --- sinks ---------------------------------------------------------------------------------------


@pytest.fixture
def prefix() -> str:
    """Index and template names of this test's own on the shared server."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_sink() -> Iterator[Callable[..., ElasticsearchSink]]:
    sinks: list[ElasticsearchSink] = []

    def factory(url: str, prefix: str = "t", **overrides: Any) -> ElasticsearchSink:
        settings: dict[str, Any] = {
            "hosts": [url],
            "index": f"{prefix}-stats-%Y.%m.%d",
            "events_index": f"{prefix}-events-%Y.%m.%d",
            "template_name": prefix,
            "compatibility": "opensearch",
            "timeout": 5,
        }
        settings.update(overrides)
        sink = ElasticsearchSink(ElasticsearchSettings.model_validate(settings))
        sinks.append(sink)
        return sink

    yield factory
    for sink in sinks:
        sink.close()


# --- delivery to a real server -------------------------------------------------------------------


def test_every_record_is_stored_once_with_the_source_values(opensearch_server: OpenSearchServer, make_sink, prefix, host_records) -> None:
    records = copies(host_records, 120)
    sink = make_sink(opensearch_server.url, prefix)
    sink.open()
    sink.write_batch(records)

    hits = opensearch_server.search(f"{prefix}-stats-*")
    assert sorted(h["_id"] for h in hits) == sorted(r.record_id for r in records)
    by_id = {r.record_id: r for r in records}
    for hit in hits:
        assert_document_is(hit["_source"], by_id[hit["_id"]])
    assert opensearch_server.count(f"{prefix}-events-*") == 0

    # Closed and opened again (the worker may do so): it writes as before.
    sink.close()
    sink.open()
    more = copies(host_records, 3)
    sink.write_batch(more)
    assert opensearch_server.count(f"{prefix}-stats-*") == 123


def test_sending_a_batch_again_does_not_duplicate(opensearch_server: OpenSearchServer, make_sink, prefix, host_records) -> None:
    records = copies(host_records, 50)
    sink = make_sink(opensearch_server.url, prefix)
    sink.open()
    sink.write_batch(records)
    sink.write_batch(records)
    sink.write_batch(records[20:] + copies(host_records, 5))  # a retry overlapping new records
    assert opensearch_server.count(f"{prefix}-stats-*") == 55
    first = records[0]
    index = first.timestamp.strftime(f"{prefix}-stats-%Y.%m.%d")
    source = opensearch_server.get(index, first.record_id)
    assert source is not None
    assert_document_is(source, first)


def test_templates_map_every_field_explicitly(opensearch_server: OpenSearchServer, make_sink, prefix, host_records) -> None:
    sink = make_sink(opensearch_server.url, prefix)
    sink.open()

    stats = opensearch_server.index_template(f"{prefix}-stats")
    events = opensearch_server.index_template(f"{prefix}-events")
    assert stats is not None and events is not None
    assert stats["index_patterns"] == [f"{prefix}-stats-*"]
    assert events["index_patterns"] == [f"{prefix}-events-*"]
    assert "data_stream" not in stats
    template_mapping = stats["template"]["mappings"]
    assert template_mapping["dynamic"] in (False, "false")
    assert template_mapping["dynamic_templates"][0]["container_labels_as_keyword"]["mapping"]["type"] == "keyword"
    assert mapped_type(events["template"]["mappings"], "event_type") == "keyword"
    assert mapped_type(events["template"]["mappings"], "data") == "object"
    assert mapped_type(events["template"]["mappings"], "container.labels") == "object"

    records = copies(host_records, len(host_records), labels=COMPOSE_LABELS)
    sink.write_batch(records)
    index = opensearch_server.indices(f"{prefix}-stats-*")
    assert len(index) == 1
    mapping = opensearch_server.mapping(index[0])
    # Every value of every record sits in a field of the type the template gave it.
    expected = {int: "long", float: "double", bool: "boolean"}
    for record in records:
        for path, value in leaf_paths(expected_source(record)):
            kind = mapped_type(mapping, path)
            if isinstance(value, str):
                date_fields = ("timestamp", "filesystem.measured_at", "spec.creation_time")
                assert kind == ("date" if path in date_fields else "keyword"), path
            else:
                assert kind == expected[type(value)], path
    assert mapped_type(mapping, "@timestamp") == "date"
    for label in ("app", "com_docker_compose_project", "com_docker_compose_project_working_dir", "com_docker_compose_service"):
        assert mapped_type(mapping, f"container.labels.{label}") == "keyword"
    # Keywords answer exact queries.
    hits = opensearch_server.search(f"{prefix}-stats-*", {"term": {"container.labels.com_docker_compose_project": "shop"}})
    assert len(hits) == len(records)


def test_generated_mappings_cover_the_record_models() -> None:
    mapping = stats_mappings()
    paths = list(model_paths(ContainerStats))
    assert len(paths) > 80
    unmapped = [path for path in paths if mapped_type(mapping, path) is None]
    assert unmapped == []
    assert mapped_type(mapping, "pressure.cpu.some.avg10") == "double"
    assert mapped_type(mapping, "network.rx_bytes") == "long"
    assert mapped_type(mapping, "filesystem.measured_at") == "date"
    assert mapped_type(mapping, "container.aliases") == "keyword"
    assert mapped_type(mapping, "container.labels") == "object"
    events = events_mappings()
    assert mapped_type(events, "container.name") == "keyword"
    assert mapped_type(events, "timestamp") == "date"


def test_index_names_follow_the_records_utc_day(opensearch_server: OpenSearchServer, make_sink, prefix, host_records) -> None:
    base = host_records[:1]
    late = copies(base, 2, start=datetime(2026, 3, 1, 23, 30, tzinfo=UTC))
    next_day = copies(base, 1, start=datetime(2026, 3, 2, 0, 30, tzinfo=UTC))
    # 01:30 at UTC+2 on 2 March is 23:30 UTC on 1 March.
    local = copies(base, 1, start=datetime(2026, 3, 2, 1, 30, tzinfo=timezone(timedelta(hours=2))))
    sink = make_sink(opensearch_server.url, prefix)
    sink.open()
    sink.write_batch(late + next_day + local)

    assert opensearch_server.indices(f"{prefix}-stats-*") == [f"{prefix}-stats-2026.03.01", f"{prefix}-stats-2026.03.02"]
    day1 = {h["_id"] for h in opensearch_server.search(f"{prefix}-stats-2026.03.01")}
    day2 = {h["_id"] for h in opensearch_server.search(f"{prefix}-stats-2026.03.02")}
    assert day1 == {r.record_id for r in late + local}
    assert day2 == {next_day[0].record_id}


def test_one_bad_document_is_rejected_alone(opensearch_server: OpenSearchServer, make_sink, prefix, host_records) -> None:
    records: list[Envelope] = list(copies(host_records, 20))
    good = records[7]
    # A value whose type conflicts with the mapping (cpu.total_ns is long); the model would not
    # build it, so construct it without validation.
    bad = ContainerStats.model_construct(**{**dict(good), "cpu": CpuStats.model_construct(total_ns="not-a-number")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic's "unexpected value" serializer warning
        bad.json_bytes()
    records[7] = bad
    sink = make_sink(opensearch_server.url, prefix)
    sink.open()
    with pytest.raises(PartialFailure) as caught:
        sink.write_batch(records)

    failure = caught.value
    assert failure.rejected == [7]
    assert failure.failed == []
    assert failure.category == REJECTED
    assert not failure.retryable
    assert "cpu.total_ns" in str(failure) and "19 of 20 records stored" in str(failure)
    stored = {h["_id"] for h in opensearch_server.search(f"{prefix}-stats-*")}
    assert stored == {r.record_id for i, r in enumerate(records) if i != 7}  # type: ignore[attr-defined]


class SampleEvent(Envelope):
    """Stands in for the event model to come: any Envelope with a timestamp."""

    timestamp: datetime
    event_type: str
    container: ContainerReference
    data: dict[str, Any] = {}
    record_id: str | None = None


class Timeless(Envelope):
    note: str


def test_events_go_to_the_events_index(opensearch_server: OpenSearchServer, make_sink, prefix, host_records) -> None:
    when = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    container = ContainerReference(name="/docker/abc", id="abc", labels=COMPOSE_LABELS)
    with_id = SampleEvent(timestamp=when, event_type="oom", container=container, data={"pid": 42}, record_id="e" * 32)
    without_id = SampleEvent(timestamp=when, event_type="deletion", container=container)
    stats = copies(host_records, 2)
    batch: list[Envelope] = [stats[0], with_id, Timeless(note="x"), without_id, stats[1]]
    sink = make_sink(opensearch_server.url, prefix)
    sink.open()
    with pytest.raises(PartialFailure) as caught:
        sink.write_batch(batch)
    # Nothing is skipped silently: the record without a timestamp is reported.
    assert caught.value.rejected == [2] and caught.value.failed == []
    assert "Timeless has no timestamp" in str(caught.value)

    sink.write_batch([with_id, without_id])  # again: the id derived from the content holds
    hits = opensearch_server.search(f"{prefix}-events-*")
    assert {h["_index"] for h in hits} == {f"{prefix}-events-2026.05.04"}
    assert len(hits) == 2
    by_type = {h["_source"]["event_type"]: h for h in hits}
    assert by_type["oom"]["_id"] == "e" * 32
    assert_document_is(by_type["oom"]["_source"], with_id)
    assert_document_is(by_type["deletion"]["_source"], without_id)
    assert opensearch_server.count(f"{prefix}-stats-*") == 2
    mapping = opensearch_server.mapping(f"{prefix}-events-2026.05.04")
    assert mapped_type(mapping, "event_type") == "keyword"
    assert mapped_type(mapping, "container.labels.com_docker_compose_project") == "keyword"


# --- data streams --------------------------------------------------------------------------------


def test_data_stream_template_declares_the_stream(opensearch_server: OpenSearchServer, make_sink, prefix) -> None:
    sink = make_sink(opensearch_server.url, prefix, data_stream=True)
    sink.open()
    stats = opensearch_server.index_template(f"{prefix}-stats")
    assert stats is not None
    # We send "data_stream": {}; OpenSearch answers with its default timestamp field filled in.
    assert stats["data_stream"] in ({}, {"timestamp_field": {"name": "@timestamp"}})
    assert stats["_meta"] == {"managed_by": "container-exporter", "schema_version": 1}
    assert stats["index_patterns"] == [f"{prefix}-stats"]  # no date expansion
    assert mapped_type(stats["template"]["mappings"], "@timestamp") == "date"


def test_data_stream_mode_creates_with_ids_and_takes_conflicts_as_stored(
    opensearch_server: OpenSearchServer, make_sink, prefix, host_records
) -> None:
    # osmem-server has no data streams (see the next test): the stream's name is made a plain
    # index here, which takes the same create operations.
    opensearch_server.request("PUT", f"/{prefix}-stats", {"mappings": stats_mappings()})
    records = copies(host_records, 30, start=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), step=timedelta(days=1))
    sink = make_sink(opensearch_server.url, prefix, data_stream=True, install_template=False)
    sink.open()
    sink.write_batch(records)
    sink.write_batch(records)  # every item now answers 409: already stored

    assert opensearch_server.indices(f"{prefix}-*") == [f"{prefix}-stats"]
    hits = opensearch_server.search(f"{prefix}-stats")
    assert sorted(h["_id"] for h in hits) == sorted(r.record_id for r in records)
    by_id = {r.record_id: r for r in records}
    for hit in hits:
        assert_document_is(hit["_source"], by_id[hit["_id"]])


def test_data_stream_refusal_is_reported_per_record(opensearch_server: OpenSearchServer, make_sink, prefix, host_records) -> None:
    records = copies(host_records, 5)
    sink = make_sink(opensearch_server.url, prefix, data_stream=True)
    sink.open()
    try:
        sink.write_batch(records)
    except PartialFailure as failure:
        # osmem-server 0.1.6 accepts the template but refuses to write to a data stream.
        assert failure.rejected == [0, 1, 2, 3, 4]
        assert failure.category == REJECTED
        assert "data stream" in str(failure)
    else:
        assert opensearch_server.count(f"{prefix}-stats") == 5


# --- compatibility -------------------------------------------------------------------------------


def test_default_compatibility_against_opensearch_says_what_to_set(opensearch_server: OpenSearchServer, make_sink, prefix, host_records) -> None:
    sink = make_sink(opensearch_server.url, prefix, compatibility="elasticsearch")
    with pytest.raises(SinkError) as opened:
        sink.open()
    assert 'set compatibility = "opensearch"' in str(opened.value)
    assert not opened.value.retryable  # retrying cannot help; the worker keeps the records anyway

    # Writing without open(): the server refuses the client's media type; same advice, and the
    # records are kept for after the fix.
    with pytest.raises(SinkError) as wrote:
        sink.write_batch(copies(host_records, 3))
    assert 'set compatibility = "opensearch"' in str(wrote.value)
    assert wrote.value.retryable
    assert opensearch_server.count(f"{prefix}-*") == 0


def _bulk_answer(statuses: list[int], op: str = "index") -> Callable[[Received], Reply]:
    def answer(request: Received) -> Reply:
        lines = [json.loads(line) for line in request.body.splitlines() if line]
        actions = lines[0::2]
        items = []
        for action, status in zip(actions, statuses, strict=False):
            item: dict[str, Any] = {"status": status, "_id": action[op]["_id"]}
            if status >= 300:
                item["error"] = {"type": f"error_{status}", "reason": f"scripted {status}"}
            items.append({op: item})
        return Reply(body={"errors": any(s >= 300 for s in statuses), "items": items})

    return answer


def scripted(info: dict[str, Any], bulk: Callable[[Received], Reply] | None = None, **routes: Reply) -> Callable[[Received], Reply]:
    """A handler: GET / → info, template PUTs acknowledged, /_bulk → bulk(request); ``routes``
    (path prefix without the leading "/", "" for "/" itself) override."""

    def handler(request: Received) -> Reply:
        path = request.path.split("?")[0]
        for route, reply in routes.items():
            if path.startswith("/" + route) if route else path == "/":
                return reply
        if path == "/":
            return Reply(body=info)
        if path.startswith(("/_index_template/", "/_template/")):
            return Reply(body={"acknowledged": True})
        if path == "/_bulk" and bulk is not None:
            return bulk(request)
        return Reply(404, {"error": {"type": "not_found", "reason": path}})

    return handler


def test_opensearch_mode_speaks_plain_json_and_skips_the_product_check(make_sink, host_records) -> None:
    records = copies(host_records, 3)
    # product=None: like a real OpenSearch node, no X-Elastic-Product header.
    with ScriptedHttpServer(scripted(OPENSEARCH_INFO, _bulk_answer([201, 201, 201])), product=None) as server:
        sink = make_sink(server.url)
        sink.open()
        sink.write_batch(records)
        assert {r.headers["accept"] for r in server.received} == {"application/json"}
        assert {r.headers["content-type"] for r in server.requests_to("/_index_template/")} == {"application/json"}
        (bulk,) = server.requests_to("/_bulk")
        assert bulk.headers["content-type"] == "application/x-ndjson"
        lines = bulk.body.splitlines()
        assert [json.loads(line)["index"]["_id"] for line in lines[0::2]] == [r.record_id for r in records]

        # The same server with the default compatibility: the client's product check refuses it.
        es_sink = make_sink(server.url, compatibility="elasticsearch")
        with pytest.raises(SinkError) as caught:
            es_sink.open()
        assert 'set compatibility = "opensearch"' in str(caught.value)
        assert "compatible-with=" in server.received[-1].headers["accept"]


# --- whole-request failures ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "header"),
    [
        ({"username": "elastic", "password": "wrong"}, "Basic " + base64.b64encode(b"elastic:wrong").decode()),
        ({"api_key": "aWQ6a2V5"}, "ApiKey aWQ6a2V5"),
        ({"bearer_token": "tok"}, "Bearer tok"),
    ],
)
def test_refused_credentials_are_an_auth_error(make_sink, auth: dict[str, str], header: str) -> None:
    refusal = Reply(401, {"error": {"type": "security_exception", "reason": "unable to authenticate user"}}, {"WWW-Authenticate": "Basic"})
    with ScriptedHttpServer(lambda request: refusal) as server:
        sink = make_sink(server.url, compatibility="elasticsearch", **auth)
        with pytest.raises(SinkError) as caught:
            sink.open()
        assert caught.value.category == AUTH
        assert caught.value.retryable
        assert "security_exception" in str(caught.value)
        assert server.received[0].headers["authorization"] == header


def test_forbidden_bulk_is_an_auth_error(make_sink, host_records) -> None:
    forbidden = Reply(403, {"error": {"type": "security_exception", "reason": "action [indices:data/write/bulk] is unauthorized"}})
    with ScriptedHttpServer(scripted(ELASTICSEARCH_INFO, lambda request: forbidden)) as server:
        sink = make_sink(server.url, compatibility="elasticsearch")
        sink.open()
        with pytest.raises(SinkError) as caught:
            sink.write_batch(copies(host_records, 2))
        assert caught.value.category == AUTH and caught.value.retryable
        assert not isinstance(caught.value, PartialFailure)


def test_user_without_template_privileges(make_sink, host_records) -> None:
    """A user that may write but not manage templates: open says what to do; without templates it works."""
    forbidden = Reply(403, {"error": {"type": "security_exception", "reason": "action [cluster:monitor/main] is unauthorized"}})
    routes = {"": forbidden, "_index_template/": forbidden, "_template/": forbidden}
    with ScriptedHttpServer(scripted(ELASTICSEARCH_INFO, _bulk_answer([201, 201]), **routes)) as server:
        sink = make_sink(server.url, compatibility="elasticsearch")
        with pytest.raises(SinkError) as caught:
            sink.open()
        assert caught.value.category == AUTH
        assert "install_template = false" in str(caught.value)

        without = make_sink(server.url, compatibility="elasticsearch", install_template=False)
        without.open()
        without.write_batch(copies(host_records, 2))
        assert len(server.requests_to("/_bulk")) == 1
        assert [r.path for r in server.received if r.path == "/"] == ["/", "/"]  # asked, refused, went on


def test_throttled_request_carries_retry_after(make_sink, host_records) -> None:
    throttled = Reply(429, {"error": {"type": "circuit_breaking_exception", "reason": "too many requests"}}, {"Retry-After": "7"})
    with ScriptedHttpServer(scripted(ELASTICSEARCH_INFO, lambda request: throttled)) as server:
        sink = make_sink(server.url, compatibility="elasticsearch")
        sink.open()
        with pytest.raises(SinkError) as caught:
            sink.write_batch(copies(host_records, 2))
        assert caught.value.category == THROTTLED
        assert caught.value.retryable
        assert caught.value.retry_after_s == 7.0
        assert len(server.requests_to("/_bulk")) == 1  # the transport does not retry on its own


@pytest.mark.parametrize(("status", "retryable"), [(503, True), (500, True), (400, False)])
def test_other_request_failures_are_errors(make_sink, host_records, status: int, retryable: bool) -> None:
    reply = Reply(status, {"error": {"type": "some_exception", "reason": "scripted"}})
    with ScriptedHttpServer(scripted(ELASTICSEARCH_INFO, lambda request: reply)) as server:
        sink = make_sink(server.url, compatibility="elasticsearch")
        sink.open()
        with pytest.raises(SinkError) as caught:
            sink.write_batch(copies(host_records, 2))
        assert caught.value.category == ERROR
        assert caught.value.retryable is retryable
        assert f"HTTP {status}" in str(caught.value)
        assert len(server.requests_to("/_bulk")) == 1


def test_item_failures_are_split_into_retryable_and_rejected(make_sink, host_records) -> None:
    statuses = [201, 429, 503, 400, 200, 500, 404]
    answer = _bulk_answer(statuses)

    def bulk(request: Received) -> Reply:
        reply = answer(request)
        reply.headers["Retry-After"] = "3"
        return reply

    with ScriptedHttpServer(scripted(ELASTICSEARCH_INFO, bulk)) as server:
        sink = make_sink(server.url, compatibility="elasticsearch")
        sink.open()
        with pytest.raises(PartialFailure) as caught:
            sink.write_batch(copies(host_records, len(statuses)))
    failure = caught.value
    assert failure.failed == [1, 2, 5, 6]
    assert failure.rejected == [3]
    assert failure.retryable
    assert failure.category == THROTTLED
    assert failure.retry_after_s == 3.0
    assert "2 of 7 records stored" in str(failure) and "scripted 400" in str(failure)


def test_conflict_is_stored_only_for_create(make_sink, host_records) -> None:
    with ScriptedHttpServer(scripted(ELASTICSEARCH_INFO, _bulk_answer([201, 409], op="create"))) as server:
        sink = make_sink(server.url, compatibility="elasticsearch", data_stream=True)
        sink.open()
        sink.write_batch(copies(host_records, 2))  # no error: 409 on create means "already there"
        (bulk,) = server.requests_to("/_bulk")
        actions = [json.loads(line) for line in bulk.body.splitlines()[0::2]]
        assert [list(a) for a in actions] == [["create"], ["create"]]
        assert {a["create"]["_index"] for a in actions} == {"t-stats"}
    with ScriptedHttpServer(scripted(ELASTICSEARCH_INFO, _bulk_answer([201, 409]))) as server:
        sink = make_sink(server.url, compatibility="elasticsearch")
        sink.open()
        with pytest.raises(PartialFailure) as caught:
            sink.write_batch(copies(host_records, 2))
        assert caught.value.rejected == [1]


def test_legacy_templates_when_the_server_has_no_composable_ones(make_sink) -> None:
    old = Reply(400, {"error": {"type": "invalid_index_name_exception", "reason": "Invalid index name [_index_template], must not start with '_'"}})
    info = {**ELASTICSEARCH_INFO, "version": {"number": "7.7.1"}}
    with ScriptedHttpServer(scripted(info, **{"_index_template/": old})) as server:
        sink = make_sink(server.url, compatibility="elasticsearch")
        sink.open()
        legacy = server.requests_to("/_template/")
        assert [r.path for r in legacy] == ["/_template/t-stats", "/_template/t-events"]
        body = json.loads(legacy[0].body)
        assert body["index_patterns"] == ["t-stats-*"]
        assert body["mappings"] == json.loads(json.dumps(stats_mappings()))
        assert len(server.requests_to("/_index_template/")) == 1  # asked once, then the old API

        stream_sink = make_sink(server.url, compatibility="elasticsearch", data_stream=True)
        with pytest.raises(SinkError, match="no composable index templates"):
            stream_sink.open()


# --- unreachable, hung, TLS ----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["refused", "no such name"])
def test_unreachable_host_is_reported_quickly(make_sink, host_records, where: str) -> None:
    # .invalid never resolves (RFC 6761). Name resolution is not bounded by the timeout (it
    # happens in getaddrinfo, before the socket); this machine's resolver answers at once.
    url = f"http://127.0.0.1:{free_port()}" if where == "refused" else "http://no-such-node.invalid:9200"
    sink = make_sink(url, timeout=2)
    started = time.monotonic()
    with pytest.raises(SinkError) as opened:
        sink.open()
    with pytest.raises(SinkError) as wrote:
        sink.write_batch(copies(host_records, 2))
    assert time.monotonic() - started < 10  # a hang guard, not a speed check
    for caught in (opened, wrote):
        assert caught.value.category == UNREACHABLE
        assert caught.value.retryable
        assert "cannot reach" in str(caught.value)


def test_a_second_host_takes_over_from_a_dead_one(opensearch_server: OpenSearchServer, make_sink, prefix, host_records) -> None:
    sink = make_sink(f"http://127.0.0.1:{free_port()}", prefix, hosts=[f"http://127.0.0.1:{free_port()}", opensearch_server.url])
    sink.open()
    sink.write_batch(copies(host_records, 10))
    assert opensearch_server.count(f"{prefix}-stats-*") == 10


def test_paused_server_times_out_and_recovers(make_opensearch_server, make_sink, host_records) -> None:
    server = make_opensearch_server()
    sink = make_sink(server.url, "paused", timeout=1)
    sink.open()
    server.pause()
    records = copies(host_records, 5)
    outcome: list[BaseException | None] = []

    def write() -> None:
        try:
            sink.write_batch(records)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    started = time.monotonic()
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    writer.join(timeout=15)
    elapsed = time.monotonic() - started
    assert not writer.is_alive(), "write_batch hung on a paused server"
    error = outcome[0]
    assert isinstance(error, SinkError)
    assert error.category == UNREACHABLE and error.retryable
    assert "within 1 s" in str(error)
    assert 0.9 <= elapsed < 10  # waited for the timeout, and did not hang

    server.resume()
    # The worker sends the same batch again. The timed-out request was still in the socket and
    # is indexed after the resume too: the _ids keep it at one copy.
    sink.write_batch(records)
    assert server.count("paused-stats-*") == 5


def test_tls_with_a_ca_bundle(tmp_path: Path, make_sink, host_records) -> None:
    cert, key = make_certificate(tmp_path)
    with ScriptedHttpServer(scripted(ELASTICSEARCH_INFO, _bulk_answer([201, 201])), tls=(cert, key)) as server:
        assert server.url.startswith("https://")
        make_sink(server.url, compatibility="elasticsearch", ca_certs=str(cert)).open()

        untrusted = make_sink(server.url, compatibility="elasticsearch")
        with pytest.raises(SinkError) as caught:
            untrusted.open()
        assert caught.value.category == UNREACHABLE
        assert "certificate" in str(caught.value).lower()

        unverified = make_sink(server.url, compatibility="elasticsearch", verify_certs=False)
        unverified.open()
        unverified.write_batch(copies(host_records, 2))
        assert len(server.requests_to("/_bulk")) == 1


# --- settings and helpers ------------------------------------------------------------------------


def test_settings_import_without_the_client_library() -> None:
    code = (
        "import sys; sys.modules['elasticsearch'] = None\n"
        "from sinks.elasticsearch import ElasticsearchSettings, ElasticsearchSink\n"
        "from sinks.registry import MissingDependency\n"
        "s = ElasticsearchSettings(compatibility='opensearch')\n"
        "try:\n"
        "    ElasticsearchSink(s)\n"
        "except MissingDependency as exc:\n"
        "    print('missing:', exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "missing:" in result.stdout and "container-exporter[elasticsearch]" in result.stdout


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"api_key": "k", "bearer_token": "t"}, "one way to authenticate"),
        ({"username": "u"}, "both username and password"),
        ({"index": "stats/%Y"}, "cannot contain"),
        ({"index": "%Y.%m.%d", "data_stream": True}, "is empty"),
    ],
)
def test_settings_refuse_contradictions(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ElasticsearchSettings.model_validate(settings)


def test_template_patterns_and_retry_after() -> None:
    assert template_pattern("container-stats-%Y.%m.%d") == "container-stats-*"
    assert template_pattern("Stats-%Y-w%V") == "stats-*-w*"
    assert template_pattern("a%%b-%Y") == "a%b-*"
    assert retry_after_seconds("12") == 12.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    later = retry_after_seconds(format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True))
    assert later is not None and 25 <= later <= 31
