"""Budget pacing by throttling: each campaign takes part in a request with probability p.

Why a throttle and not bid shading: a throttle leaves bids and the serving
policy untouched (values stay pCTR x bid, truthful), and its gate is a coin
drawn independently of the policy, so the decision's propensity is exactly
p(campaign) x P(policy picks the ad | candidates): off-policy evaluation stays
exact. Bid shading changes the values the policy sees, needs a model of the
win rate against bids, and has no such factor to log. Throttling is the
LinkedIn and Yahoo design (Agarwal et al., "Budget Pacing for Targeted Online
Advertisements at LinkedIn", KDD 2014; Xu et al., "Smart Pacing for Effective
Online Ad Campaign Optimization", KDD 2015).

Plan: target(t) = budget x F(t), F the cumulative traffic share of the UTC day
(uniform, or a supplied 24-hour profile, linear within each hour). Every
``interval_ms`` the controller sets
    p = clip(p_ff x exp(-(kp x e + ki x I)), p_min, 1)
where p_ff = plan rate / offered rate (feed-forward; the offered rate is the
spend at full participation, estimated as window spend / (p x window's traffic
share) and smoothed), e = (spent - target) / (budget x horizon) is the error
in units of ``horizon_h`` of plan, and I its integral over windows (held while
p saturates: anti-windup). p is constant within a window, so the probability
logged with a decision is the one its gate used. The first window runs at
``p_initial``, low, so a cold start cannot spend the morning's budget at once.

State is one 72-byte record per campaign (``RECORD_DTYPE``), reset at UTC midnight
except the traffic estimate, which carries over from day to day.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

DAY_MS = 24 * 3600 * 1000
HOUR_MS = 3600 * 1000

RECORD_DTYPE = np.dtype(
    [
        ("day", "<i8"),  # UTC day the spend belongs to
        ("spent", "<f8"),  # spend today
        ("p", "<f8"),  # participation probability in force
        ("integral", "<f8"),  # integral of the error over windows
        ("offered", "<f8"),  # estimate of spend per day at p = 1 (0 = unknown)
        ("win_start", "<i8"),  # start of the current control window (ms)
        ("win_spent", "<f8"),  # spend in the current window
        ("win_f", "<f8"),  # F(win_start)
        ("flags", "<i8"),  # reserved
    ]
)


def _uniform() -> tuple[float, ...]:
    return (1.0,) * 24


@dataclass(frozen=True)
class PacingParams:
    profile: tuple[float, ...] = field(default_factory=_uniform)  # traffic weight per UTC hour
    interval_ms: int = 60_000  # control window
    p_initial: float = 0.02  # participation in the very first window
    p_min: float = 1e-4
    kp: float = 1.0
    ki: float = 0.05
    horizon_h: float = 1.0  # the error is measured in hours of plan
    smoothing: float = 0.3  # weight of the newest window in the offered-rate estimate

    def __post_init__(self) -> None:
        if len(self.profile) != 24 or min(self.profile) < 0 or sum(self.profile) <= 0:
            msg = "pacing profile must be 24 non-negative hourly weights with a positive sum"
            raise ValueError(msg)

    def cumulative(self, now_ms: int) -> float:
        """F: share of the UTC day's traffic before ``now_ms`` (0 at midnight, 1 at the end)."""
        w = np.asarray(self.profile, dtype=np.float64) / sum(self.profile)
        t = (now_ms % DAY_MS) / HOUR_MS
        h = int(t)
        return float(w[:h].sum() + w[h] * (t - h))


def empty_record() -> npt.NDArray[Any]:
    rec = np.zeros((), dtype=RECORD_DTYPE)
    rec["day"] = -1
    return rec


def decode(raw: bytes | None) -> npt.NDArray[Any]:
    return np.frombuffer(raw, dtype=RECORD_DTYPE)[0].copy() if raw else empty_record()


def encode(rec: npt.NDArray[Any]) -> bytes:
    return np.asarray(rec, dtype=RECORD_DTYPE).tobytes()


def _roll(rec: npt.NDArray[Any], now_ms: int, params: PacingParams) -> None:
    """Start a new day (keeping the traffic estimate) or the first window."""
    day = now_ms // DAY_MS
    if int(rec["day"]) != day:
        first = int(rec["day"]) < 0
        rec["day"], rec["spent"], rec["integral"] = day, 0.0, 0.0
        rec["win_start"], rec["win_spent"] = now_ms, 0.0
        rec["win_f"] = params.cumulative(now_ms)
        if first:
            rec["p"] = params.p_initial


def control(rec: npt.NDArray[Any], budget: float, now_ms: int, params: PacingParams) -> float:
    """The participation probability at ``now_ms``, closing a control window if one ended."""
    _roll(rec, now_ms, params)
    if float(rec["spent"]) >= budget:
        return 0.0
    if now_ms - int(rec["win_start"]) < params.interval_ms:
        return float(rec["p"])
    f_now = params.cumulative(now_ms)
    df = f_now - float(rec["win_f"])
    p_old = float(rec["p"])
    if df > 0 and p_old > 0:
        seen = float(rec["win_spent"]) / (p_old * df)
        old = float(rec["offered"])
        rec["offered"] = (
            seen if old <= 0 else (1 - params.smoothing) * old + params.smoothing * seen
        )
    offered = float(rec["offered"])
    if offered <= 0:
        p = min(1.0, p_old * 2.0)  # nothing seen yet: probe upwards
    else:
        scale = budget * params.horizon_h / 24.0
        err = (float(rec["spent"]) - budget * f_now) / scale
        integral = float(rec["integral"]) + err * (now_ms - int(rec["win_start"])) / HOUR_MS
        u = params.kp * err + params.ki * integral
        p_raw = budget / offered * math.exp(-u)
        p = min(1.0, max(params.p_min, p_raw))
        if p == p_raw or (p_raw > 1.0) != (err < 0):  # anti-windup: hold I while saturated
            rec["integral"] = integral
    rec["p"] = p
    rec["win_start"], rec["win_spent"], rec["win_f"] = now_ms, 0.0, f_now
    return p


def record_spend(rec: npt.NDArray[Any], amount: float, now_ms: int, params: PacingParams) -> None:
    """Account spend (decision-time expected cost, or a click's settled cost)."""
    _roll(rec, now_ms, params)
    rec["spent"] += amount
    rec["win_spent"] += amount


class Pacer:
    """Throttle pacer over many campaigns; the records are what a table would hold."""

    def __init__(self, budgets: dict[str, float], params: PacingParams | None = None) -> None:
        self.params = params or PacingParams()
        self.budgets = dict(budgets)
        self.records: dict[str, npt.NDArray[Any]] = {}

    def record(self, campaign: str) -> npt.NDArray[Any]:
        return self.records.setdefault(campaign, empty_record())

    def probability(self, campaign: str, now_ms: int) -> float:
        return control(self.record(campaign), self.budgets[campaign], now_ms, self.params)

    def allow(self, campaign: str, now_ms: int, rng: np.random.Generator) -> tuple[bool, float]:
        """Whether the campaign takes part in this request, and with what probability."""
        p = self.probability(campaign, now_ms)
        return bool(rng.random() < p), p

    def spend(self, campaign: str, amount: float, now_ms: int) -> None:
        record_spend(self.record(campaign), amount, now_ms, self.params)
