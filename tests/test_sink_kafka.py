"""The Kafka sink against a real broker (tansu, see tests/infra/kafka.py), with real records.

tansu cannot terminate TLS (its CLI refuses --cert with --key) and cannot hold a SCRAM user
while it requires authentication (memory storage; `tansu user create` cannot log in). So TLS
runs through a TLS front in this process before a real broker, and SASL is tested for what a
broker can do: refuse.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

import pytest

from exporter.models import ContainerReference, ContainerStats, Envelope
from sinks.kafka import KafkaSettings, KafkaSink, scram_client_final, scram_client_first_bare
from sinks.protocol import AUTH, REJECTED, UNREACHABLE, PartialFailure, SinkError
from tests.infra.kafka import new_topic_name
from tests.infra.procs import free_port
from tests.records import collect_host_records, samples

# kafka-python 3.0 loads its protocol schemas with importlib.resources APIs that warn on 3.11+.
pytestmark = pytest.mark.filterwarnings("ignore:(read|open)_text is deprecated:DeprecationWarning")

ROOT = Path(__file__).resolve().parent.parent
CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]
TIMEOUT_S = 1.5
# write_batch waits until its deadline and a moment more (sinks/kafka.py: _GRACE_S) for the
# producer to report; a little scheduling slack on top.
# A guard against hanging, not a speed check (the suite shares two cores): far below "for ever".
BOUND_S = TIMEOUT_S + 10.0


@pytest.fixture(scope="module")
def host_records() -> list[ContainerStats]:
    """One real record per cgroup of this host."""
    records = collect_host_records()
    assert records, "no cgroups found on this host"
    return records


def key_of(record: ContainerStats) -> bytes:
    return (record.container.id or record.container.name).encode()


def make_sink(bootstrap: str, **settings) -> KafkaSink:
    settings.setdefault("timeout", TIMEOUT_S)
    return KafkaSink(KafkaSettings(bootstrap_servers=[bootstrap], **settings))


def headers(message) -> dict[str, bytes]:
    return dict(message.headers)


# -- delivery -------------------------------------------------------------------------------------
def test_every_record_arrives_once_in_order_with_key_value_and_headers(kafka_broker, host_records):
    topic = kafka_broker.create_topic(partitions=3)
    records = samples(host_records, rounds=40)
    sink = make_sink(kafka_broker.bootstrap, topic=topic, timeout=10)
    sink.open()
    try:
        for start in range(0, len(records), 100):
            sink.write_batch(records[start : start + 100])
    finally:
        sink.close()

    messages = kafka_broker.consume(topic, count=len(records))
    by_id = {r.record_id: r for r in records}
    counts = Counter(headers(m)["record_id"].decode() for m in messages)
    assert counts == Counter(list(by_id)), "every record exactly once"

    seqs: dict[bytes, list[int]] = defaultdict(list)
    partitions: dict[bytes, set[int]] = defaultdict(set)
    for m in messages:  # partition, then offset order
        source = by_id[headers(m)["record_id"].decode()]
        assert ContainerStats.model_validate_json(m.value) == source
        assert m.value == source.json_bytes()
        assert m.key == key_of(source)
        assert headers(m) == {"record_id": source.record_id.encode(), "schema_version": b"1", "record_type": b"stats"}
        assert m.timestamp == int(source.timestamp.timestamp() * 1000)
        seqs[m.key].append(source.seq)
        partitions[m.key].add(m.partition)
    assert set(seqs) == {key_of(r) for r in host_records}
    for key, seq in seqs.items():
        assert seq == list(range(1, 41)), f"{key!r}: seq out of order or with gaps"
        assert len(partitions[key]) == 1, f"{key!r}: one container's records in one partition"


def test_idempotent_producer_with_acks_all(kafka_broker, host_records):
    topic = kafka_broker.create_topic()
    sink = make_sink(kafka_broker.bootstrap, topic=topic)
    config = sink.producer_config()
    assert config["acks"] == "all" and config["enable_idempotence"] is True
    assert sink.producer_id is None
    sink.write_batch(samples(host_records, rounds=1))
    try:
        assert sink._producer.config["enable_idempotence"] is True, "kafka-python kept idempotence on"
        assert sink._producer.config["acks"] == -1
        assert sink.producer_id is not None and sink.producer_id >= 0, "the broker granted a producer id"
    finally:
        sink.close()
    assert len(kafka_broker.consume(topic, count=len(host_records))) == len(host_records)


@pytest.mark.parametrize("codec", CODECS)
def test_compression_round_trips(kafka_broker, host_records, codec):
    topic = kafka_broker.create_topic()
    records = samples(host_records, rounds=5)
    sink = make_sink(kafka_broker.bootstrap, topic=topic, compression=codec)
    assert sink.producer_config()["compression_type"] == (None if codec == "none" else codec)
    try:
        sink.write_batch(records)
        assert sink._producer.config["compression_type"] == (None if codec == "none" else codec)
    finally:
        sink.close()
    messages = kafka_broker.consume(topic, count=len(records))
    assert sorted(m.value for m in messages) == sorted(r.json_bytes() for r in records)


class ContainerEvent(Envelope):
    """Stands in for the event model to come: the sink must route it by its class name."""

    schema_version: int = 1
    timestamp: datetime
    record_id: str
    container: ContainerReference
    event_type: str


def test_events_go_to_the_events_topic_keyed_by_container(kafka_broker, host_records):
    stats_topic, events_topic = kafka_broker.create_topic(), kafka_broker.create_topic()
    stats = samples(host_records, rounds=1)
    events = [
        ContainerEvent(timestamp=r.timestamp, record_id=f"ev-{i}", container=r.container, event_type="oom")
        for i, r in enumerate(host_records)
    ]
    mixed = [x for pair in zip(stats, events, strict=True) for x in pair]
    sink = make_sink(kafka_broker.bootstrap, topic=stats_topic, events_topic=events_topic)
    try:
        sink.write_batch(mixed)
    finally:
        sink.close()
    got_stats = kafka_broker.consume(stats_topic, count=len(stats))
    got_events = kafka_broker.consume(events_topic, count=len(events))
    assert sorted(m.value for m in got_stats) == sorted(r.json_bytes() for r in stats)
    assert sorted((m.key, m.value) for m in got_events) == sorted((key_of(e), e.json_bytes()) for e in events)
    assert {headers(m)["record_type"] for m in got_events} == {b"event"}
    assert {headers(m)["record_type"] for m in got_stats} == {b"stats"}


def test_a_record_too_large_is_rejected_the_others_delivered(kafka_broker, host_records):
    topic = kafka_broker.create_topic()
    records = samples(host_records, rounds=2)
    big = records[0].model_dump()
    big["container"]["labels"] = {f"label{i}": "x" * 100 for i in range(60)}  # ~6 KiB of labels
    records.insert(3, ContainerStats.model_validate(big))
    assert len(records[3].json_bytes()) > 6000 and max(len(r.json_bytes()) for r in records if r is not records[3]) < 3000
    sink = make_sink(kafka_broker.bootstrap, topic=topic, max_message_bytes=4096)
    try:
        with pytest.raises(PartialFailure) as caught:
            sink.write_batch(records)
        assert caught.value.rejected == [3] and caught.value.failed == []
        assert caught.value.retryable is False and caught.value.category == REJECTED
        assert "MessageSizeTooLarge" in str(caught.value)
        assert sink._producer is not None, "a refused record does not cost the producer"
    finally:
        sink.close()
    messages = kafka_broker.consume(topic, count=len(records) - 1)
    assert sorted(m.value for m in messages) == sorted(r.json_bytes() for i, r in enumerate(records) if i != 3)


# -- failures -------------------------------------------------------------------------------------
def test_stopped_broker_is_a_retryable_error_within_the_timeout(kafka_broker_factory, host_records):
    broker = kafka_broker_factory()
    topic = new_topic_name()
    sink = make_sink(broker.bootstrap, topic=topic)
    sink.open()
    try:
        sink.write_batch(samples(host_records, rounds=1))
        broker.stop()
        for attempt in range(2):  # with the producer that was connected, then building a new one
            t0 = time.monotonic()
            with pytest.raises(SinkError) as caught:
                sink.write_batch(samples(host_records, rounds=1, first_seq=2))
            elapsed = time.monotonic() - t0
            assert elapsed < BOUND_S, f"attempt {attempt}: {elapsed:.2f} s"
            assert caught.value.retryable and caught.value.category == UNREACHABLE, caught.value
            assert not isinstance(caught.value, PartialFailure), "nothing got through: the whole batch failed"
        broker.start()  # empty again (memory storage); the producer auto-creates the topic
        again = samples(host_records, rounds=1, first_seq=2)
        sink.write_batch(again)
    finally:
        sink.close()
    messages = broker.consume(topic, count=len(again))
    assert sorted(m.value for m in messages) == sorted(r.json_bytes() for r in again)


def test_paused_broker_times_out_and_the_resent_records_arrive(kafka_broker_factory, host_records):
    """SIGSTOP: connections are accepted but nothing answers. The batch fails within the
    timeout; after SIGCONT the same records, sent again, all arrive (at least once: the
    paused broker may still write the batch it had received)."""
    broker = kafka_broker_factory()
    topic = broker.create_topic(partitions=2)
    sink = make_sink(broker.bootstrap, topic=topic)
    first, second, third = (samples(host_records, rounds=1, first_seq=k) for k in (1, 2, 3))
    try:
        sink.write_batch(first)
        producer_before = sink._producer
        broker.pause()
        try:
            t0 = time.monotonic()
            with pytest.raises(SinkError) as caught:
                sink.write_batch(second)
            assert time.monotonic() - t0 < BOUND_S
            assert caught.value.retryable and caught.value.category == UNREACHABLE
            assert sink._producer is None, "the producer that timed out is dropped"
            t0 = time.monotonic()
            with pytest.raises(SinkError) as caught:  # a new producer cannot connect either
                sink.write_batch(second)
            assert time.monotonic() - t0 < BOUND_S
            assert caught.value.retryable and caught.value.category == UNREACHABLE
        finally:
            broker.resume()
        sink.write_batch(second)  # the worker's retry
        assert sink._producer is not producer_before
        sink.write_batch(third)
    finally:
        sink.close()
    messages = broker.consume(topic, count=3 * len(host_records))
    counts = Counter(headers(m)["record_id"].decode() for m in messages)
    assert set(counts) == {r.record_id for r in first + second + third}, "nothing lost"
    once = {r.record_id for r in first + third}
    assert all(counts[rid] == 1 for rid in once), "duplicates only of the batch that timed out"
    assert all(counts[r.record_id] <= 2 for r in second)


def test_wrong_host_is_unreachable(host_records):
    for bootstrap in ("no-such-host.invalid:9092", f"127.0.0.1:{free_port()}"):
        sink = make_sink(bootstrap)
        t0 = time.monotonic()
        with pytest.raises(SinkError) as caught:
            sink.open()
        assert caught.value.category == UNREACHABLE and caught.value.retryable, bootstrap
        with pytest.raises(SinkError) as caught:
            sink.write_batch(host_records)
        assert caught.value.category == UNREACHABLE and caught.value.retryable, bootstrap
        assert time.monotonic() - t0 < 2 * BOUND_S


# -- TLS ----------------------------------------------------------------------------------------
def test_tls_verification_is_on_by_default_and_insecure_turns_it_off(kafka_tls_factory, kafka_certs, host_records):
    default = KafkaSink(KafkaSettings(tls=True, timeout=TIMEOUT_S))
    config = default.producer_config()
    assert config["security_protocol"] == "SSL" and config["ssl_check_hostname"] is True
    assert config["ssl_context"].verify_mode == ssl.CERT_REQUIRED and config["ssl_context"].check_hostname
    insecure = KafkaSink(KafkaSettings(tls=True, insecure=True, timeout=TIMEOUT_S)).producer_config()
    assert insecure["ssl_check_hostname"] is False
    assert insecure["ssl_context"].verify_mode == ssl.CERT_NONE and not insecure["ssl_context"].check_hostname

    front = kafka_tls_factory(cert="self-signed")
    with pytest.raises(SinkError) as caught:
        make_sink(front.bootstrap, tls=True).open()
    assert caught.value.category == AUTH and caught.value.retryable
    assert "certificate verify" in str(caught.value) or "self-signed" in str(caught.value)

    topic = new_topic_name()
    sink = make_sink(front.bootstrap, tls=True, insecure=True, topic=topic)
    try:
        sink.write_batch(host_records)
    finally:
        sink.close()
    assert front.handshakes >= 2, "the check and the producer both went through the TLS front"
    assert sorted(m.value for m in _behind(front, topic, len(host_records))) == sorted(r.json_bytes() for r in host_records)


def test_tls_to_a_broker_that_never_answers_does_not_hang(kafka_broker_factory, host_records):
    """kafka-python's TLS handshake has no timeout of its own: the sink's must hold."""
    broker = kafka_broker_factory()
    broker.pause()  # accepts TCP connections (the kernel's backlog), never answers the ClientHello
    try:
        sink = make_sink(broker.bootstrap, tls=True, insecure=True)
        for call in (sink.open, lambda: sink.write_batch(host_records)):
            t0 = time.monotonic()
            with pytest.raises(SinkError) as caught:
                call()
            assert time.monotonic() - t0 < BOUND_S
            assert caught.value.retryable and caught.value.category == UNREACHABLE
    finally:
        broker.stop()


def test_tls_with_the_ca_verifies_the_broker_and_its_name(kafka_tls_factory, kafka_certs, host_records):
    front = kafka_tls_factory(cert="server")
    with pytest.raises(SinkError) as caught:  # the system's CAs do not know the test CA
        make_sink(front.bootstrap, tls=True).open()
    assert caught.value.category == AUTH

    topic = new_topic_name()
    sink = make_sink(front.bootstrap, tls=True, tls_ca=str(kafka_certs.ca), topic=topic)
    try:
        sink.write_batch(host_records)
    finally:
        sink.close()
    assert sorted(m.value for m in _behind(front, topic, len(host_records))) == sorted(r.json_bytes() for r in host_records)

    wrong_name = kafka_tls_factory(cert="wrong-host")
    with pytest.raises(SinkError) as caught:
        make_sink(wrong_name.bootstrap, tls=True, tls_ca=str(kafka_certs.ca)).open()
    assert caught.value.category == AUTH and "127.0.0.1" in str(caught.value)


def test_mutual_tls(kafka_tls_factory, kafka_certs, host_records):
    front = kafka_tls_factory(cert="server", client_auth=True)
    with pytest.raises(SinkError) as caught:
        make_sink(front.bootstrap, tls=True, tls_ca=str(kafka_certs.ca)).open()
    assert caught.value.category == AUTH, caught.value

    topic = new_topic_name()
    sink = make_sink(
        front.bootstrap, tls=True, tls_ca=str(kafka_certs.ca), tls_cert=str(kafka_certs.client_cert),
        tls_key=str(kafka_certs.client_key), topic=topic,
    )  # fmt: skip
    try:
        sink.write_batch(host_records)
    finally:
        sink.close()
    assert len(_behind(front, topic, len(host_records))) == len(host_records)


def _behind(front, topic: str, count: int) -> list:
    """The records that reached the broker behind a TLS front."""
    return front.consume(topic, count=count)


# -- SASL ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"])
def test_sasl_refused_is_an_auth_error(kafka_broker_factory, mechanism, host_records):
    broker = kafka_broker_factory(authentication=True)
    sink = make_sink(broker.bootstrap, sasl_mechanism=mechanism, sasl_username="nobody", sasl_password="wrong")
    assert sink.producer_config()["security_protocol"] == "SASL_PLAINTEXT"
    t0 = time.monotonic()
    with pytest.raises(SinkError) as caught:
        sink.write_batch(host_records)
    assert time.monotonic() - t0 < BOUND_S
    assert caught.value.category == AUTH and caught.value.retryable, caught.value
    assert mechanism in str(caught.value)


def test_sasl_over_tls_and_credentials_in_the_producer_config():
    config = KafkaSink(
        KafkaSettings(tls=True, sasl_mechanism="SCRAM-SHA-512", sasl_username="u", sasl_password="p")
    ).producer_config()
    assert config["security_protocol"] == "SASL_SSL"
    assert (config["sasl_mechanism"], config["sasl_plain_username"], config["sasl_plain_password"]) == ("SCRAM-SHA-512", "u", "p")


def test_scram_matches_rfc_7677():
    """The connection check's SCRAM client, on the RFC 7677 example exchange (SCRAM-SHA-256)."""
    nonce = "rOprNGfwEbeRWgbNEkqO"
    bare = scram_client_first_bare("user", nonce)
    assert bare == "n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    final, server_signature = scram_client_final("SCRAM-SHA-256", "pencil", bare, server_first, nonce)
    assert final == "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    assert server_signature == "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


