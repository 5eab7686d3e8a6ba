"""Ready-made processes that load a cgroup: a CPU burner and a memory allocator."""

from __future__ import annotations

import selectors
import subprocess
import sys
import time
from typing import Any, Protocol

MIB = 1024 * 1024

# Touches one byte per page so every page is really faulted in and charged to the cgroup
# (a fresh bytearray may be backed by untouched zero pages).
_MEMORY_HOG = """
import mmap, sys, time
size = int(sys.argv[1]) * 1024 * 1024
buf = bytearray(size)
buf[::mmap.PAGESIZE] = b"\\x01" * len(range(0, size, mmap.PAGESIZE))
sys.stdout.write("ready\\n")
sys.stdout.flush()
while True:
    time.sleep(3600)
"""


class Spawner(Protocol):
    def spawn(self, argv: list[str], **popen_kwargs: Any) -> subprocess.Popen[Any]: ...


def cpu_burner_argv() -> list[str]:
    return [sys.executable, "-c", "while True: pass"]


def memory_hog_argv(mib: int) -> list[str]:
    """Allocates ``mib`` MiB, touches every page, prints "ready" and sleeps."""
    return [sys.executable, "-c", _MEMORY_HOG, str(mib)]


def wait_for_line(proc: subprocess.Popen[str], expected: str = "ready", *, timeout_s: float = 30.0) -> None:
    """Read ``proc``'s stdout (a text pipe) until a line equal to ``expected``."""
    if proc.stdout is None:
        raise ValueError("wait_for_line needs stdout=subprocess.PIPE, text=True")
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"pid {proc.pid} printed no {expected!r} in {timeout_s} s (got {seen!r})")
            if not sel.select(timeout=left):
                continue
            line = proc.stdout.readline()
            if line == "":
                rc = proc.wait()
                hint = " (SIGKILL: an OOM kill under a memory limit?)" if rc == -9 else ""
                raise RuntimeError(f"pid {proc.pid} exited with {rc}{hint} before printing {expected!r}; got {seen!r}")
            if line.rstrip("\n") == expected:
                return
            seen.append(line)


def start_cpu_burner(cgroup: Spawner) -> subprocess.Popen[Any]:
    return cgroup.spawn(cpu_burner_argv(), stdin=subprocess.DEVNULL)


def start_memory_hog(cgroup: Spawner, mib: int, *, timeout_s: float = 30.0) -> subprocess.Popen[str]:
    """Start the allocator in ``cgroup`` and return once all ``mib`` MiB are resident."""
    proc = cgroup.spawn(memory_hog_argv(mib), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    wait_for_line(proc, "ready", timeout_s=timeout_s)
    return proc
