"""`adpulse trainer` against the real broker: learns, exports candidates, refuses bad labels,
and after a kill -9 resumes from its checkpoint learning every label exactly once."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from adpulse.broker import free_port
from adpulse.core.settings import Settings
from adpulse.inspect import read_topic
from adpulse.workerproc import ChildProcess
from scoring.features import fingerprint
from scoring.featurespec import FeatureSpec, from_feedback
from scoring.registry import CANDIDATES, ModelRegistry, validate
from scoring.synthetic import World, generate, make_world
from streams.runtime.topicadmin import create_topics

pytestmark = [pytest.mark.integration, pytest.mark.long]  # make test stays under 10 minutes
torch = pytest.importorskip("torch")
BASE = "20240101T000000Z"


@pytest.fixture(scope="module")
def base_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One offline-trained version (with its model.pt) for every test here to warm-start from."""
    from scoring.train import train

    out = tmp_path_factory.mktemp("base-models")
    train(generate(3000, seed=5), out, epochs=1, version=BASE, threads=1)
    return out / BASE


class Trainer(ChildProcess):
    """A real `adpulse trainer` subprocess: its metrics over HTTP, its checkpoint on disk."""

    def __init__(self, settings: Settings, model_dir: Path, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.dir = settings.data_dir / "trainer"
        self.log_path = log_path
        self.env = {
            **os.environ,
            "ADPULSE_BOOTSTRAP": settings.bootstrap,
            "ADPULSE_EMBEDDED_BROKER": "true",
            "ADPULSE_TOPIC_PREFIX": settings.topic_prefix,
            "ADPULSE_DATA_DIR": str(settings.data_dir),
            "ADPULSE_MODEL_DIR": str(model_dir),
            "ADPULSE_TRAINER_PORT": str(self.port),
            "ADPULSE_DEVICE": "cpu",
            "ADPULSE_MODEL_LATENCY_BUDGET_MS": "inf",  # speed is a bench figure, not a test's
            "ADPULSE_TRAIN_INTERVAL_S": "2",
            "ADPULSE_TRAINER_CHECKPOINT_S": "1",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Trainer:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "adpulse.cli", "trainer"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        return self

    def metric(self, name: str, labels: str = "") -> float:
        assert self.proc is not None
        if self.proc.poll() is not None:
            msg = f"trainer exited with {self.proc.returncode}:\n{self.tail()}"
            raise AssertionError(msg)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return 0.0
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") and labels in line)  # fmt: skip

    def learned(self) -> float:
        return self.metric("adpulse_trainer_labels_total", 'outcome="learned"')

    def checkpoint(self) -> dict[str, Any] | None:
        path = self.dir / "checkpoint.pt"
        if not path.is_file():
            return None
        out: dict[str, Any] = torch.load(str(path), map_location="cpu", weights_only=True)
        return out

    def wait(self, check: Any, what: str, timeout: float = 180.0) -> None:
        self.wait_until(check, timeout, what, every=0.1)


@pytest.fixture
def model_dir(tmp_path: Path, base_version: Path) -> Path:
    out = tmp_path / "models"
    shutil.copytree(base_version, out / BASE)
    return out


@pytest.fixture
def trainers(tmp_path: Path) -> Iterator[list[Trainer]]:
    started: list[Trainer] = []
    yield started
    for t in started:
        t.stop()


def _send(settings: Settings, values: list[bytes], keys: list[bytes] | None = None) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, linger_ms=5)
    for i, v in enumerate(values):
        key = keys[i] if keys else b"ad"
        producer.send(settings.topic("ctr-feedback"), key=key, value=v)
    producer.flush()
    producer.close()


@pytest.fixture(scope="module")
def world() -> World:
    return make_world(5)


def _labels(world: World, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` labels of one world; decision ids ``syn{seed}-{i}``, unique per seed."""
    return generate(n, seed=seed, world=world)


def _encode(recs: list[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(r).encode() for r in recs]


def _checksum(ids: list[str]) -> int:
    return sum(fingerprint(d) for d in ids) & ((1 << 64) - 1)


def test_the_trainer_learns_from_ctr_feedback_and_exports_a_candidate_that_is_not_served(
    settings: Settings, model_dir: Path, tmp_path: Path, trainers: list[Trainer], world: World
) -> None:
    create_topics(settings)
    recs = _labels(world, 3000, seed=21)
    _send(settings, _encode(recs), [r["ad_id"].encode() for r in recs])
    t = Trainer(settings, model_dir, tmp_path / "trainer.log").start()
    trainers.append(t)

    def exported() -> list[dict[str, Any]]:
        found = sorted((model_dir / CANDIDATES).glob("*/metrics.json"))
        return [json.loads(p.read_text()) for p in found]

    t.wait(lambda: any(m["labels_learned"] == 3000 for m in exported()),
           "a candidate that learned all 3000 labels")  # fmt: skip
    m = next(m for m in exported() if m["labels_learned"] == 3000)
    assert m["base_version"] == BASE and m["serving_version"] == BASE
    held = m["validation"]
    assert held["window_labels"] == 1000 and held["online"]["labels"] == 1000
    assert held["serving"]["labels"] == 1000  # both models scored the same held-back labels
    assert 0.5 < m["auc"] <= 1.0 and m["logloss"] > 0 and m["observed_over_expected"] > 0
    cand = model_dir / CANDIDATES / m["version"]
    assert (cand / "model.pt").is_file()
    spec = FeatureSpec()
    assert validate(cand, spec, latency_budget_ms=math.inf).version == m["version"]
    # Exported, not served: the worker's registry still serves the base version.
    assert ModelRegistry(model_dir, spec, latency_budget_ms=math.inf).latest_valid().version == BASE
    # Progressive validation per model version on /metrics, both windows.
    for version in ("online", BASE):
        for window in ("1000", "10000"):
            labels = f'version="{version}",window="{window}"'
            assert 0.5 < t.metric("adpulse_trainer_auc", labels) <= 1.0
            assert t.metric("adpulse_trainer_calibration", labels) > 0


def test_bad_labels_are_dead_lettered_and_counted_never_learned(
    settings: Settings, model_dir: Path, tmp_path: Path, trainers: list[Trainer], world: World
) -> None:
    create_topics(settings)
    good = _labels(world, 400, seed=31)
    bad_schema = {**good[0], "decision_id": "bad-1", "clicked": 2}
    duplicate = {**good[5]}  # the joiner's one duplicate window: same decision, new offset
    short = {**good[6], "decision_id": "bad-2",
             "features": {**good[6]["features"], "interest": [0.1, 0.2]}}  # fmt: skip
    conversion = {**good[7], "converted": 1, "clicked": 1}  # skipped: not a second label
    values = [*_encode(good), b"{not json", *_encode([bad_schema, duplicate, short, conversion])]
    _send(settings, values)
    t = Trainer(settings, model_dir, tmp_path / "trainer.log").start()
    trainers.append(t)

    t.wait(lambda: t.metric("adpulse_trainer_labels_total") == len(values), "every record seen")
    assert t.learned() == 400
    assert t.metric("adpulse_trainer_labels_total", 'outcome="dead_lettered"') == 4
    assert t.metric("adpulse_trainer_labels_total", 'outcome="conversion"') == 1
    letters = [json.loads(r.value) for r in read_topic(settings, settings.topic("dead-letters"),
                                                        expect=4)]  # fmt: skip
    assert sorted(d["error"] for d in letters) == ["duplicate", "features", "invalid_json",
                                                    "schema"]  # fmt: skip
    assert {d["stage"] for d in letters} == {"trainer"}
    t.wait(lambda: (t.checkpoint() or {}).get("learned") == 400, "the checkpoint of 400 labels")
    ckpt = t.checkpoint()
    assert ckpt is not None
    assert ckpt["checksum"] == _checksum([r["decision_id"] for r in good])
    t.stop()  # SIGTERM: a last checkpoint, exit 0
    assert t.proc is not None and t.proc.returncode == 0, t.tail()


def test_a_trainer_killed_mid_batch_resumes_without_learning_a_label_twice(
    settings: Settings, model_dir: Path, tmp_path: Path, trainers: list[Trainer], world: World
) -> None:
    create_topics(settings)
    sent: list[str] = []
    stop = threading.Event()

    def produce() -> None:  # labels keep coming, so there is always work since the checkpoint
        seed = 100
        while not stop.is_set():
            recs = _labels(world, 200, seed=seed)
            _send(settings, _encode(recs), [r["ad_id"].encode() for r in recs])
            sent.extend(r["decision_id"] for r in recs)
            seed += 1
            stop.wait(0.1)

    env = {"ADPULSE_TRAINER_BATCH": "64", "ADPULSE_TRAIN_INTERVAL_S": "3600"}
    first = Trainer(settings, model_dir, tmp_path / "trainer-1.log", **env).start()
    trainers.append(first)
    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        seen: dict[str, float] = {}

        def behind_its_checkpoint() -> bool:
            ckpt = first.checkpoint()
            if ckpt is None or ckpt["learned"] < 500:
                return False
            seen["ckpt"], seen["learned"] = ckpt["learned"], first.learned()
            return seen["learned"] > seen["ckpt"]

        first.wait(behind_its_checkpoint, "labels learned since the last checkpoint")
        first.kill()  # mid-batch: what it learned since the checkpoint is lost
    finally:
        stop.set()
        producer.join(30)
    lost = first.checkpoint()
    assert lost is not None and lost["learned"] < seen["learned"]  # work was lost

    second = Trainer(settings, model_dir, tmp_path / "trainer-2.log", **env).start()
    trainers.append(second)
    total = len(sent)
    second.wait(lambda: (second.checkpoint() or {}).get("learned") == total,
                f"all {total} labels in the checkpoint")  # fmt: skip
    ckpt = second.checkpoint()
    assert ckpt is not None
    assert ckpt["checksum"] == _checksum(sent)  # each decision id learned, and only once
    assert second.learned() == total - lost["learned"]  # resumed exactly at the saved offsets
    assert second.metric("adpulse_trainer_labels_total", 'outcome="dead_lettered"') == 0


def test_a_sequence_model_with_two_heads_keeps_learning_both_heads_and_its_attention(
    settings: Settings, tmp_path: Path, trainers: list[Trainer], world: World
) -> None:
    """Warm start from a sequence model with pCVR (as shipped): the labels' logged behaviours
    rebuild the attention's input, conversions teach pCVR, and the candidate keeps the spec."""
    from scoring.online import load_weights
    from scoring.train import train

    create_topics(settings)
    model_dir = tmp_path / "models"
    train(generate(3000, seed=5, conversions=True, sequence=8), model_dir, epochs=1,
          version=BASE, threads=1, sequence=8, cvr=True)  # fmt: skip
    recs = generate(2000, seed=41, world=world, conversions=True, sequence=8)
    labels = [r for r in recs if r.get("converted") != 1]
    conversions = len(recs) - len(labels)
    assert conversions > 0 and all(r["features"].get("sequence") is not None for r in recs)
    _send(settings, _encode(recs), [r["ad_id"].encode() for r in recs])
    t = Trainer(settings, model_dir, tmp_path / "trainer.log").start()
    trainers.append(t)

    def done() -> dict[str, Any] | None:
        for p in sorted((model_dir / CANDIDATES).glob("*/metrics.json")):
            m = json.loads(p.read_text())
            if m["labels_learned"] == len(labels) and m["conversions_learned"] == conversions:
                return m
        return None

    t.wait(lambda: done() is not None, "a candidate that learned every label and conversion")
    m = done()
    assert m is not None and (m["heads"], m["sequence"]) == (2, 8)
    assert t.metric("adpulse_trainer_labels_total", 'outcome="conversion"') == conversions
    cand = model_dir / CANDIDATES / m["version"]
    loaded = validate(cand, FeatureSpec(), latency_budget_ms=math.inf)  # as a worker would
    assert loaded.spec.sequence == 8 and loaded.scorer.heads == 2
    online = load_weights(cand / "model.pt", FeatureSpec())
    base = load_weights(model_dir / BASE / "model.pt", FeatureSpec())
    x = from_feedback(labels[:300], loaded.spec)
    args = [torch.from_numpy(x[k]) for k in loaded.spec.input_names]
    with torch.no_grad():
        want = [h.numpy().reshape(-1) for h in online.heads(*args)]
        before = [h.numpy().reshape(-1) for h in base.heads(*args)]
    got = loaded.scorer.score_heads(x)
    for g, w, b in zip(got, want, before, strict=True):
        assert float(abs(g - w).max()) < 1e-5  # the served ONNX scores as PyTorch
        assert float(abs(w - b).max()) > 1e-4  # and both heads moved from the warm start
    moved = (online.attention.k.weight - base.attention.k.weight).abs().max()
    assert float(moved) > 0  # the attention block learned too
