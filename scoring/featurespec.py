"""The CTR model's inputs as data: names, dtypes, shapes, and how they are built.

One :class:`FeatureSpec` is the single source of truth shared by training
(``scoring.train``), export (``scoring.model``), validation at load
(``scoring.registry``) and serving (:func:`assemble`). A model version carries
its spec as ``spec.json``; the registry refuses a model whose spec differs from
the serving one, so a model trained on another embedding seed or dimension is
caught at load, never at the first request.

Inputs (batch axis dynamic, named ``batch``):

* ``user``  float32 [B, D]: the interest vector decayed to now, L2-normalised;
  zeros for a user with no history.
* ``ad``    float32 [B, D]: the ad embedding, L2-normalised: the catalog's
  ``embedding`` if given, else ``event_embeddings(item_id, category_id, mix)``,
  else the category embedding: the same space as the interest vector.
* ``ids``   int64 [B, 4]: hash buckets of category_id, campaign_id, placement,
  device (bucket counts in :attr:`FeatureSpec.id_buckets`).
* ``dense`` float32 [B, 4]: log1p(raw interest norm), sin and cos of the hour of
  day, 1 if the user has history.

Only in a sequence model (``sequence`` > 0, scoring/attention.py):

* ``seq``   float32 [B, L, D]: the vectors of the user's last L behaviours, newest
  first, in the ad's space (:func:`item_vectors`), zero rows after the last one.
  L is dynamic (axis ``seq``): a batch is padded to its longest sequence.
  The batch axis (its own name, ``seq_batch``) may also be 1 where every row has
  the same user: the graph then takes its shared-sequence form, the same function
  about 1.5x as fast (scoring/attention.py; scores equal to the repeated rows'
  within float rounding), and :func:`assemble_many` so passes a single request's
  sequence once instead of once per candidate.

Output ``pctr`` float32 [B, 1].

Serving gathers rows: :class:`AdIndex` precomputes every ad's embedding and id
buckets once, so :func:`assemble` for one request x many candidates is a few
numpy gathers and no Python loop per candidate.

>>> spec = FeatureSpec(dim=8)
>>> ads = AdIndex.build([{"ad_id": "a", "campaign_id": "c", "category_id": 3, "bid": 1.0}], spec)
>>> x = assemble(np.ones(8, np.float32), ads.rows(["a", "a"]), ads, "top", "mobile", 0, spec)
>>> {k: (v.dtype.name, v.shape) for k, v in x.items()}["ids"]
('int64', (2, 4))
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from scoring.embeddings import DEFAULT_CACHE_ROWS, HashedEmbeddings, RowCache, event_embeddings

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
Inputs = dict[str, npt.NDArray[Any]]

SPEC_VERSION = 1
ID_FIELDS = ("category_id", "campaign_id", "placement", "device")
DENSE_FEATURES = ("log1p_interest_norm", "hour_sin", "hour_cos", "known_user")
OUTPUT = "pctr"
CVR_OUTPUT = "pcvr"  # the optional second output: pCVR after a click (scoring/model.py)
BATCH_AXIS = "batch"
SEQ_AXIS = "seq"
# seq's first axis: 1 (one request's sequence, broadcast) or the batch. A name of its own,
# so ONNX Runtime does not take it for ``batch`` and plan buffers on that equality.
SEQ_BATCH_AXIS = "seq_batch"
_DAY_MS = 24 * 3600 * 1000
_HOUR_MS = 3600 * 1000


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str  # numpy dtype name
    width: int  # the last dimension
    seq: bool = False  # [batch, seq, width] rather than [batch, width]


@dataclass(frozen=True)
class FeatureSpec:
    """What a model consumes; two specs are compatible when they are equal."""

    dim: int = 64
    embedding_seed: int = 20171125
    category_mix: float = 0.5
    id_buckets: tuple[int, ...] = (1024, 256, 32, 8)  # ID_FIELDS order
    id_fields: tuple[str, ...] = ID_FIELDS
    dense: tuple[str, ...] = DENSE_FEATURES
    output: str = OUTPUT
    version: int = SPEC_VERSION
    sequence: int = 0  # behaviours the attention block was trained on; 0: no block
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_settings(cls, s: Any) -> FeatureSpec:
        return cls(dim=s.dim, embedding_seed=s.embedding_seed, category_mix=s.category_mix)

    @property
    def inputs(self) -> tuple[InputSpec, ...]:
        return (
            InputSpec("user", "float32", self.dim),
            InputSpec("ad", "float32", self.dim),
            InputSpec("ids", "int64", len(self.id_fields)),
            InputSpec("dense", "float32", len(self.dense)),
            *((InputSpec("seq", "float32", self.dim, seq=True),) if self.sequence else ()),
        )

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    @property
    def id_offsets(self) -> tuple[int, ...]:
        """Where each id field's rows start in one concatenated embedding table."""
        return tuple(int(x) for x in np.r_[0, np.cumsum(self.id_buckets)[:-1]])

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("extra")
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FeatureSpec:
        d = json.loads(text)
        if not isinstance(d, dict):
            msg = "spec.json must hold a JSON object"
            raise ValueError(msg)
        for key in ("id_buckets", "id_fields", "dense"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def differences(self, other: FeatureSpec) -> list[str]:
        """Fields where ``other`` differs from this spec, as 'name: ours != theirs'."""
        a, b = asdict(self), asdict(other)
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if k != "extra" and a[k] != b[k]]

    def golden_inputs(self, n: int = 100, seed: int = 0) -> Inputs:
        """Deterministic, realistic inputs (unit vectors, valid buckets) for validation."""
        rng = np.random.default_rng(seed)
        user = _unit(rng.standard_normal((n, self.dim)).astype(np.float32))
        user[: max(1, n // 10)] = 0.0  # some cold users
        ad = _unit(rng.standard_normal((n, self.dim)).astype(np.float32))
        ids = np.stack([rng.integers(0, b, n) for b in self.id_buckets], axis=1).astype(np.int64)
        hour = rng.integers(0, 24, n)
        dense = np.stack(
            [
                rng.uniform(0, 3, n),
                np.sin(2 * np.pi * hour / 24),
                np.cos(2 * np.pi * hour / 24),
                (np.linalg.norm(user, axis=1) > 0).astype(np.float64),
            ],
            axis=1,
        ).astype(np.float32)
        out: Inputs = {"user": user, "ad": ad, "ids": ids, "dense": dense}
        if self.sequence:
            seq = _unit(rng.standard_normal((n, self.sequence, self.dim)).astype(np.float32))
            length = rng.integers(0, self.sequence + 1, n)  # some users with none
            seq[np.arange(self.sequence)[None, :] >= length[:, None]] = 0
            out["seq"] = seq
        return out


def _unit(x: F32) -> F32:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    out: F32 = np.divide(x, n, out=np.zeros_like(x), where=n > 0).astype(np.float32)
    return out


def item_vectors(
    table: Any, items: npt.ArrayLike, categories: npt.ArrayLike, spec: FeatureSpec
) -> F32:
    """Unit vectors of items (their category's mixed in), as an ad promoting the item gets:
    the rule behind both an ad's embedding and each behaviour of a sequence."""
    return _unit(event_embeddings(table, items, categories, spec.category_mix))


class ItemVectorCache:
    """:func:`item_vectors` through a bounded :class:`~scoring.embeddings.RowCache` keyed by
    (item, category): a decision's behaviours repeat from request to request, so each pair's
    vector is computed once while it stays among the last ``capacity`` new pairs.

    Bit-identical to :func:`item_vectors` (each row depends only on its pair; a test holds
    them to it, full and evicting). It is bound to one table and one spec's dim and mix:
    :meth:`fits` says whether it still serves them, and a new table (a text model's), seed,
    dim or mix needs a new cache.
    """

    def __init__(self, table: Any, spec: FeatureSpec, capacity: int = DEFAULT_CACHE_ROWS) -> None:
        self.table = table
        self.spec = spec
        self.rows = RowCache(spec.dim, capacity)

    def fits(self, table: Any, spec: FeatureSpec) -> bool:
        return (
            table is self.table
            and spec.dim == self.spec.dim
            and spec.category_mix == self.spec.category_mix
        )

    def __call__(self, items: npt.ArrayLike, categories: npt.ArrayLike) -> F32:
        iv = np.asarray(items, dtype=np.int64).reshape(-1)
        cv = np.asarray(categories, dtype=np.int64).reshape(-1)
        keys = list(zip(iv.tolist(), cv.tolist(), strict=True))
        return self.rows.lookup(
            keys, lambda at: item_vectors(self.table, iv[at], cv[at], self.spec)
        )


def pad_sequences(seqs: Sequence[F32 | None], spec: FeatureSpec) -> F32:
    """[R, L, D]: each request's behaviour vectors ([L_r, D], newest first) padded with zero
    rows to the longest (at most ``spec.sequence``, at least 1 so no axis is empty)."""
    lengths = [0 if s is None else min(len(s), spec.sequence) for s in seqs]
    out = np.zeros((len(seqs), max([1, *lengths]), spec.dim), dtype=np.float32)
    for i, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
        if n:
            out[i, :n] = s[:n]  # type: ignore[index]
    return out


def hash_bucket(value: str | int, field_index: int, buckets: int) -> int:
    """Stable bucket of one id value (blake2b; the same on every machine and run)."""
    key = f"{field_index}:{value}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % buckets


@dataclass(frozen=True)
class AdIndex:
    """Per-ad arrays precomputed from catalog records; a request only gathers rows.

    ``row`` maps ad_id to a row of ``embedding`` (unit vectors), ``ad_ids`` (the
    category and campaign buckets) and ``bid``. Rebuild it when the catalog
    changes (1,000 ads take a few milliseconds).
    """

    ad_ids: tuple[str, ...]
    row: Mapping[str, int]
    embedding: F32  # [N, D]
    id_buckets: I64  # [N, 2]: category, campaign
    bid: npt.NDArray[np.float64]  # [N]
    category: I64  # [N]

    def __len__(self) -> int:
        return len(self.ad_ids)

    def rows(self, ad_ids: Iterable[str]) -> I64:
        """Row numbers of these ads; unknown ids are skipped (the caller filters first)."""
        got = [r for r in map(self.row.get, ad_ids) if r is not None]  # one lookup per id
        return np.array(got, dtype=np.int64)

    @classmethod
    def build(cls, ads: Sequence[Mapping[str, Any]], spec: FeatureSpec) -> AdIndex:
        """From ad-catalog records (dicts in the schema's shape)."""
        n = len(ads)
        table = HashedEmbeddings(spec.dim, spec.embedding_seed)
        cat = np.array([int(a["category_id"]) for a in ads], dtype=np.int64)
        emb = table.categories(cat) if n else np.zeros((0, spec.dim), np.float32)
        with_item = np.array([i for i, a in enumerate(ads) if "item_id" in a], dtype=np.int64)
        if len(with_item):
            items = np.array([int(ads[i]["item_id"]) for i in with_item], dtype=np.int64)
            emb[with_item] = event_embeddings(table, items, cat[with_item], spec.category_mix)
        for i, a in enumerate(ads):
            given = a.get("embedding")
            if given is not None:
                if len(given) != spec.dim:
                    msg = (
                        f"ad {a['ad_id']!r}: embedding has {len(given)} values but the model "
                        f"expects dim={spec.dim}; fix the catalog or ADPULSE_DIM"
                    )
                    raise ValueError(msg)
                emb[i] = np.asarray(given, dtype=np.float32)
        cat_b, camp_b = spec.id_buckets[0], spec.id_buckets[1]
        ids = np.array(
            [
                (
                    hash_bucket(int(a["category_id"]), 0, cat_b),
                    hash_bucket(a["campaign_id"], 1, camp_b),
                )
                for a in ads
            ],
            dtype=np.int64,
        ).reshape(n, 2)
        ad_ids = tuple(str(a["ad_id"]) for a in ads)
        return cls(
            ad_ids=ad_ids,
            row={a: i for i, a in enumerate(ad_ids)},
            embedding=_unit(emb.astype(np.float32)),
            id_buckets=ids,
            bid=np.array([float(a["bid"]) for a in ads], dtype=np.float64),
            category=cat,
        )


class ContextBuckets:
    """Cached buckets of the low-cardinality request fields (placement, device)."""

    def __init__(self, spec: FeatureSpec) -> None:
        self._spec = spec
        self._cache: dict[tuple[int, str], int] = {}

    def bucket(self, field_index: int, value: str | None) -> int:
        key = (field_index, value or "")
        b = self._cache.get(key)
        if b is None:
            b = hash_bucket(value or "", field_index, self._spec.id_buckets[field_index])
            self._cache[key] = b
        return b


_CONTEXT: dict[FeatureSpec, ContextBuckets] = {}


def user_features(interest: npt.ArrayLike | None, dim: int) -> tuple[F32, float]:
    """(L2-normalised vector, raw norm) of a decayed interest vector; zeros if unknown."""
    if interest is None:
        return np.zeros(dim, dtype=np.float32), 0.0
    v = np.asarray(interest, dtype=np.float32)
    if v.size == 0:
        return np.zeros(dim, dtype=np.float32), 0.0
    norm = float(np.linalg.norm(v))
    if not math.isfinite(norm) or norm == 0.0:
        return np.zeros(dim, dtype=np.float32), 0.0
    return (v / np.float32(norm)).astype(np.float32), norm


def hour_of(ts_ms: int) -> int:
    """Hour of day (UTC) of an epoch-ms time."""
    return int((ts_ms % _DAY_MS) // _HOUR_MS)


def dense_row(norm: float, hour: int) -> F32:
    """The dense features of one request (see DENSE_FEATURES)."""
    angle = 2.0 * math.pi * hour / 24.0
    return np.array(
        [math.log1p(norm), math.sin(angle), math.cos(angle), 1.0 if norm > 0 else 0.0],
        dtype=np.float32,
    )


def assemble(
    interest: npt.ArrayLike | None,
    rows: I64,
    ads: AdIndex,
    placement: str,
    device: str | None,
    ts_ms: int,
    spec: FeatureSpec,
) -> Inputs:
    """Model inputs for one request x ``len(rows)`` candidate ads (rows of ``ads``).

    ``interest`` is the user's vector decayed to the request time (None or empty
    for an unknown user). Costs a few numpy gathers, no loop over candidates.
    """
    n = len(rows)
    ctx = _CONTEXT.get(spec)
    if ctx is None:
        ctx = _CONTEXT.setdefault(spec, ContextBuckets(spec))
    u, norm = user_features(interest, spec.dim)
    ids = np.empty((n, 4), dtype=np.int64)
    ids[:, :2] = ads.id_buckets[rows]
    ids[:, 2] = ctx.bucket(2, placement)
    ids[:, 3] = ctx.bucket(3, device)
    return {
        "user": np.broadcast_to(u, (n, spec.dim)).copy(),
        "ad": ads.embedding[rows],
        "ids": ids,
        "dense": np.broadcast_to(dense_row(norm, hour_of(ts_ms)), (n, len(spec.dense))).copy(),
    }


@dataclass(frozen=True)
class RequestFeatures:
    """What one request contributes to a batch: its user, context and candidate rows."""

    interest: npt.ArrayLike | None
    rows: I64
    placement: str
    device: str | None
    sequence: F32 | None = None  # [L, D] behaviour vectors, newest first (sequence models)


def assemble_many(
    requests: Sequence[RequestFeatures], ads: AdIndex, ts_ms: int, spec: FeatureSpec
) -> Inputs:
    """Model inputs for many requests at once, rows in request order.

    Equal to concatenating :func:`assemble` per request (a test holds them to
    it), with one gather per input instead of a few per request: the decision
    stage scores a whole fetched batch of requests in one session run (a sequence
    model's, one request at a time: :func:`assemble_each`).
    """
    out = _rows(requests, ads, ts_ms, spec)
    if spec.sequence:  # one request: one [1, L, D] row the graph broadcasts (module doc)
        seq = pad_sequences([r.sequence for r in requests], spec)
        out["seq"] = seq if len(requests) == 1 else np.repeat(seq, _counts(requests), axis=0)
    return out


def assemble_each(
    requests: Sequence[RequestFeatures], ads: AdIndex, ts_ms: int, spec: FeatureSpec
) -> list[Inputs]:
    """A sequence model's inputs, one run per request: each equal to ``assemble_many([r])``.

    Why: each request must send its sequence once ([1, L_r, D], the graph's
    shared-sequence form), so it runs alone; assembled alone too, the fixed cost of
    the gathers came once per request. Here the candidate rows of all requests are
    gathered once and each run gets views of its rows (contiguous slices, no copy). The
    decision call's CPU per request fell about 5% at 8-32 requests a call
    (docs/performance.md, "Where the Kafka path's time goes, and one assembly for a
    batch's sequence runs").
    """
    rows = _rows(requests, ads, ts_ms, spec)
    out: list[Inputs] = []
    start = 0
    for r in requests:
        end = start + len(r.rows)
        one = {k: v[start:end] for k, v in rows.items()}
        one["seq"] = pad_sequences([r.sequence], spec)
        out.append(one)
        start = end
    return out


def _counts(requests: Sequence[RequestFeatures]) -> I64:
    """Candidate rows of each request."""
    return np.fromiter((len(r.rows) for r in requests), np.int64, len(requests))


def _rows(
    requests: Sequence[RequestFeatures], ads: AdIndex, ts_ms: int, spec: FeatureSpec
) -> Inputs:
    """Every input but the sequence, rows in request order."""
    ctx = _CONTEXT.get(spec)
    if ctx is None:
        ctx = _CONTEXT.setdefault(spec, ContextBuckets(spec))
    counts = _counts(requests)
    rows = np.concatenate([r.rows for r in requests]) if requests else np.zeros(0, np.int64)
    users = np.zeros((len(requests), spec.dim), dtype=np.float32)
    per_req = np.zeros((len(requests), 2), dtype=np.int64)
    dense = np.empty((len(requests), len(spec.dense)), dtype=np.float32)
    hour = hour_of(ts_ms)
    for i, r in enumerate(requests):
        users[i], norm = user_features(r.interest, spec.dim)
        per_req[i] = ctx.bucket(2, r.placement), ctx.bucket(3, r.device)
        dense[i] = dense_row(norm, hour)
    ids = np.empty((len(rows), 4), dtype=np.int64)
    ids[:, :2] = ads.id_buckets[rows]
    ids[:, 2:] = np.repeat(per_req, counts, axis=0)
    return {
        "user": np.repeat(users, counts, axis=0),
        "ad": ads.embedding[rows],
        "ids": ids,
        "dense": np.repeat(dense, counts, axis=0),
    }


def from_feedback(records: Sequence[Mapping[str, Any]], spec: FeatureSpec) -> Inputs:
    """Model inputs for logged ctr-feedback records: the training side of :func:`assemble`.

    The ad is rebuilt from the snapshot's category_id (and item_id when logged),
    the request context from placement, device and hour (hour from decision_ts
    when absent), so a logged row and a served row go through the same maths.
    """
    n = len(records)
    table = HashedEmbeddings(spec.dim, spec.embedding_seed)
    user = np.zeros((n, spec.dim), dtype=np.float32)
    dense = np.zeros((n, len(spec.dense)), dtype=np.float32)
    ids = np.zeros((n, 4), dtype=np.int64)
    cat = np.zeros(n, dtype=np.int64)
    item = np.full(n, -1, dtype=np.int64)
    cache: dict[tuple[int, str | int], int] = {}

    def bucket(i: int, v: str | int) -> int:
        b = cache.get((i, v))
        if b is None:
            b = cache[(i, v)] = hash_bucket(v, i, spec.id_buckets[i])
        return b

    for r, rec in enumerate(records):
        f = rec["features"]
        interest = f.get("interest") or None
        if interest is not None and len(interest) != spec.dim:
            msg = (
                f"record {rec.get('decision_id')!r}: interest has {len(interest)} values, "
                f"dim={spec.dim}"
            )
            raise ValueError(msg)
        u, norm = user_features(interest, spec.dim)
        user[r] = u
        hour = f.get("hour")
        dense[r] = dense_row(norm, hour_of(int(rec["decision_ts"])) if hour is None else int(hour))
        cat[r] = int(f.get("category_id", 0))
        item[r] = int(f.get("item_id", -1))
        ids[r] = (
            bucket(0, int(cat[r])),
            bucket(1, f.get("campaign_id", "")),
            bucket(2, f.get("placement", "")),
            bucket(3, f.get("device", "")),
        )
    ad = table.categories(cat) if n else np.zeros((0, spec.dim), np.float32)
    has_item = item >= 0
    if has_item.any():
        ad[has_item] = event_embeddings(table, item[has_item], cat[has_item], spec.category_mix)
    out: Inputs = {"user": user, "ad": _unit(ad), "ids": ids, "dense": dense}
    if spec.sequence:  # features.sequence: [[item_id, category_id], ...], newest first
        pairs = [np.asarray(r["features"].get("sequence") or np.zeros((0, 2)), np.int64)
                 for r in records]  # fmt: skip
        out["seq"] = pad_sequences(
            [item_vectors(table, p[:, 0], p[:, 1], spec) if len(p) else None for p in pairs], spec
        )
    return out


def concat(parts: Sequence[Inputs]) -> Inputs:
    """Stack several requests' inputs into one batch (same keys, row-wise)."""
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
