"""Kafka sink: one JSON message per record, keyed by container id, over kafka-python (>= 3.0).

Messages
--------
* value: the record's JSON (``Envelope.json_bytes()``, encoded once and shared with the other
  sinks); it carries ``schema_version``. The schema is published in schemas/ and printed by
  ``container-exporter schema``.
* key: the container id, or the container's cgroup name when it has no runtime id; with the
  default partitioner one container's records stay in one partition, in order.
* headers: ``record_id`` (stable per record: consumers de-duplicate on it), ``schema_version``
  and ``record_type`` (``stats``; ``event`` for events).
* timestamp: the record's own (sample time), in milliseconds.

Stats records go to ``topic``; any other envelope whose class name contains "Event" goes to
``events_topic``, keyed by its container the same way (``container.id``/``container.name``, or
``container_id``/``container_name`` attributes). Anything else is rejected (counted as dropped).

Delivery
--------
``acks = all`` and the idempotent producer, always: retries inside the producer never duplicate
or reorder a partition's records. (tansu, the test broker, grants producer ids too; a broker
older than 0.11 fails the connection with a clear error instead of silently losing the
guarantee.) ``write_batch`` sends every record, waits for every acknowledgement, and reports
per record: records whose send failed with a retryable error come back in
``PartialFailure.failed`` for the worker to send again, records the broker refused for good
(too large, invalid topic, ...) in ``rejected``.

Every wait is bounded by ``timeout``: connection and metadata (``max_block_ms``), each request
(``request_timeout_ms``) and the whole life of a record inside the producer
(``delivery_timeout_ms``); ``write_batch`` waits for the acknowledgements until then and a
moment more. Building a producer is bounded by ``timeout`` too, so one call may take up to
twice ``timeout`` when it has to reconnect to a slow broker.

A producer that has seen a failure is closed and a new one built for the next batch. The
records of a batch that timed out inside the producer may or may not have reached the broker,
and the producer's per-partition sequence numbers count them; the worker sends them again, so
a fresh producer (new producer id, sequences from 0) is the state that cannot be wedged by
them. The price is at-least-once delivery across such a failure: a record may arrive twice,
with the same ``record_id`` header.

Before it builds a producer the sink checks the way to the brokers itself: TCP, the TLS
handshake (with the same SSL context), one ApiVersions round trip and, with SASL, the
authentication exchange, all within ``timeout``. kafka-python 3.0 reports most of these as one
"Unable to bootstrap" timeout (a refused certificate, and a SCRAM refusal sent the RFC 5802
way, as "e=..." in the server's last message, which its SCRAM client cannot parse), and its TLS
handshake has no timeout at all (a broker that accepts the connection and never answers hangs
the producer's constructor). The check turns them into the right category (connection refused
/ DNS / no answer → unreachable; certificate or credentials refused → auth) and bounds the
handshake. It judges, it does not gate: when it finds the credentials refused the producer is
still tried, and only its failure is reported, as auth.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import socket
import ssl
import struct
import time
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

from pydantic import Field, field_validator, model_validator

from exporter.durations import StrList
from exporter.models import ContainerStats, Envelope
from sinks.protocol import AUTH, ERROR, REJECTED, UNREACHABLE, MissingDependency, PartialFailure, SinkError
from sinks.settings import DeliverySettings

log = logging.getLogger(__name__)

_TOPIC = r"^[a-zA-Z0-9._-]{1,249}$"


class KafkaSettings(DeliverySettings):
    bootstrap_servers: StrList = Field(default_factory=lambda: ["localhost:9092"], description="host:port of one or more brokers.")
    topic: str = Field("container-stats", pattern=_TOPIC, description="Topic for stats records.")
    events_topic: str = Field("container-events", pattern=_TOPIC, description="Topic for container events.")
    client_id: str = Field("container-exporter", description="Client id the brokers see.")
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field("none", description="Message compression (snappy needs python-snappy, zstd needs zstandard).")
    max_message_bytes: int = Field(1024 * 1024, ge=1024, description="Largest record sent (the producer's max_request_size); a larger one is dropped and counted.")
    tls: bool = Field(False, description="Connect with TLS; the server certificate is verified unless insecure is set.")
    tls_ca: str | None = Field(None, description="CA bundle for the brokers' certificates (default: the system's).")
    tls_cert: str | None = Field(None, description="Client certificate (mutual TLS); may hold the key too.")
    tls_key: str | None = Field(None, description="Client key (mutual TLS).")
    insecure: bool = Field(False, description="Do not verify the brokers' certificates nor their names (never the default).")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(None, description="SASL mechanism; none by default.")
    sasl_username: str | None = Field(None, description="SASL user.")
    sasl_password: str | None = Field(None, description="SASL password.")

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one broker is needed")
        for server in value:
            split_server(server)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSettings:
        if not self.tls:
            given = [name for name in ("tls_ca", "tls_cert", "tls_key", "insecure") if getattr(self, name)]
            if given:
                raise ValueError(f"{', '.join(given)} only apply with tls = true")
        if self.tls_key and not self.tls_cert:
            raise ValueError("tls_key needs tls_cert")
        if self.insecure and self.tls_ca:
            raise ValueError("insecure = true turns certificate verification off, so tls_ca would be ignored: remove one")
        if self.sasl_mechanism and not (self.sasl_username and self.sasl_password is not None):
            raise ValueError(f"sasl_mechanism = {self.sasl_mechanism} needs sasl_username and sasl_password")
        if not self.sasl_mechanism and (self.sasl_username or self.sasl_password):
            raise ValueError("sasl_username / sasl_password need sasl_mechanism")
        return self


def split_server(server: str) -> tuple[str, int]:
    """'host:port', '[v6addr]:port' or 'host' (port 9092) → (host, port)."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d+))?|([^:\[\]\s]+)(?::(\d+))?", server.strip())
    if not match:
        raise ValueError(f"expected host:port, got {server!r}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4) or 9092)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {server!r}")
    return host, port


def ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    """The context the producer and the connection check use: the system's (or ``tls_ca``'s)
    CAs and hostname checking, unless ``insecure``; TLS 1.2 at least."""
    ctx = ssl.create_default_context(cafile=settings.tls_ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if settings.tls_cert:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    return ctx


# Producer settings that are ours, not the operator's.
_LINGER_MS = 5  # write_batch flushes at its end; linger only lets batches fill while it sends
_BATCH_BYTES = 256 * 1024  # per-partition batch; the 16 KiB default holds only a few records
_RECONNECT_BACKOFF_MAX_MS = 1000  # a broker that is back is found within a second
_GRACE_S = 0.5  # after the deadline, time for the producer to report its expired batches

_HEADER_RECORD_ID = "record_id"
_HEADER_SCHEMA_VERSION = "schema_version"
_HEADER_RECORD_TYPE = "record_type"


class _Route(NamedTuple):
    topic: str
    record_type: bytes


class _Unresolved(Exception):
    """A record the producer had not reported on by the deadline."""


class _Unroutable(Exception):
    """A record of a kind this sink has no topic for."""


class KafkaSink:
    name = "kafka"

    def __init__(self, settings: KafkaSettings) -> None:
        try:
            import kafka
            import kafka.codec
            import kafka.errors
        except ImportError:
            raise MissingDependency("the kafka sink needs kafka-python: pip install 'container-exporter[kafka]'") from None
        codec_check = {
            "gzip": kafka.codec.has_gzip,
            "snappy": kafka.codec.has_snappy,
            "lz4": kafka.codec.has_lz4,
            "zstd": kafka.codec.has_zstd,
        }.get(settings.compression)
        if codec_check is not None and not codec_check():
            package = {"snappy": "python-snappy", "lz4": "lz4", "zstd": "zstandard"}.get(settings.compression, "?")
            raise MissingDependency(f"kafka compression = {settings.compression} needs the {package} package: pip install {package}")
        self.settings = settings
        self._kafka = kafka
        self._errors = kafka.errors
        self._timeout_s = float(settings.timeout)
        self._servers = [split_server(s) for s in settings.bootstrap_servers]
        self._ssl = ssl_context(settings) if settings.tls else None
        self._producer: Any = None
        self._routes: dict[type, _Route | None] = {}
        self._versions: dict[int, bytes] = {}
        errors = kafka.errors
        self._auth_errors: tuple[type[BaseException], ...] = (
            errors.SaslAuthenticationFailedError,
            errors.AuthorizationError,
            errors.UnsupportedSaslMechanismError,
            errors.IllegalSaslStateError,
            ssl.SSLCertVerificationError,
        )
        self._unreachable_errors: tuple[type[BaseException], ...] = (
            errors.KafkaTimeoutError,
            errors.RequestTimedOutError,
            errors.KafkaConnectionError,
            errors.NodeNotReadyError,
            errors.NetworkExceptionError,
            _Unresolved,
            OSError,
        )
        # Not the record's fault: the producer's own state, or the cluster's; a new producer
        # (or an operator) fixes them, so the records are sent again.
        self._state_errors: tuple[type[BaseException], ...] = (
            errors.OutOfOrderSequenceNumberError,
            errors.UnknownProducerIdError,
            errors.InvalidProducerEpochError,
            errors.InvalidProducerIdMappingError,
            errors.ProducerFencedError,
            errors.IllegalStateError,
            errors.UnsupportedVersionError,
            errors.UnsupportedCompressionTypeError,
            errors.KafkaStorageError,
            errors.UnknownError,
        )

    # -- configuration --------------------------------------------------------------------------
    def producer_config(self) -> dict[str, Any]:
        """The KafkaProducer keyword arguments built from the settings."""
        s = self.settings
        timeout_ms = max(1, int(self._timeout_s * 1000))
        linger_ms = min(_LINGER_MS, timeout_ms // 2)
        config: dict[str, Any] = {
            "bootstrap_servers": list(s.bootstrap_servers),
            "client_id": s.client_id,
            "acks": "all",
            "enable_idempotence": True,  # explicit: a conflict raises instead of turning it off
            "compression_type": None if s.compression == "none" else s.compression,
            "linger_ms": linger_ms,
            "batch_size": min(_BATCH_BYTES, s.max_message_bytes),
            "max_request_size": s.max_message_bytes,
            "max_block_ms": timeout_ms,
            "request_timeout_ms": max(1, timeout_ms - linger_ms),
            "delivery_timeout_ms": timeout_ms,
            "bootstrap_timeout_ms": timeout_ms,
            "reconnect_backoff_max_ms": _RECONNECT_BACKOFF_MAX_MS,
        }
        protocol = ("SASL_" if s.sasl_mechanism else "") + ("SSL" if s.tls else "PLAINTEXT")
        config["security_protocol"] = protocol
        if s.tls:
            config["ssl_context"] = self._ssl
            config["ssl_check_hostname"] = not s.insecure
        if s.sasl_mechanism:
            config["sasl_mechanism"] = s.sasl_mechanism
            config["sasl_plain_username"] = s.sasl_username
            config["sasl_plain_password"] = s.sasl_password
        return config

    @property
    def producer_id(self) -> int | None:
        """The idempotent producer's id as granted by the broker (None before the first send)."""
        manager = getattr(self._producer, "_transaction_manager", None)  # kafka-python internals
        if manager is None or not manager.has_producer_id():
            return None
        return int(manager.producer_id_and_epoch.producer_id)

    # -- Sink protocol ----------------------------------------------------------------------------
    def open(self) -> None:
        if self._producer is None:
            self._connect()

    def write_batch(self, records: Sequence[Envelope]) -> None:
        if not records:
            return
        producer = self._producer if self._producer is not None else self._connect()
        deadline = time.monotonic() + self._timeout_s
        send = producer.send
        futures: list[Any] = [None] * len(records)
        send_errors: dict[int, BaseException] = {}
        give_up: BaseException | None = None  # an error every later send would meet too
        for i, record in enumerate(records):
            cls = type(record)
            route = self._routes[cls] if cls in self._routes else self._route(cls)
            if route is None:
                send_errors[i] = _Unroutable(f"no topic for {cls.__name__} records")
                continue
            if give_up is not None:
                send_errors[i] = give_up
                continue
            headers = [
                (_HEADER_SCHEMA_VERSION, self._version(record)),
                (_HEADER_RECORD_TYPE, route.record_type),
            ]
            record_id = getattr(record, "record_id", None)
            if record_id is not None:
                headers.insert(0, (_HEADER_RECORD_ID, record_id.encode()))
            timestamp = getattr(record, "timestamp", None)
            try:
                futures[i] = send(
                    route.topic,
                    value=record.json_bytes(),
                    key=_key(record),
                    headers=headers,
                    timestamp_ms=int(timestamp.timestamp() * 1000) if timestamp is not None else None,
                )
            except self._errors.KafkaTimeoutError as exc:
                # No metadata for the topic within max_block_ms: the others would wait as long.
                give_up = send_errors[i] = exc
            except Exception as exc:  # noqa: BLE001 - judged per record below (too large, bad topic, ...)
                send_errors[i] = exc
                if isinstance(exc, self._errors.IllegalStateError):
                    give_up = exc
        try:
            producer.flush(timeout=max(0.0, deadline - time.monotonic()) + _GRACE_S)
        except self._errors.KafkaError:
            pass  # flush gives up on the first batch still open; each future is looked at below
        self._check(records, futures, send_errors)

    def flush(self) -> None:
        # write_batch returns only once every record is acknowledged or reported failed, so the
        # producer holds nothing between calls; this only bounds a flush nobody needs.
        if self._producer is not None:
            try:
                self._producer.flush(timeout=self._timeout_s)
            except self._errors.KafkaError as exc:
                log.debug("kafka: flush: %s", exc)

    def close(self) -> None:
        self._discard(timeout_s=self._timeout_s)

    # -- records ----------------------------------------------------------------------------------
    def _route(self, cls: type) -> _Route | None:
        if issubclass(cls, ContainerStats):
            route: _Route | None = _Route(self.settings.topic, b"stats")
        elif "Event" in cls.__name__:
            route = _Route(self.settings.events_topic, b"event")
        else:
            route = None
        self._routes[cls] = route
        return route

    def _version(self, record: Envelope) -> bytes:
        version = getattr(record, "schema_version", 0)
        encoded = self._versions.get(version)
        if encoded is None:
            encoded = self._versions[version] = str(version).encode()
        return encoded

    def _check(self, records: Sequence[Envelope], futures: list[Any], send_errors: dict[int, BaseException]) -> None:
        failed: list[int] = []
        rejected: list[int] = []
        first: dict[str, BaseException] = {}
        for i, future in enumerate(futures):
            if future is not None:
                if future.is_done:
                    exc = future.exception
                    if exc is None:
                        continue
                else:
                    exc = _Unresolved(f"no acknowledgement within {self._timeout_s:g} s")
            else:
                exc = send_errors[i]
            retryable, category = self.classify(exc)
            (failed if retryable else rejected).append(i)
            first.setdefault(category, exc)
        if not failed and not rejected:
            return
        if failed:
            # See the module docstring: never send the same records again through a producer
            # whose sequence numbers may already count them.
            self._discard(timeout_s=0.0)
        category = next((c for c in (AUTH, UNREACHABLE, ERROR, REJECTED) if c in first), ERROR)
        exc = first[category]
        topics = sorted({self._routes[type(records[i])].topic for i in failed + rejected if self._routes.get(type(records[i]))})
        message = (
            f"kafka {','.join(topics) or '-'}: {len(failed)} of {len(records)} records failed"
            f"{f', {len(rejected)} rejected' if rejected else ''}: {_describe(exc)}"
        )
        if failed and len(failed) == len(records):
            raise SinkError(message, retryable=True, category=category)
        raise PartialFailure(message, failed=failed, rejected=rejected, category=category)

    def classify(self, exc: BaseException) -> tuple[bool, str]:
        """(retryable, category) of one record's failure."""
        if isinstance(exc, self._auth_errors):
            return True, AUTH
        if isinstance(exc, self._unreachable_errors):
            return True, UNREACHABLE
        if isinstance(exc, self._state_errors) or (isinstance(exc, self._errors.KafkaError) and exc.retriable):
            return True, ERROR
        return False, REJECTED

    # -- the producer -------------------------------------------------------------------------------
    def _connect(self) -> Any:
        deadline = time.monotonic() + self._timeout_s
        sasl_refusal = self._check_path(deadline)
        config = self.producer_config()
        config["bootstrap_timeout_ms"] = max(1, int((deadline - time.monotonic()) * 1000))
        try:
            producer = self._kafka.KafkaProducer(**config)
        except Exception as exc:  # noqa: BLE001 - every failure to connect becomes a SinkError
            raise self._connect_error(exc, sasl_refusal) from exc
        self._producer = producer
        log.info("kafka: producer connected to %s", ",".join(self.settings.bootstrap_servers))
        return producer

    def _connect_error(self, exc: Exception, sasl_refusal: str | None) -> SinkError:
        target = ",".join(self.settings.bootstrap_servers)
        if isinstance(exc, self._auth_errors):
            return SinkError(f"kafka {target}: authentication failed: {exc}", category=AUTH)
        if sasl_refusal is not None:
            return SinkError(f"kafka {target}: {sasl_refusal}", category=AUTH)
        if isinstance(exc, self._unreachable_errors):
            return SinkError(f"kafka {target}: {_describe(exc)}", category=UNREACHABLE)
        return SinkError(f"kafka {target}: cannot build the producer: {_describe(exc)}", category=ERROR)

    def _discard(self, timeout_s: float) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            producer.close(timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - closing must not fail the caller
            # kafka-python's close() flushes first and, when that times out, raises before it
            # stops its I/O thread: stop it here (its unsent batches fail).
            log.debug("kafka: closing the producer: %s", exc)
            sender = getattr(producer, "_sender", None)
            if sender is not None:
                sender.force_close()
                sender.join(max(1.0, timeout_s))
            producer._closed = True

    def _check_path(self, deadline: float) -> str | None:
        """Connect to the bootstrap servers in turn as the producer would; raise SinkError when
        none can be reached. Returns why the SASL exchange was refused, if it was (the producer
        is tried all the same: the verdict is taken only once it has failed too)."""
        errors: list[SinkError] = []
        refusal: str | None = None
        for host, port in self._servers:
            try:
                refusal = _check_server(host, port, self.settings, self._ssl, deadline)
            except SinkError as exc:
                errors.append(exc)
                continue
            return refusal
        assert errors
        raise next((e for e in errors if e.category == AUTH), errors[0])


def _describe(exc: BaseException) -> str:
    text = str(exc)
    name = type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}"


def _key(record: Envelope) -> bytes | None:
    container = getattr(record, "container", None)
    if container is not None:
        ident = getattr(container, "id", None) or getattr(container, "name", None)
    else:
        ident = getattr(record, "container_id", None) or getattr(record, "container_name", None)
    return ident.encode() if ident else None


# -- the connection check ------------------------------------------------------------------------
# Just enough of the Kafka protocol for ApiVersions and the SASL exchange (KIP-43, KIP-152).
_API_VERSIONS, _SASL_HANDSHAKE, _SASL_AUTHENTICATE = 18, 17, 36
_KAFKA_ERRORS = {33: "UNSUPPORTED_SASL_MECHANISM", 34: "ILLEGAL_SASL_STATE", 58: "SASL_AUTHENTICATION_FAILED"}


def _check_server(host: str, port: int, s: KafkaSettings, ctx: ssl.SSLContext | None, deadline: float) -> str | None:
    where = f"kafka {host}:{port}"

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        return left

    try:
        sock = socket.create_connection((host, port), timeout=remaining())
    except socket.gaierror as exc:
        raise SinkError(f"{where}: cannot resolve the host name: {exc}", category=UNREACHABLE) from exc
    except OSError as exc:
        raise SinkError(f"{where}: cannot connect: {exc}", category=UNREACHABLE) from exc
    try:
        if ctx is not None:
            try:
                sock = ctx.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
                sock.settimeout(remaining())
                sock.do_handshake()
            except ssl.SSLCertVerificationError as exc:
                raise SinkError(f"{where}: TLS certificate verification failed: {exc.verify_message}", category=AUTH) from exc
        wire = _Wire(sock, s.client_id, remaining)
        try:
            try:
                wire.request(_API_VERSIONS, 0, b"")
            except (ssl.SSLEOFError, ConnectionError) as exc:
                if ctx is None:
                    raise
                # TLS 1.3 refuses a client certificate (or its absence) only after the client
                # has finished its handshake: the first read finds the alert, or just the end.
                raise SinkError(
                    f"{where}: the broker closed the TLS connection right after the handshake ({exc}): "
                    "does it want a client certificate (tls_cert) it did not get, or refuse the one it got?",
                    category=AUTH,
                ) from exc
            if s.sasl_mechanism:
                return _sasl(wire, s)
        except ConnectionError as exc:
            if s.sasl_mechanism and wire.in_sasl:
                # tansu, for one, drops the connection on a mechanism it does not offer.
                return f"the broker closed the connection during SASL {s.sasl_mechanism} authentication"
            raise SinkError(f"{where}: the connection was closed: {exc}", category=UNREACHABLE) from exc
        return None
    except ssl.SSLError as exc:
        reason = exc.reason or ""
        category = AUTH if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason else ERROR
        raise SinkError(f"{where}: TLS: {exc}", category=category) from exc
    except TimeoutError as exc:
        raise SinkError(f"{where}: no answer within {s.timeout:g} s", category=UNREACHABLE) from exc
    except OSError as exc:
        raise SinkError(f"{where}: {exc}", category=UNREACHABLE) from exc
    except (struct.error, ValueError, IndexError) as exc:
        raise SinkError(f"{where}: an answer that is not Kafka's: {exc!r}", category=ERROR) from exc
    finally:
        sock.close()


class _Wire:
    def __init__(self, sock: socket.socket, client_id: str, remaining: Any) -> None:
        self.sock = sock
        self.client_id = client_id.encode()
        self.remaining = remaining
        self.correlation_id = 0
        self.in_sasl = False

    def request(self, api_key: int, version: int, body: bytes) -> bytes:
        self.correlation_id += 1
        header = struct.pack(">hhih", api_key, version, self.correlation_id, len(self.client_id)) + self.client_id
        message = header + body
        self.sock.settimeout(self.remaining())
        self.sock.sendall(struct.pack(">i", len(message)) + message)
        (size,) = struct.unpack(">i", self._recv(4))
        response = self._recv(size)
        if struct.unpack(">i", response[:4])[0] != self.correlation_id:
            raise ConnectionError("answer out of order")
        return response[4:]

    def _recv(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            self.sock.settimeout(self.remaining())
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by the broker")
            data += chunk
        return bytes(data)

    def authenticate(self, token: bytes) -> tuple[int, str | None, bytes]:
        body = self.request(_SASL_AUTHENTICATE, 0, struct.pack(">i", len(token)) + token)
        (error,) = struct.unpack(">h", body[:2])
        (msg_len,) = struct.unpack(">h", body[2:4])
        pos = 4
        message = None
        if msg_len >= 0:
            message = body[pos : pos + msg_len].decode(errors="replace")
            pos += msg_len
        (auth_len,) = struct.unpack(">i", body[pos : pos + 4])
        return error, message, body[pos + 4 : pos + 4 + max(auth_len, 0)]


def _sasl(wire: _Wire, s: KafkaSettings) -> str | None:
    """The SASL exchange; why it was refused, or None."""
    mechanism = s.sasl_mechanism
    assert mechanism is not None and s.sasl_username is not None and s.sasl_password is not None
    wire.in_sasl = True
    name = mechanism.encode()
    body = wire.request(_SASL_HANDSHAKE, 1, struct.pack(">h", len(name)) + name)
    (error, count) = struct.unpack(">hi", body[:6])
    offered, pos = [], 6
    for _ in range(max(count, 0)):
        (length,) = struct.unpack(">h", body[pos : pos + 2])
        offered.append(body[pos + 2 : pos + 2 + length].decode(errors="replace"))
        pos += 2 + length
    if error or mechanism not in offered:
        return f"SASL {mechanism} refused: the broker offers {', '.join(offered) or 'nothing'} ({_KAFKA_ERRORS.get(error, error)})"

    def refused(error: int, message: str | None) -> str:
        return f"SASL {mechanism} authentication as {s.sasl_username!r} refused: {message or _KAFKA_ERRORS.get(error, error)}"

    if mechanism == "PLAIN":
        error, message, _ = wire.authenticate(b"\0" + s.sasl_username.encode() + b"\0" + s.sasl_password.encode())
        return refused(error, message) if error else None
    nonce = base64.b64encode(os.urandom(24)).decode()
    first_bare = scram_client_first_bare(s.sasl_username, nonce)
    error, message, server_first = wire.authenticate(b"n,," + first_bare.encode())
    if error:
        return refused(error, message)
    server_first_text = server_first.decode(errors="replace")
    if server_first_text.startswith("e="):
        return refused(0, server_first_text[2:])
    try:
        final, server_signature = scram_client_final(mechanism, s.sasl_password, first_bare, server_first_text, nonce)
    except ValueError as exc:
        return refused(0, str(exc))
    error, message, server_final = wire.authenticate(final.encode())
    if error:
        return refused(error, message)
    attributes = dict(part.split("=", 1) for part in server_final.decode(errors="replace").split(",") if "=" in part)
    if "e" in attributes:
        return refused(0, attributes["e"])
    if attributes.get("v") != server_signature:
        return refused(0, "the server's signature does not match (not the broker we think it is?)")
    return None


def scram_client_first_bare(username: str, nonce: str) -> str:
    """RFC 5802 client-first-message-bare."""
    return f"n={username.replace('=', '=3D').replace(',', '=2C')},r={nonce}"


def scram_client_final(mechanism: str, password: str, client_first_bare: str, server_first: str, nonce: str) -> tuple[str, str]:
    """RFC 5802 client-final-message and the server signature expected in server-final
    (base64), for SCRAM-SHA-256 / SCRAM-SHA-512."""
    digest = {"SCRAM-SHA-256": hashlib.sha256, "SCRAM-SHA-512": hashlib.sha512}[mechanism]
    attributes = dict(part.split("=", 1) for part in server_first.split(",") if "=" in part)
    server_nonce, salt, iterations = attributes.get("r", ""), attributes.get("s"), attributes.get("i", "")
    if not server_nonce.startswith(nonce) or salt is None or not iterations.isdigit():
        raise ValueError(f"unexpected server-first-message {server_first!r}")
    salted = hashlib.pbkdf2_hmac(digest().name, password.encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", digest).digest()
    stored_key = digest(client_key).digest()
    without_proof = f"c=biws,r={server_nonce}"
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    client_signature = hmac.new(stored_key, auth_message, digest).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, client_signature, strict=True))
    server_key = hmac.new(salted, b"Server Key", digest).digest()
    server_signature = hmac.new(server_key, auth_message, digest).digest()
    return f"{without_proof},p={base64.b64encode(proof).decode()}", base64.b64encode(server_signature).decode()
