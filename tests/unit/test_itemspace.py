"""Item text vectors in the interest state: the pure maths against the float64 reference.

The state keeps each (item, category)'s decayed weight; the item vectors in force
are looked up when the vector is read (scoring/itemspace.py). So whatever the
order of events, duplicates and item-catalog records, the vector read equals
the reference computed from scratch with the items' current vectors.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from adpulse.core.settings import Settings
from scoring.embeddings import HashedEmbeddings
from scoring.features import (
    KIND_INDEX,
    KINDS,
    EventBatch,
    InterestParams,
    ItemVectors,
    apply_events,
    decode_all,
    encode_states,
    fingerprint,
    read_vectors,
    reference_vectors,
)
from scoring.staterecord import ITEMS_VERSION, STATE_VERSION

P = InterestParams(item_limit=64)
TABLE = HashedEmbeddings(P.dim, seed=7)
HOUR = 3600_000


class Store:
    """Encoded records, as the worker's table holds them (every batch round-trips bytes)."""

    def __init__(self, p: InterestParams = P) -> None:
        self.p = p
        self.data: dict[str, bytes] = {}

    def apply(self, events: list[dict[str, Any]]) -> None:
        users = sorted({e["user_id"] for e in events})
        index = {u: i for i, u in enumerate(users)}
        states, cats, items = decode_all([self.data.get(u) for u in users], self.p)
        batch = EventBatch(
            user=np.array([index[e["user_id"]] for e in events], dtype=np.int64),
            kind=np.array([KIND_INDEX[e["kind"]] for e in events], dtype=np.uint8),
            item=np.array([e["item_id"] for e in events], dtype=np.int64),
            category=np.array([e["category_id"] for e in events], dtype=np.int64),
            ts=np.array([e["ts"] for e in events], dtype=np.int64),
            fingerprint=np.array([fingerprint(e["event_id"]) for e in events], dtype=np.uint64),
            offset=np.full(len(events), -1, dtype=np.int64),
        )
        new, cats, items, _ = apply_events(states, cats, items, batch, TABLE, self.p)
        for u, raw in zip(users, encode_states(new, cats, items), strict=True):
            self.data[u] = raw

    def vectors(self, items: ItemVectors | None) -> dict[str, np.ndarray]:
        users = sorted(self.data)
        states, vecs, _ = read_vectors([self.data[u] for u in users], 0, self.p, items)
        # At t_ref, as the reference gives it: undo the decay to t = 0 (none: t < t_ref).
        assert all(int(t) > 0 for t in states["t_ref"])
        return dict(zip(users, vecs, strict=True))


def events(n: int, users: int, items: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {"event_id": f"e{i}", "user_id": f"u{rng.randrange(users)}", "kind": rng.choice(KINDS),
         "item_id": (item := rng.randrange(items)),
         # mostly the item's own category; one event in ten files it elsewhere
         "category_id": item % 7 if rng.random() < 0.9 else 100 + item % 3,
         "ts": 1_000 * HOUR + rng.randrange(200 * HOUR)}
        for i in range(n)
    ]  # fmt: skip


