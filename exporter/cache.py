"""In-memory stats cache: per container, bounded by age and by count; hands records on."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from datetime import datetime

from exporter.clock import Clock
from exporter.models import ContainerStats


class TimedStore:
    """Records of one container, oldest first, bounded by age and count."""

    __slots__ = ("_items", "max_age_s", "max_items")

    def __init__(self, max_age_s: float, max_items: int) -> None:
        self._items: deque[tuple[float, ContainerStats]] = deque()
        self.max_age_s = max_age_s
        self.max_items = max_items

    def add(self, ts: float, record: ContainerStats, now: float) -> None:
        items = self._items
        if items and ts < items[-1][0]:
            # Out of order (a clock step back): keep the store sorted.
            idx = len(items)
            while idx > 0 and items[idx - 1][0] > ts:
                idx -= 1
            items.insert(idx, (ts, record))
        else:
            items.append((ts, record))
        while len(items) > self.max_items:
            items.popleft()
        self.evict(now)

    def evict(self, now: float) -> None:
        items = self._items
        horizon = now - self.max_age_s
        while items and items[0][0] < horizon:
            items.popleft()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, start: float | None = None, end: float | None = None, count: int | None = None) -> list[ContainerStats]:
        """Records with start <= ts <= end, the newest ``count`` of them, oldest first."""
        out = [r for ts, r in self._items if (start is None or ts >= start) and (end is None or ts <= end)]
        if count is not None:
            out = out[-count:] if count > 0 else []
        return out


Consumer = Callable[[ContainerStats], None]


class InMemoryCache:
    """Keeps the last ``storage_duration`` of stats per container and passes each new record to
    ``consumer`` (the sink layer, which only enqueues)."""

    def __init__(self, storage_duration_s: float, max_records: int, clock: Clock, consumer: Consumer | None = None) -> None:
        self._stores: dict[str, TimedStore] = {}
        self._lock = threading.Lock()
        self._duration = storage_duration_s
        self._max = max_records
        self._clock = clock
        self._consumer = consumer

    def add_stats(self, record: ContainerStats) -> None:
        name = record.container.name
        with self._lock:
            store = self._stores.get(name)
            if store is None:
                store = self._stores[name] = TimedStore(self._duration, self._max)
            store.add(record.timestamp.timestamp(), record, self._clock.time())
        if self._consumer is not None:
            self._consumer(record)

    def recent(
        self, name: str, start: datetime | None = None, end: datetime | None = None, count: int | None = None
    ) -> list[ContainerStats]:
        with self._lock:
            store = self._stores.get(name)
            if store is None:
                return []
            store.evict(self._clock.time())
            return store.get(start.timestamp() if start else None, end.timestamp() if end else None, count)

    def latest(self, name: str) -> ContainerStats | None:
        found = self.recent(name, count=1)
        return found[0] if found else None

    def remove(self, name: str) -> None:
        with self._lock:
            self._stores.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._stores)

    def evict_all(self) -> None:
        """Drop expired records everywhere (a container whose job stopped adding keeps none)."""
        now = self._clock.time()
        with self._lock:
            for store in self._stores.values():
                store.evict(now)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._stores
