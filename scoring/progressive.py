"""Progressive validation: each label is scored by the model *before* the model learns it.

Blum, Kalai and Langford ("Beating the hold-out: bounds for k-fold and progressive
cross-validation", COLT 1999) show that the mean loss of predictions made this way
estimates the model's generalisation error as well as a hold-out set of the same
size, while every label is still learned: the standard online metric (McMahan et
al., "Ad click prediction: a view from the trenches", KDD 2013, section 5.1).

A :class:`SlidingWindow` keeps the last ``size`` (label, prediction) pairs in a
ring, and :meth:`SlidingWindow.summary` computes AUC, log loss and calibration
(observed / expected CTR: sum of labels over sum of predictions; 1 is calibrated,
below 1 the model over-predicts) over exactly those pairs, so a dashboard shows
how the model does now, not since it started.

>>> w = SlidingWindow(3)
>>> w.add([1, 0, 0, 1], [0.9, 0.2, 0.1, 0.6])
>>> w.labels.tolist(), round(w.summary().calibration, 3)
([0.0, 0.0, 1.0], 1.111)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from scoring.train import auc
from scoring.train import logloss as _logloss

F64 = npt.NDArray[np.float64]


def logloss(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    """Mean binary cross-entropy (:func:`scoring.train.logloss`); NaN when empty."""
    return _logloss(y, p) if len(np.asarray(y)) else float("nan")


def calibration_ratio(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    """Observed over expected CTR: sum(y) / sum(p); NaN when nothing was predicted."""
    expected = float(np.sum(np.asarray(p, dtype=np.float64)))
    if expected <= 0.0:
        return float("nan")
    return float(np.sum(np.asarray(y, dtype=np.float64))) / expected


@dataclass(frozen=True)
class WindowSummary:
    """The metrics of one window; NaN where undefined (empty, or a single class for AUC)."""

    labels: int
    clicks: int
    auc: float
    logloss: float
    calibration: float  # observed / expected CTR

    def as_json(self) -> dict[str, Any]:
        """For metrics.json: NaN becomes null (JSON has no NaN)."""
        return {k: None if isinstance(v, float) and math.isnan(v) else
                (round(v, 6) if isinstance(v, float) else v)
                for k, v in asdict(self).items()}  # fmt: skip


class SlidingWindow:
    """The last ``size`` (label, prediction) pairs, oldest overwritten first."""

    def __init__(self, size: int) -> None:
        if size < 1:
            msg = f"window size {size}: must be at least 1 label"
            raise ValueError(msg)
        self.size = size
        self._y = np.zeros(size, dtype=np.float64)
        self._p = np.zeros(size, dtype=np.float64)
        self._next = 0  # where the next pair goes
        self._count = 0  # pairs held, <= size

    def __len__(self) -> int:
        return self._count

    def add(self, y: npt.ArrayLike, p: npt.ArrayLike) -> None:
        """Append pairs in arrival order (a batch larger than the window keeps its tail)."""
        yv = np.asarray(y, dtype=np.float64).reshape(-1)[-self.size :]
        pv = np.asarray(p, dtype=np.float64).reshape(-1)[-self.size :]
        if len(yv) != len(pv):
            msg = f"{len(yv)} labels but {len(pv)} predictions"
            raise ValueError(msg)
        idx = (self._next + np.arange(len(yv))) % self.size
        self._y[idx], self._p[idx] = yv, pv
        self._next = int((self._next + len(yv)) % self.size)
        self._count = min(self.size, self._count + len(yv))

    def _order(self) -> npt.NDArray[np.int64]:
        start = (self._next - self._count) % self.size
        return (start + np.arange(self._count)) % self.size

    @property
    def labels(self) -> F64:
        """The window's labels, oldest first."""
        return self._y[self._order()]

    @property
    def predictions(self) -> F64:
        """The window's predictions, oldest first."""
        return self._p[self._order()]

    def summary(self) -> WindowSummary:
        y, p = self.labels, self.predictions
        return WindowSummary(
            labels=len(y),
            clicks=int(y.sum()),
            auc=auc(y, p),
            logloss=logloss(y, p),
            calibration=calibration_ratio(y, p),
        )

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the pairs, oldest first."""
        return {"size": self.size, "y": self.labels.tolist(), "p": self.predictions.tolist()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], size: int | None = None) -> SlidingWindow:
        """Restore a window (its newest pairs only, if ``size`` is now smaller)."""
        w = cls(int(size if size is not None else state["size"]))
        w.add(state["y"], state["p"])
        return w


class ProgressiveValidation:
    """Sliding windows of several sizes for each model that scores the same labels.

    ``models`` name the scorers compared side by side: the online model being
    trained and the serving version, both scoring each batch before it is learned.
    """

    def __init__(self, sizes: tuple[int, ...]) -> None:
        if not sizes:
            msg = "at least one window size is needed"
            raise ValueError(msg)
        self.sizes = tuple(sorted(set(sizes)))
        self.windows: dict[str, dict[int, SlidingWindow]] = {}

    def add(self, model: str, y: npt.ArrayLike, p: npt.ArrayLike) -> None:
        ws = self.windows.setdefault(model, {n: SlidingWindow(n) for n in self.sizes})
        for w in ws.values():
            w.add(y, p)

    def forget(self, model: str) -> None:
        """Drop a model's windows (a serving version replaced: its metrics must not linger)."""
        self.windows.pop(model, None)

    def summaries(self) -> dict[str, dict[int, WindowSummary]]:
        return {m: {n: w.summary() for n, w in ws.items()} for m, ws in self.windows.items()}

    def recent(self, model: str) -> WindowSummary | None:
        """The smallest window's summary: the most recent held-back labels."""
        ws = self.windows.get(model)
        return None if ws is None else ws[self.sizes[0]].summary()

    def state(self) -> dict[str, Any]:
        return {m: {str(n): w.state() for n, w in ws.items()} for m, ws in self.windows.items()}

    @classmethod
    def from_state(cls, sizes: tuple[int, ...], state: Mapping[str, Any]) -> ProgressiveValidation:
        """Restore saved windows; each size is refilled from the longest window saved."""
        pv = cls(sizes)
        for model, ws in state.items():
            longest = max(ws.values(), key=lambda w: len(w["y"]))
            pv.windows[model] = {n: SlidingWindow.from_state(longest, n) for n in pv.sizes}
        return pv


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"1000,10000"`` -> (1000, 10000); ValueError naming the bad part."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            n = int(part)
        except ValueError:
            n = 0
        if n < 1:
            msg = f"window size {part!r}: expected a whole number of labels >= 1"
            raise ValueError(msg)
        out.append(n)
    if not out:
        msg = "no window sizes: give labels per window, comma-separated (e.g. 1000,10000)"
        raise ValueError(msg)
    return tuple(sorted(set(out)))
