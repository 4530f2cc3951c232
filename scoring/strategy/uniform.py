"""Random: a uniform pick among the eligible candidates, the baseline every policy must beat.

P(a) = 1/K for each of the K candidates, whatever their values: exact, and the
logging policy under which off-policy estimates are unbiased with the smallest
worst-case weights (Li et al., WSDM 2011, collected their replay data this way).

>>> import numpy as np
>>> c = UniformRandom().choose(np.array([0.1, 0.9, 0.5, 0.2]), np.random.default_rng(0))
>>> c.propensity
0.25
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from scoring.strategy import Choice


class UniformRandom:
    """Ignores the values: the model and the learner state play no part."""

    name = "random"

    def choose(self, values: npt.NDArray[np.float64], rng: np.random.Generator) -> Choice:
        k = len(values)
        return Choice(int(rng.integers(k)), 1.0 / k, np.full(k, 1.0 / k))
