"""A user's interest state as stored: its layout, its encoding, and the versions read.

One record per user: a fixed-size numpy header (:func:`header_dtype`, 368 bytes
at d = 64: vector, counters, dedupe memory, applied offset, last-seen time) and
then the user's categories with their decayed weights, heaviest first, 12 bytes
a category (:data:`CATEGORY_DTYPE`). Decoded and encoded for a whole batch at
once. In memory a state also carries its top categories (:func:`state_dtype`),
read off the map, so readers (the lookup, decisions) need only the array.

Version 1 records (a fixed 412-byte record whose top-k was a heavy-hitters
estimate) are still read: their top-k becomes the map, and the next write of
the user stores version 2. Version 3 is a version 2 record followed by the
user's item map (:data:`ITEM_DTYPE`, a 4-byte count first): kept only when item
text is embedded (``ADPULSE_TEXT_MODEL``; scoring/itemspace.py), so a user with no
item entries, and every user of a worker without a text model, is still stored
as version 2, byte for byte. The maths that updates a state is scoring/features.py.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from scoring.arrays import prepend

KINDS = ("browse", "click", "cart", "fav", "purchase")
KIND_INDEX = {k: i for i, k in enumerate(KINDS)}
STATE_VERSION = 2  # 1: fixed 412-byte record with an approximate top-k (read, upgraded)
ITEMS_VERSION = 3  # a version 2 record followed by the user's item map
NO_TIME = np.iinfo(np.int64).min  # t_ref of a user with no event yet

I64 = npt.NDArray[np.int64]


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
    category_limit: int = 128
    item_limit: int = 0  # 0: no item map (no text model): scoring/itemspace.py

    def __post_init__(self) -> None:
        if not 0 <= self.item_limit <= 65_535:
            msg = f"item limit {self.item_limit} must be in 0..65535: set ADPULSE_ITEM_LIMIT"
            raise ValueError(msg)
        if not self.top_k <= self.category_limit <= 65_535:
            msg = (
                f"category limit {self.category_limit} must be between the top categories "
                f"({self.top_k}) and 65535: set ADPULSE_CATEGORY_LIMIT"
            )
            raise ValueError(msg)

    @property
    def tau_ms(self) -> float:
        return self.half_life_ms / math.log(2.0)

    @property
    def category_floor(self) -> float:
        """Weight under which a category is dropped: 2**-20 of the lightest event's weight,
        which an event reaches 20 half-lives after it happened."""
        positive = [w for w in self.kind_weights if w > 0]
        return DROP_BELOW * (min(positive) if positive else 1.0)

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
            category_limit=s.category_limit,
            # Item entries are worth their bytes only where item texts become vectors.
            item_limit=s.item_limit if s.text_model else 0,
        )


DROP_BELOW = 2.0**-20  # x the lightest kind weight: see InterestParams.category_floor
CATEGORY_DTYPE = np.dtype([("id", "<i8"), ("w", "<f4")])  # one stored category, 12 bytes
# one stored item entry, 20 bytes: the (item, the event's category) pair and its decayed weight
ITEM_DTYPE = np.dtype([("item", "<i8"), ("cat", "<i8"), ("w", "<f4")])


def _header_fields(p: InterestParams) -> list[tuple[Any, ...]]:
    return [
        ("version", "u1"),
        ("flags", "u1"),  # reserved, 0
        ("ncat", "<u2"),  # categories stored after the header
        ("arrived_min", "<u4"),  # processing time of the last arrival, minutes since epoch
        ("t_ref", "<i8"),  # latest event time seen (ms); NO_TIME if none
        ("offset", "<i8"),  # highest source offset applied; -1 if none
        ("counts", "<u4", (len(KINDS),)),
        ("dropped", "<f4"),  # category weight dropped (floor, limit), decayed to t_ref
        ("ring", "<u8", (p.ring,)),  # recent event-id fingerprints, newest last; 0 = empty
        ("vec", "<f4", (p.dim,)),  # interest vector at t_ref
    ]


@functools.lru_cache(maxsize=16)
def header_dtype(p: InterestParams) -> np.dtype[Any]:
    """The stored fixed part of a user's record; little-endian and packed so bytes are
    portable. ``ncat`` entries of :data:`CATEGORY_DTYPE` follow it, heaviest first.
    Cached: every decision reads it twice, and building a structured dtype costs more
    than the rest of reading a user's header."""
    return np.dtype(_header_fields(p))


