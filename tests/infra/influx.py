"""InfluxDB 1.x and VictoriaMetrics servers for the test session (see the fixtures below).

Each server is a child process of the test session, bound to 127.0.0.1 on a free port, with its
data in a throw-away directory. It is started the first time a test asks for its fixture and
stopped at the end of the session.

A server object offers:

* ``url`` (``http://127.0.0.1:<port>``), and query helpers (InfluxQL for influxd, the export API
  for VictoriaMetrics);
* process controls for fault tests: ``pause()`` (SIGSTOP), ``resume()`` (SIGCONT), ``stop()``
  (SIGTERM, then SIGKILL; ``stop(kill=True)`` goes straight to SIGKILL) and ``start()`` (same
  port, same data dir). All are idempotent; a test that pauses or stops a session server should
  still ``resume()`` / ``start()`` it in a ``finally``, and the fixture does so before handing the
  server to the next test anyway.

Deliberately independent of the ``exporter`` and ``sinks`` packages (see tests/infra/__init__.py).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.infra.procs import ChildProcess, free_port

log = logging.getLogger(__name__)

SETUP_HINT = "run `make setup` (installs influxdb and victoria-metrics)"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


class ServerError(RuntimeError):
    pass


def find_binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if path is None:
        raise ServerError(f"{name} is not installed: {SETUP_HINT}")
    return path


class ServerProcess(ChildProcess):
    """An HTTP server run as our child process; ``argv`` and ``ready_path`` come from subclasses."""

    ready_path = "/"
    error = ServerError
    start_timeout_s = START_TIMEOUT_S
    stop_timeout_s = STOP_TIMEOUT_S

    def __init__(self, binary: str, base_dir: Path, port: int) -> None:
        super().__init__(base_dir)
        self.binary = binary
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def headers(self) -> dict[str, str]:
        return {}

    @property
    def awaited(self) -> str:
        return f"answer on {self.url}{self.ready_path}"

    def ready(self) -> bool:
        try:
            status, _, _ = self.request("GET", self.ready_path, timeout_s=1.0)
        except OSError:
            return False
        return status < 300

    # -- HTTP -----------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float = 10.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one request; HTTP errors are returned, not raised."""
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        req = urllib.request.Request(url, data=body, method=method, headers={**self.headers(), **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()


S = TypeVar("S", bound=ServerProcess)


class InfluxDB1(ServerProcess):
    """influxd 1.x. With ``auth=True`` the HTTP API needs credentials; an admin user
    (``admin_user`` / ``admin_password``) is created at first start, and the helpers use it."""

    name = "influxd"
    ready_path = "/ping"

    def __init__(self, binary: str, base_dir: Path, port: int, *, auth: bool = False) -> None:
        super().__init__(binary, base_dir, port)
        self.auth = auth
        self.rpc_port = free_port()
        self.admin_user = "admin"
        self.admin_password = "admin-secret"
        self.config_path = base_dir / "influxdb.conf"
        self.config_path.write_text(self._config())

    def _config(self) -> str:
        d = self.base_dir
        return f"""\
reporting-disabled = true
bind-address = "127.0.0.1:{self.rpc_port}"

[meta]
  dir = "{d / "meta"}"
  retention-autocreate = true
  logging-enabled = false

[data]
  dir = "{d / "data"}"
  wal-dir = "{d / "wal"}"
  query-log-enabled = false
  trace-logging-enabled = false

[monitor]
  store-enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{self.port}"
  auth-enabled = {"true" if self.auth else "false"}
  log-enabled = false
  write-tracing = false
  pprof-enabled = false

[subscriber]
  enabled = false

[continuous_queries]
  enabled = false

[logging]
  level = "warn"
"""

    def argv(self) -> list[str]:
        return [self.binary, "run", "-config", str(self.config_path)]

    def headers(self) -> dict[str, str]:
        if not self.auth:
            return {}
        token = base64.b64encode(f"{self.admin_user}:{self.admin_password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def start(self, *, timeout_s: float | None = None) -> None:
        first = not (self.base_dir / "meta").exists()
        super().start(timeout_s=timeout_s)
        if first and self.auth:
            # With auth on and no user yet, influxd lets anyone create the first admin.
            self.query(f"CREATE USER {self.admin_user} WITH PASSWORD '{self.admin_password}' WITH ALL PRIVILEGES", method="POST")

    # -- InfluxQL -------------------------------------------------------------------------------
    def query(self, q: str, *, db: str | None = None, method: str = "GET", epoch: str = "ns") -> list[dict[str, Any]]:
        """The ``results`` of /query; an error in any statement raises ServerError."""
        params = {"q": q, "epoch": epoch}
        if db is not None:
            params["db"] = db
        if method == "POST":
            status, _, body = self.request("POST", "/query", params=params, body=b"")
        else:
            status, _, body = self.request("GET", "/query", params=params)
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            payload = {"error": body.decode(errors="replace")}
        if status >= 300 or "error" in payload:
            raise ServerError(f"influxd query {q!r} → {status}: {payload.get('error', payload)}")
        results = payload.get("results", [])
        for result in results:
            if "error" in result:
                raise ServerError(f"influxd query {q!r}: {result['error']}")
        return results

    def rows(self, q: str, *, db: str) -> list[dict[str, Any]]:
        """Rows of a single-statement query, each a dict of its columns plus its series' tags
        (for ``GROUP BY``) and ``_measurement``."""
        out: list[dict[str, Any]] = []
        for result in self.query(q, db=db):
            for series in result.get("series", []):
                tags = series.get("tags", {})
                for values in series.get("values", []):
                    row = dict(zip(series["columns"], values, strict=True))
                    row.update(tags)
                    row["_measurement"] = series.get("name")
                    out.append(row)
        return out

    def measurements(self, db: str) -> list[str]:
        return [row["name"] for row in self.rows("SHOW MEASUREMENTS", db=db)]

    def tag_keys(self, db: str, measurement: str) -> set[str]:
        return {row["tagKey"] for row in self.rows(f'SHOW TAG KEYS FROM "{measurement}"', db=db)}

    def field_keys(self, db: str, measurement: str) -> dict[str, str]:
        """field name → type (integer, float, string, boolean)."""
        return {row["fieldKey"]: row["fieldType"] for row in self.rows(f'SHOW FIELD KEYS FROM "{measurement}"', db=db)}

    def create_database(self, name: str) -> None:
        self.query(f'CREATE DATABASE "{name}"', method="POST")

    def drop_database(self, name: str) -> None:
        self.query(f'DROP DATABASE "{name}"', method="POST")

    def write_lines(self, lines: str | bytes, *, db: str) -> tuple[int, bytes]:
        """Raw line protocol to /write; (status, body)."""
        data = lines.encode() if isinstance(lines, str) else lines
        status, _, body = self.request("POST", "/write", params={"db": db, "precision": "ns"}, body=data)
        return status, body


@dataclass
class Series:
    """One series of VictoriaMetrics' /api/v1/export: metric name, labels, samples (ms)."""

    name: str
    labels: dict[str, str]
    values: list[float] = field(default_factory=list)
    timestamps_ms: list[int] = field(default_factory=list)


class VictoriaMetrics(ServerProcess):
    """victoria-metrics single node. InfluxDB line protocol arrives on /write and /api/v2/write
    and becomes one series per field, named ``<measurement>_<field>``; string fields are dropped.
    Samples keep millisecond precision. Repeated samples are *not* deduplicated (no
    -dedup.minScrapeInterval), so a test sees every copy it sent."""

    name = "victoria-metrics"
    ready_path = "/health"

    def __init__(self, binary: str, base_dir: Path, port: int, *, username: str | None = None, password: str | None = None) -> None:
        super().__init__(binary, base_dir, port)
        self.username = username
        self.password = password

    def argv(self) -> list[str]:
        argv = [
            self.binary,
            f"-httpListenAddr=127.0.0.1:{self.port}",
            f"-storageDataPath={self.base_dir / 'data'}",
            "-retentionPeriod=100y",  # test records may carry any timestamp
            "-loggerLevel=WARN",
            "-search.disableCache",
            "-search.latencyOffset=0s",
        ]
        if self.username:
            argv += [f"-httpAuth.username={self.username}", f"-httpAuth.password={self.password or ''}"]
        return argv

    def headers(self) -> dict[str, str]:
        if not self.username:
            return {}
        token = base64.b64encode(f"{self.username}:{self.password or ''}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def ready(self) -> bool:
        # /health needs no credentials; a 401 still means "up".
        try:
            status, _, _ = self.request("GET", self.ready_path, timeout_s=1.0)
        except OSError:
            return False
        return status < 300 or status == 401

    def force_flush(self) -> None:
        """Make recently ingested samples searchable now (they are buffered for ~1 s)."""
        status, _, body = self.request("GET", "/internal/force_flush")
        if status >= 300:
            raise ServerError(f"force_flush → {status}: {body[:200]!r}")

    def export(self, match: str = '{__name__!=""}', *, flush: bool = True) -> list[Series]:
        """Every series matching the selector, sorted by name and labels; samples in time order."""
        if flush:
            self.force_flush()
        status, _, body = self.request(
            "GET", "/api/v1/export", params={"match[]": match, "start": "0", "end": str(int(time.time()) + 10 * 365 * 86400)}
        )
        if status >= 300:
            raise ServerError(f"export {match} → {status}: {body[:300]!r}")
        series = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            labels = dict(item["metric"])
            name = labels.pop("__name__", "")
            pairs = sorted(zip(item["timestamps"], item["values"], strict=True))
            series.append(Series(name, labels, [v for _, v in pairs], [t for t, _ in pairs]))
        series.sort(key=lambda s: (s.name, sorted(s.labels.items())))
        return series

    def delete(self, match: str) -> None:
        status, _, body = self.request("POST", "/api/v1/admin/tsdb/delete_series", params={"match[]": match}, body=b"")
        if status >= 300:
            raise ServerError(f"delete_series {match} → {status}: {body[:200]!r}")


# -- fixtures -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _serving(server: S) -> Iterator[S]:
    try:
        server.start()
    except ServerError as exc:
        server.stop(kill=True)
        raise pytest.fail.Exception(str(exc), pytrace=False) from None
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def _restored(server: S) -> Iterator[S]:
    """The session server, serving for this test whatever the last one left it in."""
    try:
        server.restore()
    except ServerError as exc:
        raise pytest.fail.Exception(str(exc), pytrace=False) from None
    try:
        yield server
    finally:
        server.resume()


def _binary(name: str) -> str:
    try:
        return find_binary(name)
    except ServerError as exc:
        raise pytest.fail.Exception(str(exc), pytrace=False) from None


@pytest.fixture(scope="session")
def _influxdb_v1_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDB1]:
    with _serving(InfluxDB1(_binary("influxd"), tmp_path_factory.mktemp("influxd"), free_port())) as server:
        yield server


@pytest.fixture(scope="session")
def _influxdb_v1_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDB1]:
    with _serving(InfluxDB1(_binary("influxd"), tmp_path_factory.mktemp("influxd-auth"), free_port(), auth=True)) as server:
        yield server


@pytest.fixture(scope="session")
def _victoria_metrics_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetrics]:
    with _serving(VictoriaMetrics(_binary("victoria-metrics"), tmp_path_factory.mktemp("vm"), free_port())) as server:
        yield server


@pytest.fixture(scope="session")
def _victoria_metrics_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetrics]:
    base = tmp_path_factory.mktemp("vm-auth")
    with _serving(VictoriaMetrics(_binary("victoria-metrics"), base, free_port(), username="writer", password="vm-secret")) as server:
        yield server


