"""Cost-per-click billing: spend settles on joined clicks, once (issue 14, item 11).

The stages run as the worker runs them, without a broker: the decision stage
(streams/decide.py) over dict-backed tables, its decisions encoded and decoded
as the join reads them (streams/join.py), the join's state machine
(scoring/joinstate.py), and the charges settled into the same budget copy the
decisions use (``BudgetGate.settle``, streams/budget.py).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import numpy as np
import pytest

from adpulse.core.settings import Settings
from schemas.messages import AdDecision
from scoring import joinstate as js
from scoring.catalog import Catalog
from scoring.featurespec import FeatureSpec
from scoring.scorer import FallbackRule
from scoring.strategy.pacing import DAY_MS, HOUR_MS
from streams.budget import SETTLED_KEY, decode_marks, load_record
from streams.deadletter import Raw, Rejected
from streams.decide import DecideStage, ServingModels, StateReaders
from streams.join import DECISION_MAX_BYTES, pending_decision
from streams.validate import ContractDecoder
from tests.unit.test_pacing_stage import Tables as PartitionTables

NOW = 20_000 * DAY_MS + 10 * HOUR_MS
PARTS = 2
P = js.JoinParams(window_ms=60_000, conversion_ms=0, grace_ms=0)
ADS = [
    {"ad_id": "cpc-a", "campaign_id": "c-cpc", "category_id": 1, "bid": 0.7,
     "daily_budget": 1e6, "targeting": {}, "billing": "cpc"},
    {"ad_id": "cpc-b", "campaign_id": "c-cpc", "category_id": 2, "bid": 1.3,
     "daily_budget": 1e6, "targeting": {}, "billing": "cpc"},
    {"ad_id": "cpm-a", "campaign_id": "c-cpm", "category_id": 3, "bid": 2.0,
     "daily_budget": 1e6, "targeting": {}},
]  # fmt: skip

DECISIONS = ContractDecoder("ad-decisions", AdDecision, DECISION_MAX_BYTES)  # as the join does


class Tables(PartitionTables):
    """The pacing tests' per-partition dict, plus a campaign's spend over all partitions."""

    def spent(self, campaign: str) -> float:
        recs = [load_record(self.data.get((p, campaign.encode())), NOW) for p in range(PARTS)]
        return sum(float(r["spent"]) for r in recs)


class World:
    """One worker's decision stage and click join over its tables."""

    def __init__(self, spend: Tables | None = None, generation: int = 1) -> None:
        s = Settings(pseudonymise=False, partitions=PARTS, policy="greedy",
                     freq_cap_per_day=10**6)  # fmt: skip
        ads = [dict(a) for a in ADS]
        self.catalog = Catalog(ads, FeatureSpec.from_settings(s))
        models = ServingModels(None, FallbackRule(prior_ctr=0.02), None)  # type: ignore[arg-type]
        self.gen = generation
        self.stage = DecideStage(s, models, lambda: self.catalog, generation=lambda: self.gen)
        self.stage.rng = np.random.default_rng(1)
        self.spend = spend or Tables()
        self.caps = Tables()
        self.pending: dict[int, dict[str, js.Pending | None]] = {p: {} for p in range(PARTS)}
        self.offsets = dict.fromkeys(range(PARTS), 0)  # per partition: ad-decisions offsets
        self.written: list[tuple[bytes, int, bytes]] = []  # the last settle's writes

    def decide(self, ads: list[str], tag: str) -> list[dict[str, Any]]:
        """One request per ad (its only candidate), spread over the partitions."""
        raws = []
        for i, ad_id in enumerate(ads):
            body = {"request_id": f"{tag}-{i}", "user_id": f"u{i}", "placement": "home",
                    "ts": NOW, "candidates": [ad_id]}  # fmt: skip
            raws.append(Raw(json.dumps(body).encode(), body["user_id"].encode(), i % PARTS, i, NOW))
        tables = StateReaders(Tables().load, self.caps.load, self.spend.load)
        out = self.stage.process(raws, tables, NOW)
        assert not out.rejected
        self.spend.write(out.spend_writes)
        self.caps.write(out.cap_writes)
        return [{**msgspec.to_builtins(d), "latency_ms": 1.0, "_partition": raw.partition}
                for _, raw, d in out.decisions]  # fmt: skip

    def join_decisions(self, decisions: list[dict[str, Any]]) -> None:
        """The decisions through the join, as it decodes them from ad-decisions."""
        for d in decisions:
            part = d["_partition"]
            body = {k: v for k, v in d.items() if k != "_partition"}
            msg = DECISIONS.decode(Raw(msgspec.json.encode(body), None, part, self.offsets[part]))
            assert isinstance(msg, AdDecision) and msg.ad_id is not None
            dec = pending_decision(msg, msg.ad_id, self.offsets[part], (-1, -1))
            self.offsets[part] += 1
            step = js.apply_batch(self.pending[part], [dec], [], P)
            assert step.labels == []

    def clicks(
        self, part: int, clicks: list[tuple[int, str]], state: dict[str, js.Pending | None]
    ) -> js.Step:
        """A user-events batch of (offset, decision id) clicks on ``part``, against ``state``;
        its charges settled into the spend table."""
        events = [js.Event(off, "u", NOW + 1000, did) for off, did in clicks]
        step = js.apply_batch(state, [], events, P)
        self.written = self.stage.budget.settle(part, step.charges, self.spend.load, NOW)
        self.spend.write(self.written)
        return step


