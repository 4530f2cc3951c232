"""Serving strategies: pick one ad among scored candidates and say how likely that pick was.

One small vocabulary for every policy (as River does for learners):
``choose(values, rng) -> Choice``, where ``values`` are expected values
(pCTR x bid) of the eligible candidates. The propensity returned is the exact
probability the policy had of choosing that candidate, so logged decisions
support off-policy evaluation (IPS needs it exact, not approximate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class Choice:
    index: int  # into the candidates given
    propensity: float  # P(policy picks this index | these values)
    probabilities: npt.NDArray[np.float64] | None = None  # full distribution, when cheap


class Strategy(Protocol):
    name: str

    def choose(self, values: npt.NDArray[np.float64], rng: np.random.Generator) -> Choice: ...
