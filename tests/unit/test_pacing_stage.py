"""Pacing, calibration and the feature snapshot in the decision stage, on a fake clock.

The stage runs as the worker runs it (streams/decide.py), with dict-backed
tables in place of RocksDB and ``now_ms`` stepped through a simulated UTC day.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import pytest

from adpulse.core.settings import Settings
from scoring import caps
from scoring.catalog import Catalog
from scoring.featurespec import FeatureSpec
from scoring.registry import ModelRegistry
from scoring.scorer import FallbackRule
from scoring.strategy.calibration import CalibrationParams, Calibrator
from scoring.strategy.pacing import DAY_MS, HOUR_MS
from scoring.strategy.state import CalibrationShard, calibration_key
from streams.budget import load_record
from streams.deadletter import Raw
from streams.decide import DecideStage, ServingModels, StateReaders

DAY0 = 20_000 * DAY_MS  # a UTC midnight
PARTS = 2
TIGHT_BUDGET = 216.0  # a day of traffic offers about 20 times this (see _day)


def settings(**kw: Any) -> Settings:
    """Raw user ids (no pseudonym key needed), two partitions, greedy."""
    return Settings(pseudonymise=False, partitions=PARTS, policy="greedy", **kw)


def _empty() -> StateReaders:
    return StateReaders(Tables().load, Tables().load, Tables().load)


class Tables:
    """The worker's per-partition tables as dicts: (partition, key) -> value."""

    def __init__(self) -> None:
        self.data: dict[tuple[int, bytes], bytes] = {}

    def load(self, keys: Sequence[bytes], parts: Sequence[int]) -> list[bytes | None]:
        return [self.data.get((p, k)) for k, p in zip(keys, parts, strict=True)]

    def write(self, writes: Sequence[tuple[bytes, int, bytes]]) -> None:
        for key, part, value in writes:
            self.data[(part, key)] = value


def catalog(settings: Settings) -> Catalog:
    ads = [
        {"ad_id": "tight-ad", "campaign_id": "tight", "category_id": 7, "item_id": 70,
         "bid": 5.0, "daily_budget": TIGHT_BUDGET, "targeting": {}},
        {"ad_id": "filler-ad", "campaign_id": "filler", "category_id": 8, "bid": 1.0,
         "daily_budget": 1e12, "targeting": {}},
    ]  # fmt: skip
    return Catalog(ads, FeatureSpec.from_settings(settings))


def stage(settings: Settings, models: ServingModels | None = None, **kw: Any) -> DecideStage:
    cat = catalog(settings)
    models = models or ServingModels(None, FallbackRule(prior_ctr=0.02), None)  # type: ignore[arg-type]
    st = DecideStage(settings, models, lambda: cat, **kw)
    st.rng = np.random.default_rng(1)
    return st


def requests(n: int, now_ms: int, tag: str, device: str | None = None) -> list[Raw]:
    out = []
    for i in range(n):
        body: dict[str, Any] = {"request_id": f"{tag}-{i}", "user_id": f"{tag}-u{i}",
                                "placement": "home", "ts": now_ms}  # fmt: skip
        if device:
            body["context"] = {"device": device}
        out.append(Raw(json.dumps(body).encode(), body["user_id"].encode(), i % PARTS, i, now_ms))
    return out


def _day(
    pacing: bool, step_min: int = 2, hours: int = 24
) -> tuple[list[float], list[dict[str, Any]]]:
    """30 requests a minute all day; tight's spend summed over partitions, hour by hour."""
    s = settings(freq_cap_per_day=10**6, pacing=pacing)
    st, spend, caps = stage(s), Tables(), Tables()
    hourly: list[float] = []
    decisions: list[dict[str, Any]] = []
    for minute in range(0, 60 * hours, step_min):
        now = DAY0 + minute * 60_000
        tables = StateReaders(Tables().load, caps.load, spend.load)
        out = st.process(requests(30 * step_min, now, f"m{minute}"), tables, now)
        spend.write(out.spend_writes)
        caps.write(out.cap_writes)
        decisions += [msgspec.to_builtins(d) for _, _, d in out.decisions]
        if (minute + step_min) % 60 == 0:
            recs = [load_record(spend.data.get((p, b"tight")), now) for p in range(PARTS)]
            hourly.append(sum(float(r["spent"]) for r in recs))
    return hourly, decisions


@pytest.mark.long  # 5-11 s: make test stays under 10 minutes
def test_steady_traffic_spends_the_budget_along_the_day_not_in_the_first_hour() -> None:
    hourly, decisions = _day(pacing=True)
    assert hourly[0] < 0.1 * TIGHT_BUDGET  # plan: 1/24 of it
    for h, spent in enumerate(hourly[1:], start=2):
        assert spent == pytest.approx(TIGHT_BUDGET * h / 24, rel=0.15), (h, hourly)
    assert hourly[-1] == pytest.approx(TIGHT_BUDGET, rel=0.05)
    # Greedy prefers tight (5x the bid): filler won only where pacing held tight back,
    # and those decisions counted one candidate, so their propensity is exact.
    tight = [d for d in decisions if d["campaign_id"] == "tight"]
    filler = [d for d in decisions if d["campaign_id"] == "filler"]
    assert 0 < len(tight) < len(filler)
    assert {d["candidates"] for d in tight} == {2} and {d["candidates"] for d in filler} == {1}
    assert all(d["propensity"] == 1.0 for d in decisions)  # greedy over the gated set


