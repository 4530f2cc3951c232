"""CTR and CVR together (issue 16, item 6): the two-head model, its export, and cpa ranking.

The model's pCVR head is exported beside pCTR in one ONNX graph and must equal
PyTorch; the registry serves one-head and two-head models alike; a cost-per-
conversion ad is ranked on pCTR x pCVR x bid by the real decision stage, with
both numbers in its decision and its feature snapshot.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from adpulse.core.settings import Settings
from scoring import joinstate as js
from scoring.catalog import Catalog
from scoring.featurespec import FeatureSpec
from scoring.registry import MODEL, SPEC, validate
from scoring.scorer import NumpyScorer, OnnxScorer, SessionOptions
from scoring.strategy.greedy import Greedy
from scoring.strategy.policy import ByValue, Candidates
from streams.deadletter import Raw
from streams.decide import DecideStage, ServingModels, StateReaders, value_per_click
from tests.unit.test_click_billing import NOW as DAY_NOW
from tests.unit.test_click_billing import World
from tests.unit.test_pacing_stage import Tables

torch = pytest.importorskip("torch")
from scoring.model import CtrNet, export_onnx  # noqa: E402
from scoring.synthetic import generate  # noqa: E402
from scoring.train import run_train, train  # noqa: E402

FS = FeatureSpec()
ONE_THREAD = SessionOptions(intra_op_threads=1)
NOW = 1_717_200_000_000


def _version(root: Path, name: str, *, cvr_head: bool, seed: int = 0) -> tuple[CtrNet, Path]:
    torch.manual_seed(seed)
    model = CtrNet(FS, cvr_head=cvr_head)
    if cvr_head:
        model.start_cvr_at(0.1)
    d = root / name
    export_onnx(model, d / MODEL, FS)
    (d / SPEC).write_text(FS.to_json() + "\n", encoding="utf-8")
    return model, d


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory: pytest.TempPathFactory) -> tuple[CtrNet, Path]:
    torch.set_num_threads(1)
    return _version(tmp_path_factory.mktemp("models"), "v0002", cvr_head=True)


def _torch_heads(model: CtrNet, x: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        ctr, cvr = model.heads(*(torch.from_numpy(x[k]) for k in ("user", "ad", "ids", "dense")))
    return ctr.numpy().reshape(-1), cvr.numpy().reshape(-1)


@pytest.mark.parametrize("batch", [1, 37, 500])
def test_both_heads_through_onnx_equal_pytorch_at_any_batch(
    two_heads: tuple[CtrNet, Path], batch: int
) -> None:
    model, d = two_heads
    x = FS.golden_inputs(batch, seed=batch)
    want_ctr, want_cvr = _torch_heads(model, x)
    for scorer in (OnnxScorer(d / MODEL, device="cpu", options=ONE_THREAD), NumpyScorer(d / MODEL)):
        ctr, cvr = scorer.score_heads(x)
        assert cvr is not None and ctr.shape == cvr.shape == (batch,)
        assert np.max(np.abs(ctr - want_ctr)) <= 1e-5
        assert np.max(np.abs(cvr - want_cvr)) <= 1e-5
        assert np.array_equal(scorer.score(x), ctr)  # score() stays pCTR alone


def test_the_registry_serves_one_head_and_two_head_models(
    two_heads: tuple[CtrNet, Path], tmp_path: Path
) -> None:
    _, one = _version(tmp_path, "v0001", cvr_head=False)
    old = validate(one, FS, latency_budget_ms=math.inf, options=ONE_THREAD)
    assert old.scorer.heads == 1 and old.scorer.score_heads(FS.golden_inputs(3))[1] is None
    new = validate(two_heads[1], FS, latency_budget_ms=math.inf, options=ONE_THREAD)
    assert new.scorer.heads == 2
    cvr = new.scorer.score_heads(FS.golden_inputs(3))[1]
    assert cvr is not None and cvr.shape == (3,)


@pytest.mark.long  # 5-11 s: make test stays under 10 minutes
def test_training_with_conversions_reports_auc_and_calibration_for_both_heads(
    tmp_path: Path,
) -> None:
    m = run_train(None, 50_000, tmp_path, seed=3, epochs=2, threads=1, version="v1")
    assert m["heads"] == 2 and m["auc"] > 0.7
    c = m["cvr"]
    assert c["auc"] > 0.6 and c["ctcvr_auc"] > 0.7 and c["logloss"] < c["logloss_prior"]
    assert len(c["calibration"]) == 10 and c["n_test_conversions"] > 20
    loaded = validate(tmp_path / "v1", FS, latency_budget_ms=math.inf, options=ONE_THREAD)
    assert loaded.scorer.heads == 2


def test_training_without_conversions_keeps_one_head(tmp_path: Path) -> None:
    m = train(generate(2_000, seed=4), tmp_path, epochs=1, threads=1, version="v1")
    assert m["heads"] == 1 and m["cvr"] is None
    loaded = validate(tmp_path / "v1", FS, latency_budget_ms=math.inf, options=ONE_THREAD)
    assert loaded.scorer.heads == 1


def test_greedy_ranks_a_cpa_ad_on_pctr_times_pcvr_times_bid() -> None:
    pctr, bids = np.array([0.05, 0.04]), np.array([1.0, 10.0])  # cpc, then cpa
    cpa = np.array([False, True])
    for pcvr, want in ((0.1, 0), (0.2, 1)):  # cpa's value 0.04 then 0.08, against 0.05
        value = value_per_click(bids, cpa, np.array([0.5, pcvr]))  # a cpc ad's pCVR is unused
        c = Candidates(pctr, value, None, lambda: [])
        assert ByValue(Greedy()).choose(c, np.random.default_rng(0)).index == want


class Stage:
    """The real decision stage over dict tables, serving a validated two-head model."""

    def __init__(self, model_dir: Path, ads: list[dict[str, Any]]) -> None:
        s = Settings(pseudonymise=False, policy="greedy", freq_cap_per_day=10**6, pacing="off")
        loaded = validate(model_dir, FS, latency_budget_ms=math.inf, options=ONE_THREAD)
        models = ServingModels(loaded, loaded.fallback(0.02), None)  # type: ignore[arg-type]
        self.catalog = Catalog(ads, FS)
        self.stage = DecideStage(s, models, lambda: self.catalog)

    def decide(self, candidates: list[str], rid: str) -> dict[str, Any]:
        body = {"request_id": rid, "user_id": "u1", "placement": "home", "ts": NOW,
                "candidates": candidates}  # fmt: skip
        raw = Raw(json.dumps(body).encode(), b"u1", 0, 0, NOW)
        tables = StateReaders(Tables().load, Tables().load, Tables().load)
        out = self.stage.process([raw], tables, NOW)
        assert not out.rejected and len(out.decisions) == 1
        return msgspec.to_builtins(out.decisions[0][2])  # type: ignore[no-any-return]


def _ad(ad_id: str, bid: float, billing: str, cat: int) -> dict[str, Any]:
    return {"ad_id": ad_id, "campaign_id": f"c-{ad_id}", "category_id": cat, "bid": bid,
            "daily_budget": 1e9, "targeting": {}, "billing": billing}  # fmt: skip


def test_the_decision_stage_ranks_cpa_by_pctr_x_pcvr_x_bid_and_logs_both(
    two_heads: tuple[CtrNet, Path],
) -> None:
    # Each ad alone first: the model's pCTR and pCVR for it (bids are not features).
    probe = Stage(two_heads[1], [_ad("click", 1.0, "cpc", 11), _ad("buy", 1.0, "cpa", 22)])
    alone = {a: probe.decide([a], f"p-{a}") for a in ("click", "buy")}
    for d in alone.values():
        assert 0 < d["pcvr"] < 1 and d["features"]["pcvr"] == d["pcvr"]
        assert d["features"]["pctr"] == d["pctr_raw"]
    ctr_c, ctr_b, cvr_b = alone["click"]["pctr"], alone["buy"]["pctr"], alone["buy"]["pcvr"]
    per_click = ctr_c * 1.0 / ctr_b  # the cpa bid at which pCTR x bid would tie
    # A bid that wins on pCTR x bid (1.5x the tie) but loses on pCTR x pCVR x bid ...
    low = 1.5 * per_click
    assert low * cvr_b < per_click
    got = Stage(two_heads[1], [_ad("click", 1.0, "cpc", 11), _ad("buy", low, "cpa", 22)])
    assert got.decide(["click", "buy"], "r1")["ad_id"] == "click"
    # ... and one that wins on it (1.5x its tie), charged nothing when decided.
    high = 1.5 * per_click / cvr_b
    got = Stage(two_heads[1], [_ad("click", 1.0, "cpc", 11), _ad("buy", high, "cpa", 22)])
    d = got.decide(["click", "buy"], "r2")
    assert (d["ad_id"], d["billing"], d["bid"]) == ("buy", "cpa", pytest.approx(high))
    assert d["score"] == pytest.approx(d["pctr"] * d["pcvr"] * high, rel=1e-6)
    assert got.stage.budget.writes() == []


def test_a_cpa_decision_is_charged_its_bid_once_when_it_converts() -> None:
    p = js.JoinParams(window_ms=60_000, conversion_ms=60_000, grace_ms=0)
    state: dict[str, js.Pending | None] = {}
    ds = [js.Decision(f"d{i}", i, "u", "ad", 1000, campaign_id="c", category_id=7,
                      conversion_price=4.0, pcvr=0.25) for i in range(2)]  # fmt: skip
    clicks = js.apply_batch(state, ds, [js.Event(0, "u", 1200, "d0"), js.Event(1, "u", 1300, "d1")],
                            p)  # fmt: skip
    assert clicks.charges == []  # a click of a cpa ad costs nothing
    buy = js.apply_batch(state, [], [js.Event(2, "u", 1400, "", item_id=1, category_id=7)], p)
    assert [lab.converted for lab in buy.labels] == [1, 1]
    assert [lab.features.pcvr for lab in buy.labels] == [0.25, 0.25]
    # One purchase converts both: two charges named by the same purchase offset.
    assert [(c.decision_id, c.amount, c.offset) for c in buy.charges] == [
        ("d0", 4.0, 2), ("d1", 4.0, 2)
    ]  # fmt: skip


def test_two_conversions_of_one_purchase_are_both_charged_and_a_replay_charges_neither() -> None:
    world = World()
    world.decide(["cpc-a"], "warm")  # the budget copy knows the campaign
    charges = [js.Charge(f"d{i}", "c-cpc", 4.0, "events", 7) for i in range(2)]
    world.spend.write(world.stage.budget.settle(0, charges, world.spend.load, DAY_NOW))
    assert world.spend.spent("c-cpc") == pytest.approx(8.0)
    world.spend.write(world.stage.budget.settle(0, charges, world.spend.load, DAY_NOW))
    assert world.spend.spent("c-cpc") == pytest.approx(8.0)


def test_thompson_rewards_a_cpa_ad_by_its_conversions_not_its_clicks() -> None:
    from scoring.strategy.policy import parse_policy
    from scoring.strategy.state import AdState

    # Same model numbers and bids; "a" converted 100 of 1,000 shows, "b" clicked on all
    # 1,000 and converted none: for a cpa ad only conversions are its reward.
    states = [AdState(shows=1000.0, clicks=100.0, conversions=100.0),
              AdState(shows=1000.0, clicks=1000.0, conversions=0.0)]  # fmt: skip
    c = Candidates(np.array([0.05, 0.05]), np.array([1.0, 1.0]) * 0.1, None, lambda: states,
                   pcvr=np.array([0.1, 0.1]), cpa=np.array([True, True]))  # fmt: skip
    policy = parse_policy("thompson:20")
    picks = [policy.choose(c, np.random.default_rng(i)).index for i in range(20)]
    assert picks == [0] * 20
    # The same ads billed per click: the clicks decide.
    c = Candidates(c.pctr, np.array([1.0, 1.0]), None, lambda: states)
    assert [policy.choose(c, np.random.default_rng(i)).index for i in range(20)] == [1] * 20


def test_report_shows_cvr_per_arm() -> None:
    from adpulse.report import format_table, rows, tally

    recs = [{"decision_id": f"{arm}{i}", "clicked": int(i < 10), "arm": arm, "policy": "greedy"}
            for arm in ("control", "cpa") for i in range(100)]  # fmt: skip
    recs += [{"decision_id": f"cpa{i}", "clicked": 1, "converted": 1, "arm": "cpa"}
             for i in range(4)]  # fmt: skip
    table = rows(tally(recs))
    assert [(r["arm"], r["conversions"], r["cvr"]) for r in table] == [
        ("control", 0, 0.0), ("cpa", 4, 0.4)
    ]  # fmt: skip
    text = format_table(table, "arm")
    assert "CVR" in text.splitlines()[0] and "40.00%" in text.splitlines()[2]


def test_the_online_trainer_warm_starts_from_a_two_head_version_and_keeps_its_cvr_head(
    tmp_path: Path,
) -> None:
    from scoring.online import load_weights, save_weights

    torch.manual_seed(1)
    model = CtrNet(FS, cvr_head=True)
    save_weights(model, tmp_path / "model.pt")
    back = load_weights(tmp_path / "model.pt", FS)
    assert back.cvr is not None
    x = FS.golden_inputs(5, seed=2)
    want_ctr, want_cvr = _torch_heads(model, x)
    got_ctr, got_cvr = _torch_heads(back, x)
    assert np.array_equal(want_ctr, got_ctr) and np.array_equal(want_cvr, got_cvr)