def _copy(state: dict[str, js.Pending | None]) -> dict[str, js.Pending | None]:
    return {k: None if v is None else js.decode(js.encode(v)) for k, v in state.items()}


def test_cpc_spend_is_the_sum_of_the_bids_of_clicked_decisions_and_cpm_keeps_expected_cost() -> (
    None
):
    world = World()
    decisions = world.decide(["cpc-a", "cpc-b", "cpm-a"] * 10, "r")
    assert {d["ad_id"]: d["billing"] for d in decisions} == {
        "cpc-a": "cpc", "cpc-b": "cpc", "cpm-a": "cpm"
    }  # fmt: skip
    # Deciding charges nothing to the cpc campaign and each decision's pctr x bid to cpm.
    cpm = [d for d in decisions if d["billing"] == "cpm"]
    assert world.spend.spent("c-cpc") == 0.0
    assert world.spend.spent("c-cpm") == pytest.approx(sum(d["score"] for d in cpm))
    world.join_decisions(decisions)
    clicked = decisions[::5]  # both billings, both partitions
    offset = 0
    for part in range(PARTS):
        batch = [d["request_id"] for d in clicked if d["_partition"] == part]
        batch += batch[:1]  # a second click on one of them: one label, one charge
        step = world.clicks(part, [(offset + i, did) for i, did in enumerate(batch)],
                            world.pending[part])  # fmt: skip
        offset += len(batch)
        assert sum(lab.clicked for lab in step.labels) == len(batch) - 1
    paid = [d for d in clicked if d["billing"] == "cpc"]
    assert 4 <= len(paid) < 20
    assert world.spend.spent("c-cpc") == pytest.approx(sum(d["bid"] for d in paid))
    assert world.spend.spent("c-cpm") == pytest.approx(sum(d["score"] for d in cpm))
    # The gauges read the settled spend.
    assert world.stage.budget.gauges(NOW)["c-cpc"][0] == pytest.approx(sum(d["bid"] for d in paid))


def test_a_replayed_click_batch_relabels_but_charges_once_even_after_a_restart() -> None:
    world = World()
    decisions = [d for d in world.decide(["cpc-a", "cpc-b"] * 4, "r") if d["_partition"] == 0]
    world.join_decisions(decisions)
    ids = [d["request_id"] for d in decisions]
    bids = {d["request_id"]: d["bid"] for d in decisions}
    before = _copy(world.pending[0])  # the join's state as durable before the batch
    world.clicks(0, [(10, ids[0]), (11, ids[1])], world.pending[0])
    charged = bids[ids[0]] + bids[ids[1]]
    assert world.spend.spent("c-cpc") == pytest.approx(charged)
    assert decode_marks(world.spend.data[(0, SETTLED_KEY)]) == [11, -1]
    stored = dict(world.spend.data)
    # A crash after the spend was written but before the join's records: the batch is
    # replayed against the older records, labels again, and is not charged again.
    step = world.clicks(0, [(10, ids[0]), (11, ids[1])], _copy(before))
    assert [lab.clicked for lab in step.labels] == [1, 1] and len(step.charges) == 2
    assert world.spend.spent("c-cpc") == pytest.approx(charged)
    # Its records are written again, unchanged (a replay may follow a failed changelog send).
    assert [(k, v) for k, _, v in world.written] == [
        (b"c-cpc", stored[(0, b"c-cpc")]), (SETTLED_KEY, stored[(0, SETTLED_KEY)])
    ]  # fmt: skip
    # The same after a restart: a new stage reads the marks from the spend table; a
    # replay that goes on past the old batch charges the new click only.
    world.stage = World(world.spend).stage
    world.clicks(0, [(10, ids[0]), (11, ids[1]), (12, ids[2])], _copy(before))
    assert world.spend.spent("c-cpc") == pytest.approx(charged + bids[ids[2]])


