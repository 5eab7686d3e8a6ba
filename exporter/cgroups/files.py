"""Tiny file-reading layer: read a cgroup or proc file, turn it into values.

Missing files give ``None`` ("unset"); a vanished cgroup raises :class:`ContainerGone`; text
that cannot be parsed raises :class:`MalformedFile`.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import resource
from pathlib import Path

_BUFSIZE = 65536
# v1 reports "no limit" as PAGE_COUNTER_MAX * PAGE_SIZE (9223372036854771712 on 4 KiB pages) and
# some older kernels as 2**63 - 1; anything this large is not a real limit.
UNLIMITED_THRESHOLD = 1 << 62


class ContainerGone(Exception):
    """The container's cgroup disappeared while we were reading it."""

    def __init__(self, name: str) -> None:
        super().__init__(f"container {name} is gone")
        self.name = name


class MalformedFile(ValueError):
    """A cgroup/proc file held text we cannot parse."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


# Errors that mean "the cgroup (or task) is no longer there". An open descriptor on a removed
# cgroup file fails with ENODEV; a removed /proc/<pid> gives ESRCH or ENOENT.
_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ENODEV, errno.ESRCH})


def is_gone_error(exc: OSError) -> bool:
    return exc.errno in _GONE_ERRNOS


def read_bytes(path: str | Path) -> bytes | None:
    """Whole file, or None when it does not exist."""
    try:
        with open(path, "rb", buffering=0) as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        if is_gone_error(exc):
            return None
        raise


class CgroupFile:
    """An open descriptor re-read with ``pread`` at offset 0 (kernfs regenerates the content).

    Keeping the descriptor saves the open/close pair on every tick, which is most of the cost of
    reading a small cgroup file.
    """

    __slots__ = ("path", "_fd")

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def open(cls, path: str | Path) -> CgroupFile | ReopeningFile | None:
        """The file kept open; None when it does not exist. Out of descriptors, a file that
        is opened on every read instead."""
        try:
            return cls(str(path), os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except (FileNotFoundError, PermissionError):
            return None
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            _warn_out_of_descriptors(exc)
            return ReopeningFile(str(path)) if os.path.exists(path) else None

    def read(self) -> bytes:
        """Content now; raises OSError with ENODEV once the cgroup is removed."""
        fd = self._fd
        data = os.pread(fd, _BUFSIZE, 0)
        if len(data) < _BUFSIZE:
            return data
        chunks = [data]
        offset = len(data)
        while True:
            more = os.pread(fd, _BUFSIZE, offset)
            if not more:
                return b"".join(chunks)
            chunks.append(more)
            offset += len(more)

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            finally:
                self._fd = -1

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass


_fd_warning_logged = False


def _warn_out_of_descriptors(exc: OSError) -> None:
    global _fd_warning_logged
    if not _fd_warning_logged:
        _fd_warning_logged = True
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        logging.getLogger(__name__).warning(
            "out of file descriptors (%s; RLIMIT_NOFILE soft=%d hard=%d): cgroup files are now opened "
            "on every read, which costs more CPU; raise the limit (ulimit -n) to keep them open",
            exc.strerror, soft, hard,
        )


class ReopeningFile:
    """Same interface as :class:`CgroupFile` but opens the file on every read.

    Used when the process has run out of descriptors.
    """

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> bytes:
        with open(self.path, "rb", buffering=0) as f:
            return f.read()

    def close(self) -> None:
        pass


class OpenFiles:
    """What the v1 and v2 readers share: their kept-open files are their CgroupFile attributes."""

    pids_current: CgroupFile | None
    tasks: CgroupFile | None

    def files(self) -> list[CgroupFile]:
        return [v for v in vars(self).values() if isinstance(v, CgroupFile)]

    def close(self) -> None:
        for file in self.files():
            file.close()

    def pids(self) -> int | None:
        return parse_int(self.pids_current.read(), self.pids_current.path) if self.pids_current else None

    def threads(self) -> bytes | None:
        return self.tasks.read() if self.tasks else None


def working_set_bytes(usage: int | None, inactive_file: int | None) -> int | None:
    """usage − inactive_file, never below 0 (cAdvisor's working set); usage when inactive_file is unknown."""
    if usage is None:
        return None
    return max(usage - inactive_file, 0) if inactive_file is not None else usage


def parse_int(data: bytes, path: str | Path = "?") -> int | None:
    """A single integer; ``max`` (v2) and v1's huge "unlimited" values give None."""
    text = data.strip()
    if not text:
        raise MalformedFile(path, "empty file")
    if text == b"max":
        return None
    try:
        value = int(text)
    except ValueError:
        raise MalformedFile(path, f"expected an integer, got {text[:40]!r}") from None
    if value >= UNLIMITED_THRESHOLD:
        return None
    return value


def parse_flat(data: bytes, path: str | Path = "?") -> dict[bytes, bytes]:
    """``key value`` lines (memory.stat, cpu.stat, memory.events) as raw tokens.

    Values stay bytes: the hot path converts only the keys it uses, with :func:`int_value`.
    """
    tokens = data.split()
    if len(tokens) % 2:
        raise MalformedFile(path, f"expected 'key value' lines, got an odd number of words in {data[-60:]!r}")
    return dict(zip(tokens[::2], tokens[1::2], strict=True))


def int_value(flat: dict[bytes, bytes], key: bytes, path: str | Path = "?") -> int | None:
    raw = flat.get(key)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise MalformedFile(path, f"expected an integer for {key.decode()}, got {raw[:40]!r}") from None


def parse_flat_keyed(data: bytes, path: str | Path = "?") -> dict[str, int]:
    """``key value`` lines, every value an integer."""
    flat = parse_flat(data, path)
    return {key.decode(): int_value(flat, key, path) for key in flat}  # type: ignore[misc]


def parse_int_list(data: bytes, path: str | Path = "?") -> list[int]:
    """Space-separated integers (cpuacct.usage_percpu)."""
    try:
        return [int(x) for x in data.split()]
    except ValueError:
        raise MalformedFile(path, f"expected integers, got {data[:60]!r}") from None


def first_pid(data: bytes) -> int | None:
    """First pid of a cgroup.procs file."""
    end = data.find(b"\n")
    head = data[:end] if end >= 0 else data
    head = head.strip()
    return int(head) if head else None


_PSI_LINE = re.compile(rb"^(some|full) avg10=(\d+\.\d+) avg60=(\d+\.\d+) avg300=(\d+\.\d+) total=(\d+)$", re.M)
_PSI_KINDS = {b"some": "some", b"full": "full"}


def parse_pressure(data: bytes, path: str | Path = "?") -> dict[str, dict[str, float | int]]:
    """PSI: ``some avg10=0.00 avg60=0.00 avg300=0.00 total=123`` (µs), maybe a ``full`` line."""
    lines = _PSI_LINE.findall(data)
    if len(lines) != data.count(b"\n") + (0 if data.endswith(b"\n") else 1) or not lines:
        raise MalformedFile(path, f"expected 'some|full avg10=.. avg60=.. avg300=.. total=..' lines, got {data[:80]!r}")
    return {
        _PSI_KINDS[kind]: {"avg10": float(a10), "avg60": float(a60), "avg300": float(a300), "total_us": int(total)}
        for kind, a10, a60, a300, total in lines
    }
