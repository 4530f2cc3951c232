"""Interest-vector algebra: the per-user state, its batch update and the reference.

A user's interest at time t is v(t) = sum_i w(kind_i) * exp(-(t - t_i)/tau) * e_i
(exponential time decay, tau = half_life / ln 2). We store v at a reference time
``t_ref`` = the latest event time seen; a new event at ``t >= t_ref`` rescales
the stored vector by exp(-(t - t_ref)/tau) and adds its term, a late event
(t < t_ref) adds w * exp(-(t_ref - t)/tau) * e. Both are exact, so the stored
state does not depend on arrival order (up to float rounding): a late event is
applied exactly, not approximately. Exponents are never positive, so nothing
overflows however old the data.

State is one fixed-size numpy record per user (``state_dtype``): compact
(~412 bytes at d = 64), decoded and encoded for a whole batch at once, and
dedupe lives in the same record as the vector it protects, so one table write
changes both together (the broker has no transactions; see README "Guarantees").

Everything here is pure numpy: no Kafka, no Faust. ``reference_vectors`` is the
one-batch recompute the streaming update is tested against.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from scoring.embeddings import EmbeddingTable, event_embeddings

KINDS = ("browse", "click", "cart", "fav", "purchase")
KIND_INDEX = {k: i for i, k in enumerate(KINDS)}
STATE_VERSION = 1
NO_TIME = np.iinfo(np.int64).min  # t_ref of a user with no event yet

# Outcomes of one event in apply_batch.
APPLIED, DUPLICATE, REDELIVERED = 0, 1, 2
OUTCOMES = ("applied", "duplicate", "redelivered")

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]


@dataclass(frozen=True)
class InterestParams:
    """The maths' knobs; built from Settings by the stage that owns the table."""

    dim: int = 64
    half_life_ms: float = 24 * 3600 * 1000.0
    kind_weights: tuple[float, ...] = (1.0, 2.0, 4.0, 3.0, 6.0)  # KINDS order
    category_mix: float = 0.5
    top_k: int = 4
    ring: int = 8
    dedupe_ttl_ms: int = 24 * 3600 * 1000

    @property
    def tau_ms(self) -> float:
        return self.half_life_ms / math.log(2.0)

    @classmethod
    def from_settings(cls, s: Any) -> InterestParams:
        return cls(
            dim=s.dim,
            half_life_ms=s.half_life_h * 3600 * 1000.0,
            kind_weights=tuple(s.kind_weights),
            category_mix=s.category_mix,
            top_k=s.top_categories,
            ring=s.dedupe_ids,
            dedupe_ttl_ms=s.dedupe_ttl_h * 3600 * 1000,
        )


def state_dtype(p: InterestParams) -> np.dtype[Any]:
    """Layout of one user's state; little-endian and packed so bytes are portable."""
    return np.dtype(
        [
            ("version", "u1"),
            ("flags", "u1", (3,)),
            ("arrived_min", "<u4"),  # processing time of the last arrival, minutes since epoch
            ("t_ref", "<i8"),  # latest event time seen (ms); NO_TIME if none
            ("offset", "<i8"),  # highest source offset applied; -1 if none
            ("counts", "<u4", (len(KINDS),)),
            ("top_ids", "<i8", (p.top_k,)),  # -1 = empty slot
            ("top_w", "<f4", (p.top_k,)),  # decayed weight at t_ref
            ("ring", "<u8", (p.ring,)),  # recent event-id fingerprints, newest last; 0 = empty
            ("vec", "<f4", (p.dim,)),  # interest vector at t_ref
        ]
    )


def empty_states(n: int, p: InterestParams) -> npt.NDArray[Any]:
    s = np.zeros(n, dtype=state_dtype(p))
    s["version"] = STATE_VERSION
    s["t_ref"] = NO_TIME
    s["offset"] = -1
    s["top_ids"] = -1
    return s


