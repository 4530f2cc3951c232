"""TLS and SASL/SCRAM end to end: a real Apache Kafka with a SASL_SSL listener.

The broker (adpulse.kafkabroker.SecureListener) serves clients only over TLS with
SCRAM users; its certificate comes from a CA this module makes (trustme). A worker
with the right settings runs the loop (events in, interest out); a wrong password
or a CA that did not sign the broker's certificate stops it at start with one line
and exit code 3.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from adpulse import replay
from adpulse.broker import free_port
from adpulse.core.settings import Settings
from adpulse.kafkabroker import KafkaBroker, SecureListener
from adpulse.workerproc import WorkerProcess
from streams.runtime.topicadmin import create_topics

pytestmark = [pytest.mark.integration, pytest.mark.long]
USER, PASSWORD = "adpulse-app", "s3cret-scram-password"


@dataclass(frozen=True)
class Secured:
    bootstrap: str
    ca: Path  # the CA that signed the broker's certificate
    other_ca: Path  # a CA that did not
    password: Path
    wrong_password: Path


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    tmp = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    # Kafka's PEM keystore reads PKCS#8 keys only; trustme writes the traditional form.
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()  # fmt: skip
    chain = "".join(blob.bytes().decode() for blob in leaf.cert_chain_pems)
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(tmp / "other-ca.pem"))
    (tmp / "password").write_text(PASSWORD)
    (tmp / "wrong-password").write_text(PASSWORD + "-not")
    broker = KafkaBroker(
        free_port(), tmp / "broker.log", settings=Settings.from_env(),
        secure=SecureListener(chain, pkcs8, {USER: PASSWORD}),
    )  # fmt: skip
    with broker:
        yield Secured(broker.bootstrap, tmp / "ca.pem", tmp / "other-ca.pem",
                      tmp / "password", tmp / "wrong-password")  # fmt: skip


def client_env(sec: Secured, *, password: Path, ca: Path, mechanism: str) -> dict[str, str]:
    return {
        "ADPULSE_SECURITY_PROTOCOL": "SASL_SSL",
        "ADPULSE_SASL_MECHANISM": mechanism,
        "ADPULSE_SASL_USERNAME": USER,
        "ADPULSE_SASL_PASSWORD_FILE": str(password),
        "ADPULSE_SSL_CAFILE": str(ca),
    }


def test_worker_with_the_right_tls_and_scram_settings_runs_the_loop(
    secured: Secured, unique: str, tmp_path: Path
) -> None:
    env = client_env(secured, password=secured.password, ca=secured.ca, mechanism="SCRAM-SHA-512")
    s = Settings.from_env(
        env, bootstrap=secured.bootstrap, embedded_broker=True, topic_prefix=f"{unique}.",
        app_id=f"adpulse-{unique}", data_dir=tmp_path / "data", session_timeout_s=6.0,
    )  # fmt: skip
    create_topics(s)  # the tools' clients (kafka-python) over SASL_SSL
    worker = WorkerProcess(s, tmp_path, extra_env=env).start()  # Faust/aiokafka over SASL_SSL
    try:
        now = int(time.time() * 1000)
        events = [
            replay.Event(f"{unique}-{i}", f"tls-user-{i % 3}", "click", 1000 + i, 7 + i % 2, now)
            for i in range(30)
        ]
        assert replay.produce(events, s, s.topic("user-events")) == len(events)

        def applied() -> bool:
            bodies = [worker.interest(f"tls-user-{u}") for u in range(3)]
            return all(b is not None and sum(b["counts"].values()) == 10 for b in bodies)

        worker.wait_until(applied, 90, "30 events over SASL_SSL applied")
        body = worker.interest("tls-user-0")
        assert body is not None
        assert any(abs(x) > 0 for x in body["vector_now"])
    finally:
        worker.stop()


def run_worker(secured: Secured, tmp_path: Path, **kw: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **client_env(secured, mechanism="SCRAM-SHA-256", **kw),
        "ADPULSE_BOOTSTRAP": secured.bootstrap,
        "ADPULSE_EMBEDDED_BROKER": "true",
        "ADPULSE_DATA_DIR": str(tmp_path / "data"),
        "ADPULSE_WEB_PORT": str(free_port()),
    }
    return subprocess.run(
        [sys.executable, "-m", "adpulse.cli", "worker"],
        env=env, capture_output=True, text=True, timeout=120, check=False,  # a wait bound
    )  # fmt: skip


def test_worker_with_a_wrong_password_stops_with_one_line_and_exit_3(
    secured: Secured, tmp_path: Path
) -> None:
    done = run_worker(secured, tmp_path, password=secured.wrong_password, ca=secured.ca)
    assert done.returncode == 3, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("adpulse: error: the broker at 127.0.0.1:")
    assert f"refused SASL SCRAM-SHA-256 login as '{USER}'" in line
    assert "ADPULSE_SASL_PASSWORD_FILE" in line
    assert PASSWORD not in done.stderr + done.stdout


def test_worker_that_does_not_trust_the_brokers_certificate_stops_with_one_line_and_exit_3(
    secured: Secured, tmp_path: Path
) -> None:
    done = run_worker(secured, tmp_path, password=secured.password, ca=secured.other_ca)
    assert done.returncode == 3, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("adpulse: error: TLS to 127.0.0.1:")
    assert "certificate is not trusted" in line
    assert "ADPULSE_SSL_CAFILE" in line
