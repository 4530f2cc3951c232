"""Online learning end to end: ctr-feedback into a real worker moves its Thompson decisions.

Labels are produced straight to ctr-feedback (the joiner is not under test here):
one ad gets clicks, its rivals none, and the placement's Thompson policy must
shift its decisions to that ad within a bounded wait (liveness, not a timing).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from adpulse.catalogtool import publish
from adpulse.core.settings import Settings
from schemas import first_error
from streams.runtime.topicadmin import create_topics
from tests.integration.test_decisions import LENIENT, Decisions, Requests, Worker, ad, request
from tests.integration.test_decisions import wait_catalog as wait_ads

pytestmark = [pytest.mark.integration, pytest.mark.long]  # make test stays under 10 minutes


def feedback(i: int, ad_id: str, clicked: int) -> dict[str, Any]:
    now = int(time.time() * 1000)
    body = {"decision_id": f"past-{i}", "ad_id": ad_id, "user_id": f"old{i % 50}",
            "clicked": clicked, "decision_ts": now - 60_000, "label_ts": now,
            "features": {"interest": [], "placement": "bandit", "pctr": 0.02},
            "propensity": 0.25, "policy": "thompson(m=5)", "reason": "test"}  # fmt: skip
    assert first_error("ctr-feedback", body) is None
    return body


def test_clicks_on_one_ad_shift_thompson_decisions_to_it(
    settings: Settings, tmp_path: Path
) -> None:
    create_topics(settings)
    ads = [ad(f"tb-{i}", "bandit", 1.0, 4756105) for i in range(4)]
    publish(settings.bootstrap, settings.topic("ad-catalog"), ads)
    extra = {"ADPULSE_PLACEMENT_POLICIES": "bandit=thompson:5", **LENIENT}
    worker = Worker(settings, tmp_path, extra).start()
    requests, decisions = Requests(settings), Decisions(settings)
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, linger_ms=2, acks=1)
    n = 0

    def round_of(k: int) -> list[dict[str, Any]]:
        nonlocal n
        reqs = [request(f"lr{n + i}", f"reader{n + i}", "bandit") for i in range(k)]
        n += k
        requests.send(reqs)
        decisions.wait([r["request_id"] for r in reqs], timeout=15)
        return [decisions.one(r["request_id"]) for r in reqs]

    try:
        wait_ads(worker, len(ads))
        before = round_of(40)
        winner = "tb-2"
        labels = [feedback(i, a["ad_id"], int(a["ad_id"] == winner)) for i in range(60)
                  for a in ads]  # fmt: skip
        for i, body in enumerate(labels):
            producer.send(
                settings.topic("ctr-feedback"),
                key=body["ad_id"].encode(),
                value=json.dumps({**body, "decision_id": f"past-{i}"}).encode(),
            )
        producer.flush()
        worker.wait_until(lambda: worker.metric("adpulse_feedback_labels_total") == len(labels),
                          20, "every label applied")  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            after = round_of(40)
            share = sum(d["ad_id"] == winner for d in after) / len(after)
            if share >= 0.9:
                break
            assert time.monotonic() < deadline, f"decisions never shifted: {share:.2f}"  # bench-ok
        for d in before + after:
            body = {k: v for k, v in d.items() if k != "_partition"}
            assert first_error("ad-decisions", body) is None, first_error("ad-decisions", body)
            assert d["policy"] == "thompson(m=5)" and 0 < d["propensity"] <= 1
        # Before any label, Thompson spread its picks over the four equal ads.
        assert len({d["ad_id"] for d in before}) > 1
        assert worker.metric("adpulse_feedback_labels_total", 'outcome="applied"') == len(labels)
    finally:
        producer.close()
        requests.close()
        decisions.close()
        worker.stop()


def test_a_half_life_fades_older_labels_in_the_worker(settings: Settings, tmp_path: Path) -> None:
    """ADPULSE_BANDIT_HALF_LIFE_H reaches the worker's learner: ten clicked labels an hour
    older than ten unclicked ones count half, whichever arrives first (the newer here)."""
    create_topics(settings)
    worker = Worker(settings, tmp_path, {"ADPULSE_BANDIT_HALF_LIFE_H": "1", **LENIENT}).start()
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, linger_ms=2, acks=1)
    t1 = int(time.time() * 1000) - 600_000
    try:
        for i in range(20):  # the newer hour first: order must not matter
            body = {**feedback(i, "fade-0", int(i >= 10)), "decision_id": f"fade-{i}",
                    "decision_ts": t1 - 3_600_000 * (i >= 10), "label_ts": t1}  # fmt: skip
            assert first_error("ctr-feedback", body) is None
            producer.send(settings.topic("ctr-feedback"), key=b"fade-0",
                          value=json.dumps(body).encode())  # fmt: skip
        producer.flush()

        def counts() -> tuple[float, float]:
            status, state = worker.get("/ads/fade-0/strategy", authorized=False)
            if status != 200:
                return (0.0, 0.0)
            return (round(state["shows"], 9), round(state["clicks"], 9))

        worker.wait_until(lambda: counts() == (15.0, 5.0), 30, "10 + 5 shows, 5 clicks")
    finally:
        producer.close()
        worker.stop()
