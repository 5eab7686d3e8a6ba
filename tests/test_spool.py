"""The disk spool: order, peek / ack, restarts and crashes, damage, the size cap, threads.

Real files in tmp_path. Most tests use 50-byte records (62-byte frames) one per append, and
segments of ``PER_SEGMENT`` frames, so where each record sits on disk is known.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import pytest

from sinks.spool import HEADER_BYTES, Spool, SpoolBusyError, SpoolCursor

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD_BYTES = 50
FRAME = HEADER_BYTES + PAYLOAD_BYTES
PER_SEGMENT = 10


def rec(i: int) -> bytes:
    return b"%050d" % i


def recs(start: int, stop: int) -> list[bytes]:
    return [rec(i) for i in range(start, stop)]


def open_spool(directory: Path, fsync: str = "never", per_segment: int = PER_SEGMENT, cap_records: int = 100_000) -> Spool:
    return Spool(directory, cap_records * FRAME, fsync, segment_bytes=per_segment * FRAME)  # type: ignore[arg-type]


def fill(spool: Spool, start: int, stop: int) -> None:
    """One record per append: segments then hold exactly ``per_segment`` records."""
    for i in range(start, stop):
        spool.append([rec(i)])


def drain(spool: Spool, chunk: int = 7) -> list[bytes]:
    out: list[bytes] = []
    while True:
        cursor, records = spool.peek(chunk)
        if not records:
            return out
        out += records
        spool.ack(cursor)


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def frame(payload: bytes) -> bytes:
    head = struct.pack("<II", len(payload), zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def run_child(
    directory: Path, body: str, fsync: str, cap_records: int = 100_000, per_segment: int = PER_SEGMENT
) -> subprocess.Popen[str]:
    """A Python process that opens a Spool on ``directory`` as ``spool`` and runs ``body``."""
    code = textwrap.dedent(
        f"""
        import os, sys, time
        from pathlib import Path
        from sinks.spool import Spool
        rec = lambda i: b"%050d" % i
        spool = Spool(Path({str(directory)!r}), {cap_records * FRAME}, {fsync!r}, segment_bytes={per_segment * FRAME})
        """
    ) + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


# -- order, peek / ack ---------------------------------------------------------------------------


def test_round_trip_keeps_order_across_segments(tmp_path):
    spool = open_spool(tmp_path, per_segment=4)
    sizes = [0, 1, 7, 0, 300, 50, 0, 5000, 3, 0]
    payloads = [bytes([i % 251]) * sizes[i % len(sizes)] for i in range(400)]
    at = 0
    for batch in (1, 3, 10, 37, 1, 2, 100, 46, 200):  # uneven batches, 400 in all
        spool.append(payloads[at : at + batch])
        at += batch
    assert at == 400
    assert len(spool) == 400
    assert spool.pending_bytes == sum(HEADER_BYTES + len(p) for p in payloads)
    assert len(segments(tmp_path)) > 5
    assert drain(spool, chunk=33) == payloads
    assert len(spool) == 0 and spool.pending_bytes == 0
    assert len(segments(tmp_path)) <= 1  # fully read segments are deleted; the one appended to stays
    spool.close()


def test_empty_spool(tmp_path):
    spool = open_spool(tmp_path / "new")
    cursor, records = spool.peek(10)
    assert records == [] and cursor.count == 0
    spool.ack(cursor)
    assert len(spool) == 0 and spool.pending_bytes == 0
    spool.append([])
    assert len(spool) == 0 and segments(tmp_path / "new") == []
    spool.close()
    spool = open_spool(tmp_path / "new")
    assert len(spool) == 0 and spool.peek(10)[1] == []
    spool.close()


def test_empty_payloads_round_trip_and_restart(tmp_path):
    spool = open_spool(tmp_path)
    spool.append([b"", b"x", b""])
    spool.append([b""])
    assert spool.pending_bytes == 4 * HEADER_BYTES + 1
    spool.close()
    spool = open_spool(tmp_path)
    assert len(spool) == 4
    assert drain(spool) == [b"", b"x", b"", b""]
    spool.close()


def test_peek_without_ack_returns_the_same_records(tmp_path):
    spool = open_spool(tmp_path)
    fill(spool, 0, 25)
    first = spool.peek(15)
    again = spool.peek(15)
    assert first[1] == again[1] == recs(0, 15)
    assert first[0] == again[0]
    assert len(spool) == 25
    spool.ack(first[0])
    assert len(spool) == 10
    assert spool.pending_bytes == 10 * FRAME
    spool.ack(again[0])  # the same records twice: nothing more is acknowledged
    assert len(spool) == 10
    assert spool.peek(100)[1] == recs(15, 25)
    spool.close()


def test_overlapping_cursors_acknowledge_each_record_once(tmp_path):
    spool = open_spool(tmp_path)
    fill(spool, 0, 30)
    short, _ = spool.peek(5)
    long, records = spool.peek(12)  # crosses from segment 1 into segment 2
    assert records == recs(0, 12)
    spool.ack(short)
    assert len(spool) == 25
    spool.ack(long)
    assert len(spool) == 18
    spool.ack(short)
    assert len(spool) == 18
    assert spool.peek(100)[1] == recs(12, 30)
    with pytest.raises(ValueError, match="another Spool"):
        other = open_spool(tmp_path / "other")
        try:
            other.ack(long)
        finally:
            other.close()
    spool.close()


def test_peek_sees_appends_to_the_segment_being_read(tmp_path):
    spool = open_spool(tmp_path)
    fill(spool, 0, 3)
    cursor, records = spool.peek(100)
    assert records == recs(0, 3)
    fill(spool, 3, 5)
    spool.ack(cursor)
    assert len(spool) == 2
    assert spool.peek(100)[1] == recs(3, 5)
    spool.close()


def test_records_larger_than_a_read_block(tmp_path):
    spool = Spool(tmp_path, 64 * 1024 * 1024, "never", segment_bytes=1024 * 1024)
    small = [b"s%d" % i for i in range(50)]
    big = [bytes([i]) * (300_000 + i) for i in range(3)]
    spool.append(small[:25] + big + small[25:])
    assert spool.peek(100)[1] == small[:25] + big + small[25:]  # one read
    assert drain(spool, chunk=1) == small[:25] + big + small[25:]  # reads smaller than a record
    spool.close()


def test_thousands_of_small_appends(tmp_path):
    spool = open_spool(tmp_path, fsync="never", per_segment=100)
    fill(spool, 0, 5000)
    assert len(spool) == 5000
    assert len(segments(tmp_path)) == 50
    assert drain(spool, chunk=1000) == recs(0, 5000)
    spool.close()


@pytest.mark.parametrize("fsync", ["always", "batch", "never"])
def test_each_fsync_policy_round_trips(tmp_path, fsync):
    spool = open_spool(tmp_path, fsync=fsync)
    spool.append(recs(0, 15))
    fill(spool, 15, 20)
    cursor, records = spool.peek(8)
    spool.ack(cursor)
    spool.close()
    spool = open_spool(tmp_path, fsync=fsync)
    assert records == recs(0, 8)
    assert spool.peek(100)[1] == recs(8, 20)
    spool.close()


# -- restarts and crashes ------------------------------------------------------------------------


def test_close_and_reopen_resume_at_the_read_position(tmp_path):
    spool = open_spool(tmp_path)
    fill(spool, 0, 35)
    cursor, _ = spool.peek(13)
    spool.ack(cursor)
    spool.close()
    spool.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        spool.append([b"late"])
    with pytest.raises(ValueError, match="closed"):
        spool.peek(1)
    spool = open_spool(tmp_path)
    assert len(spool) == 22
    assert spool.pending_bytes == 22 * FRAME
    assert drain(spool) == recs(13, 35)
    spool.close()


def test_a_restarted_spool_appends_after_what_it_recovered(tmp_path):
    spool = open_spool(tmp_path)
    fill(spool, 0, 5)
    spool.close()
    spool = open_spool(tmp_path)
    fill(spool, 5, 8)
    spool.close()
    spool = open_spool(tmp_path)
    assert drain(spool) == recs(0, 8)
    spool.close()


def test_a_second_spool_on_an_open_directory_is_refused(tmp_path):
    spool = open_spool(tmp_path)
    with pytest.raises(SpoolBusyError, match="in use"):
        open_spool(tmp_path)
    spool.close()
    open_spool(tmp_path).close()


@pytest.mark.parametrize("fsync", ["always", "batch", "never"])
def test_crash_between_append_and_ack(tmp_path, fsync):
    # The child dies without close(): nothing is flushed or saved on the way out.
    child = run_child(
        tmp_path,
        """
        for i in range(0, 40, 4):
            spool.append([rec(j) for j in range(i, i + 4)])
        cursor, records = spool.peek(15)
        spool.ack(cursor)                   # delivered: must not come back
        cursor, records = spool.peek(10)    # peeked but never acknowledged: must come back
        spool.append([rec(40)])
        os._exit(0)
        """,
        fsync,
    )
    assert child.wait(timeout=60) == 0
    spool = open_spool(tmp_path)
    assert len(spool) == 26
    assert drain(spool) == recs(15, 41)
    spool.close()


@pytest.mark.parametrize("fsync", ["always", "batch"])
def test_records_are_in_the_file_once_append_returns(tmp_path, fsync):
    # SIGKILL right after append returned. This shows the records reached the file (the page
    # cache), not that fsync put them on the disk: only pulling the power would show that.
    child = run_child(
        tmp_path,
        """
        spool.append([rec(i) for i in range(100)])
        for i in range(100, 110):
            spool.append([rec(i)])
        print("appended", flush=True)
        time.sleep(60)
        """,
        fsync,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "appended"
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
    spool = open_spool(tmp_path)
    assert len(spool) == 110
    assert drain(spool, chunk=64) == recs(0, 110)
    spool.close()


def test_killed_while_appending_leaves_a_clean_prefix(tmp_path):
    # Killed at some point of a stream of appends, perhaps in the middle of a write(): what
    # comes back is every record up to some point, in order, and nothing counted as damage.
    child = run_child(
        tmp_path,
        """
        n = 0
        while True:
            spool.append([rec(i) for i in range(n, n + 97)])
            n += 97
            print(n, flush=True)
        """,
        "never",
    )
    assert child.stdout is not None
    for _ in range(300):
        appended = int(child.stdout.readline())
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    spool = open_spool(tmp_path)
    records = drain(spool, chunk=1000)
    assert len(records) >= appended
    assert records == recs(0, len(records))
    assert spool.corrupt == 0
    spool.close()


def test_state_pointing_into_a_deleted_segment(tmp_path):
    spool = open_spool(tmp_path)
    fill(spool, 0, 30)
    cursor, _ = spool.peek(4)
    spool.ack(cursor)  # read position: segment 1, byte 4 * FRAME
    spool.close()
    segments(tmp_path)[0].unlink()  # e.g. dropped by a run that crashed before saving its position
    spool = open_spool(tmp_path)
    assert len(spool) == 20
    assert drain(spool) == recs(10, 30)
    spool.close()


def test_state_from_before_drops_of_a_later_run(tmp_path):
    # The child acknowledges 3 records (state: segment 1), then appends until segment 1 and
    # more are dropped, and dies without saving its position again.
    child = run_child(
        tmp_path,
        """
        for i in range(60):
            spool.append([rec(i)])
            if i == 19:
                cursor, records = spool.peek(3)
                spool.ack(cursor)
        print(len(spool), spool.dropped, flush=True)
        os._exit(0)
        """,
        "batch",
        cap_records=40,
    )
    assert child.stdout is not None
    kept, dropped = map(int, child.stdout.readline().split())
    assert child.wait(timeout=60) == 0
    assert dropped > 2 and kept + dropped + 3 == 60
    assert json.loads((tmp_path / "state.json").read_text())["segment"] == 1
    assert int(segments(tmp_path)[0].stem) > 1  # segment 1 is gone
    spool = open_spool(tmp_path, cap_records=40)
    assert len(spool) == kept
    assert drain(spool) == recs(60 - kept, 60)
    spool.close()


def test_unreadable_state_file_delivers_everything_again(tmp_path, caplog):
    spool = open_spool(tmp_path)
    fill(spool, 0, 12)
    cursor, _ = spool.peek(5)
    spool.ack(cursor)
    spool.close()
    (tmp_path / "state.json").write_bytes(b'{"version": 1, "segm')
    with caplog.at_level(logging.WARNING, logger="sinks.spool"):
        spool = open_spool(tmp_path)
    assert "unreadable read position" in caplog.text
    assert drain(spool) == recs(0, 12)  # at least once: delivered again rather than lost
    spool.close()


def test_state_offset_inside_a_frame_delivers_that_record_again(tmp_path):
    spool = open_spool(tmp_path)
    fill(spool, 0, 6)
    spool.close()
    (tmp_path / "state.json").write_text(json.dumps({"version": 1, "segment": 1, "offset": 2 * FRAME + 5}))
    spool = open_spool(tmp_path)
    assert drain(spool) == recs(2, 6)
    spool.close()


def test_a_smaller_cap_after_restart_drops_the_oldest(tmp_path):
    spool = open_spool(tmp_path, per_segment=5)
    fill(spool, 0, 40)
    spool.close()
    spool = open_spool(tmp_path, per_segment=5, cap_records=20)
    assert spool.dropped == 20 and len(spool) == 20  # 4 whole segments of 5
    assert spool.pending_bytes == 20 * FRAME
    assert drain(spool) == recs(20, 40)
    spool.close()


# -- damage --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cut",
    [1, PAYLOAD_BYTES - 1, PAYLOAD_BYTES, PAYLOAD_BYTES + 5, FRAME - 1],
    ids=["payload-1-byte", "payload-most", "header-whole", "header-7-bytes", "header-1-byte"],
)
def test_torn_tail_is_cut(tmp_path, cut, caplog):
    spool = open_spool(tmp_path)
    fill(spool, 0, 25)  # the last segment holds 5 records
    spool.close()
    last = segments(tmp_path)[-1]
    os.truncate(last, 5 * FRAME - cut)  # a crash in the middle of writing the last record
    with caplog.at_level(logging.INFO, logger="sinks.spool"):
        spool = open_spool(tmp_path)
    assert "interrupted write" in caplog.text
    assert spool.corrupt == 0
    assert last.stat().st_size == 4 * FRAME
    assert len(spool) == 24
    fill(spool, 100, 103)
    assert drain(spool) == recs(0, 24) + recs(100, 103)
    spool.close()


def test_zero_filled_tail_is_a_torn_write_not_damage(tmp_path):
    spool = open_spool(tmp_path)
    fill(spool, 0, 25)
    spool.close()
    last = segments(tmp_path)[-1]
    with last.open("ab") as f:
        f.write(bytes(4096))  # what some filesystems show after a crash: a size without data
    spool = open_spool(tmp_path)
    assert spool.corrupt == 0
    assert last.stat().st_size == 5 * FRAME
    assert drain(spool) == recs(0, 25)
    spool.close()


def test_damaged_payload_skips_that_record_only(tmp_path, caplog):
    spool = open_spool(tmp_path)
    fill(spool, 0, 30)
    spool.close()
    middle = segments(tmp_path)[1]
    flip(middle, 3 * FRAME + HEADER_BYTES + 20)  # record 13's payload
    flip(middle, 6 * FRAME + HEADER_BYTES + 49)  # record 16's last byte
    with caplog.at_level(logging.WARNING, logger="sinks.spool"):
        spool = open_spool(tmp_path)
    assert spool.corrupt == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and middle.name in warnings[0].getMessage()  # once per segment
    assert len(spool) == 28
    expected = [r for i, r in enumerate(recs(0, 30)) if i not in (13, 16)]
    assert spool.peek(100)[1] == expected
    assert spool.peek(100)[1] == expected  # skipped again without counting again
    assert spool.corrupt == 2
    assert drain(spool) == expected
    assert len(spool) == 0
    spool.close()


def test_damaged_length_loses_the_rest_of_that_segment_only(tmp_path, caplog):
    spool = open_spool(tmp_path)
    fill(spool, 0, 30)
    spool.close()
    middle = segments(tmp_path)[1]
    flip(middle, 4 * FRAME + 1)  # record 14's length: records 14..19 cannot be found
    with caplog.at_level(logging.WARNING, logger="sinks.spool"):
        spool = open_spool(tmp_path)
    assert spool.corrupt == 1
    assert "unreadable" in caplog.text
    assert middle.stat().st_size == 4 * FRAME
    assert len(spool) == 24
    assert drain(spool) == recs(0, 14) + recs(20, 30)
    spool.close()


def test_damage_in_the_acknowledged_part_is_not_counted(tmp_path):
    spool = open_spool(tmp_path)
    fill(spool, 0, 10)
    cursor, _ = spool.peek(5)
    spool.ack(cursor)
    spool.close()
    flip(segments(tmp_path)[0], 2 * FRAME + HEADER_BYTES)  # record 2: delivered already
    spool = open_spool(tmp_path)
    assert spool.corrupt == 0
    assert drain(spool) == recs(5, 10)
    spool.close()


def test_damage_found_while_open(tmp_path):
    spool = open_spool(tmp_path)
    fill(spool, 0, 30)
    second = segments(tmp_path)[1]
    flip(second, 5 * FRAME + HEADER_BYTES + 1)  # record 15's payload, behind the spool's back
    cursor, records = spool.peek(100)
    assert records == recs(0, 15) + recs(16, 30)
    assert spool.corrupt == 1 and len(spool) == 29
    assert spool.peek(100)[1] == records and spool.corrupt == 1
    spool.ack(cursor)
    assert len(spool) == 0 and spool.pending_bytes == 0
    spool.close()


def test_damaged_length_found_while_open_in_the_segment_appended_to(tmp_path):
    spool = open_spool(tmp_path)
    fill(spool, 0, 15)  # segment 2 (records 10..14) is the one appended to
    flip(segments(tmp_path)[1], 2 * FRAME)  # record 12's length
    assert spool.peek(100)[1] == recs(0, 12)
    assert spool.corrupt == 1 and len(spool) == 12
    fill(spool, 15, 18)  # must not land behind the damage: a new segment is started
    assert len(segments(tmp_path)) == 3
    assert drain(spool) == recs(0, 12) + recs(15, 18)
    assert spool.corrupt == 1
    spool.close()


def test_garbage_tail_is_damage(tmp_path):
    spool = open_spool(tmp_path)
    fill(spool, 0, 5)
    spool.close()
    with segments(tmp_path)[0].open("ab") as f:
        f.write(b"\x01" * 100)
    spool = open_spool(tmp_path)
    assert spool.corrupt == 1
    assert drain(spool) == recs(0, 5)
    spool.close()


def test_frames_are_length_crc_headercrc_payload(tmp_path):
    spool = open_spool(tmp_path)
    spool.append([b"hello", b""])
    spool.close()
    assert segments(tmp_path)[0].read_bytes() == frame(b"hello") + frame(b"")
    assert frame(b"")[:HEADER_BYTES] != bytes(HEADER_BYTES)  # zeros never parse as a record


# -- the size cap --------------------------------------------------------------------------------


def test_cap_drops_the_oldest_whole_segments_and_counts_them(tmp_path, caplog):
    spool = Spool(tmp_path, 32 * FRAME, "never", segment_bytes=4 * FRAME)
    with caplog.at_level(logging.WARNING, logger="sinks.spool"):
        fill(spool, 0, 100)
    # 8 segments of 4 fill the cap; each append past it drops one segment of 4, so drops
    # happen at records 32, 36, ..., 96: 17 segments.
    assert spool.dropped == 68
    assert len(spool) == 32
    assert spool.pending_bytes <= 32 * FRAME
    assert sum(p.stat().st_size for p in segments(tmp_path)) <= 32 * FRAME
    assert [r.levelno for r in caplog.records].count(logging.WARNING) == 1  # the first drop only
    assert drain(spool) == recs(68, 100)
    spool.close()


def test_cap_counts_the_unacknowledged_part_of_a_partly_read_segment(tmp_path):
    spool = Spool(tmp_path, 32 * FRAME, "never", segment_bytes=4 * FRAME)
    fill(spool, 0, 32)
    cursor, _ = spool.peek(3)
    spool.ack(cursor)  # segment 1: one record left
    fill(spool, 32, 33)
    assert spool.dropped == 1
    assert len(spool) == 29
    assert drain(spool) == recs(4, 33)
    spool.close()


def test_a_batch_larger_than_the_cap_keeps_its_newest_records(tmp_path):
    spool = Spool(tmp_path, 32 * FRAME, "never", segment_bytes=4 * FRAME)
    fill(spool, 0, 5)
    spool.append(recs(100, 150))
    assert spool.dropped == 5 + 18
    assert len(spool) == 32
    assert drain(spool) == recs(118, 150)
    spool.append([b"x" * (40 * FRAME)])  # cannot fit at all
    assert spool.dropped == 24 and len(spool) == 0
    spool.close()


def test_stale_cursor_after_its_records_were_dropped(tmp_path):
    spool = Spool(tmp_path, 32 * FRAME, "never", segment_bytes=4 * FRAME)
    fill(spool, 0, 8)
    cursor, records = spool.peek(3)
    assert records == recs(0, 3)
    fill(spool, 8, 36)  # record 32 drops segment 1 (records 0..3)
    assert spool.dropped == 4 and len(spool) == 32
    spool.ack(cursor)
    assert len(spool) == 32 and spool.dropped == 4
    assert spool.peek(1)[1] == [rec(4)]
    spool.close()


def test_cursor_partly_dropped_acknowledges_what_still_exists(tmp_path):
    spool = Spool(tmp_path, 32 * FRAME, "never", segment_bytes=4 * FRAME)
    fill(spool, 0, 32)
    cursor, records = spool.peek(6)  # records 0..3 in segment 1, 4..5 in segment 2
    assert records == recs(0, 6)
    fill(spool, 32, 33)  # drops segment 1
    assert spool.dropped == 4 and len(spool) == 29
    spool.ack(cursor)  # acknowledges 4 and 5 only
    assert len(spool) == 27
    assert drain(spool) == recs(6, 33)
    spool.close()


# -- threads -------------------------------------------------------------------------------------


def _move_concurrently(spool: Spool, total: int, batch: int, chunk: int = 700, delivery_s: float = 0.0) -> list[bytes]:
    def producer() -> None:
        for start in range(0, total, batch):
            spool.append([b"%08d" % i + b"." * 56 for i in range(start, min(total, start + batch))])

    received: list[bytes] = []
    thread = threading.Thread(target=producer)
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        cursor, records = spool.peek(chunk)
        if records:
            received += records
            time.sleep(delivery_s)
            spool.ack(cursor)
        elif not thread.is_alive():
            if not spool.peek(1)[1]:
                break
        else:
            time.sleep(0.0005)
    thread.join()
    return received


def test_concurrent_appender_and_consumer_move_100k_records(tmp_path):
    total = 100_000
    spool = Spool(tmp_path, 1 << 30, "never", segment_bytes=64 * 1024)
    received = _move_concurrently(spool, total, 250)
    assert len(received) == total
    assert received == [b"%08d" % i + b"." * 56 for i in range(total)]
    assert spool.dropped == 0 and spool.corrupt == 0
    assert len(spool) == 0 and spool.pending_bytes == 0
    assert len(segments(tmp_path)) <= 1
    spool.close()


def test_concurrent_appender_and_consumer_with_drops(tmp_path):
    total = 50_000
    spool = Spool(tmp_path, 256 * 1024, "never", segment_bytes=16 * 1024)
    received = _move_concurrently(spool, total, 100, chunk=50, delivery_s=0.001)  # a store slower than the producer
    numbers = [int(r[:8]) for r in received]
    assert numbers == sorted(set(numbers))  # in order, no duplicates
    assert numbers[-1] == total - 1
    assert spool.dropped > 0
    # A record can be returned by a peek and dropped before its ack: counted in both.
    assert len(numbers) + spool.dropped >= total
    assert len(spool) == 0
    spool.close()


def test_cursor_is_a_value(tmp_path):
    spool = open_spool(tmp_path)
    fill(spool, 0, 3)
    cursor, _ = spool.peek(2)
    assert isinstance(cursor, SpoolCursor)
    assert (cursor.segment, cursor.offset, cursor.count) == (1, 2 * FRAME, 2)
    spool.close()
