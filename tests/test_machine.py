"""Machine and version info: parsers on fixture text, readers on this machine and on built trees."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

import exporter
from exporter.machine import (
    CpuInfo,
    os_pretty_name,
    parse_cpu_list,
    parse_cpuinfo,
    parse_meminfo,
    parse_os_release,
    read_machine_id,
    read_machine_info,
    read_network_devices,
    read_version_info,
)
from exporter.models import MachineInfo

FIXTURES = Path(__file__).parent / "fixtures" / "machine"
PROC, SYS, ETC = Path("/proc"), Path("/sys"), Path("/etc")
NOW = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


# --- parsers -----------------------------------------------------------------------------------


def test_parse_cpuinfo_two_sockets_with_hyperthreads() -> None:
    info = parse_cpuinfo((FIXTURES / "cpuinfo_2socket_ht").read_text())
    assert info == CpuInfo(logical_cores=8, physical_cores=4, sockets=2, mhz=3700.0)


def test_parse_cpuinfo_arm64_has_no_topology_or_mhz() -> None:
    info = parse_cpuinfo((FIXTURES / "cpuinfo_arm64").read_text())
    assert info == CpuInfo(logical_cores=4, physical_cores=None, sockets=None, mhz=None)


def test_parse_cpuinfo_without_trailing_blank_line() -> None:
    text = (FIXTURES / "cpuinfo_2socket_ht").read_text().rstrip("\n")
    assert parse_cpuinfo(text).sockets == 2
    assert parse_cpuinfo("") == CpuInfo(logical_cores=0)


def test_parse_meminfo_fixture() -> None:
    values = parse_meminfo((FIXTURES / "meminfo").read_text())
    assert values["MemTotal"] == 24684084 * 1024
    assert values["SwapTotal"] == 2097148 * 1024
    assert values["Hugepagesize"] == 2048 * 1024
    assert values["HugePages_Total"] == 4  # a count, not kB


def test_parse_os_release_quoting() -> None:
    fields = parse_os_release((FIXTURES / "os-release").read_text())
    assert fields["PRETTY_NAME"] == "Ubuntu 22.04.4 LTS"
    assert fields["VERSION_ID"] == "22.04"
    assert fields["ID"] == "ubuntu"
    assert fields["VARIANT"] == 'Say "hi" $HOME'
    assert not any(key.startswith("#") for key in fields)
    assert os_pretty_name(fields) == "Ubuntu 22.04.4 LTS"


@pytest.mark.parametrize("name", ["os-release", "os-release.debian12"])
def test_parse_os_release_agrees_with_the_shell(name: str) -> None:
    path = FIXTURES / name
    fields = parse_os_release(path.read_text())
    shell = run("env", "-i", "sh", "-c", f'. "{path}" && printf "%s\\0%s\\0" "$PRETTY_NAME" "$VARIANT"')
    pretty, variant = shell.split("\0")[:2]
    assert fields["PRETTY_NAME"] == pretty
    assert fields.get("VARIANT", "") == variant


def test_os_pretty_name_fallbacks() -> None:
    assert os_pretty_name({"NAME": "Alpine Linux", "VERSION": "3.19"}) == "Alpine Linux 3.19"
    assert os_pretty_name({"NAME": "Arch Linux"}) == "Arch Linux"
    assert os_pretty_name({}) == "Linux"


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0-3,8,10-11\n", [0, 1, 2, 3, 8, 10, 11]), ("0", [0]), ("", []), ("0-x", []), ("5-6", [5, 6])],
)
def test_parse_cpu_list(text: str, cpus: list[int]) -> None:
    assert parse_cpu_list(text) == cpus


# --- this machine ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def machine() -> MachineInfo:
    return read_machine_info(PROC, SYS, ETC, now=NOW)


def test_real_cores_and_memory(machine: MachineInfo) -> None:
    assert machine.timestamp == NOW
    assert machine.num_cores == os.cpu_count()
    phys_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert abs(machine.memory_capacity_bytes - phys_bytes) <= os.sysconf("SC_PAGE_SIZE")
    free = run("free", "-b").splitlines()
    swap_total = int(next(line for line in free if line.startswith("Swap:")).split()[1])
    assert machine.swap_capacity_bytes == swap_total


@pytest.mark.skipif(shutil.which("lscpu") is None, reason="needs lscpu")
def test_real_topology_matches_lscpu(machine: MachineInfo) -> None:
    rows = [line.split(",") for line in run("lscpu", "-p=CPU,CORE,SOCKET").splitlines() if line[:1] != "#"]
    assert machine.num_cores == len(rows)
    assert machine.num_physical_cores == len({(socket_, core) for _, core, socket_ in rows})
    assert machine.num_sockets == len({socket_ for _, _, socket_ in rows})


def test_real_cpu_frequency(machine: MachineInfo) -> None:
    max_freq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if max_freq.exists():
        assert machine.cpu_frequency_khz == int(max_freq.read_text())
        return
    mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text(), re.MULTILINE)]
    if not mhz:
        assert machine.cpu_frequency_khz is None
        return
    assert machine.cpu_frequency_khz is not None
    # The current clock moves between reads on hosts with frequency scaling.
    assert machine.cpu_frequency_khz == pytest.approx(max(mhz) * 1000, rel=0.2)


def test_real_ids_and_hostname(machine: MachineInfo) -> None:
    machine_id_file = Path("/etc/machine-id")
    if machine_id_file.exists() and machine_id_file.read_text().strip():
        assert machine.machine_id == machine_id_file.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{32}|[0-9a-f-]{36}", machine.machine_id)
    assert machine.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert machine.hostname == run("uname", "-n").strip()
    dmi = Path("/sys/class/dmi/id/product_uuid")
    assert machine.system_uuid == (dmi.read_text().strip() if dmi.exists() else None)


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2")
def test_real_network_devices_match_ip_link(machine: MachineInfo) -> None:
    links = {
        link["ifname"]: link
        for link in json.loads(run("ip", "-j", "link", "show"))
        if link["ifname"] != "lo" and not link["ifname"].startswith(("veth", "docker", "nerdctl"))
    }
    assert {d.name for d in machine.network_devices} == set(links)
    assert {n for _, n in socket.if_nameindex()} >= set(links)
    for device in machine.network_devices:
        assert device.mac_address == links[device.name].get("address")
        assert device.mtu == links[device.name]["mtu"]
        assert device.speed_mbps is None or device.speed_mbps > 0


def test_real_filesystems_include_root(machine: MachineInfo) -> None:
    size, source = run("df", "-B1", "--output=size,source", "/").splitlines()[-1].split()
    roots = [fs for fs in machine.filesystems if fs.mountpoint == "/"]
    if source.startswith("/dev/"):
        assert len(roots) == 1
        assert (roots[0].device, roots[0].capacity_bytes) == (source, int(size))
    assert len({fs.device for fs in machine.filesystems}) == len(machine.filesystems)


def test_real_version_info() -> None:
    version = read_version_info(PROC, ETC, docker_version="27.1.1", docker_api_version="1.46")
    assert version.kernel_version == run("uname", "-r").strip()
    pretty = run("sh", "-c", '. /etc/os-release && printf %s "$PRETTY_NAME"')
    assert version.os_version == pretty
    assert version.exporter_version == exporter.__version__
    assert version.python_version == platform.python_version()
    assert (version.docker_version, version.docker_api_version) == ("27.1.1", "1.46")


# --- built trees: fallbacks --------------------------------------------------------------------


def _put(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A host root with proc, sys and etc for a 2-socket machine."""
    proc, sys_, etc = tmp_path / "proc", tmp_path / "sys", tmp_path / "etc"
    _put(proc / "cpuinfo", (FIXTURES / "cpuinfo_2socket_ht").read_text())
    _put(proc / "meminfo", (FIXTURES / "meminfo").read_text())
    _put(proc / "sys/kernel/random/boot_id", "0b1d5a1c-6a52-4cfe-9b1c-1b8e2b0d7e11\n")
    _put(proc / "sys/kernel/osrelease", "6.1.0-18-amd64\n")
    _put(sys_ / "devices/system/cpu/online", "0-7\n")
    _put(sys_ / "class/dmi/id/product_uuid", "4c4c4544-0042-3510-8051-b4c04f384d32\n")
    net = sys_ / "class/net"
    for name, address, mtu, speed in [
        ("eth0", "52:54:00:12:34:56", "1500", "10000"),
        ("wlan0", "a4:c3:f0:11:22:33", "1500", "-1"),
        ("lo", "00:00:00:00:00:00", "65536", None),
        ("veth1a2b3c", "e2:4f:1c:00:00:01", "1500", "10000"),
        ("docker0", "02:42:ac:11:00:01", "1500", "-1"),
    ]:
        _put(net / name / "address", address + "\n")
        _put(net / name / "mtu", mtu + "\n")
        if speed is not None:
            _put(net / name / "speed", speed + "\n")
    _put(net / "bonding_masters", "\n")
    _put(etc / "machine-id", "0123456789abcdef0123456789abcdef\n")
    _put(etc / "os-release", (FIXTURES / "os-release").read_text())
    return tmp_path


