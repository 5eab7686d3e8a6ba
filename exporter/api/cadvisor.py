"""cAdvisor's REST API: its JSON shapes, our records translated into them, and the routes.

The shapes are cAdvisor's ``info/v1`` and ``info/v2`` structs with their JSON field names, so
existing clients (the Go client, scripts written against cAdvisor) work unchanged. Go's encoding
rules are kept: a field tagged ``omitempty`` is left out when empty (here: ``None`` fields are
excluded), every other field is always present, with 0 where we collect nothing, exactly as
cAdvisor reports a metric it does not collect. Timestamps are RFC 3339 in UTC with the
fraction trimmed of trailing zeros, as Go's ``time.Time`` marshals them; an unknown time is
Go's zero time, ``0001-01-01T00:00:00Z``.

Handlers read the registry and the cache only. Container names from URLs are cleaned like Go's
``path.Clean`` (``..`` cannot climb above ``/``) and only ever looked up in the registry: no
user-supplied path reaches the filesystem. The one exception to "never read the kernel" is
``/api/v2.0/ps``, which lists the processes of one container from its cgroup's ``cgroup.procs``
and reads ``<proc_root>/<pid>/{stat,status,cgroup,fd}`` for at most :data:`MAX_PROCESSES`
processes.

Differences from cAdvisor, all deliberate:

* errors are JSON ``{"detail": ...}`` with 404 (unknown container) or 400 (bad parameter)
  instead of cAdvisor's plain-text 500;
* ``diskio`` stats maps have ``Read``, ``Write`` and ``Total`` (what cgroup v2 gives cAdvisor
  too); ``Sync``/``Async`` are not collected;
* ``processes.process_count`` is 0: records count tasks (``threads_current``), not processes;
* ``cpu.max_limit`` carries the CFS quota in milli-CPUs (cAdvisor leaves it 0);
* ``/api/v2.0/storage`` tracks no filesystem labels: any ``label`` is unknown (404).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    create_model,
)

from exporter.models import ContainerStats, FilesystemStats, MachineInfo, VersionInfo
from exporter.summary import InstantUsage, Usage

if TYPE_CHECKING:
    from exporter.api.context import ApiContext
    from exporter.manager import Container

log = logging.getLogger(__name__)

UINT64_MAX = 2**64 - 1
ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)
DOCKER_NAMESPACE = "docker"
MAX_PROCESSES = 4096  # /api/v2.0/ps reads at most this many processes


# --------------------------------------------------------------------------------------------
# Go's encoding of time.Time
# --------------------------------------------------------------------------------------------
def go_time(value: datetime) -> str:
    """RFC 3339 as Go marshals a time.Time: UTC "Z", fraction without trailing zeros."""
    dt = value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
    # strftime("%Y") does not zero-pad year 1 (Go's zero time) on glibc.
    text = f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
    if dt.microsecond:
        text += f".{dt.microsecond:06d}".rstrip("0")
    return text + "Z"


GoTime = Annotated[
    datetime,
    PlainSerializer(go_time, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}, mode="serialization"),
]


class Shape(BaseModel):
    """A cAdvisor JSON object; ``None`` fields are Go's ``omitempty`` fields left out."""

    model_config = ConfigDict(populate_by_name=True)


def dump_json(value: Any, adapter: TypeAdapter[Any]) -> bytes:
    """Go's encoding: cAdvisor's field names, omitempty fields (``None``) left out."""
    return adapter.dump_json(value, by_alias=True, exclude_none=True)


# --------------------------------------------------------------------------------------------
# info/v1
# --------------------------------------------------------------------------------------------
class CpuSpec(Shape):
    limit: int = Field(0, description="cpu shares (cgroup v2: weight converted to shares)")
    max_limit: int = Field(0, description="CFS quota in milli-CPUs; 0 when unlimited")
    mask: str | None = Field(None, description="cpuset cpus")
    quota: int | None = Field(None, description="cfs_quota_us")
    period: int | None = Field(None, description="cfs_period_us")


class MemorySpec(Shape):
    limit: int | None = None
    reservation: int | None = None
    swap_limit: int | None = None


class ProcessSpec(Shape):
    limit: int | None = None


class MetricSpec(Shape):
    name: str
    type: str
    format: str
    units: str


class ContainerSpecV1(Shape):
    creation_time: GoTime
    labels: dict[str, str] | None = None
    envs: dict[str, str] | None = None
    has_cpu: bool
    cpu: CpuSpec
    has_memory: bool
    memory: MemorySpec
    has_hugetlb: bool = False
    has_network: bool
    has_processes: bool
    processes: ProcessSpec
    has_filesystem: bool
    has_diskio: bool
    has_custom_metrics: bool
    custom_metrics: list[MetricSpec] | None = None
    image: str | None = None


class ContainerReferenceV1(Shape):
    id: str | None = None
    name: str
    aliases: list[str] | None = None
    namespace: str | None = None


class CpuUsage(Shape):
    total: int = 0
    per_cpu_usage: list[int] | None = None
    user: int = 0
    system: int = 0


class CpuCFS(Shape):
    periods: int = 0
    throttled_periods: int = 0
    throttled_time: int = 0


class CpuSchedstat(Shape):
    run_time: int = 0
    runqueue_time: int = 0
    run_periods: int = 0


class CpuStatsV1(Shape):
    usage: CpuUsage = Field(default_factory=CpuUsage)
    cfs: CpuCFS = Field(default_factory=CpuCFS)
    schedstat: CpuSchedstat = Field(default_factory=CpuSchedstat)
    load_average: int = 0


class PerDiskStats(Shape):
    device: str
    major: int
    minor: int
    stats: dict[str, int]


class DiskIoStats(Shape):
    io_service_bytes: list[PerDiskStats] | None = None
    io_serviced: list[PerDiskStats] | None = None


class MemoryNumaStats(Shape):
    file: dict[str, int] | None = None
    anon: dict[str, int] | None = None
    unevictable: dict[str, int] | None = None


class MemoryData(Shape):
    pgfault: int = 0
    pgmajfault: int = 0
    numa_stats: MemoryNumaStats = Field(default_factory=MemoryNumaStats)


class MemoryStatsV1(Shape):
    usage: int = 0
    max_usage: int = 0
    cache: int = 0
    rss: int = 0
    swap: int = 0
    mapped_file: int = 0
    working_set: int = 0
    failcnt: int = 0
    container_data: MemoryData = Field(default_factory=MemoryData)
    hierarchical_data: MemoryData = Field(default_factory=MemoryData)


class InterfaceStats(Shape):
    name: str = ""
    rx_bytes: int = 0
    rx_packets: int = 0
    rx_errors: int = 0
    rx_dropped: int = 0
    tx_bytes: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_dropped: int = 0


class TcpStat(Shape):
    Established: int = 0
    SynSent: int = 0
    SynRecv: int = 0
    FinWait1: int = 0
    FinWait2: int = 0
    TimeWait: int = 0
    Close: int = 0
    CloseWait: int = 0
    LastAck: int = 0
    Listen: int = 0
    Closing: int = 0


class UdpStat(Shape):
    Listen: int = 0
    Dropped: int = 0
    RxQueued: int = 0
    TxQueued: int = 0


