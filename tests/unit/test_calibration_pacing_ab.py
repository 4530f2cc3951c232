"""Calibration (oracle on a stream), throttle pacing (simulated day) and A/B statistics."""

from __future__ import annotations

import doctest
import importlib
import itertools
import math
import subprocess
import sys
from statistics import NormalDist

import numpy as np
import pytest

from scoring.strategy.ab import (
    Arm,
    Experiment,
    assign,
    decode_counts,
    empty_counts,
    report,
    two_proportion_z,
    unit_hash,
    update,
    wilson,
)
from scoring.strategy.calibration import CalibrationParams, CalibrationState, Calibrator, pav
from scoring.strategy.pacing import HOUR_MS, Pacer, PacingParams, decode, encode


@pytest.mark.parametrize(
    "name",
    ["scoring.strategy.calibration", "scoring.strategy.ab", "scoring.strategy.pacing"],
)
def test_docstring_examples_hold(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


# --- calibration ---------------------------------------------------------------------------


def _reference_pav(y: list[float], w: list[float]) -> list[float]:
    """Naive isotonic fit: merge the first violating pair of blocks until none is left."""
    blocks = [([i], yi, wi) for i, (yi, wi) in enumerate(zip(y, w, strict=True))]
    merged = True
    while merged:
        merged = False
        for j in range(len(blocks) - 1):
            (ia, ya, wa), (ib, yb, wb) = blocks[j], blocks[j + 1]
            if ya > yb:
                blocks[j : j + 2] = [(ia + ib, (ya * wa + yb * wb) / (wa + wb), wa + wb)]
                merged = True
                break
    out = [0.0] * len(y)
    for idx, m, _ in blocks:
        for i in idx:
            out[i] = m
    return out


def test_pav_equals_the_naive_isotonic_fit() -> None:
    rng = np.random.default_rng(4)
    for _ in range(50):
        y, w = rng.random(12), rng.random(12) + 0.1
        np.testing.assert_allclose(pav(y, w), _reference_pav(list(y), list(w)), atol=1e-12)


def test_calibration_after_every_update_equals_a_batch_recompute() -> None:
    """Oracle: streaming state and calibrated table equal a from-scratch recompute."""
    params = CalibrationParams(buckets=20, prior_strength=5.0)
    cal = Calibrator(params)
    rng = np.random.default_rng(12)
    pctr = np.exp(rng.uniform(np.log(5e-5), np.log(0.8), size=400))
    clicked = (rng.random(400) < np.minimum(1.0, 1.5 * pctr)).astype(float)
    edges = np.linspace(np.log(1e-4 / (1 - 1e-4)), 0.0, 21)
    state = cal.empty()
    for t in range(400):
        state = cal.update(state, pctr[t : t + 1], clicked[t : t + 1])
        p, y = pctr[: t + 1], clicked[: t + 1]
        cell = np.clip(np.digitize(np.log(p / (1 - p)), edges) - 1, 0, 19)
        n = np.array([np.sum(cell == c) for c in range(20)], dtype=float)
        k = np.array([y[cell == c].sum() for c in range(20)])
        mean = np.array([p[cell == c].mean() if n[c] else cal.centres[c] for c in range(20)])
        raw = (k + 5.0 * mean) / (n + 5.0)
        want = _reference_pav(list(raw), list(n + 5.0))
        np.testing.assert_allclose(state.n, n)
        np.testing.assert_allclose(state.clicks, k)
        np.testing.assert_allclose(cal.rates(state), want, atol=1e-12)


def test_calibrated_ctr_is_monotone_and_recovers_a_miscalibrated_model() -> None:
    cal = Calibrator()
    rng = np.random.default_rng(1)
    pctr = np.exp(rng.uniform(np.log(1e-3), np.log(0.3), size=200_000))
    true = np.minimum(1.0, 0.5 * pctr)  # the model over-predicts by 2x
    state = cal.update(cal.empty(), pctr, rng.random(len(pctr)) < true)
    grid = np.exp(np.linspace(np.log(1e-5), np.log(0.99), 500))
    out = cal.calibrate(state, grid)
    assert np.all(np.diff(out) >= 0)
    for p in (0.005, 0.02, 0.1):
        assert cal.calibrate(state, np.array([p]))[0] == pytest.approx(0.5 * p, rel=0.15)


def test_calibration_state_roundtrips_and_report_lists_every_cell() -> None:
    cal = Calibrator(CalibrationParams(buckets=5))
    state = cal.update(cal.empty(), np.array([0.001, 0.01, 0.1]), np.array([0, 1, 0]))
    back = CalibrationState.from_bytes(state.to_bytes())
    np.testing.assert_array_equal(back.pred_sum, state.pred_sum)
    rows = cal.report(state)
    assert len(rows) == 5 and rows[0]["from"] == 0.0 and rows[-1]["to"] == 1.0
    assert sum(r["impressions"] for r in rows) == 3
    assert all(a["calibrated"] <= b["calibrated"] for a, b in itertools.pairwise(rows))


# --- pacing --------------------------------------------------------------------------------

DAY0 = 20_000 * 24 * HOUR_MS  # a UTC midnight


def _simulate_day(
    plan: tuple[float, ...], traffic: tuple[float, ...], offered_x: float, seed: int
) -> tuple[list[float], list[float]]:
    """One day: Poisson opportunities, each allowed one costs 1; (spent, plan) per hour.

    The first two minutes step a second at a time, as a worker's batches do (the cold
    start's short probe windows need it), the rest a minute at a time.
    """
    params = PacingParams(profile=plan)
    budget = 50_000.0
    pacer = Pacer({"c": budget}, params)
    rng = np.random.default_rng(seed)
    share = np.asarray(traffic) / sum(traffic)
    steps = [(t * 1000, 1000) for t in range(120)] + [(m * 60_000, 60_000) for m in range(2, 1440)]
    spent, target = [], []
    for t, dt in steps:
        now = DAY0 + t
        p = pacer.probability("c", now)
        offered = offered_x * budget * share[t // HOUR_MS] * dt / HOUR_MS
        pacer.spend("c", float(rng.binomial(rng.poisson(offered), p)), now)
        if (t + dt) % HOUR_MS == 0:
            spent.append(float(pacer.record("c")["spent"]))
            end = now + dt
            target.append(budget * (params.cumulative(end) if t + dt < 24 * HOUR_MS else 1.0))
    return spent, target


DIURNAL = tuple(float(0.3 + 2 * math.sin(math.pi * h / 24) ** 2) for h in range(24))


@pytest.mark.parametrize(
    ("plan", "traffic", "offered_x"),
    [((1.0,) * 24, (1.0,) * 24, 40.0), (DIURNAL, DIURNAL, 120.0)],
    ids=["uniform", "diurnal-profile"],
)
def test_pacer_spends_within_ten_percent_of_plan_every_hour(
    plan: tuple[float, ...], traffic: tuple[float, ...], offered_x: float
) -> None:
    """Traffic offers more than the budget in the first hour alone."""
    spent, target = _simulate_day(plan, traffic, offered_x=offered_x, seed=3)
    first_hour_offer = offered_x * 50_000 * traffic[0] / sum(traffic)
    assert first_hour_offer > 50_000  # unthrottled, the budget would be gone in hour one
    for s, t in zip(spent, target, strict=True):
        assert s == pytest.approx(t, rel=0.10)
    assert spent[0] < 0.1 * 50_000


def test_a_cold_start_under_a_flood_cannot_spend_the_morning_at_once() -> None:
    """A new campaign starts at p = 1; traffic worth 1000 budgets a day hits it."""
    spent, target = _simulate_day((1.0,) * 24, (1.0,) * 24, offered_x=1000.0, seed=7)
    assert spent[0] < 0.1 * 50_000  # early window closes cut the first-second burst
    assert spent[-1] == pytest.approx(50_000, rel=0.02)
    for s, t in zip(spent[1:], target[1:], strict=True):
        assert s == pytest.approx(t, rel=0.10)


def test_a_campaign_whose_budget_dwarfs_its_traffic_is_never_throttled() -> None:
    pacer = Pacer({"c": 1e9})
    rng = np.random.default_rng(0)
    for minute in range(600):
        now = DAY0 + minute * 60_000
        assert pacer.probability("c", now) == 1.0
        pacer.spend("c", float(rng.poisson(30.0)), now)


def test_pacer_follows_the_plan_when_traffic_does_not_match_the_profile() -> None:
    spent, target = _simulate_day((1.0,) * 24, DIURNAL, offered_x=20.0, seed=5)
    for s, t in zip(spent[2:], target[2:], strict=True):  # two hours to learn the shape
        assert s == pytest.approx(t, rel=0.10)


def test_pacer_allow_draws_with_the_probability_it_reports_and_stops_at_budget() -> None:
    pacer = Pacer({"c": 10.0}, PacingParams(p_initial=0.3))
    rng = np.random.default_rng(0)
    draws = [pacer.allow("c", DAY0 + 1000, rng) for _ in range(20_000)]
    assert {p for _, p in draws} == {0.3}
    assert np.mean([ok for ok, _ in draws]) == pytest.approx(0.3, abs=0.01)
    pacer.spend("c", 10.0, DAY0 + 2000)
    assert pacer.allow("c", DAY0 + 3000, rng) == (False, 0.0)
    assert pacer.probability("c", DAY0 + 24 * HOUR_MS) > 0  # a new UTC day, a new budget


def test_pacing_record_roundtrips_through_bytes() -> None:
    pacer = Pacer({"c": 100.0})
    pacer.spend("c", 12.5, DAY0 + 5)
    rec = decode(encode(pacer.record("c")))
    assert float(rec["spent"]) == 12.5 and int(rec["day"]) == DAY0 // (24 * HOUR_MS)
    assert float(decode(None)["spent"]) == 0.0


# --- A/B -----------------------------------------------------------------------------------

EXP = Experiment(
    "ctr-2025",
    b"secret-key",
    (Arm("control", 0.5, "greedy"), Arm("thompson", 0.3, "thompson"), Arm("linucb", 0.2)),
)


def test_arm_assignment_follows_the_traffic_shares() -> None:
    arms = np.array([EXP.arm_of(f"user-{i}") for i in range(30_000)])
    shares = np.bincount(arms, minlength=3) / len(arms)
    np.testing.assert_allclose(shares, [0.5, 0.3, 0.2], atol=0.01)


def test_arm_assignment_is_the_same_in_a_fresh_process() -> None:
    users = [f"u{i}" for i in range(500)]
    here = [EXP.arm_of(u) for u in users]
    code = (
        "from scoring.strategy.ab import assign\n"
        f"print(','.join(str(assign(u, b'secret-key', (0.5, 0.3, 0.2))) for u in {users!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert [int(x) for x in out.stdout.strip().split(",")] == here


def test_experiments_with_different_keys_assign_independently() -> None:
    users = [str(i) for i in range(20_000)]
    a = np.array([assign(u, b"k1", (0.5, 0.5)) for u in users])
    b = np.array([assign(u, b"k2", (0.5, 0.5)) for u in users])
    assert np.mean(a == b) == pytest.approx(0.5, abs=0.02)
    assert 0.0 <= unit_hash("x", b"k1") < 1.0


def test_bad_shares_are_refused() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        Experiment("e", b"k", (Arm("a", 0.6), Arm("b", 0.6)))


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    # Newcombe, "Two-sided confidence intervals for the single proportion", Stat. Med. 1998,
    # Table II, method 3 (Wilson score, no continuity correction)
    [
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_matches_textbook_values(k: int, n: int, lo: float, hi: float) -> None:
    got = wilson(k, n)
    assert got[0] == pytest.approx(lo, abs=5e-5) and got[1] == pytest.approx(hi, abs=5e-5)


def test_two_proportion_z_test_matches_the_normal_distribution() -> None:
    # 100/1000 vs 130/1000: pooled p 0.115, z = 0.03 / sqrt(0.115 * 0.885 * 0.002) = 2.1028
    z, p = two_proportion_z(100, 1000, 130, 1000)
    assert z == pytest.approx(2.1028, abs=1e-4)
    assert p == pytest.approx(2 * (1 - NormalDist().cdf(z)), rel=1e-9)
    assert p == pytest.approx(0.0355, abs=1e-4)
    z0, p0 = two_proportion_z(0, 10, 0, 10)
    assert math.isnan(z0) and p0 == 1.0


def test_report_gives_per_arm_rates_intervals_and_significance_vs_control() -> None:
    counts = update(
        empty_counts(3),
        arm=[0] * 1000 + [1] * 1000 + [2] * 10,
        clicked=[1] * 100 + [0] * 900 + [1] * 130 + [0] * 870 + [0] * 10,
        converted=[1] * 10 + [0] * 990 + [1] * 13 + [0] * 987 + [0] * 10,
    )
    np.testing.assert_array_equal(decode_counts(counts.tobytes()), counts)
    rows = report(EXP, counts)
    assert [r["arm"] for r in rows] == ["control", "thompson", "linucb"]
    assert rows[1]["ctr"] == 0.13 and rows[1]["ctr_ci"] == wilson(130, 1000)
    assert rows[1]["ctr_p"] == pytest.approx(0.0355, abs=1e-4)
    assert rows[1]["cvr"] == 0.1 and rows[0]["ctr_p"] == 1.0
    assert math.isnan(rows[2]["cvr"]) and rows[2]["cvr_ci"] == (0.0, 1.0)
