"""Budget pacing and the feature snapshot in a real worker: real broker, shipped model.

One campaign outbids the other ten to one but has a budget worth a few
impressions a day: without pacing greedy would serve it on every request until
its share is gone. With pacing it is throttled after its first spend (the
window closes early and the controller sees an offered rate far above the
plan), the other campaign serves the rest, and the pacing metrics say so.
Users with events get decisions whose snapshot carries their interest vector,
and the click join carries it into ctr-feedback.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from adpulse.catalogtool import publish
from adpulse.core.settings import Settings
from schemas import first_error
from streams.runtime.topicadmin import create_topics
from tests.integration.test_decisions import (
    HOUR,
    LENIENT,
    Decisions,
    Requests,
    TopicReader,
    Worker,
    ad,
    request,
    wait_catalog,
)

pytestmark = [pytest.mark.integration, pytest.mark.long]  # make test stays under 10 minutes


def test_an_overspending_campaign_is_throttled_and_feedback_carries_the_snapshot(
    settings: Settings, tmp_path: Path
) -> None:
    create_topics(settings)
    budget = 0.04 * settings.partitions  # a share per partition of about 1% of one impression
    ads = [ad("tight-0", "pace", 10.0, 4756105, campaign_id="c-tight", daily_budget=budget),
           ad("loose-0", "pace", 1.0, 982926, campaign_id="c-loose")]  # fmt: skip
    publish(settings.bootstrap, settings.topic("ad-catalog"), ads)
    extra = {"ADPULSE_PLACEMENT_POLICIES": "pace=greedy", "ADPULSE_ATTRIBUTION_WINDOW_S": "2",
             "ADPULSE_WATERMARK_IDLE_S": "1", **LENIENT}  # fmt: skip
    worker = Worker(settings, tmp_path, extra).start()
    requests, decisions = Requests(settings), Decisions(settings)
    feedback = TopicReader(settings.bootstrap, settings.topic("ctr-feedback"), settings.partitions)
    try:
        wait_catalog(worker, len(ads))
        users = [f"fan{i}" for i in range(6)]
        now = int(time.time() * 1000)
        requests.events([
            {"event_id": f"{u}-e{k}", "user_id": u, "kind": "cart", "item_id": 1000 + k,
             "category_id": 4756105, "ts": now - (k + 1) * HOUR}
            for u in users for k in range(3)
        ])  # fmt: skip
        worker.wait_until(lambda: all(worker.interest(u) for u in users), 20, "interest vectors")

        sent: list[dict[str, Any]] = []
        for wave in range(4):  # one wave at a time: each sees the spend of the ones before
            reqs = [request(f"p{wave}-{i}", f"w{wave}-{i}", "pace") for i in range(20)]
            if wave == 3:
                reqs += [request(f"fan-{u}", u, "pace") for u in users]
            requests.send(reqs)
            decisions.wait([r["request_id"] for r in reqs])
            sent += reqs
        got = [decisions.one(r["request_id"]) for r in sent]
        for d in got:
            body = {k: v for k, v in d.items() if k != "_partition"}
            assert first_error("ad-decisions", body) is None, first_error("ad-decisions", body)
        # The first wave finds tight in its first window (p = 1: greedy serves it), spends
        # far more than 1% of its budget and closes that window: from the next batch on it
        # takes part with p = 1e-4, so later waves (66 requests) get the other campaign.
        first, later = got[:20], got[20:]
        assert any(d["ad_id"] == "tight-0" for d in first)
        assert sum(d["ad_id"] == "tight-0" for d in later) <= 1
        assert all(d["candidates"] == 1 for d in later if d["ad_id"] == "loose-0")
        assert worker.metric("adpulse_pacing_throttled_total", 'campaign="c-tight"') > 0
        assert worker.metric("adpulse_pacing_throttled_total", 'campaign="c-loose"') == 0

        def gauge(name: str, campaign: str) -> float:
            return worker.metric(name, f'campaign="{campaign}"')

        worker.wait_until(lambda: gauge("adpulse_pacing_budget", "c-tight") > 0, 20, "gauges")
        assert gauge("adpulse_pacing_participation", "c-loose") == 1.0
        assert gauge("adpulse_pacing_participation", "c-tight") < 0.01
        assert gauge("adpulse_pacing_spend", "c-tight") > 0

        # The fans' decisions snapshot their interest vectors; the join carries them on.
        fans = {r["request_id"]: decisions.one(r["request_id"]) for r in sent[-len(users) :]}
        for d in fans.values():
            assert len(d["features"]["interest"]) == settings.dim
            assert any(d["features"]["interest"]) and d["features"]["pctr"] == d["pctr_raw"]
        labels: dict[str, dict[str, Any]] = {}

        def labelled() -> bool:
            feedback.poll()
            for _, _, value in feedback.records:
                body = json.loads(value)
                labels[body["decision_id"]] = body
            return set(fans) <= set(labels)

        worker.wait_until(labelled, 30, "labels of the fans' decisions")
        for rid, d in fans.items():
            lab = labels[rid]
            assert first_error("ctr-feedback", lab) is None
            assert lab["features"]["interest"] == pytest.approx(
                d["features"]["interest"], rel=1e-3, abs=1e-3
            )
            assert lab["features"]["pctr"] == pytest.approx(d["pctr_raw"])
    finally:
        feedback.close()
        requests.close()
        decisions.close()
        worker.stop()


def test_cpc_spend_is_the_sum_of_the_bids_of_clicked_decisions_cpm_is_charged_when_decided(
    settings: Settings, tmp_path: Path
) -> None:
    create_topics(settings)
    ads = [ad("cpc-a", "bill", 0.7, 4756105, campaign_id="c-cpc", billing="cpc"),
           ad("cpc-b", "bill", 1.3, 982926, campaign_id="c-cpc", billing="cpc"),
           ad("cpm-a", "bill", 2.0, 4756105, campaign_id="c-cpm")]  # fmt: skip
    publish(settings.bootstrap, settings.topic("ad-catalog"), ads)
    extra = {"ADPULSE_PLACEMENT_POLICIES": "bill=greedy", **LENIENT}
    worker = Worker(settings, tmp_path, extra).start()
    requests, decisions = Requests(settings), Decisions(settings)
    feedback = TopicReader(settings.bootstrap, settings.topic("ctr-feedback"), settings.partitions)

    def spend(campaign: str) -> float:
        return worker.metric("adpulse_pacing_spend", f'campaign="{campaign}"')

    try:
        wait_catalog(worker, len(ads))
        # One request per ad in turn, each with that ad as its only candidate.
        reqs = [request(f"bill-{i}", f"bill-u{i}", "bill", candidates=[ads[i % 3]["ad_id"]])
                for i in range(36)]  # fmt: skip
        requests.send(reqs)
        decisions.wait([r["request_id"] for r in reqs])
        got = [decisions.one(r["request_id"]) for r in reqs]
        assert [d["ad_id"] for d in got] == [r["candidates"][0] for r in reqs]
        for d in got:
            body = {k: v for k, v in d.items() if k != "_partition"}
            assert first_error("ad-decisions", body) is None, first_error("ad-decisions", body)
            assert d["billing"] == ("cpm" if d["ad_id"] == "cpm-a" else "cpc")
        cpm = [d for d in got if d["billing"] == "cpm"]
        expected_cpm = sum(d["score"] for d in cpm)
        worker.wait_until(lambda: spend("c-cpm") == pytest.approx(expected_cpm), 20, "cpm spend")
        assert spend("c-cpc") == 0.0  # deciding charges a cpc campaign nothing

        clicked = got[::5]  # both billings, every partition the requests went to
        clicks = clicked + clicked[:2]  # two of them clicked twice: one label, one charge
        time.sleep(0.3)  # a person's click: one at the broker sooner than 150 ms is too_fast
        requests.events([
            {"event_id": f"click-{n}", "user_id": r["user_id"], "kind": "click", "item_id": 1,
             "category_id": 4756105, "ts": d["ts"] + 1000, "ad_id": d["ad_id"],
             "decision_id": d["request_id"]}
            for n, d in enumerate(clicks)
            for r in reqs if r["request_id"] == d["request_id"]
        ])  # fmt: skip
        labels: dict[str, list[dict[str, Any]]] = {}

        def labelled() -> bool:
            feedback.poll()
            labels.clear()
            for _, _, value in feedback.records:
                body = json.loads(value)
                labels.setdefault(body["decision_id"], []).append(body)
            return all(d["request_id"] in labels for d in clicked)

        worker.wait_until(labelled, 30, "labels of the clicked decisions")
        assert all([lab["clicked"] for lab in labels[d["request_id"]]] == [1] for d in clicked)
        paid = [d for d in clicked if d["billing"] == "cpc"]
        assert {d["ad_id"] for d in paid} == {"cpc-a", "cpc-b"}
        expected_cpc = sum(d["bid"] for d in paid)
        worker.wait_until(
            lambda: spend("c-cpc") == pytest.approx(expected_cpc), 20, "cpc spend settled"
        )
        assert spend("c-cpm") == pytest.approx(expected_cpm)  # clicks do not charge cpm again
    finally:
        feedback.close()
        requests.close()
        decisions.close()
        worker.stop()
