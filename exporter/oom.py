"""OOM kills from the kernel log (/dev/kmsg), mapped to the memory cgroup of the victim.

The kernel reports a memory cgroup OOM in a block of lines (mm/oom_kill.c dump_header and
__oom_kill_process, mm/memcontrol.c). The lines that matter:

* every kernel: ``<comm> invoked oom-killer: gfp_mask=..., order=0, oom_score_adj=0`` starts it;
* older kernels (the "legacy" format, until about 5.0): ``Task in <task memcg> killed as a
  result of limit of <oom memcg>`` names the cgroups, and ``Killed process <pid> (<comm>)
  total-vm:...`` the victim;
* newer kernels (from 4.19 on, alone since about 5.0): one summary line ``oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),
  cpuset=<name>,mems_allowed=0,oom_memcg=<path>,task_memcg=<path>,task=<comm>,pid=<pid>,uid=<uid>``
  (``global_oom`` instead of ``oom_memcg=`` for a machine-wide OOM), followed by
  ``Memory cgroup out of memory: Killed process <pid> (<comm>) ...``.

Cgroup paths are those of the memory controller's hierarchy: on cgroup v1 and hybrid hosts the
v1 memory path, on cgroup v2 the unified path — in both cases the container's name.

/dev/kmsg (Documentation/ABI/testing/dev-kmsg): each read() returns one record
``<prefix>,<seq>,<usec>,<flags>[,...];<text>\\n`` followed by `` KEY=value`` dictionary lines;
non-printable bytes come escaped as ``\\xNN``. A read fails with EPIPE when the records at the
reader's position were overwritten (the reader then continues with the oldest one left).
Userspace may write to /dev/kmsg, but never with facility 0 (kernel): only facility-0 records
are parsed, so a process cannot fake an OOM.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import select
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from exporter.clock import Clock

log = logging.getLogger(__name__)

# -- records ----------------------------------------------------------------------------------------
_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")


def unescape(text: bytes) -> str:
    """kmsg's ``\\xNN`` escapes → the bytes they stand for, decoded as UTF-8."""
    return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), text).decode("utf-8", "replace")


@dataclass(frozen=True)
class KmsgRecord:
    facility: int
    level: int
    seq: int
    usec: int  # since boot
    flags: str  # "-"; "c" and "+" on kernels before 4.9 for pieces of a continued line
    message: str


def parse_record(raw: bytes) -> KmsgRecord | None:
    """One /dev/kmsg record (dictionary lines ignored); None when it is not one."""
    header, sep, rest = raw.partition(b";")
    if not sep:
        return None
    fields = header.split(b",")
    if len(fields) < 4:
        return None
    try:
        prefix, seq, usec = int(fields[0]), int(fields[1]), int(fields[2])
    except ValueError:
        return None
    text = rest.split(b"\n", 1)[0]
    return KmsgRecord(prefix >> 3, prefix & 7, seq, usec, fields[3].decode("ascii", "replace"), unescape(text))


def split_records(data: bytes) -> list[bytes]:
    """Records in a buffer: /dev/kmsg returns one per read; a file or pipe standing in for it
    returns several. A line starting with a space continues the record (dictionary)."""
    records: list[bytes] = []
    for line in data.split(b"\n"):
        if not line:
            continue
        if line.startswith(b" ") and records:
            records[-1] += b"\n" + line
        else:
            records.append(line)
    return records


# -- OOM parsing --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OomInfo:
    """One OOM kill. ``memcg``: the memory cgroup whose limit was hit ("/" for a machine-wide
    OOM); ``container``: the killed process's memory cgroup."""

    timestamp: float  # wall time (the watcher's clock) when the kill was read, seconds
    memcg: str
    container: str
    pid: int
    process_name: str
    constraint: str | None = None  # CONSTRAINT_MEMCG, CONSTRAINT_NONE, ... (4.19+)
    global_oom: bool = False
    invoked_by: str | None = None  # the task whose allocation triggered it


_INVOKED = re.compile(r"^(?P<comm>.*) invoked oom-killer: ")
_LEGACY_TASK = re.compile(r"^Task in (?P<task>.*) killed as a result of limit of (?P<limit>.*)$")
# The comm may hold commas, a cgroup path too in theory: anchor on the keys, comm last.
_OOM_KILL = re.compile(
    r"oom-kill:constraint=(?P<constraint>[^,]*),nodemask=(?P<nodemask>.*?),cpuset=(?P<cpuset>.*?),"
    r"mems_allowed=(?P<mems>.*?),(?:oom_memcg=(?P<oom_memcg>.*?)|(?P<global>global_oom)),"
    r"task_memcg=(?P<task_memcg>.*?),task=(?P<task>.*),pid=(?P<pid>\d+),uid=(?P<uid>\d+)\s*$"
)
_KILLED = re.compile(r"(?:^|: )Killed process (?P<pid>\d+) \((?P<comm>.*)\)(?: total-vm:| vsz:|\s*$)")


