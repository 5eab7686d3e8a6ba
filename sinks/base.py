"""Delivery: one worker thread per sink between the collection and the store.

Collection only enqueues (a bounded in-memory queue; it never waits for a store). The worker
batches by size and time and calls the sink. While the store is healthy nothing touches the
disk. When a write fails, the failed records and everything queued behind them go to the disk
spool, in order, and from then on records pass through the spool until it is empty again; the
worker retries the spool's oldest records with exponential backoff and jitter (a store's
Retry-After wins), re-sending only the records a partial failure names. A spool left by a
previous run is replayed first. Without a spool, a failed batch is retried from memory.

Every way of losing a record is counted by reason, and the first of each kind is logged.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from exporter.models import ContainerStats, Envelope, Event
from sinks.protocol import ERROR, PartialFailure, Sink, SinkError
from sinks.settings import DeliverySettings

log = logging.getLogger(__name__)

# Spool payload: one byte naming the record type, then the record's JSON.
RECORD_TYPES: dict[bytes, type[Envelope]] = {b"s": ContainerStats, b"e": Event}
_TYPE_TAGS: dict[type[Envelope], bytes] = {cls: tag for tag, cls in RECORD_TYPES.items()}


def encode(record: Envelope) -> bytes:
    return _TYPE_TAGS[type(record)] + record.json_bytes()


def decode(payload: bytes) -> Envelope:
    return RECORD_TYPES[payload[:1]].model_validate_json(payload[1:])


class SpoolLike:
    """What the worker needs of :class:`sinks.spool.Spool`."""

    dropped: int
    corrupt: int
    pending_bytes: int

    def append(self, payloads: Sequence[bytes]) -> None: ...
    def peek(self, max_records: int) -> tuple[object, list[bytes]]: ...
    def ack(self, cursor: object) -> None: ...
    def __len__(self) -> int: ...
    def close(self) -> None: ...


@dataclass
class SinkStats:
    """Counters of one sink, read by the API's /metrics and the periodic log summary."""

    sent: int = 0  # records the store accepted
    failed: int = 0  # failed write attempts
    retried: int = 0  # records sent again
    dropped: int = 0  # records lost, by reason in dropped_reasons
    spooled: int = 0  # records written to the spool
    replayed: int = 0  # records delivered from the spool
    batches: int = 0
    last_success: float | None = None  # wall time
    batch_latency_sum_s: float = 0.0
    last_error: str | None = None
    queue_depth: int = 0
    queue_capacity: int = 0
    spool_pending: int = 0
    spool_bytes: int = 0
    dropped_reasons: dict[str, int] = field(default_factory=dict)
    errors_by_category: dict[str, int] = field(default_factory=dict)


class BoundedQueue:
    """FIFO with a capacity; when full the oldest record is dropped (the caller counts it).

    The consumer is woken when a batch is full, or when its buffer time runs out.
    """

    def __init__(self, capacity: int, batch_size: int) -> None:
        self._items: deque[Envelope] = deque()
        self._cond = threading.Condition(threading.Lock())
        self.capacity = capacity
        self._batch_size = batch_size
        self._closed = False

    def put(self, item: Envelope) -> bool:
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

    def get_batch(self, max_items: int, wait_s: float) -> list[Envelope]:
        """Up to ``max_items``; waits at most ``wait_s`` for the batch to fill."""
        with self._cond:
            if len(self._items) < max_items and not self._closed and wait_s > 0:
                self._cond.wait(wait_s)
            items = self._items
            n = min(max_items, len(items))
            return [items.popleft() for _ in range(n)]

    def drain(self) -> list[Envelope]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            return items

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._items)


