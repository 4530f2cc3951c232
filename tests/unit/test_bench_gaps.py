"""``adpulse bench gaps``: the worker's decision call timed with gaps between calls.

Run for real at tiny sizes (the shipped model in ONNX Runtime, the decision stage on
in-memory tables); what is checked is the shape of its figures, never their speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adpulse.cli import main


def test_bench_gaps_smoke_times_every_gap_in_every_round(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gaps.json"
    assert main(["bench", "gaps", "--smoke", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["gaps"]
    assert res["gaps_ms"] == [0.0, 1.0]
    assert res["wait"] == "sleep"
    assert [len(v) for v in res["per_round"].values()] == [res["rounds"]] * 2
    # one figure per gap; what they are is the bench's to print, never a test's to judge
    for key in ("cpu_ms_per_decision", "ratio_to_first", "median_call_cpu_ms"):
        assert len(res[key]) == 2 and all(isinstance(x, float) for x in res[key]), key
    printed = capsys.readouterr().out
    assert printed.startswith("gaps: CPU ms per decision") and "1 ms" in printed


@pytest.mark.parametrize(
    ("args", "says"),
    [(["--gaps=1,x"], "--gaps takes"), (["--gaps=-1"], "--gaps takes"),
     (["--gaps=,"], "--gaps takes"), (["--gaps=nan"], "--gaps takes"),
     (["--gaps=1,1"], "--gaps names a gap twice"), (["--calls=0"], "--calls and --rounds"),
     (["--rounds=0"], "--calls and --rounds")],
)  # fmt: skip
def test_bench_gaps_refuses_bad_sizes_in_one_line(
    args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "gaps", *args]) == 4
    err = capsys.readouterr().err
    assert err.startswith(f"adpulse: error: {says}") and err.count("\n") == 1
