"""Online calibration of pCTR by bucket, made monotone by pool-adjacent-violators.

Predictions fall into ``buckets`` cells on a logit grid between ``lo`` and ``hi``
(the outer cells also take everything below and above). Each cell keeps its
impressions, clicks and the sum of its predictions. A cell's observed rate is
shrunk towards its own mean prediction by ``prior_strength`` pseudo-impressions,
(clicks + m * mean_pred) / (n + m), so an empty or thin cell trusts the model.
The cell rates are then made non-decreasing by weighted pool-adjacent-violators
(isotonic regression; Ayer et al., Ann. Math. Stat. 1955; Zadrozny & Elkan,
KDD 2002 for calibration), and ``calibrate`` interpolates them linearly in
logit(pCTR) between the cells' mean predictions: monotone non-decreasing.

State is one record of three float64 arrays (``CalibrationState``), a few
hundred bytes, to bytes and back for a table keyed by model version (and
placement, if wanted). Everything is recomputed from the counts on demand, so
the state stays exact under any order of updates.

>>> import numpy as np
>>> cal = Calibrator(CalibrationParams(buckets=4, prior_strength=0.0))
>>> st = cal.update(cal.empty(), np.array([0.01, 0.01, 0.2, 0.2]), np.array([0, 1, 0, 0]))
>>> cal.calibrate(st, np.array([0.01, 0.2])).round(3).tolist()  # the violators are pooled
[0.25, 0.25]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]


def logit(p: npt.ArrayLike) -> F64:
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-9, 1.0 - 1e-9)
    return np.asarray(np.log(q / (1.0 - q)), dtype=np.float64)


def pav(y: F64, w: F64) -> F64:
    """Weighted isotonic (non-decreasing) fit of y by pool-adjacent-violators, O(n)."""
    means: list[float] = []
    weights: list[float] = []
    sizes: list[int] = []
    for yi, wi in zip(y.tolist(), w.tolist(), strict=True):
        means.append(yi)
        weights.append(wi)
        sizes.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            w2 = weights[-2] + weights[-1]
            m2 = (means[-2] * weights[-2] + means[-1] * weights[-1]) / w2 if w2 > 0 else means[-1]
            means[-2:], weights[-2:], sizes[-2:] = [m2], [w2], [sizes[-2] + sizes[-1]]
    return np.repeat(np.array(means), sizes)


def apply_curve(curve: tuple[F64, F64], pctr: npt.ArrayLike) -> F64:
    """Map pCTR through a cached :meth:`Calibrator.curve` (monotone, linear in logit)."""
    return np.asarray(np.interp(logit(pctr), curve[0], curve[1]), dtype=np.float64)


@dataclass(frozen=True)
class CalibrationParams:
    buckets: int = 20
    lo: float = 1e-4  # lower edge of the grid (pCTR)
    hi: float = 0.5  # upper edge of the grid (pCTR)
    prior_strength: float = 10.0  # m: pseudo-impressions at the cell's mean prediction

    def __post_init__(self) -> None:
        if self.buckets < 1 or not 0 < self.lo < self.hi < 1 or self.prior_strength < 0:
            msg = f"bad calibration params {self}: need buckets >= 1, 0 < lo < hi < 1, m >= 0"
            raise ValueError(msg)


@dataclass
class CalibrationState:
    n: F64  # impressions per cell
    clicks: F64  # clicks per cell
    pred_sum: F64  # sum of pCTR per cell

    def to_bytes(self) -> bytes:
        return np.stack([self.n, self.clicks, self.pred_sum]).astype("<f8").tobytes()

    @classmethod
    def from_bytes(cls, raw: bytes) -> CalibrationState:
        a = np.frombuffer(raw, dtype="<f8").reshape(3, -1).copy()
        return cls(a[0], a[1], a[2])

    def __add__(self, other: CalibrationState) -> CalibrationState:
        """Counts are additive: the sum of partition shards is the whole stream's state."""
        return CalibrationState(
            self.n + other.n, self.clicks + other.clicks, self.pred_sum + other.pred_sum
        )


