"""Every serving policy behind one ``choose(candidates, rng)``, and the text that names it.

A decision hands its policy the scored candidates (:class:`Candidates`): pCTR,
bids, the user's interest vector, and a way to read the ads' learner state,
which only the bandits call (one read per ad per batch, through
:class:`StrategyReader`). ``greedy``, ``epsilon-greedy`` and ``random`` rank
pCTR x bid (:class:`ByValue`); ``thompson`` and ``linucb`` also weigh the
learned counts (:class:`Bandit`).

Billing cpa. ``bids`` is the value of a click: the bid, or pCVR x bid for a
cost-per-conversion ad (streams/decide.py), so every policy ranks pCTR x pCVR x
bid for those. Thompson's reward for a cpa ad is the conversion, not the click:
its posterior is on pCTR x pCVR (the prior) with the ad's impressions and
conversions as evidence (``AdState.conversions``), the draw times the bid. LinUCB
keeps learning clicks (its per-ad state is a d x d matrix; a second one for
conversions, ~100 times rarer, would double it and learn slowly) and values a
cpa ad's click at pCVR x bid. Policies are named in settings as text
(:func:`parse_policy`), per placement (:func:`placement_policies`) and per
experiment arm (:func:`parse_experiment`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from scoring.featurespec import user_features
from scoring.strategy import Choice, Strategy
from scoring.strategy.ab import Arm, Experiment
from scoring.strategy.epsilon import EpsilonGreedy
from scoring.strategy.forgetting import decay, half_lives
from scoring.strategy.greedy import Greedy
from scoring.strategy.linucb import LinUCB, LinUCBParams
from scoring.strategy.state import AdState, decode_ad, segment_of, state_key
from scoring.strategy.thompson import STATS_DTYPE, ThompsonParams, ThompsonSampling, backoff
from scoring.strategy.uniform import UniformRandom


@dataclass(frozen=True)
class Candidates:
    """One request's eligible ads as the policy sees them (arrays in candidate order)."""

    pctr: npt.NDArray[np.float64]  # served pCTR (calibrated)
    bids: npt.NDArray[np.float64]
    vector: npt.NDArray[np.float32] | None  # the user's decayed interest; None: no history
    states: Callable[[], Sequence[AdState]]  # the ads' learner state, read on demand
    ts: int = 0  # the decision's event time (epoch ms): Thompson's counts fade up to it
    pcvr: npt.NDArray[np.float64] | None = None  # pCVR per candidate (model's, else prior)
    cpa: npt.NDArray[np.bool_] | None = None  # cost-per-conversion candidates


class Policy(Protocol):
    @property
    def name(self) -> str: ...

    def choose(self, c: Candidates, rng: np.random.Generator) -> Choice: ...


@dataclass(frozen=True)
class ByValue:
    """A strategy that ranks expected value, pCTR x bid (greedy, epsilon-greedy, random)."""

    strategy: Strategy

    @property
    def name(self) -> str:
        return self.strategy.name

    def choose(self, c: Candidates, rng: np.random.Generator) -> Choice:
        return self.strategy.choose(c.pctr * c.bids, rng)


@dataclass(frozen=True)
class PolicyParams:
    """The bandits' knobs (built from Settings by the stage that serves them)."""

    dim: int = 64
    thompson_prior_strength: float = 20.0
    thompson_draws: int = 1000
    thompson_min_segment_shows: float = 50.0
    linucb_alpha: float = 1.0
    linucb_ridge: float = 1.0
    linucb_offset: bool = True  # scoring/strategy/linucb.py: theta learns click - pCTR
    thompson_half_life_h: float = 0.0  # forgetting (scoring/strategy/forgetting.py); 0: none

    @classmethod
    def from_settings(cls, s: Any) -> PolicyParams:
        return cls(
            dim=s.dim,
            thompson_prior_strength=s.thompson_prior_strength,
            thompson_draws=s.thompson_draws,
            thompson_min_segment_shows=s.thompson_min_segment_shows,
            linucb_alpha=s.linucb_alpha,
            linucb_ridge=s.linucb_ridge,
            linucb_offset=s.linucb_offset == "model",
            thompson_half_life_h=half_lives(
                s.bandit_half_life_h, s.thompson_half_life_h, s.linucb_half_life_h
            )[0],
        )


