"""Small /proc look-ups shared by the cgroup and Docker helpers, free ports, and the process
control the store fixtures share (:class:`ChildProcess`)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)


def state(pid: int) -> str | None:
    """The process's state letter (R, S, T, Z, ...), or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The state letter follows the ")" that closes the command name (which may hold spaces).
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as gone."""
    return state(pid) not in (None, "Z")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return raw.decode(errors="replace").split("\0")[:-1] if raw else []


def pids_mentioning(needle: str) -> list[int]:
    """Processes (other than this one) with ``needle`` in some argument."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me:
            if any(needle in arg for arg in cmdline(int(entry.name))):
                found.append(int(entry.name))
    return found


def pids_named(name: str) -> list[int]:
    """Processes whose argv[0] has basename ``name``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            args = cmdline(int(entry.name))
            if args and Path(args[0]).name == name:
                found.append(int(entry.name))
    return found


class ChildProcess:
    """A server binary run as a child process of the test session, with fault controls.

    ``pause()`` (SIGSTOP), ``resume()`` (SIGCONT), ``stop()`` (SIGTERM, then SIGKILL;
    ``stop(kill=True)`` goes straight to SIGKILL), ``start()`` and ``restore()``; all idempotent.
    Subclasses give ``argv()``, ``ready()``, and what ``awaited`` says in a start error.
    """

    name = "server"
    error: type[Exception] = RuntimeError
    start_timeout_s = 30.0
    stop_timeout_s = 15.0
    kill_wait_s = 10.0

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.log_path = base_dir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    # -- subclass hooks ------------------------------------------------------------------------
    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def awaited(self) -> str:
        """What start() waits for, as in "<name> did not <awaited> within 30 s"."""
        return "answer"

    # -- process control ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        return self._paused and self.running

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self, *, timeout_s: float | None = None) -> None:
        """Start (or, when paused, resume) the process and wait until ``ready()``."""
        if self.running:
            self.resume()
            return
        timeout_s = self.start_timeout_s if timeout_s is None else timeout_s
        with open(self.log_path, "ab") as log_file:
            self._proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                env=self.env(),
                start_new_session=True,  # a ^C to pytest must not reach it before teardown does
            )
        self._paused = False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise self.error(f"{self.name} exited with {self._proc.returncode} during start:\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.05)
        self.stop(kill=True)
        raise self.error(f"{self.name} did not {self.awaited} within {timeout_s:g} s:\n{self.log_tail()}")

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections (the kernel's backlog) but nothing answers."""
        if self.running and not self._paused:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGSTOP)
            self._paused = True
            # The stop reaches every thread asynchronously; return once the kernel says "T".
            deadline = time.monotonic() + 2.0
            while state(self._proc.pid) not in ("T", "t", None) and time.monotonic() < deadline:
                time.sleep(0.005)

    def resume(self) -> None:
        if self._paused and self.running:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    def stop(self, *, kill: bool = False, timeout_s: float | None = None) -> None:
        """SIGTERM and wait (SIGKILL after ``timeout_s``); ``kill=True`` sends SIGKILL at once."""
        proc = self._proc
        if proc is None:
            return
        timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
        if proc.poll() is None:
            if self._paused:
                proc.send_signal(signal.SIGCONT)  # a stopped process would not act on SIGTERM
            if kill:
                proc.kill()
            else:
                proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.info("%s (pid %d) still running %g s after SIGTERM; killing it", self.name, proc.pid, timeout_s)
                proc.kill()
                proc.wait(self.kill_wait_s)
        self._proc = None
        self._paused = False

    def restore(self) -> None:
        """Back to serving, whatever a test left it in (used between tests)."""
        self.resume()
        if not self.running:
            self.start()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
