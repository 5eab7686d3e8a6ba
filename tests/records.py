"""Building records: made-up ones for unit tests of our own logic (cache, sinks), and this
host's real ones for the sink tests and benchmarks."""

import hashlib
import uuid
from datetime import UTC, datetime, timedelta

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


def samples(host_records: list[ContainerStats], rounds: int, first_seq: int = 1) -> list[ContainerStats]:
    """``rounds`` samples of every host container, as housekeeping would make them: seq
    ``first_seq``, ``first_seq+1``, ...; one second apart; each with its own record_id."""
    out = []
    for k in range(first_seq, first_seq + rounds):
        for base in host_records:
            data = base.model_dump()
            data.update(
                seq=k,
                timestamp=base.timestamp + timedelta(seconds=k),
                record_id=hashlib.sha256(f"{base.record_id}/{k}".encode()).hexdigest()[:32],
            )
            out.append(ContainerStats.model_validate(data))
    return out


def copies(
    base: list[ContainerStats],
    n: int,
    *,
    start: datetime | None = None,
    step: timedelta = timedelta(seconds=1),
    labels: dict[str, str] | None = None,
) -> list[ContainerStats]:
    """``n`` records cycling through ``base`` with their own seq, timestamp and record_id.

    Built by validation, not model_copy: a copy would keep the original's cached JSON.
    """
    start = start or datetime.now(UTC).replace(microsecond=123456)
    token = uuid.uuid4().hex
    out = []
    for i in range(n):
        data = base[i % len(base)].model_dump()
        data["seq"] = i + 1
        data["timestamp"] = start + i * step
        data["record_id"] = hashlib.sha256(f"{token}/{i}".encode()).hexdigest()[:32]
        if labels is not None:
            data["container"]["labels"] = dict(labels)
        out.append(ContainerStats.model_validate(data))
    return out
