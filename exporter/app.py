"""The composition root: config → every component, wired once."""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from exporter.api import prometheus
from exporter.api.auth import AuthFileError, AuthMiddleware, options_from_config
from exporter.api.context import ApiContext
from exporter.api.server import ApiServer, create_app
from exporter.cache import InMemoryCache
from exporter.cgroups.layout import CgroupLayout, detect_layout
from exporter.cgroups.procs import ProcReader
from exporter.cgroups.reader import DeviceNames
from exporter.clock import Clock, SystemClock
from exporter.collectors import CollectorManager
from exporter.config import Config, ConfigError
from exporter.discovery.docker import DockerFactory
from exporter.discovery.factories import Factory, RawFactory, RuntimeScopeFactory, SystemdFactory
from exporter.discovery.watcher import CgroupWatcher, scan
from exporter.events import EventManager, events_router, parse_storage_policy
from exporter.fs import WritableLayerUsage, filesystem_stats, machine_filesystems, read_mounts
from exporter.housekeeping import Scheduler
from exporter.machine import read_machine_info, read_version_info
from exporter.manager import Identity, Manager
from exporter.models import ContainerStats, MachineInfo, VersionInfo
from exporter.oom import OomWatcher
from exporter.summary import StatsSummary
from sinks import registry
from sinks.base import SinkHub, SinkWorker
from sinks.settings import DeliverySettings

log = logging.getLogger(__name__)

GLOBAL_JOB_ID = "global-housekeeping"
SINK_SUMMARY_JOB_ID = "sink-summary"
SINK_SUMMARY_INTERVAL_S = 60.0
EVENTS_EXPIRY_JOB_ID = "events-expiry"
EVENTS_EXPIRY_INTERVAL_S = 60.0
COLLECTOR_TIMEOUT_S = 5.0


def docker_factory(config: Config) -> DockerFactory | None:
    endpoint = config.docker_endpoint
    if endpoint.startswith("unix://") and not os.path.exists(endpoint[len("unix://") :]):
        log.info("no Docker socket at %s: Docker containers are reported as raw cgroups", endpoint)
        return None
    return DockerFactory(endpoint, config.docker_env_metadata_whitelist, config.rootfs)


def build_sinks(config: Config) -> list[SinkWorker]:
    workers = []
    for name in config.storage_driver:
        settings = config.sink_settings(name)
        assert isinstance(settings, DeliverySettings)
        sink = registry.sink_class(name)(settings)
        spool = None
        if settings.spool:
            from sinks.spool import Spool

            directory = settings.spool_dir or config.state_dir / "spool" / name
            spool = Spool(directory, settings.spool_max_bytes, settings.spool_fsync)
            if len(spool):
                log.info("sink %s: %d records in the spool from a previous run will be delivered first", name, len(spool))
        workers.append(SinkWorker(sink, settings, spool))
    return workers


def resolve_event_container(manager: Manager) -> Callable[[str], str | None]:
    """Event queries name a container by cgroup path, or /docker/<name or id>."""

    def resolve(name: str) -> str | None:
        if manager.get(name) is not None:
            return name
        if name.startswith("/docker/"):
            found = manager.resolve("docker", name[len("/docker/") :])
            return found.name if found is not None else None
        return None  # unknown: kept as given, so a deleted container's events stay queryable

    return resolve