class SinkWorker:
    """Feeds one sink from its own thread. See the module docstring."""

    UNEXPECTED_ATTEMPTS = 5

    def __init__(
        self,
        sink: Sink,
        settings: DeliverySettings,
        spool: SpoolLike | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.sink = sink
        self.name = sink.name
        self.settings = settings
        self.spool = spool
        self.queue = BoundedQueue(settings.queue_size, settings.batch_size)
        self.stats = SinkStats(queue_capacity=settings.queue_size)
        self._stop = threading.Event()
        self._deadline: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"sink-{self.name}", daemon=True)
        self._logged: set[str] = set()
        self._failing_since: float | None = None
        self._attempt = 0
        self._retry_at = 0.0
        self._opened = False
        # Records that failed and wait in memory (no spool) or a spool chunk's failed subset.
        self._pending: list[Envelope] = []
        self._pending_cursor: object | None = None

    # -- producer side (collection threads) --------------------------------------------------
    def submit(self, record: Envelope) -> None:
        if not self.queue.put(record):
            self._drop("queue full", 1)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, deadline_s: float | None = None) -> None:
        """Deliver what is queued within the shutdown timeout; spool the rest; close."""
        timeout = self.settings.shutdown_timeout if deadline_s is None else deadline_s
        self._deadline = time.monotonic() + timeout
        self._stop.set()
        self.queue.close()
        # A write in progress may take up to the sink's own timeout to give up.
        self._thread.join(timeout + self.settings.timeout + 5.0)
        if self._thread.is_alive():
            log.error("sink %s: still busy in a write at shutdown; abandoning it", self.name)
            self._spool_or_drop(self.queue.drain(), "shutdown")
        self._refresh_stats()

    @property
    def degraded(self) -> bool:
        return self._failing_since is not None or bool(self.spool is not None and len(self.spool))

    # -- worker thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._loop_once():
                pass
        except Exception:  # a bug here must not take collection down; it is loud, though
            log.exception("sink %s: delivery worker failed; records from now on are dropped", self.name)
            self._stop.set()
        finally:
            self._shutdown()

    def _loop_once(self) -> bool:
        """One step; False when the worker is done."""
        stopping = self._stop.is_set()
        if stopping and time.monotonic() >= (self._deadline or 0):
            return False
        if not self._opened and not self._open():
            return self._idle(stopping)
        if self._pending:
            if time.monotonic() < self._retry_at:
                return self._idle(stopping)
            self._retry_pending()
            return True
        if self.spool is not None and len(self.spool):
            self._spool_incoming()
            if time.monotonic() < self._retry_at:
                return self._idle(stopping)
            self._deliver_from_spool()
            return True
        wait_s = 0.0 if stopping else self.settings.buffer_duration
        batch = self.queue.get_batch(self.settings.batch_size, wait_s)
        self.stats.queue_depth = len(self.queue)
        if batch:
            self._deliver_fresh(batch)
            return True
        return not stopping

    def _idle(self, stopping: bool) -> bool:
        """Wait a little towards the retry time, moving arrivals into the spool meanwhile;
        False when stopping and the retry time lies beyond the shutdown deadline."""
        self._spool_incoming()
        wait = min(max(self._retry_at - time.monotonic(), 0.0), self.settings.buffer_duration or 0.05, 0.5)
        if not stopping:
            self._stop.wait(wait)
            return True
        if self._retry_at > (self._deadline or 0):
            return False
        time.sleep(wait)
        return True

    def _open(self) -> bool:
        try:
            self.sink.open()
        except Exception as exc:
            self._failure(exc, None)
            return False
        self._opened = True
        return True

    def _spool_incoming(self) -> None:
        if self.spool is not None:
            records = self.queue.drain()
            if records:
                self._to_spool(records)
        self.stats.queue_depth = len(self.queue)

    def _to_spool(self, records: Sequence[Envelope]) -> None:
        assert self.spool is not None
        before = self.spool.dropped
        try:
            self.spool.append([encode(r) for r in records])
        except OSError as exc:  # disk full or gone: the records are lost, loudly
            self._drop("spool write failed", len(records), count_only=True)
            self._log_once("spool-write", "sink %s: cannot write the spool (%s)", self.name, exc)
            return
        self.stats.spooled += len(records)
        if self.spool.dropped > before:
            self._drop("spool full", self.spool.dropped - before, count_only=True)
        self._refresh_stats()

    def _spool_or_drop(self, records: Sequence[Envelope], reason: str) -> None:
        if not records:
            return
        if self.spool is not None:
            self._to_spool(records)
        else:
            self._drop(reason, len(records))

    def _write(self, records: Sequence[Envelope]) -> SinkError | Exception | None:
        started = time.monotonic()
        try:
            self.sink.write_batch(records)
        except Exception as exc:
            return exc
        latency = time.monotonic() - started
        self.stats.sent += len(records)
        self.stats.batches += 1
        self.stats.last_success = time.time()
        self.stats.batch_latency_sum_s += latency
        self._recovered()
        return None

    def _deliver_fresh(self, batch: list[Envelope]) -> None:
        """A batch straight from the queue (the spool is empty)."""
        error = self._write(batch)
        if error is None:
            return
        retry = self._settle(batch, error)
        if not retry:
            return
        if self.spool is not None:
            # Keep the order: the failed records, then everything queued behind them.
            self._to_spool(retry + self.queue.drain())
        else:
            self._pending = retry

    def _deliver_from_spool(self) -> None:
        assert self.spool is not None
        cursor, payloads = self.spool.peek(self.settings.batch_size)
        if not payloads:
            return
        records = []
        for payload in payloads:
            try:
                records.append(decode(payload))
            except Exception as exc:  # a record this version cannot read: count, don't wedge
                self._drop("unreadable in spool", 1)
                self._log_once("unreadable", "sink %s: a spooled record could not be decoded (%s); it is dropped", self.name, exc)
        error = self._write(records) if records else None
        if error is None:
            self.stats.replayed += len(records)
            self.spool.ack(cursor)
            self._refresh_stats()
            return
        retry = self._settle(records, error)
        if retry:
            # Retry just these (a partial failure's subset, or the whole chunk) before moving on.
            self._pending, self._pending_cursor = retry, cursor
        else:
            self.spool.ack(cursor)
            self._refresh_stats()

    def _retry_pending(self) -> None:
        records = self._pending
        self.stats.retried += len(records)
        error = self._write(records)
        retry = [] if error is None else self._settle(records, error)
        self._pending = retry
        if not retry and self._pending_cursor is not None:
            assert self.spool is not None
            self.spool.ack(self._pending_cursor)
            self._pending_cursor = None
            self._refresh_stats()

    def _settle(self, records: Sequence[Envelope], error: Exception) -> list[Envelope]:
        """Count a failed write; return the records worth sending again."""
        self._failure(error, len(records))
        if isinstance(error, PartialFailure):
            stored = len(records) - len(error.failed) - len(error.rejected)
            self.stats.sent += stored
            if error.rejected:
                self._drop("rejected by the store", len(error.rejected))
                self._log_once("rejected", "sink %s: the store refused %d records for good: %s", self.name, len(error.rejected), error)
            return [records[i] for i in error.failed]
        if isinstance(error, SinkError):
            if error.retryable:
                return list(records)
            self._drop("not retryable", len(records))
            self._log_once(f"fatal:{error.category}", "sink %s: %d records dropped, the store refused them: %s", self.name, len(records), error)
            return []
        # An error the sink did not map may be an outage or a record we cannot send: retry a few
        # times, then give the batch up so one bad record cannot block the spool for ever.
        if self._attempt < self.UNEXPECTED_ATTEMPTS:
            return list(records)
        self._drop("unexpected error", len(records))
        self._attempt = 0  # the next batch gets its own attempts
        return []

    # -- failure bookkeeping -------------------------------------------------------------------
    def _failure(self, error: Exception, count: int | None) -> None:
        category = error.category if isinstance(error, SinkError) else ERROR
        self.stats.failed += 1
        self.stats.last_error = f"{category}: {error}"
        self.stats.errors_by_category[category] = self.stats.errors_by_category.get(category, 0) + 1
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        self._attempt += 1
        retry_after = error.retry_after_s if isinstance(error, SinkError) else None
        delay = retry_after if retry_after is not None else self._backoff(self._attempt)
        self._retry_at = time.monotonic() + delay
        if not isinstance(error, SinkError):
            # Not a SinkError: a bug in the sink or an error it does not map. Loud, once.
            self._log_once(f"unexpected:{type(error).__name__}", "sink %s: unexpected error (%s); retrying with backoff", self.name, error, exc_info=error)
        else:
            where = "kept in the spool" if self.spool is not None else "kept in memory"
            what = "opening the sink" if count is None else f"writing {count} records"
            self._log_once(
                f"category:{category}",
                "sink %s: %s failed (%s): %s; records are %s and retried with backoff; further failures are counted",
                self.name, what, category, error, where,
            )
        self._refresh_stats()

    def _recovered(self) -> None:
        if self._failing_since is not None:
            pending = len(self.spool) if self.spool is not None else 0
            log.info(
                "sink %s: delivering again after %.0f s and %d failed attempts (%d records still in the spool)",
                self.name, time.monotonic() - self._failing_since, self._attempt, pending,
            )
            self._failing_since = None
            self._attempt = 0
            self._retry_at = 0.0
            self._logged = {k for k in self._logged if not k.startswith("category:")}

    def _backoff(self, attempt: int) -> float:
        base = min(self.settings.max_backoff, 0.5 * 2 ** min(attempt - 1, 30))
        return random.uniform(base / 2, base)

    def _drop(self, reason: str, n: int, count_only: bool = False) -> None:
        self.stats.dropped += n
        self.stats.dropped_reasons[reason] = self.stats.dropped_reasons.get(reason, 0) + n
        if not count_only:
            self._log_once(f"drop:{reason}", "sink %s: dropping records (%s); further drops are counted, not logged", self.name, reason)
        else:
            self._log_once(f"drop:{reason}", "sink %s: %d records dropped (%s); further drops are counted, not logged", self.name, n, reason)

    def _log_once(self, key: str, msg: str, *args: object, exc_info: BaseException | None = None) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.error(msg, *args, exc_info=exc_info)

    def _refresh_stats(self) -> None:
        s = self.stats
        s.queue_depth = len(self.queue)
        if self.spool is not None:
            s.spool_pending = len(self.spool)
            s.spool_bytes = self.spool.pending_bytes

    def _shutdown(self) -> None:
        """Whatever could not be delivered goes to the spool (or is counted as dropped)."""
        left = self._pending if self._pending_cursor is None else []
        self._pending = []
        self._spool_or_drop(left + self.queue.drain(), "shutdown")
        try:
            if self._opened:
                self.sink.flush()
        except Exception as exc:
            log.error("sink %s: flush at shutdown failed: %s", self.name, exc)
        try:
            self.sink.close()
        except Exception as exc:
            log.error("sink %s: close failed: %s", self.name, exc)
        self._refresh_stats()
        if self.spool is not None:
            pending = len(self.spool)
            self.spool.close()
            if pending:
                log.warning("sink %s: %d records stay in the spool for the next run", self.name, pending)

    def summary(self) -> str:
        s = self.stats
        since = f"{time.time() - s.last_success:.0f}s ago" if s.last_success else "never"
        return (
            f"{self.name}: sent {s.sent}, failed attempts {s.failed}, retried {s.retried}, dropped {s.dropped}"
            f"{' ' + str(s.dropped_reasons) if s.dropped else ''}, queue {s.queue_depth}/{s.queue_capacity}, "
            f"spool {s.spool_pending} records / {s.spool_bytes} bytes, last success {since}"
            f"{', failing: ' + (s.last_error or '') if self._failing_since is not None else ''}"
        )


class SinkHub:
    """Fans records out to every configured sink's worker."""

    def __init__(self, workers: list[SinkWorker]) -> None:
        self.workers = workers

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def submit(self, record: Envelope) -> None:
        for worker in self.workers:
            worker.submit(record)

    def stop(self, deadline_s: float | None = None) -> None:
        threads = [threading.Thread(target=w.stop, args=(deadline_s,), name=f"stop-{w.name}") for w in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def log_summary(self) -> None:
        for worker in self.workers:
            log.info("sink %s", worker.summary())