# cAdvisor's TcpAdvancedStat (/proc/net/netstat and snmp counters): not collected, all 0 as in
# cAdvisor with the "advtcp" metric disabled (its default).
_TCP_ADVANCED_FIELDS = (
    "RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs "
    "OutSegs RetransSegs InErrs OutRsts InCsumErrors EmbryonicRsts SyncookiesSent SyncookiesRecv "
    "SyncookiesFailed PruneCalled RcvPruned OfoPruned OutOfWindowIcmps LockDroppedIcmps TW TWRecycled TWKilled "
    "TCPTimeWaitOverflow TCPTimeouts TCPSpuriousRTOs TCPLossProbes TCPLossProbeRecovery TCPRenoRecoveryFail "
    "TCPSackRecoveryFail TCPRenoFailures TCPSackFailures TCPLossFailures DelayedACKs DelayedACKLocked "
    "DelayedACKLost ListenOverflows ListenDrops TCPHPHits TCPPureAcks TCPHPAcks TCPRenoRecovery "
    "TCPSackRecovery TCPSACKReneging TCPFACKReorder TCPSACKReorder TCPRenoReorder TCPTSReorder TCPFullUndo "
    "TCPPartialUndo TCPDSACKUndo TCPLossUndo TCPFastRetrans TCPSlowStartRetrans TCPLostRetransmit "
    "TCPRetransFail TCPRcvCollapsed TCPDSACKOldSent TCPDSACKOfoSent TCPDSACKRecv TCPDSACKOfoRecv "
    "TCPAbortOnData TCPAbortOnClose TCPAbortOnMemory TCPAbortOnTimeout TCPAbortOnLinger TCPAbortFailed "
    "TCPMemoryPressures TCPMemoryPressuresChrono TCPSACKDiscard TCPDSACKIgnoredOld TCPDSACKIgnoredNoUndo "
    "TCPMD5NotFound TCPMD5Unexpected TCPMD5Failure TCPSackShifted TCPSackMerged TCPSackShiftFallback "
    "TCPBacklogDrop PFMemallocDrop TCPMinTTLDrop TCPDeferAcceptDrop IPReversePathFilter TCPReqQFullDoCookies "
    "TCPReqQFullDrop TCPFastOpenActive TCPFastOpenActiveFail TCPFastOpenPassive TCPFastOpenPassiveFail "
    "TCPFastOpenListenOverflow TCPFastOpenCookieReqd TCPSynRetrans TCPOrigDataSent PAWSActive PAWSEstab"
).split()
TcpAdvancedStat: type[Shape] = create_model(  # type: ignore[call-overload]
    "TcpAdvancedStat", __base__=Shape, **{name: (int, 0) for name in _TCP_ADVANCED_FIELDS}
)


class NetworkStatsV1(InterfaceStats):
    """The first interface's counters inline (Go's embedded struct), then every interface."""

    interfaces: list[InterfaceStats] | None = None
    tcp: TcpStat = Field(default_factory=TcpStat)
    tcp6: TcpStat = Field(default_factory=TcpStat)
    udp: UdpStat = Field(default_factory=UdpStat)
    udp6: UdpStat = Field(default_factory=UdpStat)
    tcp_advanced: TcpAdvancedStat = Field(default_factory=TcpAdvancedStat)  # type: ignore[valid-type]


class FsStatsV1(Shape):
    device: str | None = None
    type: str = ""
    capacity: int = 0
    usage: int = 0
    base_usage: int = 0
    available: int = 0
    has_inodes: bool = False
    inodes: int = 0
    inodes_free: int = 0
    reads_completed: int = 0
    reads_merged: int = 0
    sectors_read: int = 0
    read_time: int = 0
    writes_completed: int = 0
    writes_merged: int = 0
    sectors_written: int = 0
    write_time: int = 0
    io_in_progress: int = 0
    io_time: int = 0
    weighted_io_time: int = 0


class LoadStats(Shape):
    nr_sleeping: int = 0
    nr_running: int = 0
    nr_stopped: int = 0
    nr_uninterruptible: int = 0
    nr_io_wait: int = 0


class ProcessStatsV1(Shape):
    process_count: int = 0
    fd_count: int = 0
    socket_count: int = 0
    threads_current: int | None = None
    threads_max: int | None = None


class MetricVal(Shape):
    label: str | None = None
    labels: dict[str, str] | None = None
    timestamp: GoTime
    int_value: int | None = None
    float_value: float | None = None


class ResctrlStats(Shape):
    memory_bandwidth: list[dict[str, int]] | None = None
    cache: list[dict[str, int]] | None = None


class CPUSetStats(Shape):
    memory_migrate: int = 0


class ContainerStatsV1(Shape):
    timestamp: GoTime
    cpu: CpuStatsV1 = Field(default_factory=CpuStatsV1)
    diskio: DiskIoStats = Field(default_factory=DiskIoStats)
    memory: MemoryStatsV1 = Field(default_factory=MemoryStatsV1)
    network: NetworkStatsV1 = Field(default_factory=NetworkStatsV1)
    filesystem: list[FsStatsV1] | None = None
    task_stats: LoadStats = Field(default_factory=LoadStats)
    processes: ProcessStatsV1 = Field(default_factory=ProcessStatsV1)
    custom_metrics: dict[str, list[MetricVal]] | None = None
    resctrl: ResctrlStats = Field(default_factory=ResctrlStats)
    cpuset: CPUSetStats = Field(default_factory=CPUSetStats)
    oom_events: int | None = None


class ContainerInfoV1(ContainerReferenceV1):
    subcontainers: list[ContainerReferenceV1] | None = None
    spec: ContainerSpecV1
    stats: list[ContainerStatsV1] | None = None


def _rfc3339_text(value: Any) -> Any:
    # Go's time.Time takes only a JSON string; pydantic would also take a number.
    if value is not None and not isinstance(value, str | datetime):
        raise ValueError("expected an RFC 3339 time string")
    return value


def _json_integer(value: Any) -> Any:
    # A JSON integer: 5 or 5.0 (JSON Schema's reading), never true or "5".
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected an integer")
    return value


GoTimeInput = Annotated[datetime | None, BeforeValidator(_rfc3339_text)]
JsonInt = Annotated[int, BeforeValidator(_json_integer)]


class ContainerInfoRequest(BaseModel):
    """Body of the v1 container requests (cAdvisor's ContainerInfoRequest). Unknown keys are
    ignored and types are not coerced, as Go's decoder does."""

    model_config = ConfigDict(extra="ignore")

    num_stats: JsonInt = Field(60, ge=-1, description="most stats to return, newest last; -1: all the cache holds")
    start: GoTimeInput = Field(None, description="oldest stat time (RFC 3339); unset or Go's zero time: no bound")
    end: GoTimeInput = Field(None, description="newest stat time (RFC 3339); unset or Go's zero time: now")


class FsInfo(Shape):
    device: str
    capacity: int
    type: str
    inodes: int
    has_inodes: bool


class NetInfo(Shape):
    name: str
    mac_address: str
    speed: int
    mtu: int


class NVMInfo(Shape):
    memory_mode_capacity: int = 0
    app_direct_mode_capacity: int = Field(0, alias="app direct_mode_capacity")
    avg_power_budget: int = 0


