"""Kafka sink throughput: records/s through ``KafkaSink.write_batch`` next to the raw
kafka-python producer, in the same run, against a tansu broker this script starts.

For each batch size, ``--records`` real records (copies of this host's cgroup samples, each with
its own seq, timestamp and record_id) are written

  * ours: ``write_batch(batch)`` per batch: routing, key and headers per record, send, flush,
    and the check of every future. The records' JSON is encoded before the clock starts (as in
    the exporter, where a record is encoded once for all sinks); ``--cold`` encodes it inside;
  * raw: ``KafkaProducer.send`` of the same pre-serialized (topic, value, key, headers,
    timestamp) per record, ``flush()``, then the futures checked: the same producer settings
    (``KafkaSink.producer_config()``), so the difference is our own per-record work.

Each figure is the best of ``--repeat`` runs (ours and raw alternate), each run on a fresh
topic that is deleted afterwards. Goal: ours >= 0.8 x raw.

Usage: python bench/sink_kafka.py [--sizes 100 1000 5000] [--records 20000] [--repeat 3]
                                  [--compression none] [--partitions 3] [--cold]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.models import ContainerStats  # noqa: E402
from sinks.kafka import KafkaSettings, KafkaSink  # noqa: E402
from tests.infra.kafka import Brokers, KafkaBroker  # noqa: E402
from tests.records import collect_host_records, samples  # noqa: E402


def host_samples(n: int) -> list[ContainerStats]:
    """``n`` real records: this host's cgroup samples, copied with distinct seq/timestamp/record_id."""
    base = collect_host_records()
    return samples(base, rounds=-(-n // len(base)))[:n]


def batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def run_ours(broker: KafkaBroker, settings: dict[str, Any], records: list[ContainerStats], batch_size: int, cold: bool) -> float:
    topic = broker.create_topic(partitions=settings.pop("partitions"))
    sink = KafkaSink(KafkaSettings(bootstrap_servers=[broker.bootstrap], topic=topic, **settings))
    sink.open()
    try:
        sink.write_batch(records[:10])  # metadata and producer id, outside the clock
        if cold:
            records = [ContainerStats.model_validate(r.model_dump()) for r in records]
        else:
            for r in records:
                r.json_bytes()
        chunks = batches(records, batch_size)
        t0 = time.perf_counter()
        for chunk in chunks:
            sink.write_batch(chunk)
        elapsed = time.perf_counter() - t0
    finally:
        sink.close()
        _delete(broker, topic)
    return len(records) / elapsed


def run_raw(broker: KafkaBroker, settings: dict[str, Any], records: list[ContainerStats], batch_size: int) -> float:
    from kafka import KafkaProducer

    topic = broker.create_topic(partitions=settings.pop("partitions"))
    config = KafkaSink(KafkaSettings(bootstrap_servers=[broker.bootstrap], **settings)).producer_config()
    payloads = [
        (
            r.json_bytes(),
            (r.container.id or r.container.name).encode(),
            [("record_id", r.record_id.encode()), ("schema_version", b"1"), ("record_type", b"stats")],
            int(r.timestamp.timestamp() * 1000),
        )
        for r in records
    ]
    producer = KafkaProducer(**config)
    try:
        producer.send(topic, value=b"warm-up", key=b"warm-up").get(timeout=10)
        chunks = batches(payloads, batch_size)
        t0 = time.perf_counter()
        for chunk in chunks:
            futures = [producer.send(topic, value=v, key=k, headers=h, timestamp_ms=ts) for v, k, h, ts in chunk]
            producer.flush()
            failed = [f for f in futures if not f.succeeded()]
            if failed:
                raise RuntimeError(f"raw producer: {len(failed)} records failed: {failed[0].exception}")
        elapsed = time.perf_counter() - t0
    finally:
        producer.close()
        _delete(broker, topic)
    return len(records) / elapsed


def _delete(broker: KafkaBroker, topic: str) -> None:
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10_000)
    try:
        admin.delete_topics([topic])
    except Exception as exc:  # noqa: BLE001 - the broker's memory is all that is at stake
        logging.getLogger(__name__).debug("could not delete %s: %s", topic, exc)
    finally:
        admin.close()


def bench(
    broker: KafkaBroker,
    sizes: Sequence[int] = (100, 1000, 5000),
    n_records: int = 20_000,
    repeat: int = 3,
    compression: str = "none",
    partitions: int = 3,
    cold: bool = False,
) -> list[dict[str, Any]]:
    """Records/s of ours and raw per batch size (best of ``repeat``)."""
    records = host_samples(n_records)
    settings = {"compression": compression, "timeout": 30.0}
    results = []
    for size in sizes:
        ours, raw = 0.0, 0.0
        for _ in range(repeat):
            ours = max(ours, run_ours(broker, {**settings, "partitions": partitions}, records, size, cold))
            raw = max(raw, run_raw(broker, {**settings, "partitions": partitions}, records, size))
        results.append({"batch_size": size, "ours_rps": ours, "raw_rps": raw, "ratio": ours / raw})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compression", default="none", choices=["none", "gzip", "snappy", "lz4", "zstd"])
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="encode the records' JSON inside write_batch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # its selector warns about its own slow tasks
    with Brokers() as brokers:
        broker = brokers.broker()
        results = bench(broker, args.sizes, args.records, args.repeat, args.compression, args.partitions, args.cold)
    json_note = "encoded inside write_batch" if args.cold else "encoded before the clock"
    print(f"kafka sink, tansu on 127.0.0.1, {args.records} records per run, compression={args.compression}, "
          f"{args.partitions} partitions, JSON {json_note}, best of {args.repeat}")  # fmt: skip
    print(f"{'batch':>6} {'ours rec/s':>12} {'raw rec/s':>12} {'ours/raw':>9}")
    for r in results:
        print(f"{r['batch_size']:>6} {r['ours_rps']:>12,.0f} {r['raw_rps']:>12,.0f} {r['ratio']:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
