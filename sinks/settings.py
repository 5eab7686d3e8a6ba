"""Settings every sink shares: queueing, batching, retries and the disk spool."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from exporter.durations import Duration


class DeliverySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    queue_size: int = Field(100_000, gt=0, description="Records held in memory for this sink; beyond it they go to the spool (or the oldest are dropped without one).")
    batch_size: int = Field(1000, gt=0, description="Most records per write.")
    buffer_duration: Duration = Field(1.0, ge=0, description="Longest a record waits for its batch to fill (cAdvisor's storage_driver_buffer_duration).")
    timeout: Duration = Field(10.0, gt=0, description="Longest one write may take before it counts as failed.")
    max_backoff: Duration = Field(60.0, gt=0, description="Longest wait between retries (exponential backoff with jitter; a store's Retry-After wins).")
    shutdown_timeout: Duration = Field(10.0, ge=0, description="On stop, how long to keep delivering before what is left goes to the spool.")
    spool: bool = Field(True, description="Keep records on disk while the store is unreachable and deliver them when it is back, also after a restart.")
    spool_dir: Path | None = Field(None, description="Spool directory; default <state_dir>/spool/<driver>.")
    spool_max_bytes: int = Field(256 * 1024 * 1024, gt=0, description="Spool size cap; when full the oldest records are dropped (and counted).")
    spool_fsync: Literal["always", "batch", "never"] = Field("batch", description="fsync the spool after every record, after every batch, or leave it to the kernel.")
