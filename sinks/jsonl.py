"""The embedded default sink: one JSON record per line, to a rotating file or to stdout."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from pydantic import BaseModel, Field

from exporter.models import Envelope
from sinks.settings import DeliverySettings

log = logging.getLogger(__name__)


class JsonlSettings(DeliverySettings):
    spool: bool = Field(False, description="A local file needs no spool; a full disk would refuse it too.")
    path: Path = Field(Path("container-exporter.jsonl"), description="File the records are appended to.")
    max_bytes: int = Field(100 * 1024 * 1024, gt=0, description="Size at which the file is rotated to <path>.1.")
    backups: int = Field(5, ge=0, description="Rotated files kept (<path>.1 … <path>.N); 0 truncates instead.")
    fsync: bool = Field(False, description="fsync after every batch.")


class StdoutSettings(DeliverySettings):
    spool: bool = Field(False, description="Standard output needs no spool.")


def encode(records: Sequence[BaseModel]) -> bytes:
    lines = [json_bytes(r) for r in records]
    lines.append(b"")  # the last newline, without copying the whole batch once more
    return b"\n".join(lines)


def json_bytes(record: BaseModel) -> bytes:
    """The record's JSON, reusing what an :class:`Envelope` already encoded."""
    if isinstance(record, Envelope):
        return record.json_bytes()
    return record.__pydantic_serializer__.to_json(record)


class JsonlSink:
    name = "jsonl"

    def __init__(self, settings: JsonlSettings) -> None:
        self.settings = settings
        self.path = settings.path
        self._file: IO[bytes] | None = None
        self._size = 0

    def open(self) -> None:
        if self.path.parent != Path(""):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")
        self._size = self._file.tell()

    def write_batch(self, records: Sequence[BaseModel]) -> None:
        assert self._file is not None, "open() first"
        data = encode(records)
        if self._size and self._size + len(data) > self.settings.max_bytes:
            self._rotate()
        self._file.write(data)
        self._file.flush()
        if self.settings.fsync:
            os.fsync(self._file.fileno())
        self._size += len(data)

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        backups = self.settings.backups
        if backups:
            for i in range(backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            self._file = open(self.path, "ab")
        else:
            self._file = open(self.path, "wb")
        self._size = 0

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class StdoutSink:
    name = "stdout"

    def __init__(self, settings: StdoutSettings, stream: IO[bytes] | None = None) -> None:
        self.settings = settings
        self._stream = stream

    def open(self) -> None:
        if self._stream is None:
            self._stream = sys.stdout.buffer

    def write_batch(self, records: Sequence[BaseModel]) -> None:
        assert self._stream is not None
        self._stream.write(encode(records))
        self._stream.flush()

    def flush(self) -> None:
        if self._stream is not None:
            self._stream.flush()

    def close(self) -> None:
        self.flush()
