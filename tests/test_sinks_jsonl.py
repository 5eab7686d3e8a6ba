import io
import json

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
