"""`adpulse bench serve --smoke --workers 2`: two workers of one group share the requests.

Sent round robin (``--route any``), the requests for users the other worker owns are
forwarded; sent by ``GET /owners`` (``--route owner``), none is. Speed is not asserted;
that the second worker took partitions, how many requests went the long way, that every
request was answered or shed and none lost, and what the JSON says ran, are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adpulse.cli import main
from adpulse.core.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.long]


@pytest.mark.parametrize("route", ["any", "owner"])
def test_bench_serve_with_two_workers_loses_nothing_and_forwards_only_unrouted_requests(
    route: str,
    settings: Settings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ADPULSE_EMBEDDED_BROKER", "true")  # the session broker's dev key
    out = tmp_path / "serve.json"
    args = ["bench", "serve", "--smoke", "--workers", "2", "--route", route,
            "--json", str(out), "--bootstrap", settings.bootstrap]  # fmt: skip
    assert main(args) == 0
    sv = json.loads(out.read_text())["serve"]
    assert (sv["workers"], sv["route"]) == (2, route)
    assert sv["errors"] == 0
    for phase in ("alone", "with_ingest"):
        p = sv[phase]
        assert p["answered"] + p["shed"] == p["requests"] == 200, phase  # nothing else lost
        if route == "any":  # both workers own users: about half go the long way
            assert p["forwarded"] > 0, phase
            # a count, whatever each hop took: the hop histogram has one observation per forward
            assert p["forwards_counted"] == p["forwarded"], phase
        else:  # each request went to its user's owner
            assert p["forwarded"] == p["forwards_counted"] == 0, phase
    assert sv["forwarded"] >= sv["alone"]["forwarded"] + sv["with_ingest"]["forwarded"]
    printed = capsys.readouterr()
    assert "2 workers together" in printed.err  # each phase's progress line
    assert f"2 workers, routed to {route}," in printed.out  # the result line
