"""Setting types: Go-style durations ("1s", "2m30s", "500ms") and comma-separated lists; RFC 3339 times."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from pydantic import BeforeValidator

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d)")
_EXPECTED = 'expected a duration such as "1s", "2m30s" or "500ms"'


def parse_duration(value: object) -> float:
    """A duration string or a number of seconds → seconds."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{_EXPECTED}, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        pos = 0
        seconds = 0.0
        for match in _PART.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if not text or pos != len(text):
            try:
                seconds = float(text)
            except ValueError:
                raise ValueError(f"{_EXPECTED}, got {value!r}") from None
    else:
        seconds = float(value)
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds and seconds == int(seconds):
        s = int(seconds)
        for unit, size in (("h", 3600), ("m", 60)):
            if s % size == 0:
                return f"{s // size}{unit}"
        return f"{s}s"
    return f"{seconds * 1000:g}ms"


def _split_list(value: object) -> object:
    """Lists may be written as TOML arrays or, like cAdvisor's flags, as "a,b,c"."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
StrList = Annotated[list[str], BeforeValidator(_split_list)]


_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_rfc3339(text: str) -> datetime:
    """An RFC 3339 time as Docker and Go write it: nanoseconds (Python takes at most
    microseconds) and "Z" or "z" for UTC. Raises ValueError."""
    return datetime.fromisoformat(_FRACTION.sub(r"\1", text).replace("Z", "+00:00").replace("z", "+00:00"))
