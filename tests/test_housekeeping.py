import threading
import time

from exporter.housekeeping import ContainerJob, DynamicInterval, Scheduler


class Gone(Exception):
    pass


def test_dynamic_interval_doubles_to_max_and_resets():
    interval = DynamicInterval(base_s=1, max_s=60, allow_dynamic=True)
    seen = [interval.next(changed=False) for _ in range(8)]
    assert seen == [2, 4, 8, 16, 32, 60, 60, 60]
    assert interval.next(changed=True) == 1
    assert interval.next(changed=False) == 2


def test_dynamic_interval_disabled_stays_at_base():
    interval = DynamicInterval(base_s=1, max_s=60, allow_dynamic=False)
    assert {interval.next(changed=False) for _ in range(5)} == {1}


def test_container_job_reschedules_on_interval_change():
    scheduler = Scheduler(workers=1)
    calls = []
    scheduler.add("/c", lambda: None, 1.0, first_run_in_s=3600)
    changes = iter([False, False, True])
    job = ContainerJob("/c", lambda: next(changes), calls.append, DynamicInterval(1, 4, True), scheduler, Gone)
    job()
    assert scheduler.job_interval("/c") == 2
    job()
    assert scheduler.job_interval("/c") == 4
    job()
    assert scheduler.job_interval("/c") == 1
    assert calls == []


def test_container_job_reports_gone():
    gone = []

    def collect():
        raise Gone()

    job = ContainerJob("/c", collect, gone.append, DynamicInterval(1, 4, True), None, Gone)
    job()
    assert gone == ["/c"]


def test_scheduler_runs_jobs_without_overlap_and_survives_exceptions():
    scheduler = Scheduler(workers=4)
    running = 0
    max_running = 0
    runs = 0
    lock = threading.Lock()

    def slow():
        nonlocal running, max_running, runs
        with lock:
            running += 1
            runs += 1
            max_running = max(max_running, running)
        time.sleep(0.35)
        with lock:
            running -= 1

    failures = 0

    def failing():
        nonlocal failures
        failures += 1
        raise RuntimeError("boom")

    scheduler.add("slow", slow, 0.1, first_run_in_s=0)
    scheduler.add("failing", failing, 0.1, first_run_in_s=0)
    scheduler.start()
    try:
        deadline = time.monotonic() + 5
        while (runs < 3 or failures < 3) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        scheduler.shutdown()
    assert runs >= 3 and failures >= 3
    assert max_running == 1
    assert scheduler.stats.skipped_overlap > 0


def test_splay_spreads_first_runs():
    scheduler = Scheduler(workers=1)
    for i in range(50):
        scheduler.add(f"/c{i}", lambda: None, 10.0)
    times = sorted(job.next_run_time.timestamp() for job in scheduler._scheduler.get_jobs())
    # Uniform over 10 s: 50 jobs do not land within one second of each other.
    assert times[-1] - times[0] > 5
    scheduler.remove("/c0")
    assert "/c0" not in scheduler.job_ids() and len(scheduler.job_ids()) == 49