@dataclass
class Bandit:
    """A placement's bandit policy: ``thompson[:M]`` or ``linucb[:ALPHA]``, fed by ``strategy``."""

    kind: Literal["thompson", "linucb"]
    thompson: ThompsonSampling | None = None
    linucb: LinUCB | None = None

    @property
    def name(self) -> str:
        learner = self.thompson if self.kind == "thompson" else self.linucb
        assert learner is not None
        return learner.name

    @classmethod
    def parse(cls, name: str, arg: str, p: PolicyParams) -> Bandit:
        if name == "thompson":
            m = float(arg) if arg else p.thompson_prior_strength
            params = ThompsonParams(m, p.thompson_draws, 1.0, p.thompson_min_segment_shows,
                                    half_life_h=p.thompson_half_life_h)  # fmt: skip
            return cls("thompson", thompson=ThompsonSampling(params))
        alpha = float(arg) if arg else p.linucb_alpha
        lin = LinUCBParams(p.dim, alpha, p.linucb_ridge, offset=p.linucb_offset)
        return cls("linucb", linucb=LinUCB(lin))

    def thompson_counts(self, c: Candidates, states: Sequence[AdState]) -> npt.NDArray[Any]:
        """Per candidate, the (shows, clicks) Thompson weighs: the user's segment's once they
        are worth ``min_segment_shows``, else the ad's, faded to the decision's time."""
        assert self.thompson is not None
        seg = segment_of(c.vector)
        ad = np.array([(st.shows, st.clicks) for st in states], dtype=STATS_DTYPE)
        by_seg = np.array([st.segments.get(seg, (0.0, 0.0)) if seg is not None else (0.0, 0.0)
                           for st in states], dtype=STATS_DTYPE)  # fmt: skip
        h = self.thompson.params.half_life_h
        if h > 0 and c.ts:
            f = np.array([decay(c.ts - st.ts, h) if st.ts else 1.0 for st in states])
            for counts in (ad, by_seg):
                counts["shows"] *= f
                counts["clicks"] *= f
        return backoff(ad, by_seg, self.thompson.params.min_segment_shows)

    def on_conversions(
        self, c: Candidates, states: Sequence[AdState], stats: npt.NDArray[Any]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[Any]]:
        """Thompson's (prior mean, bid, evidence) with cpa candidates' rewards as conversions:
        prior pCTR x pCVR, the bid per conversion, the ad's (shows, conversions) faded
        like its clicks."""
        assert self.thompson is not None and c.cpa is not None and c.pcvr is not None
        conv = np.array([(st.shows, st.conversions) for st in states], dtype=STATS_DTYPE)
        h = self.thompson.params.half_life_h
        if h > 0 and c.ts:
            f = np.array([decay(c.ts - st.ts, h) if st.ts else 1.0 for st in states])
            conv["shows"] *= f
            conv["clicks"] *= f
        prior = np.where(c.cpa, c.pctr * c.pcvr, c.pctr)
        bids = np.where(c.cpa, c.bids / np.maximum(c.pcvr, 1e-12), c.bids)
        return prior, bids, np.where(c.cpa, conv, stats)

    def choose(self, c: Candidates, rng: np.random.Generator) -> Choice:
        """Thompson: model pCTR as prior mean, the (ad, segment) or ad counts as evidence;
        LinUCB: UCB over the normalised interest vector (added to the model's pCTR under
        ``ADPULSE_LINUCB_OFFSET=model``), times the bid.

        Under a half-life, Thompson's counts fade from their record's event time to
        the decision's, so an ad nobody has labelled lately drifts back to its prior
        and gets explored again. LinUCB reads its record as of its latest label:
        fading it here would cost a d x d inversion per ad per batch on the hot path.
        """
        states = c.states()
        if self.thompson is not None:
            stats = self.thompson_counts(c, states)
            if c.cpa is None or c.pcvr is None or not c.cpa.any():
                return self.thompson.choose(c.pctr, c.bids, stats, rng)
            return self.thompson.choose(*self.on_conversions(c, states, stats), rng)
        assert self.linucb is not None
        lin = self.linucb.decode([st.linucb or None for st in states])
        x = user_features(c.vector, self.linucb.params.dim)[0]
        return self.linucb.choose(x, lin, rng, c.bids, c.pctr)


