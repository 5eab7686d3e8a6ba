"""Elasticsearch / OpenSearch sink: bulk indexing with the official client, record_id as _id.

One ``write_batch`` is one ``_bulk`` request whose NDJSON body is built from the JSON every
record already carries (:meth:`Envelope.json_bytes`), so a record is never encoded twice. Every
item of the response is read: stored, worth retrying (:class:`PartialFailure` ``failed``) or
refused for good (``rejected``). ``_id`` is the record's ``record_id``, so sending a record again
(after a timeout, from the spool after a restart) overwrites it instead of duplicating it.

The client's ``bulk`` API is called directly rather than through ``helpers.streaming_bulk``: the
helper re-encodes an action dict per record, may split a batch into several requests (so a
failure could leave part of it stored under one exception), and hides the response's headers
(Retry-After). One request per batch with ``filter_path`` keeps the answer small; measured in
bench/sink_elasticsearch.py (the helper costs about 1.5x the client CPU per record).

OpenSearch: the official client (9.x) sends ``application/vnd.elasticsearch+json;
compatible-with=9``, which OpenSearch refuses (406), and refuses 2xx answers that lack the
``X-Elastic-Product: Elasticsearch`` header, which OpenSearch never sends. This version has no
setting nor environment switch for either (the media-type rewrite in
``BaseClient._perform_request`` is unconditional outside serverless mode; 7.x's
ELASTIC_CLIENT_APIVERSIONING opt-in is gone), and the usual workaround, setting the private
``_verified_elasticsearch``, is lost on every ``client.options()`` copy. So with
``compatibility = "opensearch"`` the client is given, through its public ``node_class``
parameter, the client's own urllib3 node with the media types turned back into plain
``application/json`` / ``application/x-ndjson`` and the product header supplied when missing.
Per client, no process-wide state.

Only this module's settings import without the ``elasticsearch`` package; the sink imports it.
"""

from __future__ import annotations

import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, model_validator

from exporter.durations import StrList
from exporter.models import SCHEMA_VERSION, ContainerReference, ContainerStats, Envelope
from sinks.protocol import (
    AUTH,
    ERROR,
    REJECTED,
    THROTTLED,
    UNREACHABLE,
    MissingDependency,
    PartialFailure,
    SinkError,
    retry_after_seconds,
)
from sinks.settings import DeliverySettings

if TYPE_CHECKING:
    from elasticsearch import Elasticsearch

# Characters Elasticsearch and OpenSearch refuse in index names.
_FORBIDDEN_INDEX_CHARS = set(' \\/*?"<>|,#:')


