"""A/B experiments: stable keyed-hash arm assignment and per-arm CTR/CVR statistics.

Assignment: u = HMAC-SHA256(experiment key, user id), its first 53 bits read
as a number in [0, 1); the arm is the first whose cumulative traffic share
exceeds u. The same user gets the same arm in every process and after every
restart (no state, no seed), different experiments (keys) assign independently,
and without the key nobody can predict or steer an assignment.

Statistics per arm: impressions, clicks, conversions. CTR = clicks /
impressions, CVR = conversions / clicks (post-click conversion rate). Each with
a 95% Wilson score interval (Wilson, JASA 1927; recommended over the Wald
interval by Brown, Cai & DasGupta, Stat. Sci. 2001) and, against the control
arm (arm 0), a pooled two-proportion z-test with its two-sided p-value.
No correction for multiple arms or for peeking: read p-values with that in mind.

>>> [round(x, 4) for x in wilson(81, 263)]  # Newcombe (Stat. Med. 1998), example (a)
[0.2553, 0.3662]
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Z95 = 1.959963984540054  # two-sided 95% normal quantile
COUNTS = ("impressions", "clicks", "conversions")


@dataclass(frozen=True)
class Arm:
    name: str
    share: float
    policy: str = "greedy"  # a policy spec as in ADPULSE_PLACEMENT_POLICIES


@dataclass(frozen=True)
class Experiment:
    """Arms in order, the first being the control; shares must sum to 1."""

    name: str
    key: bytes
    arms: tuple[Arm, ...]

    def __post_init__(self) -> None:
        shares = [a.share for a in self.arms]
        if len(self.arms) < 1 or min(shares) < 0 or not math.isclose(sum(shares), 1.0):
            msg = f"experiment {self.name!r}: arm shares {shares} must be >= 0 and sum to 1"
            raise ValueError(msg)

    def arm_of(self, user_id: str) -> int:
        return assign(user_id, self.key, [a.share for a in self.arms])


def unit_hash(user_id: str, key: bytes) -> float:
    """HMAC-SHA256(key, user_id) mapped uniformly to [0, 1) with 53 bits."""
    digest = hmac.new(key, user_id.encode(), hashlib.sha256).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)


def assign(user_id: str, key: bytes, shares: list[float] | tuple[float, ...]) -> int:
    """Arm index for a user: the first arm whose cumulative share exceeds the hash."""
    u = unit_hash(user_id, key)
    cum = np.cumsum(shares) / sum(shares)
    return min(int(np.searchsorted(cum, u, side="right")), len(shares) - 1)


def empty_counts(arms: int) -> npt.NDArray[np.int64]:
    """(arms, 3) counts: impressions, clicks, conversions; ``.tobytes()`` to store."""
    return np.zeros((arms, len(COUNTS)), dtype="<i8")


def decode_counts(raw: bytes) -> npt.NDArray[np.int64]:
    return np.frombuffer(raw, dtype="<i8").reshape(-1, len(COUNTS)).copy()


def update(
    counts: npt.NDArray[np.int64],
    arm: npt.ArrayLike,
    clicked: npt.ArrayLike,
    converted: npt.ArrayLike,
) -> npt.NDArray[np.int64]:
    """New counts after a batch of labelled impressions (one row per impression)."""
    a = np.asarray(arm, dtype=np.intp)
    k = len(counts)
    add = np.stack(
        [
            np.bincount(a, minlength=k),
            np.bincount(a, weights=np.asarray(clicked, dtype=np.float64), minlength=k),
            np.bincount(a, weights=np.asarray(converted, dtype=np.float64), minlength=k),
        ],
        axis=1,
    )
    return counts + add.astype(np.int64)


def wilson(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials ((0, 1) when n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def two_proportion_z(k1: float, n1: float, k2: float, n2: float) -> tuple[float, float]:
    """Pooled z statistic of p2 - p1 and its two-sided p-value (nan, 1.0 when undefined)."""
    if n1 <= 0 or n2 <= 0:
        return math.nan, 1.0
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return math.nan, 1.0
    z = (k2 / n2 - k1 / n1) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


def diff_ci(k0: float, n0: float, k1: float, n1: float, z: float = Z95) -> tuple[float, float]:
    """Wald interval of p1 - p0 (unpooled variances): for arms with hundreds of clicks each,
    as pooled simulation runs have; NaN where an arm has no labels."""
    if n0 <= 0 or n1 <= 0:
        return math.nan, math.nan
    p0, p1 = k0 / n0, k1 / n1
    half = z * math.sqrt(p0 * (1 - p0) / n0 + p1 * (1 - p1) / n1)
    return p1 - p0 - half, p1 - p0 + half


def report(exp: Experiment, counts: npt.NDArray[np.int64]) -> list[dict[str, Any]]:
    """Per arm: counts, CTR and CVR with 95% intervals, and z/p against the control."""
    return compare([a.name for a in exp.arms], counts, [a.policy for a in exp.arms])


def compare(
    names: list[str],
    counts: npt.NDArray[np.int64],
    policies: list[str] | None = None,
    control: int = 0,
) -> list[dict[str, Any]]:
    """Per group (arm or policy): counts, CTR and CVR with 95% intervals, and the
    difference against group ``control`` with its pooled z-test (z, two-sided p)."""
    rows = []
    imp0, clk0, cnv0 = (float(x) for x in counts[control])
    ctr0 = clk0 / imp0 if imp0 else math.nan
    cvr0 = cnv0 / clk0 if clk0 else math.nan
    for i, (name, (imp, clk, cnv)) in enumerate(zip(names, counts.astype(float), strict=True)):
        ctr_z, ctr_p = two_proportion_z(clk0, imp0, clk, imp)
        cvr_z, cvr_p = two_proportion_z(cnv0, clk0, cnv, clk)
        ctr = clk / imp if imp else math.nan
        cvr = cnv / clk if clk else math.nan
        rows.append(
            {
                "arm": name,
                "policy": policies[i] if policies is not None else name,
                "control": i == control,
                "impressions": int(imp),
                "clicks": int(clk),
                "conversions": int(cnv),
                "ctr": ctr,
                "ctr_ci": wilson(clk, imp),
                "cvr": cvr,
                "cvr_ci": wilson(cnv, clk),
                "ctr_diff": ctr - ctr0,
                "ctr_z": ctr_z,
                "ctr_p": ctr_p,
                "cvr_diff": cvr - cvr0,
                "cvr_z": cvr_z,
                "cvr_p": cvr_p,
            }
        )
    return rows
