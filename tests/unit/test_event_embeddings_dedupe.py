"""``event_embeddings`` looks each distinct id up once in large batches (64 ids or more,
mostly repeats): bit-identical to looking every row up, on both sides of the threshold.
The interest oracle calls ``event_embeddings`` itself and the unit batches are smaller
than the threshold, so nothing else compares the two paths."""

from __future__ import annotations

import numpy as np
import pytest

from scoring.embeddings import HashedEmbeddings, event_embeddings


@pytest.mark.parametrize("n", [1, 63, 64, 100, 1000])
@pytest.mark.parametrize("distinct", [1, 7, 300])
@pytest.mark.parametrize("mix", [0.0, 0.3, 1.0])
def test_deduplicated_lookups_equal_a_lookup_per_row(n: int, distinct: int, mix: float) -> None:
    rng = np.random.default_rng(n * 31 + distinct)
    table = HashedEmbeddings(64, seed=3)
    items = rng.integers(0, distinct, n) * 7919 + 1
    cats = rng.integers(0, max(1, distinct // 3), n) + 5
    got = event_embeddings(table, items, cats, mix)
    want = np.stack([
        np.float32(mix) * table.categories(cats[i : i + 1])[0]
        + (np.float32(1.0 - mix) * table.items(items[i : i + 1])[0] if mix < 1.0 else 0)
        for i in range(n)
    ]).astype(np.float32)  # fmt: skip
    assert got.dtype == np.float32 and got.shape == (n, 64)
    assert np.array_equal(got, want)
