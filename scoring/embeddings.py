"""Item, category and ad embeddings: the interest space shared by features and scorer.

The default table needs no training and no storage: every id hashes to a
deterministic unit vector (a Gaussian vector from a counter-based hash, then
normalised), so any worker, the scorer and the tests agree on ``e(id)`` without
shipping a table. In d = 64 dimensions two random unit vectors have cosine
~N(0, 1/64), so distinct ids are nearly orthogonal, which is what a
bag-of-interests needs. A trained table (same protocol) can replace it.

>>> t = HashedEmbeddings(dim=8, seed=1)
>>> v = t.categories(np.array([42, 42, 7]))
>>> bool(np.allclose(v[0], v[1])), bool(np.isclose(np.linalg.norm(v[2]), 1.0))
(True, True)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from itertools import repeat
from typing import Protocol

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

# Namespaces keep item 42 and category 42 apart.
ITEM, CATEGORY, CAMPAIGN = 1, 2, 3
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """SplitMix64 finaliser (Steele et al., OOPSLA 2014): a fast, well-mixed 64-bit hash."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def hashed_unit_vectors(ids: npt.ArrayLike, dim: int, seed: int, namespace: int) -> F32:
    """One unit vector per id, identical on every machine for the same (seed, namespace)."""
    idv = np.asarray(ids, dtype=np.int64).astype(np.uint64).reshape(-1, 1)
    base = _splitmix64(idv ^ np.uint64((seed * 0x100000001B3 + namespace) & (2**64 - 1)))
    cols = np.arange(dim, dtype=np.uint64).reshape(1, -1) * _GOLDEN
    h = _splitmix64(base + cols)
    # Two 26-bit uniforms per draw -> Box-Muller Gaussian.
    u1 = ((h >> np.uint64(38)).astype(np.float64) + 0.5) / 2.0**26
    u2 = (((h >> np.uint64(12)) & np.uint64(0x3FFFFFF)).astype(np.float64) + 0.5) / 2.0**26
    g = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    return g.astype(np.float32)


class EmbeddingTable(Protocol):
    """What features and scorer need: vectors for items, categories and campaigns."""

    dim: int

    def items(self, ids: npt.ArrayLike) -> F32: ...

    def categories(self, ids: npt.ArrayLike) -> F32: ...

    def campaigns(self, ids: npt.ArrayLike) -> F32: ...


class HashedEmbeddings:
    """The default table: hashed unit vectors, no storage, no training."""

    def __init__(self, dim: int, seed: int) -> None:
        self.dim = dim
        self.seed = seed

    def items(self, ids: npt.ArrayLike) -> F32:
        return hashed_unit_vectors(ids, self.dim, self.seed, ITEM)

    def categories(self, ids: npt.ArrayLike) -> F32:
        return hashed_unit_vectors(ids, self.dim, self.seed, CATEGORY)

    def campaigns(self, ids: npt.ArrayLike) -> F32:
        return hashed_unit_vectors(ids, self.dim, self.seed, CAMPAIGN)


def event_embeddings(
    table: EmbeddingTable, items: npt.ArrayLike, categories: npt.ArrayLike, category_mix: float
) -> F32:
    """e = mix * e(category) + (1 - mix) * e(item): what one touch of an item says about a user.

    The category term lets interest generalise across the long tail of items
    (Taobao: 3,276 items but 567 categories in 4,321 events); the item term keeps
    repeat interest in one product distinct. Ads use the same formula on their
    item and category, so user and ad live in one space.
    """
    e = _looked_up(table.categories, categories) * np.float32(category_mix)
    if category_mix < 1.0:
        e += _looked_up(table.items, items) * np.float32(1.0 - category_mix)
    return e


def _looked_up(lookup: Callable[[npt.ArrayLike], F32], ids: npt.ArrayLike) -> F32:
    """``lookup(ids)``, each distinct id looked up once: a batch of events repeats its
    categories and popular items many times, and a hashed vector costs ~2 us to compute
    (a third of the interest stage's CPU before). A row depends only on its id, so the
    result is the same, bit for bit."""
    idv = np.asarray(ids)
    if idv.ndim != 1 or len(idv) < 64:
        return lookup(idv)
    uniq, inverse = np.unique(idv, return_inverse=True)
    if len(uniq) > 0.8 * len(idv):
        return lookup(idv)
    return lookup(uniq)[inverse]


