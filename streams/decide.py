"""ad-requests -> candidates -> scorer -> strategy -> ad-decisions, one batch at a time.

All requests of a fetched batch are scored in one ONNX Runtime run (split at
``ADPULSE_SCORER_MAX_BATCH_ROWS``; a sequence model: one run per request, each
sending its sequence once, see ``_run``): the consumer's batching is the micro-batch,
bounded by the same wait (``ADPULSE_BATCH_MAX_WAIT_S``) as ingest. A request's
user vector comes straight from the interest table (ad-requests is
co-partitioned with user-events, so this worker owns it). Frequency caps and
budget spend live in RocksDB tables and are written once per key per batch.

Value by billing: a candidate's bid is priced per click for cpm and cpc ads; a
cpa ad's bid is per conversion, so the policy sees it as pCVR x bid per click
and ranks pCTR x pCVR x bid (``value_per_click``). pCVR is the model's second
head, else the prior (its metrics' training CVR, else ``ADPULSE_FALLBACK_CVR``).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, cast

import numpy as np
import numpy.typing as npt

from adpulse.core.privacy import Pseudonymiser
from adpulse.core.settings import Settings
from schemas.messages import UNSET, AdDecision, AdRequest, Billing, FeatureSnapshot
from scoring import caps
from scoring.catalog import Catalog, Context
from scoring.embeddings import CachedEmbeddings, EmbeddingTable, HashedEmbeddings
from scoring.features import InterestParams, ItemVectors, read_vectors
from scoring.featurespec import (
    FeatureSpec,
    ItemVectorCache,
    RequestFeatures,
    assemble_each,
    assemble_many,
)
from scoring.promotion import in_canary
from scoring.registry import LoadedModel, ModelRegistry
from scoring.scorer import FallbackRule, probabilities
from scoring.sequence import decode_sequences, sequence_vectors
from scoring.strategy.policy import (
    Candidates,
    PolicyParams,
    StrategyReader,
    parse_experiment,
    placement_policies,
)
from streams.budget import BudgetGate, Reader, ServedCalibration
from streams.deadletter import Loader, Raw, Rejected
from streams.validate import ContractDecoder, split_by_key


def request_decoder(max_bytes: int) -> ContractDecoder[AdRequest]:
    return ContractDecoder("ad-requests", AdRequest, max_bytes)


def snapshot(
    ad: Mapping[str, Any],
    vector: np.ndarray | None,
    req: AdRequest,
    ts_ms: int,
    pctr: float,
    pcvr: float | None = None,
    sequence: list[tuple[int, int]] | None = None,
) -> FeatureSnapshot:
    """The decision's ``features``: what ctr-feedback and the learners need, as scored.

    The interest vector is the decayed one the model saw, rounded to 4 decimals
    (empty for a user with no history); ``pctr`` is the raw model output;
    ``sequence`` the (item, category) behaviours a sequence model attended over.
    """
    # + 0.0: a weight that rounds away is 0.0, not -0.0
    interest = [] if vector is None else (np.round(vector.astype(np.float64), 4) + 0.0).tolist()
    ctx = req.context
    return FeatureSnapshot(
        interest=interest, placement=req.placement,
        device=UNSET if ctx is UNSET else ctx.device, hour=(ts_ms // 3_600_000) % 24,
        category_id=int(ad["category_id"]), campaign_id=str(ad["campaign_id"]),
        item_id=UNSET if ad.get("item_id") is None else int(ad["item_id"]), pctr=pctr,
        pcvr=UNSET if pcvr is None else pcvr,
        sequence=UNSET if sequence is None else sequence,
    )  # fmt: skip


def value_per_click(
    bids: npt.NDArray[np.float64], cpa: npt.NDArray[np.bool_], pcvr: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """What a click on each candidate is worth: its bid, or pCVR x bid for a cpa ad.

    >>> value_per_click(np.array([2.0, 10.0]), np.array([False, True]), np.array([0.5, 0.1]))
    array([2., 1.])
    """
    out: npt.NDArray[np.float64] = np.where(cpa, bids * pcvr, bids)
    return out


def prior_cvr(model: LoadedModel | None, default: float) -> float:
    """pCVR for a cpa ad the model cannot give one: its training CVR, else ``default``."""
    cvr = (model.metrics.get("cvr") or {}) if model is not None else {}
    got = cvr.get("train_cvr") if isinstance(cvr, dict) else None
    return float(got) if isinstance(got, int | float) and 0.0 < got < 1.0 else default


def _usable(x: npt.NDArray[np.float32] | None, n: int) -> bool:
    return x is not None and len(x) == n and probabilities(x)


@dataclass
class ServingModels:
    """The model in force (swapped whole by the registry poller) and the fallback rule.

    A swap replaces the reference between batches' scoring runs; a batch being
    scored keeps the model it started with, so no request is dropped.
    """

    current: LoadedModel | None
    fallback: FallbackRule
    registry: ModelRegistry
    canary: LoadedModel | None = None  # guarded promotion: scores the canary share of users
    canary_share: float = 0.0
    canary_key: bytes = b""

    @classmethod
    def load(cls, registry: ModelRegistry, default_ctr: float) -> ServingModels:
        """The registry's newest valid model, else the fallback rule alone."""
        loaded = registry.latest_valid()
        if loaded is None:
            return cls(None, FallbackRule(prior_ctr=default_ctr), registry, registry.canary)
        return cls(loaded, loaded.fallback(default_ctr), registry, registry.canary)

    def model_for(self, user_id: str) -> LoadedModel | None:
        """The canary for a user in its share (while there is one), else the current model."""
        if self.canary is not None and in_canary(user_id, self.canary_key, self.canary_share):
            return self.canary
        return self.current

    def swap(self, loaded: LoadedModel, default_ctr: float) -> None:
        self.current = loaded
        self.fallback = loaded.fallback(default_ctr)


