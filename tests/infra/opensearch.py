"""OpenSearch-compatible server (osmem-server) for the test session, and a scripted HTTP server.

``opensearch_server`` (session): one osmem-server on a free 127.0.0.1 port, shared by the tests;
each test writes to index names of its own. ``make_opensearch_server`` (function): private
servers for tests that stop or pause theirs, stopped at the end of the test.

osmem-server keeps everything in memory: ``stop()`` + ``start()`` (same port) comes back EMPTY —
indices, documents and templates are gone. ``pause()`` (SIGSTOP) keeps the data: the kernel still
accepts connections into the listen backlog, but nothing answers, which is what a hung node
looks like to a client.

The checks here use plain HTTP (urllib), not the client under test, so a bug in the client setup
cannot hide itself.

``ScriptedHttpServer``: a real HTTP server on a socket whose answers a test scripts (401, 429 with
Retry-After, per-item bulk failures, a server without composable templates, ...) and which
records what it was sent; for what osmem-server cannot be made to do.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

log = logging.getLogger(__name__)

SETUP_HINT = "osmem-server (the in-memory OpenSearch used by the tests) is missing: run `make setup`"
STARTUP_TIMEOUT_S = 30.0


class OpenSearchUnavailable(RuntimeError):
    pass


def server_binary() -> str:
    """The osmem-server executable: $OSMEM_SERVER_BIN, else the one bundled with the osmem-server wheel."""
    env = os.environ.get("OSMEM_SERVER_BIN")
    if env:
        if not os.access(env, os.X_OK):
            raise OpenSearchUnavailable(f"OSMEM_SERVER_BIN={env} is not an executable; {SETUP_HINT}")
        return env
    try:
        import osmem_server
    except ImportError:
        raise OpenSearchUnavailable(SETUP_HINT) from None
    binary = Path(osmem_server.__file__).parent / "bin" / "osmem-server"
    if not os.access(binary, os.X_OK):
        raise OpenSearchUnavailable(f"{binary} is missing; {SETUP_HINT}")
    return str(binary)


class HttpError(RuntimeError):
    def __init__(self, status: int, body: Any, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body}")
        self.status = status
        self.body = body


class OpenSearchServer:
    """One osmem-server process: its URL, checks over plain HTTP, and fault controls.

    Every control is idempotent and safe in any state (a paused server is resumed before it is
    stopped).
    """

    def __init__(self, binary: str, workdir: Path, host: str = "127.0.0.1") -> None:
        self.binary = binary
        self.workdir = workdir
        self.host = host
        self.port = 0  # picked by the server at the first start, kept for restarts
        self.process: subprocess.Popen[str] | None = None
        self.paused = False
        self.version = ""

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self.port, "start() first"
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start (on the same port as before, if it ran before); return when it answers.

        A restarted server is empty: osmem-server keeps nothing on disk.
        """
        if self.running:
            return
        self.paused = False
        args = [
            self.binary,
            "-addr", f"{self.host}:{self.port}",
            "-parent-pid", str(os.getpid()),  # exits with the test session, even on SIGKILL
            "-no-ja",
        ]
        stderr = open(self.workdir / "osmem-server.log", "ab")
        try:
            # It exits when its stdin closes: the pipe ties its life to this object too.
            self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
        finally:
            stderr.close()
        ready = self._read_ready_line(self.process)
        self.port = int(ready["url"].rsplit(":", 1)[1])
        self.version = ready.get("version", "")
        self._wait_until_answering()

    def _read_ready_line(self, process: subprocess.Popen[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        done = threading.Event()

        def drain() -> None:
            # Reads the ready line, then keeps the pipe drained so the server never blocks on it.
            assert process.stdout is not None
            try:
                for line in process.stdout:
                    if not found:
                        try:
                            msg = json.loads(line)
                        except ValueError:
                            continue
                        if isinstance(msg, dict) and "url" in msg:
                            found.update(msg)
                            done.set()
            except (OSError, ValueError):  # the pipe was closed by stop()
                pass
            done.set()

        threading.Thread(target=drain, name=f"osmem-stdout-{process.pid}", daemon=True).start()
        done.wait(STARTUP_TIMEOUT_S)
        if not found:
            self._kill()
            log_tail = (self.workdir / "osmem-server.log").read_text(errors="replace")[-2000:]
            raise OpenSearchUnavailable(f"osmem-server did not start on {self.host}:{self.port} within {STARTUP_TIMEOUT_S:g} s: {log_tail}")
        return found

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                self.request("GET", "/", timeout=2)
                return
            except (OSError, HttpError) as exc:
                if time.monotonic() > deadline or not self.running:
                    raise OpenSearchUnavailable(f"osmem-server at {self.url} does not answer: {exc}") from exc
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop the process (data is lost). Idempotent."""
        if self.process is None:
            return
        process = self.process
        if process.poll() is None:
            self.resume()  # a stopped process would not act on the stdin EOF nor SIGTERM
            try:
                assert process.stdin is not None
                process.stdin.close()
            except OSError:
                pass
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._kill()
        self._close_pipes(process)
        self.paused = False
        self.process = None

    def restart(self) -> None:
        """stop() + start() on the same port: an empty server at the same URL."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but nothing answers. Idempotent."""
        if self.running and not self.paused:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        """SIGCONT after pause(). Idempotent."""
        if self.paused and self.process is not None:
            try:
                os.kill(self.process.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.paused = False

    def _kill(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        self._close_pipes(process)

    @staticmethod
    def _close_pipes(process: subprocess.Popen[str]) -> None:
        for pipe in (process.stdin, process.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass

    # --- checks over plain HTTP -----------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *, timeout: float = 30.0) -> Any:
        """One request, JSON in and out; HttpError on a status >= 400."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                text = resp.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                err: Any = json.loads(raw)
            except ValueError:
                err = raw.decode(errors="replace")
            raise HttpError(exc.code, err, f"{method} {path}") from None
        return json.loads(text) if text else None

    def refresh(self, index: str = "_all") -> None:
        self.request("POST", f"/{index}/_refresh")

    def count(self, index: str) -> int:
        """Documents in the indices matching ``index`` (0 when there are none)."""
        self.refresh(index)
        return int(self.request("GET", f"/{index}/_count?ignore_unavailable=true&allow_no_indices=true")["count"])

    def search(self, index: str, query: dict[str, Any] | None = None, size: int = 10_000) -> list[dict[str, Any]]:
        """The hits (with _index, _id, _source) of a search over ``index``."""
        self.refresh(index)
        body = {"query": query or {"match_all": {}}, "size": size}
        result = self.request("POST", f"/{index}/_search?ignore_unavailable=true&allow_no_indices=true", body)
        return list(result["hits"]["hits"])

    def get(self, index: str, doc_id: str) -> dict[str, Any] | None:
        """A document's _source, or None."""
        try:
            return self.request("GET", f"/{index}/_doc/{doc_id}")["_source"]
        except HttpError as exc:
            if exc.status == 404:
                return None
            raise

    def indices(self, pattern: str = "*") -> list[str]:
        rows = self.request("GET", f"/_cat/indices/{pattern}?format=json&expand_wildcards=all")
        return sorted(row["index"] for row in rows or [])

    def mapping(self, index: str) -> dict[str, Any]:
        """The mappings of one index."""
        return self.request("GET", f"/{index}/_mapping")[index]["mappings"]

    def index_template(self, name: str) -> dict[str, Any] | None:
        try:
            found = self.request("GET", f"/_index_template/{name}")["index_templates"]
        except HttpError as exc:
            if exc.status == 404:
                return None
            raise
        return found[0]["index_template"] if found else None

    def delete_indices(self, pattern: str) -> None:
        for index in self.indices(pattern):
            self.request("DELETE", f"/{index}")


@pytest.fixture(scope="session")
def opensearch_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenSearchServer]:
    """The session's osmem-server. Shared: use index and template names of your own, don't stop it
    (use ``make_opensearch_server`` for that)."""
    server = _start_server(tmp_path_factory.mktemp("opensearch"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_opensearch_server(tmp_path: Path) -> Iterator[Callable[[], OpenSearchServer]]:
    """Factory of private osmem-servers, for tests that pause, stop or restart them; all stopped after the test."""
    started: list[OpenSearchServer] = []

    def factory() -> OpenSearchServer:
        workdir = tmp_path / f"opensearch-{len(started)}"
        workdir.mkdir()
        server = _start_server(workdir)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


def _start_server(workdir: Path) -> OpenSearchServer:
    try:
        server = OpenSearchServer(server_binary(), workdir)
        server.start()
    except OpenSearchUnavailable as exc:
        raise pytest.fail.Exception(str(exc), pytrace=False) from None
    return server


# --- scripted HTTP server --------------------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # JSON-encoded unless bytes
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


Handler = Callable[[Received], Reply]

ELASTICSEARCH_INFO = {
    "name": "scripted",
    "cluster_name": "scripted",
    "version": {"number": "9.0.0", "build_flavor": "default", "lucene_version": "10.1.0"},
    "tagline": "You Know, for Search",
}


class ScriptedHttpServer:
    """A real HTTP/1.1 server on 127.0.0.1 whose answers come from ``handler(request)``; HTTPS with
    ``tls=(certificate, key)`` (see :func:`make_certificate`).

    ``received`` lists every request. ``product`` is sent as X-Elastic-Product on every answer
    unless None. Use as a context manager, or call close().
    """

    def __init__(self, handler: Handler, *, product: str | None = "Elasticsearch", tls: tuple[Path, Path] | None = None) -> None:
        self.handler = handler
        self.product = product
        self.received: list[Received] = []
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = Received(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                outer.received.append(request)
                reply = outer.handler(request)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                payload = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                if outer.product is not None:
                    self.send_header("X-Elastic-Product", outer.product)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("scripted server: " + format, *args)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="scripted-http", daemon=True)
        self._thread.start()

    def requests_to(self, path_prefix: str) -> list[Received]:
        return [r for r in self.received if r.path.startswith(path_prefix)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ScriptedHttpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_certificate(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for ``host`` (its own CA) and its key, made with the openssl CLI."""
    cert, key = directory / "server.pem", directory / "server.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={host}",
            "-addext", f"subjectAltName=IP:{host}" if host[0].isdigit() else f"subjectAltName=DNS:{host}",
            "-addext", "basicConstraints=critical,CA:TRUE",
        ],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key
