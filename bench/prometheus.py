"""Scrape cost of the Prometheus page for N containers.

Reads one real record and spec of every cgroup on this machine, then builds N synthetic
containers from them: each is a real record validated again under another name, with Docker-like
labels (5 each, 2 of them unique per container), an image, an eth0 interface (copied from the
host's first one when the source cgroup has no network of its own), and a CFS quota on every
other one. They go into a real InMemoryCache; the registry is exporter.api.prometheus's.

Reports, per N: series in the page, page size, and the median time of

  * collect: building the families (ContainerCollector and friends);
  * text / openmetrics: building and encoding the page with our encoder;
  * gzip: compressing the text page at level 1 (what the handler does for Prometheus);
  * client text / client openmetrics: prometheus_client's own encoders on the same registry.

Usage: python bench/prometheus.py [--counts 100 1000 5000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client import exposition  # noqa: E402
from prometheus_client.openmetrics import exposition as om_exposition  # noqa: E402

from exporter.api.context import ApiContext  # noqa: E402
from exporter.api.prometheus import make_registry, render  # noqa: E402
from exporter.app import App  # noqa: E402
from exporter.cache import InMemoryCache  # noqa: E402
from exporter.clock import SystemClock  # noqa: E402
from exporter.config import Config  # noqa: E402
from exporter.discovery.watcher import scan  # noqa: E402
from exporter.housekeeping import SchedulerStats  # noqa: E402
from exporter.models import ContainerReference, ContainerSpec, ContainerStats  # noqa: E402


def real_samples(app: App) -> list[tuple[ContainerStats, ContainerSpec]]:
    pairs = []
    for name in sorted(scan(app.roots)):
        container = app.manager.build(name)
        if container is None:
            continue
        try:
            record, _ = container.collect()
            pairs.append((record, container.spec))
        finally:
            container.close()
    return pairs


class Manager:
    def __init__(self, containers: list[Any]) -> None:
        self._containers = containers
        self.malformed_files = 0

    def containers(self) -> list[Any]:
        return list(self._containers)

    def names(self) -> set[str]:
        return {c.name for c in self._containers}


def synthetic(n: int, pairs: list[tuple[ContainerStats, ContainerSpec]], cache: InMemoryCache) -> list[Any]:
    host_net = next((r.network for r, _ in pairs if r.container.name == "/" and r.network), None)
    eth0 = host_net[0].model_dump() | {"name": "eth0"} if host_net else None
    containers = []
    now = time.time()
    for i in range(n):
        record, spec = pairs[i % len(pairs)]
        cid = uuid.uuid4().hex + uuid.uuid4().hex
        name = f"/docker/{cid}"
        labels = {
            "com.docker.compose.project": f"project{i % 10}",
            "com.docker.compose.service": f"service{i % 50}",
            "com.docker.compose.container-number": str(i),
            "maintainer": "bench@example.com",
            "app.kubernetes.io/instance": f"bench-{i:05d}",
        }
        image = f"registry.example.com/team/app{i % 20}:1.{i % 7}"
        ref = ContainerReference(name=name, id=cid, aliases=[f"bench-{i:05d}", cid], namespace="docker", runtime="docker", labels=labels, image=image)
        data = record.model_dump()
        data.update(container=ref.model_dump(), timestamp=now, record_id=uuid.uuid4().hex)
        if not data.get("network") and eth0 is not None:
            data["network"] = [eth0]
        stats = ContainerStats.model_validate(data)
        cpu = spec.cpu.model_copy(update={"quota_us": 50_000, "period_us": 100_000} if i % 2 else {})
        new_spec = spec.model_copy(update={"labels": labels, "image": image, "cpu": cpu})
        cache.add_stats(stats)
        containers.append(SimpleNamespace(name=name, ref=ref, spec=new_spec))
    return containers


def median_ms(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    config = Config.model_validate({"docker_endpoint": "unix:///nonexistent/docker.sock", "storage_driver": []})
    app = App(config, with_sinks=False)
    pairs = real_samples(app)
    print(f"{len(pairs)} real cgroups as templates; cgroup mode {app.layout.mode}; {config.metrics and ', '.join(sorted(config.metrics))}")
    print(f"{'containers':>10} {'series':>8} {'text KiB':>9} {'gzip KiB':>9} {'collect ms':>11} {'text ms':>8} {'om ms':>7} {'gzip ms':>8} {'client text ms':>15} {'client om ms':>13}")
    for n in args.counts:
        cache = InMemoryCache(3600, 10, SystemClock())
        containers = synthetic(n, pairs, cache)
        ctx = ApiContext(
            config=config,
            manager=Manager(containers),  # type: ignore[arg-type]
            cache=cache,
            machine_info=app.machine_info,
            version_info=app.version_info,
            sinks=[],
            scheduler=SimpleNamespace(stats=SchedulerStats()),  # type: ignore[arg-type]
            started_at=time.time(),
        )
        registry = make_registry(ctx)
        text = render(registry)
        series = sum(1 for line in text.split(b"\n") if line and not line.startswith(b"#"))
        compressed = gzip.compress(text, compresslevel=1)
        collect_ms = median_ms(lambda: list(registry.collect()), args.repeat)  # noqa: B023
        text_ms = median_ms(lambda: render(registry), args.repeat)  # noqa: B023
        om_ms = median_ms(lambda: render(registry, openmetrics=True), args.repeat)  # noqa: B023
        gzip_ms = median_ms(lambda: gzip.compress(text, compresslevel=1), args.repeat)  # noqa: B023
        client_ms = median_ms(lambda: exposition.generate_latest(registry), max(1, args.repeat // 2))  # noqa: B023
        client_om_ms = median_ms(lambda: om_exposition.generate_latest(registry), max(1, args.repeat // 2))  # noqa: B023
        print(
            f"{n:>10} {series:>8} {len(text) / 1024:>9.0f} {len(compressed) / 1024:>9.0f} {collect_ms:>11.1f} {text_ms:>8.1f} "
            f"{om_ms:>7.1f} {gzip_ms:>8.1f} {client_ms:>15.1f} {client_om_ms:>13.1f}"
        )


if __name__ == "__main__":
    main()
