"""Disjoint LinUCB over the user's interest vector (Li, Chu, Langford & Schapire,
"A Contextual-Bandit Approach to Personalized News Article Recommendation",
WWW 2010, Algorithm 1).

Per ad a: A = lambda*I + sum x x^T, b = sum r x over the contexts x it was shown
in and their click labels r. The score of a candidate in context x is
theta^T x + alpha * sqrt(x^T A^-1 x) with theta = A^-1 b, times its bid when
bids are given. We store A^-1 rather than A and keep it current with the
Sherman-Morrison identity, (A + x x^T)^-1 = A^-1 - (A^-1 x)(A^-1 x)^T / (1 + x^T A^-1 x),
so an update is O(d^2) and scoring needs no solve.

With ``offset`` (the default in adpulse, ``ADPULSE_LINUCB_OFFSET=model``) the linear
part is added to a base, the served model's pCTR: the score is
pctr + theta^T x + alpha * sqrt(x^T A^-1 x) and theta learns the residual, b = sum
(r - pctr) x. This is the offset form of a generalised linear model: with theta = 0
an ad ranks as greedy ranks it, plus its bonus, instead of by the bonus alone, which
on CTR-sized rewards (a few percent) drowns every difference between ads for the
first thousands of labels. Thompson gets the same information as its prior mean.

The choice is deterministic up to exact ties, which are split evenly, so the
propensity is exact (1/|ties|); ``epsilon`` > 0 mixes in uniform exploration with
exact propensities epsilon/K + (1-epsilon)[a in ties]/|ties| (as EpsilonGreedy).

State is one record per ad (``state_dtype``): n, A^-1 and b in float64
(d = 65 with the bias: ~34 KB), to bytes and back for a RocksDB table.

>>> import numpy as np
>>> lin = LinUCB(LinUCBParams(dim=2, bias=False, alpha=0.0))
>>> s = lin.update(lin.empty(1), np.array([0, 0]), np.eye(2), np.array([1.0, 0.0]))
>>> np.round(lin.theta(s)[0], 3).tolist()
[0.5, 0.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from scoring.strategy import Choice
from scoring.strategy.epsilon import EpsilonGreedy

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class LinUCBParams:
    dim: int = 64  # interest-vector dimension (without the bias)
    alpha: float = 1.0  # width of the confidence bonus
    ridge: float = 1.0  # lambda: A starts at lambda * I
    bias: bool = True  # append a constant 1 to every context
    epsilon: float = 0.0  # uniform exploration mixed in (exact propensities)
    offset: bool = False  # theta learns r - base (the model's pCTR), scores add the base

    def __post_init__(self) -> None:
        if self.dim < 1 or self.ridge <= 0 or self.alpha < 0 or not 0 <= self.epsilon <= 1:
            msg = f"bad LinUCB params {self}: need dim >= 1, ridge > 0, alpha >= 0, 0 <= eps <= 1"
            raise ValueError(msg)

    @property
    def width(self) -> int:
        return self.dim + (1 if self.bias else 0)


def state_dtype(p: LinUCBParams) -> np.dtype[Any]:
    d = p.width
    return np.dtype([("n", "<i8"), ("a_inv", "<f8", (d, d)), ("b", "<f8", (d,))])


class LinUCB:
    """River-style learner: ``update`` folds labelled contexts in, ``choose`` decides."""

    def __init__(self, params: LinUCBParams | None = None) -> None:
        self.params = params or LinUCBParams()
        self.dtype = state_dtype(self.params)
        self._explore = EpsilonGreedy(self.params.epsilon)
        off = ",offset=model" if self.params.offset else ""
        self.name = f"linucb(alpha={self.params.alpha:g},eps={self.params.epsilon:g}{off})"

    # --- state ---------------------------------------------------------------------------
    def empty(self, n: int) -> npt.NDArray[Any]:
        s = np.zeros(n, dtype=self.dtype)
        s["a_inv"] = np.eye(self.params.width) / self.params.ridge
        return s

    def decode(self, values: Sequence[bytes | None]) -> npt.NDArray[Any]:
        """Records for stored values (a fresh ad where a value is None)."""
        out = self.empty(len(values))
        size = self.dtype.itemsize
        # Bytes copied straight into the array's buffer: a record per element assignment
        # took 360-490 us for 120 ads at d = 65 (34 KB each), this 105-125 us.
        buf = out.view(np.uint8).data
        for i, raw in enumerate(values):
            if raw is not None:
                if len(raw) != size:
                    msg = f"stored LinUCB state has wrong size for dim={self.params.dim}"
                    raise ValueError(msg)
                buf[i * size : (i + 1) * size] = raw
        return out

    @staticmethod
    def encode(states: npt.NDArray[Any]) -> list[bytes]:
        return [r.tobytes() for r in states]

    def contexts(self, x: npt.ArrayLike) -> F64:
        """Rows of x as float64, with the bias column when configured."""
        xs = np.atleast_2d(np.asarray(x, dtype=np.float64))
        if xs.shape[1] != self.params.dim:
            msg = f"context has {xs.shape[1]} features, LinUCB was set up for dim={self.params.dim}"
            raise ValueError(msg)
        if self.params.bias:
            xs = np.hstack([xs, np.ones((len(xs), 1))])
        return xs

    # --- learning ------------------------------------------------------------------------
    def update(
        self,
        states: npt.NDArray[Any],
        which: npt.ArrayLike,
        x: npt.ArrayLike,
        r: npt.ArrayLike,
        weights: npt.ArrayLike | None = None,
        base: npt.ArrayLike | None = None,
    ) -> npt.NDArray[Any]:
        """New states after labels ``r`` for contexts ``x`` shown for ads ``states[which]``.

        With ``offset``, ``base`` is each label's pCTR at its decision and theta learns
        ``r - base``.

        Sherman-Morrison per example (sequential within an ad, so the result
        equals the batch inverse up to rounding). ``weights`` (forgetting) add
        w x x^T and w r x instead: (A + w x x^T)^-1 = A^-1 - w u u^T / (1 + w x^T u).
        """
        new = states.copy()
        xs = self.contexts(x)
        rs = np.asarray(r, dtype=np.float64) - self._base(base, len(np.atleast_1d(r)))
        ws = np.ones(len(rs)) if weights is None else np.asarray(weights, dtype=np.float64)
        for k, xi, ri, wi in zip(np.asarray(which, dtype=np.intp), xs, rs, ws, strict=True):
            a_inv = new["a_inv"][k]
            u = a_inv @ xi
            if weights is None:  # today's arithmetic, bit for bit
                a_inv -= np.outer(u, u) / (1.0 + xi @ u)
                new["b"][k] += ri * xi
            else:
                a_inv -= wi * np.outer(u, u) / (1.0 + wi * (xi @ u))
                new["b"][k] += wi * ri * xi
            new["a_inv"][k] = a_inv
            new["n"][k] += 1
        return new

    def discount(self, states: npt.NDArray[Any], factor: float) -> npt.NDArray[Any]:
        """States whose learned part shrinks by ``factor``: A = ridge*I + f*(A - ridge*I), b = f*b.

        The ridge stays whole, so A stays invertible however much is forgotten.
        Costs one d x d inversion each way per state, which the learner pays
        once per ad per batch; errors this leaves in A shrink with each later
        discount, so they do not pile up.
        """
        if factor == 1.0:
            return states
        new = states.copy()
        ridge = self.params.ridge * np.eye(self.params.width)
        a = np.linalg.inv(new["a_inv"])
        new["a_inv"] = np.linalg.inv(factor * a + (1.0 - factor) * ridge)
        new["b"] *= factor
        return new

    def _base(self, base: npt.ArrayLike | None, n: int) -> F64 | float:
        """The offset each reward or score is taken from: 0 without ``offset``."""
        if not self.params.offset:
            return 0.0
        if base is None:
            msg = "LinUCB with offset needs the model's pCTR (base) for every label and candidate"
            raise ValueError(msg)
        b = np.asarray(base, dtype=np.float64).reshape(-1)
        if len(b) != n:
            msg = f"LinUCB base has {len(b)} values for {n} rows"
            raise ValueError(msg)
        return b

    def theta(self, states: npt.NDArray[Any]) -> F64:
        return np.asarray(np.einsum("kij,kj->ki", states["a_inv"], states["b"]), dtype=np.float64)

    # --- deciding ------------------------------------------------------------------------
    def scores(
        self,
        x: npt.ArrayLike,
        states: npt.NDArray[Any],
        bids: F64 | None = None,
        base: npt.ArrayLike | None = None,
    ) -> F64:
        """UCB per candidate; ``x`` is one shared context (d,) or one per candidate (K, d);
        ``base`` the candidates' pCTRs (needed with ``offset``)."""
        xs = self.contexts(x)
        a_inv = states["a_inv"]
        # y = A^-1 x per ad, one batched matrix-vector product; then theta^T x = b^T y (A^-1
        # is symmetric: an update subtracts an outer product u u^T; a fade's two inversions
        # leave it so up to rounding) and x^T A^-1 x = y^T x. Three einsums (theta, then the
        # quadratic form) took 640-660 us for 120 ads at d = 65, this about 95 us.
        if len(xs) == 1:
            y = a_inv @ xs[0]
            var = y @ xs[0]
        else:
            y = (a_inv @ xs[:, :, None])[:, :, 0]
            var = np.einsum("ki,ki->k", y, xs)
        mean = self._base(base, len(states)) + np.einsum("ki,ki->k", states["b"], y)
        ucb = mean + self.params.alpha * np.sqrt(np.maximum(var, 0.0))
        return np.asarray(ucb if bids is None else ucb * bids, dtype=np.float64)

    def probabilities(
        self,
        x: npt.ArrayLike,
        states: npt.NDArray[Any],
        bids: F64 | None = None,
        base: npt.ArrayLike | None = None,
    ) -> F64:
        return self._explore.probabilities(self.scores(x, states, bids, base))

    def choose(
        self,
        x: npt.ArrayLike,
        states: npt.NDArray[Any],
        rng: np.random.Generator,
        bids: F64 | None = None,
        base: npt.ArrayLike | None = None,
    ) -> Choice:
        """Highest UCB (x bid), ties split evenly, epsilon-mixed; exact propensity."""
        values = self.scores(x, states, bids, base)
        c = self._explore.choose(values, rng)
        return Choice(c.index, c.propensity, self._explore.probabilities(values))
