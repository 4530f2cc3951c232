"""A worker serves a sequence model end to end: a user's behaviours reach the attention
block, and the decision carries the score that model gives with them."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adpulse.catalogtool import publish
from adpulse.core.settings import Settings
from scoring.embeddings import HashedEmbeddings
from scoring.featurespec import AdIndex, FeatureSpec, RequestFeatures, assemble_many, item_vectors
from scoring.registry import MODEL, SPEC
from scoring.scorer import OnnxScorer
from streams.runtime.topicadmin import create_topics
from tests.integration.test_decisions import (
    HOUR,
    LENIENT,
    Decisions,
    Oracle,
    Requests,
    TopicReader,
    Worker,
    ad,
    pseudonym,
    request,
    wait_catalog,
)

torch = pytest.importorskip("torch")
from scoring.model import CtrNet, export_onnx  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.long]  # make test stays under 10 minutes
CATS = [4756105, 982926, 2355072]


def _sequence_model(root: Path, spec: FeatureSpec) -> Path:
    torch.manual_seed(3)
    model = CtrNet(spec)
    with torch.no_grad():  # untrained weights are small: make the block move the score
        for p in model.attention.parameters():  # type: ignore[union-attr]
            p.mul_(6.0)
    d = root / "v1seq"
    export_onnx(model, d / MODEL, spec)
    (d / SPEC).write_text(spec.to_json())
    return d


def test_a_worker_serves_the_sequence_model_with_the_users_behaviours(
    settings: Settings, tmp_path: Path
) -> None:
    spec = replace(FeatureSpec.from_settings(settings), sequence=20)
    registry = tmp_path / "models"
    version = _sequence_model(registry, spec).name
    create_topics(settings)
    ads = [ad(f"sq-{i}", "seq", 1.0 + 0.1 * i, CATS[i % 3], item_id=500 + i) for i in range(6)]
    publish(settings.bootstrap, settings.topic("ad-catalog"), ads)
    extra = {
        "ADPULSE_MODEL_DIR": str(registry),
        "ADPULSE_ATTRIBUTION_WINDOW_S": "1",  # its label comes within seconds
        "ADPULSE_WATERMARK_IDLE_S": "1",
        **LENIENT,
    }
    worker = Worker(settings, tmp_path, extra).start()
    requests, decisions = Requests(settings), Decisions(settings)
    now = int(time.time() * 1000)
    user = "seq-user"
    # Sent newest first: the table orders them by event time.
    events = [
        {"event_id": f"sq-e{i}", "user_id": user, "kind": "click", "item_id": 500 + i % 6,
         "category_id": CATS[i % 3], "ts": now - (i + 1) * HOUR}
        for i in range(5)
    ]  # fmt: skip
    try:
        wait_catalog(worker, len(ads))
        requests.events(events + events[:2])  # two duplicates, dropped
        # By pseudonym: read where it is stored, not routed by Faust's table router (which
        # answered 500 until its producer's metadata knew the changelog topic).
        path = f"/pseudonyms/{pseudonym(user)}/interest"

        def lookup() -> dict[str, Any] | None:
            status, found = worker.get(path)
            return found if status == 200 else None

        worker.wait_until(
            lambda: len((lookup() or {}).get("sequence", [])) == 5, 60, "5 behaviours"
        )
        body = lookup()
        assert body is not None
        assert [b["ts"] for b in body["sequence"]] == sorted(
            (e["ts"] for e in events), reverse=True
        )

        requests.send([request("sq-r1", user, "seq")])
        decisions.wait(["sq-r1"])
        d = decisions.one("sq-r1")
        assert d["model_version"] == version and not d["policy"].startswith("fallback")
        newest_first = sorted(events, key=lambda e: -e["ts"])
        assert d["features"]["sequence"] == [[e["item_id"], e["category_id"]] for e in newest_first]

        # The served raw pCTR is the model's with those behaviours, not without them.
        oracle = Oracle(settings.with_(model_dir=str(registry)), ads, registry)
        index = AdIndex.build(ads, spec)
        rows = index.rows([d["ad_id"]])
        table = HashedEmbeddings(spec.dim, spec.embedding_seed)
        seq = item_vectors(table, [e["item_id"] for e in newest_first],
                           [e["category_id"] for e in newest_first], spec)  # fmt: skip
        vector = oracle.vector(body, d["ts"])
        scorer = OnnxScorer(registry / version / MODEL, device="cpu")

        def score(s: np.ndarray | None) -> float:
            x = assemble_many([RequestFeatures(vector, rows, "seq", None, s)], index, d["ts"], spec)
            return float(scorer.score(x)[0])

        assert d["pctr_raw"] == pytest.approx(score(seq), rel=1e-5, abs=1e-7)
        assert abs(score(seq) - score(None)) > 1e-4

        # The click join carries the behaviours into ctr-feedback: what training reads.
        labels = TopicReader(
            settings.bootstrap, settings.topic("ctr-feedback"), settings.partitions
        )
        try:

            def labelled() -> list[Any]:
                labels.poll()
                return [json.loads(v) for _, _, v in labels.records if b"sq-r1" in v]

            worker.wait_until(lambda: bool(labelled()), 60, "the decision's label")
            assert labelled()[0]["features"]["sequence"] == d["features"]["sequence"]
        finally:
            labels.close()
    finally:
        requests.close()
        decisions.close()
        worker.stop()
