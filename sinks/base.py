"""The sink protocol and the delivery worker that feeds a sink from its own thread.

A sink is four methods: open → write_batch(records) → flush → close. The worker owns the
queue, batching, retries and counters, so a slow or failing store never blocks collection.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel

log = logging.getLogger(__name__)


class SinkError(Exception):
    """A failed write. ``retryable`` says whether sending the same batch again may succeed."""

    def __init__(self, message: str, retryable: bool = True, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class Sink(Protocol):
    name: str

    def open(self) -> None: ...

    def write_batch(self, records: Sequence[BaseModel]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class SinkStats:
    sent: int = 0
    failed: int = 0
    retried: int = 0
    dropped: int = 0
    batches: int = 0
    last_success: float | None = None
    last_batch_latency_s: float | None = None
    batch_latency_sum_s: float = 0.0
    last_error: str | None = None
    queue_depth: int = 0
    queue_capacity: int = 0
    dropped_reasons: dict[str, int] = field(default_factory=dict)


class BoundedQueue:
    """FIFO with a capacity; when full the oldest record is dropped (and counted by the caller).

    The consumer is woken when a batch is full, or when its buffer time runs out.
    """

    def __init__(self, capacity: int, batch_size: int) -> None:
        self._items: deque[BaseModel] = deque()
        self._cond = threading.Condition(threading.Lock())
        self.capacity = capacity
        self._batch_size = batch_size
        self._closed = False

    def put(self, item: BaseModel) -> bool:
        """False when an old record had to be dropped to make room."""
        with self._cond:
            items = self._items
            items.append(item)
            dropped = len(items) > self.capacity
            if dropped:
                items.popleft()
            if len(items) == self._batch_size:
                self._cond.notify()
            return not dropped

    def get_batch(self, max_items: int, wait_s: float) -> list[BaseModel]:
        """Up to ``max_items``; waits at most ``wait_s`` for the batch to fill."""
        with self._cond:
            if len(self._items) < max_items and not self._closed and wait_s > 0:
                self._cond.wait(wait_s)
            items = self._items
            n = min(max_items, len(items))
            return [items.popleft() for _ in range(n)]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._items)


class SinkWorker:
    """Delivers records to one sink from its own thread: batches by size and time, retries
    with exponential backoff and jitter."""

    def __init__(
        self,
        sink: Sink,
        queue_size: int = 100_000,
        batch_size: int = 1000,
        buffer_duration_s: float = 1.0,
        max_backoff_s: float = 60.0,
    ) -> None:
        self.sink = sink
        self.name = sink.name
        self.queue = BoundedQueue(queue_size, batch_size)
        self.batch_size = batch_size
        self.buffer_duration_s = buffer_duration_s
        self.max_backoff_s = max_backoff_s
        self.stats = SinkStats(queue_capacity=queue_size)
        self._stop = threading.Event()
        self._deadline: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"sink-{self.name}", daemon=True)
        self._drop_logged = False

    def start(self) -> None:
        self.sink.open()
        self._thread.start()

    def submit(self, record: BaseModel) -> None:
        if not self.queue.put(record):
            self._count_drop("queue full", 1)

    def _count_drop(self, reason: str, n: int) -> None:
        self.stats.dropped += n
        self.stats.dropped_reasons[reason] = self.stats.dropped_reasons.get(reason, 0) + n
        if not self._drop_logged:
            self._drop_logged = True
            log.warning("sink %s: dropping records (%s); further drops are counted, not logged", self.name, reason)

    def stop(self, deadline_s: float = 10.0) -> None:
        """Deliver what is queued within ``deadline_s``, then flush and close the sink."""
        self._deadline = time.monotonic() + deadline_s
        self._stop.set()
        self.queue.close()
        self._thread.join(deadline_s + 1.0)
        left = len(self.queue)
        if left:
            self._count_drop("shutdown deadline", left)
            log.error("sink %s: %d records not delivered before the shutdown deadline", self.name, left)

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            batch = self.queue.get_batch(self.batch_size, 0 if stopping else self.buffer_duration_s)
            self.stats.queue_depth = len(self.queue)
            if batch:
                self._deliver(batch)
            elif stopping:
                break
        try:
            self.sink.flush()
        except Exception as exc:  # a failing flush at exit is reported, not raised
            log.error("sink %s: flush at shutdown failed: %s", self.name, exc)
        finally:
            try:
                self.sink.close()
            except Exception as exc:
                log.error("sink %s: close failed: %s", self.name, exc)

    def _deliver(self, batch: list[BaseModel]) -> None:
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                self.sink.write_batch(batch)
            except Exception as exc:
                retryable = exc.retryable if isinstance(exc, SinkError) else False
                retry_after = exc.retry_after_s if isinstance(exc, SinkError) else None
                self.stats.failed += 1
                self.stats.last_error = str(exc)
                if attempt == 0:
                    log.warning("sink %s: write of %d records failed: %s", self.name, len(batch), exc)
                if not retryable:
                    self._count_drop("not retryable", len(batch))
                    return
                attempt += 1
                delay = retry_after if retry_after is not None else self._backoff(attempt)
                if not self._sleep_before_retry(delay):
                    self._count_drop("shutdown deadline", len(batch))
                    return
                self.stats.retried += 1
                continue
            latency = time.monotonic() - started
            self.stats.sent += len(batch)
            self.stats.batches += 1
            self.stats.last_success = time.time()
            self.stats.last_batch_latency_s = latency
            self.stats.batch_latency_sum_s += latency
            if attempt:
                log.info("sink %s: delivering again after %d retries", self.name, attempt)
            return

    def _sleep_before_retry(self, delay_s: float) -> bool:
        """Wait ``delay_s``; False when a shutdown deadline would pass first."""
        end = time.monotonic() + delay_s
        if not self._stop.is_set():
            self._stop.wait(delay_s)
        remaining = end - time.monotonic()
        if self._deadline is not None and time.monotonic() + max(remaining, 0) > self._deadline:
            return False
        if remaining > 0:
            time.sleep(remaining)
        return True

    def _backoff(self, attempt: int) -> float:
        base = min(self.max_backoff_s, 0.5 * 2 ** (attempt - 1))
        return base * random.uniform(0.5, 1.0)


class SinkHub:
    """Fans records out to every configured sink's worker."""

    def __init__(self, workers: list[SinkWorker]) -> None:
        self.workers = workers

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def submit(self, record: BaseModel) -> None:
        for worker in self.workers:
            worker.submit(record)

    def stop(self, deadline_s: float = 10.0) -> None:
        threads = [threading.Thread(target=w.stop, args=(deadline_s,)) for w in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
