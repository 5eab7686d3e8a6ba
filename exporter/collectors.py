"""Application ("custom") metrics: cAdvisor's collector manager.

A container labelled ``io.cadvisor.metric.<name>=<path>`` names a JSON config file at ``<path>``
*inside the container*; it is read through ``<proc_root>/<pid>/root`` of one of the container's
tasks. The config names an HTTP(S) endpoint and either

- the Prometheus text format (``"type": "prometheus"``, or a label name starting with
  ``prometheus`` as in cAdvisor), optionally keeping only the metrics named in
  ``"metrics_config": ["name", ...]``; or
- any text, with one regular expression per metric (``"metrics_config": [{"name", "metric_type",
  "units", "data_type", "polling_frequency", "regex"}, ...]``): the first group is the value.

Each collector is one scheduler job (``collector:<container>:<name>``) on its own interval; the job
only hands the scrape to a small pool of collector threads, so a slow endpoint never holds a
housekeeping worker. Results wait in memory until the container's next housekeeping tick asks for
them (:meth:`CollectorManager.latest`); values older than two intervals are not reported.

Endpoints are container-local, as in cAdvisor: the URL's host must be ``localhost``,
``127.0.0.1`` or ``::1`` and means the container's own loopback. cAdvisor rewrites it to the
container's IP address; we connect inside the container's network namespace instead (setns(2) on
the scraping thread, only while the socket is created), which also reaches servers bound to the
container's loopback and containers with no address at all (``--network none``, ``--bridge=none``).
A container sharing our network namespace (``--network host``) is reached without setns.
"""

from __future__ import annotations

import ctypes
import errno
import http.client
import json
import logging
import math
import os
import re
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from exporter.cgroups.files import read_bytes
from exporter.clock import Clock
from exporter.config import ConfigError
from exporter.durations import parse_duration
from exporter.models import CustomMetricSpec, CustomMetricValue

if TYPE_CHECKING:
    from exporter.housekeeping import Scheduler
    from exporter.manager import Container

log = logging.getLogger(__name__)

LABEL_PREFIX = "io.cadvisor.metric."
# cAdvisor: "Minimum supported frequency is 1s"; an unset polling_frequency is clamped to it too.
MIN_INTERVAL_S = 1.0
# Values older than this many intervals are no longer reported: one missed scrape is tolerated.
STALE_INTERVALS = 2
# A container is announced when its cgroup appears, before its runtime has finished setting up
# its root filesystem; its config file is looked for again every MIN_INTERVAL_S for this long.
CONFIG_WAIT_S = 60.0
MAX_CONFIG_BYTES = 1 << 20
MAX_BODY_BYTES = 16 << 20
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
ACCEPT_PROMETHEUS = "text/plain;version=0.0.4;q=1,*/*;q=0.1"
USER_AGENT = "container-exporter"

Values = dict[str, list[CustomMetricValue]]


class CollectorConfigError(ValueError):
    """A collector config that cannot be used; the message names the container and the file."""


