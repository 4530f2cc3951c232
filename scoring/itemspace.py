"""Items in the ads' space: a user's interest as the decayed sum of their items' text vectors.

An item published on ``item-catalog`` with a title gets the title's text vector,
projected into the ``dim``-d interest space as an ad's text is
(scoring/textencoder.py, ``project``). Every other item keeps its *fallback*:
``event_embeddings(item, category)``, the vector every item had before text,
ADPULSE_CATEGORY_MIX of its category's hashed vector and the rest its id's.
With text, a user's interest is

    v(t) = sum_i w(kind_i) exp(-(t - t_i)/tau) e(item_i),
    e(item) = text(item) if the item has a vector, else fallback(item, category_i).

The state cannot store that sum: an item's vector may arrive (or change) after its
events, and the state must not depend on that order. So the stored vector stays
the fallback sum it always was (scoring/features.py), and the state also keeps,
per (item, event category), the decayed weight of its events, exactly as the
category map is kept (scoring/weightmap.py). At read time the item vectors in
force replace the fallbacks:

    v = vec + sum over entries (item, c, w) whose item has a vector of
            w * (text(item) - fallback(item, c)).

The entry key holds the event's category because the fallback that ``vec`` holds
is the event's; an item's usual category (its item-catalog ``category_id``) only
lets the difference be precomputed (:attr:`ItemVectors.delta`).

Bounded at ``ADPULSE_ITEM_LIMIT`` entries (20 bytes each): past it the lightest
entry goes and its weight counts by its fallback from then on (what it would
have counted without text); an entry decayed under 2**-20 of an event's weight
goes too (a difference below float32 resolution). Only the limit makes the
vector depend on arrival order, as for categories.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from scoring.embeddings import EmbeddingTable, event_embeddings
from scoring.staterecord import InterestParams, Items
from scoring.weightmap import merge_weights

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class ItemVectors:
    """Every item with a vector in force, sorted by id, and what replacing its fallback adds.

    >>> from scoring.embeddings import HashedEmbeddings
    >>> iv = ItemVectors.build([9, 3], [1, 2], np.eye(2, 4, dtype=np.float32),
    ...                        HashedEmbeddings(4, 1), 0.5)
    >>> iv.ids.tolist(), len(iv)
    ([3, 9], 2)
    """

    ids: I64
    cats: I64  # the item's item-catalog category
    text: F32  # [m, dim] the title's projected vector
    delta: F32  # [m, dim] text - fallback(item, cats)
    table: EmbeddingTable
    mix: float

    @classmethod
    def build(
        cls,
        ids: Sequence[int] | I64,
        cats: Sequence[int] | I64,
        text: F32,
        table: EmbeddingTable,
        mix: float,
    ) -> ItemVectors:
        idv = np.asarray(ids, dtype=np.int64)
        o = np.argsort(idv, kind="stable")
        idv, cv = idv[o], np.asarray(cats, dtype=np.int64)[o]
        tv = np.asarray(text, dtype=np.float32).reshape(len(idv), table.dim)[o]
        delta = tv - event_embeddings(table, idv, cv, mix)
        return cls(idv, cv, tv, delta.astype(np.float32), table, mix)

    def __len__(self) -> int:
        return len(self.ids)

    def vectors(self, items: I64, cats: I64) -> tuple[npt.NDArray[np.bool_], F64]:
        """For each (item, category): whether the item has a vector, and e(item) (text or
        fallback), float64: the reference's side of the formula."""
        found, idx = self._find(items)
        e = event_embeddings(self.table, items, cats, self.mix).astype(np.float64)
        e[found] = self.text[idx[found]]
        return found, e

    def _find(self, items: I64) -> tuple[npt.NDArray[np.bool_], I64]:
        if not len(self.ids):
            return np.zeros(len(items), dtype=bool), np.zeros(len(items), dtype=np.int64)
        idx = np.minimum(np.searchsorted(self.ids, items), len(self.ids) - 1)
        return self.ids[idx] == items, idx


def update_items(
    items: Items,
    ua: I64,
    keep_old: F64,
    group: I64,
    item: I64,
    cat: I64,
    contrib: F64,
    p: InterestParams,
) -> Items:
    """The item maps after a batch: the same rescale, sum and bounds as the categories'."""
    if p.item_limit == 0:
        return items
    start, (iv, cv), w, _ = merge_weights(
        items.start, [items.item, items.cat], items.w, ua, keep_old, group, [item, cat],
        contrib, p.category_floor, p.item_limit,
    )  # fmt: skip
    return Items(start, iv, cv, w)


def corrections(items: Items, vectors: ItemVectors | None, dim: int) -> F64:
    """[n, dim] what each user's item vectors add to its stored (fallback) vector at t_ref.

    >>> from scoring.embeddings import HashedEmbeddings
    >>> t = HashedEmbeddings(4, 1)
    >>> iv = ItemVectors.build([9], [1], np.ones((1, 4), np.float32), t, 1.0)
    >>> w = np.array([2.0], np.float32)
    >>> items = Items(np.array([0, 1, 1]), np.array([9]), np.array([1]), w)
    >>> c = corrections(items, iv, 4)
    >>> bool(np.allclose(c[0], 2.0 * (1.0 - t.categories([1])[0]))), c[1].tolist()
    (True, [0.0, 0.0, 0.0, 0.0])
    """
    n = len(items.start) - 1
    out = np.zeros((n, dim), dtype=np.float64)
    if vectors is None or not len(vectors) or not len(items.item):
        return out
    found, idx = vectors._find(items.item)
    if not found.any():
        return out
    owner = np.repeat(np.arange(n), np.diff(items.start))[found]
    idx, item, cat = idx[found], items.item[found], items.cat[found]
    d = vectors.delta[idx].astype(np.float64)
    other = vectors.cats[idx] != cat  # an event filed under another category than the catalog's
    if other.any():
        fb = event_embeddings(vectors.table, item[other], cat[other], vectors.mix)
        d[other] = vectors.text[idx[other]].astype(np.float64) - fb
    d *= items.w[found].astype(np.float64)[:, None]
    first = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])  # owner is ascending
    out[owner[first]] = np.add.reduceat(d, first, axis=0)
    return out