class ElasticsearchSettings(DeliverySettings):
    hosts: StrList = Field(default_factory=lambda: ["http://localhost:9200"], description="Node URLs.")
    index: str = Field("container-stats-%Y.%m.%d", description="Index for stats, strftime pattern of the record's UTC timestamp (lower-cased). In data_stream mode the data stream's name: the part before the first % (container-stats-%Y.%m.%d → container-stats).")
    events_index: str = Field("container-events-%Y.%m.%d", description="Index for container events, same rules.")
    data_stream: bool = Field(False, description="Write to data streams (op_type create, @timestamp) instead of dated indices.")
    install_template: bool = Field(True, description="Install index templates with explicit mappings at start (<template_name>-stats, <template_name>-events).")
    template_name: str = Field("container-exporter", description="Prefix of the names of the index templates installed.")
    compatibility: Literal["elasticsearch", "opensearch"] = Field("elasticsearch", description="opensearch: talk to OpenSearch (plain JSON media type, no product check).")
    dedot_labels: bool = Field(True, description="Write container label names with '.' replaced by '_' (as Metricbeat does): Docker Compose sets both com.docker.compose.project and com.docker.compose.project.working_dir, which cannot both be mapped with the dots kept.")
    api_key: str | None = Field(None, description="Elasticsearch API key (base64 id:key).")
    username: str | None = Field(None, description="Basic auth user.")
    password: str | None = Field(None, description="Basic auth password.")
    bearer_token: str | None = Field(None, description="Bearer token.")
    ca_certs: str | None = Field(None, description="CA bundle for the nodes' certificates.")
    verify_certs: bool = Field(True, description="Verify the nodes' TLS certificates.")

    @model_validator(mode="after")
    def _check(self) -> ElasticsearchSettings:
        methods = [name for name, on in (("api_key", self.api_key), ("username/password", self.username), ("bearer_token", self.bearer_token)) if on]
        if len(methods) > 1:
            raise ValueError(f"set one way to authenticate, not {' and '.join(methods)}")
        if (self.username is None) != (self.password is None):
            raise ValueError("basic auth needs both username and password")
        if not self.hosts:
            raise ValueError("hosts: at least one node URL")
        for field in ("index", "events_index"):
            pattern = getattr(self, field)
            bad = sorted(_FORBIDDEN_INDEX_CHARS & set(pattern))
            if bad:
                raise ValueError(f"{field} {pattern!r}: index names cannot contain {' '.join(repr(c) for c in bad)}")
            if pattern.startswith(("_", "-", "+")):
                raise ValueError(f"{field} {pattern!r}: index names cannot start with '_', '-' or '+'")
            if self.data_stream and not stream_name(pattern):
                raise ValueError(f"{field} {pattern!r}: in data_stream mode the name before the first % is the data stream's, and it is empty")
        return self


def stream_name(pattern: str) -> str:
    """The data stream a date pattern stands for: the text before its first directive."""
    if "%" not in pattern:
        return pattern.lower()
    return pattern[: pattern.index("%")].rstrip("-_.").lower()


def template_pattern(pattern: str) -> str:
    """Index pattern matching every index a strftime pattern expands to ("container-stats-%Y.%m.%d" → "container-stats-*")."""
    # A run of directives with only separators between them becomes one "*"; "%%" stays a "%".
    out = re.sub(r"%[^%](?:[-_.+]*%[^%])*", "*", pattern.replace("%%", "\0"))
    return out.replace("\0", "%").lower()


# --- mappings ------------------------------------------------------------------------------------

KEYWORD = {"type": "keyword", "ignore_above": 1024}
_LEAF_TYPES: dict[type, dict[str, Any]] = {
    bool: {"type": "boolean"},
    int: {"type": "long"},
    float: {"type": "double"},
    str: KEYWORD,
    datetime: {"type": "date"},
    date: {"type": "date"},
}


def model_mapping(model: type[BaseModel], path: str = "") -> tuple[dict[str, Any], list[str]]:
    """Mapping properties for a record model, and the paths of its string-keyed dicts (labels).

    Integers (counters, bytes, ns) are long, floats (pressure averages, limit_cores) double,
    strings keyword, datetimes date. A list maps as its items (Elasticsearch has no array type):
    lists of models stay arrays of objects, as in the record. A ``dict[str, ...]`` is an object
    mapped dynamically; its paths are returned for a dynamic template (labels → keyword).
    """
    properties: dict[str, Any] = {}
    dict_paths: list[str] = []
    for name, field in model.model_fields.items():
        mapping = _annotation_mapping(field.annotation, f"{path}{name}", dict_paths)
        if mapping is not None:
            properties[name] = mapping
    return properties, dict_paths


def _annotation_mapping(annotation: Any, path: str, dict_paths: list[str]) -> dict[str, Any] | None:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _annotation_mapping(args[0], path, dict_paths) if len(args) == 1 else None
    if origin is list:
        return _annotation_mapping(typing.get_args(annotation)[0], path, dict_paths)
    if origin is dict:
        dict_paths.append(path)
        return {"type": "object", "dynamic": True}
    if origin is Literal:
        return KEYWORD
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        properties, nested = model_mapping(annotation, f"{path}.")
        dict_paths.extend(nested)
        return {"properties": properties}
    return _LEAF_TYPES.get(annotation)  # Any and other unions: kept in _source, not indexed


