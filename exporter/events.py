"""Container events: storage policy, per-type bounded store, queries, stream watchers, HTTP.

The storage policy (cAdvisor's ``event_storage_age_limit`` / ``event_storage_event_limit``)
decides first: an event of a disabled type, or one already older than its type's age limit,
is dropped before anything else sees it — it is never stored, never handed to the sinks and
never streamed. Everything else is stored, then sunk, then offered to the stream watchers.

A stream watcher has a bounded queue. The producer never waits for it: when a watcher's queue
is full the watcher is dropped (its stream ends) and counted. cAdvisor's watchers use a
10-slot channel that blocks ``AddEvent`` once full; here a stalled HTTP client cannot hold up
the OOM watcher or container discovery.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import hashlib
import itertools
import json
import logging
import posixpath
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from exporter.clock import Clock
from exporter.durations import parse_duration, parse_rfc3339
from exporter.models import EVENT_TYPES, ContainerReference, Event, EventData

if TYPE_CHECKING:
    from fastapi import APIRouter

    from exporter.discovery.docker import DockerFactory
    from exporter.manager import Container, Identity
    from exporter.oom import OomInfo

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE_S = 24 * 3600.0
DEFAULT_MAX_EVENTS = 100_000
UNLIMITED = -1
DEFAULT_QUERY_MAX_EVENTS = 10  # cAdvisor's events.NewRequest


# -- storage policy -------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoragePolicy:
    """How long and how many events of each type are kept. ``max_events`` -1: no count limit.

    A type whose age limit or count limit is 0 is disabled.
    """

    default_max_age_s: float = DEFAULT_MAX_AGE_S
    default_max_events: int = DEFAULT_MAX_EVENTS
    per_type_max_age_s: Mapping[str, float] = field(default_factory=dict)
    per_type_max_events: Mapping[str, int] = field(default_factory=dict)

    def max_age_s(self, event_type: str) -> float:
        return self.per_type_max_age_s.get(event_type, self.default_max_age_s)

    def max_events(self, event_type: str) -> int:
        return self.per_type_max_events.get(event_type, self.default_max_events)

    def enabled(self, event_type: str) -> bool:
        return self.max_events(event_type) != 0 and self.max_age_s(event_type) > 0


def _policy_items(flag: str, text: str) -> Iterator[tuple[str, str, str]]:
    """``"default=24h,oom=72h"`` → (part, key, value); a key is "default" or an event type."""
    seen: set[str] = set()
    for part in text.split(","):
        item = part.strip()
        if not item:
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key or not value or "=" in value:
            raise ValueError(f"{flag}: bad part {item!r}: expected TYPE=LIMIT, e.g. \"default=...,oom=...\"")
        if key != "default" and key not in EVENT_TYPES:
            raise ValueError(f"{flag}: bad part {item!r}: unknown event type {key!r} (known: default, {', '.join(EVENT_TYPES)})")
        if key in seen:
            raise ValueError(f"{flag}: bad part {item!r}: {key!r} is given twice")
        seen.add(key)
        yield item, key, value


def parse_storage_policy(age_limit: str, event_limit: str) -> StoragePolicy:
    """cAdvisor's syntax: ``age_limit="default=24h,oom=72h"``, ``event_limit="default=100000,containerCreation=1000"``.

    Types not named take the ``default`` (itself 24h and 100000 when not named). A count of -1
    means no count limit; a limit of 0 (age or count) disables the type. cAdvisor warns about a
    bad part and skips it; here it is an error naming the setting and the part.
    """
    ages: dict[str, float] = {}
    for item, key, value in _policy_items("event_storage_age_limit", age_limit):
        try:
            ages[key] = parse_duration(value)
        except ValueError as exc:
            raise ValueError(f"event_storage_age_limit: bad part {item!r}: {exc}") from None
    counts: dict[str, int] = {}
    for item, key, value in _policy_items("event_storage_event_limit", event_limit):
        try:
            count = int(value)
        except ValueError:
            raise ValueError(f"event_storage_event_limit: bad part {item!r}: expected a whole number of events (-1: no limit, 0: disabled)") from None
        counts[key] = UNLIMITED if count < 0 else count
    return StoragePolicy(
        default_max_age_s=ages.pop("default", DEFAULT_MAX_AGE_S),
        default_max_events=counts.pop("default", DEFAULT_MAX_EVENTS),
        per_type_max_age_s=ages,
        per_type_max_events=counts,
    )


# -- requests -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EventRequest:
    """Which events a query or a watch wants (cAdvisor's events.Request).

    ``container_name`` None: any container. ``max_events``: the most recent N of the matching
    events; negative: all. ``start``/``end`` are inclusive; a watch takes neither.
    """

    container_name: str | None = None
    include_subcontainers: bool = False
    start: datetime | None = None
    end: datetime | None = None
    max_events: int = DEFAULT_QUERY_MAX_EVENTS
    event_types: frozenset[str] = frozenset(EVENT_TYPES)

    def wants(self, event: Event) -> bool:
        """Type and container (not time) match."""
        if event.event_type not in self.event_types:
            return False
        name = self.container_name
        if name is None:
            return True
        if self.include_subcontainers:
            return name == "/" or event.container_name == name or event.container_name.startswith(name + "/")
        return event.container_name == name


# -- the store ------------------------------------------------------------------------------------
class EventStore:
    """Per-type stores of events ordered by timestamp, each bounded by count and by age.

    Age is measured against the clock, not against the newest event (cAdvisor's TimedStore):
    events expire with time through :meth:`expire`, which queries also run. Not thread-safe on
    its own; :class:`EventManager` holds the lock.
    """

    def __init__(self, policy: StoragePolicy, clock: Clock) -> None:
        self.policy = policy
        self.clock = clock
        # event type → [(timestamp_s, seq, event)] in timestamp order; seq breaks ties.
        self._stores: dict[str, list[tuple[float, int, Event]]] = {t: [] for t in EVENT_TYPES}
        self._seq = itertools.count()
        self.evicted = 0  # pushed out by a count limit
        self.expired = 0  # aged out

    def accepts(self, event_type: str, timestamp_s: float) -> bool:
        """Whether the policy keeps an event of this type and time (now)."""
        policy = self.policy
        return policy.enabled(event_type) and timestamp_s >= self.clock.time() - policy.max_age_s(event_type)

    def add(self, event: Event, timestamp_s: float) -> None:
        store = self._stores[event.event_type]
        entry = (timestamp_s, next(self._seq), event)
        if not store or timestamp_s >= store[-1][0]:
            store.append(entry)
        else:  # a creation event carries the container's creation time, which may be older
            bisect.insort(store, entry)
        limit = self.policy.max_events(event.event_type)
        if 0 <= limit < len(store):
            excess = len(store) - limit
            del store[:excess]
            self.evicted += excess

    def expire(self) -> int:
        now = self.clock.time()
        removed = 0
        for event_type, store in self._stores.items():
            cutoff = now - self.policy.max_age_s(event_type)
            n = bisect.bisect_left(store, cutoff, key=lambda entry: entry[0])
            if n:
                del store[:n]
                removed += n
        self.expired += removed
        return removed

    def select(self, request: EventRequest) -> list[Event]:
        start = request.start.timestamp() if request.start is not None else None
        end = request.end.timestamp() if request.end is not None else None
        found: list[tuple[float, int, Event]] = []
        for event_type in request.event_types:
            store = self._stores.get(event_type)
            if not store:
                continue
            lo = 0 if start is None else bisect.bisect_left(store, start, key=lambda entry: entry[0])
            hi = len(store) if end is None else bisect.bisect_right(store, end, key=lambda entry: entry[0])
            found.extend(entry for entry in store[lo:hi] if request.wants(entry[2]))
        found.sort(key=lambda entry: (entry[0], entry[1]))
        if request.max_events >= 0:
            found = found[max(len(found) - request.max_events, 0) :] if request.max_events else []
        return [entry[2] for entry in found]

    def __len__(self) -> int:
        return sum(len(store) for store in self._stores.values())

    def count(self, event_type: str) -> int:
        return len(self._stores[event_type])


# -- stream watchers ------------------------------------------------------------------------------
class WatchClosed(Exception):
    """The watch was closed, or dropped because its client did not keep up."""


class Watch:
    """One stream client's bounded queue. The producer side (:meth:`offer`) never blocks."""

    def __init__(self, request: EventRequest, capacity: int, on_close: Callable[[Watch], None]) -> None:
        self.request = request
        self.capacity = capacity
        self._items: deque[Event] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._on_close = on_close
        self._wake: Callable[[], None] | None = None
        self._async_ready: asyncio.Event | None = None
        self.closed = False
        self.dropped = False  # closed because the queue overflowed

    # producer side (any thread)
    def offer(self, event: Event) -> bool:
        """Queue ``event``; False when the queue was full and the watch is dropped."""
        with self._cond:
            if self.closed:
                return True
            if len(self._items) >= self.capacity:
                self.closed = self.dropped = True
                self._items.clear()
                accepted = False
            else:
                self._items.append(event)
                accepted = True
            self._cond.notify()
            wake = self._wake
        if wake is not None:
            wake()
        return accepted

    # consumer side
    def get(self, timeout: float | None = None) -> Event | None:
        """The next event; None after ``timeout`` s without one. Raises WatchClosed."""
        with self._cond:
            self._cond.wait_for(lambda: self._items or self.closed, timeout)
            return self._take()

    async def aget(self, timeout: float) -> Event | None:
        """:meth:`get` for an event loop: waits without holding a thread."""
        if self._async_ready is None:
            loop = asyncio.get_running_loop()
            ready = self._async_ready = asyncio.Event()

            def wake() -> None:
                try:
                    loop.call_soon_threadsafe(ready.set)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    pass

            with self._cond:
                self._wake = wake
        ready = self._async_ready
        with self._cond:
            event = self._take()
            if event is not None:
                return event
            ready.clear()
        try:
            await asyncio.wait_for(ready.wait(), timeout)
        except TimeoutError:
            return None
        with self._cond:
            return self._take()

    def _take(self) -> Event | None:
        """With the lock held: the next event, None when there is none yet; raises WatchClosed."""
        if self._items:
            return self._items.popleft()
        if self.closed:
            raise WatchClosed("dropped: the client did not keep up" if self.dropped else "closed")
        return None

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
            wake = self._wake
        if wake is not None:
            wake()
        self._on_close(self)


# -- the manager ----------------------------------------------------------------------------------
def event_record_id(machine_id: str, container: str, event_type: str, timestamp_us: int) -> str:
    """Deterministic, like the stats' record_id: a creation event re-sent after a restart
    (stamped with the same creation time) keeps its id, so stores can dedupe."""
    return hashlib.blake2b(f"{machine_id}/{container}/{event_type}/{timestamp_us}".encode(), digest_size=16).hexdigest()


@dataclass
class EventStats:
    added: int = 0  # stored (and sunk, and streamed)
    dropped_disabled: dict[str, int] = field(default_factory=dict)  # by type: the policy disables it
    dropped_too_old: int = 0  # older than its type's age limit on arrival
    sink_errors: int = 0
    watchers_dropped: int = 0  # stream clients dropped for not keeping up


class EventManager:
    """The event store, its sink and its stream watchers; also a manager listener
    (container_added → containerCreation, container_removed → containerDeletion) and the
    OOM watcher's callback (:meth:`add_oom`)."""

    EXIT_CODE_WAIT_S = 5.0

    def __init__(
        self,
        policy: StoragePolicy,
        identity: Identity,
        clock: Clock,
        sink: Callable[[Event], None] | None = None,
        docker: DockerFactory | None = None,
        lookup: Callable[[str], Container | None] | None = None,
        watch_queue_size: int = 1000,
        exit_code_wait_s: float | None = None,
    ) -> None:
        self.store = EventStore(policy, clock)
        self.policy = policy
        self.identity = identity
        self.clock = clock
        self.sink = sink
        self.docker = docker
        self.lookup = lookup
        self.watch_queue_size = watch_queue_size
        self.exit_code_wait_s = self.EXIT_CODE_WAIT_S if exit_code_wait_s is None else exit_code_wait_s
        self.stats = EventStats()
        self._lock = threading.Lock()
        self._watchers: list[Watch] = []
        self._sink_failed_logged = False
        # Docker containers' deletions wait (off the caller's thread) for Docker to record the exit.
        self._deletions: queue.Queue[tuple[ContainerReference, float] | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()

    # -- adding ---------------------------------------------------------------------------------
    def add(self, event: Event) -> bool:
        """Store, sink and stream ``event`` unless the policy drops it; never blocks."""
        event_type = event.event_type
        timestamp_s = event.timestamp.timestamp()
        with self._lock:
            if not self.store.accepts(event_type, timestamp_s):
                if not self.policy.enabled(event_type):
                    self.stats.dropped_disabled[event_type] = self.stats.dropped_disabled.get(event_type, 0) + 1
                else:
                    self.stats.dropped_too_old += 1
                return False
            self.store.add(event, timestamp_s)
            self.stats.added += 1
            watchers = [w for w in self._watchers if w.request.wants(event)] if self._watchers else []
        if self.sink is not None:
            try:
                self.sink(event)
            except Exception as exc:  # a sink bug must not stop events; counted, logged once
                self.stats.sink_errors += 1
                if not self._sink_failed_logged:
                    self._sink_failed_logged = True
                    log.warning("events: handing an event to the sinks failed: %r; further failures are counted only", exc)
        for watcher in watchers:
            if not watcher.offer(event):
                self._drop_watcher(watcher)
        return True

    def event(
        self,
        container_name: str,
        event_type: str,
        timestamp_s: float,
        data: EventData | None = None,
        ref: ContainerReference | None = None,
    ) -> Event:
        if ref is None:
            container = self.lookup(container_name) if self.lookup is not None else None
            ref = container.ref if container is not None else ContainerReference(name=container_name)
        ident = self.identity
        return Event(
            record_id=event_record_id(ident.machine_id, ref.id or container_name, event_type, round(timestamp_s * 1_000_000)),
            machine_id=ident.machine_id,
            hostname=ident.hostname,
            container_name=container_name,
            container=ref,
            timestamp=datetime.fromtimestamp(timestamp_s, UTC),
            event_type=event_type,  # type: ignore[arg-type]
            event_data=data or EventData(),
        )

    def add_oom(self, info: OomInfo) -> None:
        """The OOM watcher's callback: ``oom`` for the memory cgroup that hit its limit and
        ``oomKill`` for the container of the killed process (cAdvisor emits the same pair)."""
        data = EventData(pid=info.pid, process_name=info.process_name, constraint=info.constraint)
        self.add(self.event(info.memcg, "oom", info.timestamp, data))
        self.add(self.event(info.container, "oomKill", info.timestamp, data))

    # -- manager listener -------------------------------------------------------------------------
    def container_added(self, container: Container) -> None:
        created = container.spec.creation_time
        timestamp_s = created.timestamp() if created is not None else self.clock.time()
        self.add(self.event(container.name, "containerCreation", timestamp_s, ref=container.ref))

    def container_removed(self, container: Container) -> None:
        now = self.clock.time()
        ref = container.ref
        if self.docker is not None and ref.runtime == "docker" and ref.id:
            self._deletions.put((ref, now))
            self._ensure_worker()
            return
        self.add(self.event(container.name, "containerDeletion", now, EventData(exit_code=-1), ref))

    def _ensure_worker(self) -> None:
        with self._worker_lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._deletion_worker, name="events-docker-exit", daemon=True)
                self._worker.start()

    def _deletion_worker(self) -> None:
        while True:
            item = self._deletions.get()
            if item is None:
                return
            ref, timestamp_s = item
            try:
                code = self.docker_exit_code(ref.id or "")
            except Exception:  # a bug in the lookup must not lose the event
                log.exception("events: exit code of %s", ref.name)
                code = -1
            self.add(self.event(ref.name, "containerDeletion", timestamp_s, EventData(exit_code=code), ref))

    def docker_exit_code(self, cid: str) -> int:
        """Docker's exit code of ``cid``; -1 when Docker does not know it (removed) or cannot be asked.

        The cgroup can vanish before dockerd has handled the exit (the shim reports it
        asynchronously), so a container still shown as running is asked again for a while.
        """
        assert self.docker is not None
        deadline = time.monotonic() + self.exit_code_wait_s
        while True:
            try:
                info = self.docker.inspect(cid)
            except ConnectionError as exc:
                log.debug("events: exit code of %s: %s", cid, exc)
                return -1
            if info is None:
                return -1
            state = info.get("State") or {}
            if not state.get("Running") and state.get("Status") != "running":
                code = state.get("ExitCode")
                return code if isinstance(code, int) else -1
            if time.monotonic() >= deadline:
                return -1
            time.sleep(0.05)

    # -- queries ------------------------------------------------------------------------------------
    def query(self, request: EventRequest) -> list[Event]:
        with self._lock:
            self.store.expire()
            return self.store.select(request)

    def expire(self) -> int:
        """Drop the events past their age limit (the app calls this periodically)."""
        with self._lock:
            return self.store.expire()

    def watch(self, request: EventRequest) -> Watch:
        if request.start is not None or request.end is not None:
            raise ValueError("a stream takes no start_time or end_time: it delivers events from now on")
        watcher = Watch(request, self.watch_queue_size, self._remove_watcher)
        with self._lock:
            self._watchers.append(watcher)
        return watcher

    def _remove_watcher(self, watcher: Watch) -> None:
        with self._lock:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    def _drop_watcher(self, watcher: Watch) -> None:
        with self._lock:
            if watcher not in self._watchers:
                return
            self._watchers.remove(watcher)
            self.stats.watchers_dropped += 1
            first = self.stats.watchers_dropped == 1
        if first:
            log.warning("events: a stream client fell %d events behind and was dropped; further drops are counted only", watcher.capacity)

    @property
    def watchers(self) -> int:
        with self._lock:
            return len(self._watchers)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish pending Docker deletions, end every stream."""
        with self._worker_lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            self._deletions.put(None)
            worker.join(timeout_s)
        with self._lock:
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher.close()


# -- cAdvisor's JSON ------------------------------------------------------------------------------
def rfc3339(ts: datetime) -> str:
    """Go's RFC3339Nano as cAdvisor prints it: UTC with "Z", fraction without trailing zeros."""
    text = ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if ts.microsecond:
        text += f".{ts.microsecond:06d}".rstrip("0")
    return text + "Z"


def cadvisor_event(event: Event) -> dict[str, Any]:
    """cAdvisor's info/v1 Event: OOM details under ``event_data.oom`` (plus ``constraint``
    when the kernel says); a deletion's exit code under ``event_data.deletion``."""
    data = event.event_data
    event_data: dict[str, Any] = {}
    if event.event_type in ("oom", "oomKill") and data.pid is not None:
        oom: dict[str, Any] = {"pid": data.pid, "process_name": data.process_name or ""}
        if data.constraint:
            oom["constraint"] = data.constraint
        event_data["oom"] = oom
    elif event.event_type == "containerDeletion" and data.exit_code is not None:
        event_data["deletion"] = {"exit_code": data.exit_code}
    return {
        "container_name": event.container_name,
        "timestamp": rfc3339(event.timestamp),
        "event_type": event.event_type,
        "event_data": event_data,
    }


def cadvisor_json(event: Event) -> bytes:
    return json.dumps(cadvisor_event(event), separators=(",", ":")).encode()


# -- HTTP -----------------------------------------------------------------------------------------
_TYPE_PARAMS = {
    "oom_events": "oom",
    "oom_kill_events": "oomKill",
    "creation_events": "containerCreation",
    "deletion_events": "containerDeletion",
}
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def _parse_bool(name: str, value: str) -> bool:
    # Go's strconv.ParseBool, which cAdvisor uses.
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}: expected true or false, got {value!r}")


_SPACED_OFFSET = re.compile(r" (\d{2}:\d{2})$")


def _parse_time(name: str, value: str) -> datetime:
    # An unescaped "+02:00" in a query string arrives as " 02:00".
    text = _SPACED_OFFSET.sub(r"+\1", value.strip())
    try:
        ts = parse_rfc3339(text)
    except ValueError:
        ts = None
    if ts is None or ts.tzinfo is None or "T" not in value.upper():
        raise ValueError(f"{name}: expected an RFC 3339 time such as 2024-05-01T12:00:00Z, got {value!r}")
    return ts


def parse_event_request(name: str, params: Mapping[str, str]) -> tuple[EventRequest, bool]:
    """cAdvisor's query parameters (api/handler.go getEventRequest) → (request, stream).

    As in cAdvisor no event type is selected unless asked for (``all_events`` or one of
    ``oom_events``, ``oom_kill_events``, ``creation_events``, ``deletion_events``);
    ``max_events`` defaults to 10, -1 returns all. Unlike cAdvisor, which ignores a value it
    cannot parse, a bad value is an error naming the parameter.
    """
    stream = _parse_bool("stream", params["stream"]) if "stream" in params else False
    subcontainers = _parse_bool("subcontainers", params["subcontainers"]) if "subcontainers" in params else False
    types: set[str] = set()
    if "all_events" in params and _parse_bool("all_events", params["all_events"]):
        types.update(EVENT_TYPES)
    for param, event_type in _TYPE_PARAMS.items():
        if param in params and _parse_bool(param, params[param]):
            types.add(event_type)
    max_events = DEFAULT_QUERY_MAX_EVENTS
    if "max_events" in params:
        try:
            max_events = int(params["max_events"])
        except ValueError:
            raise ValueError(f"max_events: expected a whole number (-1: all), got {params['max_events']!r}") from None
    start = _parse_time("start_time", params["start_time"]) if "start_time" in params else None
    end = _parse_time("end_time", params["end_time"]) if "end_time" in params else None
    request = EventRequest(
        container_name=posixpath.normpath("/" + name.strip("/")) if name.strip("/") else "/",
        include_subcontainers=subcontainers,
        start=start,
        end=end,
        max_events=max_events,
        event_types=frozenset(types),
    )
    return request, stream


def events_router(manager: EventManager, resolve: Callable[[str], str | None]) -> APIRouter:
    """``/api/v1.3/events/<container>`` and ``/api/v2.0/events/<container>``.

    ``resolve`` maps the container named in the URL to its canonical name; None (an unknown
    name) keeps the name as given, since a deleted container's events stay queryable.
    Without ``stream``: a JSON list. With ``stream=true``: one JSON object per line
    (cAdvisor's json.Encoder stream), from now on, until the client goes away or falls
    ``watch_queue_size`` events behind.
    """
    from fastapi import APIRouter
    from fastapi.responses import PlainTextResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    router = APIRouter()

    # Plain Starlette routes: the handler reads the query itself, with cAdvisor's rules.
    async def handle(request: Any) -> Response:
        params = {key: request.query_params.getlist(key)[0] for key in request.query_params.keys()}
        try:
            query, stream = parse_event_request(request.path_params.get("name", ""), params)
        except ValueError as exc:
            return PlainTextResponse(str(exc), status_code=400)
        assert query.container_name is not None
        canonical = resolve(query.container_name)
        if canonical:
            query = dataclasses.replace(query, container_name=canonical)
        if not stream:
            events = await run_in_threadpool(manager.query, query)
            body = b"[" + b",".join(cadvisor_json(e) for e in events) + b"]"
            return Response(body, media_type="application/json")
        try:
            watch = manager.watch(query)
        except ValueError as exc:
            return PlainTextResponse(str(exc), status_code=400)

        async def lines() -> Any:
            try:
                while True:
                    try:
                        event = await watch.aget(1.0)
                    except WatchClosed:
                        return
                    if event is not None:
                        yield cadvisor_json(event) + b"\n"
            finally:  # also when the response task is cancelled on the client's disconnect
                watch.close()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    for version in ("v1.3", "v2.0"):
        router.add_route(f"/api/{version}/events", handle, methods=["GET"], name=f"events-{version}-root")
        router.add_route(f"/api/{version}/events/{{name:path}}", handle, methods=["GET"], name=f"events-{version}")
    return router
