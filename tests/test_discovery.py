"""Factories in order, on names and on real cgroups; discovery when inotify runs out of watches."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from exporter.discovery.docker import DockerFactory
from exporter.discovery.factories import IGNORE, ContainerMeta, RawFactory, RuntimeScopeFactory, SystemdFactory
from tests.test_pipeline import start_app, wait_for  # noqa: F401 - start_app is a fixture

ID = "0123456789abcdef" * 4


def decide(name: str, docker_only: bool = False):
    for factory in (RuntimeScopeFactory(docker_only), SystemdFactory(docker_only), RawFactory(docker_only)):
        decision = factory.accept(name)
        if decision is not None:
            return factory.name, decision
    return None, None


def test_systemd_units_and_mounts():
    name, meta = decide("/system.slice/cron.service")
    assert name == "systemd" and meta.namespace == "systemd" and meta.aliases == ["cron.service"]
    assert decide("/user.slice")[0] == "systemd"
    assert decide("/system.slice/var-lib-docker.mount") == ("systemd", IGNORE)
    # scopes of sessions are plain cgroups
    assert decide("/user.slice/session-3.scope")[0] == "raw"


@pytest.mark.parametrize(
    ("cgroup", "runtime"),
    [
        (f"/machine.slice/libpod-{ID}.scope", "podman"),
        (f"/libpod_parent/libpod-{ID}", "podman"),
        (f"/kubepods.slice/kubepods-pod1.slice/cri-containerd-{ID}.scope", "containerd"),
        (f"/kubepods.slice/kubepods-burstable.slice/crio-{ID}.scope", "crio"),
    ],
)
def test_runtime_scopes_get_runtime_and_id(cgroup, runtime):
    name, meta = decide(cgroup)
    assert name == "runtime"
    assert (meta.runtime, meta.namespace, meta.id, meta.aliases) == (runtime, runtime, ID, [ID])


def test_docker_only_keeps_root_and_whitelisted_prefixes():
    raw = RawFactory(docker_only=True, prefix_whitelist=["/kept/"])
    assert isinstance(raw.accept("/"), ContainerMeta)
    assert isinstance(raw.accept("/kept/a"), ContainerMeta)
    assert raw.accept("/other") is IGNORE
    assert decide("/system.slice/cron.service", docker_only=True)[1] is IGNORE
    assert decide(f"/machine.slice/libpod-{ID}.scope", docker_only=True)[1] is IGNORE


def test_docker_factory_without_dockerd_claims_only_docker_names(tmp_path):
    factory = DockerFactory(f"unix://{tmp_path}/nothing.sock")
    meta = factory.accept(f"/docker/{ID}")
    assert isinstance(meta, ContainerMeta) and meta.incomplete and meta.id == ID and meta.runtime == "docker"
    meta = factory.accept(f"/system.slice/docker-{ID}.scope")
    assert isinstance(meta, ContainerMeta) and meta.incomplete
    assert factory.accept(f"/kubepods/pod1/{ID}") is None  # maybe another runtime's
    assert factory.accept("/system.slice/cron.service") is None


@pytest.mark.root
def test_real_cgroups_named_like_units_and_scopes(start_app, make_cgroup):  # noqa: F811
    app = start_app()
    parent = make_cgroup()
    service = parent.create_child("demo.service")
    mount = parent.create_child("data.mount")
    scope = parent.create_child(f"libpod-{ID}.scope")
    found = wait_for(lambda: app.manager.get(service.name), 2.0, "the service")
    assert found.ref.namespace == "systemd" and found.ref.aliases == ["demo.service"]
    assert app.manager.resolve("systemd", "demo.service") is found
    podman = wait_for(lambda: app.manager.get(scope.name), 2.0, "the podman scope")
    assert podman.ref.runtime == "podman" and podman.ref.id == ID
    assert app.manager.get(mount.name) is None
    assert app.manager.get(parent.name) is not None  # a plain cgroup: raw


@pytest.mark.root
def test_out_of_inotify_watches_falls_back_to_rescan(start_app, make_cgroup, caplog):  # noqa: F811
    limit_file = Path("/proc/sys/fs/inotify/max_user_watches")
    saved = limit_file.read_text()
    try:
        parent = make_cgroup()  # exists before the watcher starts, which cannot watch it
        limit_file.write_text("1\n")
        with caplog.at_level(logging.WARNING):
            app = start_app(global_housekeeping_interval="1s")
            assert app.watcher.degraded
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "max_user_watches" in r.getMessage()]
            assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
            cg = parent.create_child("late")
            # Found by the periodic rescan, and collected.
            wait_for(lambda: app.cache.latest(cg.name), 5.0, "a record of the new cgroup")
            assert app.rescans >= 2
            cg.remove()
            wait_for(lambda: app.manager.get(cg.name) is None, 5.0, "removal by the rescan")
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "max_user_watches" in r.getMessage()]
        assert len(warnings) == 1, "the limit is reported once, not at every rescan"
    finally:
        limit_file.write_text(saved)