@dataclass
class DecideResult:
    # key (the pseudonym), the request (its partition: co-partitioned with the user's events;
    # its timestamp: when its budget started), decision (latency_ms is set when it is sent)
    decisions: list[tuple[bytes, Raw, AdDecision]] = field(default_factory=list)
    cap_writes: list[tuple[bytes, int, bytes]] = field(default_factory=list)
    spend_writes: list[tuple[bytes, int, bytes]] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    by_policy: Counter[tuple[str, str]] = field(default_factory=Counter)  # (policy, placement)
    by_arm: Counter[str] = field(default_factory=Counter)  # experiment arm -> decisions
    throttled: Counter[str] = field(default_factory=Counter)  # campaign -> requests held back
    fallbacks: int = 0
    no_fill: Counter[str] = field(default_factory=Counter)  # no_fill_reason -> decisions
    rows_scored: int = 0


Decision = tuple[bytes, Raw, AdDecision]


class _NoFill(NamedTuple):
    """Why a request gets no ad, and what its decision says besides."""

    reason: Literal["no_candidates", "deadline", "shed"]
    policy: str
    candidates: int
    version: str  # the model in force ("none": none was asked)
    arm: str | None


class StateReaders(NamedTuple):
    """The tables a decision reads: the user's interest, the user's caps, and
    campaigns' spend (pacing), each read on the request's partition; and the user's
    behaviour sequence when the model in force attends over it."""

    interest: Loader
    caps: Loader
    spend: Loader
    sequence: Loader | None = None


@dataclass
class _Users:
    """The batch's users: interest vectors and cap records, loaded once per batch."""

    keys: list[bytes]
    parts: list[int]
    row: dict[str, int]  # pseudonym -> index
    vectors: list[npt.NDArray[np.float32] | None]
    caps: list[caps.CapRecord]
    touched: set[int] = field(default_factory=set)  # users whose caps this batch changed
    # Read only when the model in force attends over behaviours (else empty lists).
    sequences: list[npt.NDArray[np.float32] | None] = field(default_factory=list)
    behaviours: list[list[tuple[int, int]]] = field(default_factory=list)  # (item, category)

    def cap_writes(self) -> list[tuple[bytes, int, bytes]]:
        return [(self.keys[u], self.parts[u], caps.encode(self.caps[u])) for u in self.touched]


@dataclass
class _Pending:
    req: AdRequest
    raw: Raw
    user: int
    rows: npt.NDArray[np.int64]  # eligible catalog rows
    start: int = 0  # first row of this request in the batch's scores
    version: str = ""  # the model that scored it, when not the batch's (the canary)


