"""Configuration: a TOML file and ``CONTAINER_EXPORTER_*`` environment variables → pydantic models.

Unknown keys are errors. Every error names the file (or environment variable), the key and what
was expected.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from exporter.cgroups.reader import METRIC_KINDS
from exporter.durations import Duration, StrList
from sinks import registry

ENV_PREFIX = "CONTAINER_EXPORTER_"


class ConfigError(Exception):
    """A configuration that cannot be used; ``str()`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    housekeeping_interval: Duration = Field(1.0, gt=0, description="Interval between housekeeping (stats collection) runs of a container.")
    max_housekeeping_interval: Duration = Field(60.0, gt=0, description="Largest interval dynamic housekeeping may stretch to for a container whose stats do not change.")
    allow_dynamic_housekeeping: bool = Field(True, description="Let the housekeeping interval of an idle container grow up to max_housekeeping_interval.")
    global_housekeeping_interval: Duration = Field(60.0, gt=0, description="Interval of the full cgroup rescan that backs up the inotify watcher.")
    storage_duration: Duration = Field(120.0, gt=0, description="How long stats stay in the in-memory cache.")
    storage_max_records: int = Field(1000, gt=0, description="Most records kept in memory per container, whatever their age.")
    docker_only: bool = Field(False, description="Only report Docker containers (and the root container).")
    raw_cgroup_prefix_whitelist: StrList = Field(default_factory=list, description="With docker_only, raw cgroups under these prefixes are still reported.")
    disable_metrics: StrList = Field(default_factory=list, description=f"Metric groups not to collect: {', '.join(sorted(METRIC_KINDS))}.")
    enable_load_reader: bool = Field(False, description="Compute the smoothed load average (runnable tasks) of every container; it reads each task's /proc stat on every tick.")
    storage_driver: StrList = Field(default_factory=lambda: ["jsonl"], description=f"Sinks to send records to: {', '.join(sorted(registry.DRIVERS))}.")
    state_dir: Path = Field(Path("/var/lib/container-exporter"), description="Where the exporter keeps state that must survive a restart (the sinks' spools).")
    cgroup_root: Path = Field(Path("/sys/fs/cgroup"), description="Where the cgroup hierarchies are mounted.")
    proc_root: Path = Field(Path("/proc"), description="The host's proc filesystem.")
    sys_root: Path = Field(Path("/sys"), description="The host's sysfs.")
    rootfs: Path = Field(Path("/"), description="The host's root filesystem (for /etc/machine-id, /etc/os-release and filesystem usage).")
    docker_endpoint: str = Field("unix:///var/run/docker.sock", description="Docker Engine API endpoint; unreachable means Docker containers are reported as raw cgroups.")
    docker_env_metadata_whitelist: StrList = Field(default_factory=list, description="Environment variables of Docker containers copied into their spec.")
    writable_layer_interval: Duration = Field(60.0, gt=0, description="How often a Docker container's writable layer is measured (it walks the layer's files).")
    housekeeping_workers: int = Field(2, ge=1, le=64, description="Threads running housekeeping jobs; with the GIL more threads only help when a read blocks.")
    listen_ip: str = Field("0.0.0.0", description="Address the HTTP API listens on.")
    port: int = Field(8080, ge=0, le=65535, description="Port of the HTTP API (0: any free port).")
    prometheus_endpoint: str = Field("/metrics", pattern=r"^/", description="Path of the Prometheus metrics.")
    http_auth_file: Path | None = Field(None, description="htpasswd file (bcrypt, SHA1 or apr1-MD5 entries): HTTP Basic auth on every endpoint but /healthz.")
    http_auth_realm: str = Field("localhost", description="Realm of HTTP Basic auth.")
    http_digest_file: Path | None = Field(None, description="htdigest file: HTTP Digest auth (MD5, qop=auth) on every endpoint but /healthz.")
    http_digest_realm: str = Field("localhost", description="Realm of HTTP Digest auth; must match the realm in the htdigest file.")
    enable_profiling: bool = Field(False, description="Serve /debug/ endpoints: thread stacks, top memory allocations, a timed CPU profile.")
    store_container_labels: bool = Field(True, description="Export every container label as a Prometheus label container_label_<name>.")
    whitelisted_container_labels: StrList = Field(default_factory=list, description="With store_container_labels = false, the labels still exported.")
    collector_cert: Path | None = Field(None, description="Client certificate the custom metrics collectors present (mTLS).")
    collector_key: Path | None = Field(None, description="Key of collector_cert.")
    application_metrics_count_limit: int = Field(100, ge=0, description="Most custom metrics kept per container.")
    event_storage_age_limit: str = Field("default=24h", description='How long events are kept, per type: "default=24h,oom=72h"; 0 disables a type.')
    event_storage_event_limit: str = Field("default=100000", description='Most events kept, per type: "default=100000,containerCreation=1000"; 0 disables a type.')
    log_self_usage: bool = Field(False, description="Log the exporter's own CPU and memory use every global housekeeping interval.")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")
    sinks: registry.SinksConfig = Field(default_factory=registry.SinksConfig, description="Per-sink settings, [sinks.<driver>].")

    @field_validator("disable_metrics")
    @classmethod
    def _known_metrics(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in METRIC_KINDS]
        if unknown:
            raise ValueError(f"unknown metric group(s) {', '.join(unknown)}; known: {', '.join(sorted(METRIC_KINDS))}")
        return value

    @field_validator("storage_driver")
    @classmethod
    def _known_drivers(cls, value: list[str]) -> list[str]:
        unknown = [d for d in value if d not in registry.DRIVERS]
        if unknown:
            raise ValueError(f"unknown storage driver(s) {', '.join(unknown)}; known: {', '.join(sorted(registry.DRIVERS))}")
        if len(set(value)) != len(value):
            raise ValueError("a storage driver is listed twice")
        return value

    @field_validator("event_storage_age_limit", "event_storage_event_limit")
    @classmethod
    def _event_policy(cls, value: str, info: ValidationInfo) -> str:
        from exporter.events import parse_storage_policy

        ages, counts = (value, "") if info.field_name == "event_storage_age_limit" else ("", value)
        try:
            parse_storage_policy(ages, counts)
        except ValueError as exc:
            raise ValueError(str(exc).split(": ", 1)[-1]) from None
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"expected DEBUG, INFO, WARNING or ERROR, got {value!r}")
        return level

    @model_validator(mode="after")
    def _intervals(self) -> Config:
        if self.max_housekeeping_interval < self.housekeeping_interval:
            raise ValueError("max_housekeeping_interval must not be smaller than housekeeping_interval")
        return self

    @property
    def metrics(self) -> frozenset[str]:
        off = set(self.disable_metrics)
        if not self.enable_load_reader:
            off.add("cpuLoad")
        return METRIC_KINDS - off

    def sink_settings(self, name: str) -> BaseModel:
        settings = getattr(self.sinks, name)
        return settings if settings is not None else registry.settings_model(name)()


HOST_ROOTFS = Path("/rootfs")


def with_host_paths(config: Config, sources: Mapping[str, str], host_rootfs: Path = HOST_ROOTFS) -> Config:
    """Inside a container with the host's / mounted at /rootfs (as cAdvisor checks for
    /rootfs/proc), read the host through it: rootfs, proc_root and sys_root default to the
    host's unless the user set them."""
    if not (host_rootfs / "proc").is_dir():
        return config
    update: dict[str, Path] = {}
    for key, path in (("rootfs", host_rootfs), ("proc_root", host_rootfs / "proc"), ("sys_root", host_rootfs / "sys")):
        if key not in sources:
            update[key] = path
    return config.model_copy(update=update) if update else config


def env_overrides(environ: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    """``CONTAINER_EXPORTER_KEY`` → {"key": (var, value)}; ``__`` separates nested keys
    (``CONTAINER_EXPORTER_SINKS__JSONL__PATH`` → sinks.jsonl.path)."""
    out: dict[str, tuple[str, Any]] = {}
    for var, value in environ.items():
        if var.startswith(ENV_PREFIX) and len(var) > len(ENV_PREFIX):
            key = ".".join(part.lower() for part in var[len(ENV_PREFIX) :].split("__"))
            out[key] = (var, value)
    return out


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _model_keys(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


def _describe(error: Mapping[str, Any], source_of: Mapping[str, str], file_label: str, data: Mapping[str, Any]) -> str:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc)
    source = next((source_of[k] for k in _prefixes(key) if k in source_of), file_label)
    if error["type"] == "extra_forbidden":
        section = ".".join(loc[:-1])
        known = _known_keys(section, data)
        where = f"in [{section}] " if section else ""
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{source}: unknown key {loc[-1]!r} {where}({hint}known keys: {', '.join(known)})"
    msg = error["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if error["type"] not in ("value_error", "assertion_error") and "input" in error:
        msg = f"{msg}, got {error['input']!r}"
    return f"{source}: key {key!r}: {msg}"


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _known_keys(section: str, data: Mapping[str, Any]) -> list[str]:
    if not section:
        return _model_keys(Config)
    parts = section.split(".")
    if parts == ["sinks"]:
        return sorted(registry.DRIVERS)
    if parts[0] == "sinks" and len(parts) == 2 and parts[1] in registry.DRIVERS:
        return _model_keys(registry.settings_model(parts[1]))
    return []


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (None: defaults only) and apply environment overrides."""
    config, _ = load_config_with_sources(path, environ)
    return config


def load_config_with_sources(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> tuple[Config, dict[str, str]]:
    """Like :func:`load_config`; also says where each key set by the user came from."""
    environ = os.environ if environ is None else environ
    file_label = str(path) if path is not None else "defaults"
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError([f"{path}: no such file"]) from None
        except IsADirectoryError:
            raise ConfigError([f"{path}: is a directory, expected a TOML file"]) from None
        except PermissionError:
            raise ConfigError([f"{path}: permission denied"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
        for key in _flatten(data):
            sources[key] = str(path)
    for key, (var, value) in env_overrides(environ).items():
        _set_path(data, key, value)
        sources[key] = f"environment variable {var}"
    try:
        return Config.model_validate(data), sources
    except ValidationError as exc:
        raise ConfigError([_describe(e, sources, file_label, data) for e in exc.errors()]) from None


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            keys.extend(_flatten(value, dotted + "."))
        else:
            keys.append(dotted)
    return keys
