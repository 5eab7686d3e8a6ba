"""Machine and version info from /proc, /sys and /etc, each read under a root path given by the caller.

``rootfs`` is the host's / as we see it (``/rootfs`` in a container); it defaults to the parent of
``etc_root`` so that ``/rootfs/etc`` implies ``/rootfs/var/lib/dbus`` and ``/rootfs/usr/lib``.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import exporter
from exporter.fs import Mount, filesystem_info, machine_filesystems, read_mounts
from exporter.models import MachineInfo, NetworkDevice, VersionInfo

log = logging.getLogger(__name__)

# cAdvisor leaves these out of the machine's network devices: containers' veth ends and bridges.
IGNORED_NET_PREFIXES = ("veth", "docker", "nerdctl")

_DQUOTE_ESCAPE = re.compile(r'\\([$"\\`])')
_BACKSLASH_ESCAPE = re.compile(r"\\(.)")


@dataclass(frozen=True, slots=True)
class CpuInfo:
    logical_cores: int
    physical_cores: int | None = None
    sockets: int | None = None
    mhz: float | None = None


def _read_text(path: Path) -> str | None:
    """Stripped content, or None when missing or unreadable (sysfs gives EINVAL for a down link's speed)."""
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    try:
        return int(text) if text else None
    except ValueError:
        return None


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo → values; ``kB`` values are turned into bytes, counts (HugePages_*) kept."""
    out = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        out[key.strip()] = value * 1024 if parts[1:] == ["kB"] else value
    return out


def parse_cpuinfo(text: str) -> CpuInfo:
    """/proc/cpuinfo → counts; physical cores are distinct (physical id, core id) pairs.

    Architectures without ``physical id``/``core id`` lines (arm64, s390) give None for both
    counts; without ``cpu MHz`` the frequency is None.
    """
    processors = 0
    cores: set[tuple[str, str]] = set()
    sockets: set[str] = set()
    mhz: float | None = None
    physical_id = core_id = None
    for line in [*text.splitlines(), ""]:
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not key:
            # A blank line ends one processor's block.
            if physical_id is not None:
                sockets.add(physical_id)
                if core_id is not None:
                    cores.add((physical_id, core_id))
            physical_id = core_id = None
        elif not sep:
            continue
        elif key == "processor":
            processors += 1
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            core_id = value
        elif key == "cpu MHz":
            try:
                mhz = max(mhz or 0.0, float(value))
            except ValueError:
                pass
    return CpuInfo(
        logical_cores=processors,
        physical_cores=len(cores) or None,
        sockets=len(sockets) or None,
        mhz=mhz,
    )


def parse_cpu_list(text: str) -> list[int]:
    """Kernel cpu list (``0-3,8,10-11``) → cpu numbers; malformed text gives []."""
    cpus: list[int] = []
    try:
        for part in text.strip().split(","):
            if not part:
                continue
            first, _, last = part.partition("-")
            cpus.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        return []
    return cpus


def _os_release_value(raw: str) -> str:
    # os-release(5): shell-style quoting; in double quotes only $ " \ ` are escaped.
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == "'":
        return raw[1:-1]
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        return _DQUOTE_ESCAPE.sub(r"\1", raw[1:-1])
    return _BACKSLASH_ESCAPE.sub(r"\1", raw)


def parse_os_release(text: str) -> dict[str, str]:
    """os-release(5): ``KEY=value`` lines; comments and blank lines skipped."""
    out = {}
    for line in text.splitlines():
        key, sep, raw = line.strip().partition("=")
        if sep and not key.startswith("#"):
            out[key.strip()] = _os_release_value(raw)
    return out


def os_pretty_name(fields: dict[str, str]) -> str:
    """PRETTY_NAME, else NAME VERSION, else "Linux" (the default os-release(5) gives)."""
    if fields.get("PRETTY_NAME"):
        return fields["PRETTY_NAME"]
    name = " ".join(v for v in (fields.get("NAME"), fields.get("VERSION")) if v)
    return name or "Linux"


def read_os_release(etc_root: Path, rootfs: Path | None = None) -> dict[str, str]:
    """etc/os-release, else usr/lib/os-release under rootfs; {} when neither is readable."""
    root = etc_root.parent if rootfs is None else rootfs
    for path in (etc_root / "os-release", root / "usr/lib/os-release"):
        text = _read_text(path)
        if text is not None:
            return parse_os_release(text)
    return {}


def _sysfs_topology(sys_root: Path, cpus: list[int]) -> tuple[int | None, int | None]:
    """(physical cores, sockets) from cpu*/topology, for cpuinfo without physical/core ids."""
    cores: set[tuple[int, int]] = set()
    sockets: set[int] = set()
    for cpu in cpus:
        topology = sys_root / f"devices/system/cpu/cpu{cpu}/topology"
        package = _read_int(topology / "physical_package_id")
        core = _read_int(topology / "core_id")
        if package is None or core is None:
            return None, None
        sockets.add(package)
        cores.add((package, core))
    return len(cores) or None, len(sockets) or None


def read_machine_id(etc_root: Path, sys_root: Path, proc_root: Path, rootfs: Path | None = None) -> str:
    """etc/machine-id, var/lib/dbus/machine-id, DMI product_uuid, then boot_id; "" if none is readable."""
    root = etc_root.parent if rootfs is None else rootfs
    for path in (
        etc_root / "machine-id",
        root / "var/lib/dbus/machine-id",
        sys_root / "class/dmi/id/product_uuid",
        proc_root / "sys/kernel/random/boot_id",
    ):
        text = _read_text(path)
        # machine-id(5): "uninitialized" marks a first boot that has not committed the id yet.
        if text and text != "uninitialized":
            return text
    log.warning("no machine id under %s, %s or %s", etc_root, sys_root, proc_root)
    return ""


def read_network_devices(sys_root: Path) -> list[NetworkDevice]:
    """Interfaces under class/net, without lo and containers' veth/bridge devices, sorted by name."""
    net = sys_root / "class/net"
    try:
        names = sorted(os.listdir(net))
    except OSError:
        return []
    devices = []
    for name in names:
        if name == "lo" or name.startswith(IGNORED_NET_PREFIXES) or not (net / name).is_dir():
            continue  # bonding_masters is a plain file
        speed = _read_int(net / name / "speed")
        devices.append(
            NetworkDevice(
                name=name,
                mac_address=_read_text(net / name / "address") or None,
                # Links that are down or virtual report -1 or fail with EINVAL.
                speed_mbps=speed if speed is not None and speed > 0 else None,
                mtu=_read_int(net / name / "mtu"),
            )
        )
    return devices


def read_machine_info(
    proc_root: Path,
    sys_root: Path,
    etc_root: Path,
    hostname: str | None = None,
    now: datetime | None = None,
    rootfs: Path | None = None,
    filesystems: list[Mount] | None = None,
) -> MachineInfo:
    """Everything MachineInfo holds but cgroup_mode (the caller knows the layout).

    Filesystems: ``filesystems`` when the caller has read them, else those of the mount table of
    pid 1 under proc_root (the host's when proc_root is the host's /proc); measured under rootfs.
    """
    root = etc_root.parent if rootfs is None else rootfs
    cpuinfo = parse_cpuinfo(_read_text(proc_root / "cpuinfo") or "")
    meminfo = parse_meminfo(_read_text(proc_root / "meminfo") or "")

    online = parse_cpu_list(_read_text(sys_root / "devices/system/cpu/online") or "")
    num_cores = len(online) or cpuinfo.logical_cores or os.cpu_count() or 1
    physical_cores, sockets = cpuinfo.physical_cores, cpuinfo.sockets
    if physical_cores is None and online:
        physical_cores, sockets = _sysfs_topology(sys_root, online)

    max_freq_khz = _read_int(sys_root / "devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if max_freq_khz is None and cpuinfo.mhz is not None:
        max_freq_khz = round(cpuinfo.mhz * 1000)

    memory_bytes = meminfo.get("MemTotal")
    if memory_bytes is None:
        # sysinfo(2)'s totalram, the number MemTotal shows.
        memory_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

    if filesystems is None:
        filesystems = machine_filesystems(read_mounts(proc_root, "1") or read_mounts(proc_root, "self") or [])
    product_uuid = _read_text(sys_root / "class/dmi/id/product_uuid")
    return MachineInfo(
        timestamp=now or datetime.now(UTC),
        num_cores=num_cores,
        num_physical_cores=physical_cores,
        num_sockets=sockets,
        cpu_frequency_khz=max_freq_khz,
        memory_capacity_bytes=memory_bytes,
        swap_capacity_bytes=meminfo.get("SwapTotal"),
        machine_id=read_machine_id(etc_root, sys_root, proc_root, root),
        system_uuid=product_uuid or None,
        boot_id=_read_text(proc_root / "sys/kernel/random/boot_id") or None,
        hostname=hostname or socket.gethostname(),
        filesystems=filesystem_info(filesystems, root),
        network_devices=read_network_devices(sys_root),
    )


def read_version_info(
    proc_root: Path,
    etc_root: Path,
    docker_version: str | None,
    docker_api_version: str | None,
    rootfs: Path | None = None,
) -> VersionInfo:
    """Kernel release (falls back to uname, the same kernel), OS pretty name, our version."""
    return VersionInfo(
        exporter_version=exporter.__version__,
        kernel_version=_read_text(proc_root / "sys/kernel/osrelease") or platform.release(),
        os_version=os_pretty_name(read_os_release(etc_root, rootfs)),
        docker_version=docker_version,
        docker_api_version=docker_api_version,
        python_version=platform.python_version(),
    )