def test_a_click_before_its_decision_is_charged_when_the_decision_comes_once() -> None:
    state: dict[str, js.Pending | None] = {}
    assert js.apply_batch(state, [], [js.Event(5, "u", 1200, "d1")], P).charges == []
    before = _copy(state)
    d = js.Decision("d1", 9, "u", "ad", 1000, campaign_id="c", click_price=0.4)
    (charge,) = js.apply_batch(state, [d], [], P).charges
    assert charge == js.Charge("d1", "c", 0.4, "decisions", 9)
    assert js.apply_batch(state, [d], [], P).charges == []  # redelivered: nothing
    replayed = js.apply_batch(before, [d], [], P).charges  # replayed on lost records
    assert [(c.source, c.offset) for c in replayed] == [("decisions", 9)]


def test_cpm_clicks_and_conversions_charge_nothing() -> None:
    p = js.JoinParams(window_ms=60_000, conversion_ms=60_000, grace_ms=0)
    state: dict[str, js.Pending | None] = {}
    ds = [js.Decision("m", 0, "u", "ad", 1000, campaign_id="c", category_id=7),
          js.Decision("c", 1, "u", "ad", 1000, campaign_id="c", category_id=7,
                      click_price=1.5)]  # fmt: skip
    step = js.apply_batch(state, ds, [js.Event(0, "u", 1200, "m"), js.Event(1, "u", 1300, "c")], p)
    assert [c.decision_id for c in step.charges] == ["c"]
    buy = js.apply_batch(state, [], [js.Event(2, "u", 1400, "", item_id=1, category_id=7)], p)
    assert [lab.converted for lab in buy.labels] == [1, 1] and buy.charges == []


def test_an_older_pending_record_decodes_as_free_to_click() -> None:
    rec = js.Pending(js.OPEN, "u1", "ad1", 1000, campaign_id="c")
    names = list(rec.__struct_fields__)
    older = msgspec.msgpack.encode([getattr(rec, f) for f in names[: names.index("click_price")]])
    assert js.decode(older).click_price == 0.0


def test_a_decision_without_billing_or_with_a_bad_bid_costs_nothing_on_click() -> None:
    base = AdDecision(request_id="r", user_id="u", ad_id="a", score=0.1, pctr=0.05, bid=2.0,
                      propensity=1.0, policy="greedy", model_version="v1", ts=1,
                      latency_ms=1.0)  # fmt: skip
    assert base.click_price() == 0.0
    cpc = msgspec.structs.replace(base, billing="cpc")
    assert cpc.click_price() == 2.0
    negative = msgspec.structs.replace(cpc, bid=-2.0)  # not ours (bid >= 0): never a refund
    assert negative.click_price() == 0.0
    refused = DECISIONS.decode(Raw(msgspec.json.encode(negative), b"u", 0, 0))
    assert isinstance(refused, Rejected) and refused.reason == "schema"  # the join's verdict


def test_a_partition_back_from_another_owner_is_read_again_before_a_charge() -> None:
    spend = Tables()
    world = World(spend)
    ids = [d["request_id"] for d in world.decide(["cpc-a"] * 6, "r") if d["_partition"] == 1]
    world.pending[1] = {i: js.Pending(js.OPEN, "u", "cpc-a", NOW, campaign_id="c-cpc",
                                      click_price=0.7) for i in ids}  # fmt: skip
    world.clicks(1, [(0, ids[0])], world.pending[1])
    other = World(spend)  # meanwhile another worker owned partition 1 and charged a click
    other.clicks(1, [(1, ids[1])], world.pending[1])
    assert spend.spent("c-cpc") == pytest.approx(1.4)
    world.gen = 2  # back here in a new generation: this worker's copy of the spend is stale
    world.clicks(1, [(2, ids[2])], world.pending[1])
    assert spend.spent("c-cpc") == pytest.approx(2.1)
