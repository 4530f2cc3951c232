"""Budget pacing by throttling: each campaign takes part in a request with probability p.

Why a throttle and not bid shading: a throttle leaves bids and the serving
policy untouched (values stay pCTR x bid, truthful), and its gate is a coin
drawn independently of the policy before the policy sees the candidates: a
throttled campaign's ads are simply not candidates, like a frequency-capped
ad, so the policy's logged propensity (its probability over the candidates it
was given) stays exact. Bid shading changes the values the policy sees and
needs a model of the win rate against bids, which a single-seller ad server
does not have. Throttling is the LinkedIn and Yahoo design (Agarwal et al.,
"Budget Pacing for Targeted Online Advertisements at LinkedIn", KDD 2014;
Xu et al., "Smart Pacing for Effective Online Ad Campaign Optimization",
KDD 2015).

Plan: target(t) = budget x F(t), F the cumulative traffic share of the UTC day
(uniform, or a supplied 24-hour profile, linear within each hour). At the end
of each control window (``interval_ms``) the controller sets
    p = clip(p_ff x exp(-(kp x e + ki x I)), p_min, 1)
where p_ff = budget / offered (feed-forward; the offered rate is the spend per
day at full participation, estimated as window spend / (p x window's traffic
share) and smoothed), e = (spent - target) / (budget x horizon) is the error
in units of ``horizon_h`` of plan, and I its integral over windows (held while
p saturates: anti-windup). p is constant within a window. Hard stop: p = 0
once the budget is spent.

Cold start: a campaign never seen before starts at ``p_initial`` (1: a campaign
whose budget dwarfs its traffic is never throttled) with short windows
(``probe_interval_ms``) until a window has seen spend, so the offered rate is
known within about a second of traffic. Any window also closes early once its
spend reaches ``max_window_share`` of the budget: whatever p a window started
with, at most that share (plus one batch) is spent before the controller acts.

State is one 72-byte record per campaign (``RECORD_DTYPE``), reset at UTC midnight
except the traffic estimate and p, which carry over from day to day.

>>> pacer = Pacer({"c": 100.0})
>>> pacer.probability("c", 0)  # a new campaign takes part in every request at first
1.0
>>> pacer.spend("c", 5.0, 10)  # 5% of the day's budget in 10 ms: far over plan
>>> pacer.probability("c", 20) < 1e-3  # the window closed early and throttled it
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

DAY_MS = 24 * 3600 * 1000
HOUR_MS = 3600 * 1000
MIN_WINDOW_F = 1e-6  # ~86 ms of a uniform day: the shortest window a rate is measured over

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
    p_initial: float = 1.0  # participation in a new campaign's first window
    probe_interval_ms: int = 1_000  # window length while the offered rate is unknown
    max_window_share: float = 0.01  # a window closes early once it spent this share of budget
    p_min: float = 1e-4
    kp: float = 1.0
    ki: float = 0.05
    horizon_h: float = 1.0  # the error is measured in hours of plan
    smoothing: float = 0.3  # weight of the newest window in the offered-rate estimate

    def __post_init__(self) -> None:
        if len(self.profile) != 24 or min(self.profile) < 0 or sum(self.profile) <= 0:
            msg = "pacing profile must be 24 non-negative hourly weights with a positive sum"
            raise ValueError(msg)
        if not 0 < self.p_initial <= 1 or self.interval_ms <= 0 or self.probe_interval_ms <= 0:
            msg = f"bad pacing params {self}: need 0 < p_initial <= 1 and positive intervals"
            raise ValueError(msg)

    def cumulative(self, now_ms: int) -> float:
        """F: share of the UTC day's traffic before ``now_ms`` (0 at midnight, 1 at the end)."""
        w = np.asarray(self.profile, dtype=np.float64) / sum(self.profile)
        t = (now_ms % DAY_MS) / HOUR_MS
        h = int(t)
        return float(w[:h].sum() + w[h] * (t - h))


def parse_profile(text: str) -> tuple[float, ...]:
    """``ADPULSE_PACING_PROFILE``: 24 comma-separated hourly weights (UTC); empty: uniform."""
    if not text.strip():
        return _uniform()
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        weights = ()
    if (
        len(weights) != 24
        or min(weights) < 0
        or sum(weights) <= 0
        or not all(math.isfinite(w) for w in weights)
    ):
        msg = f"pacing profile {text!r}: give 24 comma-separated non-negative hourly weights"
        raise ValueError(msg)
    return weights


def throttle(
    codes: npt.NDArray[np.intp], p: npt.NDArray[np.float64], rng: np.random.Generator
) -> npt.NDArray[np.bool_]:
    """Which candidate rows take part in one request: one coin per campaign.

    ``codes`` are the rows' campaign numbers, ``p`` every campaign's participation.
    A campaign's rows share its coin, so the campaign (not each of its ads) takes
    part with probability p. Coins are drawn only for campaigns with p < 1 (for all
    of them: O(campaigns) per request, vectorised).

    >>> rng = np.random.default_rng(0)
    >>> throttle(np.array([0, 1, 1]), np.array([1.0, 0.0]), rng).tolist()
    [True, False, False]
    """
    low = np.flatnonzero(p < 1.0)
    if not len(low) or not len(codes):
        return np.ones(len(codes), dtype=np.bool_)
    coins = np.ones(len(p), dtype=np.bool_)
    coins[low] = rng.random(len(low)) < p[low]
    return np.asarray(coins[codes], dtype=np.bool_)


def empty_record() -> npt.NDArray[Any]:
    rec = np.zeros((), dtype=RECORD_DTYPE)
    rec["day"] = -1
    return rec


def decode(raw: bytes | None) -> npt.NDArray[Any]:
    return np.frombuffer(raw, dtype=RECORD_DTYPE)[0].copy() if raw else empty_record()


def encode(rec: npt.NDArray[Any]) -> bytes:
    return np.asarray(rec, dtype=RECORD_DTYPE).tobytes()


def roll(rec: npt.NDArray[Any], now_ms: int, params: PacingParams) -> None:
    """Start a new day (keeping the traffic estimate and p) or the first window."""
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
    roll(rec, now_ms, params)
    if float(rec["spent"]) >= budget:
        return 0.0
    known = float(rec["offered"]) > 0
    length = params.interval_ms if known else params.probe_interval_ms
    burst = float(rec["win_spent"]) >= params.max_window_share * budget
    if now_ms - int(rec["win_start"]) < length and not burst:
        return float(rec["p"])
    f_now = params.cumulative(now_ms)
    df = f_now - float(rec["win_f"])
    if burst:  # a window closed within the same instant still measured a rate
        df = max(df, MIN_WINDOW_F)
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
    roll(rec, now_ms, params)
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
