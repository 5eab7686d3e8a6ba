"""The delivery worker's own logic, driven by scripted sinks (the stores themselves are tested
for real in tests/test_sink_*.py and tests/test_sink_faults.py)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import pytest

from exporter.models import Envelope
from sinks.base import BoundedQueue, SinkHub, SinkWorker
from sinks.protocol import AUTH, THROTTLED, UNREACHABLE, PartialFailure, SinkError
from sinks.settings import DeliverySettings
from sinks.spool import Spool
from tests.records import make_record
from tests.test_pipeline import wait_for


class ScriptedSink:
    """Stores what it is given, after failing as the script says: each call pops the next
    entry; an exception is raised, a callable decides from the batch, None stores."""

    name = "scripted"

    def __init__(self, script: Sequence[object] = ()) -> None:
        self.script = list(script)
        self.stored: list[int] = []
        self.calls: list[list[int]] = []
        self.call_times: list[float] = []
        self.opened = self.closed = False
        self.lock = threading.Lock()

    def open(self) -> None:
        self.opened = True

    def write_batch(self, records: Sequence[Envelope]) -> None:
        seqs = [r.seq for r in records]  # type: ignore[attr-defined]
        with self.lock:
            self.calls.append(seqs)
            self.call_times.append(time.monotonic())
            step = self.script.pop(0) if self.script else None
        if callable(step):
            step = step(seqs)
        if isinstance(step, PartialFailure):
            bad = set(step.failed) | set(step.rejected)
            with self.lock:
                self.stored.extend(s for i, s in enumerate(seqs) if i not in bad)
            raise step
        if isinstance(step, Exception):
            raise step
        with self.lock:
            self.stored.extend(seqs)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def settings(**kw: object) -> DeliverySettings:
    base: dict[str, object] = {"batch_size": 10, "buffer_duration": 0.02, "max_backoff": 0.05, "shutdown_timeout": 5, "timeout": 1, "spool": False}
    base.update(kw)
    return DeliverySettings.model_validate(base)


def down(category: str = UNREACHABLE, retry_after_s: float | None = None) -> SinkError:
    return SinkError("store down", retryable=True, category=category, retry_after_s=retry_after_s)


def feed(worker: SinkWorker, seqs: range) -> None:
    for seq in seqs:
        worker.submit(make_record(seq=seq, ts=1_700_000_000.0 + seq))


def test_batches_by_size_and_time_and_closes():
    sink = ScriptedSink()
    worker = SinkWorker(sink, settings(batch_size=10, buffer_duration=0.05))
    worker.start()
    feed(worker, range(1, 26))
    wait_for(lambda: len(sink.stored) == 25)
    worker.stop()
    assert sink.stored == list(range(1, 26))
    assert [len(c) for c in sink.calls][:2] == [10, 10]  # full batches first, the rest by time
    assert worker.stats.sent == 25 and worker.stats.dropped == 0 and sink.closed


def test_retries_in_memory_without_spool_and_keeps_order():
    sink = ScriptedSink([down(), down(), None])
    worker = SinkWorker(sink, settings())
    worker.start()
    feed(worker, range(1, 31))
    wait_for(lambda: len(sink.stored) == 30)
    worker.stop()
    assert sink.stored == list(range(1, 31))
    assert worker.stats.failed == 2 and worker.stats.retried >= 10 and worker.stats.dropped == 0


def test_retry_after_is_honoured():
    sink = ScriptedSink([down(THROTTLED, retry_after_s=0.4), None])
    worker = SinkWorker(sink, settings(max_backoff=0.01))
    worker.start()
    feed(worker, range(1, 4))
    wait_for(lambda: len(sink.stored) == 3)
    worker.stop()
    assert sink.call_times[1] - sink.call_times[0] >= 0.39
    assert worker.stats.errors_by_category == {THROTTLED: 1}


def test_partial_failure_resends_only_failed_and_counts_rejected():
    first = PartialFailure("2 failed, 1 rejected", failed=[1, 3], rejected=[2])
    sink = ScriptedSink([first, None])
    worker = SinkWorker(sink, settings(batch_size=5, buffer_duration=1.0))
    worker.start()
    feed(worker, range(1, 6))
    wait_for(lambda: len(sink.calls) >= 2)
    worker.stop()
    assert sink.calls[0] == [1, 2, 3, 4, 5]
    assert sink.calls[1] == [2, 4]  # only the failed ones
    assert sorted(sink.stored) == [1, 2, 4, 5]
    assert worker.stats.dropped == 1 and worker.stats.dropped_reasons == {"rejected by the store": 1}
    assert worker.stats.sent == 4


def test_not_retryable_is_dropped_and_counted(caplog):
    sink = ScriptedSink([SinkError("bad request", retryable=False, category="rejected"), None])
    worker = SinkWorker(sink, settings(batch_size=5, buffer_duration=1.0))
    worker.start()
    feed(worker, range(1, 11))
    wait_for(lambda: len(sink.calls) == 2)
    worker.stop()
    assert sink.stored == [6, 7, 8, 9, 10]
    assert worker.stats.dropped_reasons == {"not retryable": 5}
    assert sum("refused them" in r.getMessage() for r in caplog.records) == 1


def test_queue_overflow_drops_oldest_and_counts(caplog):
    sink = ScriptedSink()
    worker = SinkWorker(sink, settings(queue_size=5, batch_size=5))
    feed(worker, range(1, 9))  # not started: the queue holds 5, the 3 oldest go
    assert worker.stats.dropped_reasons == {"queue full": 3}
    worker.start()
    worker.stop()
    assert sink.stored == [4, 5, 6, 7, 8]
    assert sum("queue full" in r.getMessage() for r in caplog.records) == 1


def test_one_error_line_per_kind_then_recovery_line(caplog):
    sink = ScriptedSink([down(AUTH)] * 5 + [None])
    worker = SinkWorker(sink, settings())
    worker.start()
    feed(worker, range(1, 3))
    wait_for(lambda: len(sink.stored) == 2)
    worker.stop()
    errors = [r for r in caplog.records if r.levelname == "ERROR" and "sink scripted" in r.getMessage()]
    assert len(errors) == 1 and "(auth)" in errors[0].getMessage()
    assert any("delivering again" in r.getMessage() for r in caplog.records)
    assert worker.stats.errors_by_category == {AUTH: 5}


def test_shutdown_deadline_without_spool_counts_what_is_left():
    sink = ScriptedSink([down()] * 10_000)
    worker = SinkWorker(sink, settings(max_backoff=0.02))
    worker.start()
    feed(worker, range(1, 31))
    started = time.monotonic()
    worker.stop(deadline_s=0.3)
    assert time.monotonic() - started < 3
    assert worker.stats.sent == 0 and worker.stats.dropped == 30
    assert worker.stats.dropped_reasons == {"shutdown": 30}


def test_failed_batch_and_queue_go_to_spool_then_replay_in_order(tmp_path):
    sink = ScriptedSink([down()] * 3)
    spool = Spool(tmp_path / "spool", 10_000_000, "batch")
    worker = SinkWorker(sink, settings(spool=True, batch_size=10), spool)
    worker.start()
    feed(worker, range(1, 51))
    wait_for(lambda: len(sink.stored) == 50)
    worker.stop()
    assert sink.stored == list(range(1, 51))  # exactly once, in order
    assert worker.stats.spooled >= 10 and worker.stats.replayed >= 10
    assert worker.stats.dropped == 0 and worker.stats.spool_pending == 0


def test_spool_survives_a_restart(tmp_path):
    directory = tmp_path / "spool"
    dead = ScriptedSink([down()] * 10_000)
    worker = SinkWorker(dead, settings(spool=True, max_backoff=0.02), Spool(directory, 10_000_000, "batch"))
    worker.start()
    feed(worker, range(1, 41))
    wait_for(lambda: worker.stats.spooled >= 10)
    worker.stop(deadline_s=0.2)  # the store never came back: everything stays on disk
    assert dead.stored == [] and worker.stats.dropped == 0
    assert worker.stats.spool_pending == 40

    alive = ScriptedSink()
    worker = SinkWorker(alive, settings(spool=True), Spool(directory, 10_000_000, "batch"))
    worker.start()
    wait_for(lambda: len(alive.stored) == 40)
    feed(worker, range(41, 46))
    wait_for(lambda: len(alive.stored) == 45)
    worker.stop()
    assert alive.stored == list(range(1, 46))
    assert worker.stats.spool_pending == 0


def test_partial_failure_from_spool_acks_after_the_subset_is_stored(tmp_path):
    script: list[object] = [down(), PartialFailure("one failed", failed=[0]), None]
    sink = ScriptedSink(script)
    spool = Spool(tmp_path / "spool", 10_000_000, "batch")
    worker = SinkWorker(sink, settings(spool=True, batch_size=5, buffer_duration=1.0), spool)
    worker.start()
    feed(worker, range(1, 6))
    wait_for(lambda: len(sink.stored) == 5)
    worker.stop()
    assert sorted(sink.stored) == [1, 2, 3, 4, 5]
    assert sink.calls[-1] == [1]  # the subset alone
    assert len(spool) == 0


def test_spool_full_drops_oldest_and_counts(tmp_path):
    one = len(make_record(seq=1).json_bytes()) + 1 + 64  # payload + tag + framing headroom
    sink = ScriptedSink([down()] * 10_000)
    spool = Spool(tmp_path / "spool", one * 20, "never", segment_bytes=one * 5)
    worker = SinkWorker(sink, settings(spool=True, max_backoff=0.02, batch_size=10), spool)
    worker.start()
    feed(worker, range(1, 101))
    wait_for(lambda: worker.stats.spooled + worker.stats.dropped_reasons.get("queue full", 0) >= 100)
    worker.stop(deadline_s=0.1)
    assert worker.stats.dropped_reasons.get("spool full", 0) > 0
    assert worker.stats.dropped == worker.stats.dropped_reasons["spool full"]
    assert worker.stats.dropped + worker.stats.spool_pending == 100


def test_sink_that_cannot_open_spools_until_it_can(tmp_path):
    class LateSink(ScriptedSink):
        tries = 0

        def open(self) -> None:
            LateSink.tries += 1
            if LateSink.tries < 3:
                raise down()
            super().open()

    sink = LateSink()
    worker = SinkWorker(sink, settings(spool=True), Spool(tmp_path / "s", 10_000_000, "batch"))
    worker.start()
    feed(worker, range(1, 21))
    wait_for(lambda: len(sink.stored) == 20)
    worker.stop()
    assert sink.stored == list(range(1, 21)) and LateSink.tries == 3


def test_unexpected_exceptions_are_retried_then_given_up():
    sink = ScriptedSink([RuntimeError("bug")] * SinkWorker.UNEXPECTED_ATTEMPTS + [None] * 10)
    worker = SinkWorker(sink, settings(batch_size=5, buffer_duration=1.0))
    worker.start()
    feed(worker, range(1, 6))
    wait_for(lambda: worker.stats.dropped == 5)
    feed(worker, range(6, 11))
    wait_for(lambda: len(sink.stored) == 5)
    worker.stop()
    assert worker.stats.dropped_reasons == {"unexpected error": 5}
    assert sink.stored == [6, 7, 8, 9, 10]


def test_bounded_queue_wakes_consumer_when_batch_is_full():
    q = BoundedQueue(capacity=100, batch_size=3)
    got = []
    t = threading.Thread(target=lambda: got.append(q.get_batch(3, wait_s=10)))
    t.start()
    time.sleep(0.05)
    started = time.monotonic()
    for i in range(3):
        q.put(make_record(seq=i))
    t.join(5)
    assert time.monotonic() - started < 2
    assert [r.seq for r in got[0]] == [0, 1, 2]


@pytest.mark.parametrize("blocked_s", [1.0])
def test_a_hung_store_never_blocks_submit(blocked_s, frozen_heap):
    release = threading.Event()

    def hang(_seqs: list[int]) -> None:
        release.wait(blocked_s)

    sink = ScriptedSink([hang])
    worker = SinkWorker(sink, settings(batch_size=1))
    worker.start()
    feed(worker, range(1, 2))
    wait_for(lambda: sink.calls)
    started = time.monotonic()
    feed(worker, range(2, 2002))
    assert time.monotonic() - started < 0.5  # 2000 submits while the sink hangs
    release.set()
    wait_for(lambda: len(sink.stored) == 2001)
    worker.stop()


def test_summary_line_has_the_counters(caplog):
    sink = ScriptedSink([down(), None])
    worker = SinkWorker(sink, settings())
    worker.start()
    feed(worker, range(1, 6))
    wait_for(lambda: len(sink.stored) == 5)
    hub = SinkHub([worker])
    with caplog.at_level(logging.INFO, logger="sinks.base"):
        hub.log_summary()
    worker.stop()
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sink scripted: sent")]
    assert "sent 5" in line and "failed attempts 1" in line and "dropped 0" in line and "queue 0/100000" in line
