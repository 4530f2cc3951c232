"""A two-head model served by a real worker: its decisions carry pCVR (issue 16, item 6).

The model is trained here by ``adpulse train``'s code on synthetic labels with
conversions, so it has its pCVR head; the worker serves it from its registry.
A cost-per-conversion ad's decision carries ``pcvr`` at the top and in its
feature snapshot, its score is pCTR x pCVR x bid, and it is schema-valid.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from adpulse.catalogtool import publish
from adpulse.core.settings import Settings
from schemas import first_error
from streams.runtime.topicadmin import create_topics
from tests.integration.test_decisions import (
    LENIENT,
    Decisions,
    Requests,
    Worker,
    ad,
    request,
    wait_catalog,
)

pytestmark = pytest.mark.integration
pytest.importorskip("torch")


def test_a_worker_serving_a_two_head_model_puts_pcvr_in_the_decision(
    settings: Settings, tmp_path: Path
) -> None:
    from scoring.train import run_train  # needs torch: imported after the skip

    registry = tmp_path / "models"
    m = run_train(None, 20_000, registry, seed=5, epochs=1, threads=1, version="v0001")
    assert m["heads"] == 2
    create_topics(settings)
    ads = [
        ad("cvr-click", "cvr", 1.0, 4756105, billing="cpc"),
        ad("cvr-buy", "cvr", 20.0, 982926, billing="cpa", item_id=982926001),
    ]
    publish(settings.bootstrap, settings.topic("ad-catalog"), ads)
    extra = {"ADPULSE_MODEL_DIR": str(registry), "ADPULSE_POLICY": "greedy", **LENIENT}
    worker = Worker(settings, tmp_path, extra).start()
    requests, decisions = Requests(settings), Decisions(settings)
    try:
        wait_catalog(worker, len(ads))
        reqs = [request(f"cvr-{i}", f"u{i}", "cvr", candidates=[a["ad_id"]])
                for i, a in enumerate(ads)]  # fmt: skip
        requests.send(reqs)
        decisions.wait([r["request_id"] for r in reqs], timeout=60)
        click, buy = (decisions.one(r["request_id"]) for r in reqs)
        for d in (click, buy):
            body = {k: v for k, v in d.items() if k != "_partition"}
            assert first_error("ad-decisions", body) is None
            assert d["model_version"] == "v0001" and not d["policy"].startswith("fallback")
            assert 0 < d["pcvr"] < 1 and d["features"]["pcvr"] == d["pcvr"]
        assert (buy["ad_id"], buy["billing"]) == ("cvr-buy", "cpa")
        assert buy["score"] == pytest.approx(buy["pctr"] * buy["pcvr"] * 20.0, rel=1e-6)
        assert click["score"] == pytest.approx(click["pctr"] * 1.0, rel=1e-6)
    finally:
        requests.close()
        decisions.close()
        worker.stop()
