"""Interest-vector algebra: the per-user state, its batch update and the reference.

A user's interest at time t is v(t) = sum_i w(kind_i) * exp(-(t - t_i)/tau) * e_i
(exponential time decay, tau = half_life / ln 2). We store v at a reference time
``t_ref`` = the latest event time seen; a new event at ``t >= t_ref`` rescales
the stored vector by exp(-(t - t_ref)/tau) and adds its term, a late event
(t < t_ref) adds w * exp(-(t_ref - t)/tau) * e. Both are exact, so the stored
state does not depend on arrival order (up to float rounding): a late event is
applied exactly, not approximately. Exponents are never positive, so nothing
overflows however old the data.

State is one record per user (scoring/staterecord.py: its layout, encoding and
versions): the vector, counters, dedupe memory and each category's decayed
weight. Dedupe lives in the same record as the vector it protects, so one table
write changes both together (the broker has no transactions; see docs/guarantees.md,
"Guarantees"). The top categories are the heaviest entries of the weight map,
updated exactly as the vector is, so they are exact too, not a heavy-hitters
estimate (:func:`_update_categories`).

Everything here is pure numpy: no Kafka, no Faust. ``reference_vectors`` is the
one-batch recompute the streaming update is tested against.

With item text (``ADPULSE_TEXT_MODEL``), the state also keeps each item's decayed
weight, and the vector read is the stored one with each item's text vector in
place of its fallback, looked up at read time so an item's text counts whenever
it arrives (scoring/itemspace.py; :func:`apply_events`, :func:`read_vectors`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from scoring.arrays import append, prepend
from scoring.embeddings import EmbeddingTable, event_embeddings
from scoring.itemspace import ItemVectors, corrections, update_items
from scoring.staterecord import (
    CATEGORY_DTYPE,
    KIND_INDEX,
    KINDS,
    NO_TIME,
    STATE_VERSION,
    Categories,
    InterestParams,
    Items,
    _fill_top,
    decode_all,
    decode_heads,
    decode_records,
    decode_states,
    empty_states,
    encode_states,
    header_dtype,
    state_dtype,
)
from scoring.weightmap import merge_weights

__all__ = [  # the state record's names too (scoring/staterecord.py), for existing importers
    "APPLIED", "CATEGORY_DTYPE", "DUPLICATE", "KINDS", "KIND_INDEX", "NO_TIME", "OUTCOMES",
    "REDELIVERED", "STATE_VERSION", "Categories", "EventBatch", "InterestParams", "ItemVectors",
    "Items", "apply_batch", "apply_events", "decode_all", "decode_heads", "decode_records",
    "decode_states", "describe", "empty_states", "encode_states", "fingerprint", "header_dtype",
    "read_vectors", "reference_categories", "reference_vectors", "state_dtype", "vector_at",
    "vectors_at",
]  # fmt: skip

# Outcomes of one event in apply_batch.
APPLIED, DUPLICATE, REDELIVERED = 0, 1, 2
OUTCOMES = ("applied", "duplicate", "redelivered")

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]


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
    cats: Categories,
    batch: EventBatch,
    table: EmbeddingTable,
    p: InterestParams,
    now_ms: int = 0,
) -> tuple[npt.NDArray[Any], Categories, npt.NDArray[np.uint8]]:
    """:func:`apply_events` for states without item maps (no text model)."""
    new, cats, _, outcome = apply_events(
        states, cats, Items.empty(len(states)), batch, table, p, now_ms
    )
    return new, cats, outcome


def apply_events(
    states: npt.NDArray[Any],
    cats: Categories,
    items: Items,
    batch: EventBatch,
    table: EmbeddingTable,
    p: InterestParams,
    now_ms: int = 0,
) -> tuple[npt.NDArray[Any], Categories, Items, npt.NDArray[np.uint8]]:
    """New states, category and item maps for the users of one batch, and each event's outcome.

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
        return new, cats, items, outcome
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
        return new, cats, items, outcome

    a_user, a_ts, a_fp = user[acc], ts[acc], fp[acc]
    a_kind = batch.kind[order][acc]
    a_item, a_cat = batch.item[order][acc], batch.category[order][acc]
    starts = np.flatnonzero(prepend(True, a_user[1:] != a_user[:-1]))
    ua = a_user[starts]
    counts_per_u = np.diff(append(starts, len(a_user)))

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

    group = np.repeat(np.arange(len(ua)), counts_per_u)
    cats = _update_categories(new, cats, ua, keep_old, group, a_cat, contrib, p)
    items = update_items(items, ua, keep_old, group, a_item, a_cat, contrib, p)
    _fill_top(new, cats, p)
    _update_ring(new, ua, counts_per_u, a_fp, p)
    return new, cats, items, outcome


