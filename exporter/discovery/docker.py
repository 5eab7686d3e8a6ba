"""Docker containers: cgroups named by a container id, described by the Docker Engine API."""

from __future__ import annotations

import logging
import re
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from exporter.discovery.factories import ContainerMeta, Decision
from exporter.durations import parse_rfc3339

log = logging.getLogger(__name__)

# cgroupfs driver: /docker/<id> (or any --cgroup-parent); systemd driver: docker-<id>.scope.
_DOCKER_CGROUP = re.compile(r"/(?:docker-)?([0-9a-f]{64})(?:\.scope)?$")


def parse_docker_time(text: str | None) -> datetime | None:
    """Docker's RFC 3339 times carry nanoseconds; Python takes at most microseconds."""
    if not text or text.startswith("0001-01-01"):
        return None
    try:
        return parse_rfc3339(text)
    except ValueError:
        return None


def meta_from_inspect(info: dict[str, Any], env_whitelist: list[str], rootfs: Path) -> ContainerMeta:
    config = info.get("Config") or {}
    cid = info["Id"]
    name = (info.get("Name") or "").lstrip("/")
    env: dict[str, str] = {}
    if env_whitelist:
        for item in config.get("Env") or []:
            key, _, value = item.partition("=")
            if any(key.startswith(prefix) for prefix in env_whitelist):
                env[key] = value
    layer = None
    driver = info.get("GraphDriver") or {}
    upper = (driver.get("Data") or {}).get("UpperDir")
    if upper:
        layer = rootfs / upper.lstrip("/")
    return ContainerMeta(
        runtime="docker",
        namespace="docker",
        id=cid,
        aliases=[a for a in (name, cid) if a],
        labels=dict(config.get("Labels") or {}),
        image=config.get("Image"),
        env=env,
        creation_time=parse_docker_time(info.get("Created")),
        writable_layer=layer,
    )


class DockerFactory:
    """Asks dockerd about cgroups that look like Docker containers.

    When dockerd cannot be reached the container is still taken, with its id only and marked
    incomplete, so the manager can fill the metadata in later.
    """

    name = "docker"
    RECONNECT_S = 30.0

    def __init__(self, endpoint: str, env_whitelist: list[str] | None = None, rootfs: Path = Path("/"), timeout_s: float = 5.0) -> None:
        self.endpoint = endpoint
        self.env_whitelist = list(env_whitelist or [])
        self.rootfs = rootfs
        self.timeout_s = timeout_s
        self._client: Any = None
        self._last_attempt = -1e9
        self._lock = threading.Lock()
        self._unreachable_logged = False
        self.version: dict[str, Any] | None = None

    def client(self) -> Any:
        """The API client, (re)connecting at most every RECONNECT_S; None when unreachable."""
        with self._lock:
            if self._client is not None:
                return self._client
            now = time.monotonic()
            if now - self._last_attempt < self.RECONNECT_S:
                return None
            self._last_attempt = now
            import docker
            from docker.errors import DockerException

            try:
                client = docker.APIClient(base_url=self.endpoint, version="auto", timeout=self.timeout_s)
                self.version = client.version()
            except (DockerException, OSError) as exc:
                if not self._unreachable_logged:
                    self._unreachable_logged = True
                    log.warning("Docker at %s is not reachable (%s); Docker containers get their id only", self.endpoint, exc)
                return None
            log.info("connected to Docker %s (API %s) at %s", self.version.get("Version"), self.version.get("ApiVersion"), self.endpoint)
            self._unreachable_logged = False
            self._client = client
            return client

    def _drop_client(self) -> None:
        with self._lock:
            self._client = None

    def inspect(self, cid: str) -> dict[str, Any] | None:
        """Inspect data; None when Docker does not know the id. Raises ConnectionError when
        Docker cannot be asked."""
        from docker.errors import DockerException, NotFound
        from requests.exceptions import RequestException

        client = self.client()
        if client is None:
            raise ConnectionError(f"Docker at {self.endpoint} is not reachable")
        try:
            return client.inspect_container(cid)
        except NotFound:
            return None
        except (DockerException, RequestException, OSError) as exc:
            self._drop_client()
            raise ConnectionError(str(exc)) from exc

    def accept(self, cgroup_name: str) -> Decision:
        match = _DOCKER_CGROUP.search(cgroup_name)
        if not match:
            return None
        cid = match.group(1)
        try:
            info = self.inspect(cid)
        except ConnectionError:
            # Only names Docker itself makes are claimed without asking; a bare id under some
            # other parent may belong to another runtime.
            if cgroup_name.startswith("/docker/") or f"docker-{cid}" in cgroup_name:
                return ContainerMeta(runtime="docker", namespace="docker", id=cid, aliases=[cid], incomplete=True)
            return None
        if info is None:
            return None
        return meta_from_inspect(info, self.env_whitelist, self.rootfs)
