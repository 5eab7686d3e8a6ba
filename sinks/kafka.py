"""Kafka sink: one JSON message per record, keyed by container id, over kafka-python."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from exporter.durations import StrList
from sinks.settings import DeliverySettings


class KafkaSettings(DeliverySettings):
    bootstrap_servers: StrList = Field(default_factory=lambda: ["localhost:9092"], description="host:port of one or more brokers.")
    topic: str = Field("container-stats", description="Topic for stats records.")
    events_topic: str = Field("container-events", description="Topic for container events.")
    client_id: str = Field("container-exporter", description="Client id the brokers see.")
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field("none", description="Message compression.")
    tls: bool = Field(False, description="Connect with TLS; the server certificate is verified unless insecure is set.")
    tls_ca: str | None = Field(None, description="CA bundle for the brokers' certificates.")
    tls_cert: str | None = Field(None, description="Client certificate (mutual TLS).")
    tls_key: str | None = Field(None, description="Client key (mutual TLS).")
    insecure: bool = Field(False, description="Do not verify the brokers' certificates (never the default).")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(None, description="SASL mechanism; none by default.")
    sasl_username: str | None = Field(None, description="SASL user.")
    sasl_password: str | None = Field(None, description="SASL password.")