class ScrapeError(Exception):
    """A scrape that failed; ``kind`` is one of connect, timeout, tls, http, response, parse, limit."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# -- config ---------------------------------------------------------------------------------------


def _polling_frequency(value: object) -> float:
    # cAdvisor reads a string as a Go duration ("10s") and a bare number as a time.Duration, i.e.
    # nanoseconds, so its documented `"polling_frequency": 10` really means 10 ns (clamped to 1 s).
    # A bare number here is seconds, which is what that example means.
    return parse_duration(value)


PollingFrequency = Annotated[float, BeforeValidator(_polling_frequency)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(_Model):
    """How to check the endpoint's certificate. Without ``ca_file`` it is not checked, as cAdvisor
    (InsecureSkipVerify): the endpoint is addressed as localhost, not by a name a CA could vouch for."""

    ca_file: str | None = Field(None, description="CA bundle (PEM), a path inside the container")
    server_name: str | None = Field(None, description="name to verify and send as SNI; default: the URL's host")


class Endpoint(_Model):
    url: str
    tls: TlsConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _forms(cls, value: Any) -> Any:
        # cAdvisor's two forms: a URL string, or {"protocol", "port", "path"} on the container's
        # address. Ours adds {"url": ..., "tls": {...}}.
        if isinstance(value, str):
            return {"url": value}
        if isinstance(value, dict) and "url" not in value and ("protocol" in value or "port" in value):
            rest = {k: v for k, v in value.items() if k not in ("protocol", "port", "path")}
            protocol, port, path = value.get("protocol"), value.get("port"), value.get("path") or "/"
            if not protocol or port in (None, ""):
                raise ValueError(f"an endpoint without url needs both protocol and port, got protocol={protocol!r} port={port!r}")
            if not str(path).startswith("/"):
                path = f"/{path}"
            return {**rest, "url": f"{protocol}://localhost:{port}{path}"}
        return value

    @field_validator("url")
    @classmethod
    def _local(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError(f"bad port in {url!r}") from None
        host = (parts.hostname or "").lower()
        if host not in LOCAL_HOSTS:
            # cAdvisor treats endpoints as container-local and refuses any other host, so a
            # workload's config cannot make the exporter fetch from elsewhere on the network.
            raise ValueError(f"host {parts.hostname!r} is not allowed: endpoints are container-local, use localhost, 127.0.0.1 or ::1")
        return url

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def host(self) -> str:
        return (urlsplit(self.url).hostname or "").lower()

    @property
    def address(self) -> str:
        return "::1" if self.host == "::1" else "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (443 if self.scheme == "https" else 80)

    @property
    def target(self) -> str:
        parts = urlsplit(self.url)
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


class PrometheusConfig(_Model):
    type: Literal["prometheus"] = "prometheus"
    endpoint: Endpoint
    polling_frequency: PollingFrequency = 0.0
    metrics_config: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="metric (family or sample) names to keep; all when absent"
    )

    def interval_s(self, minimum: float) -> float:
        return max(self.polling_frequency, minimum)

    @property
    def declared(self) -> int:
        return len(set(self.metrics_config or ()))


class GenericMetricConfig(_Model):
    name: str = Field(min_length=1)
    # cAdvisor's MetricType spells a counter "cumulative".
    metric_type: Literal["gauge", "counter", "cumulative"] = "gauge"
    units: str | None = None
    data_type: Literal["int", "float"] = "float"
    polling_frequency: PollingFrequency = 0.0
    regex: str

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            groups = re.compile(value).groups
        except re.error as exc:
            raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
        if groups < 1:
            raise ValueError(f"regular expression {value!r} has no group: the first group is the value")
        return value

    @property
    def spec(self) -> CustomMetricSpec:
        kind: Literal["gauge", "counter"] = "gauge" if self.metric_type == "gauge" else "counter"
        return CustomMetricSpec(name=self.name, type=kind, format=self.data_type, units=self.units or None)


class GenericConfig(_Model):
    type: Literal["generic"] = "generic"
    endpoint: Endpoint
    metrics_config: list[GenericMetricConfig] = Field(min_length=1)

    @field_validator("metrics_config")
    @classmethod
    def _unique(cls, value: list[GenericMetricConfig]) -> list[GenericMetricConfig]:
        names = [m.name for m in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"metric(s) defined twice: {', '.join(twice)}")
        return value

    def interval_s(self, minimum: float) -> float:
        # cAdvisor: the smallest polling_frequency that is set; at least the minimum.
        frequencies = [m.polling_frequency for m in self.metrics_config if m.polling_frequency > 0]
        return max(min(frequencies, default=0.0), minimum)

    @property
    def declared(self) -> int:
        return len(self.metrics_config)


CollectorConfig = PrometheusConfig | GenericConfig


def collector_configs(labels: dict[str, str]) -> dict[str, str]:
    """``io.cadvisor.metric.<name>=<path>`` labels → {name: path}."""
    return {k[len(LABEL_PREFIX) :]: v for k, v in labels.items() if k.startswith(LABEL_PREFIX) and len(k) > len(LABEL_PREFIX)}


def parse_config(data: bytes, collector: str, where: str) -> CollectorConfig:
    """A config file's bytes → its model. ``where`` ("container X: /path (label ...)") starts every
    error message."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CollectorConfigError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CollectorConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    kind = raw.get("type")
    if kind is None:
        # cAdvisor decides by the label: io.cadvisor.metric.prometheus-* is Prometheus.
        kind = "prometheus" if collector[:10].lower() == "prometheus" else "generic"
    if kind == "generic":
        metrics = raw.get("metrics_config")
        if not metrics or (isinstance(metrics, list) and all(isinstance(m, str) for m in metrics)):
            raise CollectorConfigError(
                f"{where}: a generic config needs metrics_config rules ({{\"name\": ..., \"regex\": ...}}); "
                'for a Prometheus endpoint set "type": "prometheus" or name the label io.cadvisor.metric.prometheus-<name>'
            )
    model: type[CollectorConfig]
    if kind == "prometheus":
        model = PrometheusConfig
    elif kind == "generic":
        model = GenericConfig
    else:
        raise CollectorConfigError(f"{where}: unknown type {kind!r}: expected \"prometheus\" or \"generic\"")
    try:
        return model.model_validate({**raw, "type": kind})
    except ValidationError as exc:
        raise CollectorConfigError(f"{where}: " + "; ".join(_describe(e) for e in exc.errors())) from None