def decode_states(values: list[bytes | None], p: InterestParams) -> npt.NDArray[Any]:
    """Records for stored values, an empty state where a value is None."""
    dt = state_dtype(p)
    out = empty_states(len(values), p)
    present = [i for i, v in enumerate(values) if v is not None]
    if present:
        raw = b"".join(values[i] for i in present)  # type: ignore[misc]
        if len(raw) != dt.itemsize * len(present):
            msg = f"stored interest state has wrong size for dim={p.dim}: was the dim changed?"
            raise ValueError(msg)
        out[present] = np.frombuffer(raw, dtype=dt)
    return out


def encode_states(states: npt.NDArray[Any]) -> list[bytes]:
    raw = states.tobytes()
    n = states.dtype.itemsize
    return [raw[i : i + n] for i in range(0, len(raw), n)]


@dataclass(frozen=True)
class EventBatch:
    """Columns of N validated events; ``user`` indexes the states array passed with it."""

    user: I64
    kind: npt.NDArray[np.uint8]
    item: I64
    category: I64
    ts: I64
    fingerprint: U64  # 64-bit hash of event_id, never 0
    offset: I64  # source offset, or -1 where unknown


def apply_batch(
    states: npt.NDArray[Any],
    batch: EventBatch,
    table: EmbeddingTable,
    p: InterestParams,
    now_ms: int = 0,
) -> tuple[npt.NDArray[Any], npt.NDArray[np.uint8]]:
    """New states for the users of one batch, and each event's outcome code.

    One pass of numpy over the whole batch: events are grouped by user (stable,
    so arrival order within a user is kept for dedupe), redeliveries (offset at
    or below the user's applied offset) and duplicates (fingerprint in the user's
    ring or earlier in the batch) are dropped, and the rest are folded in exactly.

    The ring holds the ids of a user's last K arrivals and is forgotten when the
    user had no arrival for ``dedupe_ttl_ms`` of processing time (``now_ms``).
    Expiring by event time instead would forget the id of a late event at once
    and let its duplicate through.
    """
    n = len(batch.user)
    outcome = np.full(n, APPLIED, dtype=np.uint8)
    new = states.copy()
    if n == 0:
        return new, outcome
    order = np.argsort(batch.user, kind="stable")
    user, fp, ts, off = (
        batch.user[order],
        batch.fingerprint[order],
        batch.ts[order],
        batch.offset[order],
    )
    out_sorted = np.full(n, APPLIED, dtype=np.uint8)

    redelivered = (off >= 0) & (off <= new["offset"][user])
    out_sorted[redelivered] = REDELIVERED
    live = ~redelivered

    now_min = max(0, now_ms // 60_000)
    stale = now_min - new["arrived_min"].astype(np.int64) > p.dedupe_ttl_ms // 60_000
    new["ring"][stale] = 0
    new["arrived_min"][np.unique(user)] = now_min

    in_ring = (new["ring"][user] == fp[:, None]).any(axis=1) & live
    # Earlier in this batch: same user and fingerprint at a lower arrival index.
    by_fp = np.lexsort((np.arange(n), fp, user))
    same = np.zeros(n, dtype=bool)
    same[by_fp[1:]] = (user[by_fp[1:]] == user[by_fp[:-1]]) & (fp[by_fp[1:]] == fp[by_fp[:-1]])
    dup = (in_ring | same) & live
    out_sorted[dup] = DUPLICATE
    acc = live & ~dup
    outcome[order] = out_sorted

    applied_offsets = np.where(off >= 0, off, -1)
    np.maximum.at(new["offset"], user, applied_offsets)
    if not acc.any():
        return new, outcome

    a_user, a_ts, a_fp = user[acc], ts[acc], fp[acc]
    a_kind = batch.kind[order][acc]
    a_item, a_cat = batch.item[order][acc], batch.category[order][acc]
    starts = np.flatnonzero(np.r_[True, a_user[1:] != a_user[:-1]])
    ua = a_user[starts]
    counts_per_u = np.diff(np.r_[starts, len(a_user)])

    t_prev = new["t_ref"][ua]
    t_new = np.maximum(t_prev, np.maximum.reduceat(a_ts, starts))
    tau = p.tau_ms
    fresh = t_prev == NO_TIME
    keep_old = np.where(fresh, 0.0, np.exp(-(t_new - np.where(fresh, t_new, t_prev)) / tau))

    weights = np.asarray(p.kind_weights, dtype=np.float64)[a_kind]
    t_of_event = np.repeat(t_new, counts_per_u)
    contrib = weights * np.exp(-(t_of_event - a_ts) / tau)
    e = event_embeddings(table, a_item, a_cat, p.category_mix).astype(np.float64)
    sums = np.add.reduceat(e * contrib[:, None], starts, axis=0)
    new["vec"][ua] = (new["vec"][ua].astype(np.float64) * keep_old[:, None] + sums).astype(
        np.float32
    )
    new["t_ref"][ua] = t_new
    new["counts"][ua] += (
        np.bincount(
            np.repeat(np.arange(len(ua)), counts_per_u) * len(KINDS) + a_kind,
            minlength=len(ua) * len(KINDS),
        )
        .reshape(len(ua), len(KINDS))
        .astype(np.uint32)
    )

    _update_top(new, ua, keep_old, np.repeat(np.arange(len(ua)), counts_per_u), a_cat, contrib, p)
    _update_ring(new, ua, counts_per_u, a_fp, p)
    return new, outcome


def _update_top(
    new: npt.NDArray[Any],
    ua: I64,
    keep_old: npt.NDArray[np.float64],
    group: I64,
    cat: I64,
    contrib: npt.NDArray[np.float64],
    p: InterestParams,
) -> None:
    """Keep the k heaviest categories per user (heavy-hitters summary).

    Exact while a user has touched at most k categories; beyond that a category
    evicted earlier restarts from zero when it returns (Space-Saving style,
    Metwally et al., ICDT 2005), so small weights may be under-counted.
    """
    k = p.top_k
    old_ids = new["top_ids"][ua]
    old_w = new["top_w"][ua].astype(np.float64) * keep_old[:, None]
    g = np.concatenate([np.repeat(np.arange(len(ua)), k), group])
    ids = np.concatenate([old_ids.ravel(), cat])
    w = np.concatenate([old_w.ravel(), contrib])
    real = ids >= 0
    g, ids, w = g[real], ids[real], w[real]
    o = np.lexsort((ids, g))
    g, ids, w = g[o], ids[o], w[o]
    first = np.r_[True, (g[1:] != g[:-1]) | (ids[1:] != ids[:-1])]
    starts = np.flatnonzero(first)
    g, ids, w = g[starts], ids[starts], np.add.reduceat(w, starts)
    o = np.lexsort((ids, -w, g))
    g, ids, w = g[o], ids[o], w[o]
    group_start = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    rank = np.arange(len(g)) - np.repeat(group_start, np.diff(np.r_[group_start, len(g)]))
    keep = rank < k
    top_ids = np.full((len(ua), k), -1, dtype=np.int64)
    top_w = np.zeros((len(ua), k), dtype=np.float32)
    top_ids[g[keep], rank[keep]] = ids[keep]
    top_w[g[keep], rank[keep]] = w[keep]
    new["top_ids"][ua] = top_ids
    new["top_w"][ua] = top_w


def _update_ring(new: npt.NDArray[Any], ua: I64, n_new: I64, fps: U64, p: InterestParams) -> None:
    """Append each user's accepted fingerprints (arrival order) and keep the newest K."""
    k = p.ring
    old = new["ring"][ua]
    src = np.arange(k)[None, :] + n_new[:, None]
    ring = np.where(src < k, np.take_along_axis(old, np.minimum(src, k - 1), axis=1), 0)
    group = np.repeat(np.arange(len(ua)), n_new)
    pos = np.arange(len(fps)) - np.repeat(np.r_[0, np.cumsum(n_new)[:-1]], n_new)
    from_end = np.repeat(n_new, n_new) - 1 - pos
    recent = from_end < k
    ring[group[recent], k - 1 - from_end[recent]] = fps[recent]
    new["ring"][ua] = ring.astype(np.uint64)


def fingerprint(event_id: str) -> int:
    """Stable 64-bit hash of an event id (never 0, the ring's empty mark).

    64 bits keep a false "duplicate" among a user's last K ids at K / 2**64.
    """
    h = int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little")
    return h or 1


def vectors_at(
    states: npt.NDArray[Any], t_ms: int, p: InterestParams
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """The states' interest vectors decayed to time ``t_ms`` (no growth for t before
    t_ref), and which states have any history (the others' vectors are zeros)."""
    known = states["t_ref"] != NO_TIME
    age = np.where(known, np.maximum(0, t_ms - np.where(known, states["t_ref"], t_ms)), 0)
    scale = np.where(known, np.exp(-age / p.tau_ms), 0.0).astype(np.float32)
    return (states["vec"] * scale[:, None]).astype(np.float32), known


def vector_at(state: npt.NDArray[Any], t_ms: int, p: InterestParams) -> npt.NDArray[np.float32]:
    """One state's interest vector decayed to time ``t_ms`` (:func:`vectors_at`)."""
    vecs, _ = vectors_at(np.asarray(state).reshape(1), t_ms, p)
    one: npt.NDArray[np.float32] = vecs[0]
    return one


def describe(state: npt.NDArray[Any], now_ms: int, p: InterestParams) -> dict[str, Any]:
    """A user's state as JSON-ready data for operators (HTTP endpoint)."""
    t_ref = int(state["t_ref"])
    top = [
        {"category_id": int(c), "weight": float(w)}
        for c, w in zip(state["top_ids"], state["top_w"], strict=True)
        if c >= 0
    ]
    return {
        "last_seen_ts": None if t_ref == NO_TIME else t_ref,
        "reference_ts": None if t_ref == NO_TIME else t_ref,
        "vector_at_reference": [float(x) for x in state["vec"]],
        "vector_now": [float(x) for x in vector_at(state, now_ms, p)],
        "counts": {k: int(c) for k, c in zip(KINDS, state["counts"], strict=True)},
        "top_categories": top,
        "applied_offset": int(state["offset"]),
    }


def reference_vectors(
    events: Iterable[Mapping[str, Any]], table: EmbeddingTable, p: InterestParams
) -> dict[str, tuple[int, npt.NDArray[np.float64], dict[str, int]]]:
    """The oracle: user -> (latest ts, v(latest ts), counts), recomputed from scratch.

    Duplicates (same user and event_id) count once; order is irrelevant by
    construction. Float64 throughout, so it is the yardstick for the float32
    streaming state.
    """
    seen: set[tuple[str, str]] = set()
    by_user: dict[str, list[Mapping[str, Any]]] = {}
    for ev in events:
        key = (ev["user_id"], ev["event_id"])
        if key in seen:
            continue
        seen.add(key)
        by_user.setdefault(ev["user_id"], []).append(ev)
    out = {}
    for user, evs in by_user.items():
        t = max(int(e["ts"]) for e in evs)
        e = event_embeddings(
            table,
            np.array([x["item_id"] for x in evs]),
            np.array([x["category_id"] for x in evs]),
            p.category_mix,
        ).astype(np.float64)
        w = np.array([p.kind_weights[KIND_INDEX[x["kind"]]] for x in evs])
        dt = np.array([t - int(x["ts"]) for x in evs], dtype=np.float64)
        v = (w * np.exp(-dt / p.tau_ms)) @ e
        counts = {k: sum(1 for x in evs if x["kind"] == k) for k in KINDS}
        out[user] = (t, v, counts)
    return out
