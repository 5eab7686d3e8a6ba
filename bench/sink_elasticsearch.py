"""Elasticsearch sink throughput: our write_batch against the raw client, same records, same run.

For each batch size, alternating rounds of

  * ours: ``ElasticsearchSink.write_batch(records)`` — builds the NDJSON body from the records'
    cached JSON (index name from the timestamp, _id, @timestamp), sends it, reads every item;
  * raw:  ``client.bulk(body=ndjson)`` with the same records already serialized (index, _id and
    source), i.e. the floor for one bulk request of these documents with this client;

  * helpers: ``elasticsearch.helpers.streaming_bulk`` fed the same records (action dicts, the
    cached JSON as source, every item result read): what the sink would cost built on the
    helpers instead of one ``client.bulk`` call;

each into indices of its own, and prints records/s (median over the rounds) and the client-side
CPU per record (this process's CPU time; the server runs in its own process). The records are
real: this host's cgroups read by the exporter, copied with distinct ids.

Starts its own osmem-server (in-memory OpenSearch, from the test extra) unless --url is given.
Usage: python bench/sink_elasticsearch.py [--sizes 100 1000 5000] [--rounds 3] [--url URL]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from elasticsearch.helpers import streaming_bulk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.models import ContainerStats  # noqa: E402
from sinks.elasticsearch import ElasticsearchSettings, ElasticsearchSink, stats_mappings  # noqa: E402
from tests.records import collect_host_records, copies  # noqa: E402


def make_batch(base: list[ContainerStats], n: int) -> list[ContainerStats]:
    out = copies(base, n, start=datetime.now(UTC), step=timedelta(microseconds=1))
    for record in out:
        record.json_bytes()  # encoded once at collection in the real pipeline, as here
    return out


def raw_body(records: list[ContainerStats], index: str) -> bytes:
    return b"".join(
        b'{"index":{"_index":"%s","_id":"%s"}}\n%s\n' % (index.encode(), r.record_id.encode(), r.json_bytes()) for r in records
    )


def run(url: str, sizes: tuple[int, ...] = (100, 1000, 5000), rounds: int = 3, compatibility: str = "opensearch") -> list[dict[str, float]]:
    """Rows of {size, ours_rps, raw_rps, ratio, ours_cpu_us, raw_cpu_us} for a server at ``url``."""
    base = collect_host_records()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    sink = ElasticsearchSink(
        ElasticsearchSettings(
            hosts=[url], index=f"{prefix}-ours-%Y.%m.%d", events_index=f"{prefix}-events-%Y.%m.%d",
            template_name=prefix, compatibility=compatibility, timeout=120,  # type: ignore[arg-type]
        )
    )
    sink.open()
    client = sink.client  # the same client and node setup, for the raw side
    raw_index = f"{prefix}-raw"
    helper_index = f"{prefix}-helpers"

    def expand(record: ContainerStats) -> tuple[dict[str, Any], bytes]:
        source = b'{"@timestamp":"%s",%s' % (record.timestamp.isoformat().encode(), record.json_bytes()[1:])
        return {"index": {"_index": helper_index, "_id": record.record_id}}, source

    for index in (raw_index, helper_index):
        client.indices.create(index=index, mappings=stats_mappings())
    warm = make_batch(base, 50)
    sink.write_batch(warm)
    client.bulk(body=raw_body(warm, raw_index))

    rows = []
    for size in sizes:
        ours_rps, raw_rps, ours_cpu, raw_cpu, helper_rps, helper_cpu = [], [], [], [], [], []
        for _ in range(rounds):
            batch = make_batch(base, size)
            wall, cpu = time.perf_counter(), time.process_time()
            sink.write_batch(batch)
            ours_rps.append(size / (time.perf_counter() - wall))
            ours_cpu.append((time.process_time() - cpu) / size * 1e6)

            batch = make_batch(base, size)
            body = raw_body(batch, raw_index)
            wall, cpu = time.perf_counter(), time.process_time()
            response = client.bulk(body=body)
            raw_rps.append(size / (time.perf_counter() - wall))
            raw_cpu.append((time.process_time() - cpu) / size * 1e6)
            assert not response["errors"], "raw bulk had errors"

            batch = make_batch(base, size)
            wall, cpu = time.perf_counter(), time.process_time()
            results = list(streaming_bulk(client, batch, chunk_size=size, raise_on_error=False, expand_action_callback=expand))
            helper_rps.append(size / (time.perf_counter() - wall))
            helper_cpu.append((time.process_time() - cpu) / size * 1e6)
            assert all(ok for ok, _ in results), "helper bulk had errors"
        row = {
            "size": size,
            "ours_rps": statistics.median(ours_rps),
            "raw_rps": statistics.median(raw_rps),
            "ours_cpu_us": statistics.median(ours_cpu),
            "raw_cpu_us": statistics.median(raw_cpu),
            "helper_rps": statistics.median(helper_rps),
            "helper_cpu_us": statistics.median(helper_cpu),
        }
        row["ratio"] = row["ours_rps"] / row["raw_rps"]
        rows.append(row)
    sink.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--url", help="an existing server (default: start an osmem-server)")
    parser.add_argument("--compatibility", choices=["opensearch", "elasticsearch"], default="opensearch")
    args = parser.parse_args()

    server = None
    url = args.url
    if url is None:
        try:
            from osmem_server import OsmemServer
        except ImportError:
            sys.exit("osmem-server (test extra) is missing: run `make setup`, or pass --url")
        server = OsmemServer.start(japanese=False, addr="127.0.0.1:0")
        url = server.url
        print(f"osmem-server {server.version} at {url}")
    try:
        rows = run(url, tuple(args.sizes), args.rounds, args.compatibility)
    finally:
        if server is not None:
            server.close()
    print(f"{'batch':>6} {'ours rec/s':>11} {'raw rec/s':>10} {'ours/raw':>9} {'helpers rec/s':>14}   client CPU µs/rec: ours / raw / helpers")
    for row in rows:
        print(
            f"{row['size']:>6} {row['ours_rps']:>11.0f} {row['raw_rps']:>10.0f} {row['ratio']:>9.2f} {row['helper_rps']:>14.0f}"
            f"   {row['ours_cpu_us']:.1f} / {row['raw_cpu_us']:.1f} / {row['helper_cpu_us']:.1f}"
        )
    worst = min(row["ratio"] for row in rows)
    print(f"goal ours >= 0.8 x raw: {'met' if worst >= 0.8 else 'NOT met'} (worst {worst:.2f})")


if __name__ == "__main__":
    main()
