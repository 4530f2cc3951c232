"""Exponential forgetting by event time, for the bandits' counts and LinUCB statistics.

A label shown at event time t (its ``decision_ts``) is worth 2^(-(T - t)/h) at
time T, for a half-life of h hours (``ADPULSE_BANDIT_HALF_LIFE_H``; 0 keeps every
label at full weight forever, as before). A statistic is then a weighted sum
S(T) = sum_i w_i 2^(-(T - t_i)/h), stored scaled to a reference time ``ts``
(the latest event time folded in). Folding labels at times t_i into a record
at ``ts``: T = max(ts, t_i...), the record is multiplied by 2^(-(T - ts)/h) and
each label added with weight 2^(-(T - t_i)/h) <= 1, so nothing ever overflows
and the result is the same sum whatever the arrival order (up to rounding):
equal to a batch recompute over the labels and their times, exact under
redelivery because the learner's dedupe already drops repeats. Reading at a
later time ``now`` multiplies by 2^(-(now - ts)/h) (Thompson does so at each
decision, with the decision's own time). Event time, never the wall clock: a
replay or a restore reproduces the state bit for bit.

Why ``decision_ts`` and not ``label_ts``: a non-click is labelled a window after
its impression and a click sooner, so weighting by label time would weigh a
moment's clicks below its non-clicks and bias the CTR down.

See Garivier & Moulines, "On Upper-Confidence Bound Policies for Switching
Bandit Problems" (ALT 2011: discounted UCB) and Russo et al., "A Tutorial on
Thompson Sampling" (2018, section 6.3: nonstationary systems).

>>> decay(3_600_000, 1.0)  # one half-life later
0.5
>>> decay(3_600_000, 0.0)  # no forgetting
1.0
>>> weights([0, 3_600_000], 7_200_000, 1.0).tolist()
[0.25, 0.5]
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

HOUR_MS = 3_600_000.0


def check_half_life(half_life_h: float) -> float:
    """The half-life, or a clear error for a negative or non-finite one."""
    if not (math.isfinite(half_life_h) and half_life_h >= 0):
        msg = f"bandit half-life {half_life_h!r} h: need a finite number >= 0 (0: no forgetting)"
        raise ValueError(msg)
    return float(half_life_h)


def half_lives(shared_h: float, thompson_h: float, linucb_h: float) -> tuple[float, float]:
    """(Thompson's, LinUCB's) half-lives: each learner's own, or the shared one where it is -1.

    Two knobs, because the learners react differently: Thompson's faded counts weigh
    little against its model prior, so forgetting pulls it towards greedy, while LinUCB,
    with no prior, needs it to follow a drift (docs/evaluation.md, "Forgetting").
    """
    own = [shared_h if h == -1 else h for h in (thompson_h, linucb_h)]
    return check_half_life(own[0]), check_half_life(own[1])


def decay(dt_ms: float, half_life_h: float) -> float:
    """The factor a statistic shrinks by over ``dt_ms`` of event time (1 when ``dt_ms`` <= 0)."""
    if half_life_h <= 0 or dt_ms <= 0:
        return 1.0
    return float(2.0 ** (-dt_ms / (half_life_h * HOUR_MS)))


def weights(ts_ms: npt.ArrayLike, ref_ms: int, half_life_h: float) -> npt.NDArray[np.float64]:
    """Each label's weight at ``ref_ms`` (labels at or after ``ref_ms`` weigh 1)."""
    t = np.asarray(ts_ms, dtype=np.float64)
    if half_life_h <= 0:
        return np.ones(t.shape, dtype=np.float64)
    dt = np.maximum(float(ref_ms) - t, 0.0)
    return np.asarray(np.exp2(-dt / (half_life_h * HOUR_MS)), dtype=np.float64)
