"""Thompson sampling and LinUCB: posteriors, exact/sampled propensities, oracles, learning."""

from __future__ import annotations

import doctest
import importlib
from collections import Counter

import numpy as np
import pytest

from scoring.strategy.linucb import LinUCB, LinUCBParams
from scoring.strategy.thompson import (
    ThompsonParams,
    ThompsonSampling,
    backoff,
    decode_stats,
    empty_stats,
    encode_stats,
    stats_key,
)


@pytest.mark.parametrize("name", ["scoring.strategy.thompson", "scoring.strategy.linucb"])
def test_docstring_examples_hold(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


# --- Thompson ------------------------------------------------------------------------------


def test_thompson_prior_mean_is_the_model_pctr_and_worth_m_impressions() -> None:
    ts = ThompsonSampling(ThompsonParams(prior_strength=40.0))
    a, b = ts.posterior(np.array([0.05, 0.2]), empty_stats(2))
    np.testing.assert_allclose(a / (a + b), [0.05, 0.2])
    np.testing.assert_allclose(a + b, [40.0, 40.0])


def test_thompson_feedback_moves_the_posterior_from_the_prior_to_the_data() -> None:
    ts = ThompsonSampling(ThompsonParams(prior_strength=20.0))
    stats = ts.update(empty_stats(1), np.array([1000]), np.array([100]))
    a, b = ts.posterior(np.array([0.01]), stats)
    assert a[0] == pytest.approx(0.2 + 100) and b[0] == pytest.approx(19.8 + 900)
    assert a[0] / (a[0] + b[0]) == pytest.approx((0.2 + 100) / 1020)


def test_thompson_discount_shrinks_old_counts() -> None:
    ts = ThompsonSampling(ThompsonParams(discount=0.5))
    stats = ts.update(ts.update(empty_stats(1), np.array([10]), np.array([4])), 0, 0)
    assert stats["shows"][0] == 5.0 and stats["clicks"][0] == 2.0


def test_thompson_stats_roundtrip_through_bytes_and_keys_name_segments() -> None:
    stats = ThompsonSampling().update(empty_stats(2), np.array([3, 7]), np.array([1, 2]))
    raw = encode_stats(stats)
    assert all(len(r) == 16 for r in raw)
    back = decode_stats([raw[0], None, raw[1]])
    assert back.tolist() == [(3.0, 1.0), (0.0, 0.0), (7.0, 2.0)]
    assert stats_key("ad-1") == "ad-1" and stats_key("ad-1", 411153) == "ad-1|411153"


def test_backoff_uses_segment_counts_only_once_they_are_worth_enough() -> None:
    ad = np.array([(100.0, 5.0), (100.0, 5.0)], dtype=empty_stats(0).dtype)
    seg = np.array([(10.0, 3.0), (60.0, 1.0)], dtype=empty_stats(0).dtype)
    assert backoff(ad, seg, 50.0).tolist() == [(100.0, 5.0), (60.0, 1.0)]


def test_thompson_propensity_matches_empirical_frequency_within_its_error() -> None:
    ts = ThompsonSampling(ThompsonParams(prior_strength=50.0, draws=1000))
    pctr, bids = np.array([0.04, 0.05, 0.03]), np.array([1.0, 1.0, 1.5])
    stats = ts.update(empty_stats(3), np.array([200, 100, 50]), np.array([9, 6, 1]))
    rng = np.random.default_rng(7)
    choices = [ts.choose(pctr, bids, stats, rng) for _ in range(4000)]
    freq = Counter(c.index for c in choices)
    for i in range(3):
        est = [c.probabilities[i] for c in choices if c.probabilities is not None]
        p_hat = float(np.mean(est))
        # empirical pick share vs mean MC estimate: binomial error of 4000 picks dominates
        assert freq[i] / 4000 == pytest.approx(p_hat, abs=4 * np.sqrt(p_hat * (1 - p_hat) / 4000))
    c = choices[0]
    assert c.propensity_se == pytest.approx(np.sqrt(c.propensity * (1 - c.propensity) / 1000))
    assert c.probabilities is not None and c.probabilities.sum() == pytest.approx(1.0)


def test_thompson_propensity_is_never_zero() -> None:
    ts = ThompsonSampling(ThompsonParams(prior_strength=1e6, draws=100))
    rng = np.random.default_rng(0)
    for _ in range(50):
        c = ts.choose(np.array([0.01, 0.011]), np.array([1.0, 1.0]), empty_stats(2), rng)
        assert c.propensity >= 1 / 100


def test_thompson_learns_that_an_underpredicted_ad_is_better() -> None:
    """The model says both ads are 3%; the truth is 2% vs 6%: feedback must find ad 1."""
    ts = ThompsonSampling(ThompsonParams(prior_strength=20.0, draws=20))
    true_ctr = np.array([0.02, 0.06])
    pctr, bids = np.array([0.03, 0.03]), np.ones(2)
    stats = empty_stats(2)
    rng = np.random.default_rng(3)
    picks = []
    for _ in range(3000):
        i = ts.choose(pctr, bids, stats, rng).index
        shows, clicks = np.zeros(2), np.zeros(2)
        shows[i], clicks[i] = 1, float(rng.random() < true_ctr[i])
        stats = ts.update(stats, shows, clicks)
        picks.append(i)
    assert np.mean(picks[-1000:]) > 0.85


# --- LinUCB --------------------------------------------------------------------------------


def test_linucb_inverse_and_theta_equal_the_batch_ridge_solution() -> None:
    """Oracle: after N Sherman-Morrison updates, A^-1 = inv(lambda I + X^T X), theta = ridge."""
    params = LinUCBParams(dim=64, ridge=2.0)
    lin = LinUCB(params)
    rng = np.random.default_rng(11)
    n_ads, n = 3, 600
    which = rng.integers(n_ads, size=n)
    x = rng.normal(size=(n, 64)) * 0.3
    r = (rng.random(n) < 0.1).astype(float)
    states = lin.empty(n_ads)
    for chunk in np.array_split(np.arange(n), 7):
        states = lin.update(states, which[chunk], x[chunk], r[chunk])
    xb = lin.contexts(x)
    for k in range(n_ads):
        xk, rk = xb[which == k], r[which == k]
        a = 2.0 * np.eye(65) + xk.T @ xk
        np.testing.assert_allclose(states["a_inv"][k], np.linalg.inv(a), atol=1e-10)
        np.testing.assert_allclose(lin.theta(states)[k], np.linalg.solve(a, xk.T @ rk), atol=1e-9)
        assert states["n"][k] == len(xk)


def test_linucb_scores_are_mean_plus_alpha_times_width_and_vectorised() -> None:
    lin = LinUCB(LinUCBParams(dim=4, alpha=0.7))
    rng = np.random.default_rng(2)
    states = lin.update(
        lin.empty(5), rng.integers(5, size=50), rng.normal(size=(50, 4)), rng.random(50)
    )
    x = rng.normal(size=4)
    got = lin.scores(x, states, bids=np.arange(1.0, 6.0))
    xb = np.r_[x, 1.0]
    for k in range(5):
        theta = states["a_inv"][k] @ states["b"][k]
        want = theta @ xb + 0.7 * np.sqrt(xb @ states["a_inv"][k] @ xb)
        assert got[k] == pytest.approx(want * (k + 1))


def test_linucb_fresh_ads_tie_and_split_the_propensity_exactly() -> None:
    lin = LinUCB(LinUCBParams(dim=8))
    rng = np.random.default_rng(0)
    c = lin.choose(rng.normal(size=8), lin.empty(4), rng)
    assert c.propensity == pytest.approx(0.25)
    assert c.probabilities is not None and c.probabilities.tolist() == pytest.approx([0.25] * 4)


def test_linucb_epsilon_mix_gives_exact_propensities_matching_frequencies() -> None:
    lin = LinUCB(LinUCBParams(dim=3, epsilon=0.2))
    rng = np.random.default_rng(5)
    states = lin.update(lin.empty(3), [0, 1, 2, 1], rng.normal(size=(4, 3)), [0, 1, 0, 1])
    x = rng.normal(size=3)
    probs = lin.probabilities(x, states)
    best = int(np.argmax(probs))
    assert probs[best] == pytest.approx(0.2 / 3 + 0.8) and probs.sum() == pytest.approx(1.0)
    picks = [lin.choose(x, states, rng) for _ in range(20_000)]
    for i in range(3):
        assert np.mean([c.index == i for c in picks]) == pytest.approx(probs[i], abs=0.01)
    assert all(c.propensity == pytest.approx(probs[c.index]) for c in picks[:100])


def test_linucb_state_roundtrips_through_bytes_and_refuses_a_wrong_dim() -> None:
    lin = LinUCB(LinUCBParams(dim=6))
    rng = np.random.default_rng(1)
    states = lin.update(lin.empty(2), [0, 1], rng.normal(size=(2, 6)), [1, 0])
    back = lin.decode([*lin.encode(states), None])
    np.testing.assert_array_equal(back["a_inv"][:2], states["a_inv"])
    np.testing.assert_array_equal(back["a_inv"][2], np.eye(7))
    with pytest.raises(ValueError, match="dim"):
        LinUCB(LinUCBParams(dim=5)).decode(lin.encode(states))


def test_linucb_learns_which_ad_suits_which_interest() -> None:
    """Ad k is clicked mostly by users whose interest points along axis k."""
    d, k_ads = 8, 4
    lin = LinUCB(LinUCBParams(dim=d, alpha=0.3))
    rng = np.random.default_rng(9)
    states = lin.empty(k_ads)
    hits = []
    for _ in range(3000):
        axis = int(rng.integers(k_ads))
        x = np.eye(d)[axis] + 0.1 * rng.normal(size=d)
        i = lin.choose(x, states, rng).index
        clicked = float(rng.random() < (0.3 if i == axis else 0.02))
        states = lin.update(states, [i], x[None, :], [clicked])
        hits.append(i == axis)
    assert np.mean(hits[-500:]) > 0.9


def test_linucb_context_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError, match="dim=64"):
        LinUCB().scores(np.zeros(10), LinUCB().empty(1))