class MachineInfoV1(Shape):
    timestamp: GoTime
    vendor_id: str = ""
    num_cores: int
    num_physical_cores: int
    num_sockets: int
    cpu_frequency_khz: int
    memory_capacity: int
    swap_capacity: int
    memory_by_type: dict[str, dict[str, int]] = Field(default_factory=dict)
    nvm: NVMInfo = Field(default_factory=NVMInfo)
    hugepages: list[dict[str, int]] = Field(default_factory=list)
    machine_id: str
    system_uuid: str
    boot_id: str
    filesystems: list[FsInfo]
    disk_map: dict[str, dict[str, Any]] = Field(default_factory=dict)
    network_devices: list[NetInfo]
    topology: list[dict[str, Any]] = Field(default_factory=list)
    cloud_provider: str = "Unknown"
    instance_type: str = "Unknown"
    instance_id: str = "None"


# --------------------------------------------------------------------------------------------
# info/v2
# --------------------------------------------------------------------------------------------
class ContainerSpecV2(Shape):
    creation_time: GoTime
    aliases: list[str] | None = None
    namespace: str | None = None
    labels: dict[str, str] | None = None
    envs: dict[str, str] | None = None
    has_cpu: bool
    cpu: CpuSpec
    has_memory: bool
    memory: MemorySpec
    has_hugetlb: bool = False
    has_custom_metrics: bool
    custom_metrics: list[MetricSpec] | None = None
    has_processes: bool
    processes: ProcessSpec
    has_network: bool
    has_filesystem: bool
    has_diskio: bool
    image: str | None = None


class CpuInstUsage(Shape):
    total: int
    per_cpu_usage: list[int] | None = None
    user: int
    system: int


class CpuInstStats(Shape):
    """Rates in nanocores (ns of CPU per s) between a sample and the one before it."""

    usage: CpuInstUsage


class NetworkStatsV2(Shape):
    interfaces: list[InterfaceStats] | None = None
    tcp: TcpStat = Field(default_factory=TcpStat)
    tcp6: TcpStat = Field(default_factory=TcpStat)
    udp: UdpStat = Field(default_factory=UdpStat)
    udp6: UdpStat = Field(default_factory=UdpStat)
    tcp_advanced: TcpAdvancedStat = Field(default_factory=TcpAdvancedStat)  # type: ignore[valid-type]


class DeprecatedContainerStats(Shape):
    """/api/v2.0/stats: every section present, ``has_*`` saying which hold data."""

    timestamp: GoTime
    has_cpu: bool
    cpu: CpuStatsV1
    cpu_inst: CpuInstStats | None = None
    has_diskio: bool
    diskio: DiskIoStats
    has_memory: bool
    memory: MemoryStatsV1
    has_hugetlb: bool = False
    has_network: bool
    network: NetworkStatsV2
    has_processes: bool
    processes: ProcessStatsV1
    has_filesystem: bool
    filesystem: list[FsStatsV1] | None = None
    has_load: bool = False
    load_stats: LoadStats = Field(default_factory=LoadStats)
    has_custom_metrics: bool
    custom_metrics: dict[str, list[MetricVal]] | None = None
    resctrl: ResctrlStats = Field(default_factory=ResctrlStats)


class FilesystemStatsV2(Shape):
    totalUsageBytes: int | None = None
    baseUsageBytes: int | None = None
    containter_inode_usage: int | None = None  # sic: cAdvisor's spelling


class ContainerStatsV2(Shape):
    """/api/v2.1/stats: a section is present only when it holds data."""

    timestamp: GoTime
    cpu: CpuStatsV1 | None = None
    cpu_inst: CpuInstStats | None = None
    diskio: DiskIoStats | None = None
    memory: MemoryStatsV1 | None = None
    network: NetworkStatsV2 | None = None
    processes: ProcessStatsV1 | None = None
    filesystem: FilesystemStatsV2 | None = None
    load_stats: LoadStats | None = None
    custom_metrics: dict[str, list[MetricVal]] | None = None
    resctrl: ResctrlStats = Field(default_factory=ResctrlStats)


class ContainerInfoV2(Shape):
    spec: ContainerSpecV2
    stats: list[ContainerStatsV2] | None = None


class MachineFsStats(Shape):
    device: str
    type: str
    capacity: int | None = None
    usage: int | None = None
    available: int | None = None
    inodes_free: int | None = None


class MachineStats(Shape):
    timestamp: GoTime
    cpu: CpuStatsV1 | None = None
    cpu_inst: CpuInstStats | None = None
    memory: MemoryStatsV1 | None = None
    network: NetworkStatsV2 | None = None
    filesystem: list[MachineFsStats] | None = None
    load_stats: LoadStats | None = None


class Attributes(Shape):
    kernel_version: str
    container_os_version: str
    docker_version: str
    docker_api_version: str
    cadvisor_version: str
    num_cores: int
    cpu_frequency_khz: int
    memory_capacity: int
    machine_id: str
    system_uuid: str
    hugepages: list[dict[str, int]] = Field(default_factory=list)
    filesystems: list[FsInfo]
    disk_map: dict[str, dict[str, Any]] = Field(default_factory=dict)
    network_devices: list[NetInfo]
    topology: list[dict[str, Any]] = Field(default_factory=list)
    cloud_provider: str = "Unknown"
    instance_type: str = "Unknown"


class DerivedStats(Shape):
    """cAdvisor's v2 DerivedStats: exporter/summary.py's windows, with Go's time format."""

    timestamp: GoTime
    latest_usage: InstantUsage = Field(default_factory=InstantUsage)
    minute_usage: Usage = Field(default_factory=Usage)
    hour_usage: Usage = Field(default_factory=Usage)
    day_usage: Usage = Field(default_factory=Usage)


class FsInfoV2(Shape):
    timestamp: GoTime
    device: str
    mountpoint: str
    capacity: int
    available: int
    usage: int
    labels: list[str]
    inodes: int | None = None
    inodes_free: int | None = None


class ProcessInfo(Shape):
    user: str
    pid: int
    parent_pid: int
    start_time: str = Field(description="ps STIME: HH:MM today, MonDD this year, else the year")
    percent_cpu: float
    percent_mem: float
    rss: int
    virtual_size: int
    status: str = Field(description="ps STAT")
    running_time: str = Field(description="ps TIME: cumulative CPU time [DD-]HH:MM:SS")
    cgroup_path: str = Field(description="only filled for the root container, as cAdvisor does")
    cmd: str
    fd_count: int
    psr: int


class ErrorBody(BaseModel):
    detail: Any


# --------------------------------------------------------------------------------------------
# Translation: our records → cAdvisor's shapes
# --------------------------------------------------------------------------------------------
def _n(value: int | None) -> int:
    return 0 if value is None else value


def _omit_zero(value: int | None) -> int | None:
    return value or None


def reference_v1(container: Container) -> ContainerReferenceV1:
    ref = container.ref
    return ContainerReferenceV1(id=ref.id or None, name=ref.name, aliases=ref.aliases or None, namespace=ref.namespace or None)


def _metric_specs(container: Container) -> list[MetricSpec] | None:
    specs = container.spec.custom_metrics
    if not specs:
        return None
    return [
        MetricSpec(name=s.name, type="cumulative" if s.type == "counter" else "gauge", format=s.format, units=s.units or "")
        for s in specs
    ]


