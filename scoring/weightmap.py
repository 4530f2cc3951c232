"""One rule for every per-user map of decayed weights: the categories and the items.

A user's map holds, for each key, the decayed weight of its events at the
user's t_ref. A batch rescales a touched user's old weights to the new t_ref
(``keep_old``), adds each accepted event's decayed weight, and then bounds the
map: a weight under ``floor`` is dropped, and past ``limit`` entries the lightest
go (ties: the larger key). Both maps (scoring/features.py, categories;
scoring/itemspace.py, items) go through :func:`merge_weights`, so they are exact
and order-free under the same conditions.

Maps are ragged over users: user i's entries are ``[start[i], start[i+1])``,
heaviest first, ties by the smaller key. A key is one or more int64 columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from scoring.arrays import descending, group_order, prepend, ranks_in_runs

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


def merge_weights(
    start: I64,
    keys: Sequence[I64],
    w: F32,
    ua: I64,
    keep_old: F64,
    group: I64,
    new_keys: Sequence[I64],
    contrib: F64,
    floor: float,
    limit: int,
) -> tuple[I64, list[I64], F32, F64]:
    """The maps after a batch, and the weight each touched user lost to the bounds.

    ``ua``: the touched users (ascending rows), ``keep_old`` their rescale factors;
    ``group``: for each new contribution, its index into ``ua``. Returns the new
    ``start``, key columns, weights, and ``lost[len(ua)]`` (float64, at the new t_ref).

    >>> old = np.array([2.0], np.float32)
    >>> s, k, w, lost = merge_weights(np.array([0, 1]), [np.array([5])], old, np.array([0]),
    ...     np.array([0.5]), np.array([0, 0]), [np.array([7, 5])],
    ...     np.array([3.0, 1.0]), floor=0.1, limit=8)
    >>> k[0].tolist(), w.tolist(), lost.tolist()
    ([7, 5], [3.0, 2.0], [0.0])
    """
    n = len(start) - 1
    owner = np.repeat(np.arange(n), np.diff(start))  # user row of each old entry
    slot = np.full(n, -1, dtype=np.int64)
    slot[ua] = np.arange(len(ua))
    touched = slot[owner] >= 0
    old_g = slot[owner[touched]]
    g = np.concatenate([old_g, group])
    ks = [np.concatenate([k[touched], nk]) for k, nk in zip(keys, new_keys, strict=True)]
    ww = np.concatenate([w[touched].astype(np.float64) * keep_old[old_g], contrib])
    o = group_order(g, *ks)
    g, ks, ww = g[o], [k[o] for k in ks], ww[o]
    change = g[1:] != g[:-1]
    for k in ks:
        change |= k[1:] != k[:-1]
    first = np.flatnonzero(prepend(True, change))
    g, ks, ww = g[first], [k[first] for k in ks], np.add.reduceat(ww, first)
    o = _heaviest_first(g, ww, ks)
    g, ks, ww = g[o], [k[o] for k in ks], ww[o]
    group_start = np.flatnonzero(prepend(True, g[1:] != g[:-1]))
    rank = ranks_in_runs(group_start, len(g))
    drop = (ww < floor) | (rank >= limit)
    lost = np.bincount(g[drop], weights=np.abs(ww[drop]), minlength=len(ua))
    g, ks, ww = g[~drop], [k[~drop] for k in ks], ww[~drop]
    # Untouched users keep their entries; ua is ascending, so a stable sort by user
    # keeps each user's entries heaviest first.
    user = np.concatenate([owner[~touched], ua[g]])
    o = np.argsort(user, kind="stable")
    new_start = prepend(0, np.cumsum(np.bincount(user, minlength=n))).astype(np.int64)
    out_keys = [
        np.concatenate([k[~touched], nk]).astype(np.int64)[o]
        for k, nk in zip(keys, ks, strict=True)
    ]
    out_w: F32 = np.concatenate([w[~touched], ww.astype(np.float32)])[o]
    lost64: F64 = lost.astype(np.float64)
    return new_start, out_keys, out_w, lost64


def _heaviest_first(g: I64, ww: F64, ks: Sequence[I64]) -> I64:
    """``np.lexsort((*reversed(ks), -ww, g))``: by group, heaviest first, then by key. The
    weights are ranked as integers (equal weights, equal ranks), so one packed sort does
    what lexsort does in 2 + len(ks) (4.2 against 11.4 ms for 34,000 entries)."""
    if np.isnan(ww).any():  # NaN has no integer rank
        out: I64 = np.lexsort((*reversed(ks), -ww, g))
        return out
    _, rank = np.unique(descending(ww), return_inverse=True)
    return group_order(g, rank.astype(np.int64), *ks)
