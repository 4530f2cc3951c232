"""Guarded promotion's pure rules (scoring/promotion.py) and the registry following its state."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from adpulse.core.settings import Settings
from scoring.promotion import (
    STATE_FILE,
    CanaryRules,
    PromotionState,
    Tally,
    _norm_ppf,
    canary_verdict,
    drifted,
    held_back_verdict,
    in_canary,
    read_state,
    write_state,
)
from scoring.registry import CANDIDATES, PACKAGED, ModelRegistry
from scoring.strategy.ab import assign

RULES = CanaryRules(min_labels=1000, confidence=0.95, max_calibration_drift=0.3)


def _tally(labels: int, clicks: int, pctr: float) -> Tally:
    return Tally(labels, clicks, labels * pctr, labels * pctr * (1 - pctr))


def test_the_one_sided_quantile_is_the_normal_one() -> None:
    assert _norm_ppf(0.95) == pytest.approx(1.644854, abs=1e-5)
    assert _norm_ppf(0.99) == pytest.approx(2.326348, abs=1e-5)


def test_the_state_file_round_trips_and_a_missing_or_broken_one_reads_as_none(
    tmp_path: Path,
) -> None:
    assert read_state(tmp_path) is None
    st = PromotionState(serving="v1", canary="c2", last_good="v1", canary_since_ms=5,
                        decided=["c1"])  # fmt: skip
    write_state(tmp_path, st)
    assert read_state(tmp_path) == st
    assert not list(tmp_path.glob(".*.tmp"))  # renamed into place
    (tmp_path / STATE_FILE).write_text("{not json")
    assert read_state(tmp_path) is None
    (tmp_path / STATE_FILE).write_text(json.dumps({"canary": "x"}))
    assert read_state(tmp_path) is None


def test_the_canary_arm_is_the_experiment_arms_keyed_hash_at_the_configured_share() -> None:
    users = [f"u{i}" for i in range(20000)]
    got = [in_canary(u, b"k", 0.05) for u in users]
    assert got == [assign(u, b"k", [0.05, 0.95]) == 0 for u in users]
    assert 0.04 < sum(got) / len(users) < 0.06
    assert got != [in_canary(u, b"other", 0.05) for u in users]  # another key, other users
    assert not any(in_canary(u, b"k", 0.0) for u in users[:100])


def _metrics(online: float | None, serving: float | None) -> dict[str, object]:
    return {"validation": {"online": {"auc": online, "labels": 1000},
                           "serving": None if serving is None else {"auc": serving}}}  # fmt: skip


def test_a_candidate_is_refused_when_its_held_back_auc_drops_beyond_the_margin() -> None:
    assert held_back_verdict(_metrics(0.70, 0.705), 0.01) is None
    assert held_back_verdict(_metrics(0.75, 0.70), 0.01) is None
    why = held_back_verdict(_metrics(0.60, 0.70), 0.01)
    assert why is not None and "0.1000 below" in why and "ADPULSE_CANARY_MAX_AUC_DROP" in why
    assert held_back_verdict(_metrics(0.60, None), 0.01) is None  # nothing serving to compare
    assert "no AUC" in str(held_back_verdict(_metrics(None, 0.7), 0.01))
    assert "no held-back validation" in str(held_back_verdict({"auc": 0.9}, 0.01))


def test_the_canary_waits_for_its_minimum_then_is_promoted_when_not_worse() -> None:
    control = _tally(20000, 1000, 0.05)
    assert canary_verdict(control, _tally(999, 50, 0.05), RULES).action == "wait"
    assert canary_verdict(_tally(999, 50, 0.05), _tally(1000, 50, 0.05), RULES).action == "wait"
    assert canary_verdict(control, _tally(1000, 50, 0.05), RULES).action == "promote"
    # a little lower but not significantly: promoted
    assert canary_verdict(control, _tally(1000, 45, 0.05), RULES).action == "promote"


def test_a_canary_significantly_below_the_control_is_rolled_back() -> None:
    control = _tally(20000, 1000, 0.05)
    v = canary_verdict(control, _tally(2000, 60, 0.03), RULES)  # calibrated, CTR 3% vs 5%
    assert v.action == "rollback" and "below control" in v.reason


def test_a_canary_calibrated_worse_than_the_control_by_the_margin_is_rolled_back() -> None:
    control = _tally(20000, 160, 0.008)  # CTR 0.8%, calibrated
    # 8 clicks where 5 were predicted: 1.6, too few clicks for a significant drift (z 1.3)
    canary = _tally(1000, 8, 0.005)
    assert drifted(canary, RULES) is None
    v = canary_verdict(control, canary, RULES)
    assert v.action == "rollback" and v.reason.startswith("live calibration 1.600")


def test_a_significant_calibration_drift_rolls_back_at_once_before_the_minimum() -> None:
    control = _tally(20000, 1000, 0.05)
    v = canary_verdict(control, _tally(200, 40, 0.05), RULES)  # 40 clicks, 10 expected
    assert v.action == "rollback" and "drift" in v.reason
    # the same ratio on too few labels to be significant: wait
    assert canary_verdict(control, _tally(10, 2, 0.05), RULES).action == "wait"
    assert canary_verdict(control, _tally(100, 20, 0.05), RULES).action == "wait"  # 5 predicted
    assert canary_verdict(control, _tally(300, 6, 0.05), RULES).action == "rollback"  # 6 of 15
    assert drifted(_tally(200, 12, 0.05), RULES) is None  # within the margin


def test_a_tally_counts_labels_clicks_and_expected_clicks() -> None:
    t = Tally().add(1, 0.5).add(0, 0.25)
    assert (t.labels, t.clicks, t.expected) == (2, 1, 0.75)
    assert t.variance == pytest.approx(0.25 + 0.1875)
    assert t.calibration == pytest.approx(1 / 0.75)
    assert math.isnan(Tally().calibration)


# -- the registry follows promotion.json ---------------------------------------------------------
@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    (packaged,) = [p for p in PACKAGED.iterdir() if p.is_dir()]
    for name in ("v1", "v2"):
        shutil.copytree(packaged, tmp_path / name)
    shutil.copytree(packaged, tmp_path / CANDIDATES / "c3")
    s = Settings(model_dir=str(tmp_path), model_latency_budget_ms=math.inf, scorer_threads=1)
    return ModelRegistry.from_settings(s)


def test_without_a_state_the_newest_serves_and_there_is_no_canary(
    registry: ModelRegistry,
) -> None:
    assert registry.latest_valid() is not None
    assert registry.serving == "v2" and registry.canary is None


def test_the_state_pins_the_serving_version_and_names_the_canary(
    registry: ModelRegistry,
) -> None:
    root = Path(registry.root)
    write_state(root, PromotionState(serving="v1", canary="c3", last_good="v1"))
    assert registry.latest_valid() is not None
    assert registry.serving == "v1"  # pinned, though v2 is newer
    assert registry.canary is not None and registry.canary.version == "c3"
    # promoted: c3 moved up and named serving; the canary is gone
    (root / CANDIDATES / "c3").rename(root / "c3")
    write_state(root, PromotionState(serving="c3", last_good="v1"))
    swapped = registry.poll()
    assert swapped is not None and swapped.version == "c3" and registry.canary is None
    # rolled back to an older version: the poll swaps down to it
    write_state(root, PromotionState(serving="v1", last_good="v1"))
    swapped = registry.poll()
    assert swapped is not None and swapped.version == "v1"
    assert registry.poll() is None  # nothing changed since


def test_a_worker_scores_the_canary_share_of_users_with_the_canary_and_says_so(
    registry: ModelRegistry,
) -> None:
    """The decision stage as the worker runs it: each decision's model_version is the
    canary exactly for the users the keyed hash puts in the canary share."""
    import msgspec

    from streams.decide import ServingModels
    from tests.unit.test_pacing_stage import DAY0, _empty, requests, settings, stage

    write_state(Path(registry.root), PromotionState(serving="v1", canary="c3", last_good="v1"))
    models = ServingModels.load(registry, 0.02)
    models.canary_share, models.canary_key = 0.3, b"canary-key"
    st = stage(settings(), models)
    out = st.process(requests(200, DAY0, "k"), _empty(), DAY0)
    got = {d.user_id: d.model_version for _, _, d in out.decisions}
    assert len(got) == 200
    want = {u: "c3" if in_canary(u, b"canary-key", 0.3) else "v1" for u in got}
    assert got == want
    assert 40 < sum(v == "c3" for v in got.values()) < 80
    assert out.rows_scored == 400  # both ads of every request, over the two runs
    assert all(msgspec.to_builtins(d)["features"]["pctr"] > 0 for _, _, d in out.decisions)
    # the canary rolled back: everyone on the serving version at the next poll
    write_state(Path(registry.root), PromotionState(serving="v1", last_good="v1"))
    registry.poll()
    models.canary = registry.canary
    out = st.process(requests(50, DAY0 + 1000, "k2"), _empty(), DAY0 + 1000)
    assert {d.model_version for _, _, d in out.decisions} == {"v1"}


# -- drift against the version a candidate would replace (scoring/promotion.py docstring) ---------
def test_a_canary_as_miscalibrated_as_the_control_is_not_a_drift_and_may_be_promoted() -> None:
    """A serving model trained on another world over-predicts (o/e 0.3): a canary as far
    off, or less, is judged on CTR, not rolled back for the fault the control shares."""
    control = _tally(3000, 90, 0.10)  # o/e 0.30
    assert drifted(control, RULES) is not None  # absolutely, both have drifted
    for clicks in (300, 330, 800):  # o/e 0.30, 0.33, 0.80 on 10,000 labels at pCTR 0.1
        canary = _tally(10_000, clicks, 0.10)
        assert drifted(canary, RULES, reference=0.3) is None
        v = canary_verdict(_tally(10_000, 300, 0.10), canary, RULES)
        assert v.action == "promote", (clicks, v.reason)


def test_a_canary_worse_calibrated_than_a_miscalibrated_control_is_rolled_back_at_once() -> None:
    control = _tally(3000, 150, 0.10)  # o/e 0.50
    canary = _tally(600, 12, 0.10)  # o/e 0.20: predicts 2.5 times what the control would
    v = canary_verdict(control, canary, RULES)
    assert v.action == "rollback" and "drift" in v.reason and "reference's 0.500" in v.reason
    # under-predicting where the control over-predicts, and further from 1: a drift too
    assert drifted(_tally(600, 156, 0.10), RULES, reference=0.5) is not None  # o/e 2.6
    assert drifted(_tally(600, 110, 0.10), RULES, reference=0.5) is None  # o/e 1.83: nearer
    # o/e 0.4 against 0.5: further from 1, but within the margin of the reference
    assert canary_verdict(control, _tally(1000, 40, 0.10), RULES).action == "promote"


def test_with_a_calibrated_reference_the_drift_rule_is_the_absolute_one() -> None:
    for t in (_tally(200, 40, 0.05), _tally(300, 6, 0.05), _tally(200, 12, 0.05),
              _tally(2000, 70, 0.05), _tally(2000, 130, 0.05)):  # fmt: skip
        assert (drifted(t, RULES) is None) == (drifted(t, RULES, reference=1.0) is None)
        assert (drifted(t, RULES) is None) == (
            abs(t.calibration - 1) <= 0.3 or abs(t.drift_z()) < RULES.z)  # fmt: skip


def test_a_promoted_version_drifts_against_the_calibration_of_the_one_it_replaced(
    registry: ModelRegistry,
) -> None:
    import msgspec

    from adpulse.core.metrics import Metrics
    from adpulse.promoter import Promoter
    from schemas.messages import CtrFeedback, ModelEvent

    root = Path(registry.root)
    shutil.rmtree(root / CANDIDATES / "c3")  # no candidate: the serving version's watch only
    write_state(root, PromotionState(serving="v2", last_good="v1", serving_since_ms=1,
                                     reference_calibration=0.3))  # fmt: skip
    assert read_state(root) is not None and read_state(root).reference_calibration == 0.3
    events: list[ModelEvent] = []
    s = Settings(model_dir=str(root), model_latency_budget_ms=math.inf, scorer_threads=1)
    promoter = Promoter(s, Metrics.create(), events.append)

    def labels(tag: str, n: int, clicks: int, pctr: float) -> list[CtrFeedback]:
        return [msgspec.convert({"decision_id": f"{tag}{i}", "ad_id": "a", "user_id": f"u{i}",
                                 "clicked": int(i < clicks), "decision_ts": 5, "label_ts": 6,
                                 "features": {"interest": [], "pctr": pctr}, "propensity": 1.0,
                                 "pctr": pctr, "model_version": "v2"}, CtrFeedback)
                for i in range(n)]  # fmt: skip

    promoter.observe(labels("a", 2000, 60, 0.10))  # o/e 0.30, as the version it replaced
    promoter.tick()
    assert promoter.state.serving == "v2" and not events
    promoter.observe(labels("b", 2000, 0, 0.10))  # now o/e 0.15 over the 4000: worse by half
    promoter.tick()
    assert (promoter.state.serving, promoter.state.reference_calibration) == ("v1", 1.0)
    assert events[-1].event == "rolled_back" and "reference's 0.300" in events[-1].reason


def test_a_sequence_model_candidate_is_checked_against_its_own_pytorch_weights(
    registry: ModelRegistry,
) -> None:
    """The packaged version attends over behaviours: its ONNX file is compared with its
    PyTorch weights on inputs of its own spec (with ``seq``), not the serving spec's
    (that raised ValueError out of the promoter's tick)."""
    from adpulse.promoter import check_candidate

    serving = registry.latest_valid()
    assert serving is not None and serving.spec.sequence > 0
    why = check_candidate(Path(registry.root) / CANDIDATES / "c3", registry, "v2", 0.01)
    # past the ONNX check, to the held-back window, which the packaged copy has none of
    assert why is not None and why.startswith("no held-back validation in metrics.json")


@pytest.mark.parametrize("bad", [0, -1.5, None, "1", float("nan"), float("inf")])
def test_a_hand_edited_reference_that_is_not_a_positive_number_reads_as_none_measured(
    bad: object,
) -> None:
    """promotion.json is a file operators can edit: a reference of 0 or null made every
    tick raise (log of 0); it reads as 1.0, the absolute rule."""
    text = json.dumps({"serving": "v1", "reference_calibration": bad})
    st = PromotionState.from_json(text)
    assert st.reference_calibration == 1.0
    calibrated = Tally(labels=1000, clicks=50, expected=50.0, variance=47.5)
    assert drifted(calibrated, CanaryRules(300, 0.95, 0.2), st.reference_calibration) is None
