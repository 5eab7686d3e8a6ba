"""Prometheus metrics with cAdvisor's names, types, help texts and labels.

Every family is built at scrape time from the newest cached record of each container
(``ctx.cache.latest``) and from the container specs; nothing is updated per housekeeping tick.

Labels are cAdvisor's: ``id`` (cgroup name), ``name`` (first alias), ``image``,
``container_label_<label>`` and ``container_env_<variable>`` (the whitelisted environment that
discovery copied into the spec), plus the metric's own labels. The label names of one scrape are
the union over all containers, missing values empty, so every series of a family has the same
label set. With ``store_container_labels = false`` only ``whitelisted_container_labels`` are kept.

Families of a metric kind named in ``disable_metrics`` (cAdvisor's kinds: cpu, percpu, cpuLoad,
memory, diskIO, network, process, pressure, disk, oom_event) are absent; spec families
(``container_spec_*``, ``container_start_time_seconds``) are always there, as in cAdvisor.

Container and machine families are :class:`Family` objects: prometheus_client ``Metric`` s that
keep their samples as rows (the container's label set, rendered once per scrape, plus the
metric's own labels and the value) and build ``Sample`` tuples only when prometheus_client asks
for ``.samples``. :func:`render` writes rows straight to the text format or OpenMetrics; other
families (process, self metrics) go through prometheus_client's own encoders. Writing rows
ourselves is several times faster than prometheus_client's per-sample formatting (see
bench/prometheus.py) and keeps cAdvisor's exact text names: ``container_memory_failcnt`` is a
counter without ``_total``, which prometheus_client's text encoder cannot express. In
OpenMetrics such a counter's samples get ``_total``, as in Go's client.

Samples carry no timestamps (cAdvisor attaches the record's): with explicit timestamps
Prometheus does not mark a vanished container's series stale.
"""

from __future__ import annotations

import gzip
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client import exposition as text_exposition
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    Sample,
    SummaryMetricFamily,
)
from prometheus_client.openmetrics import exposition as om_exposition

if TYPE_CHECKING:
    from exporter.api.context import ApiContext
    from exporter.manager import Container
    from exporter.models import ContainerSpec, ContainerStats

log = logging.getLogger(__name__)

CONTENT_TYPE_TEXT = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

NS_PER_S = 1e9
US_PER_S = 1e6

_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")
_INVALID_METRIC_CHARS = re.compile(r"[^a-zA-Z0-9_:]")
_SPECIAL_VALUES = {"inf": "+Inf", "-inf": "-Inf", "nan": "NaN"}


def sanitize_label_name(name: str) -> str:
    """cAdvisor's sanitizeLabelName: anything outside [a-zA-Z0-9_] becomes ``_``."""
    return _INVALID_LABEL_CHARS.sub("_", name)


def sanitize_metric_name(name: str) -> str:
    name = _INVALID_METRIC_CHARS.sub("_", name)
    return "_" + name if not name or name[0].isdigit() else name


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def _num(value: float) -> str:
    text = repr(value)
    return _SPECIAL_VALUES.get(text, text)


class LabelSet:
    """One series' base labels and their exposition text, rendered once per scrape."""

    __slots__ = ("labels", "text")

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self.text = ",".join([f'{k}="{_escape(v)}"' for k, v in labels.items()])


# The metric's own labels of a sample: their text (',cpu="cpu00"') and their values.
Extra = tuple[str, tuple[str, ...]]
NO_EXTRA: Extra = ("", ())


