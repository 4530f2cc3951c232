"""`adpulse bench broker --smoke` on the embedded Apache Kafka: the echo loses nothing.

The bench starts its own broker (not the session one), so this runs the command
exactly as a user would. Speed is not asserted (not even that every window received
something); completeness, shape and the report's own bookkeeping are.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from adpulse.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.long]  # make test stays under 10 minutes


def test_bench_broker_smoke_receives_every_record_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "broker.json"
    assert main(["bench", "broker", "--smoke", "--brokers", "kafka", "--json", str(out)]) == 0
    body = json.loads(out.read_text())["broker"]
    assert body["brokers"] == ["kafka"]
    assert "tansu" not in body
    assert (body["rate"], body["duration_s"], body["window_s"], body["partitions"]) == (
        200.0, 10.0, 5.0, 4,
    )  # fmt: skip

    k = body["kafka"]
    assert k["name"] == "Apache Kafka"
    assert [w["end_s"] for w in k["windows"]] == [5.0, 10.0]
    for w in k["windows"]:
        assert set(w) == {"end_s", "sent", "received", "broker_cpu_percent", "p50_ms", "p99_ms"}
        assert w["sent"] == 1000  # not timing: the generator's quota per window (rate x window)
        # A window's latencies exist exactly when it received something. Whether each 5 s
        # window did (the stall) is the bench's figure, not a test's: a slow box may not.
        assert math.isfinite(w["p99_ms"]) == (w["received"] > 0)
        assert w["broker_cpu_percent"] > 0  # the broker's own process tree was measured
    assert k["sent"] == 2000
    assert k["received"] == k["sent"], "records sent but never consumed"
    assert k["not_received"] == 0
    assert k["received_after_load"] == k["received"] - sum(w["received"] for w in k["windows"])
    starved = [w["end_s"] for w in k["windows"] if w["received"] == 0]
    assert (k["starved"], k["starved_windows_end_s"]) == (bool(starved), starved)
    assert k["p99_last_over_first"] == pytest.approx(
        k["p99_last_ms"] / k["p99_first_ms"], nan_ok=True
    )

    printed = capsys.readouterr().out
    assert "kafka (Apache Kafka)" in printed
    assert "second     sent  received  broker_cpu%   p50_ms   p99_ms" in printed