class StrategyReader:
    """Decoded AdStates for the decision stage: each record read once per batch
    (:meth:`batch`), and decoded again only when its bytes changed.

    Without the second cache every decision decoded every candidate's record: in the
    demo (120 candidates, about one request per batch) that was 6.7% of the worker's
    GIL time (py-spy). The decoded states are shared between batches, so nothing may
    change one in place; a record's bytes are compared before its old state is reused,
    so a learned label is seen by the next batch as before. Holds at most one state per
    record the ``read`` side holds (the strategy mirror: every ad's, per experiment arm),
    each with its own copy of the record's LinUCB bytes: under LinUCB that doubles the
    memory those records take (34 KB per ad and arm at d = 64).
    """

    def __init__(self, read: Callable[[Sequence[bytes]], list[bytes | None]]) -> None:
        self.read = read
        self.cache: dict[str, AdState] = {}  # this batch's
        self.decoded: dict[str, tuple[bytes | None, AdState]] = {}  # key -> (its bytes, state)

    def batch(self) -> None:
        self.cache = {}

    def states(self, ad_ids: Sequence[str], arm: str | None = None) -> list[AdState]:
        """The ads' states; with an experiment arm, that arm's own (see :func:`state_key`)."""
        keys = [state_key(a, arm) for a in ad_ids] if arm else list(ad_ids)
        cache = self.cache
        missing = [k for k in dict.fromkeys(keys) if k not in cache]
        if missing:
            decoded = self.decoded
            for k, raw in zip(missing, self.read([k.encode() for k in missing]), strict=True):
                hit = decoded.get(k)
                if hit is not None and (hit[0] is raw or hit[0] == raw):
                    cache[k] = hit[1]
                    continue
                state = cache[k] = decode_ad(raw)
                if raw is None:
                    decoded.pop(k, None)  # a deleted or never-learned ad: nothing to keep
                else:
                    decoded[k] = (raw, state)
        return [cache[k] for k in keys]


def parse_policy(text: str, params: PolicyParams | None = None) -> Policy:
    """``random``, ``greedy``, ``epsilon-greedy:EPS``, ``thompson[:M]`` or ``linucb[:ALPHA]``."""
    name, _, arg = text.strip().partition(":")
    try:
        if name in ("thompson", "linucb"):
            return Bandit.parse(name, arg, params or PolicyParams())
        if name == "greedy":
            return ByValue(Greedy())
        if name == "random":
            return ByValue(UniformRandom())
        if name == "epsilon-greedy":
            return ByValue(EpsilonGreedy(float(arg or "0.05")))
    except ValueError as exc:
        msg = f"policy {text!r}: {exc}"
        raise ValueError(msg) from None
    msg = (
        f"unknown policy {text!r}: use random, greedy, epsilon-greedy:EPS, thompson:M "
        "or linucb:ALPHA"
    )
    raise ValueError(msg)


def placement_policies(
    default: str, per_placement: str, params: PolicyParams | None = None
) -> Callable[[str], Policy]:
    """``"home=greedy;feed=thompson:20"`` on top of a default, as a lookup."""
    base = parse_policy(default, params)
    table: dict[str, Policy] = {}
    for part in filter(None, (p.strip() for p in per_placement.split(";"))):
        placement, sep, policy = part.partition("=")
        if not sep:
            msg = f"placement policy {part!r}: expected PLACEMENT=POLICY"
            raise ValueError(msg)
        table[placement.strip()] = parse_policy(policy, params)
    return lambda placement: table.get(placement, base)


def parse_experiment(
    text: str, params: PolicyParams | None = None
) -> tuple[Experiment, list[Policy]] | None:
    """``"NAME:KEY:control=greedy@0.5,treatment=thompson@0.5"`` -> experiment, arm policies."""
    if not text.strip():
        return None
    name, key, arms_text = [*text.strip().split(":", 2), "", ""][:3]
    arms: list[Arm] = []
    for part in filter(None, (a.strip() for a in arms_text.split(","))):
        arm, eq, rest = part.partition("=")
        policy, at, share = rest.rpartition("@")
        if not (eq and at and arm.strip() and name and key):
            msg = f"experiment {text!r}: expected NAME:KEY:ARM=POLICY@SHARE,... (got {part!r})"
            raise ValueError(msg)
        arms.append(Arm(arm.strip(), float(share), policy.strip()))
    exp = Experiment(name, key.encode(), tuple(arms))
    return exp, [parse_policy(a.policy, params) for a in arms]