def _update_categories(
    new: npt.NDArray[Any],
    cats: Categories,
    ua: I64,
    keep_old: npt.NDArray[np.float64],
    group: I64,
    cat: I64,
    contrib: npt.NDArray[np.float64],
    p: InterestParams,
) -> Categories:
    """Every category's decayed weight, updated for the users ``ua`` (rows of ``new``).

    A category's weight at t_ref is the sum of its events' decayed weights, kept
    exactly as the vector is (rescaled to a new t_ref, late events added decayed),
    so the map, and the top categories read off it, do not depend on arrival
    order. Two rules bound its size; each adds what it drops to ``dropped`` (decayed
    with the state), so ``dropped`` bounds how far any weight is below the exact
    sum:

    * a category whose weight fell under ``category_floor`` (2**-20 of the lightest
      event, 20 half-lives) is dropped: what it loses is below float32 resolution
      of the weights that matter, whatever the order;
    * past ``category_limit`` categories the lightest go (ties: larger id first).
      Only then does order matter: an evicted category that returns restarts from
      zero (the Space-Saving trade, Metwally et al., ICDT 2005).

    The rule itself is scoring/weightmap.py's, shared with the item map.
    """
    start, (ids,), w, lost = merge_weights(
        cats.start, [cats.ids], cats.w, ua, keep_old, group, [cat], contrib,
        p.category_floor, p.category_limit,
    )  # fmt: skip
    new["dropped"][ua] = (new["dropped"][ua].astype(np.float64) * keep_old + lost).astype(
        np.float32
    )
    new["ncat"] = np.diff(start)
    return Categories(start, ids, w)


def _update_ring(new: npt.NDArray[Any], ua: I64, n_new: I64, fps: U64, p: InterestParams) -> None:
    """Append each user's accepted fingerprints (arrival order) and keep the newest K."""
    k = p.ring
    old = new["ring"][ua]
    src = np.arange(k)[None, :] + n_new[:, None]
    ring = np.where(src < k, np.take_along_axis(old, np.minimum(src, k - 1), axis=1), 0)
    group = np.repeat(np.arange(len(ua)), n_new)
    pos = np.arange(len(fps)) - np.repeat(prepend(0, np.cumsum(n_new)[:-1]), n_new)
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
    states: npt.NDArray[Any],
    t_ms: int,
    p: InterestParams,
    extra: npt.NDArray[np.float64] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """The states' interest vectors decayed to time ``t_ms`` (no growth for t before
    t_ref), and which states have any history (the others' vectors are zeros).
    ``extra``: what the item vectors add at t_ref (scoring/itemspace.py, ``corrections``)."""
    known = states["t_ref"] != NO_TIME
    age = np.maximum(0, t_ms - np.where(known, states["t_ref"], t_ms))  # 0 where unknown
    if extra is None:
        scale = np.where(known, np.exp(-age / p.tau_ms), 0.0).astype(np.float32)
        return (states["vec"] * scale[:, None]).astype(np.float32), known
    scale64 = np.where(known, np.exp(-age / p.tau_ms), 0.0)
    vec = states["vec"].astype(np.float64) + extra
    return (vec * scale64[:, None]).astype(np.float32), known