class Scored(NamedTuple):
    """A batch's model output: pCTR (None: no model, or it failed), pCVR (None: no CVR
    head), and the version of the model in force."""

    pctr: npt.NDArray[np.float32] | None
    pcvr: npt.NDArray[np.float32] | None
    version: str


@dataclass
class Prepared:
    """A decision batch between its reads and its choices: what :meth:`DecideStage.score`
    needs, handed over whole (streams/lane.py runs it on a thread), and what
    :meth:`DecideStage.finish` needs after. ``models`` is a copy of the serving models
    taken when the batch began: a hot swap during its run changes nothing in it."""

    out: DecideResult
    now_ms: int
    catalog: Catalog | None = None
    users: _Users | None = None
    pending: list[_Pending] = field(default_factory=list)
    models: ServingModels | None = None  # None: every request was answered in admission

    @property
    def runs_model(self) -> bool:
        """Whether :meth:`DecideStage.score` will run a model (worth a thread)."""
        m = self.models
        return (m is not None and m.current is not None and self.catalog is not None
                and any(len(p.rows) for p in self.pending))  # fmt: skip


class DecideStage:
    """Requests -> decisions, in named steps: admit (deadlines), load the users,
    eligible candidates (targeting, caps, pacing), one scoring run, then per
    request calibration, the policy's choice and its bookkeeping."""

    def __init__(
        self,
        settings: Settings,
        models: ServingModels,
        catalog: Callable[[], Catalog | None],
        strategy: StrategyReader | None = None,
        pseudonyms: Pseudonymiser | None = None,
        calibration: Reader | None = None,
        generation: Callable[[], Any] = lambda: None,
        items: Callable[[], ItemVectors | None] = lambda: None,
        embeddings: EmbeddingTable | None = None,
    ) -> None:
        """``generation`` names the consumer's current partition assignment: the budget
        records of this worker's partitions are kept while it does not change. ``items``:
        the item vectors in force (streams/items.py), read into each user's interest.
        ``embeddings``: the hashed table behind ingest's cache (streams/interest.py), so a
        behaviour's item and category vectors are the ones ingest computed when it arrived."""
        self.items = items
        self.s = settings
        self.pseudonyms = pseudonyms or Pseudonymiser.from_settings(settings)
        self.models = models
        self.catalog = catalog
        self.params = InterestParams.from_settings(settings)
        self.spec = FeatureSpec.from_settings(settings)
        # behaviours' vectors for a sequence model (item text vectors can replace them later)
        self.behaviour_table = embeddings or CachedEmbeddings(
            HashedEmbeddings(settings.dim, settings.embedding_seed), settings.embedding_cache_rows
        )
        self.behaviour_cache = ItemVectorCache(  # bounded: ADPULSE_EMBEDDING_CACHE_ROWS
            self.behaviour_table, self.spec, settings.embedding_cache_rows
        )
        policy = PolicyParams.from_settings(settings)
        self.policy_for = placement_policies(settings.policy, settings.placement_policies, policy)
        self.experiment = parse_experiment(settings.experiment, policy)
        self.strategy = strategy or StrategyReader(lambda keys: [None] * len(keys))
        self.decoder = request_decoder(settings.max_event_bytes)
        self.rng = np.random.default_rng()
        self.budget = BudgetGate(settings, generation)  # pacing (streams/budget.py)
        self.calibration = ServedCalibration(settings, calibration)

    def process(
        self,
        raws: Sequence[Raw],
        tables: StateReaders,
        now_ms: int,
        default_tmax_ms: int = 0,
    ) -> DecideResult:
        """The ad-requests topic's entry: decode, then :meth:`decide`."""
        good, rejected = self.split_topic(raws)
        out = self.decide(good, tables, now_ms, default_tmax_ms)
        out.rejected = rejected
        return out

    def split_topic(
        self, raws: Sequence[Raw]
    ) -> tuple[list[tuple[AdRequest, Raw]], list[Rejected]]:
        """Records of the ad-requests topic: decoded, and keyed by their own raw user id
        (a request on another partition would read caps and interest that are not the
        user's: ``key_mismatch``, streams/validate.py)."""
        good, rejected = self.decoder.split(raws)
        good, mis_keyed = split_by_key(good)
        return good, rejected + mis_keyed

    def decide(
        self,
        requests: Sequence[tuple[AdRequest, Raw]],
        tables: StateReaders,
        now_ms: int,
        default_tmax_ms: int = 0,
    ) -> DecideResult:
        """Decisions for decoded requests: the one call both entry points (the
        ad-requests topic, ``POST /decide``) make.

        ``raw.timestamp_ms`` is when each request's budget started (its record
        timestamp, or its arrival over HTTP); one whose ``tmax_ms`` (else
        ``default_tmax_ms``, 0: none) is used up gets a ``deadline`` no fill, unscored.
        In three parts (:meth:`begin`, :meth:`score`, :meth:`finish`) so that a caller
        can run the model runs on a thread; this runs them all here.
        """
        batch = self.begin(requests, tables, now_ms, default_tmax_ms)
        return self.finish(batch, self.score(batch))

    def begin(
        self,
        requests: Sequence[tuple[AdRequest, Raw]],
        tables: StateReaders,
        now_ms: int,
        default_tmax_ms: int = 0,
    ) -> Prepared:
        """:meth:`decide`'s first part, on the caller's thread: admit, read the users,
        pick each request's eligible candidates."""
        out = DecideResult()
        live = self._admit(requests, now_ms, default_tmax_ms, out)
        if not live:
            return Prepared(out, now_ms)
        models = copy.copy(self.models)  # as they are now, whatever a swap does meanwhile
        catalog = self.catalog()
        self.strategy.batch()  # learner state read at most once per ad per batch
        users = self._users(live, tables, now_ms, models.current)
        self.budget.begin(catalog, users.parts, tables.spend, now_ms)
        pending = [self._eligible(catalog, req, raw, users, out) for req, raw in live]
        return Prepared(out, now_ms, catalog, users, pending, models)

    def score(self, batch: Prepared) -> Scored:
        """:meth:`decide`'s model runs: reads only ``batch`` and the settings, writes only
        ``batch``, so it may run on another thread while the caller's goes on (ONNX
        Runtime releases the GIL). A model failure gives the fallback, as inline."""
        if batch.models is None or batch.users is None:
            return Scored(None, None, "none")
        return Scored(*self._score(batch.catalog, batch.pending, batch.users, batch.now_ms,
                                   batch.out, batch.models))  # fmt: skip

    def finish(self, batch: Prepared, scored: Scored) -> DecideResult:
        """:meth:`decide`'s last part, on the caller's thread: each request's choice and
        bookkeeping; the batch's cap and spend writes."""
        out, users, models = batch.out, batch.users, batch.models
        if models is None or users is None:
            return out
        prior = prior_cvr(models.current, self.s.fallback_cvr)
        for p in batch.pending:
            out.decisions.append(self._choose(batch.catalog, p, users, scored, batch.now_ms,
                                              out, prior, models.fallback))  # fmt: skip
        out.cap_writes = users.cap_writes()
        out.spend_writes = self.budget.writes()
        return out

    def shed(
        self, requests: Sequence[tuple[AdRequest, Raw]], now_ms: int, default_tmax_ms: int = 0
    ) -> DecideResult:
        """Each request answered at once, unscored, no state read or written: a ``deadline``
        no fill where its budget is used up (as :meth:`decide` would), else a ``shed`` one.
        The ad-requests topic's answer while decisions give way to ingest (``IngestGuard``,
        streams/serve.py), as ``POST /decide``'s is a 503: the request's producer gets a
        record that says why, at once, instead of a decision seconds late."""
        out = DecideResult()
        for req, raw in self._admit(requests, now_ms, default_tmax_ms, out):
            no_fill = _NoFill("shed", self.policy_for(req.placement).name, 0, "none", None)
            out.decisions.append(self._no_fill(req, raw, now_ms, no_fill, out))
        return out

    # -- the steps ------------------------------------------------------------------------
    def _admit(
        self,
        requests: Sequence[tuple[AdRequest, Raw]],
        now_ms: int,
        default_tmax_ms: int,
        out: DecideResult,
    ) -> list[tuple[AdRequest, Raw]]:
        """Pseudonymise; answer the requests whose budget is used up; the rest go on."""
        live: list[tuple[AdRequest, Raw]] = []
        for req, raw in requests:  # from here on, user ids are pseudonyms (adpulse/core/privacy.py)
            req.user_id = self.pseudonyms(req.user_id)
            tmax = req.tmax_ms if req.tmax_ms is not UNSET else default_tmax_ms
            if tmax and now_ms - raw.timestamp_ms >= tmax:
                policy = self.policy_for(req.placement).name
                no_fill = _NoFill("deadline", policy, 0, "none", None)
                out.decisions.append(self._no_fill(req, raw, now_ms, no_fill, out))
            else:
                live.append((req, raw))
        return live

    def _users(
        self,
        live: list[tuple[AdRequest, Raw]],
        tables: StateReaders,
        now_ms: int,
        model: LoadedModel | None,
    ) -> _Users:
        pairs = list(dict.fromkeys((r.user_id, raw.partition) for r, raw in live))
        keys = [u.encode() for u, _ in pairs]
        parts = [p for _, p in pairs]
        _, vecs, known = read_vectors(tables.interest(keys, parts), now_ms, self.params,
                                      self.items())  # fmt: skip
        vectors = [vecs[i] if known[i] else None for i in range(len(pairs))]
        day = caps.day_of(now_ms)
        cap_recs = [caps.load_cap(v, day) for v in tables.caps(keys, parts)]
        row = {u: i for i, (u, _) in enumerate(pairs)}
        users = _Users(keys, parts, row, vectors, cap_recs)
        if model is not None and model.spec.sequence and tables.sequence is not None:
            seqs = decode_sequences(tables.sequence(keys, parts))
            if not self.behaviour_cache.fits(self.behaviour_table, model.spec):  # new dim/mix
                self.behaviour_cache = ItemVectorCache(
                    self.behaviour_table, model.spec, self.s.embedding_cache_rows
                )
            users.sequences = sequence_vectors(
                seqs, self.behaviour_table, model.spec, self.behaviour_cache
            )
            users.behaviours = [
                list(zip(e["item"].tolist(), e["category"].tolist(), strict=True))
                for e in (seqs.of(i)[: model.spec.sequence] for i in range(len(seqs)))
            ]
        return users

    def _eligible(
        self, catalog: Catalog | None, req: AdRequest, raw: Raw, users: _Users, out: DecideResult
    ) -> _Pending:
        """Targeting, then the user's caps, then pacing (before the policy sees the ads, so
        propensities stay exact)."""
        u = users.row[req.user_id]
        if catalog is None or not len(catalog):
            return _Pending(req, raw, u, np.zeros(0, dtype=np.int64))
        ctx = req.context if req.context is not UNSET else None
        context: Context = (
            req.placement,
            ctx.device if ctx is not None and ctx.device is not UNSET else None,
            ctx.country if ctx is not None and ctx.country is not UNSET else None,
            ctx.page_category if ctx is not None and ctx.page_category is not UNSET else None,
        )
        cands = None if req.candidates is UNSET else req.candidates
        rows = self._under_caps(catalog, catalog.candidate_rows(cands, context), users.caps[u])
        rows, held = self.budget.gate(catalog, raw.partition, rows, self.rng)
        out.throttled.update(held)
        return _Pending(req, raw, u, rows)

    def _under_caps(
        self, catalog: Catalog, rows: npt.NDArray[np.int64], cap: caps.CapRecord
    ) -> npt.NDArray[np.int64]:
        keep = self._cap_mask(catalog, rows, cap)
        return rows if keep is None else rows[keep]

    def _cap_mask(
        self, catalog: Catalog, rows: npt.NDArray[np.int64], cap: caps.CapRecord
    ) -> npt.NDArray[np.bool_] | None:
        """Which ``rows`` are under the user's frequency caps; None: all of them."""
        if not caps.any_capped(cap, self.s.freq_cap_per_day):
            return None
        ids = catalog.index.ad_ids
        keep = caps.under_caps(cap, [ids[r] for r in rows.tolist()], self.s.freq_cap_per_day)
        return None if all(keep) else np.asarray(keep, dtype=bool)

    def _score(
        self,
        catalog: Catalog | None,
        pending: list[_Pending],
        users: _Users,
        now_ms: int,
        out: DecideResult,
        models: ServingModels,
    ) -> tuple[npt.NDArray[np.float32] | None, npt.NDArray[np.float32] | None, str]:
        """Every request's candidates scored: (pCTR, pCVR or None when a model has no CVR
        head, version). A plain model: one run over all (split at the row limit); a
        sequence model: one run per request (``_run``); with a canary, the control's
        requests and the canary's apart."""
        model = models.current
        canary = models.canary
        if canary is not None and model is not None:
            mine = [p for p in pending if models.model_for(p.req.user_id) is canary]
            if mine:
                rest = [p for p in pending if models.model_for(p.req.user_id) is not canary]
                got, cvr, version = self._run(catalog, rest, users, now_ms, out, model, 0)
                n0 = out.rows_scored
                theirs, their_cvr, cv = self._run(catalog, mine, users, now_ms, out, canary, n0)
                out.rows_scored += n0
                for p in mine:
                    p.version = cv
                if got is None or theirs is None:  # one model failed: the fallback for all
                    return None, None, version
                both = None if cvr is None or their_cvr is None else [cvr, their_cvr]
                return (np.concatenate([got, theirs]),
                        None if both is None else np.concatenate(both), version)  # fmt: skip
        return self._run(catalog, pending, users, now_ms, out, model, 0)

    def _run(
        self,
        catalog: Catalog | None,
        pending: list[_Pending],
        users: _Users,
        now_ms: int,
        out: DecideResult,
        model: LoadedModel | None,
        offset: int,
    ) -> tuple[npt.NDArray[np.float32] | None, npt.NDArray[np.float32] | None, str]:
        wanted: list[RequestFeatures] = []
        n_rows = 0
        for p in pending:
            p.start = offset + n_rows
            if len(p.rows):
                ctx = p.req.context if p.req.context is not UNSET else None
                device = ctx.device if ctx is not None and ctx.device is not UNSET else None
                seq = users.sequences[p.user] if users.sequences else None
                wanted.append(RequestFeatures(users.vectors[p.user], p.rows, p.req.placement,
                                              device, seq))  # fmt: skip
                n_rows += len(p.rows)
        out.rows_scored = n_rows
        if model is None:
            return None, None, "none"
        if not wanted or catalog is None:
            return np.zeros(0, dtype=np.float32), None, model.version
        # A sequence model scores each request in a run of its own: its sequence goes once,
        # [1, L, D], and the graph's shared-sequence form is ~1.5x faster than a batch's
        # sequence per row (docs/performance.md); a request's scores so never depend on
        # what it was batched with either.
        step = self.s.scorer_max_batch_rows
        try:
            spec = model.spec  # the model's spec
            batches = (assemble_each(wanted, catalog.index, now_ms, spec)
                       if spec.sequence and len(wanted) > 1
                       else [assemble_many(wanted, catalog.index, now_ms, spec)])  # fmt: skip
            parts = []
            for batch in batches:
                rows = len(batch["ad"])
                parts += [
                    model.scorer.score_heads(
                        {k: v[i : i + step] if len(v) == rows else v for k, v in batch.items()}
                    )  # seq: maybe 1 row
                    for i in range(0, rows, step)
                ] if rows > step else [model.scorer.score_heads(batch)]  # fmt: skip
            if len(parts) == 1:
                return (*parts[0], model.version)
            cvrs = [c for _, c in parts if c is not None]
            cvr = np.concatenate(cvrs) if len(cvrs) == len(parts) else None
            return np.concatenate([c for c, _ in parts]), cvr, model.version
        except Exception:  # a runtime failure in the model must not stop decisions
            return None, None, model.version

    def _choose(
        self,
        catalog: Catalog | None,
        p: _Pending,
        users: _Users,
        scored: Scored,
        now_ms: int,
        out: DecideResult,
        prior: float,
        fallback: FallbackRule,
    ) -> Decision:
        """Calibration, the policy's pick and its bookkeeping (caps, spend, counts).

        ``prior``: the pCVR that stands in where the model gives none; ``fallback``: the
        rule of the model that scored the batch."""
        req, policy, arm = p.req, self.policy_for(p.req.placement), None
        scores, cvr = scored.pctr, (scored.pcvr, prior)
        version = p.version or scored.version
        if self.experiment is not None:
            exp, arm_policies = self.experiment
            i_arm = exp.arm_of(req.user_id)
            arm, policy = exp.arms[i_arm].name, arm_policies[i_arm]
        got = None if scores is None else scores[p.start : p.start + len(p.rows)]
        got_cvr = None if cvr[0] is None else cvr[0][p.start : p.start + len(p.rows)]
        if p.user in users.touched and catalog is not None:
            # An earlier request of this user in this batch may have used up a cap.
            keep = self._cap_mask(catalog, p.rows, users.caps[p.user])
            if keep is not None:
                p.rows, got = p.rows[keep], None if got is None else got[keep]
                got_cvr = None if got_cvr is None else got_cvr[keep]
        if arm is not None:
            out.by_arm[arm] += 1
        if not len(p.rows) or catalog is None:
            no_fill = _NoFill("no_candidates", policy.name, len(p.rows), version, arm)
            return self._no_fill(req, p.raw, now_ms, no_fill, out)
        raw_pctr, fell_back = fallback.guard(got, len(p.rows))
        pctr = raw_pctr if fell_back else self.calibration.apply(raw_pctr, now_ms)
        bids = catalog.index.bid[p.rows]
        has_cvr = not fell_back and got_cvr is not None and _usable(got_cvr, len(p.rows))
        pcvr = (got_cvr.astype(np.float64) if has_cvr and got_cvr is not None
                else np.full(len(p.rows), cvr[1]))  # fmt: skip
        cpa = catalog.cpa[p.rows]
        vector = users.vectors[p.user]
        ids, rows = catalog.index.ad_ids, p.rows
        # The learners' states are read only by the policies that use them; so are the ids.
        candidates = Candidates(pctr.astype(np.float64), value_per_click(bids, cpa, pcvr), vector,
                                lambda: self.strategy.states([ids[r] for r in rows.tolist()], arm),
                                now_ms, pcvr=pcvr, cpa=cpa)  # fmt: skip
        choice = policy.choose(candidates, self.rng)
        j = choice.index
        row = int(p.rows[j])
        out.fallbacks += fell_back
        ad_id, campaign = catalog.index.ad_ids[row], catalog.campaign[row]
        model_cvr = float(pcvr[j]) if has_cvr else None
        decision = AdDecision(
            request_id=req.request_id, user_id=req.user_id, ad_id=ad_id,
            score=float(pctr[j] * candidates.bids[j]), pctr=float(pctr[j]),
            pctr_raw=float(raw_pctr[j]), pcvr=UNSET if model_cvr is None else model_cvr,
            bid=float(bids[j]), propensity=choice.propensity,
            policy=fallback.policy if fell_back else policy.name,
            model_version=version, ts=now_ms, latency_ms=0.0, placement=req.placement,
            campaign_id=campaign, billing=cast(Billing, catalog.billing[row]),
            arm=UNSET if arm is None else arm, request_ts=req.ts, candidates=len(p.rows),
            features=snapshot(catalog.ads[row], vector, req, now_ms, float(raw_pctr[j]),
                              model_cvr,
                              users.behaviours[p.user] if users.behaviours else None),
        )  # fmt: skip
        caps.record_impression(users.caps[p.user], ad_id)
        users.touched.add(p.user)
        if decision.billing == "cpm":  # cpc is charged when its click is joined
            self.budget.spend(p.raw.partition, campaign, decision.score, now_ms)
        out.by_policy[(decision.policy, req.placement)] += 1
        return req.user_id.encode(), p.raw, decision

    def _no_fill(
        self, req: AdRequest, raw: Raw, now_ms: int, why: _NoFill, out: DecideResult
    ) -> Decision:
        decision = AdDecision(
            request_id=req.request_id, user_id=req.user_id, ad_id=None, score=0.0, pctr=0.0,
            bid=0.0, propensity=1.0, policy=why.policy, model_version=why.version, ts=now_ms,
            latency_ms=0.0, no_fill_reason=why.reason, placement=req.placement,
            arm=UNSET if why.arm is None else why.arm, request_ts=req.ts,
            candidates=why.candidates,
        )  # fmt: skip
        out.no_fill[why.reason] += 1
        out.by_policy[(why.policy, req.placement)] += 1
        return req.user_id.encode(), raw, decision
