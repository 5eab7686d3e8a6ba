"""The HTTP server: the FastAPI application and uvicorn on a background thread.

:func:`create_app` assembles the application from an :class:`ApiContext`: ``/healthz``,
cAdvisor's REST API (:mod:`exporter.api.cadvisor`), the ``/debug/`` endpoints when profiling is
enabled (:mod:`exporter.api.debug`), and whatever routers and middleware the composition root
passes in (Prometheus metrics, events, auth). FastAPI's 422 for a request it cannot validate is
answered as 400, as cAdvisor answers a bad parameter, and documented so in ``/openapi.json``.

:class:`ApiServer` runs uvicorn on its own thread. It binds the socket in :meth:`ApiServer.start`
(so a busy port fails there, in the caller), installs no signal handlers (the CLI owns them) and
logs no access lines unless asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel

import exporter
from exporter.api import cadvisor, debug
from exporter.api.context import ApiContext
from exporter.clock import Clock, SystemClock

log = logging.getLogger(__name__)

Status = Literal["ok", "degraded", "unhealthy"]


# --------------------------------------------------------------------------------------------
# /healthz
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HealthPolicy:
    """When /healthz answers 503.

    * **collection**: the root container ``/`` is always monitored and sampled every
      housekeeping interval, so its newest record shows whether collection runs. Unhealthy
      when that record is older than ``stale_factor`` × max(housekeeping interval, the root's
      current dynamic interval, ``min_interval_s``), or when there is none once that long has
      passed since the exporter started (until then no record is no problem). A degraded watcher
      (inotify lost events or ran out of watches) only makes the part *degraded*: the periodic
      rescan still finds containers.
    * **sinks**: a sink that is failing (its worker's ``degraded``: writes fail, or the spool
      still holds records) is *degraded*; it is unhealthy once it has not delivered for
      ``sink_failing_s`` (since its last success, or since the start if it never had one).
      Dropped records are reported, not judged: the count never goes down.

    The overall status is the worst part's; HTTP 200 for ok and degraded, 503 for unhealthy.
    """

    stale_factor: float = 3.0
    min_interval_s: float = 1.0
    sink_failing_s: float = 60.0


class SchedulerHealth(BaseModel):
    skipped_overlap: int
    missed: int
    errors: int


class CollectionHealth(BaseModel):
    status: Status
    containers: int
    scheduler: SchedulerHealth
    watcher_degraded: bool
    root_record_age_s: float | None
    stale_after_s: float
    problems: list[str]


class SinkHealth(BaseModel):
    name: str
    status: Status
    degraded: bool
    queue_depth: int
    queue_capacity: int
    spool_pending: int
    dropped: int
    last_success_age_s: float | None
    not_delivering_for_s: float | None
    last_error: str | None


class Health(BaseModel):
    status: Status
    version: str
    uptime_s: float
    collection: CollectionHealth
    sinks: list[SinkHealth]
    problems: list[str]


_RANK: dict[Status, int] = {"ok": 0, "degraded": 1, "unhealthy": 2}


def _worst(statuses: Sequence[Status]) -> Status:
    return max(statuses, key=_RANK.__getitem__, default="ok")


def evaluate_health(ctx: ApiContext, policy: HealthPolicy, now: float) -> Health:
    """The health of the collection and of every sink at wall time ``now``; see :class:`HealthPolicy`."""
    config = ctx.config
    uptime = max(now - ctx.started_at, 0.0)
    interval = max(float(config.housekeeping_interval), policy.min_interval_s)
    root_interval = ctx.scheduler.job_interval("/")
    if root_interval is not None:
        interval = max(interval, root_interval)
    stale_after = policy.stale_factor * interval

    problems: list[str] = []
    status: Status = "ok"
    root = ctx.manager.get("/")
    latest = ctx.cache.latest("/")
    age = None if latest is None else max(now - latest.timestamp.timestamp(), 0.0)
    if age is not None and age > stale_after:
        status = "unhealthy"
        problems.append(f"collection: the root container's newest record is {age:.1f} s old (limit {stale_after:.1f} s)")
    elif age is None and uptime > stale_after:
        status = "unhealthy"
        what = "is not monitored" if root is None else "has no record"
        problems.append(f"collection: the root container {what} {uptime:.1f} s after the start (limit {stale_after:.1f} s)")
    watcher_degraded = bool(ctx.watcher_degraded())
    if watcher_degraded:
        status = _worst([status, "degraded"])
        problems.append("collection: the cgroup watcher is degraded; new containers are found by the periodic rescan")
    s = ctx.scheduler.stats
    collection = CollectionHealth(
        status=status,
        containers=len(ctx.manager.names()),
        scheduler=SchedulerHealth(skipped_overlap=s.skipped_overlap, missed=s.missed, errors=s.errors),
        watcher_degraded=watcher_degraded,
        root_record_age_s=None if age is None else round(age, 3),
        stale_after_s=stale_after,
        problems=list(problems),
    )

    sinks = []
    for worker in ctx.sinks:
        st = worker.stats
        degraded = bool(worker.degraded)
        since = st.last_success if st.last_success is not None else ctx.started_at
        idle = max(now - since, 0.0)
        sink_status: Status = "ok"
        if degraded:
            sink_status = "degraded"
            if idle > policy.sink_failing_s:
                sink_status = "unhealthy"
                problems.append(
                    f"sink {worker.name}: nothing delivered for {idle:.0f} s (limit {policy.sink_failing_s:g} s): {st.last_error or 'no error recorded'}"
                )
        sinks.append(
            SinkHealth(
                name=worker.name,
                status=sink_status,
                degraded=degraded,
                queue_depth=len(worker.queue),
                queue_capacity=st.queue_capacity,
                spool_pending=len(worker.spool) if worker.spool is not None else 0,
                dropped=st.dropped,
                last_success_age_s=None if st.last_success is None else round(max(now - st.last_success, 0.0), 3),
                not_delivering_for_s=round(idle, 3) if degraded else None,
                last_error=st.last_error,
            )
        )
    overall = _worst([collection.status, *(x.status for x in sinks)])
    return Health(
        status=overall,
        version=ctx.version_info.exporter_version,
        uptime_s=round(uptime, 3),
        collection=collection,
        sinks=sinks,
        problems=problems,
    )


def health_router(ctx: ApiContext, policy: HealthPolicy, clock: Clock) -> APIRouter:
    api = APIRouter(tags=["health"])

    @api.get(
        "/healthz",
        response_model=Health,
        responses={503: {"model": Health, "description": "unhealthy: see problems"}},
        summary="Health of collection and sinks",
        description=HealthPolicy.__doc__,
    )
    def healthz() -> JSONResponse:
        health = evaluate_health(ctx, policy, clock.time())
        return JSONResponse(health.model_dump(mode="json"), status_code=503 if health.status == "unhealthy" else 200)

    return api


# --------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------
def create_app(
    ctx: ApiContext,
    routers: Sequence[APIRouter] = (),
    middleware: Sequence[tuple[type, dict[str, Any]]] = (),
    *,
    health: HealthPolicy | None = None,
    clock: Clock | None = None,
) -> FastAPI:
    """The API over ``ctx``. ``routers`` are included after ours; ``middleware`` is
    ``(class, keyword arguments)`` pairs, the first one outermost (it sees a request first)."""
    app = FastAPI(
        title="container-exporter",
        version=exporter.__version__,
        description="Container metrics: cAdvisor-compatible REST API, health, and the routers the exporter adds.",
        docs_url=None,
        redoc_url=None,
    )
    app.include_router(health_router(ctx, health or HealthPolicy(), clock or SystemClock()))
    app.include_router(cadvisor.router(ctx))
    if ctx.config.enable_profiling:
        app.include_router(debug.router())
    for extra in routers:
        app.include_router(extra)
    # Starlette's add_middleware puts each new one outside the previous ones.
    for cls, kwargs in reversed(middleware):
        app.add_middleware(cls, **kwargs)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _plain(exc.errors())}, status_code=400)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _validation_is_400(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _plain(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """FastAPI's validation errors without what JSON cannot carry (exceptions in ``ctx``)."""
    out = []
    for e in errors:
        item = {k: v for k, v in dict(e).items() if k in ("type", "loc", "msg", "input")}
        if "input" in item and not isinstance(item["input"], str | int | float | bool | type(None) | list | dict):
            item["input"] = repr(item["input"])
        out.append(item)
    return out