def catalog(item_ids: list[int], seed: int) -> tuple[ItemVectors, dict[int, np.ndarray]]:
    """Unit "text" vectors for some items, as ItemVectors and as the reference's mapping."""
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(len(item_ids), P.dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    iv = ItemVectors.build(item_ids, [i % 7 for i in item_ids], text, TABLE, P.category_mix)
    return iv, {i: text[k] for k, i in enumerate(item_ids)}


def in_batches(store: Store, evs: list[dict[str, Any]], size: int) -> None:
    for i in range(0, len(evs), size):
        store.apply(evs[i : i + size])


def assert_reference(store: Store, evs: list[dict[str, Any]], items: ItemVectors | None,
                     mapping: dict[int, np.ndarray] | None) -> None:  # fmt: skip
    ref = reference_vectors(evs, TABLE, store.p, mapping)
    got = store.vectors(items)
    assert set(got) == set(ref)
    for user, (_, v, _) in ref.items():
        np.testing.assert_allclose(got[user], v, rtol=2e-5, atol=2e-5 * max(1.0, np.abs(v).max()))


def test_item_vectors_feed_the_interest_vector_equal_to_the_reference_in_any_order() -> None:
    evs = events(1500, users=12, items=25, seed=1)  # <= 50 (item, category) pairs a user
    iv, mapping = catalog(list(range(0, 25, 2)), seed=2)  # half the items have text
    orders = []
    for seed in (3, 4):
        rng = random.Random(seed)
        sent = list(evs)
        rng.shuffle(sent)
        # Duplicates soon after the original (a retrying producer; the ring holds the last 8).
        for i in sorted(rng.sample(range(len(evs)), 200), reverse=True):
            sent.insert(i + rng.randrange(1, 4), dict(sent[i]))
        store = Store()
        in_batches(store, sent, rng.randrange(1, 97))
        assert_reference(store, evs, iv, mapping)
        orders.append(store.vectors(iv))
    for user, v in orders[0].items():
        np.testing.assert_allclose(orders[1][user], v, rtol=1e-5, atol=1e-6)


def test_an_item_vector_published_after_its_events_counts_and_a_removed_one_falls_back() -> None:
    evs = events(400, users=5, items=30, seed=5)
    store = Store()
    in_batches(store, evs, 50)
    assert_reference(store, evs, None, None)  # no item catalog yet: the fallbacks alone
    iv, mapping = catalog([1, 2, 3, 5, 8, 13, 21], seed=6)  # item-catalog arrives now
    assert_reference(store, evs, iv, mapping)
    without = {i: v for i, v in mapping.items() if i != 13}  # one item deleted (tombstone)
    iv2 = ItemVectors.build(list(without), [i % 7 for i in without],
                            np.stack(list(without.values())), TABLE, P.category_mix)  # fmt: skip
    assert_reference(store, evs, iv2, without)


def test_past_the_limit_the_lightest_items_count_by_their_fallback() -> None:
    p = InterestParams(item_limit=2)
    base = {"user_id": "u", "kind": "browse", "category_id": 1, "ts": 100 * HOUR}
    evs = [{**base, "event_id": f"e{i}", "item_id": i, "kind": k}
           for i, k in enumerate(["purchase", "cart", "browse"])]  # fmt: skip
    store = Store(p)
    store.apply(evs)
    _, _, items = decode_all([store.data["u"]], p)
    assert items.of(0) == {(0, 1): 6.0, (1, 1): 4.0}  # the heaviest two, heaviest first
    iv, mapping = catalog([0, 1, 2], seed=9)
    expect = reference_vectors(evs, TABLE, p, {i: mapping[i] for i in (0, 1)})["u"][1]
    np.testing.assert_allclose(store.vectors(iv)["u"], expect, rtol=2e-5, atol=2e-5)


def test_records_carry_the_item_map_and_without_items_stay_version_2_byte_for_byte() -> None:
    evs = events(200, users=4, items=20, seed=11)
    with_items, without = Store(), Store(InterestParams(item_limit=0))
    in_batches(with_items, evs, 30)
    in_batches(without, evs, 30)
    for user, raw in with_items.data.items():
        states, cats, items = decode_all([raw], P)
        assert raw[0] == ITEMS_VERSION and len(items.item) > 0
        assert encode_states(states, cats, items) == [raw]  # round-trips
        plain = without.data[user]
        assert plain[0] == STATE_VERSION
        # The version 2 part is the same record: only the version byte and the item tail differ.
        assert raw[1 : len(plain)] == plain[1:]
    assert InterestParams.from_settings(Settings()).item_limit == 0  # no text model: no items
    with_model = InterestParams.from_settings(Settings(text_model="/models/text"))
    assert with_model.item_limit == Settings().item_limit > 0


def test_a_truncated_item_tail_is_refused_as_the_wrong_size() -> None:
    store = Store()
    store.apply(events(20, users=1, items=5, seed=12))
    raw = store.data["u0"]
    with pytest.raises(ValueError, match="wrong size"):
        decode_all([raw[:-3]], P)
