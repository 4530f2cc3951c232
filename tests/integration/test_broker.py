"""The embedded broker starts, answers Kafka clients over TCP and stops without orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from adpulse.broker import EmbeddedBroker, embedded_broker, free_port
from adpulse.core.errors import BrokerStartError
from adpulse.core.probe import metadata_answers
from adpulse.core.settings import Settings
from adpulse.kafkabroker import JIT_FLAGS

pytestmark = pytest.mark.integration


def test_session_broker_answers_metadata(broker: EmbeddedBroker) -> None:
    host, port = broker.bootstrap.split(":")
    assert metadata_answers(host, int(port))


def test_session_kafka_runs_with_the_jit_its_setting_names(broker: EmbeddedBroker) -> None:
    """ADPULSE_KAFKA_JIT reaches the JVM (adpulse/kafkabroker.py, JIT_FLAGS): read off the
    running broker's own command line."""
    if broker.kind != "kafka":
        pytest.skip("ADPULSE_EMBEDDED is not kafka")
    assert broker.proc is not None
    argv = Path(f"/proc/{broker.proc.pid}/cmdline").read_bytes().decode().split("\0")
    wanted = JIT_FLAGS[Settings.from_env().kafka_jit]
    assert all(flag in argv for flag in wanted), argv
    assert ("-XX:TieredStopAtLevel=1" in argv) == bool(wanted), argv


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


@pytest.mark.long  # ~4 s, a broker of its own: make test stays under 10 minutes
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


def _broker_cli(port: int, state: Path) -> tuple[subprocess.Popen[str], int]:
    """`adpulse broker --port PORT` in its own process; returns it and its broker child's pid.

    ``state`` takes its announcement (adpulse.core.announce), not the user's state folder."""
    cli = Path(sys.executable).with_name("adpulse")
    env = {**os.environ, "XDG_STATE_HOME": str(state)}
    proc = subprocess.Popen([str(cli), "broker", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the broker answers (or the command fails)
    assert "answering on" in line, line
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    pids = [int(p) for p in children.stdout.split()]
    assert len(pids) == 1, f"expected one broker process under the CLI, found {pids}"
    return proc, pids[0]


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:  # bench-ok: a wait bound, not a timing claim
        try:
            os.kill(pid, 0)
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if stat[0] == "Z":  # exited; only its (reaped-by-init) entry remains
                return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.long  # ~4 s, a broker of its own: make test stays under 10 minutes
def test_broker_command_stops_its_broker_on_sigterm_and_leaves_no_orphan(tmp_path: Path) -> None:
    port = free_port()
    proc, child = _broker_cli(port, tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert _gone(child, 5), "the broker process outlived `adpulse broker`"
    assert not metadata_answers("127.0.0.1", port, timeout=0.3)


@pytest.mark.long  # ~4 s, a broker of its own: make test stays under 10 minutes
def test_broker_dies_with_its_parent_killed_by_sigkill(tmp_path: Path) -> None:
    port = free_port()
    proc, child = _broker_cli(port, tmp_path)
    proc.kill()  # no handler runs: only the kernel's parent-death signal can stop the broker
    proc.wait()
    assert _gone(child, 60), "the broker survived its parent's kill -9 (orphan)"
