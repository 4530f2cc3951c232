"""Embedding caches: a cached vector is the vector the table computes, bit for bit,
whether the cache is cold, warm, full and evicting, or smaller than one call; with the
hashed table and with a text table (a fixed matrix of item vectors)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from scoring.embeddings import CachedEmbeddings, HashedEmbeddings, RowCache, event_embeddings
from scoring.featurespec import FeatureSpec, ItemVectorCache, item_vectors
from scoring.sequence import ENTRY_DTYPE, Sequences, sequence_vectors
from tests.unit.test_sequence_model import _publish

F32 = npt.NDArray[np.float32]


class TextTable:
    """A text model's table: a fixed matrix of vectors, a row per id (modulo its size)."""

    def __init__(self, dim: int, rows: int = 997, seed: int = 3) -> None:
        self.dim = dim
        rng = np.random.default_rng(seed)
        self._m = rng.standard_normal((3, rows, dim)).astype(np.float32)

    def _rows(self, which: int, ids: npt.ArrayLike) -> F32:
        return self._m[which][np.asarray(ids, dtype=np.int64) % self._m.shape[1]]

    def items(self, ids: npt.ArrayLike) -> F32:
        return self._rows(0, ids)

    def categories(self, ids: npt.ArrayLike) -> F32:
        return self._rows(1, ids)

    def campaigns(self, ids: npt.ArrayLike) -> F32:
        return self._rows(2, ids)