def extra_labels(names: Sequence[str], values: Sequence[str]) -> Extra:
    return "".join([f',{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]), tuple(values)


_ONE_LABEL: dict[tuple[str, str], Extra] = {}


def one_label(name: str, value: str) -> Extra:
    """``extra_labels`` of one label, shared between scrapes (interfaces, devices: a few)."""
    extra = _ONE_LABEL.get((name, value))
    if extra is None:
        if len(_ONE_LABEL) > 10_000:
            _ONE_LABEL.clear()
        extra = _ONE_LABEL[(name, value)] = extra_labels((name,), (value,))
    return extra


class Family(Metric):
    """A metric family kept as rows. ``text_name`` is the name in the text format (cAdvisor's);
    ``name`` and ``sample_name`` follow OpenMetrics (a counter's samples end in ``_total``).

    ``rows`` is flat, three items per sample: LabelSet, Extra, value. Flat, because a tuple per
    sample would be a container object that outlives a garbage-collector generation: with 5000
    containers the collector's full passes over the heap took longer than building the page.
    """

    def __init__(self, name: str, documentation: str, typ: str, extra: Sequence[str] = ()) -> None:
        # Metric.__init__ is not called: it would set ``samples`` to a list.
        self.text_name = name
        self.documentation = documentation
        self.unit = ""
        self.type = typ
        if typ == "counter":
            self.name = name[: -len("_total")] if name.endswith("_total") else name
            self.sample_name = self.name + "_total"
        else:
            self.name = self.sample_name = name
        self.extra = tuple(extra)
        self.rows: list[Any] = []

    def triples(self) -> Iterator[tuple[LabelSet, Extra, float]]:
        it = iter(self.rows)
        return zip(it, it, it, strict=True)

    @property
    def samples(self) -> list[Sample]:  # type: ignore[override]
        name, names = self.sample_name, self.extra
        return [
            Sample(name, {**ls.labels, **dict(zip(names, extra[1], strict=True))} if extra[1] else ls.labels, value)
            for ls, extra, value in self.triples()
        ]


# -- cAdvisor's families -------------------------------------------------------------------------
# (name, type, help, own labels), by metric kind. Names and help texts are cAdvisor's
# (metrics/prometheus.go); kinds we do not collect (tasks_state, sockets, ulimits, hugetlb, perf,
# numa, tcp/udp, schedstat, blkio_device_usage, fs sector/merged/time) are left out.
FamilySpec = tuple[str, str, str, tuple[str, ...]]

CPU_FAMILIES: list[FamilySpec] = [
    ("container_cpu_user_seconds_total", "counter", "Cumulative user cpu time consumed in seconds.", ()),
    ("container_cpu_system_seconds_total", "counter", "Cumulative system cpu time consumed in seconds.", ()),
    ("container_cpu_usage_seconds_total", "counter", "Cumulative cpu time consumed in seconds.", ("cpu",)),
    ("container_cpu_cfs_periods_total", "counter", "Number of elapsed enforcement period intervals.", ()),
    ("container_cpu_cfs_throttled_periods_total", "counter", "Number of throttled period intervals.", ()),
    ("container_cpu_cfs_throttled_seconds_total", "counter", "Total time duration the container has been throttled.", ()),
]
CPU_LOAD_FAMILIES: list[FamilySpec] = [
    ("container_cpu_load_average_10s", "gauge", "Value of container cpu load average over the last 10 seconds.", ()),
]
MEMORY_FAMILIES: list[FamilySpec] = [
    ("container_memory_cache", "gauge", "Number of bytes of page cache memory.", ()),
    ("container_memory_rss", "gauge", "Size of RSS in bytes.", ()),
    ("container_memory_mapped_file", "gauge", "Size of memory mapped files in bytes.", ()),
    ("container_memory_swap", "gauge", "Container swap usage in bytes.", ()),
    ("container_memory_failcnt", "counter", "Number of memory usage hits limits", ()),
    ("container_memory_usage_bytes", "gauge", "Current memory usage in bytes, including all memory regardless of when it was accessed", ()),
    ("container_memory_max_usage_bytes", "gauge", "Maximum memory usage recorded in bytes", ()),
    ("container_memory_working_set_bytes", "gauge", "Current working set in bytes.", ()),
    ("container_memory_failures_total", "counter", "Cumulative count of memory allocation failures.", ("failure_type", "scope")),
]
OOM_FAMILIES: list[FamilySpec] = [
    ("container_oom_events_total", "counter", "Count of out of memory events observed for the container", ()),
]
DISK_FAMILIES: list[FamilySpec] = [
    ("container_fs_inodes_free", "gauge", "Number of available Inodes", ("device",)),
    ("container_fs_inodes_total", "gauge", "Number of Inodes", ("device",)),
    ("container_fs_limit_bytes", "gauge", "Number of bytes that can be consumed by the container on this filesystem.", ("device",)),
    ("container_fs_usage_bytes", "gauge", "Number of bytes that are consumed by the container on this filesystem.", ("device",)),
]
DISKIO_FAMILIES: list[FamilySpec] = [
    ("container_fs_reads_bytes_total", "counter", "Cumulative count of bytes read", ("device",)),
    ("container_fs_reads_total", "counter", "Cumulative count of reads completed", ("device",)),
    ("container_fs_writes_bytes_total", "counter", "Cumulative count of bytes written", ("device",)),
    ("container_fs_writes_total", "counter", "Cumulative count of writes completed", ("device",)),
]
NETWORK_FAMILIES: list[FamilySpec] = [
    ("container_network_receive_bytes_total", "counter", "Cumulative count of bytes received", ("interface",)),
    ("container_network_receive_packets_total", "counter", "Cumulative count of packets received", ("interface",)),
    ("container_network_receive_packets_dropped_total", "counter", "Cumulative count of packets dropped while receiving", ("interface",)),
    ("container_network_receive_errors_total", "counter", "Cumulative count of errors encountered while receiving", ("interface",)),
    ("container_network_transmit_bytes_total", "counter", "Cumulative count of bytes transmitted", ("interface",)),
    ("container_network_transmit_packets_total", "counter", "Cumulative count of packets transmitted", ("interface",)),
    ("container_network_transmit_packets_dropped_total", "counter", "Cumulative count of packets dropped while transmitting", ("interface",)),
    ("container_network_transmit_errors_total", "counter", "Cumulative count of errors encountered while transmitting", ("interface",)),
]
PROCESS_FAMILIES: list[FamilySpec] = [
    ("container_processes", "gauge", "Number of processes running inside the container.", ()),
    ("container_file_descriptors", "gauge", "Number of open file descriptors for the container.", ()),
    ("container_threads", "gauge", "Number of threads running inside the container", ()),
    ("container_threads_max", "gauge", "Maximum number of threads allowed inside the container, infinity if value is zero", ()),
]
PRESSURE_FAMILIES: list[FamilySpec] = [
    ("container_pressure_cpu_stalled_seconds_total", "counter", "Total time duration no tasks in the container could make progress due to CPU congestion.", ()),
    ("container_pressure_cpu_waiting_seconds_total", "counter", "Total time duration tasks in the container have waited due to CPU congestion.", ()),
    ("container_pressure_memory_stalled_seconds_total", "counter", "Total time duration no tasks in the container could make progress due to memory congestion.", ()),
    ("container_pressure_memory_waiting_seconds_total", "counter", "Total time duration tasks in the container have waited due to memory congestion.", ()),
    ("container_pressure_io_stalled_seconds_total", "counter", "Total time duration no tasks in the container could make progress due to IO congestion.", ()),
    ("container_pressure_io_waiting_seconds_total", "counter", "Total time duration tasks in the container have waited due to IO congestion.", ()),
]
SPEC_FAMILIES: list[FamilySpec] = [
    ("container_start_time_seconds", "gauge", "Start time of the container since unix epoch in seconds.", ()),
    ("container_spec_cpu_period", "gauge", "CPU period of the container.", ()),
    ("container_spec_cpu_quota", "gauge", "CPU quota of the container.", ()),
    ("container_spec_cpu_shares", "gauge", "CPU share of the container.", ()),
    ("container_spec_memory_limit_bytes", "gauge", "Memory limit for the container.", ()),
    ("container_spec_memory_reservation_limit_bytes", "gauge", "Memory reservation limit for the container.", ()),
    ("container_spec_memory_swap_limit_bytes", "gauge", "Memory swap limit for the container.", ()),
]
LAST_SEEN: FamilySpec = ("container_last_seen", "gauge", "Last time a container was seen by the exporter", ())
CUSTOM_HELP = "Custom application metric."

# Which families each disable_metrics kind removes.
FAMILIES_BY_KIND: dict[str, list[FamilySpec]] = {
    "cpu": CPU_FAMILIES,
    "cpuLoad": CPU_LOAD_FAMILIES,
    "memory": MEMORY_FAMILIES,
    "oom_event": OOM_FAMILIES,
    "disk": DISK_FAMILIES,
    "diskIO": DISKIO_FAMILIES,
    "network": NETWORK_FAMILIES,
    "process": PROCESS_FAMILIES,
    "pressure": PRESSURE_FAMILIES,
}
BUILTIN_NAMES = frozenset(
    spec[0] for specs in [*FAMILIES_BY_KIND.values(), SPEC_FAMILIES, [LAST_SEEN]] for spec in specs
)
# Application metrics may not take these names: the exporter's own families live there.
RESERVED_PREFIXES = ("container_exporter_", "machine_", "process_")

_FAILURES = [
    extra_labels(("failure_type", "scope"), (kind, scope))
    for scope in ("container", "hierarchy")
    for kind in ("pgfault", "pgmajfault")
]
_CPU_LABELS: list[Extra] = []


def _cpu_label(i: int) -> Extra:
    while len(_CPU_LABELS) <= i:
        _CPU_LABELS.append(extra_labels(("cpu",), (f"cpu{len(_CPU_LABELS):02d}",)))
    return _CPU_LABELS[i]


_CPU_TOTAL = extra_labels(("cpu",), ("total",))


def _families(specs: Iterable[FamilySpec]) -> dict[str, Family]:
    return {name: Family(name, doc, typ, extra) for name, typ, doc, extra in specs}


@dataclass(frozen=True)
class _LabelPlan:
    """The base label names of one scrape: (exported name, source, key); source is "label" or "env"."""

    columns: tuple[tuple[str, str, str], ...]


class ContainerCollector:
    """cAdvisor's container families, from the cache and the specs. See the module docstring."""

    def __init__(self, ctx: ApiContext, clock: Callable[[], float] = time.time) -> None:
        self.ctx = ctx
        self.clock = clock
        config = ctx.config
        self.kinds = config.metrics
        self.whitelist = None if config.store_container_labels else frozenset(config.whitelisted_container_labels)
        self._plan: _LabelPlan | None = None
        # name → (spec, ref, plan, LabelSet) of the previous scrape: unchanged containers reuse
        # their rendered labels. Replaced whole, so concurrent scrapes never see it half-built.
        self._labelsets: dict[str, tuple[object, object, _LabelPlan, LabelSet]] = {}
        self._warned: set[str] = set()

    # -- labels -------------------------------------------------------------------------------
    def _label_plan(self, containers: Sequence[Container]) -> _LabelPlan:
        whitelist = self.whitelist
        keys: set[tuple[str, str]] = set()
        for container in containers:
            spec = container.spec
            if whitelist is None:
                keys.update(("label", k) for k in spec.labels)
            else:
                keys.update(("label", k) for k in spec.labels if k in whitelist)
            keys.update(("env", k) for k in spec.env)
        columns = []
        taken = {"id", "name", "image"}
        for source, key in sorted(keys, key=lambda sk: (sk[0] != "label", sk[1])):
            exported = sanitize_label_name(("container_label_" if source == "label" else "container_env_") + key)
            if exported not in taken:  # two keys that sanitize alike: the first wins, as in cAdvisor
                taken.add(exported)
                columns.append((exported, source, key))
        plan = _LabelPlan(tuple(sorted(columns)))
        if self._plan is not None and self._plan == plan:
            return self._plan  # the same object, so cached label sets stay valid
        self._plan = plan
        return plan

    def _labelset(self, container: Container, plan: _LabelPlan, previous: dict[str, Any]) -> LabelSet:
        spec, ref = container.spec, container.ref
        cached = previous.get(container.name)
        if cached is not None and cached[0] is spec and cached[1] is ref and cached[2] is plan:
            return cached[3]
        labels = {
            "id": container.name,
            "name": ref.aliases[0] if ref.aliases else "",
            "image": spec.image or ref.image or "",
        }
        docker_labels, env = spec.labels, spec.env
        for exported, source, key in plan.columns:
            labels[exported] = (docker_labels if source == "label" else env).get(key, "")
        return LabelSet(labels)

    # -- collection -----------------------------------------------------------------------------
    def collect(self) -> list[Metric]:
        ctx, kinds = self.ctx, self.kinds
        containers = sorted(ctx.manager.containers(), key=lambda c: c.name)
        latest = ctx.cache.latest
        plan = self._label_plan(containers)
        previous = self._labelsets
        labelsets: dict[str, tuple[object, object, _LabelPlan, LabelSet]] = {}

        spec_f = _families(SPEC_FAMILIES)
        last_seen_f = _families([LAST_SEEN])
        on = {kind: _families(specs) if kind in kinds else None for kind, specs in FAMILIES_BY_KIND.items()}
        custom: dict[str, _CustomFamily] = {}
        now = int(self.clock())  # cAdvisor: whole seconds

        start_rows = spec_f["container_start_time_seconds"].rows
        period_rows = spec_f["container_spec_cpu_period"].rows
        quota_rows = spec_f["container_spec_cpu_quota"].rows
        shares_rows = spec_f["container_spec_cpu_shares"].rows
        limit_rows = spec_f["container_spec_memory_limit_bytes"].rows
        reservation_rows = spec_f["container_spec_memory_reservation_limit_bytes"].rows
        swap_limit_rows = spec_f["container_spec_memory_swap_limit_bytes"].rows
        last_seen_rows = last_seen_f["container_last_seen"].rows

        for container in containers:
            spec = container.spec
            ls = self._labelset(container, plan, previous)
            labelsets[container.name] = (spec, container.ref, plan, ls)
            if spec.creation_time is not None:
                start_rows.extend((ls, NO_EXTRA, spec.creation_time.timestamp()))
            cpu_spec, mem_spec = spec.cpu, spec.memory
            if cpu_spec.period_us is not None:
                period_rows.extend((ls, NO_EXTRA, cpu_spec.period_us))
            if cpu_spec.quota_us is not None:
                quota_rows.extend((ls, NO_EXTRA, cpu_spec.quota_us))
            if cpu_spec.shares is not None:
                shares_rows.extend((ls, NO_EXTRA, cpu_spec.shares))
            # cAdvisor reports "unlimited" as 0; None is unlimited or unset here.
            limit_rows.extend((ls, NO_EXTRA, mem_spec.limit_bytes or 0))
            reservation_rows.extend((ls, NO_EXTRA, mem_spec.reservation_bytes or 0))
            swap_limit_rows.extend((ls, NO_EXTRA, mem_spec.swap_limit_bytes or 0))

            record = latest(container.name)
            if record is None:
                continue
            last_seen_rows.extend((ls, NO_EXTRA, now))
            _add_stats(on, ls, record, spec)
            if record.custom_metrics:
                self._add_custom(custom, ls, record, spec)

        self._labelsets = labelsets
        families: list[Metric] = [*last_seen_f.values()]
        for kind in FAMILIES_BY_KIND:
            group = on[kind]
            if group is not None:
                families.extend(group.values())
        families.extend(spec_f.values())
        families.extend(f.build() for f in custom.values())
        return families

    def _add_custom(self, custom: dict[str, _CustomFamily], ls: LabelSet, record: ContainerStats, spec: ContainerSpec) -> None:
        assert record.custom_metrics is not None
        declared = {m.name: m for m in spec.custom_metrics}
        for raw_name, values in record.custom_metrics.items():
            name = sanitize_metric_name(raw_name)
            decl = declared.get(raw_name)
            typ = decl.type if decl is not None else "gauge"
            as_int = decl is not None and decl.format == "int"
            family = custom.get(name)
            if family is None:
                if name in BUILTIN_NAMES or name.startswith(RESERVED_PREFIXES):
                    self._warn_once(name, "custom metric %s has the name of a built-in metric; it is not exported")
                    continue
                family = custom[name] = _CustomFamily(name, typ)
            elif family.type != typ:
                self._warn_once(name, "custom metric %s is declared both gauge and counter; only the first seen is exported")
                continue
            for value in values:
                family.values.append((ls, value.labels, int(value.value) if as_int else value.value))

    def _warn_once(self, name: str, message: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            log.warning(message, name)


def _add_stats(on: dict[str, dict[str, Family] | None], ls: LabelSet, record: ContainerStats, spec: ContainerSpec) -> None:
    """The rows of one record, for every enabled kind. Absent (None) values are left out."""
    cpu_f = on["cpu"]
    cpu = record.cpu
    if cpu_f is not None and cpu is not None:
        if cpu.user_ns is not None:
            cpu_f["container_cpu_user_seconds_total"].rows.extend((ls, NO_EXTRA, cpu.user_ns / NS_PER_S))
        if cpu.system_ns is not None:
            cpu_f["container_cpu_system_seconds_total"].rows.extend((ls, NO_EXTRA, cpu.system_ns / NS_PER_S))
        usage = cpu_f["container_cpu_usage_seconds_total"].rows
        if cpu.per_cpu_ns:
            for i, ns in enumerate(cpu.per_cpu_ns):
                if ns:  # as cAdvisor: CPUs the container never ran on are left out
                    extra = _cpu_label(i)
                    usage.extend((ls, extra, ns / NS_PER_S))
        elif cpu.total_ns is not None:
            usage.extend((ls, _CPU_TOTAL, cpu.total_ns / NS_PER_S))
        if spec.cpu.quota_us is not None:  # cAdvisor: only for containers with a CFS quota
            if cpu.periods is not None:
                cpu_f["container_cpu_cfs_periods_total"].rows.extend((ls, NO_EXTRA, cpu.periods))
            if cpu.throttled_periods is not None:
                cpu_f["container_cpu_cfs_throttled_periods_total"].rows.extend((ls, NO_EXTRA, cpu.throttled_periods))
            if cpu.throttled_time_ns is not None:
                cpu_f["container_cpu_cfs_throttled_seconds_total"].rows.extend((ls, NO_EXTRA, cpu.throttled_time_ns / NS_PER_S))
    load_f = on["cpuLoad"]
    if load_f is not None and cpu is not None and cpu.load_average_milli is not None:
        # cAdvisor exports its load average x1000 as is; so do we, for dashboards built on it.
        load_f["container_cpu_load_average_10s"].rows.extend((ls, NO_EXTRA, cpu.load_average_milli))

    memory = record.memory
    mem_f = on["memory"]
    if mem_f is not None and memory is not None:
        for fname, value in (
            ("container_memory_cache", memory.cache_bytes),
            ("container_memory_rss", memory.rss_bytes),
            ("container_memory_mapped_file", memory.mapped_file_bytes),
            ("container_memory_swap", memory.swap_bytes),
            ("container_memory_failcnt", memory.failcnt),
            ("container_memory_usage_bytes", memory.usage_bytes),
            ("container_memory_max_usage_bytes", memory.max_usage_bytes),
            ("container_memory_working_set_bytes", memory.working_set_bytes),
        ):
            if value is not None:
                mem_f[fname].rows.extend((ls, NO_EXTRA, value))
        # Our pgfault counters are hierarchical (v1 total_*, v2 memory.stat); cAdvisor on v2 also
        # reports the same figures for both scopes.
        failures = mem_f["container_memory_failures_total"].rows
        for extra, value in zip(_FAILURES, (memory.pgfault, memory.pgmajfault) * 2, strict=True):
            if value is not None:
                failures.extend((ls, extra, value))
    oom_f = on["oom_event"]
    if oom_f is not None and memory is not None and memory.events is not None and memory.events.oom_kill is not None:
        oom_f["container_oom_events_total"].rows.extend((ls, NO_EXTRA, memory.events.oom_kill))

    disk_f = on["disk"]
    if disk_f is not None and record.filesystem:
        for fs in record.filesystem:
            extra = one_label("device", fs.device)
            for fname, value in (
                ("container_fs_inodes_free", fs.inodes_free),
                ("container_fs_inodes_total", fs.inodes),
                ("container_fs_limit_bytes", fs.capacity_bytes),
                ("container_fs_usage_bytes", fs.usage_bytes),
            ):
                if value is not None:
                    disk_f[fname].rows.extend((ls, extra, value))

    io_f = on["diskIO"]
    if io_f is not None and record.diskio:
        reads_bytes = io_f["container_fs_reads_bytes_total"].rows
        reads = io_f["container_fs_reads_total"].rows
        writes_bytes = io_f["container_fs_writes_bytes_total"].rows
        writes = io_f["container_fs_writes_total"].rows
        for dev in record.diskio:
            # cAdvisor names block devices /dev/<name>; an unknown one keeps its major:minor.
            device = f"/dev/{dev.device}" if dev.device else f"{dev.major}:{dev.minor}"
            extra = one_label("device", device)
            reads_bytes.extend((ls, extra, dev.read_bytes))
            reads.extend((ls, extra, dev.read_ops))
            writes_bytes.extend((ls, extra, dev.write_bytes))
            writes.extend((ls, extra, dev.write_ops))

    net_f = on["network"]
    if net_f is not None and record.network:
        rx_bytes = net_f["container_network_receive_bytes_total"].rows
        rx_packets = net_f["container_network_receive_packets_total"].rows
        rx_dropped = net_f["container_network_receive_packets_dropped_total"].rows
        rx_errors = net_f["container_network_receive_errors_total"].rows
        tx_bytes = net_f["container_network_transmit_bytes_total"].rows
        tx_packets = net_f["container_network_transmit_packets_total"].rows
        tx_dropped = net_f["container_network_transmit_packets_dropped_total"].rows
        tx_errors = net_f["container_network_transmit_errors_total"].rows
        for iface in record.network:
            extra = one_label("interface", iface.name)
            rx_bytes.extend((ls, extra, iface.rx_bytes))
            rx_packets.extend((ls, extra, iface.rx_packets))
            rx_dropped.extend((ls, extra, iface.rx_dropped))
            rx_errors.extend((ls, extra, iface.rx_errors))
            tx_bytes.extend((ls, extra, iface.tx_bytes))
            tx_packets.extend((ls, extra, iface.tx_packets))
            tx_dropped.extend((ls, extra, iface.tx_dropped))
            tx_errors.extend((ls, extra, iface.tx_errors))

    proc_f = on["process"]
    processes = record.processes
    if proc_f is not None and processes is not None:
        if processes.processes is not None:
            proc_f["container_processes"].rows.extend((ls, NO_EXTRA, processes.processes))
        if processes.open_fds is not None:
            proc_f["container_file_descriptors"].rows.extend((ls, NO_EXTRA, processes.open_fds))
        # cAdvisor's container_threads is pids.current, which counts tasks (threads).
        threads = processes.threads if processes.threads is not None else processes.pids_current
        if threads is not None:
            proc_f["container_threads"].rows.extend((ls, NO_EXTRA, threads))
        proc_f["container_threads_max"].rows.extend((ls, NO_EXTRA, processes.pids_limit or 0))

    psi_f = on["pressure"]
    pressure = record.pressure
    if psi_f is not None and pressure is not None:
        for resource, psi in (("cpu", pressure.cpu), ("memory", pressure.memory), ("io", pressure.io)):
            if psi is None:
                continue
            if psi.full is not None:
                psi_f[f"container_pressure_{resource}_stalled_seconds_total"].rows.extend((ls, NO_EXTRA, psi.full.total_us / US_PER_S))
            if psi.some is not None:
                psi_f[f"container_pressure_{resource}_waiting_seconds_total"].rows.extend((ls, NO_EXTRA, psi.some.total_us / US_PER_S))


class _CustomFamily:
    """One application metric across containers; its label names are known only at the end."""

    __slots__ = ("name", "type", "values")

    def __init__(self, name: str, typ: str) -> None:
        self.name = name
        self.type = typ
        self.values: list[tuple[LabelSet, dict[str, str], float]] = []

    def build(self) -> Family:
        # cAdvisor prefixes application labels with app_, so they cannot clash with id, name, ...
        keys = sorted({k for _, labels, _ in self.values for k in labels})
        names = [sanitize_label_name("app_" + k) for k in keys]
        family = Family(self.name, CUSTOM_HELP, self.type, names)
        rows = family.rows
        for ls, labels, value in self.values:
            extra = extra_labels(names, [labels.get(k, "") for k in keys])
            rows.extend((ls, extra, value))
        return family


class MachineCollector:
    """cAdvisor's machine families (metrics/prometheus_machine.go) and the version info."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    def collect(self) -> list[Metric]:
        m, v = self.ctx.machine_info, self.ctx.version_info
        ls = LabelSet({"boot_id": m.boot_id or "", "machine_id": m.machine_id, "system_uuid": m.system_uuid or ""})
        families = []
        for name, doc, value in (
            ("machine_cpu_cores", "Number of logical CPU cores.", m.num_cores),
            ("machine_cpu_physical_cores", "Number of physical CPU cores.", m.num_physical_cores),
            ("machine_cpu_sockets", "Number of CPU sockets.", m.num_sockets),
            ("machine_memory_bytes", "Amount of memory installed on the machine.", m.memory_capacity_bytes),
            ("machine_swap_bytes", "Amount of swap memory available on the machine.", m.swap_capacity_bytes),
        ):
            if value is not None:
                family = Family(name, doc, "gauge")
                family.rows.extend((ls, NO_EXTRA, value))
                families.append(family)
        version = Family(
            "container_exporter_version_info",
            "A metric with a constant '1' value labeled by kernel version, OS version, docker version, exporter version & Python version.",
            "gauge",
        )
        version_labels = {
            "dockerVersion": v.docker_version or "",
            "exporterVersion": v.exporter_version,
            "kernelVersion": v.kernel_version,
            "osVersion": v.os_version,
            "pythonVersion": v.python_version,
        }
        version.rows.extend((LabelSet(version_labels), NO_EXTRA, 1))
        families.append(version)
        return families


@dataclass
class ScrapeStats:
    """Filled by the HTTP handler, read by :class:`SelfCollector`."""

    scrapes: int = 0
    duration_sum_s: float = 0.0
    last_duration_s: float | None = None
    last_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, duration_s: float, size: int) -> None:
        with self._lock:
            self.scrapes += 1
            self.duration_sum_s += duration_s
            self.last_duration_s = duration_s
            self.last_bytes = size


# Keys of ApiContext.collection_stats that SelfCollector reads (the app fills them): these two as
# gauges, and "collection_duration_sum_s" with "collection_count" as the summary
# container_exporter_collection_duration_seconds. Other keys are ignored.
COLLECTION_STATS_KEYS = {
    "last_collection_duration_s": (
        "container_exporter_last_collection_duration_seconds",
        "Duration of the last housekeeping run over all containers.",
    ),
    "max_collection_duration_s": (
        "container_exporter_max_collection_duration_seconds",
        "Longest housekeeping run over all containers since the start.",
    ),
}


class SelfCollector:
    """The exporter's own health: sinks, housekeeping, scrapes (container_exporter_*)."""

    def __init__(self, ctx: ApiContext, scrape_stats: ScrapeStats | None = None) -> None:
        self.ctx = ctx
        self.scrape_stats = scrape_stats

    def collect(self) -> list[Metric]:
        return [*self._sinks(), *self._housekeeping(), *self._scrapes()]

    def _sinks(self) -> list[Metric]:
        p = "container_exporter_"
        sent = CounterMetricFamily(p + "sent_records_total", "Records the sink's store accepted.", labels=["sink"])
        failed = CounterMetricFamily(p + "failed_writes_total", "Failed write attempts.", labels=["sink"])
        retried = CounterMetricFamily(p + "retried_records_total", "Records sent again after a failed write.", labels=["sink"])
        replayed = CounterMetricFamily(p + "replayed_records_total", "Records delivered from the disk spool.", labels=["sink"])
        spooled = CounterMetricFamily(p + "spooled_records_total", "Records written to the disk spool.", labels=["sink"])
        dropped = CounterMetricFamily(p + "dropped_records_total", "Records lost, by reason.", labels=["sink", "reason"])
        errors = CounterMetricFamily(p + "write_errors_total", "Failed writes by error category.", labels=["sink", "category"])
        depth = GaugeMetricFamily(p + "queue_depth", "Records waiting in the in-memory queue.", labels=["sink"])
        capacity = GaugeMetricFamily(p + "queue_capacity", "Capacity of the in-memory queue.", labels=["sink"])
        pending = GaugeMetricFamily(p + "spool_pending_records", "Records waiting in the disk spool.", labels=["sink"])
        spool_bytes = GaugeMetricFamily(p + "spool_bytes", "Bytes held by the disk spool.", labels=["sink"])
        last_success = GaugeMetricFamily(p + "last_success_timestamp_seconds", "Wall time of the last successful write.", labels=["sink"])
        latency = SummaryMetricFamily(p + "batch_latency_seconds", "Duration of successful batch writes.", labels=["sink"])
        degraded = GaugeMetricFamily(p + "degraded", "1 while the sink fails or its spool holds records, else 0.", labels=["sink"])
        for worker in self.ctx.sinks:
            s, name = worker.stats, [worker.name]
            sent.add_metric(name, s.sent)
            failed.add_metric(name, s.failed)
            retried.add_metric(name, s.retried)
            replayed.add_metric(name, s.replayed)
            spooled.add_metric(name, s.spooled)
            for reason, n in dict(s.dropped_reasons).items():
                dropped.add_metric([worker.name, reason], n)
            for category, n in dict(s.errors_by_category).items():
                errors.add_metric([worker.name, category], n)
            depth.add_metric(name, len(worker.queue))
            capacity.add_metric(name, s.queue_capacity)
            pending.add_metric(name, s.spool_pending)
            spool_bytes.add_metric(name, s.spool_bytes)
            if s.last_success is not None:
                last_success.add_metric(name, s.last_success)
            latency.add_metric(name, s.batches, s.batch_latency_sum_s)
            degraded.add_metric(name, 1.0 if worker.degraded else 0.0)
        return [sent, failed, retried, replayed, spooled, dropped, errors, depth, capacity, pending, spool_bytes, last_success, latency, degraded]

    def _housekeeping(self) -> list[Metric]:
        ctx, p = self.ctx, "container_exporter_"
        stats = ctx.scheduler.stats
        out: list[Metric] = [
            GaugeMetricFamily(p + "housekeeping_jobs", "Containers monitored (one housekeeping job each).", value=len(ctx.manager.names())),
            CounterMetricFamily(p + "housekeeping_skipped_runs_total", "Housekeeping runs skipped because the previous run of the job was still going.", value=stats.skipped_overlap),
            CounterMetricFamily(p + "housekeeping_missed_runs_total", "Housekeeping runs that started too late and were dropped.", value=stats.missed),
            CounterMetricFamily(p + "housekeeping_job_errors_total", "Housekeeping runs that failed with an error.", value=stats.errors),
            CounterMetricFamily(p + "malformed_files_total", "Kernel files that could not be parsed (values reported as unset).", value=ctx.manager.malformed_files),
            GaugeMetricFamily(p + "watcher_degraded", "1 when the cgroup watcher lost events and relies on rescans, else 0.", value=1.0 if ctx.watcher_degraded() else 0.0),
            GaugeMetricFamily(p + "start_time_seconds", "Wall time the exporter started.", value=ctx.started_at),
        ]
        collection = dict(ctx.collection_stats)
        for key, (name, doc) in COLLECTION_STATS_KEYS.items():
            if key in collection:
                out.append(GaugeMetricFamily(name, doc, value=collection[key]))
        if "collection_duration_sum_s" in collection and "collection_count" in collection:
            out.append(
                SummaryMetricFamily(
                    p + "collection_duration_seconds",
                    "Duration of housekeeping runs over all containers.",
                    count_value=collection["collection_count"],
                    sum_value=collection["collection_duration_sum_s"],
                )
            )
        return out

    def _scrapes(self) -> list[Metric]:
        s = self.scrape_stats
        if s is None or not s.scrapes:
            return []
        p = "container_exporter_"
        return [
            SummaryMetricFamily(p + "scrape_duration_seconds", "Time to build and encode the metrics page (earlier scrapes).", count_value=s.scrapes, sum_value=s.duration_sum_s),
            GaugeMetricFamily(p + "last_scrape_duration_seconds", "Time to build and encode the previous metrics page.", value=s.last_duration_s or 0.0),
            GaugeMetricFamily(p + "last_scrape_size_bytes", "Size of the previous metrics page before compression.", value=s.last_bytes),
        ]


def make_registry(ctx: ApiContext, scrape_stats: ScrapeStats | None = None) -> CollectorRegistry:
    """A private registry (never prometheus_client's global one) with every collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ContainerCollector(ctx))
    registry.register(MachineCollector(ctx))
    registry.register(SelfCollector(ctx, scrape_stats))
    ProcessCollector(registry=registry)
    return registry


# -- exposition -------------------------------------------------------------------------------------
class _One:
    def __init__(self, family: Metric) -> None:
        self.family = family

    def collect(self) -> list[Metric]:
        return [self.family]


_OM_EOF = "# EOF\n"


def render(registry: CollectorRegistry | Any, openmetrics: bool = False) -> bytes:
    """The registry's families in the text format 0.0.4, or OpenMetrics 1.0.0."""
    out: list[str] = []
    for family in registry.collect():
        if isinstance(family, Family):
            if not family.rows:
                continue
            if openmetrics:
                name, sample_name = family.name, family.sample_name
                doc = family.documentation.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
            else:
                name = sample_name = family.text_name
                doc = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
            out.append(f"# HELP {name} {doc}\n# TYPE {name} {family.type}\n")
            prefix = sample_name + "{"
            out.extend([f"{prefix}{ls.text}{extra[0]}}} {_num(value)}\n" for ls, extra, value in family.triples()])
        elif openmetrics:
            text = om_exposition.generate_latest(_One(family)).decode()
            out.append(text[: -len(_OM_EOF)] if text.endswith(_OM_EOF) else text)
        else:
            out.append(text_exposition.generate_latest(_One(family)).decode())
    if openmetrics:
        out.append(_OM_EOF)
    return "".join(out).encode()


def negotiate(accept: str | None) -> tuple[bool, str]:
    """(OpenMetrics?, content type) for an Accept header; the text format unless OpenMetrics is named."""
    for part in (accept or "").split(","):
        params = [p.strip() for p in part.split(";")]
        if params[0] == "application/openmetrics-text" and "q=0" not in params:
            return True, CONTENT_TYPE_OPENMETRICS
    return False, CONTENT_TYPE_TEXT


def accepts_gzip(accept_encoding: str | None) -> bool:
    return any(p.split(";")[0].strip() == "gzip" for p in (accept_encoding or "").split(","))


def router(ctx: ApiContext, registry: CollectorRegistry | None = None) -> APIRouter:
    """GET ``ctx.config.prometheus_endpoint``: the metrics page, gzip when the client accepts it."""
    scrape_stats = ScrapeStats()
    registry = registry if registry is not None else make_registry(ctx, scrape_stats)
    api = APIRouter()

    # A plain function: FastAPI runs it on its thread pool, so building the page never blocks
    # the event loop.
    def metrics(request: Request) -> Response:
        started = time.perf_counter()
        openmetrics, content_type = negotiate(request.headers.get("accept"))
        body = render(registry, openmetrics)
        size = len(body)
        headers = {"Vary": "Accept, Accept-Encoding"}
        if accepts_gzip(request.headers.get("accept-encoding")):
            # Level 1: a page of 1000 containers shrinks ~7x (bench/prometheus.py); higher levels
            # cost several times the CPU for little more. zlib releases the GIL meanwhile.
            body = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        scrape_stats.add(time.perf_counter() - started, size)
        return Response(content=body, media_type=content_type, headers=headers)

    api.add_api_route(ctx.config.prometheus_endpoint, metrics, methods=["GET"], include_in_schema=False)
    return api


__all__ = [
    "CONTENT_TYPE_OPENMETRICS",
    "CONTENT_TYPE_TEXT",
    "ContainerCollector",
    "Family",
    "MachineCollector",
    "ScrapeStats",
    "SelfCollector",
    "make_registry",
    "negotiate",
    "render",
    "router",
]
