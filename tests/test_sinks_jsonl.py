import io
import json
import threading
import time

import pytest

from sinks.base import BoundedQueue, SinkError, SinkWorker
from sinks.jsonl import JsonlSettings, JsonlSink, StdoutSettings, StdoutSink
from tests.records import make_record


def test_jsonl_writes_one_record_per_line(tmp_path):
    sink = JsonlSink(JsonlSettings(path=tmp_path / "out" / "s.jsonl"))
    sink.open()
    records = [make_record(seq=i) for i in range(1, 4)]
    sink.write_batch(records)
    sink.close()
    lines = (tmp_path / "out" / "s.jsonl").read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3]
    assert json.loads(lines[0]) == json.loads(records[0].model_dump_json())


def test_jsonl_rotation_keeps_every_record(tmp_path):
    path = tmp_path / "s.jsonl"
    one = len(make_record().model_dump_json()) + 1
    sink = JsonlSink(JsonlSettings(path=path, max_bytes=one * 3, backups=10))
    sink.open()
    for i in range(1, 11):
        sink.write_batch([make_record(seq=i)])
    sink.close()
    files = sorted(tmp_path.iterdir())
    assert all(f.stat().st_size <= one * 3 for f in files)
    seqs = sorted(json.loads(line)["seq"] for f in files for line in f.read_text().splitlines())
    assert seqs == list(range(1, 11))
    # The newest records are in the live file, the oldest in the highest-numbered backup.
    assert json.loads(path.read_text().splitlines()[-1])["seq"] == 10


def test_jsonl_rotation_drops_beyond_backups(tmp_path):
    path = tmp_path / "s.jsonl"
    one = len(make_record().model_dump_json()) + 1
    sink = JsonlSink(JsonlSettings(path=path, max_bytes=one, backups=2))
    sink.open()
    for i in range(1, 6):
        sink.write_batch([make_record(seq=i)])
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl", "s.jsonl.1", "s.jsonl.2"]
    assert json.loads((tmp_path / "s.jsonl.2").read_text())["seq"] == 3


def test_stdout_sink():
    stream = io.BytesIO()
    sink = StdoutSink(StdoutSettings(), stream=stream)
    sink.open()
    sink.write_batch([make_record(seq=7)])
    assert json.loads(stream.getvalue())["seq"] == 7


class FlakySink:
    name = "flaky"

    def __init__(self, failures: int, retryable: bool = True) -> None:
        self.failures = failures
        self.retryable = retryable
        self.written: list[int] = []
        self.calls = 0
        self.closed = False

    def open(self) -> None:
        pass

    def write_batch(self, records) -> None:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise SinkError("store down", retryable=self.retryable, retry_after_s=0.01)
        self.written.extend(r.seq for r in records)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_worker_batches_retries_and_flushes_on_stop():
    sink = FlakySink(failures=2)
    worker = SinkWorker(sink, queue_size=100, batch_size=10, buffer_duration_s=0.05)
    worker.start()
    for i in range(1, 26):
        worker.submit(make_record(seq=i))
    worker.stop(deadline_s=5)
    assert sink.written == list(range(1, 26))
    assert worker.stats.sent == 25
    assert worker.stats.failed == 2 and worker.stats.retried == 2
    assert worker.stats.dropped == 0
    assert sink.closed


def test_worker_counts_non_retryable_and_queue_overflow():
    sink = FlakySink(failures=1, retryable=False)
    worker = SinkWorker(sink, queue_size=5, batch_size=5, buffer_duration_s=0.01)
    for i in range(1, 9):  # not started: the queue fills up, the 3 oldest go
        worker.submit(make_record(seq=i))
    assert worker.stats.dropped == 3 and worker.stats.dropped_reasons == {"queue full": 3}
    worker.start()
    worker.stop(deadline_s=5)
    # the first batch (4..8) was refused for good: counted, not retried
    assert worker.stats.dropped == 8
    assert worker.stats.dropped_reasons["not retryable"] == 5
    assert sink.written == []


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


@pytest.mark.parametrize("deadline", [0.2])
def test_stop_deadline_counts_undelivered(deadline):
    sink = FlakySink(failures=10**9)
    worker = SinkWorker(sink, queue_size=100, batch_size=10, buffer_duration_s=0.01, max_backoff_s=0.05)
    worker.start()
    for i in range(30):
        worker.submit(make_record(seq=i))
    started = time.monotonic()
    worker.stop(deadline_s=deadline)
    assert time.monotonic() - started < deadline + 2
    assert worker.stats.dropped == 30
    assert worker.stats.sent == 0