def _spec_parts(container: Container, machine: MachineInfo, metrics: frozenset[str]) -> dict[str, Any]:
    spec = container.spec
    cpu, mem = spec.cpu, spec.memory
    is_root = container.name == "/"
    # cAdvisor reads cgroup v2's "max" as the largest uint64 and, like getAdjustedSpec, reports
    # an unreadable limit of the root container as the machine's memory.
    limit = mem.limit_bytes
    if limit is None:
        limit = machine.memory_capacity_bytes if is_root else UINT64_MAX
    swap = mem.swap_limit_bytes
    if swap is None and not is_root:
        swap = UINT64_MAX
    return {
        "creation_time": spec.creation_time or ZERO_TIME,
        "labels": dict(spec.labels) or None,
        "envs": dict(spec.env) or None,
        "has_cpu": "cpu" in metrics,
        "cpu": CpuSpec(
            limit=_n(cpu.shares),
            max_limit=round(cpu.limit_cores * 1000) if cpu.limit_cores else 0,
            mask=cpu.cpuset_cpus or None,
            quota=_omit_zero(cpu.quota_us),
            period=_omit_zero(cpu.period_us),
        ),
        "has_memory": "memory" in metrics,
        "memory": MemorySpec(limit=limit, reservation=_omit_zero(mem.reservation_bytes), swap_limit=swap),
        "has_network": spec.has_network,
        "has_processes": "process" in metrics,
        "processes": ProcessSpec(limit=_omit_zero(spec.pids_limit)),
        "has_filesystem": spec.has_filesystem,
        "has_diskio": "diskIO" in metrics,
        "has_custom_metrics": bool(spec.custom_metrics),
        "custom_metrics": _metric_specs(container),
        "image": spec.image or container.ref.image or None,
    }


def spec_v1(container: Container, machine: MachineInfo, metrics: frozenset[str]) -> ContainerSpecV1:
    return ContainerSpecV1(**_spec_parts(container, machine, metrics))


def spec_v2(container: Container, machine: MachineInfo, metrics: frozenset[str]) -> ContainerSpecV2:
    ref = container.ref
    return ContainerSpecV2(
        **_spec_parts(container, machine, metrics), aliases=ref.aliases or None, namespace=ref.namespace or None
    )


def _cpu(record: ContainerStats) -> CpuStatsV1 | None:
    cpu = record.cpu
    if cpu is None:
        return None
    return CpuStatsV1(
        usage=CpuUsage(total=_n(cpu.total_ns), per_cpu_usage=cpu.per_cpu_ns or None, user=_n(cpu.user_ns), system=_n(cpu.system_ns)),
        cfs=CpuCFS(periods=_n(cpu.periods), throttled_periods=_n(cpu.throttled_periods), throttled_time=_n(cpu.throttled_time_ns)),
        load_average=_n(cpu.load_average_milli),
    )


def _device(name: str | None) -> str:
    if not name:
        return ""
    return name if name.startswith("/") else f"/dev/{name}"


def _diskio(record: ContainerStats) -> DiskIoStats | None:
    devices = record.diskio
    if devices is None:
        return None
    if not devices:
        return DiskIoStats()
    return DiskIoStats(
        io_service_bytes=[
            PerDiskStats(
                device=_device(d.device), major=d.major, minor=d.minor,
                stats={"Read": d.read_bytes, "Write": d.write_bytes, "Total": d.read_bytes + d.write_bytes},
            )
            for d in devices
        ],
        io_serviced=[
            PerDiskStats(
                device=_device(d.device), major=d.major, minor=d.minor,
                stats={"Read": d.read_ops, "Write": d.write_ops, "Total": d.read_ops + d.write_ops},
            )
            for d in devices
        ],
    )


def _memory(record: ContainerStats) -> MemoryStatsV1 | None:
    mem = record.memory
    if mem is None:
        return None
    # Records carry the hierarchical figures (v1 total_*, v2's own): both of cAdvisor's views.
    faults = MemoryData(pgfault=_n(mem.pgfault), pgmajfault=_n(mem.pgmajfault))
    return MemoryStatsV1(
        usage=_n(mem.usage_bytes),
        max_usage=_n(mem.max_usage_bytes),
        cache=_n(mem.cache_bytes),
        rss=_n(mem.rss_bytes),
        swap=_n(mem.swap_bytes),
        mapped_file=_n(mem.mapped_file_bytes),
        working_set=_n(mem.working_set_bytes),
        failcnt=_n(mem.failcnt),
        container_data=faults,
        hierarchical_data=faults.model_copy(),
    )


def _interfaces(record: ContainerStats) -> list[InterfaceStats] | None:
    if record.network is None:
        return None
    return [InterfaceStats(**i.model_dump()) for i in record.network]


def _network_v1(record: ContainerStats) -> NetworkStatsV1:
    interfaces = _interfaces(record)
    first = interfaces[0].model_dump() if interfaces else {}
    return NetworkStatsV1(**first, interfaces=interfaces or None)


def _network_v2(record: ContainerStats) -> NetworkStatsV2 | None:
    interfaces = _interfaces(record)
    if interfaces is None:
        return None
    return NetworkStatsV2(interfaces=interfaces or None)


def _filesystems(record: ContainerStats) -> list[FsStatsV1] | None:
    if not record.filesystem:
        return None
    is_root = record.container.name == "/"
    return [_fs(f, is_root) for f in record.filesystem]


def _fs(f: FilesystemStats, is_root: bool) -> FsStatsV1:
    has_inodes = f.inodes is not None or f.inodes_used is not None
    return FsStatsV1(
        device=f.device or None,
        type=f.type or "",
        capacity=_n(f.capacity_bytes),
        usage=f.usage_bytes,
        # A container's figure is its writable layer: cAdvisor's base usage.
        base_usage=0 if is_root else f.usage_bytes,
        available=_n(f.available_bytes),
        has_inodes=has_inodes,
        # cAdvisor's container figure is the inodes the layer uses; the machine's the total.
        inodes=_n(f.inodes if is_root else (f.inodes_used if f.inodes_used is not None else f.inodes)),
        inodes_free=_n(f.inodes_free),
    )


def _processes(record: ContainerStats) -> ProcessStatsV1 | None:
    p = record.processes
    if p is None:
        return None
    return ProcessStatsV1(fd_count=_n(p.open_fds), threads_current=_omit_zero(p.pids_current), threads_max=_omit_zero(p.pids_limit))


Formats = Mapping[str, str]  # custom metric name → "int" or "float" (its spec's format)


def metric_formats(container: Container) -> dict[str, str]:
    return {s.name: s.format for s in container.spec.custom_metrics}


def _custom_metrics(record: ContainerStats, formats: Formats) -> dict[str, list[MetricVal]] | None:
    if not record.custom_metrics:
        return None
    out: dict[str, list[MetricVal]] = {}
    for name, values in record.custom_metrics.items():
        as_int = formats.get(name) == "int"
        out[name] = [
            MetricVal(
                labels=dict(v.labels) or None,
                timestamp=v.timestamp or record.timestamp,
                int_value=int(v.value) if as_int else None,
                float_value=None if as_int else v.value,
            )
            for v in values
        ]
    return out


