"""The join's deadline index against a full scan, after every operation (oracle test)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from scoring.dueindex import DueIndex

ops = st.lists(
    st.tuples(st.sampled_from(["set", "discard", "due"]), st.integers(0, 30), st.integers(0, 60)),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_due_keys_equal_a_scan_of_every_deadline(steps: list[tuple[str, int, int]]) -> None:
    index, oracle = DueIndex(), {}
    for op, k, t in steps:
        key = f"d{k}"
        if op == "set":
            index.set(key, t)
            oracle[key] = t
        elif op == "discard":
            index.discard(key)
            oracle.pop(key, None)
        else:
            assert sorted(index.due(t)) == sorted(x for x, d in oracle.items() if d < t)
        assert len(index) == len(oracle)


def test_stale_entries_are_compacted_so_the_heap_stays_bounded() -> None:
    index = DueIndex()
    for t in range(100_000):
        index.set("only", t)
    assert len(index._heap) <= 2 * len(index) + 1024
    assert index.due(100_000) == ["only"]