def _mappings(properties: dict[str, Any], dict_paths: list[str]) -> dict[str, Any]:
    templates = [
        {f"{path.replace('.', '_')}_as_keyword": {"path_match": f"{path}.*", "match_mapping_type": "string", "mapping": KEYWORD}}
        for path in dict_paths
    ]
    return {
        # Fields this template does not know (a newer exporter's, until the template is updated
        # at its start) stay in _source, searchable once mapped; "strict" would refuse the
        # whole document and lose the record.
        "dynamic": False,
        "date_detection": False,
        "dynamic_templates": templates,
        "properties": {"@timestamp": {"type": "date"}, **properties},
    }


def stats_mappings() -> dict[str, Any]:
    return _mappings(*model_mapping(ContainerStats))


def events_mappings() -> dict[str, Any]:
    """Events: the envelope fields, the container, event_type, and data as a dynamic object.

    The event model is not written yet; when exporter.models grows an ``Event`` its fields are
    mapped too (and win over these).
    """
    container, dict_paths = model_mapping(ContainerReference, "container.")
    properties: dict[str, Any] = {
        "schema_version": {"type": "long"},
        "timestamp": {"type": "date"},
        "machine_id": KEYWORD,
        "hostname": KEYWORD,
        "record_id": KEYWORD,
        "run_id": KEYWORD,
        "event_type": KEYWORD,
        "container": {"properties": container},
        "data": {"type": "object", "dynamic": True},
    }
    dict_paths.append("data")
    from exporter import models

    event_model = getattr(models, "Event", None)
    if isinstance(event_model, type) and issubclass(event_model, BaseModel):
        derived, paths = model_mapping(event_model)
        properties.update(derived)
        dict_paths.extend(p for p in paths if p not in dict_paths)
    return _mappings(properties, dict_paths)


# --- errors --------------------------------------------------------------------------------------

COMPAT_HINT = 'the server is OpenSearch: set compatibility = "opensearch" in [sinks.elasticsearch]'
RETRYABLE_ITEM_STATUSES = frozenset({401, 403, 404, 408, 429})


def _reason(error: Any) -> str:
    """type: reason (caused by ...) of an Elasticsearch error object."""
    if not isinstance(error, Mapping):
        return str(error)
    text = f"{error.get('type', 'error')}: {error.get('reason', '')}".rstrip(": ")
    cause = error.get("caused_by")
    if isinstance(cause, Mapping) and cause.get("reason"):
        text += f" (caused by {cause.get('type')}: {cause.get('reason')})"
    return text


def _body_reason(body: Any) -> str:
    if isinstance(body, Mapping) and "error" in body:
        return _reason(body["error"])
    return str(body)[:500]


def _looks_like_opensearch(info: Any) -> bool:
    if not isinstance(info, Mapping):
        return False
    version = info.get("version")
    distribution = version.get("distribution") if isinstance(version, Mapping) else None
    return distribution == "opensearch" or "opensearch" in str(info.get("tagline", "")).lower()


def _media_type_refused(status: int, body: Any) -> bool:
    text = json.dumps(body) if isinstance(body, Mapping) else str(body)
    return status == 406 or (status == 400 and ("content_type_header_exception" in text or "Content-Type header" in text))


# --- the sink ------------------------------------------------------------------------------------

_BULK_FILTER = "errors,items.*.status,items.*.error"
_DAY_DIRECTIVES = set("YmdjyCGgVuwaAbBe%")