def _oom_events(record: ContainerStats) -> int | None:
    events = record.memory.events if record.memory is not None else None
    return _omit_zero(events.oom_kill) if events is not None else None


def stats_v1(record: ContainerStats, formats: Formats = {}) -> ContainerStatsV1:  # noqa: B006 - read only
    return ContainerStatsV1(
        timestamp=record.timestamp,
        cpu=_cpu(record) or CpuStatsV1(),
        diskio=_diskio(record) or DiskIoStats(),
        memory=_memory(record) or MemoryStatsV1(),
        network=_network_v1(record),
        filesystem=_filesystems(record),
        processes=_processes(record) or ProcessStatsV1(),
        custom_metrics=_custom_metrics(record, formats),
        oom_events=_oom_events(record),
    )


def cpu_inst(last: ContainerStats | None, cur: ContainerStats) -> CpuInstStats | None:
    """cAdvisor's InstCpuStats: rates between two samples; None where they cannot be had."""
    if last is None or last.cpu is None or cur.cpu is None:
        return None
    dt_ns = (cur.timestamp - last.timestamp).total_seconds() * 1e9
    if dt_ns <= 0:
        return None

    def rate(a: int | None, b: int | None) -> int | None:
        if a is None or b is None or b < a:
            return None
        return int((b - a) / dt_ns * 1e9)

    a, b = last.cpu, cur.cpu
    total = rate(a.total_ns, b.total_ns)
    if total is None:
        return None
    per_cpu = None
    if a.per_cpu_ns and b.per_cpu_ns:
        if len(a.per_cpu_ns) != len(b.per_cpu_ns):
            return None
        rates = [rate(x, y) for x, y in zip(a.per_cpu_ns, b.per_cpu_ns, strict=True)]
        if any(r is None for r in rates):
            return None
        per_cpu = [r for r in rates if r is not None]
    return CpuInstStats(
        usage=CpuInstUsage(total=total, per_cpu_usage=per_cpu, user=_n(rate(a.user_ns, b.user_ns)), system=_n(rate(a.system_ns, b.system_ns)))
    )


def _pairs(records: Sequence[ContainerStats]) -> Iterable[tuple[ContainerStats | None, ContainerStats]]:
    last = None
    for record in records:
        yield last, record
        last = record


def deprecated_stats(records: Sequence[ContainerStats], formats: Formats = {}) -> list[DeprecatedContainerStats]:  # noqa: B006
    out = []
    for last, r in _pairs(records):
        cpu, diskio, memory, processes = _cpu(r), _diskio(r), _memory(r), _processes(r)
        network = _network_v2(r)
        out.append(
            DeprecatedContainerStats(
                timestamp=r.timestamp,
                has_cpu=cpu is not None,
                cpu=cpu or CpuStatsV1(),
                cpu_inst=cpu_inst(last, r),
                has_diskio=diskio is not None,
                diskio=diskio or DiskIoStats(),
                has_memory=memory is not None,
                memory=memory or MemoryStatsV1(),
                has_network=network is not None,
                network=network or NetworkStatsV2(),
                has_processes=processes is not None,
                processes=processes or ProcessStatsV1(),
                has_filesystem=bool(r.filesystem),
                filesystem=_filesystems(r),
                has_custom_metrics=bool(r.custom_metrics),
                custom_metrics=_custom_metrics(r, formats),
            )
        )
    return out


def _fs_v2(record: ContainerStats) -> FilesystemStatsV2 | None:
    # cAdvisor reports one device per container; several (the root's) have no v2 figure.
    fs = record.filesystem
    if not fs or len(fs) != 1:
        return None
    f = _fs(fs[0], record.container.name == "/")
    return FilesystemStatsV2(totalUsageBytes=f.usage, baseUsageBytes=f.base_usage, containter_inode_usage=f.inodes if f.has_inodes else None)


def stats_v2(records: Sequence[ContainerStats], formats: Formats = {}) -> list[ContainerStatsV2]:  # noqa: B006
    return [
        ContainerStatsV2(
            timestamp=r.timestamp,
            cpu=_cpu(r),
            cpu_inst=cpu_inst(last, r),
            diskio=_diskio(r),
            memory=_memory(r),
            network=_network_v2(r),
            processes=_processes(r),
            filesystem=_fs_v2(r),
            custom_metrics=_custom_metrics(r, formats),
        )
        for last, r in _pairs(records)
    ]


def machine_stats(records: Sequence[ContainerStats]) -> list[MachineStats]:
    out = []
    for last, r in _pairs(records):
        fs = None
        if r.filesystem:
            fs = [
                MachineFsStats(
                    device=f.device, type=f.type or "", capacity=f.capacity_bytes, usage=f.usage_bytes,
                    available=f.available_bytes, inodes_free=f.inodes_free,
                )
                for f in r.filesystem
            ]
        out.append(
            MachineStats(timestamp=r.timestamp, cpu=_cpu(r), cpu_inst=cpu_inst(last, r), memory=_memory(r), network=_network_v2(r), filesystem=fs)
        )
    return out


def machine_v1(m: MachineInfo) -> MachineInfoV1:
    return MachineInfoV1(
        timestamp=m.timestamp,
        num_cores=m.num_cores,
        num_physical_cores=_n(m.num_physical_cores),
        num_sockets=_n(m.num_sockets),
        cpu_frequency_khz=_n(m.cpu_frequency_khz),
        memory_capacity=m.memory_capacity_bytes,
        swap_capacity=_n(m.swap_capacity_bytes),
        machine_id=m.machine_id,
        system_uuid=m.system_uuid or "",
        boot_id=m.boot_id or "",
        filesystems=_fs_info(m),
        network_devices=_net_info(m),
    )


def _fs_info(m: MachineInfo) -> list[FsInfo]:
    return [
        FsInfo(device=f.device, capacity=f.capacity_bytes, type=f.type, inodes=_n(f.inodes), has_inodes=f.inodes is not None)
        for f in m.filesystems
    ]


def _net_info(m: MachineInfo) -> list[NetInfo]:
    return [NetInfo(name=d.name, mac_address=d.mac_address or "", speed=_n(d.speed_mbps), mtu=_n(d.mtu)) for d in m.network_devices]


def attributes(m: MachineInfo, v: VersionInfo) -> Attributes:
    return Attributes(
        kernel_version=v.kernel_version,
        container_os_version=v.os_version,
        docker_version=v.docker_version or "",
        docker_api_version=v.docker_api_version or "",
        cadvisor_version=v.exporter_version,
        num_cores=m.num_cores,
        cpu_frequency_khz=_n(m.cpu_frequency_khz),
        memory_capacity=m.memory_capacity_bytes,
        machine_id=m.machine_id,
        system_uuid=m.system_uuid or "",
        filesystems=_fs_info(m),
        network_devices=_net_info(m),
    )


def derived_stats(value: Any) -> DerivedStats:
    """The summary's ``derived()`` result (a model or a dict in cAdvisor's shape) as ours."""
    data = value.model_dump() if isinstance(value, BaseModel) else value
    return DerivedStats.model_validate(data)


