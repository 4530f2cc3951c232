"""The embedded broker starts, answers Kafka clients over TCP and stops without orphans."""

from __future__ import annotations

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from adpulse.broker import EmbeddedBroker, embedded_broker, free_port, metadata_answers
from adpulse.errors import BrokerStartError
from adpulse.settings import Settings

pytestmark = pytest.mark.integration


def test_session_broker_answers_metadata(broker: EmbeddedBroker) -> None:
    host, port = broker.bootstrap.split(":")
    assert metadata_answers(host, int(port))


def test_kafka_python_round_trip_through_embedded_broker(
    broker: EmbeddedBroker, unique: str
) -> None:
    topic = f"{unique}-roundtrip"
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=1)
    sent = [(f"k{i % 7}".encode(), f"value-{i}".encode()) for i in range(50)]
    for key, value in sent:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()

    consumer = KafkaConsumer(
        bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    partitions = consumer.partitions_for_topic(topic)
    assert partitions
    consumer.assign([TopicPartition(topic, p) for p in partitions])
    got: list[tuple[bytes, bytes]] = []
    for _ in range(50):
        for records in consumer.poll(timeout_ms=200).values():
            got.extend((r.key, r.value) for r in records)
        if len(got) >= len(sent):
            break
    consumer.close()
    assert sorted(got) == sorted(sent)


def test_broker_stops_cleanly_and_frees_its_port() -> None:
    port = free_port()
    broker = embedded_broker(Settings.from_env(), port=port).start()
    proc = broker.proc
    assert proc is not None
    broker.stop()
    assert proc.poll() is not None, f"{broker.name} still running after stop()"
    assert not metadata_answers("127.0.0.1", port, timeout=0.3)


def test_second_broker_on_a_taken_port_is_refused(broker: EmbeddedBroker) -> None:
    with pytest.raises(BrokerStartError, match="already has a Kafka broker"):
        embedded_broker(Settings.from_env(), port=broker.port).start()
