"""Storage driver name → its settings model and sink class.

Settings modules import only pydantic; a driver's client library is imported when the sink is
built, so a missing optional library fails only for a driver that is configured.
"""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model

from sinks.protocol import MissingDependency  # noqa: F401 - where callers look for it

# name → (module, settings class, sink class)
DRIVERS: dict[str, tuple[str, str, str]] = {
    "jsonl": ("sinks.jsonl", "JsonlSettings", "JsonlSink"),
    "stdout": ("sinks.jsonl", "StdoutSettings", "StdoutSink"),
    "influxdb": ("sinks.influxdb", "InfluxDBSettings", "InfluxDBSink"),
    "kafka": ("sinks.kafka", "KafkaSettings", "KafkaSink"),
    "elasticsearch": ("sinks.elasticsearch", "ElasticsearchSettings", "ElasticsearchSink"),
}


def settings_model(name: str) -> type[BaseModel]:
    module, settings_cls, _ = DRIVERS[name]
    return getattr(importlib.import_module(module), settings_cls)


def sink_class(name: str) -> Any:
    module, _, sink_cls = DRIVERS[name]
    return getattr(importlib.import_module(module), sink_cls)


SinksConfig = create_model(  # type: ignore[call-overload]
    "SinksConfig",
    __config__=ConfigDict(extra="forbid", frozen=True),
    **{name: (settings_model(name) | None, None) for name in DRIVERS},
)