class ElasticsearchSink:
    name = "elasticsearch"

    def __init__(self, settings: ElasticsearchSettings) -> None:
        try:
            import elasticsearch
        except ImportError:
            raise MissingDependency(
                "the elasticsearch sink needs the elasticsearch client: pip install 'container-exporter[elasticsearch]'"
            ) from None
        self.settings = settings
        self._es = elasticsearch
        self._opensearch = settings.compatibility == "opensearch"
        self._op = b"create" if settings.data_stream else b"index"
        self._stats = _IndexNamer(settings.index, settings.data_stream)
        self._events = _IndexNamer(settings.events_index, settings.data_stream)
        self._dedot = _Dedotter()
        self._client: Elasticsearch = self._make_client()
        self._closed = False

    def _make_client(self) -> Elasticsearch:
        s = self.settings
        kwargs: dict[str, Any] = {
            "request_timeout": s.timeout,
            # Retries belong to the delivery worker; the transport only moves on to the next node
            # when one refuses the connection (a timeout is not retried: it may have been stored).
            "max_retries": len(s.hosts) - 1,
            "retry_on_status": (),
            "retry_on_timeout": False,
            "retry_backoff_base": 0,
            "verify_certs": s.verify_certs,
        }
        if s.ca_certs:
            kwargs["ca_certs"] = s.ca_certs
        if not s.verify_certs:
            kwargs["ssl_show_warn"] = False
        if s.api_key:
            kwargs["api_key"] = s.api_key
        elif s.username is not None and s.password is not None:
            kwargs["basic_auth"] = (s.username, s.password)
        elif s.bearer_token:
            kwargs["bearer_auth"] = s.bearer_token
        if self._opensearch:
            kwargs["node_class"] = opensearch_node_class()
        return self._es.Elasticsearch(list(s.hosts), **kwargs)

    @property
    def client(self) -> Elasticsearch:
        """The client this sink writes with (benchmarks compare against it)."""
        return self._client

    # --- protocol --------------------------------------------------------------------------------

    def open(self) -> None:
        """Check the server answers (and is what ``compatibility`` says), install the templates."""
        if self._closed:  # opened again after close(): its connection pools are gone
            self._client = self._make_client()
            self._closed = False
        try:
            info: Any = self._client.info().body
        except self._es.AuthorizationException:
            info = None  # 403: a user allowed to write may not be allowed to read the cluster's banner
        except Exception as exc:
            raise self._error(exc, "connecting", opening=True) from exc
        if not self._opensearch and _looks_like_opensearch(info):
            raise SinkError(f"{COMPAT_HINT} (it answered as OpenSearch {info['version'].get('number')})", retryable=False, category=ERROR)
        if self.settings.install_template:
            try:
                self._install_templates()
            except SinkError:
                raise
            except Exception as exc:
                error = self._error(exc, "installing the index templates", opening=True)
                if error.category == AUTH:
                    hint = "grant the manage_index_templates privilege, or set install_template = false and install them otherwise"
                    error = SinkError(f"{error} ({hint})", category=AUTH)
                raise error from exc

    def write_batch(self, records: Sequence[Envelope]) -> None:
        if not records:
            return
        body, sent, unsendable = self._bulk_body(records)
        if not sent:
            raise PartialFailure(_unsendable_message(unsendable, len(records)), rejected=list(unsendable), category=REJECTED)
        try:
            response = self._client.bulk(operations=body, filter_path=_BULK_FILTER)
        except Exception as exc:
            raise self._error(exc, f"bulk request of {len(sent)} records") from exc
        result = response.body
        if not isinstance(result, Mapping):
            raise SinkError(f"bulk answer is not a JSON object: {str(result)[:200]}", category=ERROR)
        if not result.get("errors") and not unsendable:
            return
        items = result.get("items")
        if not isinstance(items, list) or len(items) != len(sent):
            got = len(items) if isinstance(items, list) else "no"
            raise SinkError(f"bulk answer has {got} items for {len(sent)} actions", category=ERROR)
        self._check_items(records, sent, items, unsendable, response.meta.headers.get("retry-after"))

    def flush(self) -> None:
        """Nothing buffered: every write_batch is one finished request."""

    def close(self) -> None:
        self._client.close()
        self._closed = True

    # --- bulk ------------------------------------------------------------------------------------

    def _bulk_body(self, records: Sequence[Envelope]) -> tuple[bytes, list[int], dict[int, str]]:
        """The NDJSON body; which batch indices it holds (in order); those that cannot be sent, why."""
        parts: list[bytes | memoryview] = []
        sent: list[int] = []
        unsendable: dict[int, str] = {}
        op = self._op
        dedot = self._dedot if self.settings.dedot_labels else None
        for i, record in enumerate(records):
            ts = getattr(record, "timestamp", None)
            if not isinstance(ts, datetime):
                unsendable[i] = f"{type(record).__name__} has no timestamp to index it by"
                continue
            if ts.tzinfo is None:
                ts = ts.replace(tzinfo=UTC)
            elif ts.utcoffset():
                ts = ts.astimezone(UTC)
            namer = self._stats if isinstance(record, ContainerStats) else self._events
            source = record.json_bytes()
            record_id = getattr(record, "record_id", None)
            if not isinstance(record_id, str) or not record_id:
                # No id of its own (a future event type): one derived from the content keeps a
                # re-send idempotent all the same.
                record_id = hashlib.blake2b(source, digest_size=16).hexdigest()
            container = getattr(record, "container", None)
            if dedot is not None and isinstance(container, ContainerReference):
                source = dedot(source, container)
            # The action line, then the source with @timestamp spliced in after its "{".
            parts.append(b'{"%s":{"_index":%s,"_id":%s}}\n{"@timestamp":"%s",' % (
                op, namer.index_json(ts), json.dumps(record_id).encode(), ts.isoformat().encode(),
            ))
            parts.append(memoryview(source)[1:])
            parts.append(b"\n")
            sent.append(i)
        return b"".join(parts), sent, unsendable

    def _check_items(
        self, records: Sequence[Envelope], sent: list[int], items: list[Any], unsendable: dict[int, str], retry_after: str | None
    ) -> None:
        failed: list[int] = []
        rejected: list[int] = sorted(unsendable)
        failed_reasons: dict[int, str] = {}
        rejected_reasons: dict[int, str] = {}
        throttled = auth = 0
        create = self.settings.data_stream
        for i, item in zip(sent, items, strict=True):
            result = next(iter(item.values()), {}) if isinstance(item, Mapping) and item else {}
            status = result.get("status", 500) if isinstance(result, Mapping) else 500
            if 200 <= status < 300 or (status == 409 and create):
                # 409 on create: a document with this _id is there already; the record is stored.
                continue
            reason = f"{status} {_reason(result.get('error', ''))}"
            if status >= 500 or status in RETRYABLE_ITEM_STATUSES:
                failed.append(i)
                failed_reasons.setdefault(status, reason)
                throttled += status == 429
                auth += status in (401, 403)
            else:
                rejected.append(i)
                rejected_reasons.setdefault(status, reason)
        if not failed and not rejected:
            return
        rejected.sort()
        parts = []
        if rejected:
            why = list(rejected_reasons.values()) + list(dict.fromkeys(unsendable.values()))
            parts.append(f"{len(rejected)} rejected ({'; '.join(why[:3])})")
        if failed:
            parts.append(f"{len(failed)} failed, worth retrying ({'; '.join(list(failed_reasons.values())[:3])})")
        message = f"{len(records) - len(failed) - len(rejected)} of {len(records)} records stored; " + ", ".join(parts)
        category = THROTTLED if throttled else AUTH if auth else ERROR if failed else REJECTED
        raise PartialFailure(
            message, failed=failed, rejected=rejected, category=category,
            retry_after_s=retry_after_seconds(retry_after) if failed else None,
        )

    # --- templates -------------------------------------------------------------------------------

    def _install_templates(self) -> None:
        s = self.settings
        templates = [
            (f"{s.template_name}-stats", self._stats.template_pattern, stats_mappings(), 200),
            (f"{s.template_name}-events", self._events.template_pattern, events_mappings(), 201),
        ]
        meta = {"managed_by": "container-exporter", "schema_version": SCHEMA_VERSION}
        indices = self._client.indices
        legacy = False
        for name, pattern, mappings, priority in templates:
            if not legacy:
                try:
                    indices.put_index_template(
                        name=name, index_patterns=[pattern], priority=priority, version=SCHEMA_VERSION, meta=meta,
                        template={"mappings": mappings}, data_stream={} if s.data_stream else None,
                    )
                    continue
                except self._es.ApiError as exc:
                    if not _lacks_composable_templates(exc):
                        raise
                    if s.data_stream:
                        raise SinkError(
                            "this server has no composable index templates (_index_template, Elasticsearch 7.8+), so no data streams: set data_stream = false",
                            retryable=False, category=ERROR,
                        ) from exc
                    legacy = True
            indices.put_template(name=name, index_patterns=[pattern], order=priority, version=SCHEMA_VERSION, mappings=mappings)

    # --- error mapping ---------------------------------------------------------------------------

    def _error(self, exc: Exception, what: str, *, opening: bool = False) -> SinkError:
        es = self._es
        timeout = self.settings.timeout
        if isinstance(exc, SinkError):
            return exc
        if isinstance(exc, es.UnsupportedProductError) and not self._opensearch:
            return SinkError(f"{what}: {COMPAT_HINT} (the server did not identify itself as Elasticsearch)", retryable=not opening, category=ERROR)
        if isinstance(exc, es.ApiError):
            status = exc.meta.status
            reason = _body_reason(exc.body)
            if not self._opensearch and _media_type_refused(status, exc.body):
                return SinkError(f"{what}: {COMPAT_HINT} (it refused the client's media type: {reason})", retryable=not opening, category=ERROR)
            retry_after = retry_after_seconds(exc.meta.headers.get("retry-after"))
            if status in (401, 403):
                return SinkError(f"{what}: credentials refused ({status} {reason})", category=AUTH)
            if status == 429:
                return SinkError(f"{what}: throttled (429 {reason})", retry_after_s=retry_after, category=THROTTLED)
            if status == 413:
                return SinkError(f"{what}: request too large (413): lower batch_size or raise http.max_content_length", retryable=False, category=ERROR)
            return SinkError(f"{what}: HTTP {status} {reason}", retryable=status != 400, retry_after_s=retry_after, category=ERROR)
        if isinstance(exc, es.ConnectionTimeout):
            return SinkError(f"{what}: no answer from {self._hosts()} within {timeout:g} s", category=UNREACHABLE)
        if isinstance(exc, es.ConnectionError):  # refused, DNS, TLS handshake
            return SinkError(f"{what}: cannot reach {self._hosts()}: {_root_cause(exc)}", category=UNREACHABLE)
        if isinstance(exc, es.SerializationError):
            return SinkError(f"{what}: unreadable answer: {exc}", category=ERROR)
        return SinkError(f"{what}: {type(exc).__name__}: {exc}", category=ERROR)

    def _hosts(self) -> str:
        return ", ".join(self.settings.hosts)


