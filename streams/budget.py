"""Budgets and calibration for the decision stage: throttle gates, spend, served pCTR.

Budget state is the ``spend`` table: one pacing record (scoring/strategy/pacing.py,
72 bytes) per campaign per partition. Each partition may spend
``daily_budget / partitions`` of a campaign per UTC day (its share), so the
worker owning a partition is the single writer of its records and no
coordination sits on the hot path. Per batch, :class:`BudgetGate` reads the
records of every campaign for the batch's partitions once, sets each one's
participation probability (the pacer, or 1/0 for "serve until spent" when
``ADPULSE_PACING=off``), gates each request's candidates with one coin per
campaign before the policy sees them, accounts the batch's spend and returns
the records that changed.

Spend model, by the ad's ``billing`` (ad-catalog). cpm: a decision costs its
expected cost, served pCTR x bid (the catalog's bid is a price per click), when
it is made; calibration makes that unbiased once enough labels exist. cpc: a
decision costs nothing when made, and its bid when the click join labels it
clicked; cpa, likewise, when it labels it converted (:meth:`BudgetGate.settle`,
called by streams/join.py on the worker that owns the partition, so the
single-writer rule holds). A settled charge is
applied once: the partition's ``SETTLED_KEY`` record, written in the same
RocksDB batch and changelog append as the charged records, holds the offset of
the last click charged per input, and a replayed click at or below it is skipped
(the join's own records use the same rule, scoring/joinstate.py).

:class:`ServedCalibration` sums the learner's calibration shards (one per
ctr-feedback partition, in the ``strategy`` mirror) at most every
``ADPULSE_CALIBRATION_REFRESH_S`` and keeps the curve the decision stage maps
pCTR through.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from adpulse.core.settings import Settings
from scoring import caps
from scoring.catalog import Catalog
from scoring.joinstate import Charge
from scoring.strategy import pacing
from scoring.strategy.calibration import (
    F64,
    CalibrationParams,
    CalibrationState,
    Calibrator,
    apply_curve,
)
from scoring.strategy.state import CalibrationShard, calibration_key
from streams.deadletter import Loader

Reader = Callable[[Sequence[bytes]], list[bytes | None]]
VIEW_TTL_MS = 300_000  # a partition not decided on for this long leaves the gauges
_decode_shard = msgspec.msgpack.Decoder(CalibrationShard).decode


def pacing_params(s: Settings) -> pacing.PacingParams:
    return pacing.PacingParams(
        profile=pacing.parse_profile(s.pacing_profile), interval_ms=int(s.pacing_interval_s * 1000)
    )


def load_record(raw: bytes | None, now_ms: int) -> npt.NDArray[Any]:
    """A pacing record; a spend record of an older version is carried over (today's spend)."""
    if raw is None or len(raw) == pacing.RECORD_DTYPE.itemsize:
        return pacing.decode(raw)
    rec = pacing.empty_record()
    try:
        old = caps.load_spend(raw, caps.day_of(now_ms))
    except msgspec.DecodeError:
        return rec
    rec["day"], rec["spent"] = old.day, old.spent
    rec["win_start"], rec["p"] = now_ms, 1.0
    return rec


P_REFRESH_MS = 100  # participation is recomputed at most this often per partition
# The spend table's key for the offsets of the last clicks charged (events, decisions):
# not UTF-8, so no campaign id can be it.
SETTLED_KEY = b"\xffsettled"
_MARKS = struct.Struct("<qq")


def decode_marks(raw: bytes | None) -> list[int]:
    """[user-events offset, ad-decisions offset] of the last charged clicks; -1: none."""
    return list(_MARKS.unpack(raw)) if raw and len(raw) == _MARKS.size else [-1, -1]


class BudgetGate:
    """Budget state of this worker's partitions: participation per (partition, campaign),
    spend to write.

    The records are read from the spend table once per partition per consumer
    generation and then kept: while this worker owns a partition it is the
    only writer of that partition's spend (requests for it come here, over the
    topic or forwarded over HTTP), so its copy stays exact; a rebalance (a new
    generation) drops the copy. Reading and decoding every campaign's record per
    batch cost 15% of a worker's CPU at 1,000 small /decide batches a second.
    """

    def __init__(self, settings: Settings, generation: Callable[[], Any] = lambda: None) -> None:
        self.s = settings
        self.params = pacing_params(settings)
        self.generation = generation
        self.records: dict[tuple[int, str], npt.NDArray[Any]] = {}
        self.stored: dict[tuple[int, str], bytes | None] = {}
        self.dirty: set[tuple[int, str]] = set()
        self.loaded: dict[int, tuple[Any, tuple[str, ...]]] = {}  # part -> (generation, campaigns)
        self.copy_gen: dict[int, Any] = {}  # part -> generation its records were read in
        self.marks: dict[int, list[int]] = {}  # part -> last charged clicks (decode_marks)
        self.p_at: dict[int, int] = {}  # part -> when its participation was computed
        self.p: dict[int, npt.NDArray[np.float64]] = {}
        # (partition, campaign) -> (UTC day, spent, p, budget share, last seen ms): gauges
        self.view: dict[tuple[int, str], tuple[int, float, float, float, int]] = {}

    def begin(
        self, catalog: Catalog | None, parts: Sequence[int], load: Loader, now_ms: int
    ) -> None:
        """Have every campaign's record for the batch's partitions; set participation."""
        if catalog is None:
            self.p = {}
            return
        campaigns, gen = tuple(catalog.campaigns), self.generation()
        for part in sorted(set(parts)):
            if self.loaded.get(part) != (gen, campaigns):
                self._load(part, campaigns, load, now_ms)
                self.loaded[part], self.copy_gen[part] = (gen, campaigns), gen
            elif now_ms - self.p_at.get(part, now_ms) < P_REFRESH_MS:
                continue
            self._participation(catalog, part, now_ms)

    def _load(self, part: int, campaigns: tuple[str, ...], load: Loader, now_ms: int) -> None:
        for key in [k for k in self.records if k[0] == part]:
            del self.records[key], self.stored[key]
            self.dirty.discard(key)
        self.marks.pop(part, None)
        values = load([c.encode() for c in campaigns], [part] * len(campaigns))
        for c, raw in zip(campaigns, values, strict=True):
            self.records[(part, c)], self.stored[(part, c)] = load_record(raw, now_ms), raw

    def _participation(self, catalog: Catalog, part: int, now_ms: int) -> None:
        campaigns = catalog.campaigns
        probs = np.ones(len(campaigns))
        for i, c in enumerate(campaigns):
            rec = self.records[(part, c)]
            share = caps.budget_share(catalog.daily_budget[c], self.s.partitions)
            before = rec.tobytes()
            if self.s.pacing:
                probs[i] = pacing.control(rec, share, now_ms, self.params)
            else:
                pacing.roll(rec, now_ms, self.params)
                probs[i] = 0.0 if float(rec["spent"]) >= share else 1.0
            if rec.tobytes() != before:  # a control window closed, or a new day began
                self.dirty.add((part, c))
            self.view[(part, c)] = (int(rec["day"]), float(rec["spent"]), probs[i], share,
                                    now_ms)  # fmt: skip
        self.p_at[part] = now_ms
        if bool(np.any(probs < 1.0)):  # else every campaign takes part: no gate
            self.p[part] = probs
        else:
            self.p.pop(part, None)

    def gate(
        self,
        catalog: Catalog | None,
        part: int,
        rows: npt.NDArray[np.int64],
        rng: np.random.Generator,
    ) -> tuple[npt.NDArray[np.int64], list[str]]:
        """The rows whose campaign takes part in this request, and the campaigns held back."""
        probs = self.p.get(part)
        if probs is None or catalog is None or not len(rows):
            return rows, []
        codes = catalog.campaign_code[rows]
        keep = pacing.throttle(codes, probs, rng)
        if bool(keep.all()):
            return rows, []
        held = sorted({catalog.campaigns[c] for c in np.unique(codes[~keep]).tolist()})
        return rows[keep], held

    def spend(self, part: int, campaign: str, amount: float, now_ms: int) -> None:
        rec = self.records[(part, campaign)]
        pacing.record_spend(rec, amount, now_ms, self.params)
        self.dirty.add((part, campaign))
        view = self.view.get((part, campaign))
        if view is None:  # a click settled before this partition decided: gauges follow then
            return
        _, _, p, share, _ = view
        campaigns = self.loaded.get(part, (None, ()))[1]
        if float(rec["spent"]) >= share and p > 0.0 and campaign in campaigns:
            probs = self.p.setdefault(part, np.ones(len(campaigns)))  # spent: out at once
            probs[campaigns.index(campaign)] = p = 0.0
        self.view[(part, campaign)] = (int(rec["day"]), float(rec["spent"]), p, share, now_ms)

    def settle(
        self, part: int, charges: Sequence[Charge], load: Loader, now_ms: int
    ) -> list[tuple[bytes, int, bytes]]:
        """Charge clicked cpc decisions to ``part``'s spend; the records to write, the
        ``SETTLED_KEY`` record last. A charge whose click is at or below the offset that
        record holds was applied before a crash replayed its batch, and is skipped.

        Write the result before the join's own state (streams/join.py does): then a
        click the join's state holds as labelled is always charged in this table.
        """
        gen = self.generation()
        if part in self.copy_gen and self.copy_gen[part] != gen:  # another owner meanwhile
            self._load(part, (), load, now_ms)
            self.loaded.pop(part, None)
        self.copy_gen[part] = gen
        marks = self.marks.get(part)
        if marks is None:
            marks = self.marks[part] = decode_marks(load([SETTLED_KEY], [part])[0])
        before, replayed = list(marks), set()
        for ch in charges:
            key = (part, ch.campaign_id)
            if key not in self.records:  # not in today's catalog, or not decided here yet
                raw = load([ch.campaign_id.encode()], [part])[0]
                self.records[key], self.stored[key] = load_record(raw, now_ms), raw
            source = 0 if ch.source == "events" else 1
            if ch.offset <= before[source]:  # not marks: one purchase converts several (cpa)
                replayed.add(key)
                continue
            self.spend(part, ch.campaign_id, ch.amount, now_ms)
            marks[source] = ch.offset
        out = self.writes()
        # A replay follows a failure, maybe of the changelog send: its records go again.
        sent = {(part, key.decode()) for key, _, _ in out}
        out += [(c.encode(), p, pacing.encode(self.records[(p, c)]))
                for p, c in sorted(replayed - sent)]  # fmt: skip
        if marks != before or replayed:
            out.append((SETTLED_KEY, part, _MARKS.pack(*marks)))
        return out

    def writes(self) -> list[tuple[bytes, int, bytes]]:
        """(campaign, partition, record) for every record this batch changed."""
        out = []
        for part, c in sorted(self.dirty):
            value = pacing.encode(self.records[(part, c)])
            if value != self.stored[(part, c)]:
                out.append((c.encode(), part, value))
                self.stored[(part, c)] = value
        self.dirty.clear()
        return out

    def gauges(self, now_ms: int) -> dict[str, tuple[float, float, float, float]]:
        """Per campaign over this worker's recent partitions: (spent, target, budget, p)."""
        day, f_now = now_ms // pacing.DAY_MS, self.params.cumulative(now_ms)
        sums: dict[str, list[float]] = {}
        for (part, c), (d, spent, p, share, seen) in list(self.view.items()):
            if now_ms - seen > VIEW_TTL_MS:
                del self.view[(part, c)]
                continue
            acc = sums.setdefault(c, [0.0, 0.0, 0.0, 0.0, 0.0])
            acc[0] += spent if d == day else 0.0
            acc[1] += share * f_now
            acc[2] += share
            acc[3] += p
            acc[4] += 1
        return {c: (a[0], a[1], a[2], a[3] / a[4]) for c, a in sums.items()}


class ServedCalibration:
    """The calibration curve decisions use: shards summed, refreshed every few seconds."""

    def __init__(self, settings: Settings, read: Reader | None) -> None:
        self.s = settings
        self.read = read
        self.calibrator = Calibrator(CalibrationParams())
        self.keys = [calibration_key(p) for p in range(settings.partitions)]
        self.refresh_ms = int(settings.calibration_refresh_s * 1000)
        self.at = -math.inf
        self.curve: tuple[F64, F64] | None = None
        self.labels = 0.0  # labels in the state behind the curve

    def current(self, now_ms: int) -> tuple[F64, F64] | None:
        if not self.s.calibration or self.read is None:
            return None
        if now_ms - self.at >= self.refresh_ms:
            self.at = now_ms
            self.curve, self.labels = self._load()
        return self.curve

    def apply(self, pctr: npt.NDArray[Any], now_ms: int) -> npt.NDArray[np.float64]:
        curve = self.current(now_ms)
        p = pctr.astype(np.float64)
        return p if curve is None else apply_curve(curve, p)

    def _load(self) -> tuple[tuple[F64, F64] | None, float]:
        assert self.read is not None
        total: CalibrationState | None = None
        size = self.calibrator.params.buckets * 3 * 8
        for raw in self.read(self.keys):
            if raw is None:
                continue
            try:
                shard = _decode_shard(raw)
            except msgspec.DecodeError:
                continue
            if len(shard.state) != size:  # other calibration params: not ours to read
                continue
            state = CalibrationState.from_bytes(shard.state)
            total = state if total is None else total + state
        if total is None:
            return None, 0.0
        trusted = self.calibrator.trusted(total, self.s.calibration_min_labels)
        if trusted is None:
            return None, 0.0
        return self.calibrator.curve(trusted), float(trusted.n.sum())
