"""Demo Kafka consumer: prints one line per record the exporter publishes."""

import json
import os
import time

from kafka import KafkaConsumer
from kafka.errors import NoBrokersAvailable


def connect() -> KafkaConsumer:
    while True:
        try:
            return KafkaConsumer(
                *os.environ.get("TOPICS", "container-stats").split(","),
                bootstrap_servers=os.environ.get("BOOTSTRAP_SERVERS", "localhost:9092").split(","),
                group_id="container-exporter-demo",
                auto_offset_reset="latest",
            )
        except NoBrokersAvailable:
            time.sleep(2)


for message in connect():
    record = json.loads(message.value)
    if "event_type" in record:
        print(f"{record['timestamp']} EVENT {record['event_type']:<18} {record['container_name']}", flush=True)
        continue
    cpu = (record.get("cpu") or {}).get("total_ns")
    memory = (record.get("memory") or {}).get("working_set_bytes")
    name = (record["container"].get("aliases") or [record["container"]["name"]])[0]
    print(f"{record['timestamp']} {name:<40} seq {record['seq']:>6} cpu_ns {cpu} working_set {memory}", flush=True)
