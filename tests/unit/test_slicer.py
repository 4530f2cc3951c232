"""Bounded time slices: a fetched batch is cut into slices, in order, nothing lost."""

from __future__ import annotations

from faust.types import TP
from hypothesis import given
from hypothesis import strategies as st

from streams.runtime.consumer import Slicer


def _batch(sizes: list[int]) -> dict[TP, list[int]]:
    return {TP("t", p): list(range(p * 1000, p * 1000 + n)) for p, n in enumerate(sizes) if n}


@given(st.lists(st.integers(0, 700), min_size=1, max_size=6), st.floats(1e-6, 1e-3))
def test_slices_keep_every_record_once_in_partition_order(sizes: list[int], cost: float) -> None:
    slicer = Slicer(0.005)
    slicer.observe("t", 1000, cost * 1000)
    batch = _batch(sizes)
    seen: dict[TP, list[int]] = {}
    for part in slicer.slices("t", batch):  # type: ignore[arg-type]
        assert 0 < sum(map(len, part.values())) <= slicer.size("t")
        for tp, recs in part.items():
            seen.setdefault(tp, []).extend(recs)
    assert seen == batch


def test_slice_size_follows_the_measured_cost_per_record() -> None:
    slicer = Slicer(0.005)
    assert slicer.size("t") == Slicer.FIRST
    slicer.observe("t", 500, 0.010)  # 20 us a record: 5 ms is 250 records
    assert slicer.size("t") == 250
    slicer.observe("t", 100, 0.100)  # a slow slice moves the average, not all the way
    assert Slicer.SMALLEST <= slicer.size("t") < 250
    for _ in range(50):
        slicer.observe("t", 100, 1.0)
    assert slicer.size("t") == Slicer.SMALLEST


def test_zero_hands_over_the_whole_batch() -> None:
    batch = _batch([5000, 3000])
    assert list(Slicer(0.0).slices("t", batch)) == [batch]  # type: ignore[arg-type]


def test_slices_are_short_only_while_requests_wait_on_the_loop() -> None:
    asked = [False]
    slicer = Slicer(0.005, contended=lambda: asked[0])
    slicer.observe("t", 500, 0.010)  # 20 us a record
    assert slicer.size("t") == round(Slicer.QUIET_S / 20e-6)  # nobody waits: long slices
    asked[0] = True
    assert slicer.size("t") == 250  # a request came lately: 5 ms slices
    asked[0] = False
    assert slicer.size("t") == 2500


def test_slices_lengthen_as_decisions_give_way_to_ingest() -> None:
    """``stretch`` is 1 / the share of the loop decisions may hold (IngestGuard.cap):
    slices grow with it, never past a quiet slice, never below the contended one. Sizes
    in records from an injected cost per record: no clock is read."""
    share = [1.0]
    slicer = Slicer(0.005, stretch=lambda: 1.0 / share[0])
    slicer.observe("t", 500, 0.010)  # an injected cost: 500 records said to take 10 ms
    contended = slicer.size("t")
    assert contended == 250  # decisions may hold the whole loop: the contended size
    share[0] = 0.5
    assert slicer.size("t") == 2 * contended  # half of it: twice as long
    quiet = Slicer(0.005, contended=lambda: False, stretch=lambda: 1.0 / share[0])
    quiet.observe("t", 500, 0.010)
    assert quiet.size("t") == 10 * contended  # nobody asking: quiet slices, as before
    share[0] = 0.1
    assert slicer.size("t") == quiet.size("t")  # a tenth: as long as a quiet slice
    share[0] = 0.01
    assert slicer.size("t") == quiet.size("t")  # never longer than a quiet slice
    share[0] = 2.0
    assert slicer.size("t") == contended  # never shorter than the contended slice
