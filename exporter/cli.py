"""Command line: run, once, check-config."""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel, BeforeValidator

from exporter import __version__
from exporter.config import Config, ConfigError, load_config_with_sources, with_host_paths
from exporter.durations import format_duration, parse_duration

log = logging.getLogger("exporter")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


# Client libraries that log every request or every failed connection: the sink workers report
# failures themselves, once per kind, and count the rest.
QUIET_LOGGERS = ("elastic_transport", "urllib3", "kafka", "influxdb_client")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if level != "DEBUG":
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _raise_fd_limit() -> None:
    """Housekeeping keeps each container's cgroup files open: use the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _load(path: str | None) -> Config:
    config, sources = load_config_with_sources(path)
    return with_host_paths(config, sources)


def cmd_run(args: argparse.Namespace) -> int:
    from exporter.app import App

    config = _load(args.config)
    _setup_logging(config.log_level)
    _raise_fd_limit()
    app = App(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    app.start()
    # Everything built so far lives as long as the process: keep the collector from walking it
    # again and again. Records are short-lived and hold no cycles, so young-generation
    # collections can be rarer too.
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    try:
        while not stop.wait(3600):
            pass
    finally:
        app.stop()
        log.info("stopped")
    return EXIT_OK


def cmd_once(args: argparse.Namespace) -> int:
    from exporter.app import App

    config = _load(args.config)
    _setup_logging(config.log_level if config.log_level != "INFO" else "WARNING")
    app = App(config, with_sinks=False, with_api=False)
    out = sys.stdout.buffer
    for record in app.collect_once():
        out.write(record.json_bytes() + b"\n")
    out.flush()
    return EXIT_OK


def _describe_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "(none)"
    return repr(value) if isinstance(value, str) else str(value)


def _explain(model: BaseModel, sources: dict[str, str], prefix: str, lines: list[str]) -> None:
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            _explain(value, sources, key + ".", lines)
            continue
        if value is None and prefix.startswith("sinks."):
            continue
        is_duration = any(isinstance(m, BeforeValidator) and m.func is parse_duration for m in field.metadata)
        shown = format_duration(value) if is_duration else _describe_value(value)
        source = sources.get(key, "default")
        lines.append(f"{key} = {shown}    [{source}]")
        if field.description:
            lines.append(f"    {field.description}")


def cmd_check_config(args: argparse.Namespace) -> int:
    config, sources = load_config_with_sources(args.file)
    lines = [f"{args.file}: valid", ""]
    _explain(config, sources, "", lines)
    for name in config.storage_driver:
        if getattr(config.sinks, name) is None:
            lines.append(f"sinks.{name}: defaults (no [sinks.{name}] section)")
            _explain(config.sink_settings(name), {}, f"sinks.{name}.", lines)
    print("\n".join(lines))
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    """The JSON Schema of the records the sinks publish; schemas/container-<kind>.schema.json
    holds the same text."""
    import json

    from exporter import models

    schemas = {}
    for kind, names in (("stats", ("ContainerStats",)), ("events", ("Event", "ContainerEvent"))):
        model = next((getattr(models, n) for n in names if hasattr(models, n)), None)
        if args.kind in (kind, "all") and model is not None:
            schema = model.model_json_schema(mode="serialization")
            schemas[kind] = {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "$id": f"container-{kind}.schema.json",
                **schema,
            }
    if args.kind != "all" and args.kind not in schemas:
        print(f"there is no {args.kind} record model yet", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(schemas if args.kind == "all" else schemas[args.kind], indent=2))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="container-exporter", description="Container metrics from cgroups.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="collect continuously and send records to the configured sinks")
    run.add_argument("--config", "-c", help="TOML configuration file (default: built-in defaults)")
    run.set_defaults(func=cmd_run)
    once = sub.add_parser("once", help="one collection round; one JSON record per container on stdout")
    once.add_argument("--config", "-c", help="TOML configuration file")
    once.set_defaults(func=cmd_once)
    check = sub.add_parser("check-config", help="validate a configuration file and explain every setting")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)
    schema = sub.add_parser("schema", help="print the JSON Schema of the published records")
    schema.add_argument("--kind", choices=["stats", "events", "all"], default="stats", help="which records (default: stats)")
    schema.set_defaults(func=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
