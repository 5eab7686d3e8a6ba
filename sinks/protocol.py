"""What a storage driver implements, and how it reports failure.

A sink is four methods: ``open`` → ``write_batch(records)`` → ``flush`` → ``close``. The delivery
worker (sinks/base.py) calls them from the sink's own thread and owns queueing, batching,
retries, the disk spool and the counters; a sink only talks to its store.

A sink must never block forever: every network call carries a timeout, and a timeout is a
retryable :class:`SinkError`.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Sequence
from datetime import UTC
from typing import Protocol

from exporter.models import Envelope

# Error categories, for counters and for the one clear log line a kind of failure gets.
UNREACHABLE = "unreachable"  # connection refused, DNS failure, timeout
AUTH = "auth"  # credentials refused (401/403, SASL failure)
THROTTLED = "throttled"  # 429 or the store's own back-pressure
REJECTED = "rejected"  # the store refused the data itself (mapping error, bad request)
ERROR = "error"  # anything else


class MissingDependency(RuntimeError):
    """A configured sink's client library is not installed."""


class SinkError(Exception):
    """A failed write of a whole batch.

    ``retryable``: sending the same records again may succeed (store down, timeout, 429, 5xx,
    credentials that an operator may fix). ``retry_after_s``: the store said when (Retry-After).
    """

    def __init__(
        self, message: str, *, retryable: bool = True, retry_after_s: float | None = None, category: str = ERROR
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.category = category


class PartialFailure(SinkError):
    """Some records of a batch were stored, others not.

    ``failed``: indices (into the batch passed to ``write_batch``) worth sending again;
    ``rejected``: indices the store refused for good (counted as dropped, never retried).
    Indices in neither list were stored.
    """

    def __init__(
        self,
        message: str,
        *,
        failed: Sequence[int] = (),
        rejected: Sequence[int] = (),
        retry_after_s: float | None = None,
        category: str = ERROR,
    ) -> None:
        super().__init__(message, retryable=bool(failed), retry_after_s=retry_after_s, category=category)
        self.failed = list(failed)
        self.rejected = list(rejected)


class Sink(Protocol):
    """A storage driver. ``records`` are :class:`~exporter.models.Envelope` models:
    :class:`~exporter.models.ContainerStats` (and events, once they exist)."""

    name: str

    def open(self) -> None:
        """Connect / prepare (install templates, ...). May raise SinkError; the worker retries."""

    def write_batch(self, records: Sequence[Envelope]) -> None:
        """Store the records or raise SinkError / PartialFailure."""

    def flush(self) -> None: ...

    def close(self) -> None: ...


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """A Retry-After header (seconds or an HTTP date) → seconds from now."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