def _root_cause(exc: BaseException) -> str:
    """The innermost error's text ("[Errno 111] Connection refused", "certificate verify failed: ...")."""
    seen = {id(exc)}
    while True:
        inner = exc.__cause__ or exc.__context__
        if inner is None or id(inner) in seen:
            return str(exc)
        seen.add(id(inner))
        exc = inner


def _lacks_composable_templates(exc: Any) -> bool:
    """Elasticsearch before 7.8 takes /_index_template/<name> for an index name, or has no handler."""
    status = exc.meta.status
    text = json.dumps(exc.body) if isinstance(exc.body, Mapping) else str(exc.body)
    return status in (404, 405) or (status == 400 and ("invalid_index_name_exception" in text or "no handler found" in text))


class _Dedotter:
    """A record's JSON with '.' in its container's label names replaced by '_'.

    The container reference's JSON is swapped for its dedotted twin, made once per reference: a
    container's records share one reference object (exporter/manager.py replaces it when the
    metadata changes, never edits it), and the entry keeps it alive, so its id is not reused.
    """

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._by_ref: dict[int, tuple[ContainerReference, tuple[bytes, bytes] | None]] = {}

    def __call__(self, source: bytes, container: ContainerReference) -> bytes:
        entry = self._by_ref.get(id(container))
        if entry is None or entry[0] is not container:
            if len(self._by_ref) >= self.limit:
                self._by_ref.clear()
            entry = self._by_ref[id(container)] = (container, _swap(container))
        swap = entry[1]
        # '"container":{' cannot occur inside a JSON string (its quotes would be escaped), so the
        # first match is the reference itself.
        return source if swap is None else source.replace(swap[0], swap[1], 1)


