"""ad-requests -> candidates -> scorer -> strategy -> ad-decisions, one batch at a time.

All requests of a fetched batch are scored in one ONNX Runtime run (split at
``ADPULSE_SCORER_MAX_BATCH_ROWS``): the consumer's batching is the micro-batch,
bounded by the same wait (``ADPULSE_BATCH_MAX_WAIT_S``) as ingest. A request's
user vector comes straight from the interest table (ad-requests is
co-partitioned with user-events, so this worker owns it). Frequency caps and
budget spend live in RocksDB tables and are written once per key per batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
import numpy as np

from adpulse.privacy import Pseudonymiser
from adpulse.settings import Settings
from scoring import caps
from scoring.catalog import Catalog, Context
from scoring.features import NO_TIME, InterestParams, decode_states
from scoring.featurespec import FeatureSpec, Inputs, RequestFeatures, assemble_many
from scoring.registry import LoadedModel, ModelRegistry
from scoring.scorer import FallbackRule
from scoring.strategy import Strategy
from scoring.strategy.ab import Arm, Experiment
from scoring.strategy.epsilon import EpsilonGreedy
from scoring.strategy.greedy import Greedy
from scoring.strategy.uniform import UniformRandom
from streams.budget import BudgetGate, Reader, ServedCalibration
from streams.deadletter import Raw, Rejected
from streams.learn import Bandit, StrategyReader
from streams.validate import ContractDecoder

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
UNSET = msgspec.UNSET


class RequestContextMsg(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    page_category: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | msgspec.UnsetType = UNSET
    device: Literal["mobile", "desktop", "tablet", "tv", "other"] | msgspec.UnsetType = UNSET
    country: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}\Z")] | msgspec.UnsetType = UNSET
    os: Annotated[str, msgspec.Meta(max_length=32)] | msgspec.UnsetType = UNSET


class AdRequestMsg(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """schemas/ad-requests.schema.json as a msgspec Struct (fast path)."""

    request_id: Id
    user_id: Id
    placement: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[a-z0-9_.-]+\Z")]
    ts: Annotated[int, msgspec.Meta(ge=0, le=253_402_300_799_999)]
    context: RequestContextMsg | msgspec.UnsetType = UNSET
    candidates: (
        Annotated[list[Id], msgspec.Meta(min_length=1, max_length=1000)] | msgspec.UnsetType
    ) = UNSET


def _unique_candidates(r: AdRequestMsg) -> bool:
    return r.candidates is UNSET or len(set(r.candidates)) == len(r.candidates)


def request_decoder(max_bytes: int) -> ContractDecoder[AdRequestMsg]:
    return ContractDecoder("ad-requests", AdRequestMsg, ("ts",), _unique_candidates, max_bytes)


Policy = Strategy | Bandit


def parse_policy(text: str, settings: Settings | None = None) -> Policy:
    """``random``, ``greedy``, ``epsilon-greedy:EPS``, ``thompson[:M]`` or ``linucb[:ALPHA]``."""
    name, _, arg = text.strip().partition(":")
    if name in ("thompson", "linucb"):
        try:
            return Bandit.parse(name, arg, settings or Settings())
        except ValueError as exc:
            msg = f"policy {text!r}: {exc}"
            raise ValueError(msg) from None
    if name == "greedy":
        return Greedy()
    if name == "random":
        return UniformRandom()
    if name == "epsilon-greedy":
        try:
            return EpsilonGreedy(float(arg or "0.05"))
        except ValueError as exc:
            msg = f"policy {text!r}: {exc}"
            raise ValueError(msg) from None
    msg = (
        f"unknown policy {text!r}: use random, greedy, epsilon-greedy:EPS, thompson:M "
        "or linucb:ALPHA"
    )
    raise ValueError(msg)


def placement_policies(
    default: str, per_placement: str, settings: Settings | None = None
) -> Callable[[str], Policy]:
    """``"home=greedy;feed=thompson:20"`` on top of a default, as a lookup."""
    base = parse_policy(default, settings)
    table: dict[str, Policy] = {}
    for part in filter(None, (p.strip() for p in per_placement.split(";"))):
        placement, sep, policy = part.partition("=")
        if not sep:
            msg = f"placement policy {part!r}: expected PLACEMENT=POLICY"
            raise ValueError(msg)
        table[placement.strip()] = parse_policy(policy, settings)
    return lambda placement: table.get(placement, base)


def parse_experiment(text: str, settings: Settings) -> tuple[Experiment, list[Policy]] | None:
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
    return exp, [parse_policy(a.policy, settings) for a in arms]


def snapshot(
    ad: Mapping[str, Any], vector: np.ndarray | None, req: AdRequestMsg, ts_ms: int, pctr: float
) -> dict[str, Any]:
    """The decision's ``features``: what ctr-feedback and the learners need, as scored.

    The interest vector is the decayed one the model saw, rounded to 4 decimals
    (empty for a user with no history); ``pctr`` is the raw model output.
    """
    interest = [] if vector is None else np.round(vector.astype(np.float64), 4).tolist()
    out: dict[str, Any] = {
        "interest": interest, "placement": req.placement, "hour": (ts_ms // 3_600_000) % 24,
        "category_id": int(ad["category_id"]), "campaign_id": str(ad["campaign_id"]),
        "pctr": pctr,
    }  # fmt: skip
    if ad.get("item_id") is not None:
        out["item_id"] = int(ad["item_id"])
    ctx = req.context
    if ctx is not UNSET and ctx.device is not UNSET:
        out["device"] = ctx.device
    return out


@dataclass
class ServingModels:
    """The model in force (swapped whole by the registry poller) and the fallback rule.

    A swap replaces the reference between batches' scoring runs; a batch being
    scored keeps the model it started with, so no request is dropped.
    """

    current: LoadedModel | None
    fallback: FallbackRule
    registry: ModelRegistry

    def swap(self, loaded: LoadedModel, default_ctr: float) -> None:
        self.current = loaded
        self.fallback = loaded.fallback(default_ctr)


@dataclass
class DecideResult:
    # key (the pseudonym), partition (the request's: co-partitioned with the user's events),
    # decision (latency_ms is set when it is sent), request's record timestamp (ms)
    decisions: list[tuple[bytes, int, dict[str, Any], int]] = field(default_factory=list)
    cap_writes: list[tuple[bytes, int, bytes]] = field(default_factory=list)
    spend_writes: list[tuple[bytes, int, bytes]] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    by_policy: Counter[tuple[str, str]] = field(default_factory=Counter)  # (policy, placement)
    by_arm: Counter[str] = field(default_factory=Counter)  # experiment arm -> decisions
    throttled: Counter[str] = field(default_factory=Counter)  # campaign -> requests held back
    fallbacks: int = 0
    no_fill: int = 0
    rows_scored: int = 0


Loader = Callable[[Sequence[bytes], Sequence[int]], list[bytes | None]]


@dataclass
class _Pending:
    req: AdRequestMsg
    raw: Raw
    rows: np.ndarray
    start: int = 0  # first row of this request in the batch's scores


class DecideStage:
    def __init__(
        self,
        settings: Settings,
        models: ServingModels,
        catalog: Callable[[], Catalog | None],
        strategy: StrategyReader | None = None,
        pseudonyms: Pseudonymiser | None = None,
        calibration: Reader | None = None,
    ) -> None:
        self.s = settings
        self.pseudonyms = pseudonyms or Pseudonymiser.from_settings(settings)
        self.models = models
        self.catalog = catalog
        self.params = InterestParams.from_settings(settings)
        self.spec = FeatureSpec.from_settings(settings)
        self.policy_for = placement_policies(settings.policy, settings.placement_policies, settings)
        self.experiment = parse_experiment(settings.experiment, settings)
        self.strategy = strategy or StrategyReader(lambda keys: [None] * len(keys))
        self.decoder = request_decoder(settings.max_event_bytes)
        self.rng = np.random.default_rng()
        self.budget = BudgetGate(settings)  # pacing (streams/budget.py)
        self.calibration = ServedCalibration(settings, calibration)

    def process(
        self,
        raws: Sequence[Raw],
        load_interest: Loader,
        load_caps: Loader,
        load_spend: Loader,
        now_ms: int,
        received: Sequence[float] | None = None,
    ) -> DecideResult:
        good, rejected = self.decoder.split(raws)
        for req, _ in good:  # from here on, user ids are pseudonyms (adpulse/privacy.py)
            req.user_id = self.pseudonyms(req.user_id)
        out = DecideResult(rejected=rejected)
        catalog = self.catalog()
        if not good:
            return out
        self.strategy.batch()  # learner state read at most once per ad per batch
        day = caps.day_of(now_ms)
        users = list(dict.fromkeys((r.user_id, raw.partition) for r, raw in good))
        keys = [u.encode() for u, _ in users]
        parts = [p for _, p in users]
        vectors = self._vectors(load_interest(keys, parts), now_ms)
        user_row = {u: i for i, (u, _) in enumerate(users)}
        cap_recs = [caps.load_cap(v, day) for v in load_caps(keys, parts)]
        self.budget.begin(catalog, parts, load_spend, now_ms)

        pending: list[_Pending] = []
        wanted: list[RequestFeatures] = []
        n_rows = 0
        for req, raw in good:
            u = user_row[req.user_id]
            rows = self._eligible(catalog, req, cap_recs[u])
            # Pacing gates campaigns before the policy sees them: propensities stay exact.
            rows, held = self.budget.gate(catalog, raw.partition, rows, self.rng)
            out.throttled.update(held)
            pending.append(_Pending(req, raw, rows, n_rows))
            if len(rows):
                ctx = req.context if req.context is not UNSET else None
                device = ctx.device if ctx is not None and ctx.device is not UNSET else None
                wanted.append(RequestFeatures(vectors[u], rows, req.placement, device))
                n_rows += len(rows)
        inputs = (
            assemble_many(wanted, catalog.index, now_ms, self.spec)
            if wanted and catalog is not None
            else None
        )
        scores, model_version = self._score(inputs, n_rows)
        out.rows_scored = n_rows

        touched_caps: set[int] = set()
        for p in pending:
            req, policy = p.req, self.policy_for(p.req.placement)
            arm = None
            if self.experiment is not None:
                exp, arm_policies = self.experiment
                i_arm = exp.arm_of(req.user_id)
                arm, policy = exp.arms[i_arm].name, arm_policies[i_arm]
            got = None if scores is None else scores[p.start : p.start + len(p.rows)]
            if user_row[req.user_id] in touched_caps and catalog is not None:
                # An earlier request of this user in this batch may have used up a cap.
                shown, limit = cap_recs[user_row[req.user_id]].shown, self.s.freq_cap_per_day
                ids = catalog.index.ad_ids
                keep = np.array([shown.get(ids[r], 0) < limit for r in p.rows.tolist()], bool)
                p.rows, got = p.rows[keep], None if got is None else got[keep]
            decision: dict[str, Any] = {
                "request_id": req.request_id, "user_id": req.user_id, "placement": req.placement,
                "ts": now_ms, "request_ts": req.ts, "candidates": len(p.rows),
                "model_version": model_version,
            }  # fmt: skip
            if arm is not None:
                decision["arm"] = arm
            if not len(p.rows) or catalog is None:
                decision.update(ad_id=None, score=0.0, pctr=0.0, bid=0.0, propensity=1.0,
                                policy=policy.name)  # fmt: skip
                out.no_fill += 1
            else:
                raw_pctr, fell_back = self.models.fallback.guard(got, len(p.rows))
                pctr = raw_pctr if fell_back else self.calibration.apply(raw_pctr, now_ms)
                bids = catalog.index.bid[p.rows]
                if isinstance(policy, Bandit):
                    states = self.strategy.states(  # an arm reads only its own learner state
                        [catalog.index.ad_ids[r] for r in p.rows.tolist()], arm
                    )
                    vector = vectors[user_row[req.user_id]]
                    choice = policy.choose(pctr.astype(np.float64), bids, states, vector, self.rng)
                else:
                    choice = policy.choose(pctr.astype(np.float64) * bids, self.rng)
                row = int(p.rows[choice.index])
                name = self.models.fallback.policy if fell_back else policy.name
                out.fallbacks += fell_back
                ad_id, campaign = catalog.index.ad_ids[row], catalog.campaign[row]
                j = choice.index
                decision.update(
                    ad_id=ad_id, campaign_id=campaign, pctr=float(pctr[j]), bid=float(bids[j]),
                    score=float(pctr[j] * bids[j]), propensity=choice.propensity, policy=name,
                    pctr_raw=float(raw_pctr[j]),
                    features=snapshot(catalog.ads[row], vectors[user_row[req.user_id]], req,
                                      now_ms, float(raw_pctr[j])),
                )  # fmt: skip
                u = user_row[req.user_id]
                caps.record_impression(cap_recs[u], ad_id)
                touched_caps.add(u)
                self.budget.spend(p.raw.partition, campaign, decision["score"], now_ms)
            out.by_policy[(decision["policy"], req.placement)] += 1
            if arm is not None:
                out.by_arm[arm] += 1
            out.decisions.append(
                (req.user_id.encode(), p.raw.partition, decision, p.raw.timestamp_ms)
            )
        for u in touched_caps:
            out.cap_writes.append((keys[u], parts[u], caps.encode(cap_recs[u])))
        out.spend_writes = self.budget.writes()
        return out

    # -- pieces -------------------------------------------------------------------------
    def _vectors(self, raw_states: list[bytes | None], now_ms: int) -> list[np.ndarray | None]:
        states = decode_states(raw_states, self.params)
        known = states["t_ref"] != NO_TIME
        age = np.where(known, np.maximum(0, now_ms - np.where(known, states["t_ref"], now_ms)), 0)
        decayed = states["vec"] * np.exp(-age / self.params.tau_ms)[:, None].astype(np.float32)
        return [decayed[i] if known[i] else None for i in range(len(states))]

    def _eligible(
        self, catalog: Catalog | None, req: AdRequestMsg, cap: caps.CapRecord
    ) -> np.ndarray:
        if catalog is None or not len(catalog):
            return np.zeros(0, dtype=np.int64)
        ctx = req.context if req.context is not UNSET else None
        context: Context = (
            req.placement,
            ctx.device if ctx is not None and ctx.device is not UNSET else None,
            ctx.country if ctx is not None and ctx.country is not UNSET else None,
            ctx.page_category if ctx is not None and ctx.page_category is not UNSET else None,
        )
        cands = None if req.candidates is UNSET else req.candidates
        rows = catalog.candidate_rows(cands, context)
        limit = self.s.freq_cap_per_day
        capped = [a for a, n in cap.shown.items() if n >= limit]
        if capped:
            keep = np.ones(len(rows), dtype=bool)
            for i, r in enumerate(rows.tolist()):
                if catalog.index.ad_ids[r] in capped:
                    keep[i] = False
            rows = rows[keep]
        return rows

    def _score(self, batch: Inputs | None, n_rows: int) -> tuple[np.ndarray | None, str]:
        model = self.models.current
        if model is None:
            return None, "none"
        if batch is None:
            return np.zeros(0, dtype=np.float32), model.version
        step = self.s.scorer_max_batch_rows
        try:
            if n_rows <= step:
                return model.scorer.score(batch), model.version
            parts = [
                model.scorer.score({k: v[i : i + step] for k, v in batch.items()})
                for i in range(0, n_rows, step)
            ]
            return np.concatenate(parts), model.version
        except Exception:  # a runtime failure in the model must not stop decisions
            return None, model.version
