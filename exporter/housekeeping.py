"""Housekeeping: one APScheduler interval job per container, dynamic intervals.

This is the only module that imports APScheduler (3.x).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from queue import SimpleQueue
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobEvent
from apscheduler.executors.base import BaseExecutor, run_job
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

log = logging.getLogger(__name__)


class DynamicInterval:
    """cAdvisor's dynamic housekeeping: an unchanged sample doubles the interval up to the
    maximum; a change goes back to the base interval."""

    __slots__ = ("base_s", "max_s", "allow_dynamic", "current_s")

    def __init__(self, base_s: float, max_s: float, allow_dynamic: bool) -> None:
        self.base_s = base_s
        self.max_s = max(max_s, base_s)
        self.allow_dynamic = allow_dynamic
        self.current_s = base_s

    def next(self, changed: bool) -> float:
        if not self.allow_dynamic or changed:
            self.current_s = self.base_s
        else:
            self.current_s = min(self.current_s * 2, self.max_s)
        return self.current_s


class SchedulerStats:
    __slots__ = ("skipped_overlap", "missed", "errors")

    def __init__(self) -> None:
        self.skipped_overlap = 0
        self.missed = 0
        self.errors = 0


class QueueExecutor(BaseExecutor):
    """Runs jobs on a fixed set of threads fed by one queue.

    APScheduler's ThreadPoolExecutor wraps every run in a concurrent.futures Future with a done
    callback; with a thousand runs a second that bookkeeping costs as much as a container's
    collection. This executor keeps APScheduler's semantics (max_instances, events) without it.
    """

    def __init__(self, workers: int) -> None:
        super().__init__()
        self._queue: SimpleQueue[tuple[Any, list[datetime]] | None] = SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"housekeeping-{i}", daemon=True) for i in range(workers)]

    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        for thread in self._threads:
            thread.start()

    def shutdown(self, wait: bool = True) -> None:
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                if thread.is_alive():
                    thread.join()

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        self._queue.put((job, run_times))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            job, run_times = item
            try:
                events = run_job(job, job._jobstore_alias, run_times, self._logger.name)
            except BaseException as exc:
                self._run_job_error(job.id, exc, exc.__traceback__)
            else:
                self._run_job_success(job.id, events)


class Scheduler:
    """Periodic jobs on a thread pool; a job never overlaps itself and never raises out."""

    def __init__(self, workers: int = 4) -> None:
        self._scheduler = BackgroundScheduler(
            executors={"default": QueueExecutor(workers)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )
        self.stats = SchedulerStats()
        self._scheduler.add_listener(self._on_event, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED | EVENT_JOB_ERROR)
        # APScheduler logs every run at INFO and every skipped overlap at WARNING; we count those
        # instead (stats) so a slow host does not flood the log.
        for name in ("apscheduler.scheduler", "apscheduler.executors.default", "apscheduler.executors"):
            logging.getLogger(name).setLevel(logging.ERROR)

    def _on_event(self, event: JobEvent) -> None:
        if event.code == EVENT_JOB_MAX_INSTANCES:
            self.stats.skipped_overlap += 1
        elif event.code == EVENT_JOB_MISSED:
            self.stats.missed += 1
        else:
            self.stats.errors += 1

    def start(self) -> None:
        self._scheduler.start()

    def shutdown(self, wait: bool = True) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=wait)

    def add(self, job_id: str, fn: Callable[[], None], interval_s: float, first_run_in_s: float | None = None) -> None:
        """Run ``fn`` every ``interval_s``; the first run comes after ``first_run_in_s``
        (default: a random splay within one interval, so jobs do not all fire together)."""
        delay = random.uniform(0, interval_s) if first_run_in_s is None else first_run_in_s
        first = _on_slot(datetime.now(UTC) + timedelta(seconds=delay))
        self._scheduler.add_job(
            _guarded(job_id, fn),
            IntervalTrigger(seconds=interval_s, start_date=first, timezone=UTC),
            id=job_id,
            name=job_id,
            next_run_time=first,
            replace_existing=True,
        )

    def reschedule(self, job_id: str, interval_s: float) -> None:
        """Next run ``interval_s`` from now, then every ``interval_s``."""
        first = _on_slot(datetime.now(UTC) + timedelta(seconds=interval_s))
        try:
            self._scheduler.reschedule_job(job_id, trigger=IntervalTrigger(seconds=interval_s, start_date=first, timezone=UTC))
        except JobLookupError:
            pass

    def run_soon(self, job_id: str) -> None:
        """Bring a job's next run forward to now."""
        try:
            self._scheduler.modify_job(job_id, next_run_time=datetime.now(UTC))
        except JobLookupError:
            pass

    def remove(self, job_id: str) -> None:
        try:
            self._scheduler.remove_job(job_id)
        except JobLookupError:
            pass

    def job_ids(self) -> list[str]:
        return [job.id for job in self._scheduler.get_jobs()]

    def job_interval(self, job_id: str) -> float | None:
        job = self._scheduler.get_job(job_id)
        if job is None or not isinstance(job.trigger, IntervalTrigger):
            return None
        return job.trigger.interval.total_seconds()


# Runs are put on a grid of SLOT_S: the scheduler wakes once per slot for all the jobs due in it
# instead of once per job, which is most of its cost with hundreds of containers.
SLOT_S = 0.25


def _on_slot(when: datetime) -> datetime:
    slot_us = int(SLOT_S * 1_000_000)
    epoch_us = int(when.timestamp() * 1_000_000)
    return datetime.fromtimestamp(-(-epoch_us // slot_us) * slot_us / 1_000_000, UTC)


def _guarded(job_id: str, fn: Callable[[], None]) -> Callable[[], None]:
    failures = 0

    def run() -> None:
        nonlocal failures
        try:
            fn()
        except Exception:
            failures += 1
            if failures == 1 or failures % 100 == 0:
                log.exception("housekeeping job %s failed (%d failures so far)", job_id, failures)

    return run


class ContainerJob:
    """What a container's job does on each tick: collect, store, adjust the interval.

    ``collect`` returns the new record, or raises ContainerGone; ``changed`` says whether the
    sample differs from the previous one (for dynamic housekeeping).
    """

    def __init__(
        self,
        name: str,
        collect: Callable[[], bool],
        on_gone: Callable[[str], None],
        interval: DynamicInterval,
        scheduler: Scheduler | None,
        gone_error: type[Exception],
    ) -> None:
        self.name = name
        self._collect = collect
        self._on_gone = on_gone
        self.interval = interval
        self._scheduler = scheduler
        self._gone_error = gone_error
        self._lock = threading.Lock()

    def __call__(self) -> None:
        if not self._lock.acquire(blocking=False):
            return
        try:
            try:
                changed = self._collect()
            except self._gone_error:
                self._on_gone(self.name)
                return
            before = self.interval.current_s
            after = self.interval.next(changed)
            if after != before and self._scheduler is not None:
                self._scheduler.reschedule(self.name, after)
        finally:
            self._lock.release()
