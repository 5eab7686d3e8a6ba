"""The text parsers of exporter/cgroups/, on fixture files, hand-written kernel text and this
machine's real /proc and /sys files."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exporter.cgroups import v1, v2
from exporter.cgroups.files import (
    MalformedFile,
    first_pid,
    parse_flat_keyed,
    parse_int,
    parse_int_list,
    parse_pressure,
    read_bytes,
)
from exporter.cgroups.procs import parse_net_dev, task_state
from exporter.models import NetworkInterface

FIXTURES = Path(__file__).parent / "fixtures" / "cgroups"
HYBRID = FIXTURES / "v1-hybrid"
T1 = "docker/a5fc32924e9b0a5fec8adb6e915a7cc886bdf3fc32b7225f89cda5a520553cf5"
V2_A = FIXTURES / "v2" / "system.slice" / "docker-3d18070d6c34.scope"


def fixture(path: Path) -> bytes:
    return path.read_bytes()


# ---------------------------------------------------------------- files.py


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"67108864\n", 67108864),
        (b"0\n", 0),
        (b"max\n", None),  # v2 "no limit"
        (b"9223372036854771712\n", None),  # v1 PAGE_COUNTER_MAX * 4096
        (b"9223372036854775807\n", None),  # 2**63 - 1 on older kernels
        (b"4611686018427387903\n", 4611686018427387903),  # just below the threshold: a real number
        (b"-1\n", -1),  # callers (v1._read_int) map cpu.cfs_quota_us -1 to None themselves
    ],
)
def test_parse_int(text, expected):
    assert parse_int(text, "f") == expected


@pytest.mark.parametrize("text", [b"", b"\n", b"  \n"])
def test_parse_int_empty_is_malformed_and_names_the_file(text):
    with pytest.raises(MalformedFile) as info:
        parse_int(text, "/x/memory.usage_in_bytes")
    assert info.value.path == "/x/memory.usage_in_bytes"
    assert "empty" in info.value.reason


def test_parse_int_garbage_is_malformed():
    with pytest.raises(MalformedFile, match="expected an integer"):
        parse_int(b"12 34\n", "f")


def test_parse_flat_keyed_on_captured_v1_memory_stat():
    stat = parse_flat_keyed(fixture(HYBRID / "memory" / T1 / "memory.stat"), "memory.stat")
    assert len(stat) == 42  # 21 local keys + hierarchical_memory_limit/memsw_limit + 19 total_ keys
    assert stat["rss"] == 57344
    assert stat["total_rss"] == 57344
    assert stat["total_inactive_file"] == 0
    assert stat["hierarchical_memory_limit"] == 67108864
    assert stat["total_pgfault"] == 1152


def test_parse_flat_keyed_on_v2_memory_stat_and_events():
    stat = parse_flat_keyed(fixture(V2_A / "memory.stat"))
    assert stat["anon"] == 4795621376
    assert stat["inactive_file"] == 1589248
    assert stat["thp_swpout_fallback"] == 209
    events = parse_flat_keyed(fixture(V2_A / "memory.events"))
    assert events == {
        "low": 0, "high": 0, "max": 0, "oom": 0, "oom_kill": 0, "oom_group_kill": 0, "sock_throttled": 0,
    }


def test_parse_flat_keyed_skips_blank_lines():
    assert parse_flat_keyed(b"a 1\n\nb 2\n") == {"a": 1, "b": 2}


@pytest.mark.parametrize("line", [b"total_inactive_file", b"rss 1 2", b"rss x"])
def test_parse_flat_keyed_malformed_line(line):
    with pytest.raises(MalformedFile) as info:
        parse_flat_keyed(b"cache 0\n" + line + b"\n", "/m/memory.stat")
    assert info.value.path == "/m/memory.stat"
    assert line.split()[0].decode() in info.value.reason


def test_parse_int_list_on_captured_usage_percpu_with_trailing_space():
    data = fixture(HYBRID / "cpuacct" / T1 / "cpuacct.usage_percpu")
    assert data.endswith(b" \n")  # the kernel prints "%llu " per cpu
    assert parse_int_list(data) == [3281165771, 2129627644]


def test_parse_int_list_malformed():
    with pytest.raises(MalformedFile):
        parse_int_list(b"1 2 x\n", "f")


@pytest.mark.parametrize(
    ("data", "expected"),
    [(b"2590\n", 2590), (b"3713\n4045\n", 3713), (b"12", 12), (b"", None), (b"\n", None)],
)
def test_first_pid(data, expected):
    assert first_pid(data) == expected


def test_read_bytes_missing_file_is_none(tmp_path):
    assert read_bytes(tmp_path / "nope") is None
    (tmp_path / "f").write_bytes(b"x\n")
    assert read_bytes(tmp_path / "f") == b"x\n"


# ---------------------------------------------------------------- PSI


def test_parse_pressure_with_full_line():
    parsed = parse_pressure(fixture(HYBRID / "unified" / T1 / "cpu.pressure"))
    assert parsed == {
        "some": {"avg10": 0.31, "avg60": 0.25, "avg300": 0.16, "total_us": 3896205},
        "full": {"avg10": 0.31, "avg60": 0.25, "avg300": 0.16, "total_us": 3895014},
    }
    assert isinstance(parsed["some"]["total_us"], int)


def test_parse_pressure_without_full_line():
    # cpu.pressure before Linux 5.13 has only the "some" line.
    parsed = parse_pressure(b"some avg10=1.50 avg60=0.75 avg300=0.20 total=123456\n")
    assert parsed == {"some": {"avg10": 1.5, "avg60": 0.75, "avg300": 0.2, "total_us": 123456}}


@pytest.mark.parametrize(
    "text",
    [
        b"some avg10=0.00 avg60=0.00 total=1\n",  # avg300 missing
        b"some avg10=0.00 avg60 avg300=0.00 total=1\n",  # no '='
        b"some avg10=x avg60=0.00 avg300=0.00 total=1\n",
        b"some avg10=0.00 avg60=0.00 avg300=0.00 total=1.5\n",  # total is an integer (us)
    ],
)
def test_parse_pressure_malformed(text):
    with pytest.raises(MalformedFile):
        parse_pressure(text, "cpu.pressure")


def test_parse_pressure_on_real_proc_pressure_cpu():
    path = Path("/proc/pressure/cpu")
    if not path.exists():
        pytest.skip("kernel without PSI")
    first = parse_pressure(path.read_bytes(), str(path))
    time.sleep(0.05)
    second = parse_pressure(path.read_bytes(), str(path))
    assert "some" in first
    for kind, values in first.items():
        assert kind in ("some", "full")
        assert set(values) == {"avg10", "avg60", "avg300", "total_us"}
        assert all(0.0 <= values[k] <= 100.0 for k in ("avg10", "avg60", "avg300"))
        assert isinstance(values["total_us"], int)
    # total is a cumulative stall time in microseconds
    assert second["some"]["total_us"] >= first["some"]["total_us"]


# ---------------------------------------------------------------- v1


def test_parse_blkio_two_devices_ignores_sync_async_discard_total():
    data = fixture(FIXTURES / "v1-edge" / "blkio" / "edge" / "unlimited" / "blkio.throttle.io_service_bytes_recursive")
    assert v1.parse_blkio(data) == {
        (8, 16): (4223325184, 3207528448),
        (8, 0): (5246572032, 2361737216),
    }


def test_parse_blkio_no_io_yet():
    # What every cgroup on this host shows: only the grand total line.
    assert v1.parse_blkio(fixture(HYBRID / "blkio" / T1 / "blkio.throttle.io_service_bytes_recursive")) == {}


def test_parse_blkio_malformed_device():
    with pytest.raises(MalformedFile):
        v1.parse_blkio(b"8:x Read 1\n", "blkio")


# ---------------------------------------------------------------- v2


def test_parse_io_stat_documented_example():
    # Documentation/admin-guide/cgroup-v2.rst, io.stat
    data = (
        b"8:16 rbytes=1459200 wbytes=314773504 rios=192 wios=353 dbytes=0 dios=0\n"
        b"8:0 rbytes=90430464 wbytes=299008000 rios=8950 wios=1252 dbytes=50331648 dios=3021\n"
    )
    assert v2.parse_io_stat(data) == {
        (8, 16): (1459200, 314773504, 192, 353),
        (8, 0): (90430464, 299008000, 8950, 1252),
    }


def test_parse_io_stat_several_devices_with_iocost_usage():
    assert v2.parse_io_stat(fixture(V2_A / "io.stat")) == {
        (8, 16): (1459200, 314773504, 192, 353),
        (8, 0): (90430464, 299008000, 8950, 1252),
        (253, 0): (7184384, 4132864, 56, 715),
    }


def test_parse_io_stat_root_with_iocost_vrate():
    """BUG: with iocost enabled the root cgroup's io.stat carries "cost.vrate=100.00"
    (block/blk-iocost.c ioc_pd_stat, printed for iocg->level == 0), which is not an integer;
    the parser rejects the whole file instead of ignoring keys it does not use."""
    data = fixture(FIXTURES / "v2" / "io.stat")
    assert v2.parse_io_stat(data, "io.stat") == {
        (8, 16): (2918400, 629547008, 384, 706),
        (8, 0): (180860928, 598016000, 17900, 2504),
    }


def test_parse_io_stat_malformed():
    with pytest.raises(MalformedFile):
        v2.parse_io_stat(b"rbytes=1 wbytes=2\n", "io.stat")
    with pytest.raises(MalformedFile):
        v2.parse_io_stat(b"8:x rbytes=1\n", "io.stat")
    with pytest.raises(MalformedFile):
        v2.parse_io_stat(b"8:0 rbytes=x\n", "io.stat")


@pytest.mark.parametrize(
    ("text", "expected"),
    [(b"max 100000\n", (None, 100000)), (b"50000 100000\n", (50000, 100000)), (b"150000 50000\n", (150000, 50000))],
)
def test_parse_cpu_max(text, expected):
    assert v2.parse_cpu_max(text) == expected


@pytest.mark.parametrize("text", [b"max\n", b"", b"x 100000\n", b"max max\n", b"1 2 3\n"])
def test_parse_cpu_max_malformed(text):
    with pytest.raises(MalformedFile):
        v2.parse_cpu_max(text, "cpu.max")


@pytest.mark.parametrize(
    ("weight", "shares"),
    # 2 + (w - 1) * 262142 // 9999: the ends of the ranges map onto each other
    [(1, 2), (10000, 262144), (100, 2597), (20, 500), (39, 998)],
)
def test_weight_to_shares(weight, shares):
    assert v2.weight_to_shares(weight) == shares


# ---------------------------------------------------------------- procs

NET_DEV = (
    b"Inter-|   Receive                                                |  Transmit\n"
    b" face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n"
    b"    lo:  309768    2877    0    0    0     0          0         0   309768    2877    0    0    0     0       0          0\n"
    b" ens18: 399359737  134952    3 5957    0     0          0         0 37143523   93516    1    2    0     0       0          0\n"
    b"  eth0:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n"
)


def interfaces(data: bytes, path: str = "?") -> list[NetworkInterface]:
    return [NetworkInterface(**fields) for fields in parse_net_dev(data, path)]


def test_parse_net_dev_skips_loopback_and_maps_columns():
    ifaces = interfaces(NET_DEV)
    assert [i.name for i in ifaces] == ["ens18", "eth0"]
    ens = ifaces[0]
    assert (ens.rx_bytes, ens.rx_packets, ens.rx_errors, ens.rx_dropped) == (399359737, 134952, 3, 5957)
    assert (ens.tx_bytes, ens.tx_packets, ens.tx_errors, ens.tx_dropped) == (37143523, 93516, 1, 2)


def test_parse_net_dev_custom_skip():
    assert [i["name"] for i in parse_net_dev(NET_DEV, skip=frozenset())] == ["lo", "ens18", "eth0"]


def test_parse_net_dev_malformed():
    header = NET_DEV.split(b"\n", 2)
    with pytest.raises(MalformedFile, match="16 counters"):
        parse_net_dev(header[0] + b"\n" + header[1] + b"\n  eth0: 1 2 3\n", "net/dev")
    with pytest.raises(MalformedFile, match="iface"):
        parse_net_dev(header[0] + b"\n" + header[1] + b"\n  eth0 1 2 3\n", "net/dev")


def _sysfs_counters(names: list[str]) -> dict[str, tuple[int, ...]]:
    out = {}
    for name in names:
        base = Path("/sys/class/net") / name / "statistics"
        out[name] = tuple(
            int((base / f).read_text())
            for f in ("rx_bytes", "rx_packets", "rx_errors", "rx_dropped",
                      "tx_bytes", "tx_packets", "tx_errors", "tx_dropped")
        )
    return out


def test_parse_net_dev_on_real_proc_matches_sysfs():
    """/proc/self/net/dev and /sys/class/net/*/statistics come from the same dev_get_stats(); read
    sysfs, net/dev, sysfs back to back and the net/dev figure lies between the two sysfs ones."""
    for _attempt in range(5):
        sys_names = sorted(n for n in os.listdir("/sys/class/net") if n != "lo")
        try:
            before = _sysfs_counters(sys_names)
            parsed = interfaces(Path("/proc/self/net/dev").read_bytes(), "/proc/self/net/dev")
            after = _sysfs_counters(sys_names)
        except FileNotFoundError:
            continue  # an interface went away (a container stopped): try again
        if sorted(i.name for i in parsed) == sys_names:
            break
    else:
        pytest.fail("the interface list kept changing")
    assert "lo" not in [i.name for i in parsed]
    assert parsed, "no interface besides lo"
    for iface in parsed:
        got = (iface.rx_bytes, iface.rx_packets, iface.rx_errors, iface.rx_dropped,
               iface.tx_bytes, iface.tx_packets, iface.tx_errors, iface.tx_dropped)
        for low, value, high in zip(before[iface.name], got, after[iface.name], strict=True):
            assert low <= value <= high, (iface.name, before[iface.name], got, after[iface.name])


@pytest.mark.parametrize(
    ("stat", "state"),
    [
        (b"2590 (yes) S 2567 2590 2590 0 -1 4194560 1087 0 0 0 462 54\n", b"S"),
        (b"42 (tmux: server) R 1 42 42 0 -1\n", b"R"),
        # A command name may hold spaces and ")" (it is 15 bytes the process chose):
        (b"77 (a) R (b) S 1 77 77 0 -1\n", b"S"),
        (b"78 (x) ) ) D 1 78 78 0 -1\n", b"D"),
        (b"79 ()) Z 1 79 79 0 -1\n", b"Z"),
    ],
)
def test_task_state(stat, state):
    assert task_state(stat) == state


def test_task_state_on_a_real_process_named_to_confuse_parsers():
    # The child renames itself (prctl PR_SET_NAME through /proc/self/comm) to "a) R (b c", then
    # blocks: its /proc/<pid>/stat reads "<pid> (a) R (b c) S ...".
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; open('/proc/self/comm', 'w').write('a) R (b c'); print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        # Wait until /proc/<pid>/status (one "State:" line, no name to trip on) says it sleeps.
        status = Path(f"/proc/{child.pid}/status")
        deadline = time.monotonic() + 5
        while b"State:\tS" not in status.read_bytes():
            assert time.monotonic() < deadline, "child never blocked on stdin"
            time.sleep(0.01)
        stat = Path(f"/proc/{child.pid}/stat").read_bytes()
        assert stat.startswith(f"{child.pid} (a) R (b c) S ".encode())
        assert task_state(stat) == b"S"
    finally:
        child.kill()
        child.wait()
