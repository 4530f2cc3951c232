"""Guarded promotion of a model version: held-back check, canary arm, promote or roll back.

The life of a candidate (``MODEL_DIR/candidates/<version>/``, exported by
``adpulse trainer``):

1. **Validation** (:func:`held_back_verdict`, with the registry's own checks): its
   online AUC on the held-back window (the labels it scored before learning them,
   in its ``metrics.json``) is not below the serving version's AUC on the same
   labels by more than a margin.
2. **Canary**: the workers serve it to a share of users (by the keyed hash of the
   experiment arms, :func:`in_canary`) while the rest keep the serving version.
3. **Live verdict** (:func:`canary_verdict`) from the ctr-feedback labels of each
   version since the canary began: roll back at once on a significant calibration
   drift; after a minimum number of labels in each arm, promote when its CTR is not
   significantly below the control's (the pooled two-proportion z-test of
   ``adpulse report``) and its calibration is not worse than the control's by more
   than the drift margin; else roll back.

**Drift is judged against the version it would replace** (:func:`drifted`'s
``reference``): the canary against the control's live observed/expected over the
same period, a promoted version against the last good version's as measured when
it was promoted (:attr:`PromotionState.reference_calibration`). A version has
drifted when it is further from calibrated than the reference (in ratio:
|log o/e| larger) and its o/e divided by the reference's is more than the margin
from 1, significantly. Judged absolutely, a canary as far off as the control (a
serving model trained on another world, as in ``adpulse simulate --trainer
promoter``, observed/expected 0.5-1.9 per window there) would be rolled back for a fault it shares
with the version that keeps serving, and a promoted version would be rolled back
to one no better calibrated: the guard is there to stop a version that makes
calibration worse, and rolling back fixes only that. With a calibrated reference
(o/e 1) the rule is the absolute one: more than the margin from 1, significantly.

Which version serves and which is the canary is one small JSON file,
``MODEL_DIR/promotion.json`` (:class:`PromotionState`), written atomically by the
promoter and read by every worker's registry poll.

>>> rules = CanaryRules(min_labels=100, confidence=0.95, max_calibration_drift=0.5)
>>> control = Tally(labels=1000, clicks=50, expected=50.0, variance=47.5)
>>> canary_verdict(control, Tally(100, 5, 5.0, 4.75), rules).action
'promote'
>>> canary_verdict(control, Tally(400, 60, 20.0, 19.0), rules).action  # 3x the predicted clicks
'rollback'
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from scoring.strategy.ab import two_proportion_z, unit_hash

STATE_FILE = "promotion.json"
# the drift test's normal approximation needs enough predicted clicks (np >= 10, a rule of
# thumb): 2 clicks where 0.5 were predicted is z 2.2 but, by Poisson, p = 0.09
MIN_EXPECTED_CLICKS = 10.0
Action = Literal["wait", "promote", "rollback"]


# -- the state the workers follow ----------------------------------------------------------------
@dataclass(frozen=True)
class PromotionState:
    """Who serves: ``serving`` (a version in MODEL_DIR), ``canary`` (a candidate, or ""),
    ``last_good`` (the version a rollback of ``serving`` returns to), and since when."""

    serving: str
    canary: str = ""
    last_good: str = ""
    canary_since_ms: int = 0  # labels of decisions from then on are the canary's test
    serving_since_ms: int = 0
    # the last good version's live observed/expected when ``serving`` replaced it: the
    # reference of the serving version's drift (1.0: none measured, judged absolutely)
    reference_calibration: float = 1.0
    decided: list[str] = field(default_factory=list)  # candidates already judged, never retried

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> PromotionState:
        raw = json.loads(text)
        if not isinstance(raw, dict) or not isinstance(raw.get("serving"), str):
            msg = "not a promotion state (an object with a 'serving' version)"
            raise ValueError(msg)
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        ref = known.get("reference_calibration", 1.0)
        if not isinstance(ref, int | float) or not math.isfinite(ref) or ref <= 0:
            known["reference_calibration"] = 1.0  # a hand edit: judged absolutely, not a crash
        return cls(**known)

    def with_(self, **changes: Any) -> PromotionState:
        return replace(self, **changes)


def read_state(root: Path) -> PromotionState | None:
    """The promotion state in ``root``, None when there is none (or it cannot be read)."""
    try:
        return PromotionState.from_json((root / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None


def write_state(root: Path, state: PromotionState) -> None:
    """Temp file, fsync, rename: a worker's poll reads the old state or the new, never half."""
    tmp = root / f".{STATE_FILE}.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        f.write(state.to_json())
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(root / STATE_FILE)


def in_canary(user_id: str, key: bytes, share: float) -> bool:
    """Whether a user's decisions are scored by the canary: the experiment arms' keyed hash."""
    return share > 0.0 and unit_hash(user_id, key) < share


# -- validation on the held-back window ------------------------------------------------------------
def held_back_verdict(metrics: dict[str, Any], max_auc_drop: float) -> str | None:
    """Why a candidate is refused on its held-back window (None: it passes).

    ``metrics`` is the candidate's metrics.json: ``validation.online`` and
    ``validation.serving`` score the same held-back labels (docs/training.md).
    """
    v = metrics.get("validation")
    if not isinstance(v, dict):
        return "no held-back validation in metrics.json (export candidates with adpulse trainer)"
    ours, theirs = v.get("online"), v.get("serving")
    if not isinstance(ours, dict) or not isinstance(ours.get("auc"), int | float):
        return "the held-back window has no AUC for the candidate (too few labels, or one class)"
    if not isinstance(theirs, dict) or not isinstance(theirs.get("auc"), int | float):
        return None  # nothing served to compare with: the registry's checks decide
    drop = float(theirs["auc"]) - float(ours["auc"])
    if not math.isfinite(drop) or drop > max_auc_drop:
        return (
            f"held-back AUC {float(ours['auc']):.4f} is {drop:.4f} below the serving "
            f"version's {float(theirs['auc']):.4f} on the same labels (limit {max_auc_drop:g}, "
            "ADPULSE_CANARY_MAX_AUC_DROP)"
        )
    return None


