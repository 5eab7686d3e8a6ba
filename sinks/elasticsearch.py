"""Elasticsearch / OpenSearch sink: bulk indexing with the official client, record_id as _id."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from exporter.durations import StrList
from sinks.settings import DeliverySettings


class ElasticsearchSettings(DeliverySettings):
    hosts: StrList = Field(default_factory=lambda: ["http://localhost:9200"], description="Node URLs.")
    index: str = Field("container-stats-%Y.%m.%d", description="Index for stats, strftime pattern of the record's UTC timestamp; the data stream's name in data_stream mode.")
    events_index: str = Field("container-events-%Y.%m.%d", description="Index for container events, same rules.")
    data_stream: bool = Field(False, description="Write to data streams (op_type create, @timestamp) instead of dated indices.")
    install_template: bool = Field(True, description="Install an index template with explicit mappings at start.")
    template_name: str = Field("container-exporter", description="Name of the index templates installed.")
    compatibility: Literal["elasticsearch", "opensearch"] = Field("elasticsearch", description="opensearch: talk to OpenSearch (plain JSON media type, no product check).")
    api_key: str | None = Field(None, description="Elasticsearch API key (base64 id:key).")
    username: str | None = Field(None, description="Basic auth user.")
    password: str | None = Field(None, description="Basic auth password.")
    bearer_token: str | None = Field(None, description="Bearer token.")
    ca_certs: str | None = Field(None, description="CA bundle for the nodes' certificates.")
    verify_certs: bool = Field(True, description="Verify the nodes' TLS certificates.")