def test_built_host_machine_info(host: Path) -> None:
    info = read_machine_info(host / "proc", host / "sys", host / "etc", hostname="node-7", now=NOW)
    assert (info.num_cores, info.num_physical_cores, info.num_sockets) == (8, 4, 2)
    assert info.cpu_frequency_khz == 3_700_000  # no cpufreq: cpuinfo's MHz
    assert info.memory_capacity_bytes == 24684084 * 1024
    assert info.swap_capacity_bytes == 2097148 * 1024
    assert info.machine_id == "0123456789abcdef0123456789abcdef"
    assert info.system_uuid == "4c4c4544-0042-3510-8051-b4c04f384d32"
    assert info.boot_id == "0b1d5a1c-6a52-4cfe-9b1c-1b8e2b0d7e11"
    assert info.hostname == "node-7"
    assert info.filesystems == []  # no mountinfo in the built proc
    assert [(d.name, d.mac_address, d.speed_mbps, d.mtu) for d in info.network_devices] == [
        ("eth0", "52:54:00:12:34:56", 10000, 1500),
        ("wlan0", "a4:c3:f0:11:22:33", None, 1500),
    ]
    assert info.cgroup_mode is None


def test_cpufreq_wins_over_cpuinfo(host: Path) -> None:
    _put(host / "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", "2100000\n")
    info = read_machine_info(host / "proc", host / "sys", host / "etc", hostname="h")
    assert info.cpu_frequency_khz == 2_100_000


