"""The deployment files: compose file, its config, the Grafana dashboard's queries."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import yaml  # type: ignore[import-untyped]

from exporter.config import load_config
from exporter.models import Event
from sinks.influxdb import InfluxDBSettings, LineEncoder
from tests.records import collect_host_records

ROOT = Path(__file__).resolve().parent.parent


def test_compose_file_is_valid_and_wires_the_stack():
    result = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr + "\n(docker-compose comes from `make setup`)"
    compose = yaml.safe_load(result.stdout)
    services = compose["services"]
    assert {"exporter", "influxdb", "kafka", "elasticsearch", "grafana", "kibana", "consumer"} <= set(services)
    exporter = services["exporter"]
    volumes = " ".join(str(v) for v in exporter["volumes"])
    for mount in ("/sys/fs/cgroup", "/var/run/docker.sock", "/rootfs", "config.compose.toml"):
        assert mount in volumes
    for store in ("influxdb", "kafka", "elasticsearch"):
        assert exporter["depends_on"][store]["condition"] == "service_healthy"
        assert "healthcheck" in services[store]
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper


def test_compose_config_is_valid_for_the_exporter():
    config = load_config(ROOT / "config.compose.toml", environ={})
    assert config.storage_driver == ["influxdb", "kafka", "elasticsearch"]
    assert config.sink_settings("influxdb").url == "http://influxdb:8086"
    result = subprocess.run([sys.executable, "-m", "exporter", "check-config", str(ROOT / "config.compose.toml")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_dashboard_queries_name_what_the_influxdb_sink_writes():
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "containers.json").read_text())
    queries = [t["query"] for p in dashboard["panels"] for t in p["targets"]]
    wanted = set()
    for q in queries:
        for measurement, field in re.findall(r'r\._measurement == "([a-z_]+)" and r\._field == "([a-z_]+)"', q):
            wanted.add((measurement, field))
    assert {m for m, _ in wanted} >= {"container_cpu", "container_memory", "container_network", "container_diskio", "container_events"}
    # What the sink really writes for this host's records and an OOM event.
    records = collect_host_records()
    event = Event(
        record_id="e1", machine_id="m", hostname="h", container_name="/x", timestamp=datetime.now(UTC), event_type="oomKill"
    )
    lines = LineEncoder(InfluxDBSettings()).encode([*records, event])
    written = set()
    for line in lines:
        head, fields, _ = re.split(r"(?<!\\) ", line, maxsplit=2)
        measurement = head.split(",", 1)[0]
        for item in re.split(r"(?<!\\),", fields):
            written.add((measurement, item.split("=", 1)[0]))
    missing = {pair for pair in wanted if pair not in written and pair[0] != "container_diskio"}
    assert not missing, f"the dashboard asks for fields the sink does not write: {missing}"
    # diskio needs a device with I/O; its field names are the record's
    assert {("container_diskio", "read_bytes"), ("container_diskio", "write_bytes")} <= wanted
