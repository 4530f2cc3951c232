"""`adpulse bench eos --smoke`: both guarantees run, at_least_once loses nothing after kill -9.

The bench starts its own Apache Kafka, so this runs the command exactly as a user
would. Speed is not asserted; completeness, shape and what was found are: under
faust-streaming 0.15.3, ``exactly_once`` runs and loses nothing, but an agent's
``out_topic.send`` to a topic the app does not consume goes out outside the
transaction (``TransactionManager.send`` finds no partition for it in the
consumer's metadata), so a kill -9 mid-transaction leaves committed duplicates.
If that assertion fails, Faust changed: re-measure before relying on it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from adpulse.cli import main

# Reproductions of findings (minutes of workers and kills): `make reproductions`, not
# `make test`, which must stay under 10 minutes.
pytestmark = [pytest.mark.integration, pytest.mark.reproduction]

EVENTS = 2_000


def _check_phase(r: dict[str, Any], kills: int) -> None:
    assert set(r) >= {"ok", "error", "events_per_s", "kills", "output", "table", "exact",
                      "log_problems"}  # fmt: skip
    assert r["ok"] is True, f"the worker failed: {r['error']}; log: {r['log_problems']}"
    assert r["error"] is None
    assert len(r["kills"]) == kills
    o, t = r["output"], r["table"]
    assert o["distinct"] == EVENTS and o["lost"] == 0, "an input event has no output record"
    assert o["unknown"] == 0
    assert o["records"] == EVENTS + o["duplicates"]
    assert t["keys"] == 64 and t["keys_in_changelog"] == 64
    assert t["under"] == 0, "the table lost increments"
    assert r["exact"] == (o["duplicates"] == 0 and t["keys_wrong"] == 0)


def test_bench_eos_smoke_measures_both_guarantees(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eos.json"
    assert main(["bench", "eos", "--smoke", "--json", str(out)]) == 0
    body = json.loads(out.read_text())["eos"]
    assert (body["events"], body["kills"], body["partitions"]) == (EVENTS, 1, 4)
    assert body["guarantees"] == ["at_least_once", "exactly_once"]
    assert body["broker"].startswith("Apache Kafka")

    for g in body["guarantees"]:
        cost = body["cost"][g]
        _check_phase(cost, kills=0)
        assert cost["exact"], f"{g} without kills: {cost['output']}, {cost['table']}"
        _check_phase(body["crash"][g], kills=1)
    ratio = body["eos_over_alo_events_per_s"]
    assert math.isclose(
        ratio,
        body["cost"]["exactly_once"]["events_per_s"]
        / body["cost"]["at_least_once"]["events_per_s"],
    )

    alo, eos = body["crash"]["at_least_once"], body["crash"]["exactly_once"]
    assert alo["output"]["lost"] == 0, "at_least_once lost events after kill -9"
    assert alo["kills"][0]["during_processing"], "the kill came after the work: nothing tested"
    assert "restart_s" in alo["kills"][0]  # a process after the kill read an event
    if eos["kills"][0]["during_processing"]:  # the finding, see the module docstring
        assert eos["output"]["duplicates"] > 0
        assert not eos["exact"]

    printed = capsys.readouterr().out
    assert "phase  guarantee" in printed
    assert "exactly_once / at_least_once events/s:" in printed
