"""Greedy: the highest expected value wins; ties split evenly (so propensities stay exact)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from scoring.strategy import Choice


def argmax_set(values: npt.NDArray[np.float64]) -> npt.NDArray[np.intp]:
    """Indices of the maximum (all of them, when tied)."""
    return np.flatnonzero(values == values.max())


class Greedy:
    """Exploit only. Deterministic except among exact ties, which are broken uniformly."""

    name = "greedy"

    def choose(self, values: npt.NDArray[np.float64], rng: np.random.Generator) -> Choice:
        best = argmax_set(values)
        pick = int(best[0] if len(best) == 1 else rng.choice(best))
        probs = np.zeros(len(values))
        probs[best] = 1.0 / len(best)
        return Choice(pick, float(probs[pick]), probs)