@pytest.fixture
def influxdb_v1(_influxdb_v1_server: InfluxDB1) -> Iterator[InfluxDB1]:
    """influxd 1.x without authentication (a session server, serving at the start of each test)."""
    with _restored(_influxdb_v1_server) as server:
        yield server


@pytest.fixture
def influxdb_v1_auth(_influxdb_v1_auth_server: InfluxDB1) -> Iterator[InfluxDB1]:
    """influxd 1.x with ``auth-enabled``; admin credentials in ``admin_user`` / ``admin_password``."""
    with _restored(_influxdb_v1_auth_server) as server:
        yield server


@pytest.fixture
def victoria_metrics(_victoria_metrics_server: VictoriaMetrics) -> Iterator[VictoriaMetrics]:
    """victoria-metrics single node (a session server, serving at the start of each test)."""
    with _restored(_victoria_metrics_server) as server:
        yield server


@pytest.fixture
def victoria_metrics_auth(_victoria_metrics_auth_server: VictoriaMetrics) -> Iterator[VictoriaMetrics]:
    """victoria-metrics behind HTTP basic auth (``username`` / ``password``)."""
    with _restored(_victoria_metrics_auth_server) as server:
        yield server


@pytest.fixture
def influxdb_v1_database(influxdb_v1: InfluxDB1) -> Iterator[str]:
    """A fresh database on ``influxdb_v1``, dropped after the test."""
    name = f"t_{os.getpid()}_{time.monotonic_ns()}"
    influxdb_v1.create_database(name)
    yield name
    try:
        influxdb_v1.restore()
        influxdb_v1.drop_database(name)
    except (ServerError, OSError) as exc:
        log.warning("could not drop test database %s: %s", name, exc)


class Servers:
    """Servers started outside pytest (the benchmark): a context manager that stops them all."""

    def __init__(self) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="ce-influx-"))
        self._servers: list[ServerProcess] = []

    def influxdb_v1(self, *, auth: bool = False) -> InfluxDB1:
        base = self._tmp / f"influxd-{len(self._servers)}"
        base.mkdir()
        server = InfluxDB1(find_binary("influxd"), base, free_port(), auth=auth)
        self._servers.append(server)
        server.start()
        return server

    def victoria_metrics(self) -> VictoriaMetrics:
        base = self._tmp / f"vm-{len(self._servers)}"
        base.mkdir()
        server = VictoriaMetrics(find_binary("victoria-metrics"), base, free_port())
        self._servers.append(server)
        server.start()
        return server

    def close(self) -> None:
        for server in self._servers:
            try:
                server.stop()
            except Exception as exc:  # noqa: BLE001 - stop the others regardless, then report
                log.warning("could not stop %s: %s", server.name, exc)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__: Sequence[str] = ["InfluxDB1", "VictoriaMetrics", "Series", "Servers", "ServerError", "free_port"]
