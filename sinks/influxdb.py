"""InfluxDB sink: line protocol over influxdb-client, to the v2 API or to InfluxDB 1.x's /write."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from exporter.durations import StrList
from sinks.settings import DeliverySettings


class InfluxDBSettings(DeliverySettings):
    api: Literal["v1", "v2"] = Field("v2", description="v2: /api/v2/write with org, bucket and token; v1: InfluxDB 1.x /write with database and retention policy.")
    url: str = Field("http://localhost:8086", description="Base URL of the server.")
    token: str | None = Field(None, description="v2 API token.")
    org: str | None = Field(None, description="v2 organisation.")
    bucket: str = Field("container-stats", description="v2 bucket.")
    database: str = Field("cadvisor", description="v1 database.")
    retention_policy: str | None = Field(None, description="v1 retention policy (default: the database's).")
    username: str | None = Field(None, description="v1 user.")
    password: str | None = Field(None, description="v1 password.")
    layout: Literal["default", "cadvisor"] = Field("default", description="default: one measurement per stat group (container_cpu, container_memory, ...); cadvisor: cAdvisor's series (one measurement per metric, field value, tags machine and container_name).")
    container_id_as_tag: bool = Field(False, description="Make the container id a tag (one series per container instance) instead of a field.")
    label_tags: StrList = Field(default_factory=list, description="Container labels written as tags (label_<name>).")
    gzip: bool = Field(True, description="Compress write requests.")
    verify_ssl: bool = Field(True, description="Verify the server's TLS certificate.")
    ssl_ca_cert: str | None = Field(None, description="CA bundle for the server's certificate.")
