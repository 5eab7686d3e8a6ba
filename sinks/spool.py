"""The disk spool a sink's delivery worker keeps records in while its store is unreachable.

Records are opaque bytes, appended in batches to numbered segment files and read back in order.
How far delivery got (the read position) is kept in a small state file, so a restarted exporter
resumes where it stopped. When the spool is full the oldest segments are dropped, and counted.

On disk, in the spool directory (integers little-endian)::

    LOCK                         flock'ed while a Spool has the directory open
    00000000000000000007.seg     frames back to back, no file header; a frame is
                                     u32 payload length | u32 crc32(payload)
                                     | u32 crc32(the 8 bytes before) | payload
    state.json                   {"version": 1, "segment": 7, "offset": 4096}: every record
                                 before that byte of that segment is acknowledged, and every
                                 segment numbered lower is gone (or may be deleted)

The header's own checksum tells a damaged payload (skip that record: its length still leads to
the next frame) from a damaged length (the next frame cannot be found: the rest of the segment
is lost). It also keeps a zero-filled tail, what some filesystems leave after a crash, from
parsing as a run of empty records: crc32(b"") is 0.

A Spool never appends to a segment left by an earlier run: it starts a new one, so whatever a
crash left at the end of an old segment is only ever read (and cut off at recovery).

Threads: one thread appends while another peeks and acknowledges. Three locks, always taken in
this order: ``_append_lock`` (the writer's file), ``_read_lock`` (the reader's files and the state
file), ``_lock`` (the bookkeeping; held for short moments, never across fsync).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import struct
import threading
import zlib
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

log = logging.getLogger(__name__)

FsyncPolicy = Literal["always", "batch", "never"]

_HEADER = struct.Struct("<III")  # payload length, crc32(payload), crc32(the first 8 header bytes)
_LENGTH_CRC = struct.Struct("<II")
_CRC = struct.Struct("<I")
HEADER_BYTES = _HEADER.size
_MAX_PAYLOAD = 0xFFFFFFFF
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")
_STATE = "state.json"
_STATE_TMP = "state.json.tmp"
_LOCK = "LOCK"
_STATE_VERSION = 1
_READ_MIN_BYTES = 64 * 1024
_READ_MAX_BYTES = 16 * 1024 * 1024


class SpoolBusyError(RuntimeError):
    """Another Spool (in this process or another one) has the directory open."""


@dataclass(frozen=True, slots=True)
class SpoolCursor:
    """Where a :meth:`Spool.peek` ended: hand it to :meth:`Spool.ack` once its records are delivered."""

    segment: int  # the segment the peek ended in
    offset: int  # the byte of that segment just after the last record returned (or skipped)
    count: int  # records returned with this cursor
    # Where each record returned from ``segment`` ends: lets an ack count what it acknowledges
    # when part of its range was acknowledged (an overlapping cursor) or dropped meanwhile.
    record_ends: tuple[int, ...] = field(repr=False)
    owner: object = field(repr=False, compare=False)


class _Segment:
    __slots__ = ("seq", "path", "size", "unacked", "sealed", "skips", "warned")

    def __init__(self, seq: int, path: Path) -> None:
        self.seq = seq
        self.path = path
        self.size = 0  # bytes of whole frames (what the reader may read)
        self.unacked = 0  # valid records not yet acknowledged
        self.sealed = False  # no more appends: only the newest segment is not sealed
        # Damaged spans already counted in Spool.corrupt: start offset → offset to resume at.
        self.skips: dict[int, int] = {}
        self.warned = False


def _segment_name(seq: int) -> str:
    return f"{seq:020d}.seg"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Spool:
    """A bounded, crash-safe FIFO of byte records on disk, read with peek / ack.

    Opening takes up what an earlier run left (every record's checksum is checked, torn tails
    are cut, damaged records counted in ``corrupt`` and skipped) and locks the directory:
    a second Spool on it raises :class:`SpoolBusyError` until the first is closed or its
    process is gone.

    ``segment_bytes`` is also held to at most an eighth of ``max_bytes``, since the cap is kept
    by dropping whole segments: a drop then loses at most about an eighth of what the spool holds.
    """

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        fsync: FsyncPolicy = "batch",
        segment_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        if max_bytes <= 0 or segment_bytes <= 0:
            raise ValueError("max_bytes and segment_bytes must be positive")
        if fsync not in ("always", "batch", "never"):
            raise ValueError(f"fsync must be 'always', 'batch' or 'never', not {fsync!r}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.segment_bytes = max(1, min(segment_bytes, max_bytes // 8))
        self.dropped = 0
        self.corrupt = 0

        self._append_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._lock = threading.Lock()
        self._segments: deque[_Segment] = deque()  # oldest first; the read position is in the first
        self._active: _Segment | None = None  # the segment appends go to (the newest, unsealed)
        self._write_fd = -1
        self._read_fds: dict[int, int] = {}  # segment number → descriptor, the reader's own
        self._head_offset = 0  # read position within the first segment
        self._count = 0  # unacknowledged valid records
        self._disk_bytes = 0  # sum of segment sizes
        self._next_seq = 1
        self._drop_logged = False
        self._closed = False
        self._token = object()

        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._lock_directory()
        try:
            self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self._recover()
            except BaseException:
                os.close(self._dir_fd)
                raise
        except BaseException:
            os.close(self._lock_fd)
            raise

    # -- public API -----------------------------------------------------------------------------

    def append(self, payloads: Sequence[bytes]) -> None:
        """Append one batch, in order. When the spool would pass ``max_bytes`` the oldest segments
        are dropped first (counted in ``dropped``); of a batch bigger than the cap on its own only
        the newest records that fit are kept.

        fsync "batch": one write and one fdatasync per call; "always": a write and an fdatasync
        per record (at most one record is torn by a crash, at a few thousand records/s);
        "never": one write, the kernel writes back. On an OSError (disk full) none of the batch
        is kept and the error is raised.
        """
        n = len(payloads)
        if not n:
            return
        # The newest records that fit in the cap on their own.
        first, total = n, 0
        for i in range(n - 1, -1, -1):
            size = len(payloads[i])
            if size > _MAX_PAYLOAD:
                raise ValueError(f"a spool record holds at most {_MAX_PAYLOAD} bytes, not {size}")
            if total + HEADER_BYTES + size > self.max_bytes:
                break
            total += HEADER_BYTES + size
            first = i
        if first == n:  # not even the newest record fits
            self._check_open()
            self._count_drops(n)
            return
        kept = [payloads[i] for i in range(first, n)]
        crc, pack_head, pack_crc = zlib.crc32, _LENGTH_CRC.pack, _CRC.pack
        headers = []
        for payload in kept:
            head = pack_head(len(payload), crc(payload))
            headers.append(head + pack_crc(crc(head)))

        with self._append_lock:
            self._check_open()
            with self._lock:
                doomed, dropped = self._make_room(total)
                active = self._active
                roll = active is None or active.sealed or (active.size > 0 and active.size + total > self.segment_bytes)
            self._count_drops(dropped + first)
            for seg in doomed:
                seg.path.unlink(missing_ok=True)
            if roll or active is None:
                active = self._roll()
            self._write(active, kept, headers)
            with self._lock:
                active.size += total
                active.unacked += len(kept)
                self._disk_bytes += total
                self._count += len(kept)
            if self.fsync == "batch":
                os.fdatasync(self._write_fd)

    def peek(self, max_records: int) -> tuple[SpoolCursor, list[bytes]]:
        """The oldest unacknowledged records (at most ``max_records``), left in the spool: a peek
        without an ack returns them again. Damaged records are skipped (and counted once)."""
        with self._read_lock:
            self._check_open()
            with self._lock:
                snapshot = [(seg, seg.size) for seg in self._segments]
                end_seq, end_offset = self._position()
                per_record = (self._disk_bytes - self._head_offset) // self._count if self._count else _READ_MIN_BYTES
            self._close_read_fds_before(end_seq)
            records: list[bytes] = []
            taken: list[tuple[int, int]] = []  # (segment, records returned from it)
            ends: list[int] = []
            offset = end_offset
            for seg, size in snapshot:
                if len(records) >= max_records:
                    break
                seg_ends: list[int] = []
                try:
                    offset = self._read_segment(seg, offset, size, max_records - len(records), per_record, records, seg_ends)
                except FileNotFoundError:  # dropped since the snapshot, and not open here before
                    break
                end_seq, end_offset, ends = seg.seq, offset, seg_ends
                taken.append((seg.seq, len(seg_ends)))
                if offset < size:
                    break
                offset = 0
            with self._lock:
                # A drop may have removed segments read from: their records are not returned.
                head = self._segments[0].seq if self._segments else self._next_seq
            gone = sum(k for seq, k in taken if seq < head)
            if gone:
                del records[:gone]
            return SpoolCursor(end_seq, end_offset, len(records), tuple(ends), self._token), records

    def ack(self, cursor: SpoolCursor) -> None:
        """The records returned with ``cursor`` are delivered: move the durable read position past
        them and delete the segments fully read. What was dropped meanwhile is left alone."""
        if cursor.owner is not self._token:
            raise ValueError("this cursor comes from another Spool")
        with self._read_lock:
            self._check_open()
            with self._lock:
                retired = self._advance(cursor)
                if retired is None:
                    return
                position = self._position()
            self._write_state(*position)
            for seg in retired:
                fd = self._read_fds.pop(seg.seq, -1)
                if fd >= 0:
                    os.close(fd)
                seg.path.unlink(missing_ok=True)

    def __len__(self) -> int:
        with self._lock:
            return self._count

    @property
    def pending_bytes(self) -> int:
        """Bytes on disk of the unacknowledged records, framing included."""
        with self._lock:
            return self._disk_bytes - self._head_offset

    def close(self) -> None:
        """Flush (fsync per policy), save the read position, close the files. Idempotent."""
        with self._append_lock, self._read_lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._write_fd >= 0:
                    if self.fsync != "never":
                        os.fdatasync(self._write_fd)
                    os.close(self._write_fd)
                    self._write_fd = -1
                for fd in self._read_fds.values():
                    os.close(fd)
                self._read_fds.clear()
                with self._lock:
                    position = self._position()
                self._write_state(*position)
            finally:
                os.close(self._dir_fd)
                os.close(self._lock_fd)  # releases the flock

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- writing --------------------------------------------------------------------------------

    def _make_room(self, total: int) -> tuple[list[_Segment], int]:
        """Drop the oldest segments until ``total`` more bytes fit. Holds ``_lock``."""
        doomed: list[_Segment] = []
        dropped = 0
        segments = self._segments
        while segments and self._disk_bytes + total > self.max_bytes:
            seg = segments.popleft()
            doomed.append(seg)
            dropped += seg.unacked
            self._count -= seg.unacked
            self._disk_bytes -= seg.size
            self._head_offset = 0
            if seg is self._active:
                self._active = None
        return doomed, dropped

    def _count_drops(self, n: int) -> None:
        if not n:
            return
        with self._lock:
            self.dropped += n
        if not self._drop_logged:
            self._drop_logged = True
            log.warning(
                "spool %s is full (%d bytes): dropping the oldest records; further drops are counted, not logged",
                self.directory,
                self.max_bytes,
            )

    def _roll(self) -> _Segment:
        """Start a new segment and make it the one appended to. Holds ``_append_lock``."""
        with self._lock:
            # Numbered and listed at once: a read position saved meanwhile must not pass it.
            seg = _Segment(self._next_seq, self.directory / _segment_name(self._next_seq))
            self._next_seq += 1
            if self._active is not None:
                self._active.sealed = True
            self._active = seg
            self._segments.append(seg)
            retired = self._pop_consumed()
        for old in retired:
            old.path.unlink(missing_ok=True)
        try:
            fd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError:
            with self._lock:
                seg.sealed = True  # empty and without a file: the next append starts another
            raise
        if self.fsync != "never":
            os.fsync(self._dir_fd)  # the new name, or a "durable" record could vanish with its file
        if self._write_fd >= 0:
            os.close(self._write_fd)
        self._write_fd = fd
        return seg

    def _write(self, seg: _Segment, payloads: list[bytes], headers: list[bytes]) -> None:
        fd = self._write_fd
        try:
            if self.fsync == "always":
                for head, payload in zip(headers, payloads, strict=True):
                    _write_all(fd, head + payload)
                    os.fdatasync(fd)
            else:
                parts: list[bytes] = []
                for head, payload in zip(headers, payloads, strict=True):
                    parts.append(head)
                    parts.append(payload)
                _write_all(fd, b"".join(parts))
        except OSError:
            # Disk full or an I/O error: cut what was written of this batch and leave the file,
            # so nothing half-written sits in front of later appends.
            try:
                os.ftruncate(fd, seg.size)
            except OSError:
                pass  # the reader never reads past seg.size; recovery cuts the torn tail
            with self._lock:
                seg.sealed = True
            raise

    # -- reading --------------------------------------------------------------------------------

    def _read_segment(
        self,
        seg: _Segment,
        offset: int,
        size: int,
        want: int,
        per_record: int,
        records: list[bytes],
        ends: list[int],
    ) -> int:
        """Append to ``records`` up to ``want`` valid records of ``seg``, from ``offset`` (a frame
        start) up to ``size``, and where each ends to ``ends``; return the offset reached."""
        if offset >= size:  # nothing to read (perhaps no file yet)
            return offset
        fd = self._read_fds.get(seg.seq)
        if fd is None:
            fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
            self._read_fds[seg.seq] = fd
        crc, unpack = zlib.crc32, _HEADER.unpack_from
        block = min(max(_READ_MIN_BYTES, (want + 1) * per_record), _READ_MAX_BYTES)
        while offset < size and len(ends) < want:
            request = min(size - offset, block)
            buf = os.pread(fd, request, offset)
            view = memoryview(buf)
            length = len(buf)
            pos = 0
            n = 0
            damaged = False
            while len(ends) < want and pos + HEADER_BYTES <= length:
                n, payload_crc, header_crc = unpack(buf, pos)
                if crc(view[pos : pos + 8]) != header_crc:
                    damaged = True
                    break
                end = pos + HEADER_BYTES + n
                if end > length:
                    break
                payload = buf[pos + HEADER_BYTES : end]
                if crc(payload) == payload_crc:
                    records.append(payload)
                    ends.append(offset + end)
                    pos = end
                else:
                    pos = self._skip(seg, offset + pos, offset + end, len(ends)) - offset
            offset += pos
            # No whole frame in a full read up to ``size``, or a short read: the file changed
            # under us (it only grows by whole frames).
            if damaged or (pos == 0 and (length < request or request == size - offset)):
                offset = self._skip(seg, offset, -1, len(ends))
            elif pos == 0:
                block = HEADER_BYTES + n  # a frame bigger than the block
        return offset

    def _skip(self, seg: _Segment, start: int, end: int, valid_before: int) -> int:
        """The frame at ``start`` failed its checksum: return the offset to go on from. ``end`` is
        where the frame ends, or -1 when its length cannot be trusted: then the rest of the
        segment is lost. ``valid_before``: valid records of ``seg`` read before ``start`` by
        this peek. Counted and logged the first time only; known damage is passed silently."""
        with self._lock:
            known = seg.skips.get(start)
            if known is not None:
                return known
            rest = end < 0
            if rest:
                # All the valid records this segment still counts past here are lost, up to its
                # size now; its appends go to a new segment from now on.
                end = seg.size
                seg.sealed = True
                lost = seg.unacked - valid_before
            else:
                lost = 1
            seg.skips[start] = end
            if seg in self._segments:
                seg.unacked -= lost
                self._count -= lost
            self.corrupt += 1
            warn = not seg.warned
            seg.warned = True
        if warn:
            log.warning(
                "spool %s: segment %s: the record at byte %d failed its checksum: %s (further damage in this segment is counted, not logged)",
                self.directory,
                seg.path.name,
                start,
                "the rest of the segment is unreadable" if rest else "skipped",
            )
        return end

    def _close_read_fds_before(self, seq: int) -> None:
        for old in [s for s in self._read_fds if s < seq]:
            os.close(self._read_fds.pop(old))

    # -- acknowledging --------------------------------------------------------------------------

    def _advance(self, cursor: SpoolCursor) -> list[_Segment] | None:
        """Move the read position to ``cursor``; the segments to delete, or None when the cursor
        is behind the read position already. Holds ``_lock``."""
        segments = self._segments
        if not segments:
            return None
        head = segments[0]
        if cursor.segment < head.seq or (cursor.segment == head.seq and cursor.offset <= self._head_offset):
            return None
        retired: list[_Segment] = []
        # A cursor ahead of the read position covers everything in between: the segments before
        # its own were read to their end (only the newest segment grows, and it is the last).
        while segments and segments[0].seq < cursor.segment:
            seg = segments.popleft()
            retired.append(seg)
            self._count -= seg.unacked
            self._disk_bytes -= seg.size
            self._head_offset = 0
        if not segments or segments[0].seq != cursor.segment:  # cannot happen: drops take the oldest first
            return retired
        seg = segments[0]
        acked = len(cursor.record_ends) - bisect_right(cursor.record_ends, self._head_offset)
        seg.unacked -= acked
        self._count -= acked
        self._head_offset = cursor.offset
        retired += self._pop_consumed()
        return retired

    def _pop_consumed(self) -> list[_Segment]:
        """Remove the segments read to their end from the front, except the one appended to:
        only its appender retires it (an append may be on its way into it). Holds ``_lock``."""
        segments = self._segments
        retired: list[_Segment] = []
        while segments and segments[0] is not self._active and self._head_offset >= segments[0].size:
            seg = segments.popleft()
            retired.append(seg)
            self._count -= seg.unacked
            self._disk_bytes -= seg.size
            self._head_offset = 0
        return retired

    def _position(self) -> tuple[int, int]:
        if self._segments:
            return self._segments[0].seq, self._head_offset
        return self._next_seq, 0

    def _write_state(self, seq: int, offset: int) -> None:
        data = json.dumps({"version": _STATE_VERSION, "segment": seq, "offset": offset}).encode()
        tmp = self.directory / _STATE_TMP
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, data)
            if self.fsync != "never":
                os.fsync(fd)
        finally:
            os.close(fd)
        # No fsync of the directory: if the rename is lost with the power, the previous
        # position comes back and records are delivered twice, never lost.
        os.replace(tmp, self.directory / _STATE)

    # -- opening --------------------------------------------------------------------------------

    def _lock_directory(self) -> int:
        fd = os.open(self.directory / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolBusyError(
                f"spool directory {self.directory} is in use: by another exporter process, or by a Spool of this process not closed"
            ) from None
        return fd

    def _read_state(self) -> tuple[int, int]:
        path = self.directory / _STATE
        try:
            state = json.loads(path.read_bytes())
            if state.get("version") != _STATE_VERSION:
                raise ValueError(f"version {state.get('version')!r}")
            seq, offset = int(state["segment"]), int(state["offset"])
            if seq < 0 or offset < 0:
                raise ValueError("negative position")
            return seq, offset
        except FileNotFoundError:
            return 0, 0
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning(
                "spool %s: unreadable read position in %s (%s): delivering again from the oldest record",
                self.directory,
                path,
                exc,
            )
            return 0, 0

    def _recover(self) -> None:
        """Take up what an earlier run left: check every record, cut torn tails, find the read position."""
        (self.directory / _STATE_TMP).unlink(missing_ok=True)
        state_seq, state_offset = self._read_state()
        found = sorted(
            (int(m.group(1)), entry.path) for entry in os.scandir(self.directory) if (m := _SEGMENT_NAME.match(entry.name))
        )
        self._next_seq = max([state_seq] + [seq for seq, _ in found]) + 1
        for seq, name in found:
            path = Path(name)
            if seq < state_seq:  # acknowledged; the deletion was interrupted
                path.unlink()
                continue
            seg, head = self._scan(seq, path, state_offset if seq == state_seq else 0)
            if not self._segments:
                if head >= seg.size:  # read to the end already
                    path.unlink()
                    continue
                self._head_offset = head
            elif seg.size == 0:
                path.unlink()
                continue
            self._segments.append(seg)
            self._count += seg.unacked
            self._disk_bytes += seg.size
        with self._lock:
            doomed, dropped = self._make_room(0)
        for seg in doomed:
            seg.path.unlink(missing_ok=True)
        self._count_drops(dropped)
        if self._segments:
            log.info(
                "spool %s: %d records (%d bytes) from an earlier run to deliver",
                self.directory,
                self._count,
                self._disk_bytes - self._head_offset,
            )

    def _scan(self, seq: int, path: Path, acked_to: int) -> tuple[_Segment, int]:
        """Check every frame of an old segment; cut what a crash left half-written at its end.

        Returns the segment (sealed) and the read position in it: ``acked_to``, or if that is
        not where a frame starts (a damaged state file), the start of the frame holding it, so
        that record is delivered again rather than lost.
        """
        seg = _Segment(seq, path)
        seg.sealed = True
        data = path.read_bytes()
        view = memoryview(data)
        size = len(data)
        crc, unpack = zlib.crc32, _HEADER.unpack_from
        pos = 0
        head = 0
        valid = valid_before_head = 0
        bad: list[tuple[int, int]] = []
        lost = False
        while pos < size:
            if pos <= acked_to:
                head, valid_before_head = pos, valid
            if size - pos < HEADER_BYTES:
                break
            n, payload_crc, header_crc = unpack(data, pos)
            if crc(view[pos : pos + 8]) != header_crc:
                # A zero-filled tail is a write the crash interrupted, anything else is damage.
                lost = data.count(0, pos) != size - pos
                break
            end = pos + HEADER_BYTES + n
            if end > size:
                break
            if crc(view[pos + HEADER_BYTES : end]) == payload_crc:
                valid += 1
            else:
                bad.append((pos, end))
            pos = end
        if pos <= acked_to:
            head, valid_before_head = pos, valid
        if pos < size:
            os.truncate(path, pos)
            if not lost:
                log.info(
                    "spool %s: segment %s ended in an interrupted write: cut %d bytes", self.directory, path.name, size - pos
                )
        seg.size = pos
        seg.unacked = valid - valid_before_head
        seg.skips = {start: end for start, end in bad if start >= head}
        damage = len(seg.skips) + (1 if lost and size > acked_to else 0)
        if damage:
            self.corrupt += damage
            seg.warned = True
            log.warning(
                "spool %s: segment %s: %d records failed their checksum and are skipped%s",
                self.directory,
                path.name,
                len(seg.skips),
                f"; from byte {pos} the segment is unreadable and was cut ({size - pos} bytes)" if lost else "",
            )
        return seg, head

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"spool {self.directory} is closed")
