"""InfluxDB sink: line protocol to the v2 API (influxdb-client) or to InfluxDB 1.x's /write.

The records are turned into line protocol text directly, not through ``influxdb_client.Point``:
a Point costs ~20 µs per line on a small VM, where our text costs ~2 µs and the server ingests a
line in 3-7 µs (bench/sink_influxdb.py).

Layouts
-------
``default``: one measurement per stat group, one point per group and record (per interface,
device, filesystem, pressure line or CPU where the group has several)::

    container_cpu         total_ns user_ns system_ns periods throttled_periods throttled_time_ns
                          load_average_milli
    container_cpu_per_cpu usage_ns                        +tag cpu (index; unless per_cpu = false)
    container_memory      usage_bytes max_usage_bytes working_set_bytes rss_bytes cache_bytes
                          swap_bytes mapped_file_bytes failcnt pgfault pgmajfault events_<low|high|max|oom|oom_kill>
    container_network     rx_/tx_ bytes packets errors dropped             +tag interface
    container_diskio      read_bytes write_bytes read_ops write_ops       +tags major minor device
    container_processes   pids_current pids_limit threads open_fds
    container_pressure    avg10 avg60 avg300 (floats) total_us            +tags resource kind
    container_filesystem  capacity_bytes usage_bytes available_bytes inodes inodes_free inodes_used
                                                                          +tags device mountpoint fs_type
    container_events      event_type and the event's other values (see LineEncoder._event_lines)

Every point carries the tags host, machine_id, container_name (first alias, else the cgroup
name), cgroup, namespace, runtime, image, label_<name> for the labels in ``label_tags`` (tags
without a value are left out), and the fields seq (integer), record_id (string) and
container_id (string; a tag instead with ``container_id_as_tag``). Timestamps are the record's,
in nanoseconds. ``None`` values are left out, and so is a point left without a value.

``cadvisor``: the series cAdvisor's InfluxDB storage driver writes (storage/influxdb/influxdb.go),
one measurement per metric with a single field ``value`` and the tags ``machine`` (host name)
and ``container_name``, so dashboards made for cAdvisor keep working: cpu_usage_total,
cpu_usage_system, cpu_usage_user, cpu_usage_per_cpu (+tag instance), load_average, rx_bytes,
rx_errors, tx_bytes, tx_errors (the first interface, as cAdvisor), memory_usage,
memory_max_usage, memory_cache, memory_rss, memory_swap, memory_mapped_file,
memory_working_set, memory_failcnt, memory_failure (+tags failure_type=pgfault|pgmajfault,
scope=hierarchical), fs_usage and fs_limit (+tags device, type=usage|limit). cAdvisor also tags
every point with all container labels under their own names; we do that for the labels in
``label_tags`` only (a label named like one of the tags above is left out), and the container id
becomes the tag container_id with ``container_id_as_tag``. cAdvisor's referenced_memory,
hugetlb_*, perf_stat and resctrl_* have no source here, and it writes zeros where we leave a
value out.

Delivery is at least once: the worker may send a batch again after a timeout that in fact
succeeded. That is harmless: InfluxDB keeps one point per series and timestamp, so a repeated
point overwrites itself with the same values. (VictoriaMetrics keeps repeats unless it runs with
-dedup.minScrapeInterval.)
"""

from __future__ import annotations

import base64
import json
import logging
import math
import operator
import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit

from pydantic import BaseModel, Field, field_validator

from exporter.durations import StrList
from exporter.models import ContainerReference, ContainerStats, Envelope
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

log = logging.getLogger(__name__)


class InfluxDBSettings(DeliverySettings):
    api: Literal["v1", "v2"] = Field("v2", description="v2: /api/v2/write with org, bucket and token; v1: InfluxDB 1.x /write with database and retention policy.")
    url: str = Field("http://localhost:8086", description="Base URL of the server.")
    token: str | None = Field(None, description="v2 API token (with api = \"v1\": sent as \"Authorization: Token\", for InfluxDB 2.x's 1.x-compatible /write).")
    org: str | None = Field(None, description="v2 organisation.")
    bucket: str = Field("container-stats", description="v2 bucket.")
    database: str = Field("cadvisor", description="v1 database.")
    retention_policy: str | None = Field(None, description="v1 retention policy (default: the database's).")
    username: str | None = Field(None, description="v1 user (HTTP basic auth).")
    password: str | None = Field(None, description="v1 password.")
    layout: Literal["default", "cadvisor"] = Field("default", description="default: one measurement per stat group (container_cpu, container_memory, ...); cadvisor: cAdvisor's series (one measurement per metric, field value, tags machine and container_name).")
    container_id_as_tag: bool = Field(False, description="Make the container id a tag (one series per container instance) instead of a field.")
    label_tags: StrList = Field(default_factory=list, description="Container labels written as tags: label_<name> (in the cadvisor layout under their own names, as cAdvisor does).")
    per_cpu: bool = Field(True, description="Write per-CPU usage (container_cpu_per_cpu; cpu_usage_per_cpu in the cadvisor layout): one point per CPU and record.")
    gzip: bool = Field(True, description="Compress write requests.")
    verify_ssl: bool = Field(True, description="Verify the server's TLS certificate.")
    ssl_ca_cert: str | None = Field(None, description="CA bundle for the server's certificate.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL with a host, got {value!r}")
        return value.rstrip("/")