# --------------------------------------------------------------------------------------------
# Names: only ever looked up in the registry
# --------------------------------------------------------------------------------------------
def clean_name(raw: str) -> str:
    """Go's path.Join("/", raw): an absolute name; ``.``, ``..`` and repeated slashes resolved
    lexically, never above ``/``."""
    parts: list[str] = []
    for part in raw.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/" + "/".join(parts)


def _not_found(what: str) -> HTTPException:
    return HTTPException(status_code=404, detail=what)


def _bad_request(what: str) -> HTTPException:
    return HTTPException(status_code=400, detail=what)


class Registry:
    """The lookups cAdvisor's manager offers, over :class:`exporter.manager.Manager`."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    def by_name(self, name: str) -> Container:
        manager = self.ctx.manager
        container = manager.get(name)
        if container is not None:
            return container
        # "/docker/<name or id>" also finds a Docker container whose cgroup is elsewhere
        # (systemd driver: /system.slice/docker-<id>.scope).
        parts = name.split("/")
        if len(parts) == 3 and parts[1] == DOCKER_NAMESPACE:
            found = self._docker_or_none(parts[2])
            if found is not None:
                return found
        raise _not_found(f"unknown container {name!r}")

    def docker(self, alias: str) -> Container:
        alias = alias.strip("/")
        if not alias:
            raise _not_found("no Docker container named '': give a name or id (or recursive=true for all of them)")
        if "/" in alias:
            raise _not_found(f"unknown Docker container {alias!r}: a Docker name or id has no '/'")
        found = self._docker_or_none(alias)
        if found is None:
            raise _not_found(f"unknown Docker container {alias!r}")
        return found

    def _docker_or_none(self, alias: str) -> Container | None:
        found = self.ctx.manager.resolve(DOCKER_NAMESPACE, alias)
        if found is not None:
            return found
        # Like cAdvisor (and the docker CLI): a unique prefix of a name or id.
        matches = {c.name: c for c in self.all_docker() if any(a.startswith(alias) for a in c.ref.aliases)}
        if len(matches) > 1:
            raise _not_found(f"Docker container {alias!r} is not unique: {', '.join(sorted(matches))}")
        return next(iter(matches.values()), None)

    def all_docker(self) -> list[Container]:
        return sorted((c for c in self.ctx.manager.containers() if c.ref.namespace == DOCKER_NAMESPACE), key=lambda c: c.name)

    def subtree(self, name: str) -> list[Container]:
        """``name`` and every container below it (``name`` need not be monitored itself)."""
        prefix = name.rstrip("/") + "/"
        return sorted(
            (c for c in self.ctx.manager.containers() if c.name == name or c.name.startswith(prefix)), key=lambda c: c.name
        )

    def children(self) -> dict[str, list[Container]]:
        """Direct subcontainers: each container under its nearest monitored ancestor."""
        containers = self.ctx.manager.containers()
        names = {c.name for c in containers}
        out: dict[str, list[Container]] = {}
        for c in sorted(containers, key=lambda c: c.name):
            if c.name == "/":
                continue
            parent = c.name
            while parent != "/":
                parent = parent.rsplit("/", 1)[0] or "/"
                if parent in names:
                    break
            out.setdefault(parent, []).append(c)
        return out

    def select(self, raw_name: str, id_type: str, recursive: bool) -> list[Container]:
        """cAdvisor's getRequestedContainers for the v2 API's type/recursive options."""
        name = clean_name(raw_name)
        if id_type == "name":
            if not recursive:
                return [self.by_name(name)]
            found = self.subtree(name)
            if not found:
                raise _not_found(f"unknown container {name!r}")
            return found
        if not recursive:
            return [self.docker(name)]
        if name != "/":
            raise _bad_request(f"recursive=true with type=docker lists every Docker container; got name {name!r}")
        return self.all_docker()


# --------------------------------------------------------------------------------------------
# /api/v2.0/ps: the processes of one container, from /proc
# --------------------------------------------------------------------------------------------
class ProcReading:
    """What the process list needs of the host, read once per request."""

    def __init__(self, proc_root: Path, rootfs: Path, memory_capacity: int) -> None:
        self.proc = proc_root
        self.hz = os.sysconf("SC_CLK_TCK")
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.memory = memory_capacity or 1
        self.btime = 0.0
        self.uptime = 0.0
        self.users: dict[int, str] = {}
        try:
            for line in (proc_root / "stat").read_text().splitlines():
                if line.startswith("btime "):
                    self.btime = float(line.split()[1])
            self.uptime = float((proc_root / "uptime").read_text().split()[0])
        except (OSError, ValueError, IndexError) as exc:
            log.debug("ps: cannot read boot time or uptime: %s", exc)
        try:
            for line in (rootfs / "etc" / "passwd").read_text(errors="replace").splitlines():
                fields = line.split(":")
                if len(fields) > 2 and fields[2].isdigit():
                    self.users.setdefault(int(fields[2]), fields[0])
        except OSError:
            pass
        self.now = time.time()

    def process(self, pid: int, with_cgroup: bool) -> ProcessInfo | None:
        base = self.proc / str(pid)
        try:
            stat = (base / "stat").read_bytes().decode(errors="replace")
            status = (base / "status").read_bytes().decode(errors="replace")
        except OSError:  # gone meanwhile
            return None
        # comm may hold spaces and parentheses: it ends at the last ')'.
        lparen, rparen = stat.find("("), stat.rfind(")")
        if lparen < 0 or rparen < lparen:
            return None
        comm = stat[lparen + 1 : rparen]
        f = stat[rparen + 2 :].split()
        if len(f) < 37:
            return None
        state, ppid, pgrp, session, tpgid = f[0], int(f[1]), int(f[2]), int(f[3]), int(f[5])
        utime, stime = int(f[11]), int(f[12])
        nice, threads, start_ticks = int(f[16]), int(f[17]), int(f[19])
        vsize, rss_pages, psr = int(f[20]), int(f[21]), int(f[36])
        uid = _status_uid(status)
        cpu_s = (utime + stime) / self.hz
        elapsed = max(self.uptime - start_ticks / self.hz, 0.0)
        rss = rss_pages * self.page
        fd_count = 0
        try:
            fd_count = len(os.listdir(base / "fd"))
        except OSError:
            pass
        return ProcessInfo(
            user=self.users.get(uid, str(uid)) if uid is not None else "?",
            pid=pid,
            parent_pid=ppid,
            start_time=self._stime(self.btime + start_ticks / self.hz),
            percent_cpu=round(100.0 * cpu_s / elapsed, 1) if elapsed > 0 else 0.0,
            percent_mem=round(100.0 * rss / self.memory, 1),
            rss=rss,
            virtual_size=vsize,
            status=_ps_stat(state, nice, pid == session, threads > 1, tpgid == pgrp),
            running_time=_ps_time(int(cpu_s)),
            cgroup_path=self._cgroup(base) if with_cgroup else "",
            cmd=comm,
            fd_count=fd_count,
            psr=psr,
        )

    def _stime(self, started: float) -> str:
        when, now = time.localtime(started), time.localtime(self.now)
        if self.now - started < 86400:
            return time.strftime("%H:%M", when)
        if when.tm_year == now.tm_year:
            return time.strftime("%b%d", when)
        return str(when.tm_year)

    @staticmethod
    def _cgroup(base: Path) -> str:
        """cAdvisor's getCgroupPath: the unified path, or the v1 cpu controller's."""
        try:
            lines = (base / "cgroup").read_text().splitlines()
        except OSError:
            return "/"
        unified = None
        for line in lines:
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            if parts[0] == "0" and parts[1] == "":
                unified = parts[2]
            elif "cpu" in parts[1].split(","):
                return parts[2]
        return unified or "/"


def _status_uid(status: str) -> int | None:
    for line in status.splitlines():
        if line.startswith("Uid:"):
            fields = line.split()
            return int(fields[2]) if len(fields) > 2 else None  # effective uid, as ps's "user"
    return None


def _ps_stat(state: str, nice: int, leader: bool, threaded: bool, foreground: bool) -> str:
    flags = state
    if nice < 0:
        flags += "<"
    elif nice > 0:
        flags += "N"
    if leader:
        flags += "s"
    if threaded:
        flags += "l"
    if foreground:
        flags += "+"
    return flags


def _ps_time(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{text}" if days else text


def process_list(ctx: ApiContext, container: Container) -> list[ProcessInfo]:
    """The root container lists every process (with its cgroup); another container the
    processes directly in its cgroup, as cAdvisor's ps does."""
    config = ctx.config
    is_root = container.name == "/"
    if is_root:
        try:
            pids = sorted(int(e) for e in os.listdir(config.proc_root) if e.isdigit())
        except OSError as exc:
            raise HTTPException(status_code=503, detail=f"cannot list processes: {exc}") from None
    else:
        pids = _cgroup_pids(container)
    if len(pids) > MAX_PROCESSES:
        log.info("ps of %s: %d processes, listing the first %d", container.name, len(pids), MAX_PROCESSES)
        pids = pids[:MAX_PROCESSES]
    reading = ProcReading(config.proc_root, config.rootfs, ctx.machine_info.memory_capacity_bytes)
    return [p for p in (reading.process(pid, is_root) for pid in pids) if p is not None]