def _calls(seed: int, n_calls: int = 40) -> list[tuple[npt.NDArray[np.int64], ...]]:
    """Batches of (item, category) ids as decisions and ingest slices see them: repeats within
    a call and across calls, sizes from 0 to a few hundred."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_calls):
        n = int(rng.integers(0, 300))
        items = rng.integers(0, 400, n)
        out.append((items, items % 37 + rng.integers(0, 2, n)))
    return out


@pytest.mark.parametrize("capacity", [1, 7, 100, 5000])  # evicting within a call .. never full
@pytest.mark.parametrize("table_kind", ["hashed", "text"])
def test_cached_item_vectors_equal_the_computed_ones(capacity: int, table_kind: str) -> None:
    spec = FeatureSpec(dim=16, sequence=50)
    table = HashedEmbeddings(16, 5) if table_kind == "hashed" else TextTable(16)
    cache = ItemVectorCache(table, spec, capacity)
    for items, cats in _calls(1):
        got = cache(items, cats)
        assert got.dtype == np.float32
        assert np.array_equal(got, item_vectors(table, items, cats, spec))
        assert len(cache.rows) <= capacity
    assert cache.rows.hits > 0


@pytest.mark.parametrize("capacity", [1, 50, 100_000])
@pytest.mark.parametrize("table_kind", ["hashed", "text"])
def test_cached_embedding_table_equals_the_table(capacity: int, table_kind: str) -> None:
    table = HashedEmbeddings(16, 5) if table_kind == "hashed" else TextTable(16)
    cached = CachedEmbeddings(table, capacity)
    for items, cats in _calls(2):
        assert np.array_equal(cached.items(items), table.items(items))
        assert np.array_equal(cached.categories(cats), table.categories(cats))
        assert np.array_equal(cached.campaigns(cats), table.campaigns(cats))
        assert np.array_equal(
            event_embeddings(cached, items, cats, 0.5), event_embeddings(table, items, cats, 0.5)
        )


def test_a_full_cache_evicts_first_in_first_out_and_stays_bounded() -> None:
    cache = RowCache(dim=2, capacity=3)
    rows = {k: np.full(2, k, np.float32) for k in range(10)}

    def lookup(keys: list[int]) -> F32:
        return cache.lookup(keys, lambda at: np.stack([rows[keys[i]] for i in at.tolist()]))

    assert np.array_equal(lookup([0, 1, 2, 0]), np.stack([rows[k] for k in (0, 1, 2, 0)]))
    assert len(cache) == 3
    # 3 and 4 take the oldest slots (0's, 1's); 2 is still a hit; a hit's row is read before
    # the same call's misses reuse slots
    assert np.array_equal(lookup([2, 3, 4, 2]), np.stack([rows[k] for k in (2, 3, 4, 2)]))
    assert len(cache) == 3
    assert (cache.hits, cache.misses) == (2, 6)  # a cold call's repeats are misses too
    lookup([0])  # evicted
    assert cache.misses == 7
    assert np.array_equal(lookup(list(range(10))), np.stack([rows[k] for k in range(10)]))
    assert len(cache) == 3
    with pytest.raises(ValueError, match="at least 1 row"):
        RowCache(dim=2, capacity=0)


@pytest.mark.parametrize("table_kind", ["hashed", "text"])
def test_sequence_vectors_with_a_cache_equal_the_uncached_ones(table_kind: str) -> None:
    spec = FeatureSpec(dim=16, sequence=5)
    table = HashedEmbeddings(16, 5) if table_kind == "hashed" else TextTable(16)
    rng = np.random.default_rng(0)
    lengths = np.array([0, 3, 7, 1, 0, 5])
    entries = np.zeros(int(lengths.sum()), dtype=ENTRY_DTYPE)
    entries["item"] = rng.integers(0, 30, len(entries))
    entries["category"] = entries["item"] % 4
    seqs = Sequences(np.r_[0, np.cumsum(lengths)].astype(np.int64), entries)
    cache = ItemVectorCache(table, spec, 4)  # smaller than one call: evicts
    for _ in range(3):
        got = sequence_vectors(seqs, table, spec, cache)
        want = sequence_vectors(seqs, table, spec)
        assert [None if g is None else g.tolist() for g in got] == [
            None if w is None else w.tolist() for w in want
        ]
    # a cache built for another table or mix is not used
    other = ItemVectorCache(HashedEmbeddings(16, 6), spec, 100)
    assert not other.fits(table, spec)
    assert not ItemVectorCache(table, FeatureSpec(dim=16, category_mix=0.3), 100).fits(table, spec)
    got = sequence_vectors(seqs, table, spec, other)
    assert all(
        (g is None and w is None) or np.array_equal(g, w)  # type: ignore[arg-type]
        for g, w in zip(got, sequence_vectors(seqs, table, spec), strict=True)
    )
    assert len(other.rows) == 0


def test_decisions_with_the_embedding_caches_equal_decisions_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decision's behaviour vectors served from the caches (here 8 rows: full and evicting
    at every request, then warm) give the raw pCTR computing them gives, bit for bit."""
    import streams.decide
    from adpulse.bench.decisionpath import DecisionPath, request_bodies
    from adpulse.catalogtool import synthetic_ads
    from adpulse.core.settings import Settings
    from adpulse.workload import Workload, WorkloadModel
    from streams.deadletter import Raw

    s = Settings.from_env({}).with_(pseudonymise=False, partitions=1, policy="greedy")
    _publish(tmp_path, "v1", replace(FeatureSpec.from_settings(s), sequence=10), seed=3)
    workload = Workload(WorkloadModel(), users=20, seed=2)
    ads = synthetic_ads(200, workload.columns(2_000)["category"].tolist(), seed=3)
    _, events = workload.payloads(600, 1_700_000_000_000, prefix="w")
    bodies = request_bodies([a["ad_id"] for a in ads], 20, 40, 12, 5, "c")

    def raw_pctr(rows: int) -> dict[str, float]:
        cfg = s.with_(model_dir=str(tmp_path), sequence_length=10, embedding_cache_rows=rows)
        path = DecisionPath.build(ads, events, cfg)
        now = 1_700_000_100_000
        got = {}
        for b in bodies + bodies:  # the second pass: what the first left in the caches
            req = (path._decoder.decode(Raw(b, None, 0, 0, now)), Raw(None, None, 0, 0, now))
            (_k, _r, d), *_ = path.stage.decide([req], path.tables, now).decisions
            got.setdefault(d.request_id, []).append(d.pctr_raw)
        return {k: v for k, v in got.items() if v[0] == v[1]}

    small, large = raw_pctr(8), raw_pctr(65_536)
    plain = HashedEmbeddings(s.dim, s.embedding_seed)
    monkeypatch.setattr(  # main's computation: every vector hashed, no cache
        streams.decide, "sequence_vectors",
        lambda seqs, _table, spec, _cache=None: sequence_vectors(seqs, plain, spec),
    )  # fmt: skip
    computed = raw_pctr(8)
    assert len(computed) == 12 and small == computed and large == computed
