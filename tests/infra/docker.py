"""A Docker engine for the test session: reuse one that answers, else start a private dockerd.

Several test sessions may run on one machine at once (CI, and developers side by side). Two
lock files keep them from tripping over each other:

* ``ACQUIRE_LOCK`` (exclusive, held briefly) serialises "is one running? else start one";
* ``USERS_LOCK`` (shared, held for a whole session) says "someone is using the engine".

A dockerd started by a test session is written down in ``STATE_FILE``; whichever session is the
last user (it gets ``USERS_LOCK`` exclusively at release) stops it. A dockerd that was already
running without a state file (started by hand or by the system) is never stopped.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container

from tests.infra.procs import alive, cmdline, pids_mentioning, pids_named

log = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/var/run/docker.sock")
TEST_LABEL = "container-exporter-test"
OWNER_LABEL = "container-exporter-test.owner-pid"
BUSYBOX_IMAGE = "container-exporter-test/busybox:latest"
BUSYBOX_BINARY = Path("/bin/busybox")
LOCK_DIR = Path("/tmp")
ACQUIRE_LOCK = LOCK_DIR / "container-exporter-test-dockerd.acquire.lock"
USERS_LOCK = LOCK_DIR / "container-exporter-test-dockerd.users.lock"
STATE_FILE = LOCK_DIR / "container-exporter-test-dockerd.json"
SETUP_HINT = "run `make setup` (installs docker.io and busybox-static)"


class DockerUnavailable(RuntimeError):
    pass


def endpoint_for(socket_path: Path) -> str:
    return f"unix://{socket_path}"


def ping(endpoint: str, *, timeout_s: float = 5.0) -> bool:
    if endpoint.startswith("unix://") and not Path(endpoint[len("unix://") :]).exists():
        return False
    try:
        client = docker.DockerClient(base_url=endpoint, version="auto", timeout=timeout_s)
    except docker.errors.DockerException:
        return False
    try:
        return bool(client.ping())
    except (docker.errors.DockerException, OSError):
        return False
    finally:
        client.close()


# --- processes ------------------------------------------------------------------------------------


def socket_from_env() -> Path:
    """The socket named by a ``unix://`` DOCKER_HOST, else the default one."""
    host = os.environ.get("DOCKER_HOST", "")
    return Path(host[len("unix://") :]) if host.startswith("unix://") else DEFAULT_SOCKET


