"""Behaviour sequences: the streaming update equals a from-scratch recompute (the oracle)
after every batch, whatever the arrival order, duplicates and redeliveries."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from scoring.features import KIND_INDEX, KINDS, EventBatch, fingerprint
from scoring.sequence import (
    DUPLICATE,
    KEPT,
    OLDER,
    Sequences,
    apply_sequences,
    as_tuples,
    decode_sequences,
    encode_sequences,
    reference_sequences,
)


def _events(n: int, users: int, seed: int, base: int = 1_700_000_000_000) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "event_id": f"e{i}",
            "user_id": f"u{rng.randrange(users)}",
            "item_id": rng.randrange(1, 500),
            "category_id": rng.randrange(1, 30),
            "kind": rng.choice(KINDS),
            # Few distinct times: ties are the order's hard case.
            "ts": base + rng.randrange(40) * 1000,
        }
        for i in range(n)
    ]


def _stream(events: list[dict[str, Any]], length: int, batch: int) -> dict[str, list[Any]]:
    """Fold ``events`` in batches through stored bytes, as the stage does."""
    store: dict[str, bytes] = {}
    for s in range(0, len(events), batch):
        chunk = events[s : s + batch]
        users = list(dict.fromkeys(e["user_id"] for e in chunk))
        index = {u: i for i, u in enumerate(users)}
        cols = EventBatch(
            user=np.array([index[e["user_id"]] for e in chunk], np.int64),
            kind=np.array([KIND_INDEX[e["kind"]] for e in chunk], np.uint8),
            item=np.array([e["item_id"] for e in chunk], np.int64),
            category=np.array([e["category_id"] for e in chunk], np.int64),
            ts=np.array([e["ts"] for e in chunk], np.int64),
            fingerprint=np.array([fingerprint(e["event_id"]) for e in chunk], np.uint64),
            offset=np.full(len(chunk), -1, np.int64),
        )
        old = decode_sequences([store.get(u) for u in users])
        new, _ = apply_sequences(old, cols, length)
        store.update(zip(users, encode_sequences(new), strict=True))
    seqs = decode_sequences(list(store.values()))
    return {u: as_tuples(seqs.of(i)) for i, u in enumerate(store)}


# 2**42 ms (the year 2109) and beyond: the order is sorted by its columns, not packed
# into one key (scoring/arrays.py, ``pack``); both ways must give the same sequences.
BEYOND_PACKING = (1 << 42) - 20_000


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 7, 500])
@pytest.mark.parametrize("base", [1_700_000_000_000, BEYOND_PACKING])
def test_sequences_equal_the_reference_under_shuffle_duplicates_and_redelivery(
    seed: int, batch: int, base: int
) -> None:
    events = _events(400, 6, seed, base)
    rng = random.Random(seed)
    replay = events + rng.sample(events, 150) + events[:50]  # duplicates and a redelivery
    rng.shuffle(replay)
    want = reference_sequences(events, 20)
    assert _stream(replay, 20, batch) == want
    assert all(len(v) == 20 for v in want.values())


def test_sequence_is_newest_first_whatever_the_arrival_order() -> None:
    events = _events(60, 1, 9)
    got = _stream(list(reversed(events)), 10, 3)["u0"]
    assert [t for t, *_ in got] == sorted((t for t, *_ in got), reverse=True)
    assert got == reference_sequences(events, 10)["u0"]


def test_outcomes_name_kept_duplicate_and_older_events() -> None:
    def batch(fps: list[int], ts: list[int]) -> EventBatch:
        n = len(fps)
        return EventBatch(np.zeros(n, np.int64), np.zeros(n, np.uint8), np.arange(n),
                          np.arange(n), np.array(ts, np.int64), np.array(fps, np.uint64),
                          np.full(n, -1, np.int64))  # fmt: skip

    empty = Sequences(np.zeros(2, np.int64), decode_sequences([]).entries)
    first, out = apply_sequences(empty, batch([5, 6, 5], [10, 20, 10]), 2)
    assert out.tolist() == [KEPT, KEPT, DUPLICATE]
    _, out = apply_sequences(first, batch([6, 7, 8], [20, 5, 30]), 2)
    assert out.tolist() == [DUPLICATE, OLDER, KEPT]


def test_a_corrupt_record_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="wrong size"):
        decode_sequences([b"\x01\x00\x02\x00abc"])