def test_online_cpus_win_over_cpuinfo(host: Path) -> None:
    _put(host / "sys/devices/system/cpu/online", "0-3\n")
    info = read_machine_info(host / "proc", host / "sys", host / "etc", hostname="h")
    assert info.num_cores == 4


def test_arm64_topology_from_sysfs(host: Path) -> None:
    _put(host / "proc/cpuinfo", (FIXTURES / "cpuinfo_arm64").read_text())
    _put(host / "sys/devices/system/cpu/online", "0-3\n")
    for cpu in range(4):
        topology = host / f"sys/devices/system/cpu/cpu{cpu}/topology"
        _put(topology / "physical_package_id", f"{cpu // 2}\n")
        _put(topology / "core_id", f"{cpu % 2}\n")
    info = read_machine_info(host / "proc", host / "sys", host / "etc", hostname="h")
    assert (info.num_cores, info.num_physical_cores, info.num_sockets) == (4, 4, 2)
    assert info.cpu_frequency_khz is None


def test_machine_id_fallback_order(host: Path) -> None:
    proc, sys_, etc = host / "proc", host / "sys", host / "etc"
    assert read_machine_id(etc, sys_, proc) == "0123456789abcdef0123456789abcdef"
    _put(host / "var/lib/dbus/machine-id", "fedcba9876543210fedcba9876543210\n")
    (etc / "machine-id").write_text("uninitialized\n")  # systemd's first boot, machine-id(5)
    assert read_machine_id(etc, sys_, proc) == "fedcba9876543210fedcba9876543210"
    (etc / "machine-id").write_text("")  # an empty file is a valid "no id" bind-mount target
    assert read_machine_id(etc, sys_, proc) == "fedcba9876543210fedcba9876543210"
    (host / "var/lib/dbus/machine-id").unlink()
    assert read_machine_id(etc, sys_, proc) == "4c4c4544-0042-3510-8051-b4c04f384d32"
    (sys_ / "class/dmi/id/product_uuid").unlink()
    assert read_machine_id(etc, sys_, proc) == "0b1d5a1c-6a52-4cfe-9b1c-1b8e2b0d7e11"
    (proc / "sys/kernel/random/boot_id").unlink()
    assert read_machine_id(etc, sys_, proc) == ""


def test_machine_id_dbus_under_explicit_rootfs(host: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    (host / "etc/machine-id").unlink()
    elsewhere = tmp_path_factory.mktemp("rootfs")
    _put(elsewhere / "var/lib/dbus/machine-id", "aaaabbbbccccddddaaaabbbbccccdddd\n")
    info = read_machine_info(host / "proc", host / "sys", host / "etc", hostname="h", rootfs=elsewhere)
    assert info.machine_id == "aaaabbbbccccddddaaaabbbbccccdddd"


def test_empty_roots_never_raise(tmp_path: Path) -> None:
    empty = tmp_path / "nothing"
    info = read_machine_info(empty / "proc", empty / "sys", empty / "etc", now=NOW)
    assert info.num_cores == os.cpu_count()
    assert info.memory_capacity_bytes == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert info.hostname == socket.gethostname()
    assert (info.machine_id, info.boot_id, info.system_uuid) == ("", None, None)
    assert (info.swap_capacity_bytes, info.cpu_frequency_khz, info.num_sockets) == (None, None, None)
    assert (info.filesystems, info.network_devices) == ([], [])
    assert read_network_devices(empty / "sys") == []

    version = read_version_info(empty / "proc", empty / "etc", None, None)
    assert version.kernel_version == platform.release()
    assert version.os_version == "Linux"


def test_version_info_from_built_host(host: Path) -> None:
    version = read_version_info(host / "proc", host / "etc", None, None)
    assert version.kernel_version == "6.1.0-18-amd64"
    assert version.os_version == "Ubuntu 22.04.4 LTS"
    # Without etc/os-release the usr/lib copy under the rootfs is used.
    (host / "etc/os-release").unlink()
    _put(host / "usr/lib/os-release", (FIXTURES / "os-release.debian12").read_text())
    assert read_version_info(host / "proc", host / "etc", None, None).os_version == "Debian GNU/Linux 12 (bookworm)"
