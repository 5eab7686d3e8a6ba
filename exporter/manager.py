"""The container registry: discovery → one housekeeping job per container → cache."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from exporter.cache import InMemoryCache
from exporter.cgroups.files import ContainerGone, MalformedFile
from exporter.cgroups.layout import CgroupLayout, join
from exporter.cgroups.procs import ProcReader
from exporter.cgroups.reader import ContainerReader, DeviceNames
from exporter.clock import Clock
from exporter.discovery.factories import IGNORE, ContainerMeta, Factory
from exporter.housekeeping import ContainerJob, DynamicInterval, Scheduler
from exporter.models import (
    ContainerReference,
    ContainerSpec,
    ContainerStats,
    CustomMetricSpec,
    CustomMetricValue,
    FilesystemStats,
)

log = logging.getLogger(__name__)

FilesystemSource = Callable[[], list[FilesystemStats] | None]


@dataclass(frozen=True)
class Identity:
    """Stamped on every record."""

    machine_id: str
    hostname: str
    run_id: str


class LayerTracker(Protocol):
    def track(self, name: str, upper_dir: object) -> None: ...

    def untrack(self, name: str) -> None: ...

    def usage(self, name: str) -> FilesystemStats | None: ...


class CustomMetricsSource(Protocol):
    def latest(self, name: str) -> dict[str, list[CustomMetricValue]] | None: ...

    def specs(self, name: str) -> list[CustomMetricSpec]: ...


class ContainerListener(Protocol):
    def container_added(self, container: Container) -> None: ...

    def container_removed(self, container: Container) -> None: ...


class Container:
    """One monitored container: reference, spec, reader and its record sequence."""

    def __init__(
        self,
        name: str,
        meta: ContainerMeta,
        reader: ContainerReader,
        identity: Identity,
        clock: Clock,
        filesystem: FilesystemSource | None = None,
        custom_metrics: CustomMetricsSource | None = None,
    ) -> None:
        self.name = name
        self.custom_metrics = custom_metrics
        self.meta = meta
        self.reader = reader
        self.identity = identity
        self.clock = clock
        self.filesystem = filesystem
        self.ref = reference(name, meta)
        self.spec = self.read_spec()
        self.seq = 0
        self._stamp = {"machine_id": identity.machine_id, "hostname": identity.hostname, "run_id": identity.run_id}
        # Per-container summary statistics (minute/hour/day percentiles), when the app keeps them.
        self.summary: Any = None
        self._activity: tuple[object, ...] | None = None
        self._lock = threading.Lock()
        self.closed = False

    def read_spec(self) -> ContainerSpec:
        spec = self.reader.spec()
        meta = self.meta
        spec.labels = meta.labels
        spec.image = meta.image
        spec.env = meta.env
        if meta.creation_time is not None:
            spec.creation_time = meta.creation_time
        spec.has_network = "network" in self.reader.metrics
        spec.has_filesystem = self.filesystem is not None
        return spec

    def update_meta(self, meta: ContainerMeta) -> None:
        self.meta = meta
        self.ref = reference(self.name, meta)
        self.spec = self.read_spec()

    def collect(self) -> tuple[ContainerStats, bool]:
        """A new record, and whether it differs from the previous one (dynamic housekeeping)."""
        with self._lock:
            if self.closed:
                raise ContainerGone(self.name)
            data = self.reader.read(self.clock.monotonic())
            processes = data.get("processes")
            if processes is not None:
                processes["pids_limit"] = self.spec.pids_limit
            if self.filesystem is not None:
                data["filesystem"] = self.filesystem()
            if self.custom_metrics is not None:
                self.spec.custom_metrics = self.custom_metrics.specs(self.name)
                data["custom_metrics"] = self.custom_metrics.latest(self.name)
            self.seq += 1
            data["seq"] = self.seq
            now = self.clock.time()
            data["timestamp"] = datetime.fromtimestamp(now, UTC)
            data["record_id"] = record_id(self.identity.machine_id, self.ref.id or self.name, round(now * 1_000_000))
            data["container"] = self.ref
            data.update(self._stamp)
            record = _STATS.validate_python(data)
        activity = _activity(data)
        changed = activity != self._activity
        self._activity = activity
        return record, changed

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self.reader.close()


_STATS = ContainerStats.__pydantic_validator__


def _activity(data: dict[str, Any]) -> tuple[object, ...]:
    """What must stay equal for a sample to count as "unchanged" (cAdvisor's StatsEq)."""
    cpu, mem = data.get("cpu"), data.get("memory")
    return (
        cpu.get("total_ns") if cpu else None,
        cpu.get("throttled_periods") if cpu else None,
        mem.get("usage_bytes") if mem else None,
        data.get("diskio"),
        data.get("network"),
        data.get("processes"),
        data.get("custom_metrics"),
    )


def record_id(machine_id: str, container: str, timestamp_us: int) -> str:
    """Deterministic: a record re-sent after a restart keeps its id, so stores can dedupe."""
    return hashlib.blake2b(f"{machine_id}/{container}/{timestamp_us}".encode(), digest_size=16).hexdigest()


def reference(name: str, meta: ContainerMeta) -> ContainerReference:
    return ContainerReference(
        name=name,
        id=meta.id,
        aliases=meta.aliases,
        namespace=meta.namespace,
        runtime=meta.runtime,
        labels=meta.labels,
        image=meta.image,
    )


class Manager:
    def __init__(
        self,
        layout: CgroupLayout,
        factories: Sequence[Factory],
        cache: InMemoryCache,
        scheduler: Scheduler,
        identity: Identity,
        clock: Clock,
        proc: ProcReader,
        metrics: frozenset[str],
        housekeeping_interval_s: float,
        max_housekeeping_interval_s: float,
        allow_dynamic_housekeeping: bool,
        devices: DeviceNames | None = None,
        layers: LayerTracker | None = None,
        machine_filesystems: FilesystemSource | None = None,
        summary_factory: Callable[[], Any] | None = None,
        custom_metrics: CustomMetricsSource | None = None,
    ) -> None:
        self.layout = layout
        self.factories = list(factories)
        self.cache = cache
        self.scheduler = scheduler
        self.identity = identity
        self.clock = clock
        self.proc = proc
        self.metrics = metrics
        self.devices = devices or DeviceNames()
        self.layers = layers if "disk" in metrics else None
        self.machine_filesystems = machine_filesystems if "disk" in metrics else None
        self.interval_s = housekeeping_interval_s
        self.max_interval_s = max_housekeeping_interval_s
        self.allow_dynamic = allow_dynamic_housekeeping
        self.host_netns = proc.host_netns()
        self.summary_factory = summary_factory
        self.custom_metrics = custom_metrics
        self.listeners: list[ContainerListener] = []
        # Read by the API's self-metrics: how long collections take.
        self.collection_stats: dict[str, float] = {
            "last_collection_duration_s": 0.0, "max_collection_duration_s": 0.0, "collection_duration_sum_s": 0.0, "collection_count": 0,
        }
        self._stats_lock = threading.Lock()
        self.malformed_files = 0
        self._malformed_seen: set[tuple[str, str]] = set()
        self._containers: dict[str, Container] = {}
        self._aliases: dict[tuple[str, str], str] = {}
        self._jobs: dict[str, ContainerJob] = {}
        self._ignored: set[str] = set()
        self._creating: set[str] = set()
        self._lock = threading.RLock()

    # -- queries ----------------------------------------------------------------------------
    def get(self, name: str) -> Container | None:
        with self._lock:
            return self._containers.get(name)

    def resolve(self, namespace: str, alias: str) -> Container | None:
        with self._lock:
            name = self._aliases.get((namespace, alias))
            return self._containers.get(name) if name else None

    def containers(self) -> list[Container]:
        with self._lock:
            return list(self._containers.values())

    def job(self, name: str) -> ContainerJob | None:
        with self._lock:
            return self._jobs.get(name)

    def names(self) -> set[str]:
        with self._lock:
            return set(self._containers)

    # -- lifecycle --------------------------------------------------------------------------
    def _decide(self, name: str) -> ContainerMeta | None:
        for factory in self.factories:
            decision = factory.accept(name)
            if decision is None:
                continue
            if decision is IGNORE:
                return None
            assert isinstance(decision, ContainerMeta)
            return decision
        return None

    def _on_malformed(self, name: str, exc: MalformedFile) -> None:
        self.malformed_files += 1
        key = (name, exc.path)
        if key not in self._malformed_seen:
            self._malformed_seen.add(key)
            log.warning("container %s: %s; the value is reported as unset", name, exc)

    def build(self, name: str) -> Container | None:
        """Ask the factories about ``name`` and prepare its container, without scheduling it."""
        meta = self._decide(name)
        if meta is None:
            return None
        try:
            reader = ContainerReader(
                self.layout, name, self.proc, self.devices, self.metrics, self._on_malformed, self.host_netns
            )
        except ContainerGone:
            return None
        filesystem: FilesystemSource | None = None
        if name == "/" and self.machine_filesystems is not None:
            filesystem = self.machine_filesystems
        elif meta.writable_layer is not None and self.layers is not None:
            layers = self.layers
            layers.track(name, meta.writable_layer)
            filesystem = lambda: _as_list(layers.usage(name))  # noqa: E731
        try:
            return Container(name, meta, reader, self.identity, self.clock, filesystem, self.custom_metrics)
        except ContainerGone:
            reader.close()
            return None

    def create(self, name: str, first_run_in_s: float | None = None) -> bool:
        """Start monitoring ``name``; False when it is ignored, gone or already known."""
        with self._lock:
            if name in self._containers or name in self._ignored or name in self._creating:
                return False
            self._creating.add(name)
        try:
            container = self.build(name)
        finally:
            with self._lock:
                self._creating.discard(name)
        if container is None:
            with self._lock:
                if not self._gone(name):
                    self._ignored.add(name)
            return False
        with self._lock:
            self._containers[name] = container
            self._index(container)
        job = ContainerJob(
            name,
            lambda: self._tick(container),
            self._on_gone,
            DynamicInterval(self.interval_s, self.max_interval_s, self.allow_dynamic),
            self.scheduler,
            ContainerGone,
        )
        if self.summary_factory is not None:
            container.summary = self.summary_factory()
        with self._lock:
            self._jobs[name] = job
        self.scheduler.add(name, job, self.interval_s, first_run_in_s)
        log.debug("monitoring %s (%s)", name, container.ref.runtime)
        for listener in self.listeners:
            _notify(listener.container_added, container)
        return True

    def _index(self, container: Container, add: bool = True) -> None:
        namespace = container.ref.namespace
        if not namespace:
            return
        for alias in container.ref.aliases:
            if add:
                self._aliases[(namespace, alias)] = container.name
            elif self._aliases.get((namespace, alias)) == container.name:
                del self._aliases[(namespace, alias)]

    def _gone(self, name: str) -> bool:
        return not any(join(root, name).is_dir() for root in self.layout.discovery_roots())

    def _tick(self, container: Container) -> bool:
        started = time.perf_counter()
        record, changed = container.collect()
        self.cache.add_stats(record)
        if container.summary is not None:
            container.summary.add_sample(record)
        took = time.perf_counter() - started
        stats = self.collection_stats
        with self._stats_lock:
            stats["last_collection_duration_s"] = took
            stats["max_collection_duration_s"] = max(stats["max_collection_duration_s"], took)
            stats["collection_duration_sum_s"] += took
            stats["collection_count"] += 1
        return changed

    def _on_gone(self, name: str) -> None:
        """A job found its cgroup gone. A cgroup recreated under the same name (a restarted
        container) is monitored again at once, as a new container."""
        self.destroy(name)
        if not self._gone(name):
            self.create(name)

    def destroy(self, name: str) -> bool:
        with self._lock:
            self._ignored.discard(name)
            container = self._containers.pop(name, None)
            if container is None:
                return False
            self._jobs.pop(name, None)
            self._index(container, add=False)
        self.scheduler.remove(name)
        self.cache.remove(name)
        container.close()
        if self.layers is not None and container.meta.writable_layer is not None:
            self.layers.untrack(name)
        log.debug("stopped monitoring %s", name)
        for listener in self.listeners:
            _notify(listener.container_removed, container)
        return True

    def sync(self, present: set[str]) -> None:
        """Make the registry match the cgroups that exist (the global housekeeping rescan)."""
        known = self.names()
        for name in sorted(present - known):
            self.create(name)
        for name in known - present:
            self.destroy(name)
        with self._lock:
            self._ignored &= present
        for container in self.containers():
            if container.meta.incomplete:
                meta = self._decide(container.name)
                if meta is not None and not meta.incomplete:
                    with self._lock:
                        self._index(container, add=False)
                        container.update_meta(meta)
                        self._index(container)
                    for listener in self.listeners:
                        updated = getattr(listener, "container_updated", None)
                        if updated is not None:
                            _notify(updated, container)
                    log.info("container %s: metadata now available (%s)", container.name, ", ".join(meta.aliases))

    def stop(self) -> None:
        for name in list(self.names()):
            with self._lock:
                container = self._containers.pop(name, None)
                self._jobs.pop(name, None)
            if container is not None:
                self.scheduler.remove(name)
                container.close()


def _as_list(stats: FilesystemStats | None) -> list[FilesystemStats] | None:
    return None if stats is None else [stats]


def _notify(fn: Callable[[Container], None], container: Container) -> None:
    try:
        fn(container)
    except Exception:
        log.exception("container listener failed for %s", container.name)
