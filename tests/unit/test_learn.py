"""The learn stage without a broker: labels -> per-ad state; redeliveries, re-emissions ignored."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import pytest

from adpulse.core.settings import Settings
from schemas import first_error
from scoring.strategy.calibration import CalibrationState
from scoring.strategy.policy import (
    Bandit,
    Candidates,
    PolicyParams,
    StrategyReader,
    parse_experiment,
    parse_policy,
    placement_policies,
)
from scoring.strategy.state import (
    AdState,
    CalibrationShard,
    calibration_key,
    decode_ad,
    encode,
    segment_of,
    state_key,
)
from streams.deadletter import Raw
from streams.learn import LearnStage

DIM = 4
SETTINGS = Settings(dim=DIM)
PARAMS = PolicyParams.from_settings(SETTINGS)


class Store:
    """The learn table in memory: (key, partition) -> value."""

    def __init__(self) -> None:
        self.data: dict[tuple[bytes, int], bytes] = {}

    def load(self, keys: Sequence[bytes], parts: Sequence[int]) -> list[bytes | None]:
        return [self.data.get((k, p)) for k, p in zip(keys, parts, strict=True)]

    def run(self, stage: LearnStage, raws: list[Raw]) -> Any:
        result = stage.process(raws, self.load)
        for key, part, value in result.writes:
            self.data[(key, part)] = value
        return result

    def ad(self, ad_id: str, part: int = 0) -> AdState:
        return decode_ad(self.data.get((ad_id.encode(), part)))


def label(decision: str, ad: str, clicked: int, interest: list[float]) -> dict[str, Any]:
    body = {"decision_id": decision, "ad_id": ad, "user_id": "u1", "clicked": clicked,
            "decision_ts": 1_700_000_000_000, "label_ts": 1_700_000_001_000,
            "features": {"interest": interest, "pctr": 0.05}, "propensity": 0.5}  # fmt: skip
    assert first_error("ctr-feedback", body) is None, first_error("ctr-feedback", body)
    return body


def raws(bodies: list[dict[str, Any]], first_offset: int = 0, part: int = 0) -> list[Raw]:
    return [Raw(json.dumps(b).encode(), b["ad_id"].encode(), part, first_offset + i, 0)
            for i, b in enumerate(bodies)]  # fmt: skip


def test_a_batch_of_labels_becomes_per_ad_and_per_segment_counts() -> None:
    store, stage = Store(), LearnStage(SETTINGS)
    bodies = [label(f"d{i}", "a", int(i < 3), [0.0, 1.0, 0.2, 0.0]) for i in range(5)]
    bodies += [label("d5", "b", 0, []), label("d6", "b", 1, [0.9, 0.1, 0.0, 0.0])]
    result = store.run(stage, raws(bodies))
    assert result.outcomes == {"applied": 7}
    a, b = store.ad("a"), store.ad("b")
    assert (a.shows, a.clicks, a.offset) == (5.0, 3.0, 4)
    assert a.segments == {1: (5.0, 3.0)}
    assert (b.shows, b.clicks) == (2.0, 1.0) and b.segments == {0: (1.0, 1.0)}
    # LinUCB learnt from the labels with a context only (b's empty vector is skipped).
    lin = stage.linucb.decode([a.linucb, b.linucb])
    assert lin["n"].tolist() == [5, 1]
    # The partition's calibration shard counted all seven predictions.
    raw = store.data[(calibration_key(0), 0)]
    shard = msgspec.msgpack.decode(raw, type=CalibrationShard)
    cal = CalibrationState.from_bytes(shard.state)
    assert cal.n.sum() == 7 and cal.clicks.sum() == 4 and shard.offset == 6


def test_a_redelivered_batch_changes_nothing() -> None:
    store, stage = Store(), LearnStage(SETTINGS)
    batch = raws([label(f"d{i}", "a", i % 2, [1.0, 0, 0, 0]) for i in range(4)])
    store.run(stage, batch)
    before = dict(store.data)
    again = store.run(stage, batch)
    assert again.outcomes == {"redelivered": 4}
    assert store.ad("a") == decode_ad(before[(b"a", 0)])
    assert store.data[(calibration_key(0), 0)] == before[(calibration_key(0), 0)]


def test_a_label_re_emitted_at_a_new_offset_counts_once() -> None:
    store, stage = Store(), LearnStage(SETTINGS)
    store.run(stage, raws([label("d1", "a", 1, [1.0, 0, 0, 0])]))
    v = [1.0, 0, 0, 0]
    again = [label("d1", "a", 1, v), label("d2", "a", 0, v), label("d2", "a", 0, v)]
    result = store.run(stage, raws(again, first_offset=1))
    assert result.outcomes == {"duplicate": 2, "applied": 1}
    a = store.ad("a")
    assert (a.shows, a.clicks, a.offset) == (2.0, 1.0, 3)


def test_a_conversion_after_its_label_left_the_ring_is_not_a_second_label() -> None:
    store, stage = Store(), LearnStage(SETTINGS.with_(learn_dedupe_ids=2))
    v = [1.0, 0, 0, 0]
    store.run(stage, raws([label("d1", "a", 1, v), label("d2", "a", 0, v), label("d3", "a", 0, v)]))
    conversion = {**label("d1", "a", 1, v), "converted": 1}  # a purchase a day later
    result = store.run(stage, raws([conversion], first_offset=3))
    assert result.outcomes == {"applied": 1}  # as a conversion (a cpa ad's reward), not a label
    a = store.ad("a")
    assert (a.shows, a.clicks, a.conversions, a.offset) == (3.0, 1.0, 1.0, 3)


def test_a_conversion_re_emitted_at_a_new_offset_counts_once() -> None:
    store, stage = Store(), LearnStage(SETTINGS)
    v = [1.0, 0, 0, 0]
    conversion = {**label("d1", "a", 1, v), "converted": 1}
    store.run(stage, raws([label("d1", "a", 1, v), conversion]))
    again = store.run(stage, raws([conversion], first_offset=2))  # the joiner's duplicate window
    assert again.outcomes == {"duplicate": 1}
    a = store.ad("a")
    assert (a.shows, a.clicks, a.conversions) == (1.0, 1.0, 1.0)


def test_the_dedupe_ring_is_bounded() -> None:
    store, stage = Store(), LearnStage(SETTINGS.with_(learn_dedupe_ids=3))
    store.run(stage, raws([label(f"d{i}", "a", 0, []) for i in range(10)]))
    assert len(store.ad("a").ring) == 3


def test_invalid_feedback_is_rejected_and_neighbours_applied() -> None:
    store, stage = Store(), LearnStage(SETTINGS)
    good = raws([label("d1", "a", 1, [])])[0]
    bad = Raw(b'{"decision_id": "x"}', b"a", 0, 1, 0)
    result = store.run(stage, [good, bad])
    assert [r.reason for r in result.rejected] == ["schema"] and result.outcomes == {"applied": 1}


def test_segment_is_the_dominant_interest_dimension() -> None:
    assert segment_of(None) is None and segment_of([]) is None and segment_of([0.0, 0.0]) is None
    assert segment_of([0.1, -0.5, 0.7]) == 2


def test_thompson_and_linucb_parse_per_placement() -> None:
    lookup = placement_policies("greedy", "feed=thompson:5;side=linucb:0.5", PARAMS)
    feed, side = lookup("feed"), lookup("side")
    assert isinstance(feed, Bandit) and feed.name == "thompson(m=5)"
    assert isinstance(side, Bandit) and side.name.startswith("linucb(alpha=0.5")
    assert lookup("home").name == "greedy"
    with pytest.raises(ValueError, match="thompson"):
        parse_policy("thompson:-1", PARAMS)


def test_thompson_follows_the_labels_over_the_model_prior() -> None:
    policy = parse_policy("thompson:20", PARAMS)
    assert isinstance(policy, Bandit)
    clicked = AdState(shows=200.0, clicks=120.0)
    states = [AdState(shows=200.0), clicked, AdState(shows=200.0)]
    rng = np.random.default_rng(0)
    cands = Candidates(np.full(3, 0.05), np.ones(3), None, lambda: states)
    picks = [policy.choose(cands, rng) for _ in range(50)]
    assert all(c.index == 1 and 0 < c.propensity <= 1 for c in picks)


def test_strategy_reader_reads_each_ad_once_per_batch() -> None:
    reads: list[list[bytes]] = []

    def read(keys: Sequence[bytes]) -> list[bytes | None]:
        reads.append(list(keys))
        return [None] * len(keys)

    reader = StrategyReader(read)
    reader.batch()
    reader.states(["a", "b"])
    reader.states(["b", "a", "c"])
    assert reads == [[b"a", b"b"], [b"c"]]


def test_strategy_reader_decodes_a_record_again_only_when_its_bytes_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from scoring.strategy import policy

    decoded: list[bytes | None] = []

    def counting(raw: bytes | None) -> AdState:
        decoded.append(raw)
        return decode_ad(raw)

    monkeypatch.setattr(policy, "decode_ad", counting)
    store = {b"a": encode(AdState(shows=1.0)), b"b": encode(AdState(shows=2.0))}
    reader = StrategyReader(lambda keys: [store.get(k) for k in keys])
    reader.batch()
    first = reader.states(["a", "b", "c"])
    reader.batch()
    again = reader.states(["a", "b", "c"])
    assert [s.shows for s in again] == [1.0, 2.0, 0.0]
    assert again[0] is first[0] and again[1] is first[1]  # unchanged bytes: reused
    assert decoded == [store[b"a"], store[b"b"], None, None]  # an unknown ad: no entry
    store[b"a"] = encode(AdState(shows=5.0))  # a label moved it: a new bytes object
    store[b"b"] = bytes(bytearray(store[b"b"]))  # equal bytes, another object
    del decoded[:]
    reader.batch()
    assert [s.shows for s in reader.states(["a", "b"])] == [5.0, 2.0]
    assert decoded == [store[b"a"]]  # only the changed record decoded again
    store.pop(b"b")  # the record went (a tombstone): a fresh state, not the cached one
    reader.batch()
    assert reader.states(["b"])[0].shows == 0.0 and "b" not in reader.decoded


def test_experiment_arms_are_stable_and_carry_their_policies() -> None:
    parsed = parse_experiment("exp1:secret:control=greedy@0.5,treatment=thompson:10@0.5", PARAMS)
    assert parsed is not None
    exp, policies = parsed
    assert [a.name for a in exp.arms] == ["control", "treatment"]
    assert policies[0].name == "greedy" and policies[1].name == "thompson(m=10)"
    again, _ = parse_experiment("exp1:secret:control=greedy@0.5,treatment=thompson@0.5", PARAMS)  # type: ignore[misc]
    arms = [exp.arm_of(f"user{i}") for i in range(1000)]
    assert arms == [again.arm_of(f"user{i}") for i in range(1000)]
    assert 400 < sum(arms) < 600
    assert parse_experiment("", PARAMS) is None
    with pytest.raises(ValueError, match="ARM=POLICY@SHARE"):
        parse_experiment("exp1:key:control=greedy", PARAMS)


def arm_label(decision: str, ad: str, clicked: int, arm: str, policy: str) -> dict[str, Any]:
    body = {**label(decision, ad, clicked, [1.0, 0.0, 0.0, 0.0]), "arm": arm, "policy": policy}
    assert first_error("ctr-feedback", body) is None
    return body


def test_each_experiment_arm_learns_only_from_its_own_labels() -> None:
    store, stage = Store(), LearnStage(SETTINGS)
    bodies = [arm_label(f"t{i}", "a", 1, "treat", "thompson(m=20)") for i in range(3)]
    bodies += [arm_label(f"c{i}", "a", 0, "ctl", "linucb(alpha=1,eps=0)") for i in range(5)]
    assert store.run(stage, raws(bodies)).outcomes == {"applied": 8}
    treat = decode_ad(store.data[(state_key("a", "treat").encode(), 0)])
    ctl = decode_ad(store.data[(state_key("a", "ctl").encode(), 0)])
    assert (treat.shows, treat.clicks, treat.offset) == (3.0, 3.0, 2)
    assert (ctl.shows, ctl.clicks, ctl.offset) == (5.0, 0.0, 7)
    assert (b"a", 0) not in store.data  # nothing pooled over the arms
    # Only a LinUCB arm keeps (and pays for) the LinUCB part of its records.
    assert treat.linucb == b"" and stage.linucb.decode([ctl.linucb])["n"].tolist() == [5]
    # A decision in an arm reads that arm's records; without an arm, the ad's own.
    reader = StrategyReader(lambda keys: [store.data.get((k, 0)) for k in keys])
    reader.batch()
    assert reader.states(["a"], "treat")[0].shows == 3.0
    assert reader.states(["a"], "ctl")[0].shows == 5.0
    assert reader.states(["a"])[0].shows == 0.0
    # Dedupe is per arm record, and as exact as without arms.
    again = store.run(stage, raws([arm_label("t0", "a", 1, "treat", "thompson(m=20)")], 8))
    assert again.outcomes == {"duplicate": 1}
    assert store.run(stage, raws(bodies)).outcomes == {"redelivered": 8}
    assert decode_ad(store.data[(state_key("a", "treat").encode(), 0)]).shows == 3.0


def test_random_policy_is_uniform_with_exact_propensity() -> None:
    policy = parse_policy("random", PARAMS)
    assert policy.name == "random"
    rng = np.random.default_rng(0)
    cands = Candidates(np.array([0.9, 0.1, 0.5, 0.0]), np.ones(4), None, list)
    picks = [policy.choose(cands, rng) for _ in range(4000)]
    assert {c.propensity for c in picks} == {0.25}
    assert np.bincount([c.index for c in picks], minlength=4).min() > 900