class App:
    def __init__(self, config: Config, clock: Clock | None = None, with_sinks: bool = True, with_api: bool = True) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.layout: CgroupLayout = detect_layout(config.cgroup_root)
        self.proc = ProcReader(config.proc_root)
        self.docker = docker_factory(config)
        docker_version = self.docker.version if self.docker and self.docker.client() else None
        mounts = machine_filesystems(read_mounts(config.proc_root, "1") or read_mounts(config.proc_root) or [])
        self.machine_info: MachineInfo = read_machine_info(
            config.proc_root, config.sys_root, config.rootfs / "etc", filesystems=mounts
        )
        self.machine_info.cgroup_mode = self.layout.mode
        self.version_info: VersionInfo = read_version_info(
            config.proc_root,
            config.rootfs / "etc",
            (docker_version or {}).get("Version"),
            (docker_version or {}).get("ApiVersion"),
        )
        self.identity = Identity(self.machine_info.machine_id, self.machine_info.hostname, uuid.uuid4().hex)
        self.hub = SinkHub(build_sinks(config) if with_sinks else [])
        self.cache = InMemoryCache(
            config.storage_duration,
            config.storage_max_records,
            self.clock,
            self.hub.submit if self.hub.workers else None,
        )
        self.scheduler = Scheduler(config.housekeeping_workers)
        self.layers = WritableLayerUsage(config.writable_layer_interval)
        fs_failures: dict[str, int] = {}
        factories: list[Factory] = []
        if self.docker is not None:
            factories.append(self.docker)
        factories += [
            RuntimeScopeFactory(config.docker_only),
            SystemdFactory(config.docker_only),
            RawFactory(config.docker_only, config.raw_cgroup_prefix_whitelist),
        ]
        self.collectors = CollectorManager(
            config.proc_root,
            self.scheduler,
            self.clock,
            cert=config.collector_cert,
            key=config.collector_key,
            count_limit=config.application_metrics_count_limit,
            timeout_s=COLLECTOR_TIMEOUT_S,
            rootfs=config.rootfs,
        )
        self.manager = Manager(
            layout=self.layout,
            factories=factories,
            cache=self.cache,
            scheduler=self.scheduler,
            identity=self.identity,
            clock=self.clock,
            proc=self.proc,
            metrics=config.metrics,
            housekeeping_interval_s=config.housekeeping_interval,
            max_housekeeping_interval_s=config.max_housekeeping_interval,
            allow_dynamic_housekeeping=config.allow_dynamic_housekeeping,
            devices=DeviceNames(config.sys_root),
            layers=self.layers,
            machine_filesystems=lambda: filesystem_stats(mounts, config.rootfs, failures=fs_failures),
            summary_factory=lambda: StatsSummary(self.clock, config.housekeeping_interval, config.max_housekeeping_interval),
            custom_metrics=self.collectors,
        )
        self.manager.listeners.append(self.collectors)
        self.events = EventManager(
            parse_storage_policy(config.event_storage_age_limit, config.event_storage_event_limit),
            self.identity,
            self.clock,
            sink=self.hub.submit if self.hub.workers else None,
            docker=self.docker,
            lookup=self.manager.get,
        )
        self.manager.listeners.append(self.events)
        self.oom = OomWatcher(self.events.add_oom, self.clock) if "oom_event" in config.metrics else None
        self.roots = self.layout.discovery_roots()
        self.watcher = CgroupWatcher(self.roots, self.manager.create, self.manager.destroy, on_overflow=self._rescan_soon)
        self._rescan_lock = threading.Lock()
        self.rescans = 0
        self._stopped = False
        self._usage_mark: tuple[float, float] | None = None
        self.api_context = ApiContext(
            config=config,
            manager=self.manager,
            cache=self.cache,
            machine_info=self.machine_info,
            version_info=self.version_info,
            sinks=self.hub.workers,
            scheduler=self.scheduler,
            started_at=self.clock.time(),
            events=self.events,
            watcher_degraded=lambda: self.watcher.degraded,
            collection_stats=self.manager.collection_stats,
        )
        self.api: ApiServer | None = None
        if with_api:
            self.api = ApiServer(self._http_app(), config.listen_ip, config.port)

    def _http_app(self) -> Any:
        try:
            auth = options_from_config(self.config)
        except AuthFileError as exc:
            raise ConfigError([str(exc)]) from None
        middleware: list[tuple[type, dict[str, Any]]] = []
        if auth is not None:
            middleware.append((AuthMiddleware, {**auth, "clock": self.clock.monotonic}))
        routers = [
            prometheus.router(self.api_context),
            events_router(self.events, resolve_event_container(self.manager)),
        ]
        return create_app(self.api_context, routers, middleware, clock=self.clock)

    def log_startup(self) -> None:
        m, v = self.machine_info, self.version_info
        log.info(
            "container-exporter %s on %s (kernel %s, %s, cgroup %s, Docker %s); %d cores, %d MiB memory, machine id %s",
            v.exporter_version, m.hostname, v.kernel_version, v.os_version, self.layout.mode,
            v.docker_version or "not connected", m.num_cores, m.memory_capacity_bytes >> 20, m.machine_id,
        )
        log.info("filesystems: %s", ", ".join(f"{f.device} on {f.mountpoint}" for f in m.filesystems) or "none")
        log.info("network devices: %s", ", ".join(d.name for d in m.network_devices) or "none")

    def start(self) -> None:
        self.log_startup()
        self.hub.start()
        if self.oom is not None:
            self.oom.start()
        self.scheduler.start()
        self.layers.start()
        self.manager.create("/")
        self.watcher.start()
        self.global_housekeeping()
        log.info("monitoring %d containers; sinks: %s", len(self.manager.names()), ", ".join(self.config.storage_driver) or "none")
        interval = self.config.global_housekeeping_interval
        self.scheduler.add(GLOBAL_JOB_ID, self.global_housekeeping, interval, first_run_in_s=interval)
        self.scheduler.add(EVENTS_EXPIRY_JOB_ID, self.events.expire, EVENTS_EXPIRY_INTERVAL_S, first_run_in_s=EVENTS_EXPIRY_INTERVAL_S)
        if self.hub.workers:
            self.scheduler.add(SINK_SUMMARY_JOB_ID, self.hub.log_summary, SINK_SUMMARY_INTERVAL_S, first_run_in_s=SINK_SUMMARY_INTERVAL_S)
        if self.api is not None:
            self.api_context.started_at = self.clock.time()
            self.api.start()
            log.info("HTTP API on %s:%d", self.config.listen_ip, self.api.port)

    def global_housekeeping(self) -> None:
        """Rescan the hierarchy (the watcher's backup), expire cached stats, log self usage."""
        with self._rescan_lock:
            self.rescans += 1
            present = scan(self.roots)
            self.watcher.sync(present)
            self.manager.sync(present)
            self.cache.evict_all()
        if self.config.log_self_usage:
            self._log_usage()

    def _rescan_soon(self) -> None:
        self.scheduler.run_soon(GLOBAL_JOB_ID)

    def _log_usage(self) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_s = usage.ru_utime + usage.ru_stime
        now = time.monotonic()
        if self._usage_mark is not None:
            cpu_pct = 100.0 * (cpu_s - self._usage_mark[1]) / max(now - self._usage_mark[0], 1e-9)
            log.info(
                "self usage: cpu %.2f%% over the last %.0fs, max rss %d MiB, %d containers, %d skipped runs",
                cpu_pct, now - self._usage_mark[0], usage.ru_maxrss >> 10, len(self.manager.names()),
                self.scheduler.stats.skipped_overlap,
            )
        self._usage_mark = (now, cpu_s)

    def stop(self, deadline_s: float | None = None) -> None:
        """Stop collecting, then deliver what the sinks still hold within each sink's
        shutdown_timeout (or ``deadline_s``); what is left stays in the spools. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.api is not None:
            self.api.stop()
        self.watcher.stop()
        if self.oom is not None:
            self.oom.stop()
        self.scheduler.shutdown(wait=True)
        self.collectors.close()
        self.manager.stop()
        self.events.stop()  # finishes Docker exit-code lookups, so deletions still reach the sinks
        self.layers.stop()
        self.hub.stop(deadline_s)

    def collect_once(self) -> list[ContainerStats]:
        """One record per container, without scheduling anything: the writable layer and the
        custom metrics endpoints, measured in the background by ``run``, are measured here."""
        records = []
        for name in sorted(scan(self.roots)):
            container = self.manager.build(name)
            if container is None:
                continue
            try:
                while self.layers.step():
                    pass
                self.collectors.container_added(container)
                self.collectors.poll(name)
                record, _ = container.collect()
                records.append(record)
            except Exception as exc:  # one bad container must not lose the others' records
                log.warning("container %s: %s", name, exc)
            finally:
                self.collectors.container_removed(container)
                self.layers.untrack(name)
                container.close()
        return records

