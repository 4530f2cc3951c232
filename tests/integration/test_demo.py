"""`adpulse demo` end to end, shortened: what `make demo` runs, on the session's broker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from adpulse.core.settings import Settings

pytestmark = pytest.mark.integration


@pytest.mark.long  # ~38 s: make test stays under 10 minutes
def test_demo_runs_to_its_summary_and_writes_its_plots(
    settings: Settings, taobao: Path, tmp_path: Path
) -> None:
    out = tmp_path / "demo"
    env = {**os.environ, "ADPULSE_BOOTSTRAP": settings.bootstrap, "ADPULSE_EMBEDDED_BROKER": "true"}
    done = subprocess.run(
        [sys.executable, "-m", "adpulse.cli", "demo", "--seconds", "8", "--out", str(out),
         "--data", str(taobao.parent)],
        env=env, capture_output=True, text=True, timeout=300,  # bench-ok: a wait bound
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["messages"] == 4321  # the whole Taobao sample landed
    assert summary["interest"]["users_with_state"] == summary["users"]
    # The 2017 sample is replayed shifted to now on the worker's clock (its gaps compressed
    # to the 120 s half-life): live state, not vectors decayed to zero.
    assert any(x != 0 for x in summary["interest"]["example_vector_head"])
    example = summary["decisions"]["example"]
    assert example is not None and any(x != 0 for x in example["features"]["interest"])
    assert not re.search(r"-0\.0(?!\d)", done.stdout)  # rounded to 0.0, never signed zeros
    # It serves the shipped sequence model, and its decisions were scored with the sequence.
    model = summary["model"]
    assert (model["sequence"], model["heads"]) == (50, 2)
    assert model["version"] == example["model_version"]
    assert model["with_sequence"] > 0 and model["with_pcvr"] > 0
    assert f"served model {model['version']}: attention over the last 50 behaviours" in done.stdout
    live = summary["live"]
    assert live["decisions"] > 0
    assert live["events"] >= 4321
    # Every arm of the experiment served and was labelled.
    assert {"greedy", "random"} <= set(live["ctr_by_policy"])
    assert summary["simulation"]["labels"]["more_than_one"] == 0
    for png in ("ctr_by_policy.png", "latency.png", "simulate.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "/metrics" in done.stdout
