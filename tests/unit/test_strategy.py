"""Strategies pick by expected value and report exact propensities."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from scoring.strategy.epsilon import EpsilonGreedy
from scoring.strategy.greedy import Greedy

values_st = st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=50).map(np.array)


@given(values=values_st, eps=st.floats(0, 1))
def test_epsilon_greedy_propensities_sum_to_one_and_match_pick(
    values: np.ndarray, eps: float
) -> None:
    policy = EpsilonGreedy(eps)
    choice = policy.choose(values, np.random.default_rng(0))
    probs = policy.probabilities(values)
    assert probs.sum() == pytest.approx(1.0)
    assert choice.propensity == pytest.approx(probs[choice.index])
    assert choice.propensity > 0


def test_epsilon_greedy_empirical_frequencies_match_propensities() -> None:
    values = np.array([0.1, 0.5, 0.3, 0.5])
    policy = EpsilonGreedy(0.2)
    rng = np.random.default_rng(1)
    n = 40_000
    counts = Counter(policy.choose(values, rng).index for _ in range(n))
    expected = policy.probabilities(values)
    for i, p in enumerate(expected):
        assert counts[i] / n == pytest.approx(p, abs=0.01)


def test_greedy_picks_the_highest_expected_value() -> None:
    c = Greedy().choose(np.array([0.2, 0.9, 0.4]), np.random.default_rng(0))
    assert c.index == 1 and c.propensity == 1.0


def test_greedy_splits_ties_evenly() -> None:
    c = Greedy().choose(np.array([0.9, 0.1, 0.9]), np.random.default_rng(0))
    assert c.index in (0, 2) and c.propensity == 0.5


def test_epsilon_outside_unit_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        EpsilonGreedy(1.5)