def state_dtype(p: InterestParams) -> np.dtype[Any]:
    """One user's state in memory: the stored header, then the top categories (the
    heaviest ``top_k`` entries of the weight map, filled in at decode and update)."""
    return np.dtype(
        [
            *_header_fields(p),
            ("top_ids", "<i8", (p.top_k,)),  # -1 = empty slot
            ("top_w", "<f4", (p.top_k,)),  # decayed weight at t_ref
        ]
    )


def _v1_dtype(p: InterestParams) -> np.dtype[Any]:
    """Records written before the weight map (STATE_VERSION 1), read for compatibility."""
    return np.dtype(
        [
            ("version", "u1"),
            ("flags", "u1", (3,)),
            ("arrived_min", "<u4"),
            ("t_ref", "<i8"),
            ("offset", "<i8"),
            ("counts", "<u4", (len(KINDS),)),
            ("top_ids", "<i8", (p.top_k,)),
            ("top_w", "<f4", (p.top_k,)),
            ("ring", "<u8", (p.ring,)),
            ("vec", "<f4", (p.dim,)),
        ]
    )


@dataclass(frozen=True)
class Categories:
    """Every user's category -> decayed weight at its t_ref, ragged: user i's entries are
    ``ids[start[i]:start[i+1]]`` (and ``w``), heaviest first, ties by smaller id."""

    start: I64  # [n + 1]
    ids: I64
    w: npt.NDArray[np.float32]

    @classmethod
    def empty(cls, n: int) -> Categories:
        return cls(np.zeros(n + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))

    def of(self, i: int) -> dict[int, float]:
        """User ``i``'s map, for tests and tools."""
        a, b = int(self.start[i]), int(self.start[i + 1])
        return dict(zip(self.ids[a:b].tolist(), self.w[a:b].tolist(), strict=True))


@dataclass(frozen=True)
class Items:
    """Every user's (item, category) -> decayed weight at its t_ref, ragged as
    :class:`Categories` is; heaviest first, ties by smaller item then category."""

    start: I64  # [n + 1]
    item: I64
    cat: I64
    w: npt.NDArray[np.float32]

    @classmethod
    def empty(cls, n: int) -> Items:
        z = np.zeros(0, np.int64)
        return cls(np.zeros(n + 1, np.int64), z, z.copy(), np.zeros(0, np.float32))

    def of(self, i: int) -> dict[tuple[int, int], float]:
        """User ``i``'s map, for tests and tools."""
        a, b = int(self.start[i]), int(self.start[i + 1])
        keys = zip(self.item[a:b].tolist(), self.cat[a:b].tolist(), strict=True)
        return dict(zip(keys, self.w[a:b].tolist(), strict=True))


def empty_states(n: int, p: InterestParams) -> npt.NDArray[Any]:
    s = np.zeros(n, dtype=state_dtype(p))
    s["version"] = STATE_VERSION
    s["t_ref"] = NO_TIME
    s["offset"] = -1
    s["top_ids"] = -1
    return s


def _wrong_size(p: InterestParams) -> ValueError:
    msg = f"stored interest state has wrong size for dim={p.dim}: was the dim changed?"
    return ValueError(msg)


