"""``adpulse simulate`` in small: the loop closes through the real broker and worker.

No policy is expected to win here (a few thousand decisions cannot show it);
the test checks the plumbing the big run's figures rest on: every decision
gets exactly one label, every clicked label is a click the simulator sent (and
every other sent click was counted late by the worker), all four arms serve,
`adpulse report` counts the same labels, and the outputs are written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adpulse.core.settings import Settings
from adpulse.report import read_feedback_topic, rows, tally
from adpulse.simulate import ARMS, SimConfig, simulate

pytestmark = pytest.mark.integration


@pytest.mark.long  # ~20 s: make test stays under 10 minutes
def test_a_small_simulation_closes_the_loop(
    settings: Settings, tmp_path: Path, taobao: Path
) -> None:
    cfg = SimConfig(decisions=1500, users=300, window_s=3.0, rate=300.0, bins=5,
                    label_wait_s=20.0, sample=taobao)  # fmt: skip
    summary = simulate(settings, cfg, tmp_path, log=lambda _: None)
    labels = summary["labels"]
    assert summary["decisions"] == 1500 and not summary["interrupted"]
    assert summary["filled"] == 1500 - summary["no_fill"] > 0
    assert labels["exactly_one"] == summary["filled"]
    assert labels["missing"] == labels["more_than_one"] == labels["unknown_decisions"] == 0
    # Every clicked label is a click the simulator sent; a sent click that labelled nothing
    # is one the worker counted as late (it reached the join after the window closed).
    assert labels["clicked_labels"] > 0 and labels["clicked_labels_without_a_click"] == 0
    late = labels["clicks_sent"] - labels["clicked_labels"]
    assert late == labels["clicks_sent_but_labelled_0"] == labels["late_clicks"]
    assert [a["arm"] for a in summary["arms"]] == [a for a, _ in ARMS]
    assert all(a["impressions"] > 0 for a in summary["arms"])
    png = tmp_path / "simulate.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["labels"] == json.loads(json.dumps(labels))
    # `adpulse report` reads the same ctr-feedback topic and counts the same labels.
    topic = f"{summary['topic_prefix']}ctr-feedback"
    t = tally(r for _, r in read_feedback_topic(settings, topic))
    table = rows(t, control="greedy")
    assert [r["arm"] for r in table] == ["greedy", "linucb", "random", "thompson"]
    assert {r["arm"]: r["impressions"] for r in table} == {
        a["arm"]: a["impressions"] for a in summary["arms"]
    }
    assert sum(r["clicks"] for r in table) == labels["clicked_labels"]


@pytest.mark.long  # ~90 s: a start model, the trainer and a worker on a small run
def test_a_simulation_with_the_trainer_draws_the_served_and_the_frozen_curve(
    settings: Settings, tmp_path: Path, taobao: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """simulate --trainer: candidates exported and published during the run; both models'
    online AUC per window on the same labels; where the start version served, its
    frozen scores equal the pCTR served with the label (the two curves are comparable)."""
    pytest.importorskip("torch")
    monkeypatch.setenv("ADPULSE_TRAIN_INTERVAL_S", "2")  # candidates within a short run
    cfg = SimConfig(decisions=2000, users=300, window_s=3.0, rate=300.0, bins=5,
                    label_wait_s=20.0, sample=taobao, trainer=True, start_rows=3000)  # fmt: skip
    summary = simulate(settings, cfg, tmp_path, log=lambda _: None)
    auc = summary["online_auc"]
    assert summary["labels"]["exactly_one"] == summary["filled"] > 0
    assert auc["trainer_exit_code"] is None  # it ran until the end
    assert auc["trainer_caught_up"] is True  # every label taken in before it was stopped
    # candidates exported from the labels and moved up into the registry (whether a worker
    # served one before the run ended depends on the box's speed: not asserted)
    assert auc["promoted"] and 1 <= auc["served_versions"] <= 1 + len(auc["promoted"])
    served, frozen = auc["models"]["served"], auc["models"]["frozen"]
    assert len(served["windows"]) == len(frozen["windows"]) == 5
    for s, f in zip(served["windows"], frozen["windows"], strict=True):
        assert (s["labels"], s["clicks"]) == (f["labels"], f["clicks"])  # the same labels
    assert sum(w["labels"] for w in served["windows"]) == summary["filled"]
    assert 0 < auc["labels_served_by_start"] <= summary["filled"]
    assert auc["start_labels_max_abs_diff"] < 1e-4
    for m in (served, frozen):
        assert set(m) == {"windows", "level", "floor", "windows_to_recover"}
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["online_auc"]["models"]["frozen"]["windows"] == frozen["windows"]
    assert (tmp_path / "simulate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
