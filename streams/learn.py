"""ctr-feedback -> strategy state: labels folded into the learners the bandit policies read.

Where the state lives. ctr-feedback is keyed by ad_id, so an ad's labels all
reach the one worker that owns that ad's partition: the single writer of the
ad's state. Decisions for that ad, though, happen on every worker (requests are
partitioned by user). So the learner writes its ``learn`` table (partitioned,
like ``interest``: restored by Faust's active recovery before this worker
handles a label, so the applied offset it holds is never stale when it is
read), and every worker, this one included, reads the whole of that table's
changelog into its ``strategy`` mirror (streams/catalogmirror.py: a consumer in
no group, so no rebalance can make it lose a record, as Faust's GlobalTable,
used here before, did). A label reaches every worker's decisions one changelog
round trip after its batch: ``adpulse bench promises`` measures it (label ->
the other worker's learner state).

The learner never reads ``strategy``: a mirror trails the writer by that round
trip, harmless for a reader that only needs "current within a second", fatal
for read-modify-write.

One record per ad (:class:`AdState`, msgpack): the highest ctr-feedback offset
applied (a redelivered batch changes nothing), a ring of the fingerprints of the
last ``ADPULSE_LEARN_DEDUPE_IDS`` decision ids (a label the joiner re-emits
after a crash, at a new offset, changes nothing while it is in the ring; a
``converted: 1`` record, the same decision's second record, never does: its
label was counted already, however long ago), the
ad's Thompson counts, its counts per segment, and its LinUCB state. A segment
is the user's dominant interest dimension, argmax of the interest vector
(:func:`segment_of`, at most ``ADPULSE_DIM`` per ad): ctr-feedback carries the
vector the decision saw but not the user's top categories, and the decision
stage computes the same function of the same vector. Calibration counts are
additive, so each partition keeps its own shard (key ``\\0calibration|P``) and a
reader sums the shards: one logical record, one writer per shard.

Experiment arms. A label that carries an ``arm`` (ADPULSE_EXPERIMENT) is folded
into that arm's own record of the ad, key ``ARM\\x1fAD`` (:func:`state_key`),
still on the ad's ctr-feedback partition, and a decision in arm A reads only
arm A's records: each arm's bandit learns only from the traffic it served, so
an A/B comparison of policies is fair (a shared state would let the control's
traffic train the treatment). Without an arm the key is the ad id, as before.
An arm's record keeps the LinUCB part only when the arm's policy is LinUCB
(the label names its policy): no other policy reads it, and it is ~34 KB.
Calibration shards stay pooled: they measure the model, not a policy.

Conversions. A ``converted: 1`` record adds one to its ad's ``conversions`` (on
the scale of ``shows``, faded alike under a half-life): the reward Thompson
weighs for a cost-per-conversion ad (scoring/strategy/policy.py). Its identity
is its decision id marked as a conversion, in the same ring, so a repeat of it
counts once and it never counts as a second impression.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from adpulse.core.settings import Settings
from schemas.messages import UNSET, CtrFeedback
from scoring.features import fingerprint
from scoring.featurespec import user_features
from scoring.strategy.calibration import CalibrationParams, CalibrationState, Calibrator
from scoring.strategy.forgetting import decay, half_lives, weights
from scoring.strategy.linucb import LinUCB, LinUCBParams
from scoring.strategy.state import (
    AdState,
    CalibrationShard,
    calibration_key,
    decode_ad,
    decode_shard,
    encode,
    segment_of,
    state_key,
)
from scoring.strategy.thompson import ThompsonParams, ThompsonSampling
from streams.deadletter import Loader, Raw, Rejected
from streams.validate import ContractDecoder

OUTCOMES = ("applied", "redelivered", "duplicate")
CONVERSION_MARK = "\x1fconverted|"  # a conversion's ring identity: its decision id, marked
FEEDBACK_MAX_BYTES = 64 * 1024  # an interest vector may have up to 1024 numbers


def feedback_decoder() -> ContractDecoder[CtrFeedback]:
    return ContractDecoder("ctr-feedback", CtrFeedback, FEEDBACK_MAX_BYTES)


def _keeps_linucb(m: CtrFeedback) -> bool:
    """Whether a label feeds LinUCB state: always without an arm, else if the arm's is."""
    if m.arm is UNSET or m.policy is UNSET:
        return True
    return m.policy.startswith("linucb") or m.policy.startswith("fallback")


def _linucb_row(m: CtrFeedback, dim: int, offset: bool) -> tuple[np.ndarray, float] | None:
    """A label's (context, base) for LinUCB, or None when it feeds no LinUCB state: no
    interest vector of the configured size, another arm's policy, or (with the offset)
    no pCTR. The base is the decision's pCTR, the one its score was added to; a label
    without it (written before the joiner copied it) falls back to the raw model pCTR
    of its feature snapshot."""
    vec = m.features.interest
    if len(vec) != dim or segment_of(vec) is None or not _keeps_linucb(m):
        return None
    if not offset:
        return user_features(vec, dim)[0], 0.0
    base = m.pctr if m.pctr is not UNSET else m.features.pctr
    if base is UNSET:
        return None
    return user_features(vec, dim)[0], float(base)


