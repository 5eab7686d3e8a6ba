"""Container factories: given a cgroup name, decide who handles it and with what metadata.

The manager asks the factories in order; the first that does not answer ``None`` decides:
``IGNORE`` means "handled: do not monitor", a :class:`ContainerMeta` means "monitor this".
The raw factory comes last, as in cAdvisor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final, Protocol


@dataclass
class ContainerMeta:
    runtime: str = "raw"
    namespace: str | None = None
    id: str | None = None
    aliases: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    image: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    creation_time: datetime | None = None
    writable_layer: Path | None = None
    # Metadata could not be fetched (runtime unreachable); the manager asks again later.
    incomplete: bool = False


class _Ignore:
    def __repr__(self) -> str:
        return "IGNORE"


IGNORE: Final = _Ignore()
Decision = ContainerMeta | _Ignore | None


class Factory(Protocol):
    name: str

    def accept(self, cgroup_name: str) -> Decision: ...


class RawFactory:
    """Every cgroup; with ``docker_only`` only the root and whitelisted prefixes."""

    name = "raw"

    def __init__(self, docker_only: bool = False, prefix_whitelist: list[str] | None = None) -> None:
        self.docker_only = docker_only
        self.prefixes = list(prefix_whitelist or [])

    def accept(self, cgroup_name: str) -> Decision:
        if cgroup_name == "/" or not self.docker_only:
            return ContainerMeta()
        if any(cgroup_name.startswith(p) for p in self.prefixes):
            return ContainerMeta()
        return IGNORE


class SystemdFactory:
    """systemd slices and services; mount units are never containers."""

    name = "systemd"

    def __init__(self, docker_only: bool = False) -> None:
        self.docker_only = docker_only

    def accept(self, cgroup_name: str) -> Decision:
        unit = cgroup_name.rsplit("/", 1)[-1]
        if unit.endswith(".mount"):
            return IGNORE
        if self.docker_only or not unit.endswith((".slice", ".service")):
            return None
        return ContainerMeta(runtime="systemd", namespace="systemd", aliases=[unit])


# Podman (libpod-<id>.scope, or libpod-<id> under the cgroupfs driver), containerd's CRI plugin
# and CRI-O under the systemd driver.
_RUNTIME_SCOPES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?:^|/)libpod-(?:conmon-)?([0-9a-f]{64})(?:\.scope)?$"), "podman"),
    (re.compile(r"(?:^|/)cri-containerd-([0-9a-f]{64})\.scope$"), "containerd"),
    (re.compile(r"(?:^|/)crio-(?:conmon-)?([0-9a-f]{64})\.scope$"), "crio"),
]


class RuntimeScopeFactory:
    """Containers of runtimes we do not query: their runtime and id come from the cgroup name."""

    name = "runtime"

    def __init__(self, docker_only: bool = False) -> None:
        self.docker_only = docker_only

    def accept(self, cgroup_name: str) -> Decision:
        if self.docker_only:
            return None
        for pattern, runtime in _RUNTIME_SCOPES:
            match = pattern.search(cgroup_name)
            if match:
                cid = match.group(1)
                return ContainerMeta(runtime=runtime, namespace=runtime, id=cid, aliases=[cid])
        return None
