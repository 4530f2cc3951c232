"""Epsilon-greedy: explore uniformly with probability epsilon, else exploit.

P(a) = epsilon / K + (1 - epsilon) * [a in argmax] / |argmax| over the K
eligible candidates: exact, and never zero, so every logged decision can be
reweighted in off-policy evaluation (Sutton & Barto, 2018, sec. 2.2).

>>> import numpy as np
>>> p = EpsilonGreedy(0.1).probabilities(np.array([1.0, 3.0, 2.0]))
>>> round(float(p.sum()), 12), round(float(p[1]), 4)
(1.0, 0.9333)
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from scoring.strategy import Choice
from scoring.strategy.greedy import argmax_set


class EpsilonGreedy:
    def __init__(self, epsilon: float) -> None:
        if not 0.0 <= epsilon <= 1.0:
            msg = f"epsilon {epsilon} must be within [0, 1]"
            raise ValueError(msg)
        self.epsilon = epsilon
        self.name = f"epsilon-greedy({epsilon:g})"

    def probabilities(self, values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        k = len(values)
        probs = np.full(k, self.epsilon / k)
        best = argmax_set(values)
        probs[best] += (1.0 - self.epsilon) / len(best)
        return probs

    def choose(self, values: npt.NDArray[np.float64], rng: np.random.Generator) -> Choice:
        """Explore (uniform) with probability epsilon, else a uniform pick among the best.

        Sampling in two steps draws from exactly ``probabilities(values)`` at a
        fraction of the cost of a weighted draw, which matters at 1,000+
        decisions a second.
        """
        k = len(values)
        best = argmax_set(values)
        n_best = len(best)
        if rng.random() < self.epsilon:
            pick = int(rng.integers(k))
        else:
            pick = int(best[0] if n_best == 1 else best[rng.integers(n_best)])
        # one best (the usual case): a scalar compare, not an array search
        in_best = pick == int(best[0]) if n_best == 1 else pick in best.tolist()
        greedy_share = (1.0 - self.epsilon) / n_best if in_best else 0.0
        return Choice(pick, self.epsilon / k + greedy_share, None)
