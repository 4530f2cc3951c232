"""scoring/arrays.py: the packed sorts give exactly ``np.lexsort``'s order (the stages'
bit-exact state depends on it), and fall back where a value does not pack."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from scoring.arrays import (
    GROUP_LIMIT,
    LOW_TOP,
    descending,
    pack,
    packed_order,
    ranks_in_runs,
)
from scoring.weightmap import merge_weights

small = st.lists(st.integers(0, 5), min_size=0, max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_packed_order_is_lexsorts_order_with_ties_in_every_column(data: st.DataObject) -> None:
    n = data.draw(st.integers(0, 60))
    cols = [np.array(data.draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n)), np.int64)
            for _ in range(3)]  # fmt: skip
    key, *ties = cols
    assert packed_order(key, *ties).tolist() == np.lexsort((*reversed(ties), key)).tolist()
    assert packed_order(key).tolist() == np.lexsort((key,)).tolist()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(allow_nan=False),
            st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-300, -1e-300, np.inf, -np.inf]),
        ),
        max_size=40,
    )
)
def test_descending_ranks_floats_in_reverse_with_equal_values_equal(xs: list[float]) -> None:
    x = np.array(xs, np.float64)
    d = descending(x)
    for i in range(len(x)):
        for j in range(len(x)):
            assert (d[i] < d[j]) == (x[i] > x[j])
            assert (d[i] == d[j]) == (x[i] == x[j])  # -0.0 == 0.0


def test_pack_orders_as_the_pair_and_refuses_what_does_not_fit() -> None:
    g = np.array([0, 0, 1, GROUP_LIMIT - 1], np.int64)
    low = np.array([5, LOW_TOP, 0, 7], np.int64)
    packed = pack(g, low)
    assert packed is not None
    assert np.argsort(packed).tolist() == np.lexsort((low, g)).tolist()
    assert pack(np.array([GROUP_LIMIT]), np.array([0])) is None
    assert pack(np.array([-1]), np.array([0])) is None
    assert pack(np.array([0]), np.array([LOW_TOP + 1])) is None
    assert pack(np.array([0]), np.array([-1])) is None
    assert pack(np.zeros(0, np.int64), np.zeros(0, np.int64)) is not None


@given(small)
def test_ranks_in_runs_number_each_run_from_zero(lengths: list[int]) -> None:
    runs = [n for n in lengths if n]
    first = np.cumsum([0, *runs[:-1]]).astype(np.int64) if runs else np.zeros(0, np.int64)
    want = [i for n in runs for i in range(n)]
    assert ranks_in_runs(first, sum(runs)).tolist() == want


def _merge(keys: np.ndarray, new_keys: np.ndarray, w: np.ndarray, contrib: np.ndarray) -> tuple:
    """Two users of three old entries each (heaviest first), both touched by new keys."""
    start = np.array([0, 3, 6], np.int64)
    out = merge_weights(start, [keys], w, np.array([0, 1], np.int64), np.array([0.5, 0.25]),
                        np.array([0, 0, 1, 1], np.int64), [new_keys], contrib, 0.01, 3)  # fmt: skip
    return out[0].tolist(), out[1][0].tolist(), out[2].tolist(), out[3].tolist()


def test_weight_maps_merge_the_same_whether_their_keys_pack_or_not() -> None:
    keys = np.array([7, 3, 9, 2, 4, 8], np.int64)
    new_keys = np.array([3, 5, 4, 1], np.int64)
    w = np.array([4.0, 2.0, 2.0, 3.0, 1.0, 1.0], np.float32)
    contrib = np.array([1.0, 1.0, 2.0, 0.5])  # ties with rescaled old weights
    start, k, ww, lost = _merge(keys, new_keys, w, contrib)
    shift = 1 << 50  # beyond the packed range: sorted by the columns themselves
    start2, k2, ww2, lost2 = _merge(keys + shift, new_keys + shift, w, contrib)
    assert (start2, [x - shift for x in k2], ww2, lost2) == (start, k, ww, lost)
    assert k == [3, 7, 5, 4, 2, 1]  # heaviest first, ties by the smaller key, 3 kept each
