"""Offline evaluation on an interaction log: splits, metrics, bootstrap intervals, popularity.

Pure numpy over the log's columns (:class:`Interactions`); the models are in
:mod:`scoring.offlinenets` and the reading of files in :mod:`adpulse.offlinedata`.

Why these choices:

* **Time split per user** (:func:`time_split`): the first 80% of each user's
  timeline trains and the rest tests, so every user is in both and the model
  always predicts a user's future from the past, as it would served.
* **Bootstrap by user** (:func:`user_resamples`): a user's rows are not
  independent (one user's taste moves them all), so the 95% intervals resample
  whole users with replacement (the cluster bootstrap; Davison & Hinkley,
  "Bootstrap Methods and their Application", 1997, section 3.8), which is wider
  and more honest than resampling rows. Differences between two models use the
  same resamples for both (a paired bootstrap), so what the users share cancels.
* **Calibration** as observed / expected clicks (sum of labels over sum of
  predictions): 1.0 is calibrated, below 1 over-predicts.

>>> time_split(np.array([0, 0, 0, 0, 0, 1, 1]), np.array([5, 1, 2, 3, 4, 9, 8])).tolist()
[False, True, True, True, True, False, True]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from scoring.train import auc, logloss

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
B = npt.NDArray[np.bool_]
TRAIN_SHARE = 0.8
HOLDOUT_SHARE = 0.1
POPULARITY_PRIOR = 10.0  # pseudo-interactions at the overall click rate per item


@dataclass(frozen=True)
class Interactions:
    """The log as columns, one entry per row; users and items as dense indices.

    ``kind`` indexes scoring.staterecord.KINDS; ``ts`` is epoch milliseconds;
    ``titles[i]`` is item i's title ("" when the log has none).
    """

    user: I64
    item: I64
    category: I64
    ts: I64
    label: F64
    kind: npt.NDArray[np.uint8]
    user_ids: tuple[str, ...]
    item_ids: tuple[str, ...]
    titles: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.user)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def item_category(self) -> I64:
        """Each item's category (the last one the log gives it)."""
        out = np.zeros(self.n_items, dtype=np.int64)
        out[self.item] = self.category
        return out


def time_split(user: I64, ts: I64, share: float = TRAIN_SHARE) -> B:
    """True for rows in the first ``share`` of their user's timeline (by ts, then row order).

    A user with n rows trains on floor(share * n) of them; rows with equal ts
    keep the log's order, so the split is deterministic.
    """
    n = len(user)
    order = np.lexsort((np.arange(n), ts, user))
    u = user[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    sizes = np.diff(np.r_[starts, n])
    rank = np.arange(n) - np.repeat(starts, sizes)
    keep = rank < np.repeat(np.floor(share * sizes).astype(np.int64), sizes)
    out = np.zeros(n, dtype=bool)
    out[order] = keep
    return out


def held_out_items(n_items: int, share: float = HOLDOUT_SHARE, seed: int = 7) -> B:
    """A fixed random ``share`` of the items (at least one), by index, for the item-holdout."""
    k = max(1, round(share * n_items))
    out = np.zeros(n_items, dtype=bool)
    out[np.random.default_rng(seed).choice(n_items, size=k, replace=False)] = True
    return out


def popularity(item: I64, label: F64, n_items: int, prior: float = POPULARITY_PRIOR) -> F64:
    """Each item's click rate in training, shrunk toward the overall rate by ``prior``
    pseudo-rows (an item never seen in training gets the overall rate).

    >>> popularity(np.array([0, 0, 1]), np.array([1.0, 1.0, 0.0]), 3, prior=1.0).round(3).tolist()
    [0.889, 0.333, 0.667]
    """
    base = float(label.mean()) if len(label) else 0.5
    clicks = np.bincount(item, weights=label, minlength=n_items)
    seen = np.bincount(item, minlength=n_items).astype(np.float64)
    return (clicks + prior * base) / (seen + prior)


def calibration_ratio(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    """Observed over expected clicks: sum(y) / sum(p); 1.0 when calibrated on average."""
    expected = float(np.sum(p))
    return float(np.sum(y)) / expected if expected > 0 else float("nan")


METRICS: dict[str, Callable[[F64, F64], float]] = {
    "auc": auc,
    "logloss": logloss,
    "calibration": calibration_ratio,
}


def user_resamples(user: I64, n_boot: int, seed: int = 7) -> list[I64]:
    """``n_boot`` bootstrap resamples of row indices, drawing whole users with replacement."""
    order = np.argsort(user, kind="stable")
    u = user[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.zeros(0, np.int64)
    groups = np.split(order, starts[1:])
    rng = np.random.default_rng(seed)
    return [
        np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))])
        for _ in range(n_boot)
    ]


def _interval(values: Sequence[float]) -> list[float]:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return [float("nan"), float("nan")]
    return [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))]


def scored(y: F64, p: F64, resamples: Sequence[I64]) -> dict[str, float | list[float]]:
    """AUC, log loss and calibration of predictions ``p``, each with its bootstrap 95% CI."""
    out: dict[str, float | list[float]] = {}
    for name, f in METRICS.items():
        out[name] = f(y, p)
        out[f"{name}_ci95"] = _interval([f(y[r], p[r]) for r in resamples])
    return out


def auc_gain(y: F64, p_new: F64, p_old: F64, resamples: Sequence[I64]) -> tuple[float, list[float]]:
    """AUC(p_new) - AUC(p_old) and its paired bootstrap 95% CI."""
    gain = auc(y, p_new) - auc(y, p_old)
    return gain, _interval([auc(y[r], p_new[r]) - auc(y[r], p_old[r]) for r in resamples])
