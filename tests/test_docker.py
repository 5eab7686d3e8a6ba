"""Docker containers on a real dockerd: metadata, limits, CPU against Docker's own stats API."""

from __future__ import annotations

import socket
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from exporter.app import App
from exporter.discovery.docker import parse_docker_time
from tests.test_fs import du_bytes, du_inodes
from tests.test_pipeline import app_config, wait_for

pytestmark = [pytest.mark.root, pytest.mark.docker]
MIB = 1024 * 1024


@pytest.fixture
def docker_app(docker_engine, tmp_path: Path):
    config = app_config(
        tmp_path,
        allow_dynamic_housekeeping=False,
        docker_only=True,
        docker_endpoint=docker_engine.endpoint,
        docker_env_metadata_whitelist=["GREETING"],
    )
    app = App(config)
    app.start()
    yield app
    app.stop()


def docker_cpu_sample(client, cid: str) -> tuple[float, int]:
    stats = client.api.stats(cid, stream=False, one_shot=True)
    return parse_docker_time(stats["read"]).timestamp(), stats["cpu_stats"]["cpu_usage"]["total_usage"]


def test_docker_container_metadata_limits_and_cpu(docker_app, docker_engine, busybox_image, make_container):
    name = f"ce-test-{uuid.uuid4().hex[:8]}"
    container = make_container(
        busybox_image,
        ["sh", "-c", "yes > /dev/null"],
        name=name,
        labels={"app": "burner", "team": "metrics"},
        environment={"GREETING": "hello", "SECRET": "nope"},
        mem_limit="64m",
        nano_cpus=500_000_000,
    )
    found = wait_for(lambda: docker_app.manager.resolve("docker", name), 3.0, f"docker container {name}")
    ref, spec = found.ref, found.spec
    assert ref.runtime == "docker" and ref.namespace == "docker"
    assert ref.id == container.id
    assert ref.aliases == [name, container.id]
    assert docker_app.manager.resolve("docker", container.id) is found
    assert ref.labels["app"] == "burner" and ref.labels["team"] == "metrics"
    assert ref.image == busybox_image
    assert spec.env == {"GREETING": "hello"}
    assert spec.memory.limit_bytes == 64 * MIB
    assert spec.cpu.limit_cores == pytest.approx(0.5)
    assert spec.cpu.quota_us == 50_000 and spec.cpu.period_us == 100_000
    container.reload()
    assert spec.creation_time == parse_docker_time(container.attrs["Created"])

    # CPU rate over the same window: ours from two records, Docker's from two stats calls.
    client = docker_engine.client
    wait_for(lambda: len(docker_app.cache.recent(found.name)) >= 2, 5.0, "records")
    t1, u1 = docker_cpu_sample(client, container.id)
    time.sleep(4)
    t2, u2 = docker_cpu_sample(client, container.id)
    time.sleep(1.2)  # one more housekeeping tick past the window
    records = docker_app.cache.recent(found.name)

    def nearest(t: float):
        return min(records, key=lambda r: abs(r.timestamp.timestamp() - t))

    r1, r2 = nearest(t1), nearest(t2)
    assert abs(r1.timestamp.timestamp() - t1) < 1.0 and abs(r2.timestamp.timestamp() - t2) < 1.0
    ours = (r2.cpu.total_ns - r1.cpu.total_ns) / 1e9 / (r2.timestamp - r1.timestamp).total_seconds()
    theirs = (u2 - u1) / 1e9 / (t2 - t1)
    assert theirs == pytest.approx(0.5, rel=0.2), "the container should be throttled to half a core"
    assert ours == pytest.approx(theirs, rel=0.10)
    assert r2.cpu.throttled_periods > r1.cpu.throttled_periods

    # Memory against Docker's stats API (v1: memory.usage_in_bytes).
    mem = client.api.stats(container.id, stream=False, one_shot=True)["memory_stats"]
    latest = docker_app.cache.latest(found.name)
    assert latest.memory.usage_bytes == pytest.approx(mem["usage"], abs=512 * 1024)
    assert mem["limit"] == 64 * MIB

    # Removal is detected and cleaned up.
    container.remove(force=True)
    wait_for(lambda: docker_app.manager.resolve("docker", name) is None, 3.0, "removal")
    assert found.name not in docker_app.scheduler.job_ids()
    assert found.name not in docker_app.cache


def test_docker_only_ignores_raw_cgroups(docker_app, make_cgroup):
    cg = make_cgroup()
    time.sleep(1.0)
    assert docker_app.manager.get(cg.name) is None
    assert docker_app.manager.get("/") is not None  # the root is always reported
    assert {c.ref.runtime for c in docker_app.manager.containers()} <= {"docker", "raw"}
    assert all(c.ref.runtime == "docker" or c.name == "/" for c in docker_app.manager.containers())


def test_docker_metadata_arrives_when_docker_comes_back(tmp_path, docker_engine, busybox_image, make_container):
    """With dockerd unreachable a Docker cgroup is reported by id; the rescan fills in the name."""
    container = make_container(busybox_image, ["sleep", "3600"], name=f"ce-late-{uuid.uuid4().hex[:8]}")
    proxy = tmp_path / "docker.sock"
    config = app_config(tmp_path, docker_only=True, docker_endpoint=f"unix://{proxy}", storage_driver=[])
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(proxy))  # a socket file nobody listens on: connections are refused
    dead.close()
    app = App(config)
    app.docker.RECONNECT_S = 0.0
    try:
        app.start()
        cgroup_name = f"/docker/{container.id}"
        found = wait_for(lambda: app.manager.get(cgroup_name), 3.0, "the container by cgroup")
        assert found.meta.incomplete and found.ref.aliases == [container.id] and found.ref.labels == {}
        proxy.unlink()
        proxy.symlink_to(docker_engine.endpoint.removeprefix("unix://"))
        app.global_housekeeping()
        assert found.ref.aliases == [container.name, container.id]
        assert app.manager.resolve("docker", container.name) is found
        assert found.ref.labels["container-exporter-test"] == "1"
    finally:
        app.stop()


def test_parse_docker_time():
    assert parse_docker_time("2024-05-01T10:20:30.123456789Z") == datetime.fromisoformat("2024-05-01T10:20:30.123456+00:00")
    assert parse_docker_time("0001-01-01T00:00:00Z") is None
    assert parse_docker_time("garbage") is None


def test_writable_layer_usage_matches_du(docker_engine, busybox_image, make_container, tmp_path):
    config = app_config(
        tmp_path, docker_only=True, docker_endpoint=docker_engine.endpoint, writable_layer_interval="1s", storage_driver=[]
    )
    app = App(config)
    app.start()
    try:
        container = make_container(busybox_image, ["sh", "-c", "dd if=/dev/zero of=/blob bs=1M count=8 && touch /done && sleep 3600"])
        found = wait_for(lambda: app.manager.resolve("docker", container.id), 3.0, "the container")
        upper = found.meta.writable_layer
        assert upper is not None and upper.name == "diff"
        wait_for(lambda: (upper / "done").exists(), 10.0, "the write to finish")
        record = wait_for(
            lambda: (r := app.cache.latest(found.name)) and r.filesystem and r.filesystem[0].usage_bytes >= 8 * MIB and r,
            10.0,
            "a measured writable layer",
        )
        layer = record.filesystem[0]
        assert layer.usage_bytes == du_bytes(upper)
        assert layer.inodes_used == du_inodes(upper)
        assert layer.mountpoint == str(upper)
    finally:
        app.stop()
