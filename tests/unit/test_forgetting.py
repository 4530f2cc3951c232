"""Bandit forgetting by event time: the learner's state equals a batch recompute from the labels
and their decision times, whatever the arrival order, with duplicates; half-life 0 is today's."""

from __future__ import annotations

import doctest
import json
import random
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adpulse.core.settings import Settings
from scoring.featurespec import user_features
from scoring.strategy import forgetting
from scoring.strategy.linucb import LinUCB, LinUCBParams
from scoring.strategy.policy import Bandit, Candidates, PolicyParams
from scoring.strategy.state import AdState, decode_ad, encode, segment_of
from streams.deadletter import Raw
from streams.learn import LearnStage

DIM, HOUR = 3, 3_600_000
T0 = 1_700_000_000_000


class AdStateBefore(msgspec.Struct, array_like=True, omit_defaults=True):
    """AdState as it was before forgetting (git 685ca75): the record older data holds."""

    offset: int = -1
    ring: list[int] = []
    shows: float = 0.0
    clicks: float = 0.0
    segments: dict[int, tuple[float, float]] = {}
    linucb: bytes = b""


class Store:
    """The learn table in memory, as in test_learn."""

    def __init__(self) -> None:
        self.data: dict[tuple[bytes, int], bytes] = {}

    def load(self, keys: Sequence[bytes], parts: Sequence[int]) -> list[bytes | None]:
        return [self.data.get((k, p)) for k, p in zip(keys, parts, strict=True)]

    def run(self, stage: LearnStage, raws: list[Raw]) -> None:
        for key, part, value in stage.process(raws, self.load).writes:
            self.data[(key, part)] = value

    def ad(self, ad_id: str) -> AdState:
        return decode_ad(self.data.get((ad_id.encode(), 0)))


