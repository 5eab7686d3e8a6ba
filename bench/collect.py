"""Collection cost: CPU per container-sample and peak RSS of `container-exporter run`.

Creates N real cgroups (half with a sleeping process), runs the exporter on them at a 1 s
housekeeping interval with the jsonl sink on, and reports

  * exporter CPU time per container-sample (µs), from /proc/<pid>/stat over the window,
    divided by the records the jsonl sink wrote in that window;
  * the exporter's peak RSS (VmHWM);
  * the floor: a bare Python loop that re-reads (pread at offset 0) and parses the same cgroup
    files through descriptors kept open, and the same loop re-opening every file.

Needs root. Usage: python bench/collect.py [--counts 100 1000] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.cgroups.layout import CgroupLayout, detect_layout, join  # noqa: E402
from exporter.cgroups.procs import ProcReader  # noqa: E402
from exporter.cgroups.reader import METRIC_KINDS, ContainerReader, DeviceNames  # noqa: E402

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "/cebench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def hierarchy_dirs(layout: CgroupLayout, name: str) -> list[Path]:
    dirs = [join(p, name) for p in layout.discovery_roots()]
    if layout.unified is not None and layout.mode == "hybrid":
        dirs.append(join(layout.unified, name))
    return dirs


def make_cgroups(layout: CgroupLayout, n: int) -> tuple[list[str], list[subprocess.Popen[bytes]]]:
    names = [f"{PARENT}/c{i:04d}" for i in range(n)]
    for d in hierarchy_dirs(layout, PARENT):
        d.mkdir(exist_ok=True)
        if (d / "cpuset.cpus").exists():
            (d / "cpuset.cpus").write_text((d.parent / "cpuset.cpus").read_text())
            (d / "cpuset.mems").write_text((d.parent / "cpuset.mems").read_text())
    procs = []
    for i, name in enumerate(names):
        for d in hierarchy_dirs(layout, name):
            d.mkdir(exist_ok=True)
            if (d / "cpuset.cpus").exists():
                (d / "cpuset.cpus").write_text((d.parent / "cpuset.cpus").read_text())
                (d / "cpuset.mems").write_text((d.parent / "cpuset.mems").read_text())
        if i % 2 == 0:
            p = subprocess.Popen(["sleep", "100000"])
            for d in hierarchy_dirs(layout, name):
                (d / "cgroup.procs").write_text(str(p.pid))
            procs.append(p)
    return names, procs


def remove_cgroups(layout: CgroupLayout, names: list[str], procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()
    for name in [*names, PARENT]:
        for d in hierarchy_dirs(layout, name):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)


def proc_cpu_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def count_lines(path: Path) -> int:
    total = 0
    for p in path.parent.glob(path.name + "*"):
        with open(p, "rb") as f:
            total += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    return total


def run_exporter(n: int, seconds: float, workdir: Path) -> dict[str, float]:
    out = workdir / "stats.jsonl"
    config = workdir / "bench.toml"
    config.write_text(
        f"""
housekeeping_interval = "1s"
allow_dynamic_housekeeping = false
global_housekeeping_interval = "1m"
docker_only = true
raw_cgroup_prefix_whitelist = ["{PARENT}/"]
storage_driver = ["jsonl"]
log_level = "WARNING"
[sinks.jsonl]
path = "{out}"
max_bytes = 10000000000
"""
    )
    proc = subprocess.Popen([sys.executable, "-m", "exporter", "run", "--config", str(config)], cwd=ROOT)
    try:
        # Let discovery finish and every job pass its first (splayed) run.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(1)
            if out.exists() and count_lines(out) >= 3 * n:
                break
        time.sleep(2)
        lines0, cpu0, t0 = count_lines(out), proc_cpu_s(proc.pid), time.monotonic()
        time.sleep(seconds)
        lines1, cpu1, t1 = count_lines(out), proc_cpu_s(proc.pid), time.monotonic()
        hwm = proc_hwm_kib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    samples = lines1 - lines0
    user_s, system_s = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    return {
        "samples": samples,
        "samples_per_s": samples / (t1 - t0),
        "cpu_us_per_sample": (user_s + system_s) / samples * 1e6 if samples else float("nan"),
        "user_us_per_sample": user_s / samples * 1e6 if samples else float("nan"),
        "system_us_per_sample": system_s / samples * 1e6 if samples else float("nan"),
        "cpu_pct": 100 * (user_s + system_s) / (t1 - t0),
        "peak_rss_mib": hwm / 1024,
        "exit_code": proc.returncode,
    }


def floor(layout: CgroupLayout, names: list[str], rounds: int) -> dict[str, float]:
    """The same cgroup files our reader opens, re-read and parsed by a bare loop."""
    proc = ProcReader("/proc")
    paths: list[str] = []
    for name in names:
        reader = ContainerReader(layout, name, proc, DeviceNames(), METRIC_KINDS, lambda *_: None)
        paths += [f.path for f in reader.cgroup.files()] + [f.path for _, f in reader._psi]
        reader.close()
    files_per_container = len(paths) / len(names)

    def number(token: bytes) -> int | float:
        return float(token) if b"." in token else int(token)

    def parse(data: bytes) -> object:
        # What any reader has to do: lines → fields, numbers (bare or key=value) → int/float.
        out = []
        for line in data.splitlines():
            fields: list[object] = []
            for token in line.split():
                key, sep, value = token.partition(b"=")
                if sep:
                    fields.append((key, number(value)))
                elif token[:1].isdigit():
                    fields.append(number(token))
                else:
                    fields.append(token)
            out.append(fields)
        return out

    fds = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        start = time.process_time()
        for _ in range(rounds):
            for fd in fds:
                parse(os.pread(fd, 65536, 0))
        kept_open = (time.process_time() - start) / (rounds * len(names)) * 1e6
    finally:
        for fd in fds:
            os.close(fd)
    start = time.process_time()
    for _ in range(rounds):
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                parse(f.read())
    reopened = (time.process_time() - start) / (rounds * len(names)) * 1e6
    return {"files_per_container": files_per_container, "kept_open_us": kept_open, "reopen_us": reopened}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--floor-rounds", type=int, default=20)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/collect.py needs root (it creates cgroups)", file=sys.stderr)
        return 2
    layout = detect_layout(CGROUP_ROOT)
    results = []
    for n in args.counts:
        names, procs = make_cgroups(layout, n)
        workdir = Path(tempfile.mkdtemp(prefix="cebench-"))
        try:
            fl = floor(layout, names, args.floor_rounds)
            ex = run_exporter(n, args.seconds, workdir)
        finally:
            remove_cgroups(layout, names, procs)
            shutil.rmtree(workdir, ignore_errors=True)
        row = {"containers": n, "cgroup_mode": layout.mode, **ex, **fl}
        row["ratio_to_floor"] = ex["cpu_us_per_sample"] / fl["kept_open_us"]
        results.append(row)
        print(
            f"{n:5d} containers ({layout.mode}, {fl['files_per_container']:.0f} files each): "
            f"exporter {ex['cpu_us_per_sample']:.0f} µs CPU per container-sample "
            f"(user {ex['user_us_per_sample']:.0f} + system {ex['system_us_per_sample']:.0f}; "
            f"{ex['samples_per_s']:.0f} samples/s, {ex['cpu_pct']:.1f}% of a core), peak RSS {ex['peak_rss_mib']:.0f} MiB | "
            f"floor {fl['kept_open_us']:.0f} µs (kept open), {fl['reopen_us']:.0f} µs (re-opened) | "
            f"{row['ratio_to_floor']:.2f}x floor",
            flush=True,
        )
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