def _upgrade_v1(raw: bytes, p: InterestParams) -> bytes:
    """A version-1 record as version 2: its top-k becomes the weight map (all it kept)."""
    dt = _v1_dtype(p)
    if len(raw) != dt.itemsize:
        raise _wrong_size(p)
    old = np.frombuffer(raw, dtype=dt)
    new = empty_states(1, p)
    for name in ("arrived_min", "t_ref", "offset", "counts", "ring", "vec"):
        new[name] = old[name]
    keep = old["top_ids"][0] >= 0
    ids, w = old["top_ids"][0][keep], old["top_w"][0][keep]
    o = np.lexsort((ids, -w.astype(np.float64)))
    cats = Categories(np.array([0, len(ids)], np.int64), ids[o].astype(np.int64), w[o])
    return encode_states(new, cats)[0]


def decode_records(
    values: list[bytes | None], p: InterestParams
) -> tuple[npt.NDArray[Any], Categories]:
    """States and category maps for stored values, an empty state where a value is None."""
    states, cats, _ = decode_all(values, p)
    return states, cats


def decode_all(
    values: list[bytes | None], p: InterestParams
) -> tuple[npt.NDArray[Any], Categories, Items]:
    """States, category maps and item maps for stored values (empty where a value is None)."""
    values = [_upgrade_v1(v, p) if v is not None and v[:1] == b"\x01" else v for v in values]
    h = header_dtype(p).itemsize
    out = empty_states(len(values), p)
    present = [i for i, v in enumerate(values) if v is not None]
    ncat = np.zeros(len(values), dtype=np.int64)
    nitem = np.zeros(len(values), dtype=np.int64)
    cat_tails, item_tails = [], []
    if present:
        raws: list[bytes] = [values[i] for i in present]  # type: ignore[misc]
        heads, head, cat_len, with_items = _checked_heads(raws, p)
        cat_tails = [v[h:end] for v, end in zip(raws, cat_len.tolist(), strict=True)]
        for j in np.flatnonzero(with_items).tolist():  # version 3: the item map follows
            v, end = raws[j], int(cat_len[j])
            k = int.from_bytes(v[end : end + 4], "little")
            item_tails.append(v[end + 4 :])
            nitem[present[j]] = k
        out.view(np.uint8).reshape(len(values), -1)[present, :h] = np.frombuffer(
            heads, np.uint8
        ).reshape(len(present), h)
        ncat[present] = head["ncat"]
    entries = np.frombuffer(b"".join(cat_tails), dtype=CATEGORY_DTYPE)
    cats = Categories(
        prepend(0, np.cumsum(ncat)).astype(np.int64),
        entries["id"].astype(np.int64),
        entries["w"].astype(np.float32),
    )
    it = np.frombuffer(b"".join(item_tails), dtype=ITEM_DTYPE)
    items = Items(
        prepend(0, np.cumsum(nitem)).astype(np.int64),
        it["item"].astype(np.int64),
        it["cat"].astype(np.int64),
        it["w"].astype(np.float32),
    )
    _fill_top(out, cats, p)
    return out, cats, items


def decode_heads(values: list[bytes | None], p: InterestParams) -> npt.NDArray[Any]:
    """Only the fixed headers of stored values (``header_dtype``; ``t_ref`` NO_TIME where a
    value is None), checked as :func:`decode_all` checks them: what a decision reads
    (``vec``, ``t_ref``) without decoding each user's weight maps, which cost as much again
    per user and which a decision without item vectors never looks at."""
    if values and all(v is not None and v[:1] != b"\x01" for v in values):
        # every user known and current: the headers as stored (a decision's usual case)
        return _checked_heads(cast(list[bytes], values), p)[1].copy()
    hd = header_dtype(p)
    out = np.zeros(len(values), dtype=hd)
    out["version"] = STATE_VERSION
    out["t_ref"] = NO_TIME
    out["offset"] = -1
    present = [i for i, v in enumerate(values) if v is not None]
    raws = [v if v[:1] != b"\x01" else _upgrade_v1(v, p) for v in values if v is not None]
    if raws:
        out[present] = _checked_heads(raws, p)[1]
    return out


