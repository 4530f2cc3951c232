"""`adpulse promoter` against the real broker: candidates refused at validation or rolled back
at canary while the old version keeps serving, a good one promoted, and a live calibration
drift rolled back at once; every transition a model-events record under its contract."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from adpulse.broker import free_port
from adpulse.core.settings import Settings
from adpulse.inspect import read_topic
from adpulse.polling import log_tail, poll_until
from schemas import first_error
from scoring.promotion import PromotionState, read_state
from scoring.registry import CANDIDATES, METRICS, MODEL, ModelRegistry
from scoring.synthetic import generate
from streams.runtime.topicadmin import create_topics

pytestmark = [pytest.mark.integration, pytest.mark.long]  # make test stays under 10 minutes
torch = pytest.importorskip("torch")
BASE = "20240101T000000Z"
MIN_LABELS = 300


@pytest.fixture(scope="module")
def base_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One offline-trained version with its model.pt (the promoter checks ONNX against it)."""
    from scoring.train import train

    out = tmp_path_factory.mktemp("base-models")
    train(generate(2000, seed=5), out, epochs=1, version=BASE, threads=1)
    return out / BASE


@pytest.fixture(scope="module")
def shuffled(
    tmp_path_factory: pytest.TempPathFactory, base_version: Path
) -> tuple[Path, dict[str, Any]]:
    """A version trained on the base's rows with their click labels shuffled, and its
    held-back validation as the trainer writes it: both models scored on the same 1,000
    labels of the same world, which neither learned."""
    import random

    import numpy as np

    from scoring.featurespec import FeatureSpec, from_feedback
    from scoring.scorer import OnnxScorer
    from scoring.synthetic import make_world
    from scoring.train import auc, train

    rows = generate(2000, seed=5)
    clicks = [r["clicked"] for r in rows]
    random.Random(1).shuffle(clicks)
    out = tmp_path_factory.mktemp("shuffled")
    train([{**r, "clicked": c} for r, c in zip(rows, clicks, strict=True)], out, epochs=1,
          version="shuffled", threads=1)  # fmt: skip
    held = generate(1000, seed=77, world=make_world(5))
    x, y = from_feedback(held, FeatureSpec()), np.array([r["clicked"] for r in held])

    def window(path: Path) -> dict[str, Any]:
        p = OnnxScorer(path / MODEL, version=path.name).score(x)
        return {"labels": len(y), "clicks": int(y.sum()), "auc": round(auc(y, p), 6)}

    return out / "shuffled", {"online": window(out / "shuffled"), "serving": window(base_version)}


@pytest.fixture
def model_dir(tmp_path: Path, base_version: Path) -> Path:
    out = tmp_path / "models"
    shutil.copytree(base_version, out / BASE)
    return out