# -- line protocol ---------------------------------------------------------------------------------

# Tag keys, tag values and field keys: comma, equals sign and space are escaped. A backslash is
# left alone (InfluxDB 1.x only unescapes "\," "\=" "\ " there, so "\\" would be stored doubled),
# but one at the very end is dropped: it would escape the separator after it, and InfluxDB 1.x
# refuses such a tag even doubled ("invalid tag format"). Line breaks cannot be escaped at all;
# they are written as the two characters "\n".
_KEY_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\r": r"\r"})
# String field values: backslash and double quote.
_STRING_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r"})
_KEY_SPECIALS = frozenset(",= \n\r")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def escape_key(value: str) -> str:
    """A tag key, tag value or field key."""
    if not _KEY_SPECIALS.isdisjoint(value):
        value = value.translate(_KEY_ESCAPES)
    if value.endswith("\\"):
        value = value.rstrip("\\")
    return value


def string_field(value: str) -> str:
    """A string field value, quoted."""
    if '"' in value or "\\" in value or "\n" in value or "\r" in value:
        value = value.translate(_STRING_ESCAPES)
    return f'"{value}"'


def field_value(value: Any) -> str | None:
    """A field value in line protocol; None for what cannot be one (None, NaN, ±inf, lists...)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else None
    if isinstance(value, Enum):
        value = value.value
        return field_value(value)
    if isinstance(value, str):
        return string_field(value)
    return None


def timestamp_ns(ts: datetime) -> int:
    if ts.tzinfo is None:  # records are UTC; a naive one is taken as UTC too
        ts = ts.replace(tzinfo=UTC)
    return (ts - _EPOCH) // _US * 1000


def _tag(key: str, value: object) -> str:
    """",key=value" or "" for a missing or empty value (InfluxDB refuses empty tag values)."""
    if value is None:
        return ""
    text = str(value)
    return f",{key}={escape_key(text)}" if text else ""


def _tag_text(tags: dict[str, Any]) -> str:
    """Tags sorted by key, as InfluxDB recommends (it sorts them itself otherwise)."""
    return "".join(_tag(escape_key(k), v) for k, v in sorted(tags.items()))


def int_fields(names: Sequence[str], keys: Sequence[str] | None = None) -> Callable[[dict[str, Any]], str]:
    """A function: a model's ``__dict__`` → "key=<n>i,..." for its integer attributes ``names``
    that are set ("" when none is). When all are set (the usual case), one %-format does it."""
    pairs = tuple(zip(names, (escape_key(k) for k in (keys or names)), strict=True))
    all_set = ",".join(f"{key}=%di" for _, key in pairs)
    get = operator.itemgetter(*names)
    if len(names) == 1:
        name, key = pairs[0]

        def one(values: dict[str, Any]) -> str:
            v = values[name]
            return "" if v is None else f"{key}={v}i"

        return one

    none = (None,) * len(names)

    def fields(values: dict[str, Any]) -> str:
        got = get(values)
        if None not in got:
            return all_set % got
        if got == none:
            return ""
        parts = []
        for name, key in pairs:
            v = values[name]
            if v is not None:
                parts.append(f"{key}={v}i")
        return ",".join(parts)

    return fields


# In groups that are set or unset together, so that each usually takes the one-format path.
_CPU_USAGE_FIELDS = int_fields(("total_ns", "user_ns", "system_ns"))
_CPU_THROTTLE_FIELDS = int_fields(("periods", "throttled_periods", "throttled_time_ns"))
_CPU_LOAD_FIELD = int_fields(("load_average_milli",))
_MEMORY_FIELDS = int_fields(
    (
        "usage_bytes",
        "max_usage_bytes",
        "working_set_bytes",
        "rss_bytes",
        "cache_bytes",
        "swap_bytes",
        "mapped_file_bytes",
        "failcnt",
        "pgfault",
        "pgmajfault",
    )
)
_MEMORY_EVENT_FIELDS = int_fields(("low", "high", "max", "oom", "oom_kill"), ("events_low", "events_high", "events_max", "events_oom", "events_oom_kill"))
_PROCESS_FIELDS = int_fields(("pids_current", "pids_limit", "threads", "open_fds"))
_FILESYSTEM_FIELDS = int_fields(("capacity_bytes", "usage_bytes", "available_bytes", "inodes", "inodes_free", "inodes_used"))
_NETWORK_VALUES = operator.itemgetter(
    "rx_bytes", "rx_packets", "rx_errors", "rx_dropped", "tx_bytes", "tx_packets", "tx_errors", "tx_dropped"
)
_NETWORK_LINE = (
    "container_network%s%s rx_bytes=%di,rx_packets=%di,rx_errors=%di,rx_dropped=%di,"
    "tx_bytes=%di,tx_packets=%di,tx_errors=%di,tx_dropped=%di%s"
)
_MEMORY_EVENT_VALUES = operator.itemgetter("low", "high", "max", "oom", "oom_kill")
_FILESYSTEM_TAG_VALUES = operator.itemgetter("device", "type", "mountpoint")
_DISKIO_VALUES = operator.itemgetter("major", "minor", "read_bytes", "write_bytes", "read_ops", "write_ops")
_DISKIO_LINE = "container_diskio%s,major=%d,minor=%d%s read_bytes=%di,write_bytes=%di,read_ops=%di,write_ops=%di%s"
_PRESSURE_VALUES = operator.itemgetter("total_us", "avg10", "avg60", "avg300")
_PRESSURE_LINE = "container_pressure%s%s total_us=%di,avg10=%s,avg60=%s,avg300=%s%s"


class Memo(dict[Any, str]):
    """key → make(key), remembered: for texts made of values that seldom change (a filesystem's
    tags, a cgroup's OOM counters, an interface name). Emptied when it grows past ``limit``."""

    def __init__(self, make: Callable[[Any], str], limit: int = 10_000) -> None:
        super().__init__()
        self.make = make
        self.limit = limit

    def __missing__(self, key: Any) -> str:
        if len(self) >= self.limit:
            self.clear()
        text = self[key] = self.make(key)
        return text


_PRESSURE_TAGS = {
    (resource, kind): f",resource={resource},kind={kind}" for resource in ("cpu", "memory", "io") for kind in ("some", "full")
}
# Tag keys the cadvisor layout sets itself; a label of the same name is not written.
_CADVISOR_TAG_KEYS = frozenset({"machine", "container_name", "instance", "device", "type", "failure_type", "scope", "container_id"})

# Records encoded and compressed at a time when gzip is on.
_GZIP_SLICE = 250
# Keep the tag cache from growing without bound where containers come and go by the thousand.
_TAG_CACHE_MAX = 10_000


class LineEncoder:
    """Records → line protocol text, per the layout; stateless but for a cache of tag sets."""

    def __init__(self, settings: InfluxDBSettings) -> None:
        self.layout = settings.layout
        self.id_as_tag = settings.container_id_as_tag
        self.label_tags = tuple(settings.label_tags)
        self.per_cpu = settings.per_cpu
        # (label name, its tag key), per layout.
        if self.layout == "cadvisor":
            self._label_keys = tuple((name, name) for name in sorted(self.label_tags) if name not in _CADVISOR_TAG_KEYS)
        else:
            self._label_keys = tuple((name, f"label_{name}") for name in sorted(self.label_tags))
        self._tag_cache: dict[tuple[Any, ...], str] = {}
        self._tags_by_ref: dict[int, tuple[ContainerReference, str, str, str]] = {}
        self._container_lines: Callable[[ContainerStats, list[str]], None] = (
            self._cadvisor_lines if self.layout == "cadvisor" else self._default_lines
        )
        self.unknown_types: dict[str, int] = {}
        # repr() of a float costs 4x a dict look-up, and PSI averages (two decimals, 0-100) take few values.
        self._floats = Memo(lambda value: repr(float(value)), limit=50_000)
        self._event_fields = Memo(lambda got: _MEMORY_EVENT_FIELDS(dict(zip(("low", "high", "max", "oom", "oom_kill"), got, strict=True))))
        self._fs_tags = Memo(lambda k: _tag("device", k[0]) + _tag("fs_type", k[1]) + _tag("mountpoint", k[2]))
        self._interface_tags = Memo(lambda name: _tag("interface", name))

    # -- records -------------------------------------------------------------------------------
    def encode(self, records: Iterable[BaseModel]) -> list[str]:
        """Lines, each ending in "\\n"; records of an unknown kind add none."""
        out: list[str] = []
        container_lines = self._container_lines
        for record in records:
            if type(record) is ContainerStats:
                container_lines(record, out)
            else:
                self.add(record, out)
        return out

    def add(self, record: BaseModel, out: list[str]) -> None:
        if isinstance(record, ContainerStats):
            self._container_lines(record, out)
        elif not self._event_lines(record, out):
            # Not a kind this sink knows how to store, and not an event (see _event_lines):
            # skipped, once counted; a later record model gets its own layout here.
            name = type(record).__name__
            if name not in self.unknown_types:
                log.warning("influxdb sink: skipping records of type %s (no line protocol layout for them)", name)
            self.unknown_types[name] = self.unknown_types.get(name, 0) + 1

    def record_lines(self, record: BaseModel) -> list[str]:
        """One record's lines without their line breaks (for working out which records a server refused)."""
        out: list[str] = []
        self.add(record, out)
        return [line.rstrip("\n") for line in out]

    # -- tags ----------------------------------------------------------------------------------
    def _common_tags(self, record: ContainerStats) -> str:
        ref = record.container
        # A container's reference object is shared by all its records (exporter/manager.py
        # replaces it when the metadata changes, never edits it), so its identity finds the
        # tags cheaply; the entry keeps the reference alive, so its id cannot be reused.
        entry = self._tags_by_ref.get(id(ref))
        if entry is not None and entry[0] is ref and entry[1] == record.hostname and entry[2] == record.machine_id:
            return entry[3]
        labels = ref.labels
        label_values = tuple(labels.get(name) for name, _ in self._label_keys) if labels else ()
        key = (
            record.hostname,
            record.machine_id,
            ref.name,
            ref.id,
            ref.aliases[0] if ref.aliases else None,
            ref.namespace,
            ref.runtime,
            ref.image,
            label_values,
        )
        tags = self._tag_cache.get(key)
        if tags is None:
            if len(self._tag_cache) >= _TAG_CACHE_MAX:
                self._tag_cache.clear()
            tags = self._build_tags(record, ref, label_values)
            self._tag_cache[key] = tags
        if len(self._tags_by_ref) >= _TAG_CACHE_MAX:
            self._tags_by_ref.clear()
        self._tags_by_ref[id(ref)] = (ref, record.hostname, record.machine_id, tags)
        return tags

    def _build_tags(self, record: ContainerStats, ref: ContainerReference, label_values: tuple[str | None, ...]) -> str:
        container_name = ref.aliases[0] if ref.aliases else ref.name
        labels = dict(zip((key for _, key in self._label_keys), label_values, strict=False))
        if self.layout == "cadvisor":
            tags = {"container_name": container_name, "machine": record.hostname, **labels}
        else:
            tags = {
                "cgroup": ref.name,
                "container_name": container_name,
                "host": record.hostname,
                "image": ref.image,
                "machine_id": record.machine_id,
                "namespace": ref.namespace,
                "runtime": ref.runtime,
                **labels,
            }
        if self.id_as_tag:
            tags["container_id"] = ref.id
        return _tag_text(tags)

    # -- default layout ------------------------------------------------------------------------
    def _default_lines(self, r: ContainerStats, out: list[str]) -> None:
        tags = self._common_tags(r)
        rid = r.record_id
        rid = f'"{rid}"' if rid.isalnum() else string_field(rid)  # our ids are hex
        ref_id = r.container.id
        cid = f",container_id={string_field(ref_id)}" if ref_id and not self.id_as_tag else ""
        end = f",seq={r.seq}i,record_id={rid}{cid} {timestamp_ns(r.timestamp)}\n"
        append = out.append

        cpu = r.cpu
        if cpu is not None:
            values = cpu.__dict__
            fields = ",".join(
                [f for f in (_CPU_USAGE_FIELDS(values), _CPU_THROTTLE_FIELDS(values), _CPU_LOAD_FIELD(values)) if f]
            )
            if fields:
                append(f"container_cpu{tags} {fields}{end}")
            per_cpu = values["per_cpu_ns"]
            if per_cpu and self.per_cpu:
                for i, v in enumerate(per_cpu):
                    append(f"container_cpu_per_cpu{tags},cpu={i} usage_ns={v}i{end}")

        memory = r.memory
        if memory is not None:
            values = memory.__dict__
            fields = _MEMORY_FIELDS(values)
            events = values["events"]
            if events is not None:
                more = self._event_fields[_MEMORY_EVENT_VALUES(events.__dict__)]
                if more:
                    fields = f"{fields},{more}" if fields else more
            if fields:
                append(f"container_memory{tags} {fields}{end}")

        if r.network:
            interface_tags = self._interface_tags
            for n in r.network:
                values = n.__dict__
                append(_NETWORK_LINE % ((tags, interface_tags[values["name"]]) + _NETWORK_VALUES(values) + (end,)))

        if r.diskio:
            for d in r.diskio:
                major, minor, *counts = _DISKIO_VALUES(d.__dict__)
                append(_DISKIO_LINE % (tags, major, minor, _tag("device", d.device), *counts, end))

        processes = r.processes
        if processes is not None:
            fields = _PROCESS_FIELDS(processes.__dict__)
            if fields:
                append(f"container_processes{tags} {fields}{end}")

        pressure = r.pressure
        if pressure is not None:
            floats = self._floats
            for resource, p in pressure.__dict__.items():
                if p is None:
                    continue
                for kind, line in p.__dict__.items():
                    if line is None:
                        continue
                    total_us, avg10, avg60, avg300 = _PRESSURE_VALUES(line.__dict__)
                    psi_tags = _PRESSURE_TAGS[resource, kind]
                    if math.isfinite(avg10 + avg60 + avg300):
                        append(_PRESSURE_LINE % (tags, psi_tags, total_us, floats[avg10], floats[avg60], floats[avg300], end))
                    else:  # a NaN or infinity cannot be written; keep the rest
                        avgs = "".join(f",{k}={v!r}" for k, v in (("avg10", avg10), ("avg60", avg60), ("avg300", avg300)) if math.isfinite(v))
                        append(f"container_pressure{tags}{psi_tags} total_us={total_us}i{avgs}{end}")

        if r.filesystem:
            for fs in r.filesystem:
                values = fs.__dict__
                fields = _FILESYSTEM_FIELDS(values)
                if fields:
                    append(f"container_filesystem{tags}{self._fs_tags[_FILESYSTEM_TAG_VALUES(values)]} {fields}{end}")

    # -- cAdvisor layout -----------------------------------------------------------------------
    def _cadvisor_lines(self, r: ContainerStats, out: list[str]) -> None:
        tags = self._common_tags(r)
        end = f" {timestamp_ns(r.timestamp)}\n"
        append = out.append

        def point(measurement: str, value: int | None, extra: str = "") -> None:
            if value is not None:
                append(f"{measurement}{tags}{extra} value={value}i{end}")

        cpu = r.cpu
        if cpu is not None:
            point("cpu_usage_total", cpu.total_ns)
            point("cpu_usage_system", cpu.system_ns)
            point("cpu_usage_user", cpu.user_ns)
            if cpu.per_cpu_ns and self.per_cpu:
                for i, v in enumerate(cpu.per_cpu_ns):
                    point("cpu_usage_per_cpu", v, f",instance={i}")
            point("load_average", cpu.load_average_milli)

        if r.network:
            # cAdvisor's NetworkStats embeds the first interface's figures "for backwards compatibility".
            n = r.network[0]
            point("rx_bytes", n.rx_bytes)
            point("rx_errors", n.rx_errors)
            point("tx_bytes", n.tx_bytes)
            point("tx_errors", n.tx_errors)

        memory = r.memory
        if memory is not None:
            point("memory_usage", memory.usage_bytes)
            point("memory_max_usage", memory.max_usage_bytes)
            point("memory_cache", memory.cache_bytes)
            point("memory_rss", memory.rss_bytes)
            point("memory_swap", memory.swap_bytes)
            point("memory_mapped_file", memory.mapped_file_bytes)
            point("memory_working_set", memory.working_set_bytes)
            point("memory_failcnt", memory.failcnt)
            # Our pgfault figures are hierarchical (cgroup v1 total_pgfault; cgroup v2 is always
            # hierarchical); cAdvisor also writes scope=container, which we do not have.
            point("memory_failure", memory.pgfault, ",failure_type=pgfault,scope=hierarchical")
            point("memory_failure", memory.pgmajfault, ",failure_type=pgmajfault,scope=hierarchical")

        if r.filesystem:
            for fs in r.filesystem:
                device = _tag("device", fs.device)
                point("fs_usage", fs.usage_bytes, f"{device},type=usage")
                point("fs_limit", fs.capacity_bytes, f"{device},type=limit")

    # -- events --------------------------------------------------------------------------------
    def _event_lines(self, record: BaseModel, out: list[str]) -> bool:
        """A record with a ``timestamp`` and an ``event_type`` → one ``container_events`` point.

        No event model exists yet; this takes any such record generically. Tags: host,
        machine_id, container_name and cgroup (from a ``container`` reference, with the same
        label and container id handling as the stats); fields: event_type, every other scalar
        attribute (but schema_version), and those of nested models or dicts as
        ``<attribute>_<key>``; lists and datetimes are left out. Two events of one container
        with the very same nanosecond timestamp would be merged into one point.
        """
        values = record.__dict__
        ts = values.get("timestamp")
        event_type = values.get("event_type")
        if not isinstance(ts, datetime) or not isinstance(event_type, str | Enum):
            return False
        event_type = str(event_type.value if isinstance(event_type, Enum) else event_type)
        tags: dict[str, Any] = {"host": values.get("hostname"), "machine_id": values.get("machine_id")}
        ref = values.get("container")
        fields: dict[str, str] = {"event_type": string_field(event_type)}
        if isinstance(ref, ContainerReference):
            tags["container_name"] = ref.aliases[0] if ref.aliases else ref.name
            tags["cgroup"] = ref.name
            for name, key in self._label_keys:
                tags[key] = ref.labels.get(name)
            if ref.id:
                if self.id_as_tag:
                    tags["container_id"] = ref.id
                else:
                    fields["container_id"] = string_field(ref.id)
        for name, value in values.items():
            if name in ("timestamp", "event_type", "hostname", "machine_id", "container", "schema_version"):
                continue
            if isinstance(value, BaseModel):
                value = value.__dict__
            if isinstance(value, dict):
                for key, inner in value.items():
                    encoded = field_value(inner)
                    if encoded is not None:
                        fields[escape_key(f"{name}_{key}")] = encoded
            else:
                encoded = field_value(value)
                if encoded is not None:
                    fields[escape_key(name)] = encoded
        tag_text = _tag_text(tags)
        field_text = ",".join(f"{k}={v}" for k, v in fields.items())
        out.append(f"container_events{tag_text} {field_text} {timestamp_ns(ts)}\n")
        return True


# -- errors ----------------------------------------------------------------------------------------


def _server_message(body: bytes | str | None) -> str:
    """The error text of a response body: 1.x {"error": ...}, 2.x {"message": ...}, else the text."""
    if not body:
        return ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        payload = json.loads(text)
    except ValueError:
        return text.strip()
    if isinstance(payload, dict):
        for key in ("error", "message"):
            if isinstance(payload.get(key), str):
                return payload[key]
    return text.strip()


def _short(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def http_error(status: int, message: str, retry_after: str | None, target: str = "") -> SinkError:
    """The SinkError for a refused write (no partial-write analysis; see InfluxDBSink._refused)."""
    what = f"HTTP {status}: {_short(message) or 'no message'}"
    if target:
        what = f"{what} ({target})"
    if status in (401, 403):
        return SinkError(f"credentials refused: {what}", retryable=True, category=AUTH)
    if status in (429, 503):
        return SinkError(f"server busy: {what}", retryable=True, retry_after_s=retry_after_seconds(retry_after), category=THROTTLED)
    if status >= 500:
        return SinkError(f"server error: {what}", retryable=True, retry_after_s=retry_after_seconds(retry_after), category=ERROR)
    if 300 <= status < 400:
        return SinkError(f"redirected (set url to the final address): {what}", retryable=True, category=ERROR)
    if status == 404:
        # 1.x: database not found; 2.x: bucket or org not found. An operator can create it, so
        # the records are kept (spooled) meanwhile.
        return SinkError(f"not found (does the database / bucket exist?): {what}", retryable=True, category=ERROR)
    if status == 413:
        return SinkError(f"request too large (lower batch_size): {what}", retryable=False, category=REJECTED)
    return SinkError(f"write refused: {what}", retryable=False, category=REJECTED)


def transport_error(exc: BaseException, url: str, timeout_s: float) -> SinkError:
    """A SinkError for a request that got no HTTP answer (urllib3 or OS errors)."""
    import urllib3.exceptions as u3

    if isinstance(exc, u3.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    # urllib3's NewConnectionError (and NameResolutionError) subclass its ConnectTimeoutError:
    # test them first.
    if isinstance(exc, u3.NameResolutionError):
        return SinkError(f"{url}: cannot resolve host: {exc}", retryable=True, category=UNREACHABLE)
    if isinstance(exc, u3.NewConnectionError | ConnectionError):
        return SinkError(f"{url}: cannot connect: {exc}", retryable=True, category=UNREACHABLE)
    if isinstance(exc, u3.TimeoutError | TimeoutError):
        return SinkError(f"{url}: no answer within {timeout_s:g} s: {exc}", retryable=True, category=UNREACHABLE)
    if isinstance(exc, u3.SSLError):
        return SinkError(f"{url}: TLS failure: {exc}", retryable=True, category=ERROR)
    if isinstance(exc, u3.ProtocolError | OSError):
        return SinkError(f"{url}: connection lost: {exc}", retryable=True, category=UNREACHABLE)
    return SinkError(f"{url}: {type(exc).__name__}: {exc}", retryable=True, category=ERROR)


# InfluxDB 1.x partial writes (HTTP 400, some points stored):
#   partial write: unable to parse '<line>': <reason>\nunable to parse '<line>': ... dropped=0
#   partial write: field type conflict: input field "f" on measurement "m" is type float, already exists as type integer dropped=3
#   partial write: points beyond retention policy dropped=2
_UNABLE_TO_PARSE = re.compile(r"unable to parse '(.*)': ([^\n]*?)(?: dropped=\d+)?$", re.MULTILINE)
_TYPE_CONFLICT = re.compile(r'field type conflict: input field "((?:[^"\\]|\\.)*)" on measurement "((?:[^"\\]|\\.)*)"')
_DROPPED = re.compile(r"dropped=(\d+)")


def _line_has_field(line: str, measurement: str, field: str) -> bool:
    m = measurement.replace(",", "\\,").replace(" ", "\\ ")
    if not (line.startswith(m + ",") or line.startswith(m + " ")):
        return False
    # The field set follows the first unescaped space.
    i = 0
    while True:
        i = line.find(" ", i + 1)
        if i < 0:
            return False
        if line[i - 1] != "\\":
            break
    key = escape_key(field) + "="
    fields = line[i + 1 :]
    return fields.startswith(key) or ("," + key) in fields


# -- the sink --------------------------------------------------------------------------------------


class InfluxDBSink:
    name = "influxdb"

    def __init__(self, settings: InfluxDBSettings) -> None:
        try:
            import influxdb_client  # noqa: F401 - and its urllib3, which api = "v1" uses directly
            import urllib3  # noqa: F401
        except ImportError:
            raise MissingDependency("the influxdb sink needs influxdb-client: pip install 'container-exporter[influxdb]'") from None
        self.settings = settings
        self.encoder = LineEncoder(settings)
        self._timeout_s = float(settings.timeout)
        self._send: Callable[[bytes], None] | None = None
        self._close: Callable[[], None] | None = None
        if settings.api == "v2":
            self._target = f"{settings.url}/api/v2/write (bucket {settings.bucket})"
        else:
            self._target = f"{settings.url}/write (database {settings.database})"

    # -- Sink protocol -------------------------------------------------------------------------
    def open(self) -> None:
        if self._send is not None:
            return
        if self.settings.api == "v2":
            self._open_v2()
        else:
            self._open_v1()

    def write_batch(self, records: Sequence[Envelope]) -> None:
        if self._send is None:
            self.open()
        assert self._send is not None
        encode = self.encoder.encode
        if self.settings.gzip:
            # Level 1: line protocol still shrinks ~30x, at a fraction of gzip -9's CPU. Encoded
            # and compressed a slice at a time, the text stays in the CPU caches (10-15% less
            # time per record for batches of 1000 and more).
            compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
            parts = []
            for start in range(0, len(records), _GZIP_SLICE):
                lines = encode(records[start : start + _GZIP_SLICE])
                if lines:
                    parts.append(compressor.compress("".join(lines).encode()))
            if not parts:
                return
            parts.append(compressor.flush())
            body = b"".join(parts)
        else:
            lines = encode(records)
            if not lines:
                return
            body = "".join(lines).encode()
        try:
            self._send(body)
        except _HTTPStatus as exc:
            raise self._refused(exc, records) from None

    def flush(self) -> None:
        """Nothing is buffered: write_batch returns once the server has answered."""

    def close(self) -> None:
        if self._close is not None:
            self._close()
        self._send = self._close = None

    # -- transports ----------------------------------------------------------------------------
    def _open_v2(self) -> None:
        from influxdb_client import InfluxDBClient
        from influxdb_client.rest import ApiException
        from influxdb_client.service.write_service import WriteService

        s = self.settings
        client = InfluxDBClient(
            url=s.url,
            token=s.token or "",
            org=s.org,
            timeout=int(self._timeout_s * 1000),  # milliseconds, as urllib3 Timeout(total=...)
            enable_gzip=False,  # we compress ourselves (the client would use gzip level 9)
            verify_ssl=s.verify_ssl,
            ssl_ca_cert=s.ssl_ca_cert,
            retries=False,  # the delivery worker owns retries
        )
        # The write API's own service, called with the finished body: WriteApi.write would copy
        # and re-join it, and offers no compression level.
        service = WriteService(client.api_client)
        extra = {"content_encoding": "gzip"} if s.gzip else {}
        org = s.org or "-"  # VictoriaMetrics and InfluxDB Cloud ignore it; the v2 API wants one

        def send(body: bytes) -> None:
            try:
                service.post_write(
                    org=org,
                    bucket=s.bucket,
                    body=body,
                    precision="ns",
                    content_type="text/plain; charset=utf-8",
                    **extra,
                )
            except ApiException as exc:
                if not exc.status:  # the client's wrapping of a TLS failure
                    raise SinkError(f"{self._target}: {exc.reason}", retryable=True, category=ERROR) from None
                headers = exc.headers or {}
                raise _HTTPStatus(exc.status, _server_message(exc.body), headers.get("Retry-After")) from None
            except Exception as exc:
                raise self._transport(exc) from exc

        self._send = send
        self._close = client.close

    def _open_v1(self) -> None:
        import urllib3

        s = self.settings
        params = {"db": s.database, "precision": "ns"}
        if s.retention_policy:
            params["rp"] = s.retention_policy
        url = f"{s.url}/write?{urlencode(params)}"
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if s.gzip:
            headers["Content-Encoding"] = "gzip"
        if s.username is not None:
            credentials = f"{s.username}:{s.password or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
        elif s.token:
            headers["Authorization"] = f"Token {s.token}"
        pool = urllib3.PoolManager(
            num_pools=1,
            maxsize=1,
            retries=False,  # the delivery worker owns retries
            timeout=urllib3.Timeout(total=self._timeout_s),
            cert_reqs="CERT_REQUIRED" if s.verify_ssl else "CERT_NONE",
            ca_certs=s.ssl_ca_cert,
        )

        def send(body: bytes) -> None:
            try:
                response = pool.request("POST", url, body=body, headers=headers)
            except Exception as exc:
                raise self._transport(exc) from exc
            if response.status >= 300:
                raise _HTTPStatus(response.status, _server_message(response.data), response.headers.get("Retry-After"))

        self._send = send
        self._close = pool.clear

    def _transport(self, exc: Exception) -> SinkError:
        if isinstance(exc, SinkError):
            return exc
        return transport_error(exc, self._target, self._timeout_s)

    # -- refusals ------------------------------------------------------------------------------
    def _refused(self, exc: _HTTPStatus, records: Sequence[BaseModel]) -> SinkError:
        if exc.status == 400 and "partial write" in exc.message:
            partial = self._partial_write(exc.message, records)
            if partial is not None:
                return partial
            return SinkError(
                f"{self._target}: some points were refused and we cannot tell which records they belong to; "
                f"the others were stored: HTTP 400: {_short(exc.message)}",
                retryable=False,
                category=REJECTED,
            )
        return http_error(exc.status, exc.message, exc.retry_after, self._target)

    def _partial_write(self, message: str, records: Sequence[BaseModel]) -> PartialFailure | None:
        """Which records InfluxDB 1.x dropped in a partial write, when the message says so exactly."""
        unparsable = {m.group(1) for m in _UNABLE_TO_PARSE.finditer(message)}
        conflict = _TYPE_CONFLICT.search(message)
        dropped = _DROPPED.search(message)
        if not unparsable and conflict is None:
            return None  # e.g. "points beyond retention policy": counted, not named
        rejected = []
        matched = 0
        for i, record in enumerate(records):
            lines = self.encoder.record_lines(record)
            if unparsable:
                hits = sum(line in unparsable for line in lines)
            else:
                assert conflict is not None
                field, measurement = (g.replace('\\"', '"') for g in conflict.groups())
                hits = sum(_line_has_field(line, measurement, field) for line in lines)
            if hits:
                rejected.append(i)
                matched += hits
        if unparsable:
            # Every line quoted must be one of ours, else the message was cut short or ambiguous.
            found = {line for record in (records[i] for i in rejected) for line in self.encoder.record_lines(record)}
            if not unparsable <= found:
                return None
        elif dropped is None or int(dropped.group(1)) != matched:
            return None  # other points were dropped too (the message names only the first conflict)
        if unparsable:
            # The lines themselves are long and ours: name the reasons only.
            reasons = "; ".join(sorted({m.group(2) for m in _UNABLE_TO_PARSE.finditer(message)}))
            message = f"partial write: unable to parse {len(unparsable)} lines: {reasons}"
        return PartialFailure(
            f"{self._target}: {len(rejected)} of {len(records)} records refused in part (the rest were stored): "
            f"HTTP 400: {_short(message)}",
            rejected=rejected,
            category=REJECTED,
        )


class _HTTPStatus(Exception):
    def __init__(self, status: int, message: str, retry_after: str | None) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.retry_after = retry_after