@dataclass
class LearnResult:
    writes: list[tuple[bytes, int, bytes]] = field(default_factory=list)  # key, partition, value
    rejected: list[Rejected] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)  # OUTCOMES


class LearnStage:
    """Folds a batch of ctr-feedback into per-ad Thompson/LinUCB state and calibration shards."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.decoder = feedback_decoder()
        self.thompson = ThompsonSampling(ThompsonParams())
        self.linucb = LinUCB(LinUCBParams(dim=settings.dim, ridge=settings.linucb_ridge,
                                          offset=settings.linucb_offset == "model"))  # fmt: skip
        self.calibrator = Calibrator(CalibrationParams())
        self.thompson_h, self.linucb_h = half_lives(
            settings.bandit_half_life_h, settings.thompson_half_life_h, settings.linucb_half_life_h
        )

    def process(self, raws: Sequence[Raw], load: Loader) -> LearnResult:
        good, rejected = self.decoder.split(raws)
        good = self._not_ahead(good, rejected)
        out = LearnResult(rejected=rejected)
        by_ad: dict[tuple[str, int], list[tuple[CtrFeedback, Raw]]] = defaultdict(list)
        for msg, raw in good:  # keyed by state key: the ad's, or one arm's record of it
            arm = None if msg.arm is UNSET else msg.arm
            by_ad[(state_key(msg.ad_id, arm), raw.partition)].append((msg, raw))
        if not by_ad:
            return out
        ads = list(by_ad)
        parts = sorted({p for _, p in ads})
        stored = load([a.encode() for a, _ in ads] + [calibration_key(p) for p in parts],
                      [p for _, p in ads] + parts)  # fmt: skip
        shards = {p: decode_shard(v) if v else CalibrationShard() for p, v in
                  zip(parts, stored[len(ads) :], strict=True)}  # fmt: skip
        cal_in: dict[int, list[tuple[float, int]]] = defaultdict(list)
        for (key, part), raw_state in zip(ads, stored[: len(ads)], strict=True):
            labels = sorted(by_ad[(key, part)], key=lambda mr: mr[1].offset)
            state = decode_ad(raw_state)
            applied = self._apply(state, labels, out.outcomes)
            shard = shards[part]
            for m, r in applied:
                pctr = _pctr(m)
                if pctr is not None and r.offset > shard.offset:
                    cal_in[part].append((pctr, m.clicked))
            out.writes.append((key.encode(), part, encode(state)))
        for p, shard in shards.items():
            new_offset = max(r.offset for (_, q), ms in by_ad.items() if q == p for _, r in ms)
            if cal_in[p]:
                cal = (CalibrationState.from_bytes(shard.state) if shard.state
                       else self.calibrator.empty())  # fmt: skip
                pc, y = zip(*cal_in[p], strict=True)
                shard.state = self.calibrator.update(cal, np.array(pc), np.array(y)).to_bytes()
            shard.offset = max(shard.offset, new_offset)
            out.writes.append((calibration_key(p), p, encode(shard)))
        return out

    def _not_ahead(
        self, good: list[tuple[CtrFeedback, Raw]], rejected: list[Rejected]
    ) -> list[tuple[CtrFeedback, Raw]]:
        """Drop (into ``rejected``) labels whose ``decision_ts`` is further ahead of their
        record's Kafka timestamp than ``ADPULSE_MAX_FUTURE_SKEW_MS``: with forgetting on, one
        such label would move an ad's reference time years ahead and fade everything it had
        learned to nothing. The record's timestamp, not the clock, so a replay decides alike."""
        skew = self.s.max_future_skew_ms
        kept = []
        for m, raw in good:
            ahead = m.decision_ts - raw.timestamp_ms
            if raw.timestamp_ms > 0 and ahead > skew:
                why = (f"decision_ts {m.decision_ts} is {ahead} ms after its record's timestamp "
                       f"(limit {skew} ms)")  # fmt: skip
                rejected.append(Rejected(raw, "future_ts", why))
            else:
                kept.append((m, raw))
        return kept

    def _apply(
        self, state: AdState, labels: list[tuple[CtrFeedback, Raw]], outcomes: Counter[str]
    ) -> list[tuple[CtrFeedback, Raw]]:
        """Fold one ad's labels (in offset order) into its state; returns those applied."""
        ring, seen = list(state.ring), set(state.ring)
        applied: list[tuple[CtrFeedback, Raw]] = []
        conversions: list[CtrFeedback] = []
        for m, r in labels:
            fp = fingerprint(m.decision_id)
            if r.offset <= state.offset:
                outcomes["redelivered"] += 1
                continue
            state.offset = r.offset
            if m.converted == 1:  # the decision's conversion record: a reward, not a show
                fp = fingerprint(CONVERSION_MARK + m.decision_id)
                if fp in seen:
                    outcomes["duplicate"] += 1
                    continue
                ring.append(fp)
                seen.add(fp)
                conversions.append(m)
                outcomes["applied"] += 1
                continue
            if fp in seen:  # a repeat
                outcomes["duplicate"] += 1
                continue
            ring.append(fp)
            seen.add(fp)
            applied.append((m, r))
            outcomes["applied"] += 1
        state.ring = ring[-self.s.learn_dedupe_ids :]
        out = self._fold(state, applied)
        if conversions:  # after the labels: their event time is the record's scale
            self._fold_conversions(state, conversions)
        return out

    def _fold_conversions(self, state: AdState, conversions: list[CtrFeedback]) -> None:
        """Conversions on the record's scale: under a half-life, each weighs what its
        decision's impression weighs now (its label came first, on the same partition)."""
        if self.thompson_h > 0 and state.ts:  # Thompson's evidence: Thompson's half-life
            ages = [max(0, state.ts - m.decision_ts) for m in conversions]
            state.conversions += sum(decay(a, self.thompson_h) for a in ages)
        else:
            state.conversions += len(conversions)

    def _fold(
        self, state: AdState, applied: list[tuple[CtrFeedback, Raw]]
    ) -> list[tuple[CtrFeedback, Raw]]:
        if not applied:
            return applied
        if self.thompson_h > 0 or self.linucb_h > 0:
            self._fold_decayed(state, [m for m, _ in applied])
            return applied
        clicks = [m.clicked for m, _ in applied]
        state.shows += len(applied)
        state.clicks += sum(clicks)
        segments = dict(state.segments)
        ctx: list[np.ndarray] = []
        rewards: list[float] = []
        base: list[float] = []
        for m, _ in applied:
            seg = segment_of(m.features.interest)
            if seg is not None:
                n, c = segments.get(seg, (0.0, 0.0))
                segments[seg] = (n + 1.0, c + m.clicked)
            row = _linucb_row(m, self.s.dim, self.linucb.params.offset)
            if row is not None:
                ctx.append(row[0])
                base.append(row[1])
                rewards.append(float(m.clicked))
        state.segments = segments
        if ctx:
            lin = self.linucb.decode([state.linucb or None])
            idx = np.zeros(len(ctx), np.intp)
            lin = self.linucb.update(lin, idx, np.stack(ctx), rewards, base=base)
            state.linucb = LinUCB.encode(lin)[0]
        return applied

    def _fold_decayed(self, state: AdState, labels: list[CtrFeedback]) -> None:
        """Fold labels in with forgetting: rescale the record to the latest event time, then
        add each label weighted by its age there (scoring/strategy/forgetting.py)."""
        ref = max(state.ts, *(m.decision_ts for m in labels))
        ts = [m.decision_ts for m in labels]
        # ts 0: nothing was scaled yet. Each learner fades by its own half-life (0: not at all).
        f = decay(ref - state.ts, self.thompson_h) if state.ts else 1.0
        w = weights(ts, ref, self.thompson_h)
        f_lin = decay(ref - state.ts, self.linucb_h) if state.ts else 1.0
        w_lin = weights(ts, ref, self.linucb_h)
        state.ts = ref
        state.shows = f * state.shows + float(w.sum())
        state.clicks = f * state.clicks + float(w @ np.array([m.clicked for m in labels], float))
        state.conversions *= f
        segments = {k: (f * n, f * c) for k, (n, c) in state.segments.items()}
        ctx: list[np.ndarray] = []
        rows: list[tuple[float, float, float]] = []  # (reward, weight, base) per context
        for wi, wl, m in zip(w.tolist(), w_lin.tolist(), labels, strict=True):
            seg = segment_of(m.features.interest)
            if seg is not None:
                n, c = segments.get(seg, (0.0, 0.0))
                segments[seg] = (n + wi, c + wi * m.clicked)
            row = _linucb_row(m, self.s.dim, self.linucb.params.offset)
            if row is not None:
                ctx.append(row[0])
                rows.append((float(m.clicked), wl, row[1]))
        state.segments = segments
        if ctx or (state.linucb and f_lin < 1.0):
            lin = self.linucb.discount(self.linucb.decode([state.linucb or None]), f_lin)
            if ctx:
                r, wts, base = zip(*rows, strict=True)
                idx = np.zeros(len(ctx), np.intp)
                lin = self.linucb.update(lin, idx, np.stack(ctx), r, wts, base)
            state.linucb = LinUCB.encode(lin)[0]


def _pctr(m: CtrFeedback) -> float | None:
    if m.features.pctr is not UNSET:
        return float(m.features.pctr)
    return None if m.pctr is UNSET else float(m.pctr)