class Calibrator:
    """River-style: ``update`` folds labelled predictions in, ``calibrate`` maps pCTR."""

    def __init__(self, params: CalibrationParams | None = None) -> None:
        self.params = params or CalibrationParams()
        p = self.params
        self.edges = np.linspace(
            math.log(p.lo / (1 - p.lo)), math.log(p.hi / (1 - p.hi)), p.buckets + 1
        )
        mid = (self.edges[:-1] + self.edges[1:]) / 2
        self.centres = 1.0 / (1.0 + np.exp(-mid))  # pCTR at each cell's logit midpoint

    def empty(self) -> CalibrationState:
        z = np.zeros(self.params.buckets)
        return CalibrationState(z.copy(), z.copy(), z.copy())

    def bucket(self, pctr: npt.ArrayLike) -> npt.NDArray[np.intp]:
        inner = self.edges[1:-1]
        return np.asarray(np.searchsorted(inner, logit(pctr), side="right"), dtype=np.intp)

    def update(
        self, state: CalibrationState, pctr: npt.ArrayLike, clicked: npt.ArrayLike
    ) -> CalibrationState:
        """New state after a batch of (pCTR, clicked 0/1) labels."""
        k = self.params.buckets
        idx = self.bucket(pctr)
        p = np.asarray(pctr, dtype=np.float64)
        y = np.asarray(clicked, dtype=np.float64)
        return CalibrationState(
            state.n + np.bincount(idx, minlength=k),
            state.clicks + np.bincount(idx, weights=y, minlength=k),
            state.pred_sum + np.bincount(idx, weights=p, minlength=k),
        )

    def predicted(self, state: CalibrationState) -> F64:
        """Mean pCTR per cell (the cell's centre while it is empty)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(state.n > 0, state.pred_sum / state.n, self.centres)

    def rates(self, state: CalibrationState) -> F64:
        """Observed rate per cell, shrunk to its prediction, then made monotone."""
        m = self.params.prior_strength
        pred = self.predicted(state)
        w = state.n + m
        with np.errstate(invalid="ignore", divide="ignore"):
            raw = np.where(w > 0, (state.clicks + m * pred) / w, pred)
        return pav(raw, np.where(w > 0, w, 1e-12))

    def trusted(self, state: CalibrationState, min_labels: float) -> CalibrationState | None:
        """``state`` with the cells under ``min_labels`` labels emptied; None if none has.

        An emptied cell falls back to the model (its rate is its own prediction),
        so serving can apply :meth:`calibrate` to the result from the first trusted
        cell on, and leave pCTR untouched while there is none.
        """
        keep = state.n >= min_labels
        if not np.any(keep):
            return None
        return CalibrationState(
            np.where(keep, state.n, 0.0),
            np.where(keep, state.clicks, 0.0),
            np.where(keep, state.pred_sum, 0.0),
        )

    def calibrate(self, state: CalibrationState, pctr: npt.ArrayLike) -> F64:
        """Calibrated CTR for each pCTR: linear in logit between cells' mean predictions."""
        return apply_curve(self.curve(state), pctr)

    def curve(self, state: CalibrationState) -> tuple[F64, F64]:
        """(logit of each cell's mean prediction, its calibrated rate): what serving caches."""
        return logit(self.predicted(state)), self.rates(state)

    def report(self, state: CalibrationState) -> list[dict[str, float]]:
        """Predicted vs observed per cell, for operators (``adpulse report``)."""
        lo = 1.0 / (1.0 + np.exp(-self.edges))
        pred, cal = self.predicted(state), self.rates(state)
        rows = []
        for i in range(self.params.buckets):
            n = float(state.n[i])
            rows.append(
                {
                    "from": 0.0 if i == 0 else float(lo[i]),
                    "to": 1.0 if i == self.params.buckets - 1 else float(lo[i + 1]),
                    "impressions": n,
                    "clicks": float(state.clicks[i]),
                    "predicted": float(pred[i]),
                    "observed": float(state.clicks[i] / n) if n > 0 else math.nan,
                    "calibrated": float(cal[i]),
                }
            )
        return rows