def _cgroup_pids(container: Container) -> list[int]:
    # The container's own open cgroup.procs, under its lock: a concurrent close() must not
    # leave us reading a descriptor number that was reused meanwhile.
    with container._lock:
        if container.closed:
            raise _not_found(f"container {container.name!r} is gone")
        procs = container.reader.cgroup.procs
        if procs is None:
            return []
        try:
            data = procs.read()
        except OSError:
            raise _not_found(f"container {container.name!r} is gone") from None
    return sorted(int(p) for p in data.split())


# --------------------------------------------------------------------------------------------
# Routes
# --------------------------------------------------------------------------------------------
NOT_FOUND = {404: {"model": ErrorBody, "description": "unknown container"}}
BAD_REQUEST = {400: {"model": ErrorBody, "description": "bad parameter or body"}}
ERRORS = NOT_FOUND | BAD_REQUEST

NameParam = Annotated[str, PathParam(description="container name: its cgroup path (type=name) or a Docker name or id (type=docker)")]
TypeParam = Annotated[Literal["name", "docker"], Query(description="how the name is meant: a cgroup path, or a Docker name/id")]
CountParam = Annotated[int, Query(ge=0, le=2**32 - 1, description="most stats per container (newest last)")]
RecursiveParam = Annotated[bool, Query(description="include every container below the named one")]
RequestBody = Annotated[ContainerInfoRequest | None, Body(description="cAdvisor's ContainerInfoRequest; empty: the defaults")]

def _json(value: Any, adapter: TypeAdapter[Any]) -> Response:
    return Response(content=dump_json(value, adapter), media_type="application/json")


_V1_INFO = TypeAdapter(ContainerInfoV1)
_V1_INFO_LIST = TypeAdapter(list[ContainerInfoV1])
_V1_INFO_MAP = TypeAdapter(dict[str, ContainerInfoV1])
_MACHINE = TypeAdapter(MachineInfoV1)
_ATTRIBUTES = TypeAdapter(Attributes)
_STR = TypeAdapter(str)
_DEPRECATED_MAP = TypeAdapter(dict[str, list[DeprecatedContainerStats]])
_V2_INFO_MAP = TypeAdapter(dict[str, ContainerInfoV2])
_SPEC_MAP = TypeAdapter(dict[str, ContainerSpecV2])
_DERIVED_MAP = TypeAdapter(dict[str, DerivedStats])
_PS = TypeAdapter(list[ProcessInfo])
_MACHINE_STATS = TypeAdapter(list[MachineStats])
_STORAGE = TypeAdapter(list[FsInfoV2])
_REQUEST = TypeAdapter(ContainerInfoRequest)


def _is_zero(t: datetime | None) -> bool:
    return t is None or t.year <= 1


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def container_info_request(body: bytes) -> ContainerInfoRequest:
    """A GET's optional body, parsed like the POST's (FastAPI parses that one)."""
    if not body.strip():
        return ContainerInfoRequest()
    try:
        return _REQUEST.validate_json(body)
    except ValidationError as exc:
        raise _bad_request(f"invalid ContainerInfoRequest: {exc.errors(include_url=False)}") from None


