"""Online AUC per window and time to recover after a drift (scoring/recovery.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np

from scoring.recovery import (
    paired_auc_diff,
    recovery,
    split_at_drift,
    window_auc,
    windows_to_recover,
)
from scoring.train import auc


def test_each_window_is_the_auc_of_its_own_labels() -> None:
    rng = np.random.default_rng(3)
    index = rng.integers(0, 1000, 5000)
    y = (rng.random(5000) < 0.2).astype(float)
    p = rng.random(5000) + 0.3 * y
    edges = [0, 250, 500, 750, 1000]
    got = window_auc(index, y, p, edges)
    for w, (lo, hi) in zip(got, itertools.pairwise(edges), strict=True):
        m = (index >= lo) & (index < hi)
        assert (w.start, w.end, w.labels, w.clicks) == (lo, hi, int(m.sum()), int(y[m].sum()))
        assert w.auc == auc(y[m], p[m])
    assert sum(w.labels for w in got) == 5000


def test_a_window_with_one_class_has_no_auc() -> None:
    (w,) = window_auc([0, 1, 2], [0.0, 0.0, 0.0], [0.1, 0.2, 0.3], [0, 3])
    assert w.labels == 3 and w.clicks == 0 and math.isnan(w.auc)


def test_a_window_straddling_the_drift_is_neither_before_nor_after() -> None:
    assert split_at_drift([0, 10, 20, 30, 40], 20) == ([0, 1], [2, 3])
    assert split_at_drift([0, 10, 20, 30, 40], 25) == ([0, 1], [3])


def test_recovery_counts_the_windows_before_the_first_that_holds() -> None:
    # level 0.70, tolerance 0.02: 0.68 and up counts; two windows in a row needed
    assert windows_to_recover([0.55, 0.60, 0.69, 0.66, 0.68, 0.71], 0.70, 0.02, hold=2) == 4
    assert windows_to_recover([0.69, 0.70], 0.70, 0.02, hold=2) == 0  # never fell below
    assert windows_to_recover([0.55, 0.69, 0.50], 0.70, 0.02, hold=2) is None
    assert windows_to_recover([0.55, 0.69], 0.70, 0.02, hold=2) == 1  # the run ends: 1 is all
    assert windows_to_recover([0.55, math.nan, 0.69, 0.70], 0.70, 0.02, hold=2) == 2
    assert windows_to_recover([0.55, 0.70, 0.70], math.nan, 0.02) is None


def test_recovery_of_a_model_that_forgets_and_one_that_relearns() -> None:
    """A world that flips at request 500: the frozen model keeps its pre-drift ranking
    (wrong afterwards), the learning one is as bad at first and right again from 700."""
    rng = np.random.default_rng(11)
    n = 20_000
    index = np.sort(rng.integers(0, 1000, n))
    x = rng.random(n)
    drifted = index >= 500
    truth = np.where(drifted, 1 - x, x)
    y = (rng.random(n) < 0.05 + 0.3 * truth).astype(float)
    frozen = x
    learning = np.where(index >= 700, truth, x)
    edges = list(range(0, 1001, 100))
    ws, fro = recovery(index, y, frozen, edges, 500, reference=3, tolerance=0.02, hold=2)
    _, lea = recovery(index, y, learning, edges, 500, reference=3, tolerance=0.02, hold=2)
    assert len(ws) == 10
    assert fro.level == np.mean([w.auc for w in ws[2:5]]) == lea.level
    assert fro.windows_to_recover is None and fro.floor < 0.5
    assert lea.windows_to_recover == 2  # windows 500-600 and 600-700 lost
    assert lea.as_json()["windows_to_recover"] == 2


def test_the_paired_difference_is_zero_for_one_model_and_positive_for_a_better_one() -> None:
    rng = np.random.default_rng(5)
    x = rng.random(4000)
    y = (rng.random(4000) < 0.05 + 0.2 * x).astype(float)
    assert paired_auc_diff(y, x, x) == (0.0, 0.0, 0.0)
    noisy = x + rng.normal(0, 0.5, 4000)
    d, lo, hi = paired_auc_diff(y, x, noisy, draws=100)
    assert d == auc(y, x) - auc(y, noisy) and 0 < lo < d < hi
    assert all(math.isnan(v) for v in paired_auc_diff([0.0, 0.0], [0.1, 0.2], [0.2, 0.1]))
