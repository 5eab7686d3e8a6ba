"""The Docker image, built and run for real.

Nothing can be pulled here, so the base image is made locally: a Debian rootfs by debootstrap
(python3 and its venv module included), imported with `docker import`. The exporter's wheels
are made on the host (`pip wheel`) and installed with WHEELS=local, as the Dockerfile documents
for builds without an index.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import docker.errors
import pytest

from tests.infra.docker import run_container
from tests.infra.procs import free_port

pytestmark = [pytest.mark.root, pytest.mark.docker]

ROOT = Path(__file__).resolve().parent.parent
BASE_TAG = "container-exporter-test/base:bookworm"
IMAGE_TAG = "container-exporter-test/exporter:latest"
MIRROR = "http://deb.debian.org/debian"


def base_image(client: docker.DockerClient) -> str:
    try:
        client.images.get(BASE_TAG)
        return BASE_TAG
    except docker.errors.ImageNotFound:
        pass
    with tempfile.TemporaryDirectory(prefix="ce-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm", str(rootfs), MIRROR],
            check=True, capture_output=True, timeout=900,
        )
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", BASE_TAG], stdin=tar.stdout, check=True, capture_output=True, timeout=600)
        tar.wait()
    return BASE_TAG


@pytest.fixture(scope="module")
def image(docker_engine) -> str:
    base = base_image(docker_engine.client)
    with tempfile.TemporaryDirectory(prefix="ce-build-") as tmp:
        context = Path(tmp)
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
        for name in files:
            target = context / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(context / "wheelhouse"), ".[all]"],
            cwd=context, check=True, capture_output=True, timeout=900,
        )
        build = subprocess.run(
            ["docker", "build", "--build-arg", f"BASE_IMAGE={base}", "--build-arg", "WHEELS=local", "-t", IMAGE_TAG, "."],
            cwd=context, capture_output=True, text=True, timeout=900,
        )
        assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return IMAGE_TAG


def test_final_stage_has_no_sources_or_build_tools(image, docker_engine):
    out = docker_engine.client.containers.run(
        image, entrypoint=["sh", "-c", "ls /src 2>&1; command -v gcc cc pip pip3 || echo no-tools; container-exporter --version"],
        remove=True,
    ).decode()
    assert "No such file" in out  # the build stage's sources stayed there
    assert "no-tools" in out
    assert "container-exporter 0.1.0" in out
    attrs = docker_engine.client.api.inspect_image(image)
    assert attrs["Config"]["Healthcheck"]["Test"][-1].find("/healthz") > 0


def test_image_exports_a_busybox_container_and_answers_healthz(image, docker_engine, busybox_image, make_container, tmp_path):
    client = docker_engine.client
    port = free_port()
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "config.toml").write_text(
        f'port = {port}\nlisten_ip = "127.0.0.1"\nstate_dir = "/tmp/state"\ndocker_only = true\n'
        f'[sinks.jsonl]\npath = "/out/stats.jsonl"\nbuffer_duration = "200ms"\n'
    )
    name = f"ce-image-{uuid.uuid4().hex[:8]}"
    # the documented run line, on the host network (the test dockerd has no bridge)
    exporter = run_container(
        client, image, ["run", "--config", "/etc/container-exporter/config.toml"],
        name=f"ce-exporter-{uuid.uuid4().hex[:8]}",
        network_mode="host",
        volumes={
            "/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "ro"},
            docker_engine.endpoint.removeprefix("unix://"): {"bind": "/var/run/docker.sock", "mode": "ro"},
            "/": {"bind": "/rootfs", "mode": "ro"},
            str(tmp_path / "config.toml"): {"bind": "/etc/container-exporter/config.toml", "mode": "ro"},
            str(out): {"bind": "/out", "mode": "rw"},
        },
        devices=["/dev/kmsg"],
        cap_add=["SYSLOG"],
    )
    try:
        target = make_container(busybox_image, ["sleep", "3600"], name=name, labels={"demo": "image-test"})
        stats = out / "stats.jsonl"

        def mine() -> list[dict]:
            if not stats.exists():
                return []
            return [r for r in map(json.loads, stats.read_text().splitlines()) if name in r["container"]["aliases"]]

        deadline = time.monotonic() + 60
        while len(mine()) < 2 and time.monotonic() < deadline:
            exporter.reload()
            assert exporter.status == "running", exporter.logs().decode()[-3000:]
            time.sleep(0.5)
        records = mine()
        assert len(records) >= 2, exporter.logs().decode()[-3000:]
        assert records[0]["container"]["id"] == target.id
        assert records[0]["container"]["labels"]["demo"] == "image-test"
        # the host's machine id, read through /rootfs
        assert records[0]["machine_id"] == Path("/etc/machine-id").read_text().strip()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            assert response.status == 200
            assert json.loads(response.read())["status"] in ("ok", "healthy")
    finally:
        exporter.stop(timeout=20)
        logs = exporter.logs().decode()
        exporter.remove(force=True)
    assert "Traceback" not in logs, logs[-3000:]