def router(ctx: ApiContext) -> APIRouter:
    """cAdvisor's /api/v1.3 and /api/v2.x endpoints over ``ctx``."""
    api = APIRouter(tags=["cadvisor"])
    registry = Registry(ctx)
    metrics = ctx.config.metrics

    def recent(container: Container, request: ContainerInfoRequest) -> list[ContainerStats]:
        start = None if _is_zero(request.start) else _aware(request.start)  # type: ignore[arg-type]
        end = None if _is_zero(request.end) else _aware(request.end)  # type: ignore[arg-type]
        if start is not None and end is not None and start > end:
            raise _bad_request("start is after end")
        count = None if request.num_stats == -1 else request.num_stats
        return ctx.cache.recent(container.name, start, end, count)

    def info_v1(container: Container, request: ContainerInfoRequest, children: dict[str, list[Container]]) -> ContainerInfoV1:
        ref = reference_v1(container)
        kids = children.get(container.name)
        formats = metric_formats(container)
        return ContainerInfoV1(
            **ref.model_dump(),
            subcontainers=[reference_v1(c) for c in kids] if kids else None,
            spec=spec_v1(container, ctx.machine_info, metrics),
            stats=[stats_v1(r, formats) for r in recent(container, request)] or None,
        )

    # -- v1.3 ---------------------------------------------------------------------------------
    def container_v1(name: str, req: ContainerInfoRequest) -> Response:
        container = registry.by_name(clean_name(name))
        return _json(info_v1(container, req, registry.children()), _V1_INFO)

    def subcontainers_v1(name: str, req: ContainerInfoRequest) -> Response:
        clean = clean_name(name)
        found = registry.subtree(clean)
        if not found:
            raise _not_found(f"unknown container {clean!r}")
        children = registry.children()
        return _json([info_v1(c, req, children) for c in found], _V1_INFO_LIST)

    def docker_v1(alias: str, req: ContainerInfoRequest) -> Response:
        children = registry.children()
        found = registry.all_docker() if not alias.strip("/") else [registry.docker(alias)]
        return _json({c.name: info_v1(c, req, children) for c in found}, _V1_INFO_MAP)

    def v1_routes(path: str, summary: str, handler: Callable[[str, ContainerInfoRequest], Response], model: Any) -> None:
        # GET documents no body (clients POST one); a body sent with a GET anyway is honoured.
        async def root_get(request: Request) -> Response:
            req = container_info_request(await request.body())
            return await run_in_threadpool(handler, "", req)

        async def named_get(request: Request, name: NameParam) -> Response:
            req = container_info_request(await request.body())
            return await run_in_threadpool(handler, name, req)

        async def root_post(body: RequestBody = None) -> Response:
            return await run_in_threadpool(handler, "", body or ContainerInfoRequest())

        async def named_post(name: NameParam, body: RequestBody = None) -> Response:
            return await run_in_threadpool(handler, name, body or ContainerInfoRequest())

        for fn, method, suffix in (
            (root_get, "GET", ""), (named_get, "GET", "/{name:path}"), (root_post, "POST", ""), (named_post, "POST", "/{name:path}")
        ):
            api.add_api_route(
                f"/api/v1.3/{path}{suffix}", fn, methods=[method], response_model=model, responses=ERRORS,
                summary=f"{summary} ({method})", operation_id=f"v1_3_{path}{'_named' if suffix else ''}_{method.lower()}",
            )

    v1_routes("containers", "A container with its spec and recent stats", container_v1, ContainerInfoV1)
    v1_routes("subcontainers", "A container and every container below it", subcontainers_v1, list[ContainerInfoV1])
    v1_routes("docker", "Docker containers by name or id (all of them without one)", docker_v1, dict[str, ContainerInfoV1])

    @api.get("/api/v1.3/machine", response_model=MachineInfoV1, summary="Machine info (v1.3)")
    def machine_v13() -> Response:
        return _json(machine_v1(ctx.machine_info), _MACHINE)

    # -- v2.0 ---------------------------------------------------------------------------------
    @api.get("/api/v2.0/version", response_model=str, summary="The exporter's version (cAdvisor's version string)")
    def version() -> Response:
        return _json(ctx.version_info.exporter_version, _STR)

    @api.get("/api/v2.0/attributes", response_model=Attributes, summary="Machine and version attributes")
    def attributes_v2() -> Response:
        return _json(attributes(ctx.machine_info, ctx.version_info), _ATTRIBUTES)

    @api.get("/api/v2.0/machine", response_model=MachineInfoV1, summary="Machine info")
    def machine_v2() -> Response:
        return _json(machine_v1(ctx.machine_info), _MACHINE)

    def v2_get(path: str, model: Any, summary: str, handler: Callable[[str, str, int, bool], Response]) -> None:
        def named(
            name: NameParam, type: TypeParam = "name", count: CountParam = 64, recursive: RecursiveParam = False
        ) -> Response:
            return handler(name, type, count, recursive)

        def unnamed(type: TypeParam = "name", count: CountParam = 64, recursive: RecursiveParam = False) -> Response:
            return handler("", type, count, recursive)

        stem = path.replace(".", "_").replace("/", "_")
        api.add_api_route(f"/api/{path}/{{name:path}}", named, methods=["GET"], response_model=model, responses=ERRORS,
                          summary=summary, operation_id=f"{stem}_named")
        api.add_api_route(f"/api/{path}", unnamed, methods=["GET"], response_model=model, responses=ERRORS,
                          summary=f"{summary} (root container)", operation_id=stem)

    def stats_v20(name: str, id_type: str, count: int, recursive: bool) -> Response:
        found = registry.select(name, id_type, recursive)
        return _json(
            {c.name: deprecated_stats(ctx.cache.recent(c.name, count=count), metric_formats(c)) for c in found}, _DEPRECATED_MAP
        )

    def spec_v20(name: str, id_type: str, count: int, recursive: bool) -> Response:
        found = registry.select(name, id_type, recursive)
        return _json({c.name: spec_v2(c, ctx.machine_info, metrics) for c in found}, _SPEC_MAP)

    def summary_v20(name: str, id_type: str, count: int, recursive: bool) -> Response:
        found = registry.select(name, id_type, recursive)
        out: dict[str, DerivedStats] = {}
        for c in found:
            if c.summary is None:
                continue
            try:
                out[c.name] = derived_stats(c.summary.derived())
            except Exception:  # a bug in the summary: loud here, a plain 500 for the client
                log.exception("summary of %s: derived() failed or is not in cAdvisor's DerivedStats shape", c.name)
                raise HTTPException(status_code=500, detail=f"summary statistics of {c.name!r} are unavailable") from None
        if not out:
            which = found[0].name if len(found) == 1 else f"any of the {len(found)} containers selected"
            raise _not_found(f"no summary statistics are kept for {which!r}")
        return _json(out, _DERIVED_MAP)

    def ps_v20(name: str, id_type: str, count: int, recursive: bool) -> Response:
        # cAdvisor's ps ignores recursive and count.
        container = registry.select(name, id_type, False)[0]
        return _json(process_list(ctx, container), _PS)

    v2_get("v2.0/stats", dict[str, list[DeprecatedContainerStats]], "Recent stats by container (v2.0 shape)", stats_v20)
    v2_get("v2.0/spec", dict[str, ContainerSpecV2], "Container specs", spec_v20)
    v2_get("v2.0/summary", dict[str, DerivedStats], "Derived usage percentiles (minute, hour, day)", summary_v20)
    v2_get("v2.0/ps", list[ProcessInfo], "Processes of a container", ps_v20)

    @api.get("/api/v2.0/storage", response_model=list[FsInfoV2], responses=ERRORS, summary="The machine's filesystems")
    def storage(label: Annotated[str | None, Query(description="filesystem labels are not tracked: any label is unknown")] = None) -> Response:
        if label:
            raise _not_found(f"unknown filesystem label {label!r}: filesystem labels are not tracked")
        root = ctx.cache.latest("/")
        out = []
        if root is not None and root.filesystem:
            for f in root.filesystem:
                out.append(
                    FsInfoV2(
                        timestamp=f.measured_at or root.timestamp, device=f.device, mountpoint=f.mountpoint or "",
                        capacity=_n(f.capacity_bytes), available=_n(f.available_bytes), usage=f.usage_bytes, labels=[],
                        inodes=f.inodes, inodes_free=f.inodes_free,
                    )
                )
        return _json(out, _STORAGE)

    # -- v2.1 ---------------------------------------------------------------------------------
    def stats_v21(name: str, id_type: str, count: int, recursive: bool) -> Response:
        found = registry.select(name, id_type, recursive)
        out = {}
        for c in found:
            if c.name == "/":  # the root's stats are /api/v2.1/machinestats
                continue
            stats = stats_v2(ctx.cache.recent(c.name, count=count), metric_formats(c))
            out[c.name] = ContainerInfoV2(spec=spec_v2(c, ctx.machine_info, metrics), stats=stats or None)
        return _json(out, _V2_INFO_MAP)

    v2_get("v2.1/stats", dict[str, ContainerInfoV2], "Spec and recent stats by container (v2.1 shape; not the root)", stats_v21)

    @api.get("/api/v2.1/machinestats", response_model=list[MachineStats], responses=BAD_REQUEST, summary="The machine's recent stats")
    def machinestats(count: CountParam = 64) -> Response:
        return _json(machine_stats(ctx.cache.recent("/", count=count)), _MACHINE_STATS)

    return api
