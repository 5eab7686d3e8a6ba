"""What the cgroup files do not say, read from /proc: network counters, open fds, task states."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from exporter.cgroups.files import CgroupFile, MalformedFile, is_gone_error


def parse_net_dev(data: bytes, path: str = "?", skip: frozenset[str] = frozenset({"lo"})) -> list[dict[str, Any]]:
    """/proc/<pid>/net/dev → fields of :class:`NetworkInterface` per interface."""
    out = []
    for line in data.splitlines()[2:]:  # two header lines
        name, sep, rest = line.partition(b":")
        if not sep:
            raise MalformedFile(path, f"expected 'iface: counters', got {line[:60]!r}")
        iface = name.strip().decode()
        if iface in skip:
            continue
        fields = rest.split()
        if len(fields) < 16:
            raise MalformedFile(path, f"expected 16 counters for {iface}, got {len(fields)}")
        try:
            v = [int(x) for x in fields[:12]]
        except ValueError:
            raise MalformedFile(path, f"bad counter for {iface}") from None
        # rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets errs drop ...
        out.append(
            {
                "name": iface,
                "rx_bytes": v[0], "rx_packets": v[1], "rx_errors": v[2], "rx_dropped": v[3],
                "tx_bytes": v[8], "tx_packets": v[9], "tx_errors": v[10], "tx_dropped": v[11],
            }
        )
    return out


def task_state(data: bytes) -> bytes:
    """State letter of a /proc/<tid>/stat line; the command name may hold spaces and parens."""
    end = data.rfind(b")")
    return data[end + 2 : end + 3]


class ProcReader:
    """Per-host helper bound to a proc root."""

    def __init__(self, proc_root: str | Path) -> None:
        self.root = str(proc_root)

    def host_netns(self) -> int | None:
        """The host's network namespace: pid 1's, or ours when pid 1's cannot be read (a
        sandbox may deny it even to root)."""
        return self.netns(1) or self.netns("self")

    def netns(self, pid: int | str) -> int | None:
        try:
            return os.stat(f"{self.root}/{pid}/ns/net").st_ino
        except OSError:
            return None

    def open_fds(self, pids: list[bytes]) -> int | None:
        total = 0
        seen = False
        for pid in pids:
            try:
                total += len(os.listdir(f"{self.root}/{pid.decode()}/fd"))
                seen = True
            except OSError as exc:
                if not is_gone_error(exc) and not isinstance(exc, PermissionError):
                    raise
        return total if seen else None

    def runnable(self, tids: list[bytes]) -> int:
        """Tasks in state R (running or runnable), cAdvisor's nr_running."""
        count = 0
        for tid in tids:
            try:
                with open(f"{self.root}/{tid.decode()}/stat", "rb", buffering=0) as f:
                    state = task_state(f.read())
            except OSError:
                continue
            if state == b"R":
                count += 1
        return count


class NetDevReader:
    """Network counters of a container, read from one of its tasks' net namespace.

    The descriptor on /proc/<pid>/net/dev is kept while that pid is the container's first task.
    """

    def __init__(self, proc: ProcReader, host_netns: int | None) -> None:
        self._proc = proc
        self._host_netns = host_netns
        self._pid: int | None = None
        self._file: CgroupFile | None = None
        self._shares_host = False

    def read(self, pid: int | None) -> list[dict[str, Any]] | None:
        if pid is None:
            return None
        if pid != self._pid:
            self.close()
            self._pid = pid
            # A task in the host's namespace would report the host's traffic as the container's.
            self._shares_host = self._host_netns is not None and self._proc.netns(pid) == self._host_netns
            if not self._shares_host:
                self._file = CgroupFile.open(f"{self._proc.root}/{pid}/net/dev")
        if self._shares_host or self._file is None:
            return None
        try:
            return parse_net_dev(self._file.read(), self._file.path)
        except OSError as exc:
            if is_gone_error(exc):
                self.close()
                return None
            raise

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._pid = None


class LoadAverage:
    """Exponentially smoothed runnable-task count: decay = exp(-interval / 10 s), as in cAdvisor.

    The interval is the real time since the previous sample rather than the configured one, so the
    smoothing stays right when dynamic housekeeping stretches the interval.
    """

    WINDOW_S = 10.0

    def __init__(self) -> None:
        self.value: float | None = None
        self._last: float | None = None

    def update(self, runnable: int, now_s: float) -> float:
        if self.value is None or self._last is None:
            self.value = float(runnable)
        else:
            decay = math.exp(-(now_s - self._last) / self.WINDOW_S)
            self.value = self.value * decay + runnable * (1.0 - decay)
        self._last = now_s
        return self.value
