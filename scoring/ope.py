"""Off-policy evaluation: what CTR would a candidate policy have had on logged decisions?

Each logged round is a context, its candidate actions, the action the logging
policy chose, the reward (a click: 0/1, or any real) and the probability the
logging policy had of choosing that action (its propensity, exact: see
:mod:`scoring.strategy`). A target policy gives a distribution over the same
candidates for each context (a deterministic one is one-hot). With importance
weights ``w_i = pi(a_i | x_i) / mu(a_i | x_i)``:

* **IPS** (Horvitz & Thompson, 1952): ``mean(w_i r_i)``. Unbiased whenever the
  logging policy gives positive probability to every action the target can take.
* **SNIPS** (Swaminathan & Joachims, 2015, "The Self-Normalized Estimator for
  Counterfactual Learning"): ``sum(w_i r_i) / sum(w_i)``. Slightly biased,
  usually much lower variance; its interval comes from the delta method.
* **DR** (Dudik, Langford & Li, 2011, "Doubly Robust Policy Evaluation and
  Learning"): a reward model ``q(x, a)`` gives the direct estimate
  ``sum_a pi(a|x) q(x, a)``, and IPS corrects its error on the logged action:
  ``mean(sum_a pi(a|x_i) q(x_i, a) + w_i (r_i - q(x_i, a_i)))``. Unbiased if
  either the propensities or the reward model are right.

Intervals are 95% normal approximations on the per-round terms; the effective
sample size ``(sum w)^2 / sum w^2`` says how many rounds the estimate really
rests on (``n`` when the target is the logging policy).

>>> rounds = [LoggedRound({}, ("a", "b"), "a", 1.0, 0.5),
...           LoggedRound({}, ("a", "b"), "b", 0.0, 0.5)]
>>> report = evaluate(rounds, make_policy("uniform"))
>>> report.ips.value, report.snips.value, report.ess
(0.5, 0.5, 2.0)
>>> evaluate(rounds, make_policy("greedy-feature:x"))
Traceback (most recent call last):
ValueError: round 1: feature 'x' is not in the context (keys: none)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from scoring.strategy.epsilon import EpsilonGreedy

Z95 = 1.959963984540054  # standard normal 97.5% quantile
TINY_PROPENSITY = 0.01  # below this a logged choice is "rarely explored": flagged

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class LoggedRound:
    """One logged decision. ``actions`` are the candidates, ``action`` one of them.

    ``propensities`` is the logging policy's whole distribution over ``actions``
    when the log has it (optional: IPS and SNIPS need only ``propensity``).
    """

    context: Mapping[str, Any]
    actions: tuple[str, ...]
    action: str
    reward: float
    propensity: float
    position: int | None = None
    propensities: tuple[float, ...] | None = None

    @property
    def chosen(self) -> int:
        return self.actions.index(self.action)


Policy = Callable[[LoggedRound], Floats]  # distribution over round.actions
RewardModel = Callable[[LoggedRound], Floats]  # predicted reward per candidate


# --- target policies, by name ---------------------------------------------------------------


def feature_values(rnd: LoggedRound, name: str) -> Floats:
    """A per-candidate feature: ``context[name]`` as a list aligned with ``actions``
    or an object keyed by action id."""
    if name not in rnd.context:
        keys = ", ".join(sorted(rnd.context)) or "none"
        msg = f"feature {name!r} is not in the context (keys: {keys})"
        raise ValueError(msg)
    raw = rnd.context[name]
    if isinstance(raw, Mapping):
        missing = [a for a in rnd.actions if a not in raw]
        if missing:
            msg = f"feature {name!r} has no value for candidate(s) {', '.join(missing[:3])}"
            raise ValueError(msg)
        raw = [raw[a] for a in rnd.actions]
    if not isinstance(raw, Sequence) or isinstance(raw, str) or len(raw) != len(rnd.actions):
        msg = (
            f"feature {name!r} must give one number per candidate (a list of "
            f"{len(rnd.actions)} or an object keyed by action id), got {raw!r:.60}; a feature "
            "known only for the chosen action (as in ctr-feedback logs) cannot rank candidates"
        )
        raise ValueError(msg)
    return np.asarray(raw, dtype=np.float64)


def _uniform(args: list[str]) -> Policy:
    def policy(rnd: LoggedRound) -> Floats:
        return np.full(len(rnd.actions), 1.0 / len(rnd.actions))

    return policy


def _logged(args: list[str]) -> Policy:
    """The logging policy itself: a sanity check (IPS and SNIPS then equal the mean reward).

    Its full distribution is the log's ``propensities`` when present; otherwise the
    chosen action gets its propensity and the rest is split evenly over the other
    candidates (exact for uniform logging; only DR's direct term depends on it).
    """

    def policy(rnd: LoggedRound) -> Floats:
        if rnd.propensities is not None:
            return np.asarray(rnd.propensities, dtype=np.float64)
        k = len(rnd.actions)
        probs = np.full(k, (1.0 - rnd.propensity) / (k - 1) if k > 1 else 0.0)
        probs[rnd.chosen] = rnd.propensity
        return probs

    return policy


def _epsilon_greedy(args: list[str]) -> Policy:
    if len(args) != 2:
        msg = "epsilon-greedy takes EPS:FEATURE, e.g. epsilon-greedy:0.1:pctr"
        raise ValueError(msg)
    try:
        eps = float(args[0])
    except ValueError:
        msg = f"epsilon-greedy: EPS {args[0]!r} is not a number"
        raise ValueError(msg) from None
    strategy, feature = EpsilonGreedy(eps), args[1]  # ties split evenly, as served

    def policy(rnd: LoggedRound) -> Floats:
        return strategy.probabilities(feature_values(rnd, feature))

    return policy


def _greedy_feature(args: list[str]) -> Policy:
    if len(args) != 1 or not args[0]:
        msg = "greedy-feature takes one FEATURE, e.g. greedy-feature:pctr"
        raise ValueError(msg)
    return _epsilon_greedy(["0", args[0]])


# name -> factory taking the ':'-separated arguments; add a policy with one entry.
POLICIES: dict[str, Callable[[list[str]], Policy]] = {
    "uniform": _uniform,
    "logged": _logged,
    "greedy-feature": _greedy_feature,
    "epsilon-greedy": _epsilon_greedy,
}
POLICY_HELP = "uniform, logged, greedy-feature:FEATURE, epsilon-greedy:EPS:FEATURE"


def make_policy(spec: str) -> Policy:
    """The target policy named ``spec`` (``name[:arg[:arg]]``); ValueError when unknown."""
    name, *args = spec.split(":")
    if name not in POLICIES:
        msg = f"unknown policy {spec!r}: choose one of {POLICY_HELP}"
        raise ValueError(msg)
    return POLICIES[name](args)


# --- reward model for DR ----------------------------------------------------------------------


@dataclass(frozen=True)
class MeanReward:
    """The simplest reward model: mean logged reward per action (per action and
    value of context key ``by`` when given), falling back to the per-action mean
    and then the overall mean where a cell was never logged."""

    overall: float
    per_action: dict[str, float]
    per_cell: dict[tuple[str, str], float] = field(default_factory=dict)
    by: str | None = None

    @classmethod
    def fit(cls, rounds: Sequence[LoggedRound], by: str | None = None) -> MeanReward:
        sums: dict[Any, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for r in rounds:
            keys: list[Any] = [r.action]
            if by is not None:
                keys.append((r.action, str(r.context.get(by))))
            for key in keys:
                sums[key][0] += r.reward
                sums[key][1] += 1.0
        means = {k: s / c for k, (s, c) in sums.items()}
        overall = float(np.mean([r.reward for r in rounds])) if rounds else 0.0
        per_action = {k: v for k, v in means.items() if isinstance(k, str)}
        per_cell = {k: v for k, v in means.items() if isinstance(k, tuple)}
        return cls(overall, per_action, per_cell, by)

    def __call__(self, rnd: LoggedRound) -> Floats:
        cell = str(rnd.context.get(self.by)) if self.by is not None else ""
        return np.array(
            [
                self.per_cell.get((a, cell), self.per_action.get(a, self.overall))
                for a in rnd.actions
            ]
        )


# --- estimators on arrays ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Estimate:
    value: float
    se: float  # standard error
    lo: float  # 95% interval
    hi: float

    @classmethod
    def normal(cls, value: float, se: float, z: float = Z95) -> Estimate:
        return cls(value, se, value - z * se, value + z * se)


def _mean_se(terms: Floats) -> Estimate:
    n = len(terms)
    se = float(np.std(terms, ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    return Estimate.normal(float(np.mean(terms)), se)


def ips(w: Floats, r: Floats) -> Estimate:
    """Inverse propensity scoring (Horvitz-Thompson): mean of ``w r``."""
    return _mean_se(w * r)


def snips(w: Floats, r: Floats) -> Estimate:
    """Self-normalised IPS; SE by the delta method: ``sqrt(sum w^2 (r - V)^2) / sum w``."""
    total = float(w.sum())
    if total == 0.0:  # the target never agrees with the log: nothing to say
        return Estimate(math.nan, math.inf, -math.inf, math.inf)
    value = float((w * r).sum() / total)
    return Estimate.normal(value, float(np.sqrt((w**2 * (r - value) ** 2).sum()) / total))


def doubly_robust(w: Floats, r: Floats, q_chosen: Floats, q_target: Floats) -> Estimate:
    """DR: direct estimate ``q_target = sum_a pi(a|x) q(x,a)`` plus the IPS-weighted
    residual on the logged action ``w (r - q(x, a_i))``."""
    return _mean_se(q_target + w * (r - q_chosen))


def effective_sample_size(w: Floats) -> float:
    """``(sum w)^2 / sum w^2`` (Kish): n for equal weights, 1 when one round carries all."""
    sq = float((w**2).sum())
    return float(w.sum() ** 2 / sq) if sq > 0 else 0.0


def check_propensities(p: Floats) -> None:
    """Refuse propensities outside (0, 1]: IPS divides by them."""
    bad = np.flatnonzero(~((p > 0.0) & (p <= 1.0)))
    if len(bad):
        i = int(bad[0])
        msg = f"round {i + 1}: propensity {p[i]!r} must be in (0, 1] (logging probability)"
        raise ValueError(msg)


# --- the whole evaluation ---------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    n: int
    ips: Estimate
    snips: Estimate
    dr: Estimate
    ess: float
    max_weight: float
    logged_mean: float  # mean reward of the log: the logging policy's on-policy CTR
    flags: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        est = {
            k: {"value": e.value, "se": e.se, "ci95": [e.lo, e.hi]} for k, e in self.estimators()
        }
        return {
            "n": self.n,
            "estimators": est,
            "ess": self.ess,
            "max_weight": self.max_weight,
            "logged_mean_reward": self.logged_mean,
            "flags": list(self.flags),
        }

    def estimators(self) -> list[tuple[str, Estimate]]:
        return [("IPS", self.ips), ("SNIPS", self.snips), ("DR", self.dr)]


def evaluate(
    rounds: Sequence[LoggedRound],
    policy: Policy,
    reward_model: RewardModel | None = None,
    *,
    tiny: float = TINY_PROPENSITY,
) -> Report:
    """Estimate ``policy``'s expected reward on ``rounds`` with IPS, SNIPS and DR.

    ``reward_model`` defaults to :class:`MeanReward` fitted on the same rounds.
    Raises a one-line ValueError naming the round (1-based) for a bad propensity, a target
    distribution that does not fit its candidates, or a chosen action that is not
    a candidate. ``flags`` warn (without refusing) when the target puts mass on
    actions the logging policy rarely or never took.
    """
    if not rounds:
        msg = "no logged rounds to evaluate"
        raise ValueError(msg)
    p = np.array([r.propensity for r in rounds], dtype=np.float64)
    check_propensities(p)
    model = reward_model if reward_model is not None else MeanReward.fit(rounds)
    n = len(rounds)
    pi_chosen, q_chosen, q_target = np.empty(n), np.empty(n), np.empty(n)
    unsupported = 0.0  # target mass on actions with logging probability < tiny (when known)
    outside = 0.0  # target mass on actions not among the logged candidates
    for i, rnd in enumerate(rounds):
        try:
            if rnd.action not in rnd.actions:
                msg = f"chosen action {rnd.action!r} is not among the candidates"
                raise ValueError(msg)
            probs = _distribution(policy(rnd), len(rnd.actions))
            q = np.asarray(model(rnd), dtype=np.float64)
        except ValueError as exc:
            msg = f"round {i + 1}: {exc}"
            raise ValueError(msg) from None
        k = rnd.chosen
        pi_chosen[i], q_chosen[i], q_target[i] = probs[k], q[k], float(probs @ q)
        outside += max(0.0, 1.0 - float(probs.sum()))
        if rnd.propensities is not None:
            unsupported += float(probs[np.asarray(rnd.propensities) < tiny].sum())
    r = np.array([rnd.reward for rnd in rounds], dtype=np.float64)
    w = pi_chosen / p
    flags = _flags(w, p, n, unsupported / n, outside / n, tiny)
    return Report(
        n=n,
        ips=ips(w, r),
        snips=snips(w, r),
        dr=doubly_robust(w, r, q_chosen, q_target),
        ess=effective_sample_size(w),
        max_weight=float(w.max()),
        logged_mean=float(r.mean()),
        flags=flags,
    )


def _distribution(probs: Floats, k: int) -> Floats:
    """The target's probabilities over the k logged candidates.

    A total under 1 is accepted (and flagged): the rest lies on actions the log
    does not list as candidates, which happens when the candidate set is
    reconstructed (ctr-feedback logs) rather than logged.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (k,) or not (probs >= 0).all() or probs.sum() > 1.0 + 1e-6:
        msg = f"target policy gave {probs!r:.80} for {k} candidates: not a distribution"
        raise ValueError(msg)
    return probs


def _flags(
    w: Floats, p: Floats, n: int, unsupported: float, outside: float, tiny: float
) -> tuple[str, ...]:
    flags = []
    if outside > 1e-6:
        flags.append(
            f"the target puts {outside:.1%} of its mass outside the logged candidate sets: "
            "the log cannot credit it, so DR's direct term and SNIPS may be biased"
        )
    rare = int(((p < tiny) & (w > 0)).sum())
    if rare:
        flags.append(
            f"{rare} round(s) where the target takes an action the log chose with propensity "
            f"< {tiny:g} (max weight {w.max():.3g}): intervals rest on a few rounds"
        )
    if unsupported > 0:
        flags.append(
            f"the target puts {unsupported:.1%} of its mass on actions the logging policy took "
            f"with probability < {tiny:g}: estimates are biased low there and intervals optimistic"
        )
    ess = effective_sample_size(w)
    if ess < 0.01 * n:
        flags.append(f"effective sample size {ess:.1f} is under 1% of {n} rounds")
    return tuple(flags)