def _describe(error: Any) -> str:
    key = ".".join(str(p) for p in error["loc"])
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"unknown key {key!r}"
    if error["type"] not in ("value_error", "assertion_error") and "input" in error:
        msg = f"{msg}, got {str(error['input'])[:80]!r}"
    return f"key {key!r}: {msg}" if key else msg


# -- parsing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scrape:
    """What one response gave: values, their specs, and an error when only part of it was usable."""

    values: Values
    specs: list[CustomMetricSpec]
    error: ScrapeError | None = None


_COUNTER_TYPE = re.compile(r"^#\s*TYPE\s+(\S+)\s+counter\s*$", re.M)
_CUMULATIVE_SUFFIXES = ("_bucket", "_count", "_sum")


class PrometheusCollector:
    """The Prometheus text format (or OpenMetrics, when the endpoint answers with it)."""

    accept = ACCEPT_PROMETHEUS

    def __init__(self, config: PrometheusConfig, count_limit: int) -> None:
        self.config = config
        self.keep = frozenset(config.metrics_config) if config.metrics_config else None
        self.count_limit = count_limit

    def declared_specs(self) -> list[CustomMetricSpec]:
        return []  # known from the first scrape

    def parse(self, body: bytes, content_type: str, now: datetime) -> Scrape:
        try:
            text = body.decode()
        except UnicodeDecodeError as exc:
            raise ScrapeError("parse", f"response is not UTF-8: {exc}") from None
        openmetrics = content_type.split(";", 1)[0].strip().lower() == "application/openmetrics-text"
        # prometheus_client renames the samples of a counter typed without "_total" (x → x_total);
        # cAdvisor reports the names as served, so that renaming is undone below.
        served_counters = frozenset() if openmetrics else frozenset(_COUNTER_TYPE.findall(text))
        keep, limit = self.keep, self.count_limit
        values: Values = {}
        kinds: dict[str, Literal["gauge", "counter"]] = {}
        try:
            for family in (parse_openmetrics if openmetrics else parse_text)(text):
                for sample in family.samples:
                    name = sample.name
                    if family.type == "counter" and family.name in served_counters and name == f"{family.name}_total":
                        name = family.name
                    if keep is not None and name not in keep and family.name not in keep:
                        continue
                    value = float(sample.value)
                    if not math.isfinite(value):
                        continue  # NaN/Inf cannot travel in the JSON records
                    ts = now if sample.timestamp is None else datetime.fromtimestamp(float(sample.timestamp), UTC)
                    series = values.get(name)
                    if series is None:
                        if len(values) >= limit:
                            raise ScrapeError("limit", f"more than {limit} metrics (application_metrics_count_limit); nothing kept")
                        series = values[name] = []
                        kinds[name] = _sample_kind(family.type, name, family.name)
                    series.append(CustomMetricValue(labels=dict(sample.labels), value=value, timestamp=ts))
        except ValueError as exc:
            reason = str(exc) or "unparsable line"  # prometheus_client quotes the whole line
            raise ScrapeError("parse", f"not in the Prometheus text format: {reason[:200]}") from None
        specs = [CustomMetricSpec(name=n, type=kinds[n], format="float") for n in values]
        return Scrape(values, specs)


