"""Progressive-validation windows, checked after every update against a batch recompute."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scoring.progressive import ProgressiveValidation, SlidingWindow, parse_sizes
from scoring.train import auc, logloss


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("size", [1, 7, 50])
def test_window_metrics_equal_a_batch_recompute_of_the_last_size_labels(size: int) -> None:
    rng = np.random.default_rng(size)
    w = SlidingWindow(size)
    ys: list[float] = []
    ps: list[float] = []
    for _ in range(40):
        n = int(rng.integers(0, 2 * size + 3))  # batches smaller and larger than the window
        y = (rng.random(n) < 0.3).astype(float)
        p = rng.random(n)
        w.add(y, p)
        ys += y.tolist()
        ps += p.tolist()
        ty, tp = np.array(ys[-size:]), np.array(ps[-size:])
        got = w.summary()
        assert len(w) == len(ty) == got.labels
        assert w.labels.tolist() == ty.tolist() and w.predictions.tolist() == tp.tolist()
        assert got.clicks == int(ty.sum())
        assert _same(got.auc, auc(ty, tp) if len(ty) else float("nan"))
        assert _same(got.logloss, logloss(ty, tp) if len(ty) else float("nan"))
        want_cal = ty.sum() / tp.sum() if tp.sum() > 0 else float("nan")
        assert _same(got.calibration, want_cal)


def test_an_empty_window_and_a_single_class_give_nan_not_an_error() -> None:
    w = SlidingWindow(5)
    s = w.summary()
    assert s.labels == 0 and math.isnan(s.auc) and math.isnan(s.logloss)
    w.add([0, 0], [0.1, 0.2])
    s = w.summary()
    assert math.isnan(s.auc) and s.calibration == 0.0
    assert s.as_json()["auc"] is None  # metrics.json: JSON has no NaN


def test_calibration_is_observed_over_expected() -> None:
    w = SlidingWindow(4)
    w.add([1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5])  # predicts 2 clicks, sees 1: over-predicts
    assert w.summary().calibration == pytest.approx(0.5)


def test_windows_survive_a_state_round_trip_and_a_smaller_size_keeps_the_newest() -> None:
    pv = ProgressiveValidation((3, 10))
    for i in range(12):
        pv.add("online", [i % 2], [0.1 * (i % 10)])
    back = ProgressiveValidation.from_state((3, 10), pv.state())
    assert back.summaries() == pv.summaries()
    smaller = ProgressiveValidation.from_state((2,), pv.state())
    assert smaller.windows["online"][2].labels.tolist() == [0.0, 1.0]  # labels 10 and 11
    recent = pv.recent("online")
    assert recent is not None and recent.labels == 3


def test_a_replaced_model_is_forgotten() -> None:
    pv = ProgressiveValidation((5,))
    pv.add("v1", [1, 0], [0.6, 0.2])
    pv.forget("v1")
    assert pv.recent("v1") is None and pv.summaries() == {}


@pytest.mark.parametrize("text", ["", "0", "10,x", "-5"])
def test_window_sizes_refuse_what_is_not_a_positive_count(text: str) -> None:
    with pytest.raises(ValueError, match=r"window"):
        parse_sizes(text)


def test_window_sizes_are_sorted_and_unique() -> None:
    assert parse_sizes("10000, 1000,1000") == (1000, 10000)