def read_vectors(
    values: list[bytes | None], t_ms: int, p: InterestParams, items: ItemVectors | None
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Stored records -> states, their vectors at ``t_ms`` with the item vectors in force
    now, and which states have history: what decisions and the lookup read. Without item
    vectors the states are only their stored headers (:func:`decode_heads`: no weight maps
    decoded, no top categories filled in), all a vector needs."""
    if items is None:
        heads = decode_heads(values, p)
        return (heads, *vectors_at(heads, t_ms, p))
    states, _, item_maps = decode_all(values, p)
    return (states, *vectors_at(states, t_ms, p, corrections(item_maps, items, p.dim)))


def vector_at(state: npt.NDArray[Any], t_ms: int, p: InterestParams) -> npt.NDArray[np.float32]:
    """One state's interest vector decayed to time ``t_ms`` (:func:`vectors_at`)."""
    vecs, _ = vectors_at(np.asarray(state).reshape(1), t_ms, p)
    one: npt.NDArray[np.float32] = vecs[0]
    return one


def describe(
    state: npt.NDArray[Any],
    now_ms: int,
    p: InterestParams,
    extra: npt.NDArray[np.float64] | None = None,
) -> dict[str, Any]:
    """A user's state as JSON-ready data for operators (HTTP endpoint); ``extra``: what its
    item vectors add at t_ref (the vectors shown are then the ones decisions read)."""
    t_ref = int(state["t_ref"])
    one = np.asarray(state).reshape(1)
    ex = None if extra is None else np.asarray(extra, dtype=np.float64).reshape(1, -1)
    at_ref = one["vec"][0] if ex is None else (one["vec"][0].astype(np.float64) + ex[0])
    now = vectors_at(one, now_ms, p, ex)[0][0]
    top = [
        {"category_id": int(c), "weight": float(w)}
        for c, w in zip(state["top_ids"], state["top_w"], strict=True)
        if c >= 0
    ]
    return {
        "last_seen_ts": None if t_ref == NO_TIME else t_ref,
        "reference_ts": None if t_ref == NO_TIME else t_ref,
        "vector_at_reference": [float(x) for x in at_ref],
        "vector_now": [float(x) for x in now],
        "counts": {k: int(c) for k, c in zip(KINDS, state["counts"], strict=True)},
        "top_categories": top,
        # How far any listed weight may be below the exact decayed sum (0.0: exact).
        "top_categories_error": float(state["dropped"]),
        "applied_offset": int(state["offset"]),
    }


def reference_vectors(
    events: Iterable[Mapping[str, Any]],
    table: EmbeddingTable,
    p: InterestParams,
    items: Mapping[int, npt.ArrayLike] | None = None,
) -> dict[str, tuple[int, npt.NDArray[np.float64], dict[str, int]]]:
    """The oracle: user -> (latest ts, v(latest ts), counts), recomputed from scratch.

    Duplicates (same user and event_id) count once; order is irrelevant by
    construction. Float64 throughout, so it is the yardstick for the float32
    streaming state. ``items``: item id -> its text vector (``dim``-d), which replaces
    the item's fallback in every event of it (scoring/itemspace.py).
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
        for row, x in enumerate(evs):
            if items is not None and int(x["item_id"]) in items:
                e[row] = np.asarray(items[int(x["item_id"])], dtype=np.float64)
        w = np.array([p.kind_weights[KIND_INDEX[x["kind"]]] for x in evs])
        dt = np.array([t - int(x["ts"]) for x in evs], dtype=np.float64)
        v = (w * np.exp(-dt / p.tau_ms)) @ e
        counts = {k: sum(1 for x in evs if x["kind"] == k) for k in KINDS}
        out[user] = (t, v, counts)
    return out


def reference_categories(
    events: Iterable[Mapping[str, Any]], p: InterestParams
) -> dict[str, dict[int, float]]:
    """The oracle of the category map: user -> category -> decayed weight at the user's
    latest event time, float64, recomputed from scratch (duplicates count once)."""
    seen: set[tuple[str, str]] = set()
    by_user: dict[str, list[Mapping[str, Any]]] = {}
    for ev in events:
        key = (ev["user_id"], ev["event_id"])
        if key not in seen:
            seen.add(key)
            by_user.setdefault(ev["user_id"], []).append(ev)
    out: dict[str, dict[int, float]] = {}
    for user, evs in by_user.items():
        t = max(int(e["ts"]) for e in evs)
        weights: dict[int, float] = {}
        for e in evs:
            w = p.kind_weights[KIND_INDEX[e["kind"]]] * math.exp(-(t - int(e["ts"])) / p.tau_ms)
            weights[int(e["category_id"])] = weights.get(int(e["category_id"]), 0.0) + w
        out[user] = weights
    return out