# -- settings -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings, message",
    [
        ({"tls_ca": "/ca.pem"}, "only apply with tls = true"),
        ({"insecure": True}, "only apply with tls = true"),
        ({"tls": True, "tls_key": "/k.pem"}, "tls_key needs tls_cert"),
        ({"tls": True, "insecure": True, "tls_ca": "/ca.pem"}, "remove one"),
        ({"sasl_mechanism": "PLAIN", "sasl_username": "u"}, "needs sasl_username and sasl_password"),
        ({"sasl_username": "u", "sasl_password": "p"}, "need sasl_mechanism"),
        ({"bootstrap_servers": "a:1,b:x"}, "expected host:port"),
        ({"topic": "no spaces"}, "pattern"),
    ],
)
def test_settings_refuse_inconsistent_combinations(settings, message):
    with pytest.raises(ValueError, match=message):
        KafkaSettings.model_validate(settings)


def test_bootstrap_servers_forms():
    settings = KafkaSettings.model_validate({"bootstrap_servers": "k1:9093, [::1]:9094,k3"})
    assert KafkaSink(settings)._servers == [("k1", 9093), ("::1", 9094), ("k3", 9092)]


# -- the published schema -----------------------------------------------------------------------
def test_published_schema_is_what_the_schema_command_prints(host_records):
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "schema", "--kind", "stats"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    published = (ROOT / "schemas" / "container-stats.schema.json").read_text()
    assert result.stdout == published, "regenerate: container-exporter schema --kind stats > schemas/container-stats.schema.json"
    schema = json.loads(published)
    assert schema["title"] == "ContainerStats" and schema["additionalProperties"] is False
    for record in host_records:
        document = json.loads(record.json_bytes())
        assert set(document) <= set(schema["properties"])
        assert set(schema["required"]) <= set(document)
        assert document["schema_version"] == schema["properties"]["schema_version"]["default"]

    everything = subprocess.run(
        [sys.executable, "-m", "exporter", "schema", "--kind", "all"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert everything.returncode == 0 and json.loads(everything.stdout)["stats"] == schema
    events = subprocess.run(
        [sys.executable, "-m", "exporter", "schema", "--kind", "events"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert events.stdout == (ROOT / "schemas" / "container-events.schema.json").read_text()
    assert json.loads(events.stdout)["title"] == "Event"
