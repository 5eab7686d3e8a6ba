"""What the HTTP handlers may read: built once by the composition root (exporter/app.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exporter.cache import InMemoryCache
    from exporter.config import Config
    from exporter.housekeeping import Scheduler
    from exporter.manager import Manager
    from exporter.models import MachineInfo, VersionInfo
    from sinks.base import SinkWorker


@dataclass
class ApiContext:
    config: Config
    manager: Manager  # containers by name and alias; each Container has .ref, .spec, .summary
    cache: InMemoryCache  # recent(name, start, end, count), latest(name)
    machine_info: MachineInfo
    version_info: VersionInfo
    sinks: list[SinkWorker]  # .name, .stats (SinkStats), .degraded, .summary()
    scheduler: Scheduler  # .stats (skipped_overlap, missed, errors), .job_ids()
    started_at: float  # wall time the exporter started
    events: Any = None  # exporter.events.EventManager once events exist
    watcher_degraded: Callable[[], bool] = lambda: False
    collection_stats: dict[str, float] = field(default_factory=dict)  # filled by the app: collection durations, ...
