"""Building records: made-up ones for unit tests of our own logic (cache, sinks), and this
host's real ones for the sink tests and benchmarks."""

from datetime import UTC, datetime

from exporter.app import App
from exporter.config import Config
from exporter.models import ContainerReference, ContainerStats, CpuStats, MemoryStats


def make_record(name: str = "/test", seq: int = 1, ts: float = 1_700_000_000.0, cpu_ns: int = 0) -> ContainerStats:
    return ContainerStats(
        timestamp=datetime.fromtimestamp(ts, UTC),
        machine_id="m" * 32,
        hostname="host",
        run_id="r" * 32,
        record_id=f"{name}-{seq}-{ts}",
        seq=seq,
        container=ContainerReference(name=name, labels={"app": "x"}),
        cpu=CpuStats(total_ns=cpu_ns),
        memory=MemoryStats(usage_bytes=4096),
    )


def collect_host_records() -> list[ContainerStats]:
    """One real record per cgroup of this host: one collection round, Docker not asked."""
    return App(Config.model_validate({"storage_driver": [], "docker_endpoint": "unix:///nonexistent.sock"})).collect_once()
