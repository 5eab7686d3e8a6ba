"""In-memory stats cache: per container, bounded by age and by count; hands records on.

History is kept as LZ4-compressed JSON, each record compressed against the container's first
record as dictionary: about a tenth of the JSON size and no objects for the garbage collector
to walk. The newest record of each container is also kept as an object.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from datetime import datetime

import lz4.block

from exporter.clock import Clock
from exporter.models import ContainerStats


class TimedStore:
    """JSON records of one container, oldest first, bounded by age and count."""

    __slots__ = ("_items", "max_age_s", "max_items", "_dict")

    def __init__(self, max_age_s: float, max_items: int) -> None:
        # (timestamp, JSON compressed with _dict: the store's first record)
        self._items: deque[tuple[float, bytes]] = deque()
        self.max_age_s = max_age_s
        self.max_items = max_items
        self._dict: bytes | None = None

    def add(self, ts: float, payload: bytes, now: float) -> None:
        if self._dict is None:
            self._dict = payload
        packed = (ts, lz4.block.compress(payload, dict=self._dict))
        items = self._items
        if items and ts < items[-1][0]:
            # Out of order (a clock step back): keep the store sorted.
            idx = len(items)
            while idx > 0 and items[idx - 1][0] > ts:
                idx -= 1
            items.insert(idx, packed)
        else:
            items.append(packed)
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

    def get(self, start: float | None = None, end: float | None = None, count: int | None = None) -> list[bytes]:
        """JSON of the records with start <= ts <= end, the newest ``count`` of them, oldest first."""
        selected = [data for ts, data in self._items if (start is None or ts >= start) and (end is None or ts <= end)]
        if count is not None:
            selected = selected[-count:] if count > 0 else []
        return [lz4.block.decompress(data, dict=self._dict) for data in selected]


Consumer = Callable[[ContainerStats], None]


class InMemoryCache:
    """Keeps the last ``storage_duration`` of stats per container and passes each new record to
    ``consumer`` (the sink layer, which only enqueues)."""

    def __init__(self, storage_duration_s: float, max_records: int, clock: Clock, consumer: Consumer | None = None) -> None:
        self._stores: dict[str, TimedStore] = {}
        self._latest: dict[str, ContainerStats] = {}
        self._lock = threading.Lock()
        self._duration = storage_duration_s
        self._max = max_records
        self._clock = clock
        self._consumer = consumer

    def add_stats(self, record: ContainerStats) -> None:
        name = record.container.name
        payload = record.json_bytes()
        with self._lock:
            store = self._stores.get(name)
            if store is None:
                store = self._stores[name] = TimedStore(self._duration, self._max)
            store.add(record.timestamp.timestamp(), payload, self._clock.time())
            latest = self._latest.get(name)
            if latest is None or latest.timestamp <= record.timestamp:
                self._latest[name] = record
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
            payloads = store.get(start.timestamp() if start else None, end.timestamp() if end else None, count)
        return [ContainerStats.model_validate_json(p) for p in payloads]

    def latest(self, name: str) -> ContainerStats | None:
        """The newest record, if it is still within storage_duration."""
        with self._lock:
            record = self._latest.get(name)
            if record is None or record.timestamp.timestamp() < self._clock.time() - self._duration:
                return None
            return record

    def remove(self, name: str) -> None:
        with self._lock:
            self._stores.pop(name, None)
            self._latest.pop(name, None)

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