class Promoter:
    """A real `adpulse promoter` subprocess."""

    def __init__(self, settings: Settings, model_dir: Path, log_path: Path) -> None:
        self.log_path, self.model_dir = log_path, model_dir
        self.env = {
            **os.environ,
            "ADPULSE_BOOTSTRAP": settings.bootstrap,
            "ADPULSE_EMBEDDED_BROKER": "true",
            "ADPULSE_TOPIC_PREFIX": settings.topic_prefix,
            "ADPULSE_DATA_DIR": str(settings.data_dir),
            "ADPULSE_MODEL_DIR": str(model_dir),
            "ADPULSE_PROMOTER_PORT": str(free_port()),
            "ADPULSE_DEVICE": "cpu",
            "ADPULSE_MODEL_LATENCY_BUDGET_MS": "inf",  # speed is a bench figure, not a test's
            "ADPULSE_SCORER_THREADS": "1",
            "ADPULSE_PROMOTER_POLL_S": "0.3",
            "ADPULSE_CANARY_MIN_LABELS": str(MIN_LABELS),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Promoter:
        with self.log_path.open("ab") as log:
            cmd = [sys.executable, "-m", "adpulse.cli", "promoter"]
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def state(self) -> PromotionState | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            msg = f"promoter exited with {self.proc.returncode}:\n{self.tail()}"
            raise AssertionError(msg)
        return read_state(self.model_dir)

    def wait_for(self, check: Any, what: str) -> PromotionState:
        def ok() -> bool:
            st = self.state()
            return st is not None and bool(check(st))

        poll_until(ok, 120.0, what, every=0.1, detail=self.tail, error=AssertionError)
        st = self.state()
        assert st is not None
        return st

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def tail(self) -> str:
        return log_tail(self.log_path, 40)


@pytest.fixture
def promoter(settings: Settings, model_dir: Path, tmp_path: Path) -> Iterator[Promoter]:
    create_topics(settings)
    p = Promoter(settings, model_dir, tmp_path / "promoter.log").start()
    p.wait_for(lambda st: st.serving == BASE, "the promoter writes its first state")
    yield p
    p.stop()


def _candidate(model_dir: Path, base: Path, name: str, online_auc: float = 0.70,
               broken: bool = False, validation: dict[str, Any] | None = None) -> None:  # fmt: skip
    """A candidate as the trainer exports it: weights, held-back metrics (by default as
    good as the serving version's), renamed into place whole."""
    tmp = model_dir / CANDIDATES / f".{name}.tmp"
    shutil.copytree(base, tmp)
    metrics = json.loads((tmp / METRICS).read_text())
    metrics["validation"] = validation or {
        "online": {"labels": 1000, "clicks": 50, "auc": online_auc},
        "serving": {"labels": 1000, "clicks": 50, "auc": 0.70},
    }
    metrics["serving_version"] = BASE
    (tmp / METRICS).write_text(json.dumps(metrics))
    if broken:
        data = (tmp / MODEL).read_bytes()
        (tmp / MODEL).write_bytes(data[: len(data) // 3])
    tmp.rename(model_dir / CANDIDATES / name)


def _send_labels(settings: Settings, tag: str, version: str, n: int, clicks: int, pctr: float,
                 ts: int) -> None:  # fmt: skip
    """``n`` labels of decisions ``version`` scored at ``ts``, the first ``clicks`` clicked.
    One key: one partition, so the promoter reads them in the order sent."""
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, linger_ms=5)
    for i in range(n):
        label = {"decision_id": f"{tag}-{i}", "ad_id": "ad-1", "user_id": f"u{i}",
                 "clicked": int(i < clicks), "decision_ts": ts, "label_ts": ts + 1000,
                 "features": {"interest": [], "pctr": pctr}, "propensity": 1.0, "pctr": pctr,
                 "model_version": version}  # fmt: skip
        producer.send(settings.topic("ctr-feedback"), key=b"ad-1", value=json.dumps(label).encode())
    producer.flush()
    producer.close()


def _events(settings: Settings, expect: int) -> dict[str, list[dict[str, Any]]]:
    """Each version's events in order (keyed by version: one partition each, ordered there)."""
    recs = read_topic(settings, settings.topic("model-events"), expect=expect, idle_s=1.0)
    assert len(recs) == expect
    out: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        ev = json.loads(r.value)
        assert first_error("model-events", ev) is None, ev
        assert r.key == ev["version"].encode()
        out.setdefault(ev["version"], []).append(ev)
    return out


def _story(events: dict[str, list[dict[str, Any]]]) -> dict[str, list[tuple[str, str]]]:
    return {v: [(e["event"], e["serving"]) for e in evs] for v, evs in events.items()}


def _serving(settings: Settings, model_dir: Path) -> str:
    """What a worker starting now would serve."""
    reg = ModelRegistry.from_settings(settings.with_(model_dir=str(model_dir),
                                                     model_latency_budget_ms=math.inf))  # fmt: skip
    assert reg.latest_valid() is not None
    return reg.serving


def test_a_broken_or_worse_candidate_is_refused_or_rolled_back_and_serving_continues(
    settings: Settings,
    model_dir: Path,
    base_version: Path,
    shuffled: tuple[Path, dict[str, Any]],
    promoter: Promoter,
) -> None:
    _candidate(model_dir, base_version, "c1", broken=True)
    promoter.wait_for(lambda st: "c1" in st.decided, "the broken candidate is judged")
    path, validation = shuffled  # trained on shuffled labels: AUC about 0.44 against 0.61
    assert validation["serving"]["auc"] - validation["online"]["auc"] > 0.05
    _candidate(model_dir, path, "c2", validation=validation)
    promoter.wait_for(lambda st: "c2" in st.decided, "the worse candidate is judged")
    st = read_state(model_dir)
    assert st is not None and (st.serving, st.canary) == (BASE, "")
    # a candidate that passes validation but does worse live: CTR 1% against 5%
    _candidate(model_dir, base_version, "c3")
    st = promoter.wait_for(lambda st: st.canary == "c3", "c3 becomes the canary")
    ts = st.canary_since_ms + 1
    _send_labels(settings, "ctl", BASE, 3000, 150, 0.05, ts)  # the control first
    _send_labels(settings, "can", "c3", MIN_LABELS, 3, 0.01, ts)  # calibrated, but worse
    st = promoter.wait_for(lambda st: st.canary == "", "the canary is judged")
    assert st.serving == BASE and "c3" in st.decided
    assert _serving(settings, model_dir) == BASE
    assert not (model_dir / "c3").exists()

    events = _events(settings, 7)
    assert _story(events) == {"c1": [("candidate", BASE), ("refused", BASE)],
                              "c2": [("candidate", BASE), ("refused", BASE)],
                              "c3": [("candidate", BASE), ("canary", BASE),
                                     ("rolled_back", BASE)]}  # fmt: skip
    assert "ONNX Runtime cannot load" in events["c1"][1]["reason"]
    assert f"held-back AUC {validation['online']['auc']:.4f}" in events["c2"][1]["reason"]
    back = events["c3"][2]
    assert back["event"] == "rolled_back" and "below control" in back["reason"]
    assert (back["canary_labels"], back["canary_clicks"]) == (MIN_LABELS, 3)
    assert (back["control_labels"], back["control_clicks"]) == (3000, 150)


def test_a_good_candidate_is_promoted_and_a_live_calibration_drift_rolls_back_at_once(
    settings: Settings, model_dir: Path, base_version: Path, promoter: Promoter
) -> None:
    _candidate(model_dir, base_version, "c4")
    st = promoter.wait_for(lambda st: st.canary == "c4", "c4 becomes the canary")
    ts = st.canary_since_ms + 1
    _send_labels(settings, "ctl", BASE, 3000, 150, 0.05, ts)
    _send_labels(settings, "can", "c4", MIN_LABELS, 15, 0.05, ts)  # as good as the control
    st = promoter.wait_for(lambda st: st.serving == "c4", "c4 is promoted")
    assert (st.canary, st.last_good) == ("", BASE)
    assert (model_dir / "c4").is_dir() and not (model_dir / CANDIDATES / "c4").exists()
    assert _serving(settings, model_dir) == "c4"

    # the promoted version drifts: 45 clicks where 12.5 are predicted -> back to BASE at once,
    # judged from the 200th label (10 clicks predicted), before MIN_LABELS
    _send_labels(settings, "drift", "c4", 250, 45, 0.05, st.serving_since_ms + 1)
    st = promoter.wait_for(lambda st: st.serving == BASE, "c4 is rolled back")
    assert _serving(settings, model_dir) == BASE

    # a canary that drifts is rolled back at once too
    _candidate(model_dir, base_version, "c5")
    st = promoter.wait_for(lambda st: st.canary == "c5", "c5 becomes the canary")
    _send_labels(settings, "drift5", "c5", 220, 40, 0.05, st.canary_since_ms + 1)
    st = promoter.wait_for(lambda st: st.canary == "", "c5 is rolled back")
    assert st.serving == BASE

    events = _events(settings, 7)
    assert _story(events) == {"c4": [("candidate", BASE), ("canary", BASE), ("promoted", "c4"),
                                     ("rolled_back", BASE)],
                              "c5": [("candidate", BASE), ("canary", BASE),
                                     ("rolled_back", BASE)]}  # fmt: skip
    promoted, drift4, drift5 = events["c4"][2], events["c4"][3], events["c5"][2]
    assert promoted["canary_labels"] == MIN_LABELS and promoted["control_labels"] == 3000
    for ev in (drift4, drift5):
        assert "drift" in ev["reason"] and ev["canary_labels"] < MIN_LABELS


def test_a_worker_serves_the_canary_to_its_share_of_users_and_drops_it_on_rollback(
    settings: Settings, tmp_path: Path
) -> None:
    """A real worker follows promotion.json at its registry poll: the canary scores exactly
    the users the keyed hash puts in its share (each decision says which model), and after
    a rollback every decision is the serving version's again."""
    from adpulse.catalogtool import publish
    from scoring.promotion import in_canary, write_state
    from scoring.registry import PACKAGED
    from tests.faults.kit import Worker
    from tests.integration.test_decisions import Decisions, Requests, ad, request, wait_catalog

    shipped = sorted(p for p in PACKAGED.iterdir() if (p / MODEL).is_file())[-1]
    registry = tmp_path / "models"
    shutil.copytree(shipped, registry / shipped.name)
    shutil.copytree(shipped, registry / CANDIDATES / "canary1")
    write_state(registry, PromotionState(serving=shipped.name, canary="canary1",
                                         last_good=shipped.name))  # fmt: skip
    create_topics(settings)
    ads = [ad(f"cn-{i}", "cn", 1.0 + 0.1 * i, 4756105) for i in range(4)]
    publish(settings.bootstrap, settings.topic("ad-catalog"), ads)
    key, share = "canary-test-key", 0.3
    extra = {"ADPULSE_MODEL_DIR": str(registry), "ADPULSE_MODEL_POLL_S": "0.2",
             "ADPULSE_MODEL_LATENCY_BUDGET_MS": "inf", "ADPULSE_CANARY_SHARE": str(share),
             "ADPULSE_CANARY_KEY": key}  # fmt: skip
    worker = Worker(settings, tmp_path, extra).start()
    requests, decisions = Requests(settings), Decisions(settings)
    try:
        wait_catalog(worker, len(ads))
        first = [f"a{i}" for i in range(80)]
        requests.send([request(rid, f"user{i}", "cn") for i, rid in enumerate(first)])
        decisions.wait(first, timeout=60, settle=0.5)
        got = [decisions.one(rid) for rid in first]
        # user ids in decisions are the pseudonyms the worker hashed
        want = ["canary1" if in_canary(d["user_id"], key.encode(), share) else shipped.name
                for d in got]  # fmt: skip
        assert [d["model_version"] for d in got] == want
        assert 10 < want.count("canary1") < 40
        assert all(d["ad_id"] is not None for d in got)

        write_state(registry, PromotionState(serving=shipped.name, last_good=shipped.name,
                                             decided=["canary1"]))  # fmt: skip
        n = 0

        def all_serving() -> bool:
            nonlocal n
            batch = [f"b{n}-{i}" for i in range(20)]
            n += 1
            requests.send([request(rid, f"user{i}", "cn") for i, rid in enumerate(batch)])
            decisions.wait(batch, timeout=60, settle=0.0)
            return {decisions.one(rid)["model_version"] for rid in batch} == {shipped.name}

        poll_until(all_serving, 60.0, "the rolled-back canary leaves the worker", every=0.2,
                   detail=worker.tail, error=AssertionError)  # fmt: skip
    finally:
        requests.close()
        decisions.close()
        worker.stop()


def test_a_promotion_finished_after_a_crash_takes_its_drift_reference_from_every_label(
    settings: Settings, model_dir: Path, base_version: Path, tmp_path: Path
) -> None:
    """A crash after the canary was moved up but before promotion.json said so: the restarted
    promoter finishes the promotion and freezes the control's observed/expected as the new
    version's drift reference. It recounts the labels from the oldest, 5,000 a poll; it used
    to judge after the first poll, whose 5,000 labels predicted 5 clicks (under the 10 a
    reference needs), and froze 1.0 instead of the 2.0 all 20,000 labels give."""
    from scoring.promotion import write_state

    create_topics(settings)
    shutil.copytree(base_version, model_dir / "c2")  # moved up; the state still says canary
    write_state(model_dir, PromotionState(serving=BASE, canary="c2", canary_since_ms=1))
    _send_labels(settings, "ctl", BASE, 20_000, 40, 0.001, 2)  # 40 clicks, 20 predicted
    p = Promoter(settings, model_dir, tmp_path / "promoter.log").start()
    try:
        st = p.wait_for(lambda st: st.serving == "c2", "c2's promotion is finished")
    finally:
        p.stop()
    assert st.reference_calibration == pytest.approx(2.0, rel=1e-6)