# -- the live verdict ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tally:
    """One version's labels: count, clicks, and the sum and binomial variance of its pCTRs."""

    labels: int = 0
    clicks: int = 0
    expected: float = 0.0  # sum of pCTR
    variance: float = 0.0  # sum of pCTR * (1 - pCTR)

    def add(self, clicked: int, pctr: float) -> Tally:
        return Tally(self.labels + 1, self.clicks + clicked, self.expected + pctr,
                     self.variance + pctr * (1.0 - pctr))  # fmt: skip

    @property
    def ctr(self) -> float:
        return self.clicks / self.labels if self.labels else math.nan

    @property
    def calibration(self) -> float:
        """Observed over expected clicks (1: calibrated; NaN before any prediction)."""
        return self.clicks / self.expected if self.expected > 0 else math.nan

    def drift_z(self, reference: float = 1.0) -> float:
        """How many standard deviations the clicks are from the predicted clicks, each
        prediction scaled by ``reference`` (another version's o/e; the variance then by
        it too, a small-pCTR approximation)."""
        if self.variance <= 0:
            return 0.0
        return (self.clicks - reference * self.expected) / math.sqrt(reference * self.variance)


@dataclass(frozen=True)
class CanaryRules:
    min_labels: int  # canary labels before promote/rollback on CTR
    confidence: float  # of the tests (0.95: a one-sided 5% level)
    max_calibration_drift: float  # |observed/expected - 1| beyond which a version has drifted

    @property
    def z(self) -> float:
        """One-sided normal quantile of ``confidence``."""
        return _norm_ppf(self.confidence)


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str


def reference_of(t: Tally) -> float:
    """A version's live observed/expected as the reference of another's drift: 1.0
    (calibrated: the absolute rule) until it predicted :data:`MIN_EXPECTED_CLICKS`
    clicks, or when it has none to compare with (no clicks: o/e 0)."""
    cal = t.calibration
    if t.expected < MIN_EXPECTED_CLICKS or not math.isfinite(cal) or cal <= 0.0:
        return 1.0
    return cal


def worse_calibrated(cal: float, reference: float, margin: float) -> bool:
    """Whether o/e ``cal`` is further from 1 than ``reference`` (in ratio) and more than
    ``margin`` from it (``cal / reference`` beyond 1 +- margin); reference 1: |cal - 1| >
    margin, the absolute rule."""
    if not math.isfinite(cal):
        return False
    if cal <= 0.0:
        return True  # no clicks at all where the reference saw some: infinitely far
    further = abs(math.log(cal)) > abs(math.log(reference))
    return further and abs(cal / reference - 1.0) > margin


def drifted(t: Tally, rules: CanaryRules, reference: float = 1.0) -> str | None:
    """A calibration drift beyond the margin *and* significant at the confidence; None if not.

    ``reference``: the observed/expected of the version ``t``'s would replace (module
    docstring): ``t`` drifts when :func:`worse_calibrated` against it, and its clicks
    are significantly off the clicks its predictions times the reference would give.
    Judged once the version predicted :data:`MIN_EXPECTED_CLICKS` clicks.
    """
    cal = t.calibration
    if t.expected < MIN_EXPECTED_CLICKS:
        return None
    if not worse_calibrated(cal, reference, rules.max_calibration_drift):
        return None
    z = t.drift_z(reference)
    if abs(z) < rules.z:
        return None
    against = "" if reference == 1.0 else f" against the reference's {reference:.3f}"
    return (
        f"live calibration drift: observed/expected {cal:.3f}{against} over {t.labels} "
        f"labels (z {z:+.1f}; limit +-{rules.max_calibration_drift:g}, "
        "ADPULSE_CANARY_MAX_CALIBRATION_DRIFT)"
    )


def canary_verdict(control: Tally, canary: Tally, rules: CanaryRules) -> Verdict:
    """Promote, roll back or wait, from the labels of each arm since the canary began."""
    ref = reference_of(control)
    why = drifted(canary, rules, ref)
    if why is not None:
        return Verdict("rollback", why)
    if canary.labels < rules.min_labels or control.labels < rules.min_labels:
        return Verdict("wait", f"{canary.labels} canary and {control.labels} control labels "
                               f"of {rules.min_labels} each")  # fmt: skip
    z, p = two_proportion_z(control.clicks, control.labels, canary.clicks, canary.labels)
    if math.isfinite(z) and z < -rules.z:
        return Verdict("rollback", f"live CTR {canary.ctr:.4f} below control {control.ctr:.4f} "
                                   f"(z {z:.2f}, two-sided p {p:.3g})")  # fmt: skip
    if worse_calibrated(canary.calibration, ref, rules.max_calibration_drift):
        return Verdict("rollback", f"live calibration {canary.calibration:.3f} against control "
                                   f"{control.calibration:.3f}")  # fmt: skip
    return Verdict("promote", f"live CTR {canary.ctr:.4f} against control {control.ctr:.4f} "
                              f"(z {z:.2f}), calibration {canary.calibration:.3f} over "
                              f"{canary.labels} labels")  # fmt: skip


def _norm_ppf(q: float) -> float:
    """Standard normal quantile by bisection on erfc (q in (0.5, 1)); no SciPy needed."""
    lo, hi = 0.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(mid / math.sqrt(2)) > 1.0 - q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