def _sample_kind(family_type: str, sample: str, family: str) -> Literal["gauge", "counter"]:
    if family_type == "counter":
        return "counter"
    if family_type in ("histogram", "summary") and sample != family and sample.endswith(_CUMULATIVE_SUFFIXES):
        return "counter"
    return "gauge"  # gauges, summary quantiles, untyped/unknown, info, stateset


class GenericCollector:
    """Regular expressions over the response: the first group of each is its metric's value."""

    accept = "*/*"

    def __init__(self, config: GenericConfig) -> None:
        self.config = config
        self.rules = [(m, re.compile(m.regex)) for m in config.metrics_config]
        self._specs = [m.spec for m in config.metrics_config]

    def declared_specs(self) -> list[CustomMetricSpec]:
        return list(self._specs)

    def parse(self, body: bytes, content_type: str, now: datetime) -> Scrape:
        text = body.decode(errors="replace")
        values: Values = {}
        problems = []
        for metric, regex in self.rules:
            match = regex.search(text)
            raw = match.group(1) if match is not None else None
            if raw is None:
                problems.append(f"no match for regex {metric.regex!r} of metric {metric.name}")
                continue
            try:
                value = float(int(raw.strip())) if metric.data_type == "int" else float(raw.strip())
            except ValueError:
                problems.append(f"metric {metric.name}: {raw.strip()[:40]!r} is not {'an int' if metric.data_type == 'int' else 'a float'}")
                continue
            values[metric.name] = [CustomMetricValue(value=value, timestamp=now)]
        error = ScrapeError("parse", "; ".join(problems)) if problems else None
        return Scrape(values, self._specs, error)


Collector = PrometheusCollector | GenericCollector


# -- files and sockets inside a container --------------------------------------------------------


def read_in_root(root: str | Path, path: str, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """The regular file ``path`` as seen by a process whose root is ``root``.

    Symlinks are followed by hand, inside ``root``, like openat2's RESOLVE_IN_ROOT: through
    /proc/<pid>/root the kernel would resolve an absolute symlink against *our* root, so a
    container could otherwise point the exporter at a host file.
    """
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute path")
    stack = [os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)]
    todo = [p for p in reversed(path.split("/")) if p]
    links = 0
    try:
        while todo:
            part = todo.pop()
            if part == ".":
                continue
            if part == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            st = os.stat(part, dir_fd=stack[-1], follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > 40:
                    raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
                target = os.readlink(part, dir_fd=stack[-1])
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                todo.extend(p for p in reversed(target.split("/")) if p)
                continue
            if todo:
                if not stat.S_ISDIR(st.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
                stack.append(os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1]))
                continue
            if stat.S_ISDIR(st.st_mode):
                break
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", path)
            fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=stack[-1])
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise OSError(errno.EINVAL, "not a regular file", path)
                chunks, size = [], 0
                while size <= limit and (chunk := os.read(fd, 65536)):
                    chunks.append(chunk)
                    size += len(chunk)
            finally:
                os.close(fd)
            if size > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
            return b"".join(chunks)
        raise IsADirectoryError(errno.EISDIR, "is a directory", path)
    finally:
        for fd in stack:
            os.close(fd)


_CLONE_NEWNET = 0x40000000


class NetnsSockets:
    """TCP sockets created in another network namespace.

    setns(2) moves only the calling thread; the socket keeps the namespace it was created in, so
    the thread goes back at once and connects from its own namespace.
    """

    def __init__(self) -> None:
        self._own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(self._own)
        self.own_id = (st.st_dev, st.st_ino)
        self._libc = ctypes.CDLL(None, use_errno=True)

    def _setns(self, fd: int) -> None:
        if self._libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def socket(self, netns_fd: int | None, family: int) -> socket.socket:
        if netns_fd is None:
            return socket.socket(family, socket.SOCK_STREAM)
        try:
            self._setns(netns_fd)
        except OSError as exc:
            hint = " (needs CAP_SYS_ADMIN)" if exc.errno == errno.EPERM else ""
            raise ScrapeError("connect", f"cannot enter the container's network namespace{hint}: {exc.strerror}") from None
        try:
            return socket.socket(family, socket.SOCK_STREAM)
        finally:
            try:
                self._setns(self._own)
            except OSError as exc:
                # This thread now stays in the container's namespace; nothing sensible can go on.
                raise RuntimeError(f"cannot return to the exporter's network namespace: {exc.strerror}") from None

    def close(self) -> None:
        if self._own >= 0:
            os.close(self._own)
            self._own = -1


