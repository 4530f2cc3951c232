"""``adpulse simulate --seeds``: per-seed and pooled comparisons against greedy."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import pytest

from adpulse.jsonout import finite
from adpulse.simpool import format_pool, pool
from scoring.strategy.ab import diff_ci


def arm(name: str, whole: tuple[int, int], after: tuple[int, int]) -> dict[str, Any]:
    """An arm row as adpulse/simresults.py ``summarise`` writes it: (clicks, labels)."""
    return {"arm": name, "clicks": whole[0], "impressions": whole[1],
            "before_drift": {"clicks": whole[0] - after[0], "labels": whole[1] - after[1]},
            "after_drift": {"clicks": after[0], "labels": after[1]}}  # fmt: skip


def summary(*arms: dict[str, Any]) -> dict[str, Any]:
    return {"arms": list(arms)}


def test_pooled_counts_are_the_sums_and_the_difference_is_against_greedy() -> None:
    s1 = summary(arm("greedy", (100, 4000), (40, 2000)), arm("thompson", (160, 4000), (90, 2000)))
    s2 = summary(arm("greedy", (120, 4000), (50, 2000)), arm("thompson", (130, 4000), (20, 2000)))
    r = pool([s1, s2], [1, 2])
    t = r["pooled"]["thompson"]
    assert (t["whole"]["clicks"], t["whole"]["labels"]) == (290, 8000)
    assert (t["after_drift"]["clicks"], t["after_drift"]["labels"]) == (110, 4000)
    assert t["after_drift"]["diff"] == pytest.approx(110 / 4000 - 90 / 4000)
    assert t["after_drift"]["diff_ci"] == list(diff_ci(90, 4000, 110, 4000))
    # seed 2's thompson after the drift: 1.0% against 2.5%, interval wholly below 0
    assert r["below_control"] == [[2, "thompson", "after_drift"]]
    table = format_pool(r)
    assert "| pooled | after drift |" in table and "seed 2 thompson after_drift" in table


def test_diff_ci_matches_the_wald_formula_and_is_nan_without_labels() -> None:
    lo, hi = diff_ci(30, 1000, 50, 1000)
    half = 1.959963984540054 * math.sqrt(0.03 * 0.97 / 1000 + 0.05 * 0.95 / 1000)
    assert (lo, hi) == pytest.approx((0.02 - half, 0.02 + half))
    assert all(math.isnan(x) for x in diff_ci(0, 0, 5, 10))


def test_finite_turns_nan_and_numpy_scalars_into_json() -> None:
    import numpy as np

    assert finite({"a": [float("nan"), np.float32(0.5), (1, float("inf"))], "b": np.int64(3)}) == {
        "a": [None, 0.5, [1, None]], "b": 3}  # fmt: skip


@pytest.mark.parametrize("seeds", ["1", "1,1", "1,x"])
def test_bad_seeds_get_one_line(seeds: str) -> None:
    r = subprocess.run([sys.executable, "-m", "adpulse.cli", "simulate", "--seeds", seeds],
                       capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert r.returncode != 0
    assert "--seeds" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_each_seeds_recovery_after_the_drift_is_reported_per_model() -> None:
    def with_auc(served: int | None, frozen: int | None) -> dict[str, Any]:
        s = summary(arm("greedy", (100, 4000), (40, 2000)))
        s["online_auc"] = {"models": {
            "served": {"level": 0.7, "floor": 0.5, "windows_to_recover": served, "windows": []},
            "frozen": {"level": 0.7, "floor": 0.4, "windows_to_recover": frozen, "windows": []},
        }}  # fmt: skip
        return s

    r = pool([with_auc(2, None), with_auc(1, 3)], [4, 9])
    assert r["recovery"] == [
        {"seed": 4, "served": {"level": 0.7, "floor": 0.5, "windows_to_recover": 2},
         "frozen": {"level": 0.7, "floor": 0.4, "windows_to_recover": None}},
        {"seed": 9, "served": {"level": 0.7, "floor": 0.5, "windows_to_recover": 1},
         "frozen": {"level": 0.7, "floor": 0.4, "windows_to_recover": 3}},
    ]  # fmt: skip
    table = format_pool(r)
    assert "seed 4: online AUC back at its pre-drift level after served 2 window(s), " \
        "frozen never (within the run)" in table
    assert "recovery" not in pool([summary(arm("greedy", (1, 10), (1, 5)))], [1])


def test_an_unknown_trainer_promotion_gets_one_line() -> None:
    r = subprocess.run([sys.executable, "-m", "adpulse.cli", "simulate", "--trainer", "nope"],
                       capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr and "--trainer" in r.stderr