# Rows a :class:`RowCache` holds by default (ADPULSE_EMBEDDING_CACHE_ROWS): 65,536 rows of
# d = 64 float32 are 16 MiB of vectors plus ~6 MiB of index, per cache.
DEFAULT_CACHE_ROWS = 65_536


class RowCache:
    """At most ``capacity`` vectors by key, in one preallocated [capacity, dim] array.

    Why: a decision recomputes the vector of each of its user's last 50 behaviours,
    and a hashed vector is a dozen numpy passes over [n, dim] (about a sixth of the
    decision's CPU); a dict probe and one gather cost a fraction of that. Only for
    vectors that are a pure function of their key (a hashed id, or a fixed text
    table's row): a cached row is then the very row the table would give, bit for bit.
    Eviction is first in, first out (a ring of slots): bounded memory, no bookkeeping
    on a hit. Whoever changes what a key maps to (another table, seed, mix or model
    version) builds a new cache; nothing in here can tell. Not thread-safe: in a worker,
    ingest and decisions use it on the event loop's thread only.
    """

    def __init__(self, dim: int, capacity: int = DEFAULT_CACHE_ROWS) -> None:
        if capacity < 1:
            msg = f"an embedding cache needs at least 1 row, got {capacity}"
            raise ValueError(msg)
        self.dim = dim
        self.capacity = capacity
        self._slot: dict[Hashable, int] = {}
        self._keys: list[Hashable] = [None] * capacity
        self._rows = np.empty((capacity, dim), dtype=np.float32)  # pages touched as filled
        self._next = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._slot)

    def lookup(self, keys: Sequence[Hashable], compute: Callable[[I64], F32]) -> F32:
        """The row of each key; ``compute(at)`` gives the rows of ``keys[at]`` (the
        misses, repeats included) and they are kept for next time."""
        slots = np.array(list(map(self._slot.get, keys, repeat(-1, len(keys)))), np.int64)
        miss = slots < 0
        n_miss = int(np.count_nonzero(miss))
        self.hits += len(keys) - n_miss
        if not n_miss:
            return self._rows[slots]
        self.misses += n_miss
        at = np.flatnonzero(miss)
        got = np.asarray(compute(at), dtype=np.float32)
        if n_miss == len(keys):
            out = got.copy()
        else:  # gathered before the store below can reuse a hit's slot
            out = np.empty((len(keys), self.dim), dtype=np.float32)
            out[~miss] = self._rows[slots[~miss]]
            out[at] = got
        self._store([keys[i] for i in at.tolist()], got)
        return out

    def _store(self, keys: list[Hashable], rows: F32) -> None:
        fresh: dict[Hashable, int] = {}
        for j, k in enumerate(keys):  # first copy of each new key
            if k not in self._slot:
                fresh.setdefault(k, j)
        if len(fresh) > self.capacity:  # more new keys than room: keep the last ones
            fresh = dict(list(fresh.items())[-self.capacity :])
        slots = np.empty(len(fresh), dtype=np.int64)
        for i, k in enumerate(fresh):
            s = self._next
            old = self._keys[s]
            if old is not None:
                del self._slot[old]
            self._keys[s] = k
            self._slot[k] = s
            slots[i] = s
            self._next = (s + 1) % self.capacity
        self._rows[slots] = rows[np.fromiter(fresh.values(), np.int64, len(fresh))]


class CachedEmbeddings:
    """Any :class:`EmbeddingTable` behind a :class:`RowCache` per namespace: the same rows,
    computed once per id while they stay cached. For a table whose row depends only on its
    id (the hashed table; a fixed text table): wrap the new table when it changes."""

    def __init__(self, table: EmbeddingTable, capacity: int = DEFAULT_CACHE_ROWS) -> None:
        self.table = table
        self.dim = table.dim
        self._caches = tuple(RowCache(table.dim, capacity) for _ in range(3))

    def _cached(
        self, which: int, lookup: Callable[[npt.ArrayLike], F32], ids: npt.ArrayLike
    ) -> F32:
        idv = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self._caches[which].lookup(idv.tolist(), lambda at: lookup(idv[at]))

    def items(self, ids: npt.ArrayLike) -> F32:
        return self._cached(0, self.table.items, ids)

    def categories(self, ids: npt.ArrayLike) -> F32:
        return self._cached(1, self.table.categories, ids)

    def campaigns(self, ids: npt.ArrayLike) -> F32:
        return self._cached(2, self.table.campaigns, ids)