def _checked_heads(
    raws: list[bytes], p: InterestParams
) -> tuple[bytes, npt.NDArray[Any], I64, npt.NDArray[np.bool_]]:
    """The stored records' headers (their bytes, and as ``header_dtype``), where each
    category map ends, and which records carry an item map; ValueError for a record of an
    unknown version or whose length does not match what its header says follows."""
    hd = header_dtype(p)
    h = hd.itemsize
    heads = b"".join(v[:h] for v in raws)
    if len(heads) != h * len(raws):
        raise _wrong_size(p)
    head = np.frombuffer(heads, dtype=hd)
    if not ((head["version"] == STATE_VERSION) | (head["version"] == ITEMS_VERSION)).all():
        msg = f"stored interest state has an unknown version {set(head['version'].tolist())}"
        raise ValueError(msg)
    cat_len = h + CATEGORY_DTYPE.itemsize * head["ncat"].astype(np.int64)
    lengths = np.fromiter((len(v) for v in raws), np.int64, len(raws))
    with_items = head["version"] == ITEMS_VERSION
    if (lengths[~with_items] != cat_len[~with_items]).any():
        raise _wrong_size(p)
    for j in np.flatnonzero(with_items).tolist():  # version 3: the item map follows
        v, end = raws[j], int(cat_len[j])
        k = int.from_bytes(v[end : end + 4], "little")
        if len(v) != end + 4 + ITEM_DTYPE.itemsize * k:
            raise _wrong_size(p)
    return heads, head, cat_len, with_items


def decode_states(values: list[bytes | None], p: InterestParams) -> npt.NDArray[Any]:
    """States for stored values (top categories filled in), empty where a value is None."""
    return decode_records(values, p)[0]


def encode_states(
    states: npt.NDArray[Any], cats: Categories, items: Items | None = None
) -> list[bytes]:
    """Stored records: each state's header, then its category map, then (version 3, only
    for a user with item entries) the count and entries of its item map."""
    fields = states.dtype.fields
    assert fields is not None
    h = int(fields["top_ids"][1])  # the in-memory top fields come after the header
    heads = states.copy()
    count = np.diff(cats.start)
    heads["ncat"] = count
    nitem = np.zeros(len(states), np.int64) if items is None else np.diff(items.start)
    heads["version"] = np.where(nitem > 0, ITEMS_VERSION, STATE_VERSION)
    raw = heads.tobytes()
    m = states.dtype.itemsize
    entries = np.empty(len(cats.ids), dtype=CATEGORY_DTYPE)
    entries["id"], entries["w"] = cats.ids, cats.w
    tail = entries.tobytes()
    at = (cats.start * CATEGORY_DTYPE.itemsize).tolist()
    out = [raw[i * m : i * m + h] + tail[at[i] : at[i + 1]] for i in range(len(states))]
    if items is None or not nitem.any():
        return out
    it = np.empty(len(items.item), dtype=ITEM_DTYPE)
    it["item"], it["cat"], it["w"] = items.item, items.cat, items.w
    itail, iat = it.tobytes(), (items.start * ITEM_DTYPE.itemsize).tolist()
    for i in np.flatnonzero(nitem).tolist():
        out[i] += int(nitem[i]).to_bytes(4, "little") + itail[iat[i] : iat[i + 1]]
    return out


def _fill_top(states: npt.NDArray[Any], cats: Categories, p: InterestParams) -> None:
    """Each state's top categories: the first ``top_k`` entries of its map."""
    k, n = p.top_k, len(states)
    take = np.minimum(np.diff(cats.start), k)
    rows = np.repeat(np.arange(n), take)
    rank = np.arange(len(rows)) - np.repeat(prepend(0, np.cumsum(take)[:-1]), take)
    src = cats.start[rows] + rank
    top_ids = np.full((n, k), -1, dtype=np.int64)
    top_w = np.zeros((n, k), dtype=np.float32)
    top_ids[rows, rank] = cats.ids[src]
    top_w[rows, rank] = cats.w[src]
    states["top_ids"] = top_ids
    states["top_w"] = top_w
