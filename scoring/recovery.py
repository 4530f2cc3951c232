"""Recovery after a drift: online AUC per window of the run and the windows it takes to come back.

``adpulse simulate --trainer`` compares two models on the *same* labels: the model
that served each decision (its raw pCTR travels with the label, so every label was
scored before any model learned it: progressive validation) and the model frozen at
the start of the run, which scores the logged features afterwards.

Definitions (docs/training.md, "Drift"):

* **windows**: the run's request index cut into equal bins (the CTR plot's bins);
  a label belongs to the window of its decision's request.
* **pre-drift level** of a model: the mean of its window AUCs over the last
  ``reference`` windows that end at or before the drift (a window of a few dozen
  clicks has an AUC standard error of about 0.04, so one window is not enough; the
  labels are not pooled across windows, because the served curve changes model from
  window to window and AUC over rows scored by different models understates each).
* **time to recover**, in windows: the number of windows after the drift that pass
  before the first one from which the model's AUC is at least ``level - tolerance``
  for ``hold`` windows in a row (fewer when the run ends first). 0: it never fell
  below; None: not back by the end of the run. A window that straddles the drift is
  neither reference nor after it.

>>> windows_to_recover([0.60, 0.62, 0.70, 0.71, 0.72], level=0.72, tolerance=0.02, hold=2)
2
>>> windows_to_recover([0.71, 0.73, 0.70], level=0.72, tolerance=0.02, hold=2)
0
>>> windows_to_recover([0.60, 0.61], level=0.72, tolerance=0.02, hold=2) is None
True
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from scoring.train import auc


@dataclass(frozen=True)
class Window:
    """One window's labels, clicks and AUC of the model (NaN without both classes)."""

    start: int  # first request index
    end: int  # one past the last
    labels: int
    clicks: int
    auc: float


def window_auc(
    index: npt.ArrayLike, y: npt.ArrayLike, p: npt.ArrayLike, edges: Sequence[int]
) -> list[Window]:
    """AUC of predictions ``p`` for labels ``y`` in each window [edges[k], edges[k+1])."""
    idx = np.asarray(index, dtype=np.int64)
    yv, pv = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    out = []
    for lo, hi in itertools.pairwise(edges):
        m = (idx >= lo) & (idx < hi)
        out.append(Window(int(lo), int(hi), int(m.sum()), int(yv[m].sum()), auc(yv[m], pv[m])))
    return out


def split_at_drift(edges: Sequence[int], drift_index: int) -> tuple[list[int], list[int]]:
    """Window numbers wholly before the drift and wholly after it (a straddling one is in
    neither)."""
    before = [k for k in range(len(edges) - 1) if edges[k + 1] <= drift_index]
    after = [k for k in range(len(edges) - 1) if edges[k] >= drift_index]
    return before, after


def windows_to_recover(
    after: Sequence[float], level: float, tolerance: float, hold: int = 2
) -> int | None:
    """Windows after the drift before the first of ``hold`` in a row at ``level - tolerance``
    or above (see the module docstring); None when that never happens, or ``level`` is NaN."""
    if math.isnan(level) or hold < 1:
        return None
    ok = [not math.isnan(a) and a >= level - tolerance for a in after]
    for k in range(len(ok)):
        run = ok[k : k + hold]
        if all(run) and run:
            return k
    return None


@dataclass(frozen=True)
class Recovery:
    level: float  # pre-drift AUC (mean over the reference windows)
    floor: float  # lowest window AUC after the drift
    windows_to_recover: int | None

    def as_json(self) -> dict[str, Any]:
        return {k: None if isinstance(v, float) and math.isnan(v) else v
                for k, v in asdict(self).items()}  # fmt: skip


def recovery(
    index: npt.ArrayLike,
    y: npt.ArrayLike,
    p: npt.ArrayLike,
    edges: Sequence[int],
    drift_index: int,
    *,
    reference: int = 3,
    tolerance: float = 0.02,
    hold: int = 2,
) -> tuple[list[Window], Recovery]:
    """One model's windows and its recovery (module docstring for the definitions)."""
    windows = window_auc(index, y, p, edges)
    before, after = split_at_drift(edges, drift_index)
    ref = [windows[k].auc for k in before[-reference:] if not math.isnan(windows[k].auc)]
    level = float(np.mean(ref)) if ref else math.nan
    post = [windows[k].auc for k in after]
    finite = [a for a in post if not math.isnan(a)]
    return windows, Recovery(
        level=level,
        floor=min(finite) if finite else math.nan,
        windows_to_recover=windows_to_recover(post, level, tolerance, hold),
    )


def paired_auc_diff(
    y: npt.ArrayLike, p1: npt.ArrayLike, p2: npt.ArrayLike, *, draws: int = 200, seed: int = 0
) -> tuple[float, float, float]:
    """AUC(p1) - AUC(p2) on the same labels, and its 95% percentile-bootstrap interval.

    Paired: each draw resamples labels (with replacement) and scores both models on the
    same resample, so the interval is of the difference, much narrower than either AUC's
    own; NaN when there are not both classes."""
    yv = np.asarray(y, dtype=np.float64)
    a, b = np.asarray(p1, dtype=np.float64), np.asarray(p2, dtype=np.float64)
    diff = auc(yv, a) - auc(yv, b)
    if math.isnan(diff):
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    got = []
    for _ in range(draws):
        i = rng.integers(0, len(yv), len(yv))
        d = auc(yv[i], a[i]) - auc(yv[i], b[i])
        if not math.isnan(d):
            got.append(d)
    lo, hi = np.percentile(got, [2.5, 97.5]) if got else (math.nan, math.nan)
    return diff, float(lo), float(hi)