def test_without_pacing_the_same_traffic_exhausts_the_budget_by_the_second_hour() -> None:
    hourly, _ = _day(pacing=False, step_min=5, hours=3)
    assert hourly[0] > 0.8 * TIGHT_BUDGET and hourly[1] >= TIGHT_BUDGET
    assert hourly[2] == hourly[1]  # nothing more that day


def test_a_campaign_with_budget_to_spare_is_never_throttled() -> None:
    s = settings(freq_cap_per_day=10**6)
    st, spend = stage(s), Tables()
    for minute in range(0, 120, 5):
        now = DAY0 + 6 * HOUR_MS + minute * 60_000
        tables = StateReaders(Tables().load, Tables().load, spend.load)
        out = st.process(requests(20, now, f"s{minute}"), tables, now)
        spend.write(out.spend_writes)
        assert not out.throttled.get("filler")
    gauges = st.budget.gauges(DAY0 + 8 * HOUR_MS)
    assert gauges["filler"][3] == 1.0
    spent, target, budget, p = gauges["tight"]
    assert budget == pytest.approx(TIGHT_BUDGET) and 0 < spent < budget and 0 < p <= 1
    assert target == pytest.approx(TIGHT_BUDGET / 3)  # 8 of 24 hours


def test_decisions_carry_the_feature_snapshot_and_raw_pctr() -> None:
    s = settings()
    st = stage(s)
    now = DAY0 + 13 * HOUR_MS + 5
    out = st.process(requests(4, now, "f", device="tv"), _empty(), now)
    for d in (msgspec.to_builtins(d) for _, _, d in out.decisions):
        f = d["features"]
        assert f["interest"] == []  # users with no history
        assert f["hour"] == 13 and f["device"] == "tv" and f["placement"] == "home"
        assert f["campaign_id"] == d["campaign_id"] and f["pctr"] == d["pctr_raw"]
        assert (f["category_id"], f.get("item_id")) == (
            (7, 70) if d["ad_id"] == "tight-ad" else (8, None)
        )


# -- calibration ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models() -> ServingModels:
    s = Settings(device="cpu", model_latency_budget_ms=1000.0, model_max_slowdown=100.0)
    registry = ModelRegistry.from_settings(s)
    loaded = registry.latest_valid()
    assert loaded is not None
    return ServingModels(loaded, loaded.fallback(0.02), registry)


class Shards:
    """The strategy mirror's calibration shards: the model over-predicts twice over."""

    def __init__(self, labels_per_shard: int) -> None:
        cal, rng = Calibrator(CalibrationParams()), np.random.default_rng(3)
        self.values: dict[bytes, bytes] = {}
        for p in range(PARTS):
            pctr = np.exp(rng.uniform(np.log(1e-3), np.log(0.3), labels_per_shard))
            state = cal.update(cal.empty(), pctr, rng.random(len(pctr)) < pctr / 2)
            shard = CalibrationShard(offset=labels_per_shard, state=state.to_bytes())
            self.values[calibration_key(p)] = msgspec.msgpack.encode(shard)
        self.reads = 0

    def read(self, keys: Sequence[bytes]) -> list[bytes | None]:
        self.reads += 1
        return [self.values.get(k) for k in keys]


def _serve(st: DecideStage, now: int, tag: str) -> list[dict[str, Any]]:
    out = st.process(requests(20, now, tag), _empty(), now)
    return [msgspec.to_builtins(d) for _, _, d in out.decisions]


def test_served_pctr_is_calibrated_once_buckets_have_enough_labels(
    models: ServingModels,
) -> None:
    s = settings(calibration_min_labels=200)
    shards = Shards(labels_per_shard=100_000)
    st = stage(s, models, calibration=shards.read)
    got = _serve(st, DAY0, "c1")
    raw = np.array([d["pctr_raw"] for d in got])
    served = np.array([d["pctr"] for d in got])
    assert np.all(raw > 0)
    np.testing.assert_allclose(served, raw / 2, rtol=0.2)  # the 2x over-prediction undone
    for d in got:
        assert d["score"] == pytest.approx(d["pctr"] * d["bid"])
    assert st.calibration.labels > 100_000
    # Read at most every ADPULSE_CALIBRATION_REFRESH_S, not every batch.
    _serve(st, DAY0 + 1000, "c2")
    assert shards.reads == 1
    _serve(st, DAY0 + int(s.calibration_refresh_s * 1000), "c3")
    assert shards.reads == 2


@pytest.mark.parametrize(
    ("setting", "labels"), [({"calibration": False}, 100_000), ({}, 100)], ids=["off", "thin"]
)
def test_raw_pctr_is_served_when_calibration_is_off_or_thin(
    models: ServingModels, setting: dict[str, Any], labels: int
) -> None:
    s = settings(calibration_min_labels=200, **setting)
    st = stage(s, models, calibration=Shards(labels_per_shard=labels).read)
    for d in _serve(st, DAY0, "r"):
        assert d["pctr"] == d["pctr_raw"] > 0
    assert st.calibration.labels == 0


def test_a_spend_record_of_the_older_format_carries_todays_spend_over() -> None:
    now = DAY0 + 5 * HOUR_MS
    today = caps.encode(caps.SpendRecord(day=now // DAY_MS, spent=12.5))
    yesterday = caps.encode(caps.SpendRecord(day=now // DAY_MS - 1, spent=99.0))
    assert float(load_record(today, now)["spent"]) == 12.5
    assert float(load_record(yesterday, now)["spent"]) == 0.0
    assert float(load_record(b"\xff\x00junk", now)["spent"]) == 0.0
