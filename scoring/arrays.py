"""Small array steps the ingest stages repeat on every batch, each cheaper than numpy's
general form of it.

``prepend`` and ``append`` are ``np.r_[value, x]`` and ``np.r_[x, value]`` for a 1-d
array: ``np.r_`` parses its index expression in Python on every call (about 3 us), and an
ingest slice makes ~17 of them around arrays of a few dozen entries (7% of a 32-event
slice's CPU). They keep ``x``'s dtype, as ``np.r_`` does for a scalar.

``group_order`` (with ``pack`` and ``packed_order``) sorts by two columns packed into one
int64 (``np.lexsort`` sorts once per column), ``descending`` ranks floats as integers for
it, and ``ranks_in_runs`` numbers each element within its run: see their docstrings.

>>> prepend(0, np.array([3, 5])), append(np.array([True]), False)
(array([0, 3, 5]), array([ True, False]))
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def prepend(value: Any, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    out = np.empty(len(x) + 1, dtype=x.dtype)
    out[0] = value
    out[1:] = x
    return out


def append(x: npt.NDArray[Any], value: Any) -> npt.NDArray[Any]:
    out = np.empty(len(x) + 1, dtype=x.dtype)
    out[:-1] = x
    out[-1] = value
    return out


I64 = npt.NDArray[np.int64]
LOW_BITS = 42  # epoch milliseconds below 2**42 fit: until the year 2109
LOW_TOP = (1 << LOW_BITS) - 1
GROUP_LIMIT = 1 << (63 - LOW_BITS)  # 2**21 groups above them


def pack(group: I64, low: I64) -> I64 | None:
    """One int64 per element that sorts as (``group``, ``low``) do; None when a value does
    not fit (``group`` outside [0, 2**21) or ``low`` outside [0, 2**42)): the caller then
    sorts by the columns themselves."""
    if len(low) and (
        int(low.min()) < 0
        or int(low.max()) > LOW_TOP
        or int(group.min()) < 0
        or int(group.max()) >= GROUP_LIMIT
    ):
        return None
    packed: I64 = (group.astype(np.int64) << LOW_BITS) | low.astype(np.int64)
    return packed


def group_order(group: I64, low: I64, *ties: npt.NDArray[Any]) -> I64:
    """``np.lexsort((*reversed(ties), low, group))``: by ``group``, then ``low``, then each
    of ``ties``; through one packed key (:func:`packed_order`) when the two fit, else by
    ``np.lexsort`` itself."""
    key = pack(group, low)
    if key is None:
        out: I64 = np.lexsort((*reversed(ties), low, group))
        return out
    return packed_order(key, *ties)


def descending(x: npt.NDArray[np.float64]) -> I64:
    """int64s in the opposite order of ``x``'s values (equal where they are equal, -0.0 as
    0.0), so a float column can be ranked as integers; ``x`` must hold no NaN."""
    bits = (x + 0.0).view(np.int64)  # + 0.0: -0.0 becomes 0.0
    out: I64 = ~(bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF))
    return out


def packed_order(key: I64, *ties: npt.NDArray[Any]) -> I64:
    """``np.lexsort((*reversed(ties), key))``: by ``key``, then by each of ``ties`` in turn;
    equal in all, in their order here.

    Why: ``np.lexsort`` sorts the whole array once per column. Here it is sorted once, by
    ``key`` (a stable sort, quick on what the stages build: stored entries in order, a
    batch's new ones after them), and only the runs of equal ``key`` are sorted again by
    ``ties``. The stages' sorts of a 1,000-event batch over users with ~30 stored entries
    (31,000-34,000 rows) took 0.5 against 8.7 ms (a sequence) and 1.8 against 6.2 ms (a
    weight map's keys).
    """
    o: I64 = np.argsort(key, kind="stable")
    if not ties or len(key) < 2:
        return o
    ks = key[o]
    tie = ks[1:] == ks[:-1]
    if not tie.any():
        return o
    in_run = np.zeros(len(ks), dtype=bool)
    in_run[1:] = tie
    in_run[:-1] |= tie
    at = np.flatnonzero(in_run)
    sub = o[at]
    o[at] = sub[np.lexsort((*(t[sub] for t in reversed(ties)), ks[at]))]
    return o


def ranks_in_runs(first: I64, n: int) -> I64:
    """Each of ``n`` elements' place in its run, where runs start at ``first`` (ascending,
    ``first[0] == 0`` when ``n``).

    >>> ranks_in_runs(np.array([0, 3]), 5).tolist()
    [0, 1, 2, 0, 1]
    """
    start = np.zeros(n, dtype=np.int64)
    start[first] = first
    np.maximum.accumulate(start, out=start)
    out: I64 = np.arange(n, dtype=np.int64) - start
    return out