def _swap(container: ContainerReference) -> tuple[bytes, bytes] | None:
    if not any("." in k for k in container.labels):
        return None
    dedotted = container.model_copy(update={"labels": {k.replace(".", "_"): v for k, v in container.labels.items()}})
    to_json = ContainerReference.__pydantic_serializer__.to_json
    return b'"container":' + to_json(container), b'"container":' + to_json(dedotted)


def _unsendable_message(unsendable: dict[int, str], total: int) -> str:
    return f"0 of {total} records stored; {len(unsendable)} rejected ({'; '.join(dict.fromkeys(unsendable.values()))})"


class _IndexNamer:
    """A record's index (a dated index, or the data stream) as JSON bytes, cached per UTC day."""

    def __init__(self, pattern: str, data_stream: bool) -> None:
        self.pattern = pattern
        self.fixed: bytes | None = None
        if data_stream:
            name = stream_name(pattern)
            self.fixed = json.dumps(name).encode()
            self.template_pattern = name
        else:
            self.template_pattern = template_pattern(pattern)
            if "%" not in pattern:
                self.fixed = json.dumps(pattern.lower()).encode()
        self._per_day = set(re.findall(r"%(.)", pattern)) <= _DAY_DIRECTIVES
        self._cache: dict[Any, bytes] = {}

    def index_json(self, ts: datetime) -> bytes:
        if self.fixed is not None:
            return self.fixed
        key = (ts.year, ts.month, ts.day) if self._per_day else ts
        name = self._cache.get(key)
        if name is None:
            if len(self._cache) > 64:
                self._cache.clear()
            name = self._cache[key] = json.dumps(ts.strftime(self.pattern).lower()).encode()
        return name