def pctr_at(ts: int) -> float:
    """The decision's pCTR a label carries: LinUCB's offset (ADPULSE_LINUCB_OFFSET=model)."""
    return ((ts // 1000) % 97 + 1) / 1000


def body(i: int, ad: str, clicked: int, ts: int, interest: list[float]) -> bytes:
    return json.dumps({
        "decision_id": f"d{i}", "ad_id": ad, "user_id": "u", "clicked": clicked,
        "decision_ts": ts, "label_ts": ts + 1000, "features": {"interest": interest},
        "propensity": 0.5, "pctr": pctr_at(ts),
    }).encode()  # fmt: skip


label_st = st.tuples(
    st.sampled_from(["a", "b"]),
    st.integers(0, 1),
    st.integers(0, 48 * HOUR),
    st.sampled_from([[], [0.0, 0.0, 0.0], [1.0, 0.2, 0.0], [0.1, 0.9, 0.3], [0.2, 0.1, 0.7]]),
)


def deliver(
    labels: list[tuple[str, int, int, list[float]]], h: float, seed: int, **own: float
) -> Store:
    """Labels in a shuffled order, in random batches, some re-emitted at a new offset and
    some batches redelivered at their old offsets, through the real learn stage."""
    rnd = random.Random(seed)
    order = list(range(len(labels)))
    rnd.shuffle(order)
    order += rnd.sample(order, k=len(order) // 3)  # re-emissions (new offsets): count once
    raws = [Raw(body(i, *labels[i][:2], T0 + labels[i][2], labels[i][3]),
                labels[i][0].encode(), 0, off, 0) for off, i in enumerate(order)]  # fmt: skip
    store, stage = Store(), LearnStage(Settings(dim=DIM, bandit_half_life_h=h, **own))
    while raws:
        n = rnd.randint(1, 6)
        batch, raws = raws[:n], raws[n:]
        store.run(stage, batch)
        if rnd.random() < 0.3:
            store.run(stage, batch)  # a redelivery: offsets already applied
    return store


def oracle(
    labels: list[tuple[str, int, int, list[float]]], ad: str, h: float, h_lin: float | None = None
) -> dict[str, Any]:
    """Batch recompute with numpy: every label once, weighted by its age at the latest one
    (the counts by half-life ``h``, LinUCB's statistics by ``h_lin``, default ``h``; 0: 1)."""
    mine = [lb for lb in labels if lb[0] == ad]
    t = np.array([T0 + lb[2] for lb in mine], dtype=np.float64)
    ref = t.max()
    w = np.exp2(-(ref - t) / (h * HOUR)) if h > 0 else np.ones_like(t)
    hl = h if h_lin is None else h_lin
    w_lin = np.exp2(-(ref - t) / (hl * HOUR)) if hl > 0 else np.ones_like(t)
    y = np.array([lb[1] for lb in mine], dtype=np.float64)
    segs: dict[int, list[float]] = {}
    a = np.eye(DIM + 1)  # ridge 1, undecayed
    b = np.zeros(DIM + 1)
    for wi, wl, yi, lb in zip(w, w_lin, y, mine, strict=True):
        seg = segment_of(lb[3])
        if seg is None:
            continue
        n, c = segs.get(seg, [0.0, 0.0])
        segs[seg] = [n + wi, c + wi * yi]
        x = np.append(user_features(lb[3], DIM)[0], 1.0)
        a += wl * np.outer(x, x)
        b += wl * (yi - pctr_at(int(T0 + lb[2]))) * x  # the residual over the model
    return {"ts": int(ref), "shows": w.sum(), "clicks": w @ y, "segments": segs, "a": a, "b": b}


def assert_matches(state: AdState, want: dict[str, Any]) -> None:
    assert state.ts == want["ts"]
    assert state.shows == pytest.approx(want["shows"], rel=1e-9)
    assert state.clicks == pytest.approx(want["clicks"], rel=1e-9, abs=1e-12)
    assert set(state.segments) == set(want["segments"])
    for seg, (n, c) in want["segments"].items():
        assert state.segments[seg] == pytest.approx((n, c), rel=1e-9, abs=1e-12)
    if not state.linucb:
        assert not want["segments"]  # no context reached LinUCB
        return
    lin = LinUCB(LinUCBParams(dim=DIM)).decode([state.linucb])[0]
    np.testing.assert_allclose(np.linalg.inv(lin["a_inv"]), want["a"], rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(lin["b"], want["b"], rtol=1e-8, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(labels=st.lists(label_st, min_size=1, max_size=25), h=st.sampled_from([0.5, 3.0, 24.0]),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_forgetting_equals_a_batch_recompute_in_any_order_with_duplicates(
    labels: list[tuple[str, int, int, list[float]]], h: float, seed: int
) -> None:
    store = deliver(labels, h, seed)
    for ad in {lb[0] for lb in labels}:
        assert_matches(store.ad(ad), oracle(labels, ad, h))


@settings(max_examples=40, deadline=None)
@given(labels=st.lists(label_st, min_size=1, max_size=25),
       hs=st.sampled_from([(0.0, 3.0), (3.0, 0.0), (0.5, 24.0)]),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_each_learner_forgets_by_its_own_half_life(
    labels: list[tuple[str, int, int, list[float]]], hs: tuple[float, float], seed: int
) -> None:
    """ADPULSE_THOMPSON_HALF_LIFE_H and ADPULSE_LINUCB_HALF_LIFE_H override the shared one
    (set here to a value neither uses): the counts fade by the first, LinUCB by the second."""
    store = deliver(labels, 99.0, seed, thompson_half_life_h=hs[0], linucb_half_life_h=hs[1])
    for ad in {lb[0] for lb in labels}:
        assert_matches(store.ad(ad), oracle(labels, ad, hs[0], hs[1]))


def test_a_learner_without_its_own_half_life_takes_the_shared_one() -> None:
    assert forgetting.half_lives(2.0, -1.0, -1.0) == (2.0, 2.0)
    assert forgetting.half_lives(2.0, 0.0, -1.0) == (0.0, 2.0)
    assert PolicyParams.from_settings(Settings(bandit_half_life_h=2.0)).thompson_half_life_h == 2.0
    own = Settings(bandit_half_life_h=2.0, thompson_half_life_h=0.0)
    assert PolicyParams.from_settings(own).thompson_half_life_h == 0.0


@settings(max_examples=30, deadline=None)
@given(labels=st.lists(label_st, min_size=1, max_size=25), seed=st.integers(0, 2**16))
def test_half_life_zero_keeps_todays_exact_counts_and_record_layout(
    labels: list[tuple[str, int, int, list[float]]], seed: int
) -> None:
    store = deliver(labels, 0.0, seed)
    for ad in {lb[0] for lb in labels}:
        mine = [lb for lb in labels if lb[0] == ad]
        state = store.ad(ad)
        assert (state.shows, state.clicks, state.ts) == (len(mine), sum(lb[1] for lb in mine), 0)
        raw = store.data[(ad.encode(), 0)]
        assert msgspec.msgpack.decode(raw)[6:] == [0, 0.0]  # ts and conversions, no more
        before = msgspec.msgpack.decode(raw, type=AdStateBefore)  # the version before reads it
        assert (before.shows, before.clicks, before.linucb) == (state.shows, state.clicks,
                                                                state.linucb)  # fmt: skip


def test_a_record_written_before_forgetting_still_decodes() -> None:
    lin = LinUCB.encode(LinUCB(LinUCBParams(dim=DIM)).empty(1))[0]
    old = msgspec.msgpack.encode(AdStateBefore(7, [11, 12], 5.0, 2.0, {1: (3.0, 1.0)}, lin))
    state = decode_ad(old)
    assert (state.offset, state.ring, state.shows, state.clicks) == (7, [11, 12], 5.0, 2.0)
    assert state.segments == {1: (3.0, 1.0)} and state.linucb == lin and state.ts == 0
    assert msgspec.msgpack.decode(encode(state)) == [*msgspec.msgpack.decode(old), 0, 0.0]


def test_linucb_discount_forgets_the_data_but_keeps_the_ridge() -> None:
    lin = LinUCB(LinUCBParams(dim=2, bias=False, ridge=2.0))
    x = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    s = lin.update(lin.empty(1), np.zeros(3, np.intp), x, np.array([1.0, 0.0, 1.0]))
    d = lin.discount(s, 0.25)
    want = 2.0 * np.eye(2) + 0.25 * x.T @ x
    np.testing.assert_allclose(np.linalg.inv(d["a_inv"][0]), want, rtol=1e-12)
    np.testing.assert_allclose(d["b"][0], 0.25 * x.T @ np.array([1.0, 0.0, 1.0]))
    far = lin.discount(s, 0.0)  # everything forgotten: back to the prior
    np.testing.assert_allclose(far["a_inv"][0], np.eye(2) / 2.0, atol=1e-15)


def test_thompson_counts_fade_to_the_decision_time() -> None:
    """An ad whose labels stopped drifts back to its prior: counts at the decision's time are
    the batch sum 2^-(now - t)/h, and no forgetting leaves them as stored."""
    h, t = 2.0, T0 + 5 * HOUR
    stored = AdState(shows=1000.0, clicks=4.0, segments={0: (600.0, 1.0)}, ts=t)
    vec = np.array([1.0, 0.0, 0.0], np.float32)
    late = t - HOUR  # a reader behind the record: no boost
    for now, want in ((t, 1.0), (t + 4 * HOUR, 0.25), (t + 8 * HOUR, 1 / 16), (late, 1.0)):
        c = Candidates(np.array([0.05]), np.array([1.0]), vec, lambda: [stored], now)
        bandit = Bandit.parse("thompson", "", PolicyParams(dim=DIM, thompson_half_life_h=h))
        counts = bandit.thompson_counts(c, [stored])
        seg_ok = 600.0 * want >= 50.0  # the segment's counts take over once worth 50 shows
        assert counts[0].tolist() == pytest.approx([600.0 * want, want] if seg_ok
                                                   else [1000.0 * want, 4.0 * want])  # fmt: skip
    c = Candidates(np.array([0.05]), np.array([1.0]), vec, lambda: [stored], t + 100 * HOUR)
    plain = Bandit.parse("thompson", "", PolicyParams(dim=DIM))
    assert plain.thompson_counts(c, [stored])[0].tolist() == (600.0, 1.0)


def test_a_bad_half_life_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="need a finite number >= 0"):
        LearnStage(Settings(dim=DIM, bandit_half_life_h=-1.0))
    with pytest.raises(ValueError, match="need a finite number >= 0"):
        Bandit.parse("thompson", "", PolicyParams(thompson_half_life_h=float("nan")))
    with pytest.raises(ValueError, match="need a finite number >= 0"):
        LearnStage(Settings(dim=DIM, linucb_half_life_h=-2.0))


def test_docstring_examples_hold() -> None:
    result = doctest.testmod(forgetting)
    assert result.failed == 0 and result.attempted > 0


def test_a_label_stamped_far_ahead_of_its_record_is_dead_lettered_not_learned() -> None:
    """With forgetting on, one label a year ahead would fade all the ad had learned: it goes
    to dead letters (reason future_ts) and the ad's record stays as it was."""
    store, stage = Store(), LearnStage(Settings(dim=DIM, bandit_half_life_h=1.0))
    ok = [Raw(body(i, "a", i % 2, T0 + i, [1.0, 0.2, 0.0]), b"a", 0, i, T0 + 5) for i in range(4)]
    store.run(stage, ok)
    before = store.ad("a")
    ahead = T0 + 365 * 24 * HOUR
    bad = Raw(body(9, "a", 1, ahead, [1.0, 0.2, 0.0]), b"a", 0, 4, T0 + 10)
    result = stage.process([bad], store.load)
    assert [(r.reason, r.raw.offset) for r in result.rejected] == [("future_ts", 4)]
    assert "after its record's timestamp" in result.rejected[0].message
    assert not result.writes
    assert store.ad("a").shows == before.shows and store.ad("a").ts == before.ts
    near = Raw(body(10, "a", 1, T0 + 20, [1.0, 0.2, 0.0]), b"a", 0, 5, T0 + 10)  # 10 ms ahead
    assert not stage.process([near], store.load).rejected
