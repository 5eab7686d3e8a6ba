"""The command line, run as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from exporter.models import ContainerStats
from tests.infra import workloads

ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).parent / "container-exporter"


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, text=True, timeout=60, cwd=ROOT, **kwargs)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


@pytest.mark.root
def test_once_prints_one_valid_record_per_container(tmp_path, make_cgroup):
    cg = make_cgroup()
    workloads.start_memory_hog(cg, 8)
    config = write_config(tmp_path, 'docker_endpoint = "unix:///nonexistent.sock"\n')
    result = cli("once", "--config", str(config))
    assert result.returncode == 0, result.stderr
    records = [ContainerStats.model_validate_json(line) for line in result.stdout.splitlines()]
    names = [r.container.name for r in records]
    assert len(names) == len(set(names))
    assert "/" in names and cg.name in names
    mine = next(r for r in records if r.container.name == cg.name)
    assert mine.seq == 1 and mine.memory.usage_bytes >= 8 * 1024 * 1024
    assert mine.processes.threads == 1
    root = next(r for r in records if r.container.name == "/")
    assert root.filesystem and any(fs.mountpoint == "/" and fs.capacity_bytes > 0 for fs in root.filesystem)
    assert root.network is not None  # the root container is the host: its interfaces


def test_console_script_and_module_agree():
    assert CONSOLE_SCRIPT.exists(), "pip install -e . should provide the console script"
    by_script = subprocess.run([str(CONSOLE_SCRIPT), "--version"], capture_output=True, text=True, timeout=30)
    by_module = cli("--version")
    assert by_script.returncode == by_module.returncode == 0
    assert by_script.stdout == by_module.stdout
    assert by_module.stdout.startswith("container-exporter ")


@pytest.mark.root
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_run_stops_cleanly_on_signal_and_flushes(tmp_path, signum):
    out = tmp_path / "stats.jsonl"
    config = write_config(
        tmp_path,
        'docker_endpoint = "unix:///nonexistent.sock"\nallow_dynamic_housekeeping = false\nlisten_ip = "127.0.0.1"\nport = 0\n'
        f'[sinks.jsonl]\npath = "{out}"\nbuffer_duration = "30s"\n',
    )
    proc = subprocess.Popen([sys.executable, "-m", "exporter", "run", "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3.5)
        assert proc.poll() is None, proc.stderr.read()
        # With a 30 s buffer nothing is written yet: the records are in the sink's queue.
        assert not out.exists() or out.stat().st_size == 0
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "stopping" in stderr and "Traceback" not in stderr
    seqs: dict[str, list[int]] = defaultdict(list)
    for line in out.read_text().splitlines():
        record = json.loads(line)
        if "event_type" in record:
            continue
        seqs[record["container"]["name"]].append(record["seq"])
    assert "/" in seqs and len(seqs["/"]) >= 2
    for name, got in seqs.items():
        assert got == list(range(1, len(got) + 1)), name


def test_check_config_explains_a_valid_file(tmp_path):
    config = write_config(tmp_path, 'housekeeping_interval = "5s"\n[sinks.jsonl]\npath = "/tmp/x.jsonl"\n')
    result = cli("check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert f"housekeeping_interval = 5s    [{config}]" in result.stdout
    assert "storage_duration = 2m    [default]" in result.stdout
    assert f"sinks.jsonl.path = /tmp/x.jsonl    [{config}]" in result.stdout
    assert "Interval between housekeeping" in result.stdout


def test_check_config_rejects_a_bad_file(tmp_path):
    config = write_config(tmp_path, 'housekeeping_interval = "soon"\nmystery = 1\n')
    result = cli("check-config", str(config))
    assert result.returncode == 2
    assert f"{config}: key 'housekeeping_interval': expected a duration" in result.stderr
    assert f"{config}: unknown key 'mystery'" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_bad_environment_override_fails_clearly(tmp_path):
    env = dict(os.environ, CONTAINER_EXPORTER_STORAGE_DURATION="forever")
    result = cli("run", env=env)
    assert result.returncode == 2
    assert "environment variable CONTAINER_EXPORTER_STORAGE_DURATION: key 'storage_duration'" in result.stderr