def _socket_listening(path: Path) -> bool:
    """Whether a process accepts connections on ``path`` (a stale socket file refuses them)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def mounts_under(top: Path) -> list[str]:
    prefix = str(top).rstrip("/") + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point.startswith(prefix) or point == str(top):
            points.append(point)
    return sorted(points, key=len, reverse=True)


@dataclass
class PrivateDockerd:
    """A dockerd whose data, exec state, pidfile and log all live in ``tmpdir``."""

    pid: int
    socket_path: Path
    tmpdir: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return endpoint_for(self.socket_path)

    @property
    def log_path(self) -> Path:
        return self.tmpdir / "dockerd.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def is_ours(self) -> bool:
        """Guards against pid reuse: the pid must still be a dockerd using our tmpdir."""
        args = cmdline(self.pid)
        return bool(args) and Path(args[0]).name == "dockerd" and any(str(self.tmpdir) in a for a in args)

    def stop(self, *, timeout_s: float = 20.0) -> None:
        """SIGTERM, wait, SIGKILL; then end its stray children, unmount and delete ``tmpdir``."""
        if self.is_ours():
            os.kill(self.pid, signal.SIGTERM)
            if not self._wait_gone(timeout_s):
                log.warning("dockerd pid %d ignored SIGTERM for %.0f s; sending SIGKILL", self.pid, timeout_s)
                os.kill(self.pid, signal.SIGKILL)
                self._wait_gone(5.0)
        # A SIGKILLed dockerd leaves its containerd and shims running; they name tmpdir in argv.
        for pid in pids_mentioning(f"{self.tmpdir}/"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for point in mounts_under(self.tmpdir):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        if self.socket_path.is_socket() and not ping(self.endpoint, timeout_s=1):
            self.socket_path.unlink(missing_ok=True)

    def _wait_gone(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen is not None:
                try:
                    self.popen.wait(timeout=0.1)
                    return True
                except subprocess.TimeoutExpired:
                    continue
            if not alive(self.pid):
                return True
            time.sleep(0.1)
        return not alive(self.pid)

    def to_state(self) -> dict[str, Any]:
        return {"pid": self.pid, "socket_path": str(self.socket_path), "tmpdir": str(self.tmpdir)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PrivateDockerd:
        return cls(pid=int(state["pid"]), socket_path=Path(state["socket_path"]), tmpdir=Path(state["tmpdir"]))


def start_dockerd(socket_path: Path = DEFAULT_SOCKET, *, timeout_s: float = 30.0) -> PrivateDockerd:
    """Start ``dockerd --iptables=false --bridge=none`` with its state in a fresh temp dir."""
    binary = shutil.which("dockerd")
    if binary is None:
        raise DockerUnavailable(f"no Docker engine answers on {socket_path} and dockerd is not installed: {SETUP_HINT}")
    # Short prefix: containerd's socket goes under exec-root and unix socket paths max out at 108 bytes.
    tmpdir = Path(tempfile.mkdtemp(prefix="cetest-dockerd-", dir="/tmp"))
    argv = [
        binary,
        "--iptables=false",
        "--bridge=none",
        "--host", endpoint_for(socket_path),
        "--data-root", str(tmpdir / "data"),
        "--exec-root", str(tmpdir / "exec"),
        "--pidfile", str(tmpdir / "dockerd.pid"),
    ]  # fmt: skip
    with open(tmpdir / "dockerd.log", "wb") as logf:
        # Own session: a Ctrl-C at the terminal reaches pytest, whose teardown then stops dockerd.
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    daemon = PrivateDockerd(pid=popen.pid, socket_path=socket_path, tmpdir=tmpdir, popen=popen)
    log.info("started dockerd pid %d on %s (state in %s)", popen.pid, socket_path, tmpdir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            tail = daemon.log_tail()
            daemon.stop()
            raise DockerUnavailable(f"dockerd exited with {popen.returncode} while starting; its log ends:\n{tail}")
        if ping(daemon.endpoint, timeout_s=1):
            return daemon
        time.sleep(0.2)
    tail = daemon.log_tail()
    daemon.stop()
    raise DockerUnavailable(f"dockerd did not answer on {socket_path} within {timeout_s:.0f} s; its log ends:\n{tail}")


# --- the session's engine ---------------------------------------------------------------------------


def _read_state() -> PrivateDockerd | None:
    try:
        return PrivateDockerd.from_state(json.loads(STATE_FILE.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError):
        STATE_FILE.unlink(missing_ok=True)
        return None


def _write_state(daemon: PrivateDockerd) -> None:
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(daemon.to_state()))
    tmp.replace(STATE_FILE)


@dataclass
class DockerEngine:
    client: docker.DockerClient
    endpoint: str
    started_here: bool  # True when this session started the dockerd it uses
    daemon: PrivateDockerd | None  # the test-started dockerd in use, if any (ours or another session's)
    _users_fd: int = field(repr=False)

    @classmethod
    def acquire(cls, socket_path: Path = DEFAULT_SOCKET, *, start_timeout_s: float = 30.0) -> DockerEngine:
        endpoint = endpoint_for(socket_path)
        acquire_fd = os.open(ACQUIRE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        users_fd = os.open(USERS_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(acquire_fd, fcntl.LOCK_EX)
            started_here = False
            daemon = _read_state()
            if daemon is not None and daemon.socket_path != socket_path:
                daemon = None  # a test dockerd on another socket: not ours to manage here
            if not ping(endpoint):
                if daemon is not None:
                    log.warning("test dockerd pid %d does not answer; stopping it", daemon.pid)
                    daemon.stop()
                    STATE_FILE.unlink(missing_ok=True)
                    daemon = None
                if _socket_listening(socket_path):
                    raise DockerUnavailable(
                        f"something listens on {socket_path} but does not answer a Docker ping "
                        f"(dockerd processes: {pids_named('dockerd')}); stop it or fix it"
                    )
                daemon = start_dockerd(socket_path, timeout_s=start_timeout_s)
                _write_state(daemon)
                started_here = True
            client = docker.DockerClient(base_url=endpoint, version="auto", timeout=120)
            # Cannot block: USERS_LOCK is only ever held exclusively under ACQUIRE_LOCK, which we hold.
            fcntl.flock(users_fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(users_fd)
            raise
        finally:
            os.close(acquire_fd)
        return cls(client=client, endpoint=endpoint, started_here=started_here, daemon=daemon, _users_fd=users_fd)

    def release(self) -> None:
        """Stop the dockerd if a test session started it and no other session still uses it."""
        self.client.close()
        acquire_fd = os.open(ACQUIRE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(acquire_fd, fcntl.LOCK_EX)
            try:
                fcntl.flock(self._users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("another test session still uses the Docker engine; leaving it running")
                return
            daemon = _read_state()
            if daemon is not None and endpoint_for(daemon.socket_path) == self.endpoint:
                if self.daemon is not None and self.daemon.pid == daemon.pid:
                    daemon.popen = self.daemon.popen  # lets stop() reap our own child
                log.info("stopping test dockerd pid %d", daemon.pid)
                daemon.stop()
                STATE_FILE.unlink(missing_ok=True)
        finally:
            os.close(self._users_fd)
            os.close(acquire_fd)


# --- containers and images ------------------------------------------------------------------------


def run_container(client: docker.DockerClient, image: str, command: str | list[str] | None = None, **kwargs: Any) -> Container:
    """``client.containers.run`` (detached by default) with the labels the session sweep looks for."""
    labels = dict(kwargs.pop("labels", None) or {})
    labels[TEST_LABEL] = "1"
    labels.setdefault(OWNER_LABEL, str(os.getpid()))
    kwargs.setdefault("detach", True)
    return client.containers.run(image, command, labels=labels, **kwargs)


def sweep_test_containers(client: docker.DockerClient, *, owner_pid: int | None = None) -> list[str]:
    """Force-remove labelled containers of this session (or ``owner_pid``) and of dead sessions."""
    me = os.getpid() if owner_pid is None else owner_pid
    removed = []
    for container in client.containers.list(all=True, filters={"label": f"{TEST_LABEL}=1"}):
        owner = container.labels.get(OWNER_LABEL, "")
        if owner.isdigit() and int(owner) != me and alive(int(owner)):
            continue
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
        removed.append(container.name)
    return removed


def _is_static_elf(path: Path) -> bool:
    """False when the ELF has a PT_INTERP header, i.e. needs a dynamic loader the image lacks."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # ELF64 only; that is all we run on
            return False
        (phoff,) = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def busybox_rootfs_tar(busybox: Path = BUSYBOX_BINARY) -> bytes:
    """A rootfs tarball: the static busybox and a symlink per applet, as `busybox --install` lays them."""
    if not busybox.exists():
        raise DockerUnavailable(f"{busybox} not found: {SETUP_HINT}")
    if not _is_static_elf(busybox):
        raise DockerUnavailable(f"{busybox} is dynamically linked; the image needs busybox-static: {SETUP_HINT}")
    applets = subprocess.run([str(busybox), "--list-full"], check=True, capture_output=True, text=True).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add_dir(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)

        dirs = {"bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "root", "var", "var/www"}
        dirs |= {str(Path(a).parent) for a in applets}
        for d in sorted(dirs):
            add_dir(d)
        add_dir("tmp", 0o1777)
        data = busybox.read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
        for applet in applets:
            if applet == "bin/busybox":
                continue
            link = tarfile.TarInfo(applet)
            link.type, link.linkname = tarfile.SYMTYPE, "/bin/busybox"
            tar.addfile(link)
    return buf.getvalue()


def ensure_busybox_image(client: docker.DockerClient, tag: str = BUSYBOX_IMAGE) -> str:
    """Import the busybox image unless the engine has it already; returns ``tag``."""
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    repository, _, version = tag.rpartition(":")
    client.api.import_image_from_data(
        busybox_rootfs_tar(),
        repository=repository,
        tag=version,
        changes=["ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin", 'CMD ["sh"]'],
    )
    client.images.get(tag)  # raises if the import silently failed
    log.info("imported %s", tag)
    return tag
