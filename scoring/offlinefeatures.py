"""The model inputs of an interaction log: what the engine would know before each row.

Every row is scored from the user's behaviours **strictly before** its time,
never from labels: the interest vector (the decayed, kind-weighted sum of
scoring/features.py, here over the log's earlier rows of the user) and the last
N behaviours for the sequence model. An interaction and its label arrive
together, so an earlier row's item and kind are what a live stream would have
delivered by then; the row's own kind is never a feature (in a log such as
Taobao's the label is derived from it).

Item vectors (one per item):

* ``hashed``: today's ``event_embeddings(item, category)`` (hashed, no training);
* ``text``: the title through the text encoder, projected into the same
  ``dim`` as served ads are (scoring/textencoder.py, ``project``); an item
  without a title falls back to its category's hashed vector.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from scoring.embeddings import HashedEmbeddings, event_embeddings
from scoring.featurespec import FeatureSpec, Inputs, _unit, hash_bucket
from scoring.offline import Interactions

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
SEQ_LEN = 50


def hashed_item_vectors(log: Interactions, spec: FeatureSpec) -> F32:
    """[n_items, dim] unit vectors: today's item embedding (item and category mixed)."""
    table = HashedEmbeddings(spec.dim, spec.embedding_seed)
    # Hash the log's own item ids (not our dense index), as the engine would.
    ids = np.array([_int_id(x) for x in log.item_ids], dtype=np.int64)
    return _unit(event_embeddings(table, ids, log.item_category(), spec.category_mix))


def text_item_vectors(
    projected: F32, has_title: npt.NDArray[np.bool_], log: Interactions, spec: FeatureSpec
) -> F32:
    """[n_items, dim]: the projected title embedding, else the category's hashed vector."""
    table = HashedEmbeddings(spec.dim, spec.embedding_seed)
    out = table.categories(log.item_category()).astype(np.float32)
    out[has_title] = projected[has_title]
    return _unit(out)


def _int_id(x: str) -> int:
    """An id as the int the hashed tables take: itself when numeric, else a stable hash."""
    try:
        return int(x)
    except ValueError:
        return hash_bucket(x, 99, 2**62)


def _by_user_time(log: Interactions) -> tuple[I64, I64, I64]:
    """Rows in (user, ts, row) order, where each user's block starts, and for each sorted row
    the first sorted position of its (user, ts) group: rows before it are its history."""
    n = len(log)
    order = np.lexsort((np.arange(n), log.ts, log.user))
    u, t = log.user[order], log.ts[order]
    new_user = np.r_[True, u[1:] != u[:-1]]
    new_group = new_user | np.r_[True, t[1:] != t[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    return order, user_start, group_start


def interest_vectors(
    log: Interactions, item_vecs: F32, kind_weights: tuple[float, ...], half_life_ms: float
) -> tuple[F32, F64]:
    """Per row: the unit interest vector of the user's earlier rows, and its raw norm.

    v(t) = sum over the user's rows j with t_j < t of w(kind_j) exp(-(t - t_j)/tau) e(item_j),
    tau = half_life / ln 2, the formula of scoring/features.py in float64; zeros and
    norm 0 for a row with no earlier behaviour.
    """
    order, _, group_start = _by_user_time(log)
    tau = half_life_ms / np.log(2.0)
    w = np.asarray(kind_weights, dtype=np.float64)[log.kind[order]]
    t = log.ts[order].astype(np.float64)
    u = log.user[order]
    e = item_vecs[log.item[order]].astype(np.float64)
    dim = item_vecs.shape[1]
    out = np.zeros((len(log), dim), dtype=np.float64)
    acc = np.zeros(dim, dtype=np.float64)  # the sum over rows before position i, at t_ref
    t_ref = 0.0
    for i in range(len(order)):
        if i == 0 or u[i] != u[i - 1]:
            acc[:] = 0.0
            t_ref = t[i]
        if group_start[i] == i:  # a new time: fold in the previous group, then decay
            acc *= np.exp(-(t[i] - t_ref) / tau)
            t_ref = t[i]
        out[i] = acc
        nxt = i + 1
        if nxt == len(order) or group_start[nxt] == nxt:  # group ends: add its rows
            s = group_start[i]
            acc += w[s:nxt] @ e[s:nxt]
    norm = np.linalg.norm(out, axis=1)
    unit = np.divide(out, norm[:, None], out=np.zeros_like(out), where=norm[:, None] > 0)
    res = np.empty_like(unit)
    res[order] = unit
    norms = np.empty_like(norm)
    norms[order] = norm
    return res.astype(np.float32), norms


def sequences(log: Interactions, n: int = SEQ_LEN) -> I64:
    """[rows, n] item indices of each row's last ``n`` earlier behaviours, oldest first,
    -1 where the user has fewer (left-padded)."""
    order, user_start, group_start = _by_user_time(log)
    pos = group_start[:, None] - n + np.arange(n)[None, :]
    valid = pos >= user_start[:, None]
    items = log.item[order]
    seq = np.where(valid, items[np.clip(pos, 0, None)], -1)
    out = np.empty_like(seq)
    out[order] = seq
    return out


def model_inputs(log: Interactions, user: F32, norm: F64, ad: F32, spec: FeatureSpec) -> Inputs:
    """The CTR model's four inputs for every row (scoring/featurespec.py's layout): the
    user vector, the item's vector as the ad, ids (category; the item in the campaign slot;
    placement and device empty) and the dense features."""
    n = len(log)
    cat = log.item_category()
    cat_b = {int(c): hash_bucket(int(c), 0, spec.id_buckets[0]) for c in np.unique(cat)}
    item_b = [hash_bucket(x, 1, spec.id_buckets[1]) for x in log.item_ids]
    per_item = np.array(
        [(cat_b[int(c)], b) for c, b in zip(cat, item_b, strict=True)], dtype=np.int64
    ).reshape(-1, 2)
    ids = np.empty((n, 4), dtype=np.int64)
    ids[:, :2] = per_item[log.item]
    ids[:, 2] = hash_bucket("", 2, spec.id_buckets[2])
    ids[:, 3] = hash_bucket("", 3, spec.id_buckets[3])
    hours = (log.ts % (24 * 3_600_000)) // 3_600_000  # hour of day, as featurespec.hour_of
    angle = 2.0 * np.pi * hours / 24.0
    dense = np.stack([np.log1p(norm), np.sin(angle), np.cos(angle), (norm > 0) * 1.0], axis=1)
    return {"user": user, "ad": ad[log.item], "ids": ids, "dense": dense.astype(np.float32)}
