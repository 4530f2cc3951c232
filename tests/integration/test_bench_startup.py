"""`adpulse bench startup --smoke` on the embedded Apache Kafka: every worker loads its catalog.

The bench starts its own broker (not the session one), fills it with two topic
sets, then starts two fresh workers in a row and waits for each one's 42 ads.
Speed is not asserted; that each worker became ready and loaded the whole
catalog (no stall) is, and so is the shape of the JSON the run writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from adpulse.cli import main

# Reproductions of findings (minutes of workers and kills): `make reproductions`, not
# `make test`, which must stay under 10 minutes.
pytestmark = [pytest.mark.integration, pytest.mark.reproduction]


def test_bench_startup_smoke_on_kafka_loads_every_catalog(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "startup.json"
    assert main(["bench", "startup", "--smoke", "--brokers", "kafka", "--json", str(out)]) == 0
    body = json.loads(out.read_text())["startup"]
    assert body["brokers"] == ["kafka"]
    assert "tansu" not in body
    sizes = (body["fill_sets"], body["fill_events"], body["workers"], body["ads"])
    assert sizes == (2, 1000, 2, 42)

    k = body["kafka"]
    assert k["name"] == "Apache Kafka"
    fill = k["fill"]
    assert (fill["sets"], fill["events_per_set"], fill["topics"]) == (2, 1000, 16)
    assert [run["ok"] for run in fill["worker_runs"]] == [True]  # the fill worker finished
    assert (k["started"], k["ready"], k["not_ready"]) == (2, 2, 0)
    assert k["stalls"] == 0, [w.get("log_tail") for w in k["workers"]]
    assert k["loaded"] == 2
    assert [w["worker"] for w in k["workers"]] == [1, 2]
    for w in k["workers"]:
        assert w["ready"] is True and w["stalled"] is False
        assert w["catalog_ads"] == 42
        assert math.isfinite(w["start_to_ready_s"]) and math.isfinite(w["ready_to_catalog_s"])
        assert w["health"].startswith("200")
        assert w["group"]["state"] == "Stable"
        assert w["group"]["catalog_partitions_assigned"] == 4  # one member holds all four
        parts = w["partitions"]
        assert sum(p["records_read"] for p in parts) == 42  # the broker holds the whole catalog
        assert all(p["committed"] == p["end_offset"] for p in parts)  # the worker read it all
    assert k["ready_to_catalog_max_s"] == max(w["ready_to_catalog_s"] for w in k["workers"])
    assert "log_dir" not in body  # kept only when a worker stalled or never became ready

    printed = capsys.readouterr().out
    assert "kafka (Apache Kafka)" in printed
    assert "start->ready_s ready->catalog_s" in printed
    assert "kafka: 2 started, 2 ready, 0 stalled" in printed