def fetch(
    endpoint: Endpoint,
    make_socket: Callable[[int], socket.socket],
    tls: ssl.SSLContext | None,
    timeout_s: float,
    accept: str,
    client_cert: bool = False,
) -> tuple[str, bytes]:
    """GET the endpoint within ``timeout_s`` in all: (content type, body)."""
    # Real time, whatever clock the manager runs on: this is a socket timeout.
    deadline = time.monotonic() + timeout_s

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    sock: socket.socket | None = None
    conn: http.client.HTTPConnection | None = None
    tls_up = False
    try:
        sock = make_socket(socket.AF_INET6 if endpoint.address == "::1" else socket.AF_INET)
        sock.settimeout(remaining())
        sock.connect((endpoint.address, endpoint.port))
        if endpoint.scheme == "https":
            assert tls is not None
            server_name = endpoint.tls.server_name if endpoint.tls and endpoint.tls.server_name else endpoint.host
            sock.settimeout(remaining())
            sock = tls.wrap_socket(sock, server_hostname=server_name)
            tls_up = True
        conn = http.client.HTTPConnection(endpoint.host, endpoint.port)
        conn.sock = sock
        conn.request("GET", endpoint.target, headers={"Accept": accept, "User-Agent": USER_AGENT})
        sock.settimeout(remaining())
        response = conn.getresponse()
        if response.status != 200:
            raise ScrapeError("http", f"{endpoint.url} answered HTTP {response.status} {response.reason}")
        chunks, size = [], 0
        while not response.isclosed():  # closed (with the socket) once the body is complete
            sock.settimeout(remaining())
            chunk = response.read(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ScrapeError("response", f"{endpoint.url}: response larger than {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        return response.getheader("Content-Type", ""), b"".join(chunks)
    except TimeoutError:  # socket.timeout is TimeoutError
        raise ScrapeError("timeout", f"{endpoint.url}: no complete answer within {timeout_s:g} s") from None
    except ssl.SSLError as exc:
        raise ScrapeError("tls", f"{endpoint.url}: TLS error: {exc.reason or exc}{_client_cert_hint(exc, tls_up, client_cert)}") from None
    except ConnectionRefusedError:
        raise ScrapeError("connect", f"{endpoint.url}: connection refused") from None
    except (ConnectionResetError, http.client.RemoteDisconnected) as exc:
        if tls_up and not client_cert:
            raise ScrapeError("tls", f"{endpoint.url}: TLS connection closed by the endpoint{_client_cert_hint(exc, tls_up, client_cert)}") from None
        raise ScrapeError("response", f"{endpoint.url}: connection closed by the endpoint") from None
    except http.client.HTTPException as exc:
        raise ScrapeError("response", f"{endpoint.url}: bad HTTP response: {exc!r}") from None
    except OSError as exc:
        raise ScrapeError("connect", f"{endpoint.url}: {exc.strerror or exc}") from None
    finally:
        if conn is not None:
            conn.close()
        elif sock is not None:
            sock.close()


def _client_cert_hint(exc: Exception, tls_up: bool, client_cert: bool) -> str:
    if client_cert:
        return ""
    if "CERTIFICATE_REQUIRED" in str(exc).upper().replace(" ", "_"):
        return " (the endpoint wants a client certificate: set collector_cert and collector_key)"
    # TLS 1.3 servers check the client's certificate after the client's side of the handshake is
    # done: the refusal arrives as an alert on the first read, or as a plain close or reset when
    # the server drops the connection with the request unread.
    if tls_up:
        return " (no client certificate was sent: if the endpoint wants one, set collector_cert and collector_key)"
    return ""


def client_tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """The context of endpoints without a CA of their own: no server check (as cAdvisor), and the
    collector certificate when one is configured."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


# -- the manager ----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    container: str
    name: str
    path: str
    job_id: str
    procs_path: str | None
    added_at: float
    interval_s: float
    state: Literal["pending", "active", "refused"] = "pending"
    collector: Collector | None = None
    endpoint: Endpoint | None = None
    tls: ssl.SSLContext | None = None
    netns_fd: int | None = None
    declared: int = 0
    # (values, specs, monotonic time of the response); replaced as a whole, read without a lock.
    result: tuple[Values, list[CustomMetricSpec], float] | None = None
    failures: int = 0
    closed: bool = False
    run_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def where(self) -> str:
        return f"container {self.container}: {self.path} (label {LABEL_PREFIX}{self.name})"


class CollectorManager:
    """cAdvisor's collector manager, as a manager listener: labels → configs → one job each."""

    def __init__(
        self,
        proc_root: str | Path,
        scheduler: Scheduler,
        clock: Clock,
        cert: Path | None = None,
        key: Path | None = None,
        count_limit: int = 100,
        timeout_s: float = 5.0,
        workers: int = 2,
        min_interval_s: float = MIN_INTERVAL_S,
        config_wait_s: float = CONFIG_WAIT_S,
        rootfs: str | Path | None = None,
    ) -> None:
        if (cert is None) != (key is None):
            raise ConfigError(["collector_cert and collector_key must be set together"])
        try:
            self._tls = client_tls_context(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([f"collector_cert {cert} / collector_key {key}: cannot be used: {exc}"]) from None
        self.proc_root = str(proc_root)
        self.scheduler = scheduler
        self.clock = clock
        self.cert, self.key = cert, key
        self.count_limit = count_limit
        self.timeout_s = timeout_s
        self.min_interval_s = min_interval_s
        self.config_wait_s = config_wait_s
        self._sockets = NetnsSockets()
        # Roots that are not a container's: the host's (pid 1's when we may look, and ``rootfs``,
        # the host's / as the exporter sees it) and ours.
        roots = [f"{self.proc_root}/1/root", "/", *([str(rootfs)] if rootfs is not None else [])]
        self._foreign_roots = {r for r in map(_file_id, roots) if r is not None}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="collector")
        self._jobs: dict[str, dict[str, _Job]] = {}  # container → collector name → job
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._closed = False

    # -- listener protocol ------------------------------------------------------------------------
    def container_added(self, container: Container) -> None:
        self._sync(container)

    def container_updated(self, container: Container) -> None:
        """Labels may arrive late (a runtime unreachable at discovery): add and drop collectors."""
        self._sync(container)

    def container_removed(self, container: Container) -> None:
        with self._lock:
            jobs = self._jobs.pop(container.name, {})
        for job in jobs.values():
            self._drop(job)

    # -- queries ----------------------------------------------------------------------------------
    def latest(self, name: str) -> Values | None:
        """The last scraped values of each metric of the container, or None when there are none
        fresher than two intervals. Called on every housekeeping tick of every container."""
        by_name = self._jobs.get(name)
        if not by_name:
            return None
        with self._lock:
            jobs = list(by_name.values())
        now = self.clock.monotonic()
        merged: Values = {}
        for job in jobs:
            result = job.result
            if result is None or now - result[2] > STALE_INTERVALS * job.interval_s:
                continue
            for metric, values in result[0].items():
                merged[metric] = [*merged[metric], *values] if metric in merged else values
        return merged or None

    def specs(self, name: str) -> list[CustomMetricSpec]:
        """What the container's active collectors provide: generic ones as configured, Prometheus
        ones as their last successful scrape found."""
        by_name = self._jobs.get(name)
        if not by_name:
            return []
        with self._lock:
            jobs = list(by_name.values())
        specs: dict[str, CustomMetricSpec] = {}
        for job in jobs:
            if job.state != "active" or job.collector is None:
                continue
            result = job.result
            for spec in result[1] if result is not None else job.collector.declared_specs():
                specs.setdefault(spec.name, spec)
        return list(specs.values())

    def stats(self) -> dict[str, int]:
        """Counters: configs_loaded, configs_refused, configs_missing, scrapes, scrape_errors,
        scrape_errors_<kind>, scrapes_skipped (still running at the next interval); and the
        collectors active and pending now."""
        with self._lock:
            out = dict(self._counts)
            jobs = [j for by_name in self._jobs.values() for j in by_name.values()]
        out["collectors_active"] = sum(j.state == "active" for j in jobs)
        out["collectors_pending"] = sum(j.state == "pending" for j in jobs)
        return out

    def poll(self, name: str) -> None:
        """Run the container's collectors now, in this thread (one-shot collection, tests)."""
        with self._lock:
            jobs = list(self._jobs.get(name, {}).values())
        for job in jobs:
            if job.run_lock.acquire(timeout=self.timeout_s + 1.0):
                self._run(job)

    def close(self) -> None:
        """Stop every collector; a second call does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            jobs = [j for by_name in self._jobs.values() for j in by_name.values()]
            self._jobs.clear()
        for job in jobs:
            self._drop(job)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._sockets.close()

    # -- internals --------------------------------------------------------------------------------
    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def _sync(self, container: Container) -> None:
        wanted = collector_configs(container.ref.labels)
        procs = container.reader.cgroup.procs
        procs_path = None if procs is None else procs.path
        added, dropped = [], []
        with self._lock:
            if self._closed:
                return
            jobs = self._jobs.setdefault(container.name, {})
            for name in [n for n, j in jobs.items() if wanted.get(n) != j.path]:
                dropped.append(jobs.pop(name))
            for name, path in wanted.items():
                if name not in jobs:
                    job = _Job(container.name, name, path, f"collector:{container.name}:{name}", procs_path,
                               self.clock.monotonic(), self.min_interval_s)
                    jobs[name] = job
                    added.append(job)
            if not jobs:
                del self._jobs[container.name]
        for job in dropped:
            self._drop(job)
        for job in added:
            self.scheduler.add(job.job_id, lambda job=job: self._tick(job), job.interval_s, 0.0)

    def _drop(self, job: _Job) -> None:
        self.scheduler.remove(job.job_id)
        with self._lock:
            job.closed = True
            idle = job.run_lock.acquire(blocking=False)
        if idle:
            self._release(job)
            job.run_lock.release()
        # else the running scrape releases the job's resources when it ends

    @staticmethod
    def _release(job: _Job) -> None:
        job.result = None
        if job.netns_fd is not None:
            os.close(job.netns_fd)
            job.netns_fd = None

    def _tick(self, job: _Job) -> None:
        """The scheduler job: hand the scrape to the collector threads, unless it still runs."""
        if not job.run_lock.acquire(blocking=False):
            self._count("scrapes_skipped")
            return
        try:
            self._pool.submit(self._run, job)
        except RuntimeError:  # the pool is shut down
            job.run_lock.release()

    def _run(self, job: _Job) -> None:
        """With ``job.run_lock`` held; releases it."""
        try:
            if not job.closed:
                if job.state == "pending":
                    self._setup(job)
                if job.state == "active" and not job.closed:
                    self._scrape(job)
        except Exception:
            log.exception("%s: collector failed", job.where)
        finally:
            with self._lock:
                closed = job.closed
                job.run_lock.release()
            if closed and job.run_lock.acquire(blocking=False):
                self._release(job)
                job.run_lock.release()

    def _task(self, job: _Job) -> int | None:
        """A task of the container whose root is the container's own. When the cgroup appears it
        may hold only the runtime's helper, whose root is still the host's (in the host's mount
        namespace, or in a fresh copy of it before pivot_root): through it the config's path would
        name a host file."""
        data = read_bytes(job.procs_path) if job.procs_path is not None else None
        for pid in (data or b"").split():
            root = _file_id(f"{self.proc_root}/{pid.decode()}/root")
            if root is not None and root not in self._foreign_roots:
                return int(pid)
        return None

    def _setup(self, job: _Job) -> None:
        pid = self._task(job)
        try:
            if pid is None:
                raise FileNotFoundError(errno.ESRCH, "the container has no task of its own yet")
            root = f"{self.proc_root}/{pid}/root"
            config = parse_config(read_in_root(root, job.path), job.name, job.where)
            collector: Collector
            if isinstance(config, PrometheusConfig):
                collector = PrometheusCollector(config, self.count_limit)
            else:
                collector = GenericCollector(config)
            tls = self._tls
            if config.endpoint.tls is not None and config.endpoint.tls.ca_file is not None:
                tls = self._verifying_context(root, config.endpoint.tls.ca_file, job)
            # Kept open while the collector lives: the namespace stays the one the config came from.
            netns_fd = _open_netns(f"{self.proc_root}/{pid}/ns/net", job)
        except FileNotFoundError as exc:
            if self.clock.monotonic() - job.added_at < self.config_wait_s:
                log.debug("%s: not there yet (%s)", job.where, exc.strerror)
                return
            log.warning("%s: not found in the container after %.0f s (%s); its metrics are not collected",
                        job.where, self.config_wait_s, exc.strerror)
            self._refuse(job, "configs_missing")
            return
        except CollectorConfigError as exc:
            log.warning("%s; its metrics are not collected", exc)
            self._refuse(job, "configs_refused")
            return
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.warning("%s: cannot be read: %s; its metrics are not collected", job.where, reason)
            self._refuse(job, "configs_refused")
            return
        st = os.fstat(netns_fd)
        if (st.st_dev, st.st_ino) == self._sockets.own_id:
            os.close(netns_fd)
            netns_fd = None
        interval = config.interval_s(self.min_interval_s)
        with self._lock:
            others = sum(j.declared for j in self._jobs.get(job.container, {}).values() if j.state == "active")
            refused = others + config.declared > self.count_limit
            if not refused and not job.closed:
                job.collector, job.endpoint, job.tls, job.netns_fd = collector, config.endpoint, tls, netns_fd
                job.declared, job.interval_s, job.state = config.declared, interval, "active"
        if refused:
            if netns_fd is not None:
                os.close(netns_fd)
            log.warning(
                "%s: too many metrics defined: %d%s, limit %d (application_metrics_count_limit); its metrics are not collected",
                job.where, config.declared, f" besides the container's other {others}" if others else "", self.count_limit,
            )
            self._refuse(job, "configs_refused")
            return
        if job.state != "active":  # dropped meanwhile
            if netns_fd is not None:
                os.close(netns_fd)
            return
        self._count("configs_loaded")
        if interval != self.min_interval_s:
            self.scheduler.reschedule(job.job_id, interval)
        log.info("%s: collecting %s metrics from %s every %gs", job.where, config.type, config.endpoint.url, interval)

    def _verifying_context(self, root: str, ca_file: str, job: _Job) -> ssl.SSLContext:
        try:
            ca = read_in_root(root, ca_file).decode()
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(cadata=ca)
            if self.cert is not None:
                ctx.load_cert_chain(self.cert, self.key)
        except FileNotFoundError:
            raise CollectorConfigError(f"{job.where}: tls.ca_file {ca_file} not found in the container") from None
        except (OSError, ValueError, ssl.SSLError) as exc:
            raise CollectorConfigError(f"{job.where}: tls.ca_file {ca_file}: {exc}") from None
        return ctx

    def _refuse(self, job: _Job, counter: str) -> None:
        job.state = "refused"
        self._count(counter)
        self.scheduler.remove(job.job_id)

    def _scrape(self, job: _Job) -> None:
        collector, endpoint = job.collector, job.endpoint
        assert collector is not None and endpoint is not None
        now = datetime.fromtimestamp(self.clock.time(), UTC)
        self._count("scrapes")
        netns = job.netns_fd
        try:
            content_type, body = fetch(
                endpoint,
                lambda family: self._sockets.socket(netns, family),
                job.tls,
                self.timeout_s,
                collector.accept,
                client_cert=self.cert is not None,
            )
            scrape = collector.parse(body, content_type, now)
        except ScrapeError as exc:
            self._failed(job, exc)
            return
        job.result = (scrape.values, scrape.specs, self.clock.monotonic())
        if scrape.error is not None:
            self._failed(job, scrape.error)
        elif job.failures:
            log.info("%s: scraping works again after %d failed scrapes", job.where, job.failures)
            job.failures = 0

    def _failed(self, job: _Job, exc: ScrapeError) -> None:
        job.failures += 1
        with self._lock:
            for key in ("scrape_errors", f"scrape_errors_{exc.kind}"):
                self._counts[key] = self._counts.get(key, 0) + 1
        if job.failures == 1:
            log.warning("%s: scrape failed: %s; further failures are counted, not logged", job.where, exc)


def _open_netns(path: str, job: _Job) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise FileNotFoundError(errno.ESRCH, "the container's task went away") from None
    except OSError as exc:
        raise CollectorConfigError(f"{job.where}: cannot open the container's network namespace {path}: {exc.strerror}") from None


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
