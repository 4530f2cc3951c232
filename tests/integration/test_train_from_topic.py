"""`adpulse train --from-topic` trains on the ctr-feedback records on the broker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kafka import KafkaProducer

from adpulse.cli import main
from adpulse.core.settings import Settings
from scoring.synthetic import generate
from streams.runtime.topicadmin import create_topics

pytestmark = [pytest.mark.integration, pytest.mark.long]  # make test stays under 10 minutes


def test_train_from_the_feedback_topic_writes_a_valid_version(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    monkeypatch.setenv("ADPULSE_TOPIC_PREFIX", settings.topic_prefix)
    create_topics(settings)
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, linger_ms=5)
    for rec in generate(4000, seed=3):
        producer.send(settings.topic("ctr-feedback"), key=rec["ad_id"].encode(),
                      value=json.dumps(rec).encode())  # fmt: skip
    producer.flush()
    producer.close()

    out = tmp_path / "models"
    args = ["train", "--from-topic", "--epochs", "1", "--out", str(out),
            "--bootstrap", settings.bootstrap]  # fmt: skip
    assert main(args) == 0
    (version,) = list(out.iterdir())
    metrics = json.loads((version / "metrics.json").read_text())
    assert metrics["n_train"] + metrics["n_test"] == 4000
    assert (version / "model.onnx").stat().st_size > 0
