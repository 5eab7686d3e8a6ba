"""The configuration reference (docs/configuration.md), generated from the settings models so it
cannot drift from them: ``python -m exporter.reference > docs/configuration.md``."""

from __future__ import annotations

import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, BeforeValidator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from exporter.config import ENV_PREFIX, Config
from exporter.durations import format_duration, parse_duration
from sinks import registry

HEADER = """# Configuration reference

Generated from the settings models by `python -m exporter.reference`; a test keeps it in step.
Every key is optional. Durations are written `"500ms"`, `"1s"`, `"2m30s"`, `"1h"`; lists may also
be written `"a,b,c"`. Any key can be set from the environment: `{prefix}<KEY>` for top-level
keys, `{prefix}SINKS__<DRIVER>__<KEY>` for sink settings. An annotated example is
[`config.example.toml`](../config.example.toml).
"""


def _is_duration(field: FieldInfo) -> bool:
    return any(isinstance(m, BeforeValidator) and m.func is parse_duration for m in field.metadata)


def _type_name(annotation: Any, field: FieldInfo) -> str:
    if _is_duration(field):
        return "duration"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0], field)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a, field) for a in args if a is not type(None)]
        return " or ".join(names) + (" (optional)" if type(None) in args else "")
    if origin is typing.Literal:
        return " \\| ".join(f'`"{a}"`' for a in args)
    if origin is list:
        return f"list of {_type_name(args[0], field)}" if args else "list"
    if isinstance(annotation, type):
        if issubclass(annotation, Enum):
            return " \\| ".join(f'`"{m.value}"`' for m in annotation)
        return {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}.get(annotation, annotation.__name__)
    return str(annotation)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "see below"
    if _is_duration(field):
        return f'`"{format_duration(value)}"`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str | Path):
        return f'`"{value}"`'
    if isinstance(value, list):
        return "`[" + ", ".join(f'"{v}"' for v in value) + "]`"
    return f"`{value}`"


def _table(model: type[BaseModel], skip: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        description = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{name}` | {_type_name(field.annotation, field)} | {_default(field)} | {description} |")
    return lines


def render() -> str:
    out = [HEADER.format(prefix=ENV_PREFIX), "## Top level", ""]
    out += _table(Config, skip={"sinks"})
    for name in registry.DRIVERS:
        out += ["", f"## `[sinks.{name}]`", ""]
        out += _table(registry.settings_model(name))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