def _validation_is_400(schema: dict[str, Any]) -> None:
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            responses = operation.get("responses", {})
            invalid = responses.pop("422", None)
            if invalid is not None and "400" not in responses:
                responses["400"] = {
                    "description": "Bad request",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                }
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas.setdefault("ErrorBody", {"title": "ErrorBody", "type": "object", "properties": {"detail": {"title": "Detail"}}, "required": ["detail"]})


# --------------------------------------------------------------------------------------------
# uvicorn on a thread
# --------------------------------------------------------------------------------------------
class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The CLI owns SIGINT/SIGTERM; uvicorn must neither install handlers nor re-raise them.
        yield


class ApiServer:
    """uvicorn serving ``ctx_app`` on ``host``:``port`` from a background thread."""

    STARTUP_TIMEOUT_S = 10.0

    def __init__(
        self,
        ctx_app: FastAPI,
        host: str,
        port: int,
        *,
        access_log: bool = False,
        graceful_timeout_s: float = 5.0,
    ) -> None:
        self.app = ctx_app
        self.host = host
        self.requested_port = port
        self.port = port
        self._config = uvicorn.Config(
            ctx_app,
            access_log=access_log,
            log_config=None,  # keep the application's logging setup
            # uvicorn.error says "Started server process" and the like at INFO; the exporter logs
            # its own "listening on" line. The access log is INFO: off unless asked for.
            log_level="info" if access_log else "warning",
            lifespan="off",
            timeout_graceful_shutdown=graceful_timeout_s,
            server_header=False,
        )
        self._server = _Server(self._config)
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        """Bind, serve, and return once the server accepts connections (``.port`` is bound)."""
        if self._thread is not None:
            raise RuntimeError("ApiServer already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        dualstack = self.host == "::" and socket.has_dualstack_ipv6()
        sock = socket.create_server((self.host, self.requested_port), family=family, backlog=128, dualstack_ipv6=dualstack)
        self._socket = sock
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name="api-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.STARTUP_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive():
                sock.close()
                raise RuntimeError(f"API server failed to start on {self.host}:{self.port}: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"API server did not start on {self.host}:{self.port} within {self.STARTUP_TIMEOUT_S:g} s")
            time.sleep(0.01)
        log.info("HTTP API listening on %s:%d", self.host, self.port)

    def _run(self) -> None:
        assert self._socket is not None
        try:
            asyncio.run(self._server.serve(sockets=[self._socket]))
        except BaseException as exc:  # reported by start() or stop(); the thread must not die silently
            self._error = exc
            log.exception("API server stopped with an error")

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop accepting, let requests in flight finish (up to the graceful timeout), join."""
        thread = self._thread
        if thread is None:
            return
        self._server.should_exit = True
        limit = timeout_s if timeout_s is not None else (self._config.timeout_graceful_shutdown or 5.0) + 5.0
        thread.join(limit)
        if thread.is_alive():
            log.warning("API server thread still busy %.0f s after stop; leaving it (daemon)", limit)
        if self._socket is not None:
            self._socket.close()
        self._thread = None

    @property
    def url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"
