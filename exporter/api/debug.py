"""Profiling endpoints under /debug/, served only with ``enable_profiling``.

* ``/debug/threads``: the stack of every thread, as text.
* ``/debug/memory?top=N``: the top allocation sites from :mod:`tracemalloc`. Tracing starts on
  the first request (it costs memory and CPU from then on, until ``/debug/memory/stop``), so
  that first answer only covers what was allocated since; it says so.
* ``/debug/profile?seconds=N&hz=H``: a sampling CPU profile of the whole process. cProfile only
  sees the thread that runs it, so a sampler thread reads every thread's current frame
  (:func:`sys._current_frames`) ``hz`` times a second for ``seconds`` (at most 60) and answers
  the aggregated stacks in the collapsed format of flamegraph.pl / speedscope / inferno:
  ``thread;outer (file:line);...;inner (file:line) count``. Samples of idle threads (blocked in
  a wait, a select or a sleep) are kept: wall-clock profile, filter them out as needed.
"""

from __future__ import annotations

import asyncio
import linecache
import sys
import threading
import time
import tracemalloc
from collections import Counter
from types import FrameType
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse

MAX_PROFILE_S = 60
TRACEMALLOC_FRAMES = 16

_tracemalloc_lock = threading.Lock()

INDEX = """container-exporter profiling

/debug/threads              stacks of every thread
/debug/memory?top=N         top N allocation sites (tracemalloc; starts tracing on first use)
/debug/memory/stop          stop tracemalloc tracing
/debug/profile?seconds=N    sampling CPU profile of every thread for N s (1..60), collapsed stacks;
                            &hz=H sets the sampling rate (default 100)
"""


def thread_stacks() -> str:
    frames = sys._current_frames()
    threads = {t.ident: t for t in threading.enumerate()}
    parts = []
    for ident, frame in sorted(frames.items(), key=lambda item: (threads.get(item[0]) is None, item[0])):
        thread = threads.get(ident)
        name = thread.name if thread is not None else "?"
        daemon = " daemon" if thread is not None and thread.daemon else ""
        native = f" native_id={thread.native_id}" if thread is not None else ""
        lines = [f'Thread "{name}" ident={ident}{native}{daemon}']
        for f in _stack(frame):
            code = f.f_code
            lines.append(f'  File "{code.co_filename}", line {f.f_lineno}, in {code.co_name}')
            source = linecache.getline(code.co_filename, f.f_lineno).strip()
            if source:
                lines.append(f"    {source}")
        parts.append("\n".join(lines))
    return f"{len(parts)} threads\n\n" + "\n\n".join(parts) + "\n"


def _stack(frame: FrameType | None) -> list[FrameType]:
    """Outermost first."""
    out = []
    while frame is not None:
        out.append(frame)
        frame = frame.f_back
    out.reverse()
    return out


def memory_top(top: int, key_type: str) -> str:
    with _tracemalloc_lock:
        started_now = not tracemalloc.is_tracing()
        if started_now:
            tracemalloc.start(TRACEMALLOC_FRAMES)
    if started_now:
        return (
            f"tracemalloc was not running: started it now ({TRACEMALLOC_FRAMES} frames per allocation).\n"
            "Only allocations from now on are traced; ask again in a while for the top sites.\n"
            "Tracing costs memory and CPU until /debug/memory/stop.\n"
        )
    snapshot = tracemalloc.take_snapshot().filter_traces(
        (tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>"))
    )
    stats = snapshot.statistics(key_type)
    current, peak = tracemalloc.get_traced_memory()
    lines = [
        f"tracemalloc: {current / 2**20:.1f} MiB traced now, peak {peak / 2**20:.1f} MiB, "
        f"{len(stats)} sites by {key_type}; top {min(top, len(stats))}:",
        "",
    ]
    for i, stat in enumerate(stats[:top], 1):
        frame = stat.traceback[0]
        lines.append(f"#{i}: {frame.filename}:{frame.lineno}: {stat.size / 1024:.1f} KiB in {stat.count} blocks")
        source = linecache.getline(frame.filename, frame.lineno).strip()
        if source:
            lines.append(f"    {source}")
        if key_type == "traceback":
            lines.extend(f"    {line}" for line in stat.traceback.format(most_recent_first=True)[2:])
    total = sum(s.size for s in stats)
    lines.append("")
    lines.append(f"total traced: {total / 2**20:.1f} MiB")
    return "\n".join(lines) + "\n"


def _label(frame: FrameType) -> str:
    code = frame.f_code
    name = getattr(code, "co_qualname", code.co_name)
    return f"{name} ({code.co_filename}:{frame.f_lineno})".replace(";", ":")


class Sampler:
    """Samples every other thread's stack until stopped; counts collapsed stacks."""

    def __init__(self, hz: float) -> None:
        self.interval_s = 1.0 / hz
        self.counts: Counter[str] = Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="debug-profiler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = threading.get_ident()
        next_at = time.monotonic()
        while not self._stop.is_set():
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                thread = names.get(ident, f"thread-{ident}").replace(";", ":").replace(" ", "_")
                self.counts[";".join([thread, *(_label(f) for f in _stack(frame))])] += 1
            self.samples += 1
            next_at += self.interval_s
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (a busy GIL): do not try to catch up
                next_at = time.monotonic()
                delay = 0
            self._stop.wait(delay)

    def collapsed(self) -> str:
        return "".join(f"{stack} {n}\n" for stack, n in sorted(self.counts.items()))


def router() -> APIRouter:
    api = APIRouter(prefix="/debug", tags=["debug"])

    @api.get("/", response_class=PlainTextResponse, summary="Profiling endpoints")
    def index() -> str:
        return INDEX

    @api.get("/threads", response_class=PlainTextResponse, summary="Stacks of every thread")
    def threads() -> str:
        return thread_stacks()

    @api.get("/memory", response_class=PlainTextResponse, summary="Top allocation sites (tracemalloc)")
    def memory(
        top: Annotated[int, Query(ge=1, le=1000, description="how many sites")] = 25,
        key_type: Annotated[str, Query(pattern="^(lineno|filename|traceback)$", description="group by")] = "lineno",
    ) -> str:
        return memory_top(top, key_type)

    @api.get("/memory/stop", response_class=PlainTextResponse, summary="Stop tracemalloc")
    def memory_stop() -> str:
        with _tracemalloc_lock:
            was = tracemalloc.is_tracing()
            tracemalloc.stop()
        return "tracemalloc stopped\n" if was else "tracemalloc was not running\n"

    @api.get("/profile", response_class=PlainTextResponse, summary="Sampling CPU profile of every thread, collapsed stacks")
    async def profile(
        seconds: Annotated[float, Query(gt=0, le=MAX_PROFILE_S, description="how long to sample")] = 10,
        hz: Annotated[float, Query(ge=1, le=1000, description="samples per second")] = 100,
    ) -> PlainTextResponse:
        sampler = Sampler(hz)
        sampler.start()
        started = time.monotonic()
        try:
            # Awaiting (not blocking a worker thread) lets a server shutdown cancel the profile.
            await asyncio.sleep(seconds)
        finally:
            sampler.stop()
        elapsed = time.monotonic() - started
        return PlainTextResponse(
            sampler.collapsed(),
            headers={"X-Profile-Samples": str(sampler.samples), "X-Profile-Seconds": f"{elapsed:.3f}", "X-Profile-Hz": f"{hz:g}"},
        )

    return api