def test_linucb_with_offset_starts_from_the_model_and_learns_only_the_residual() -> None:
    """ADPULSE_LINUCB_OFFSET=model: fresh ads rank by pCTR (x bid) plus one equal bonus, a
    label exactly at its pCTR teaches nothing, and scores are pCTR + theta^T x + bonus."""
    d = 3
    lin = LinUCB(LinUCBParams(dim=d, alpha=0.0, offset=True))
    states, x, rng = lin.empty(3), np.array([1.0, 0.0, 0.0]), np.random.default_rng(1)
    pctr = np.array([0.01, 0.04, 0.02])
    assert lin.choose(x, states, rng, base=pctr).index == 1
    bids = np.array([5.0, 1.0, 1.0])
    assert lin.choose(x, states, rng, bids=bids, base=pctr).index == 0  # 0.05 > 0.04
    # a label at its pCTR: theta stays 0, A grows
    learnt = lin.update(states, [1], x[None, :], [0.04], base=[0.04])
    np.testing.assert_allclose(lin.theta(learnt), 0.0, atol=1e-15)
    assert learnt["n"][1] == 1
    # clicks above the model on ad 2 move it up by the residual's least-squares fit
    for _ in range(20):
        states = lin.update(states, [2], x[None, :], [1.0], base=[0.02])
    theta = lin.theta(states)[2]
    assert lin.scores(x, states, base=pctr)[2] == pytest.approx(0.02 + theta @ np.append(x, 1))
    assert lin.choose(x, states, rng, base=pctr).index == 2
    with pytest.raises(ValueError, match="needs the model's pCTR"):
        lin.scores(x, states)