_NODE_CLASS: type | None = None


def opensearch_node_class() -> type:
    """The client's urllib3 node, speaking plain JSON and accepting servers that are not Elasticsearch."""
    global _NODE_CLASS
    if _NODE_CLASS is None:
        from elastic_transport import HttpHeaders, Urllib3HttpNode
        from elastic_transport.client_utils import DEFAULT

        vendor = re.compile(r"application/vnd\.elasticsearch\+([\w.-]+)\s*(?:;\s*compatible-with=\d+)?")

        class OpenSearchNode(Urllib3HttpNode):
            def perform_request(self, method: str, target: str, body: bytes | None = None, headers: HttpHeaders | None = None, request_timeout: Any = DEFAULT) -> Any:
                if headers:
                    headers = headers.copy()
                    for name in ("accept", "content-type"):
                        value = headers.get(name)
                        if value and "vnd.elasticsearch" in value:
                            headers[name] = vendor.sub(r"application/\1", value)
                response = super().perform_request(method, target, body=body, headers=headers, request_timeout=request_timeout)
                # The client refuses a 2xx answer without this header (its "product check");
                # OpenSearch never sends it. compatibility = "opensearch" is the user saying so.
                if "x-elastic-product" not in response.meta.headers:
                    response.meta.headers["x-elastic-product"] = "Elasticsearch"
                return response

        _NODE_CLASS = OpenSearchNode
    return _NODE_CLASS
