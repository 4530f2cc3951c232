"""Model registry faults against a real worker: every bad new version is refused, none serves.

Four broken versions, each newer than the serving one, are dropped into the
worker's ADPULSE_MODEL_DIR one after the other while ad requests keep coming:
a truncated file, wrong input names, NaN outputs, and a model about 40x slower
than the serving one (ADPULSE_MODEL_MAX_SLOWDOWN). Each must be refused (the refusal counter
on /metrics moves, the log names the version and why) and every decision must
still come from the serving version.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from adpulse.catalogtool import publish
from adpulse.core.settings import Settings
from scoring.registry import MODEL, PACKAGED
from streams.runtime.topicadmin import create_topics
from tests.faults.kit import Worker
from tests.integration.test_decisions import Decisions, Requests, ad, request, wait_catalog
from tests.modelfaults import corrupt, nan_model, publish_version, renamed_inputs, slow_model

pytestmark = pytest.mark.integration
# The slow version is refused by the side-by-side ratio (a figure of one run, whatever the
# box), not by an absolute budget: the shipped model ~1 ms per 100 rows, the slow one ~40x.
MAX_SLOWDOWN = 5.0
CASES = [
    ("truncated", corrupt, "ONNX Runtime cannot load"),
    ("renamed-inputs", renamed_inputs, "inputs ["),
    ("nan-outputs", nan_model, "NaN"),
    ("too-slow", slow_model(layers=80), "slower than serving"),
]


def test_each_bad_new_version_is_refused_and_decisions_keep_the_serving_model(
    settings: Settings, tmp_path: Path
) -> None:
    shipped = sorted(p for p in PACKAGED.iterdir() if (p / MODEL).is_file())[-1]
    registry = tmp_path / "models"
    registry.mkdir()
    shutil.copytree(shipped, registry / shipped.name)
    create_topics(settings)
    ads = [ad(f"mf-{i}", "mf", 1.0 + 0.1 * i, 4756105) for i in range(6)]
    publish(settings.bootstrap, settings.topic("ad-catalog"), ads)
    extra = {
        "ADPULSE_MODEL_DIR": str(registry),
        "ADPULSE_MODEL_POLL_S": "0.2",
        "ADPULSE_MODEL_LATENCY_BUDGET_MS": "inf",  # no absolute timing: the ratio refuses
        "ADPULSE_MODEL_MAX_SLOWDOWN": str(MAX_SLOWDOWN),
    }
    worker = Worker(settings, tmp_path, extra).start()
    requests, decisions = Requests(settings), Decisions(settings)
    sent: list[str] = []

    def refused() -> float:
        return worker.metric("adpulse_model_swaps_total", 'outcome="refused"')

    def stream_until(n_refused: int, what: str) -> None:
        """A request every 40 ms until ``n_refused`` refusals are counted."""
        deadline = time.monotonic() + 30  # bench-ok: a wait bound
        while refused() < n_refused:
            assert time.monotonic() < deadline, (  # bench-ok: a wait bound
                f"{what} never refused:\n{worker.tail()}"
            )  # bench-ok
            rid = f"mf{len(sent)}"
            requests.send([request(rid, f"user{len(sent) % 31}", "mf")])
            sent.append(rid)
            decisions.poll(timeout_ms=40)

    try:
        wait_catalog(worker, len(ads))
        versions = []
        for i, (name, build, _) in enumerate(CASES, start=1):
            version = f"{shipped.name}Z{i}-{name}"
            publish_version(registry, version, build, shipped)
            versions.append(version)
            stream_until(i, version)
        for _ in range(10):
            rid = f"mf{len(sent)}"
            requests.send([request(rid, f"user{len(sent) % 31}", "mf")])
            sent.append(rid)
        decisions.wait(sent, timeout=30, settle=0.5)

        got = [decisions.one(rid) for rid in sent]  # exactly one decision per request
        assert Counter(d["model_version"] for d in got) == {shipped.name: len(sent)}
        assert all(d["ad_id"] is not None and not d["policy"].startswith("fallback") for d in got)
        assert refused() == len(CASES)
        assert worker.metric("adpulse_model_swaps_total", 'outcome="swapped"') == 0
        log = worker.log_path.read_text(errors="replace")
        for version, (_, _, reason) in zip(versions, CASES, strict=True):
            line = log.split(f"model {version} refused", 1)[1].splitlines()[0]
            assert reason in line, f"{version}: {line}"
    finally:
        requests.close()
        decisions.close()
        worker.stop()