def test_linucb_scores_are_the_textbook_ucb_and_records_round_trip() -> None:
    """The batched form (y = A^-1 x, theta^T x = b^T y) against Algorithm 1 written per ad
    with A itself (inverted here), for a shared context and one context per candidate; and
    decode puts every stored byte back where it was, a fresh record where none is stored."""
    lin = LinUCB(LinUCBParams(dim=6, alpha=0.7, offset=True))
    rng = np.random.default_rng(3)
    k = 9
    states = lin.update(lin.empty(k), rng.integers(0, k, 60), rng.normal(size=(60, 6)),
                        rng.integers(0, 2, 60).astype(float), base=np.full(60, 0.05))  # fmt: skip
    base, bids = rng.uniform(0.01, 0.1, k), rng.uniform(0.5, 2.0, k)

    def textbook(x: np.ndarray) -> np.ndarray:
        out = []
        for i in range(k):
            xi = np.append(x[i] if x.ndim == 2 else x, 1.0)
            a = np.linalg.inv(states["a_inv"][i])
            theta = np.linalg.solve(a, states["b"][i])
            bonus = 0.7 * np.sqrt(xi @ np.linalg.solve(a, xi))
            out.append((base[i] + theta @ xi + bonus) * bids[i])
        return np.array(out)

    for x in (rng.normal(size=6), rng.normal(size=(k, 6))):
        assert np.allclose(lin.scores(x, states, bids, base), textbook(x), rtol=1e-9, atol=0)
    stored = lin.encode(states)
    back = lin.decode([stored[0], None, *stored[2:]])
    assert back.tobytes() == np.concatenate([states[:1], lin.empty(1), states[2:]]).tobytes()
