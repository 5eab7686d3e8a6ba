"""The records: container references, specs, stats, machine info.

Every field that a kernel file may not provide is optional: ``None`` means "unset" (file missing,
``max``, or unreadable), never zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

SCHEMA_VERSION = 1


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Envelope(Record):
    """A record that travels on its own (to the cache, to sinks): its JSON is encoded once."""

    _json: bytes | None = PrivateAttr(default=None)

    def json_bytes(self) -> bytes:
        # Straight to the private dict: attribute access to a private attribute goes through
        # pydantic's __getattr__, which costs as much as a small serialization.
        private = self.__pydantic_private__
        data = private["_json"]  # type: ignore[index]
        if data is None:
            data = private["_json"] = self.__pydantic_serializer__.to_json(self)  # type: ignore[index]
        return data

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        copy = super().model_copy(update=update, deep=deep)
        copy.__pydantic_private__["_json"] = None  # type: ignore[index]
        return copy

    def __eq__(self, other: object) -> bool:
        # The cached JSON is not part of the value.
        if not isinstance(other, BaseModel):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]


class ContainerReference(Record):
    """Who a record is about."""

    name: str = Field(description="cgroup path of the container, e.g. /docker/<id>")
    id: str | None = Field(default=None, description="runtime container id")
    aliases: list[str] = Field(default_factory=list)
    namespace: str | None = Field(default=None, description="docker, systemd, podman, containerd, crio")
    runtime: str = "raw"
    labels: dict[str, str] = Field(default_factory=dict)
    image: str | None = None


class CpuSpec(Record):
    shares: int | None = None
    weight: int | None = None
    quota_us: int | None = None
    period_us: int | None = None
    limit_cores: float | None = None
    cpuset_cpus: str | None = None
    cpuset_mems: str | None = None


class MemorySpec(Record):
    limit_bytes: int | None = None
    reservation_bytes: int | None = None
    swap_limit_bytes: int | None = None


class ContainerSpec(Record):
    creation_time: datetime | None = None
    cpu: CpuSpec = Field(default_factory=CpuSpec)
    memory: MemorySpec = Field(default_factory=MemorySpec)
    pids_limit: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    image: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    has_network: bool = False
    has_filesystem: bool = False
    custom_metrics: list[CustomMetricSpec] = Field(default_factory=list)


class CpuStats(Record):
    total_ns: int | None = None
    user_ns: int | None = None
    system_ns: int | None = None
    per_cpu_ns: list[int] | None = None
    periods: int | None = None
    throttled_periods: int | None = None
    throttled_time_ns: int | None = None
    load_average_milli: int | None = Field(
        default=None, description="smoothed runnable+uninterruptible task count x1000"
    )


class MemoryEvents(Record):
    low: int | None = None
    high: int | None = None
    max: int | None = None
    oom: int | None = None
    oom_kill: int | None = None


class MemoryStats(Record):
    usage_bytes: int | None = None
    max_usage_bytes: int | None = None
    working_set_bytes: int | None = None
    rss_bytes: int | None = None
    cache_bytes: int | None = None
    swap_bytes: int | None = None
    mapped_file_bytes: int | None = None
    failcnt: int | None = None
    pgfault: int | None = None
    pgmajfault: int | None = None
    events: MemoryEvents | None = None


class DiskIoDevice(Record):
    major: int
    minor: int
    device: str | None = None
    read_bytes: int = 0
    write_bytes: int = 0
    read_ops: int = 0
    write_ops: int = 0


class ProcessStats(Record):
    processes: int | None = Field(default=None, description="processes (thread group leaders) in the cgroup itself")
    pids_current: int | None = Field(default=None, description="pids.current: tasks (threads) in the cgroup and below")
    pids_limit: int | None = None
    threads: int | None = None
    open_fds: int | None = None


class NetworkInterface(Record):
    name: str
    rx_bytes: int
    rx_packets: int
    rx_errors: int
    rx_dropped: int
    tx_bytes: int
    tx_packets: int
    tx_errors: int
    tx_dropped: int


class PressureLine(Record):
    avg10: float
    avg60: float
    avg300: float
    total_us: int


class Pressure(Record):
    some: PressureLine | None = None
    full: PressureLine | None = None


class PressureStats(Record):
    cpu: Pressure | None = None
    memory: Pressure | None = None
    io: Pressure | None = None


class FilesystemStats(Record):
    device: str
    mountpoint: str | None = None
    type: str | None = None
    capacity_bytes: int | None = None
    usage_bytes: int
    available_bytes: int | None = None
    inodes: int | None = None
    inodes_free: int | None = None
    inodes_used: int | None = None
    measured_at: datetime | None = None


class CustomMetricSpec(Record):
    """A metric an application exposes, declared by its collector configuration."""

    name: str
    type: Literal["gauge", "counter"] = "gauge"
    format: Literal["int", "float"] = "float"
    units: str | None = None


class CustomMetricValue(Record):
    labels: dict[str, str] = Field(default_factory=dict)
    value: float
    timestamp: datetime | None = None


class ContainerStats(Envelope):
    """One housekeeping sample of one container."""

    schema_version: int = SCHEMA_VERSION
    timestamp: datetime
    machine_id: str
    hostname: str
    record_id: str = Field(description="hex id derived from machine id, container and timestamp; the same record always has the same id")
    run_id: str = Field(description="random id of this exporter run; seq restarts with it")
    seq: int = Field(description="per-container sample number within run_id, from 1, without gaps")
    container: ContainerReference
    cpu: CpuStats | None = None
    memory: MemoryStats | None = None
    diskio: list[DiskIoDevice] | None = None
    processes: ProcessStats | None = None
    network: list[NetworkInterface] | None = None
    pressure: PressureStats | None = None
    filesystem: list[FilesystemStats] | None = None
    custom_metrics: dict[str, list[CustomMetricValue]] | None = Field(
        default=None, description="application metrics scraped by the container's collectors, by metric name"
    )


class FilesystemInfo(Record):
    device: str
    mountpoint: str
    type: str
    capacity_bytes: int
    inodes: int | None = None


class NetworkDevice(Record):
    name: str
    mac_address: str | None = None
    speed_mbps: int | None = None
    mtu: int | None = None


class MachineInfo(Record):
    timestamp: datetime
    num_cores: int
    num_physical_cores: int | None = None
    num_sockets: int | None = None
    cpu_frequency_khz: int | None = None
    memory_capacity_bytes: int
    swap_capacity_bytes: int | None = None
    machine_id: str
    system_uuid: str | None = None
    boot_id: str | None = None
    hostname: str
    filesystems: list[FilesystemInfo] = Field(default_factory=list)
    network_devices: list[NetworkDevice] = Field(default_factory=list)
    cgroup_mode: str | None = None


class VersionInfo(Record):
    exporter_version: str
    kernel_version: str
    os_version: str
    docker_version: str | None = None
    docker_api_version: str | None = None
    python_version: str


EVENT_TYPES = ("containerCreation", "containerDeletion", "oom", "oomKill")
EventType = Literal["containerCreation", "containerDeletion", "oom", "oomKill"]


class EventData(Record):
    """cAdvisor's event data: OOM details, or a deletion's exit code."""

    pid: int | None = Field(default=None, description="oom, oomKill: the process the kernel killed")
    process_name: str | None = None
    constraint: str | None = Field(default=None, description="oomKill on Linux >= 5.0: CONSTRAINT_MEMCG, CONSTRAINT_NONE, ...")
    exit_code: int | None = Field(default=None, description="containerDeletion: Docker's exit code, -1 when unknown")


class Event(Envelope):
    """Something that happened to a container."""

    schema_version: int = SCHEMA_VERSION
    record_id: str = Field(description="hex id derived from machine id, container, event type and timestamp")
    machine_id: str
    hostname: str
    container_name: str = Field(description="cgroup path of the container")
    container: ContainerReference | None = None
    timestamp: datetime = Field(description="when it happened (creation: the container's creation time)")
    event_type: EventType
    event_data: EventData = Field(default_factory=EventData)
