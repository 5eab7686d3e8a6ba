"""Shared fixtures: a real Docker engine, a busybox image, scratch cgroups.

Fixtures that need something this machine lacks fail (never skip) with what to do about it: the
suite is meant to run in full on CI, where `make setup` has installed everything.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import docker.errors
import pytest
from docker.models.containers import Container

from tests.infra import cgroups as cg_infra
from tests.infra import docker as docker_infra

log = logging.getLogger(__name__)

# Session fixtures of the stores the sinks are tested against.
pytest_plugins = ["tests.infra.influx", "tests.infra.kafka", "tests.infra.opensearch"]


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.fail(f"{what} needs root: run the tests as root (CI does)", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _sweep_leftover_cgroups() -> Iterator[None]:
    """Safety net: remove this session's and dead sessions' /cetest-* cgroups, before and after."""
    can_sweep = os.geteuid() == 0 and cg_infra.CGROUP_ROOT.is_dir()
    if can_sweep:
        cg_infra.sweep_leftover_cgroups()
    yield
    if can_sweep:
        removed = cg_infra.sweep_leftover_cgroups()
        if removed:
            log.warning("removed leftover test cgroups: %s", [str(p) for p in removed])


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    """Keep full garbage collections as short as they are in the exporter process.

    ``container-exporter run`` freezes its start-up heap (``gc.freeze``), so a full collection
    walks little. This process holds the whole suite's heap instead: late in the suite a full
    collection stops every thread for a few hundred ms, which a test of collection cadence
    would see as a missed tick. Freeze what exists when the test starts, as ``run`` does.
    """
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[docker_infra.DockerEngine]:
    """A Docker engine that answers: the running one, or a private dockerd stopped at session end.

    The socket is /var/run/docker.sock unless DOCKER_HOST names another ``unix://`` one.
    """
    _require_root("docker_engine")
    try:
        engine = docker_infra.DockerEngine.acquire(docker_infra.socket_from_env())
    except docker_infra.DockerUnavailable as exc:
        raise pytest.fail.Exception(str(exc), pytrace=False) from None
    try:
        docker_infra.sweep_test_containers(engine.client)  # leftovers of dead sessions
        yield engine
    finally:
        try:
            removed = docker_infra.sweep_test_containers(engine.client)
            if removed:
                log.warning("removed leftover test containers: %s", removed)
        finally:
            engine.release()


@pytest.fixture(scope="session")
def busybox_image(docker_engine: docker_infra.DockerEngine) -> str:
    """Tag of a tiny image holding a static busybox and its applets (sh, yes, sleep, httpd, dd, ...)."""
    try:
        return docker_infra.ensure_busybox_image(docker_engine.client)
    except docker_infra.DockerUnavailable as exc:
        raise pytest.fail.Exception(str(exc), pytrace=False) from None


@pytest.fixture
def make_container(docker_engine: docker_infra.DockerEngine) -> Iterator[Callable[..., Container]]:
    """Factory: ``make_container(image, command=None, **run_kwargs)``, labelled, force-removed after the test."""
    started: list[Container] = []

    def factory(image: str, command: str | list[str] | None = None, **kwargs: Any) -> Container:
        container = docker_infra.run_container(docker_engine.client, image, command, **kwargs)
        started.append(container)
        return container

    yield factory
    for container in started:
        try:
            container.remove(force=True)
        except docker.errors.APIError as exc:  # the session sweep retries; the test's own result stands
            log.warning("could not remove container %s: %s", container.name, exc)


@pytest.fixture
def make_cgroup() -> Iterator[Callable[..., cg_infra.ScratchCgroup]]:
    """Factory: ``make_cgroup(name=None)`` → a ScratchCgroup in every hierarchy; all removed after the test."""
    _require_root("make_cgroup")
    created: list[cg_infra.ScratchCgroup] = []

    def factory(name: str | None = None) -> cg_infra.ScratchCgroup:
        cgroup = cg_infra.create_cgroup(name)
        created.append(cgroup)
        return cgroup

    yield factory
    errors = []
    for cgroup in reversed(created):
        try:
            cgroup.remove()
        except Exception as exc:  # noqa: BLE001 - collected and re-raised below, after removing the rest
            errors.append(f"{cgroup.name}: {exc!r}")
    if errors:
        pytest.fail("could not remove test cgroups: " + "; ".join(errors), pytrace=False)