def parse_oom_kill_line(line: str) -> dict[str, str | None] | None:
    """The 4.19+ summary line's fields, or None."""
    match = _OOM_KILL.search(line)
    return match.groupdict() if match else None


def parse_legacy_task_line(line: str) -> tuple[str, str] | None:
    """``Task in A killed as a result of limit of B`` → (A, B)."""
    match = _LEGACY_TASK.match(line.strip())
    return (_cgroup(match.group("task")), _cgroup(match.group("limit"))) if match else None


def parse_killed_line(line: str) -> tuple[int, str] | None:
    """``[Memory cgroup out of memory: ]Killed process 123 (comm) total-vm:...`` → (123, comm)."""
    match = _KILLED.search(line)
    return (int(match.group("pid")), match.group("comm")) if match else None


def _cgroup(path: str) -> str:
    path = path.strip()
    return path if path.startswith("/") else "/" + path


class OomParser:
    """Kernel log lines in, :class:`OomInfo` out; holds the state of the OOM block being read.

    A kill is reported at its "Killed process" line, with the cgroups of the block's summary
    (4.19+) or "Task in" line (older). That line is the kill itself: on 4.19–5.0 the victim
    named in the summary may still give way to one of its children ("sacrifice child"), and a
    victim that no longer has an mm is not killed at all (no "Killed process" line).
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._invoked_by: str | None = None
        self._task_memcg: str | None = None
        self._limit_memcg: str | None = None
        self._constraint: str | None = None
        self._global: bool | None = None

    def feed(self, line: str, timestamp: float) -> OomInfo | None:
        if "Killed process " in line:
            killed = parse_killed_line(line)
            if killed is None:
                return None
            pid, comm = killed
            # Without a summary or "Task in" line (legacy kernels) the OOM was machine-wide.
            global_oom = self._global if self._global is not None else self._limit_memcg is None
            info = OomInfo(
                timestamp=timestamp,
                memcg="/" if global_oom else self._limit_memcg or "/",
                container=self._task_memcg or "/",
                pid=pid,
                process_name=comm,
                constraint=self._constraint,
                global_oom=global_oom,
                invoked_by=self._invoked_by,
            )
            self._reset()
            return info
        if "oom-kill:" in line:
            fields = parse_oom_kill_line(line)
            if fields is not None:
                self._global = fields["global"] is not None
                self._limit_memcg = None if self._global else _cgroup(fields["oom_memcg"] or "/")
                self._task_memcg = _cgroup(fields["task_memcg"] or "/")
                self._constraint = fields["constraint"] or None
            return None
        if "invoked oom-killer: " in line:
            self._reset()
            match = _INVOKED.match(line)
            self._invoked_by = match.group("comm") if match else None
            return None
        if line.startswith("Task in "):
            names = parse_legacy_task_line(line)
            if names is not None:
                self._task_memcg, self._limit_memcg = names
        return None


def parse_ooms(lines: Iterable[str], timestamp: float = 0.0) -> list[OomInfo]:
    parser = OomParser()
    return [info for line in lines if (info := parser.feed(line, timestamp)) is not None]


def parse_kmsg(data: bytes, timestamp: float = 0.0) -> list[OomInfo]:
    """OOMs in a capture of /dev/kmsg records (what the watcher does, minus the device)."""
    joiner = LineJoiner()
    lines: list[str] = []
    for raw in split_records(data):
        record = parse_record(raw)
        if record is not None and record.facility == 0:
            lines.extend(joiner.push(record))
    lines.extend(joiner.flush())
    return parse_ooms(lines, timestamp)


class LineJoiner:
    """Reassembles lines split into "c" (first piece) and "+" (more) records by kernels before
    4.9; since then every record is a whole line, flagged "-"."""

    def __init__(self) -> None:
        self._pending: str | None = None

    def push(self, record: KmsgRecord) -> list[str]:
        flag = record.flags[:1]
        if flag == "+" and self._pending is not None:
            self._pending += record.message
            return []
        out = self.flush()
        if flag == "c":
            self._pending = record.message
        else:
            out.append(record.message)
        return out

    def flush(self) -> list[str]:
        pending, self._pending = self._pending, None
        return [pending] if pending is not None else []


# -- the watcher -------------------------------------------------------------------------------------
class OomWatcher:
    """Follows /dev/kmsg from its end in a thread; calls ``on_oom`` for each OOM kill.

    Counts kills per container (:meth:`counts`). A read error closes the device and reopens it
    after a backoff (doubling up to ``max_backoff_s``), resuming after the last record seen
    (kmsg sequence numbers), so nothing is replayed and, if the buffer still holds them, nothing
    written meanwhile is missed.
    """

    READ_SIZE = 16384  # a record is at most ~1 KiB of text plus its dictionary

    def __init__(
        self,
        on_oom: Callable[[OomInfo], None],
        clock: Clock,
        kmsg_path: str | Path = "/dev/kmsg",
        poll_interval_s: float = 0.5,
        initial_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.on_oom = on_oom
        self.clock = clock
        self.kmsg_path = str(kmsg_path)
        self.poll_interval_s = poll_interval_s
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self._parser = OomParser()
        self._joiner = LineJoiner()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._kills: dict[str, int] = {}
        self._ooms: dict[str, int] = {}
        self._last_seq: int | None = None
        self._ready = threading.Event()
        self.records = 0
        self.records_lost = 0  # overwritten before we read them (EPIPE)
        self.read_errors = 0
        self.open_errors = 0
        self.reopens = 0
        self.callback_errors = 0
        self.last_error: str | None = None

    # -- counters -------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """OOM kills by the killed process's container, as the kernel log reported them since start.
        (/metrics reads the kernel's own per-cgroup oom_kill count for container_oom_events_total.)"""
        with self._lock:
            return dict(self._kills)

    def oom_counts(self) -> dict[str, int]:
        """OOMs by the memory cgroup that hit its limit."""
        with self._lock:
            return dict(self._ooms)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, wait_s: float = 5.0) -> None:
        """Start following; returns once the device is open (positioned at its end), or after
        ``wait_s`` when it cannot be opened (the thread keeps retrying)."""
        self._thread = threading.Thread(target=self._run, name="oom-watcher", daemon=True)
        self._thread.start()
        self._ready.wait(wait_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("oom watcher: thread did not stop within %.1f s", timeout_s)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = self.initial_backoff_s
        first = True
        while not self._stop.is_set():
            try:
                fd = self._open()
            except OSError as exc:
                self.open_errors += 1
                self._error(f"cannot open {self.kmsg_path}: {exc}")
                first = False
                self._ready.set()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            if not first:
                self.reopens += 1
                log.info("oom watcher: %s reopened", self.kmsg_path)
            self._ready.set()
            try:
                self._follow(fd)
                backoff = self.initial_backoff_s  # a clean stop, or a source that ended after working
            except OSError as exc:
                self.read_errors += 1
                self._error(f"reading {self.kmsg_path}: {exc}")
            finally:
                os.close(fd)
            first = False
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    def _error(self, message: str) -> None:
        if self.last_error is None:
            log.warning("oom watcher: %s; retrying with backoff (OOM events may be late or missed)", message)
        else:
            log.debug("oom watcher: %s", message)
        self.last_error = message

    def _open(self) -> int:
        fd = os.open(self.kmsg_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            # First open: the end (no replay of what happened before, even in earlier boots'
            # carried-over buffers); a reopen: the oldest record, skipping up to the last seen.
            os.lseek(fd, 0, os.SEEK_END if self._last_seq is None else os.SEEK_SET)
        except OSError as exc:
            if exc.errno != errno.ESPIPE:  # a pipe standing in for the device cannot seek
                os.close(fd)
                raise
        return fd

    def _follow(self, fd: int) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        timeout_ms = int(self.poll_interval_s * 1000)
        size = self.READ_SIZE
        while not self._stop.is_set():
            if not poller.poll(timeout_ms):
                self._flush()
                continue
            try:
                data = os.read(fd, size)
            except BlockingIOError:
                continue
            except BrokenPipeError:
                # The ring buffer wrapped past our position; the next read returns the oldest record left.
                self.records_lost += 1
                continue
            except OSError as exc:
                # EINVAL: the record does not fit the buffer (it is never split).
                if exc.errno == errno.EINVAL and size < 1 << 20:
                    size *= 4
                    continue
                raise
            if not data:  # end of a file or pipe standing in for the device
                self._flush()
                raise OSError(errno.ENODATA, "end of the kernel log source")
            for raw in split_records(data):
                self._record(raw)
            self.last_error = None

    def _record(self, raw: bytes) -> None:
        record = parse_record(raw)
        if record is None:
            return
        if self._last_seq is not None and record.seq <= self._last_seq:
            return
        self._last_seq = record.seq
        self.records += 1
        if record.facility != 0:
            return
        # A "+" piece may be followed by more: a joined line is complete at the next whole
        # record, or when the log goes quiet (_flush).
        for line in self._joiner.push(record):
            self._line(line)

    def _flush(self) -> None:
        for line in self._joiner.flush():
            self._line(line)

    def _line(self, line: str) -> None:
        info = self._parser.feed(line, self.clock.time())
        if info is None:
            return
        with self._lock:
            self._kills[info.container] = self._kills.get(info.container, 0) + 1
            self._ooms[info.memcg] = self._ooms.get(info.memcg, 0) + 1
        log.info("OOM kill: pid %d (%s) in %s, limit of %s", info.pid, info.process_name, info.container, info.memcg)
        try:
            self.on_oom(info)
        except Exception:  # the callback's bug must not stop the watcher
            self.callback_errors += 1
            log.exception("oom watcher: handling the OOM kill of pid %d failed", info.pid)
