"""``adpulse report``: ctr-feedback counted per arm, intervals and tests as documented."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adpulse.cli import main
from adpulse.core.errors import InputError
from adpulse.report import rows, tally
from scoring.strategy.ab import compare, two_proportion_z, wilson


def rec(i: int, clicked: int, arm: str | None, **extra: Any) -> dict[str, Any]:
    policy = {"c": "greedy", "t": "thompson(m=20)"}.get(arm or "", "greedy")
    body = {"decision_id": f"d{i}", "ad_id": "a", "user_id": "u", "clicked": clicked}
    body.update({"policy": policy, **extra})
    if arm is not None:
        body["arm"] = arm
    return body


def test_labels_are_impressions_conversions_separate_duplicates_once() -> None:
    recs = [rec(i, int(i < 30), "c") for i in range(300)]
    recs += [rec(1000 + i, int(i < 45), "t") for i in range(300)]
    recs += [
        rec(0, 1, "c", converted=1),
        rec(1000, 1, "t", converted=1),
        rec(1001, 1, "t", converted=1),
    ]
    recs += [rec(5, 1, "c"), rec(1000, 1, "t", converted=1)]  # the joiner's duplicate window
    t = tally(recs)
    assert t.by == "arm" and t.duplicates == 2
    assert t.counts == {"c": [300, 30, 1], "t": [300, 45, 2]}
    assert t.policies == {"c": "greedy", "t": "thompson(m=20)"}
    table = rows(t, control="c")
    assert [r["arm"] for r in table] == ["c", "t"] and table[0]["control"]
    _, p = two_proportion_z(30, 300, 45, 300)
    assert table[1]["ctr_diff"] == pytest.approx(0.05) and table[1]["ctr_p"] == pytest.approx(p)
    assert table[1]["ctr_ci"] == wilson(45, 300) and table[1]["cvr"] == pytest.approx(2 / 45)


def test_without_arms_records_are_grouped_by_policy() -> None:
    t = tally([rec(1, 1, None, policy="linucb"), rec(2, 0, None), rec(3, 0, None)])
    assert t.by == "policy" and t.counts == {"linucb": [1, 1, 0], "greedy": [2, 0, 0]}
    assert rows(t)[0]["arm"] == "greedy"  # no "control": the first by name
    with pytest.raises(InputError, match=r"control .x. is not a policy in the records"):
        rows(t, control="x")


def test_compare_matches_a_batch_recompute() -> None:
    rng = np.random.default_rng(3)
    counts = np.array([[n, rng.binomial(n, 0.05), 0] for n in (500, 800, 1200)], dtype=np.int64)
    counts[:, 2] = counts[:, 1] // 3
    for r, (n, k, c) in zip(compare(["a", "b", "c"], counts), counts.tolist(), strict=True):
        p0 = counts[0, 1] / counts[0, 0]
        pooled = (counts[0, 1] + k) / (counts[0, 0] + n)
        se = math.sqrt(pooled * (1 - pooled) * (1 / counts[0, 0] + 1 / n))
        z = (k / n - p0) / se if se else math.nan
        assert r["ctr"] == k / n and r["cvr"] == c / k
        if r["control"]:
            assert r["ctr_p"] == 1.0 or math.isnan(r["ctr_z"]) or r["ctr_z"] == 0
        else:
            assert r["ctr_z"] == pytest.approx(z)
            assert r["ctr_p"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not JSON"),
        ('{"clicked": 1}', "no decision_id"),
        ('{"decision_id": "d", "clicked": 2}', "clicked must be 0 or 1"),
        ('{"decision_id": "d", "clicked": 1, "converted": true}', "converted must be 0 or 1"),
        ("[1, 2]", "expected a ctr-feedback JSON object"),
    ],
)
def test_bad_lines_end_in_one_line_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, message: str
) -> None:
    path = tmp_path / "fb.jsonl"
    path.write_text(json.dumps(rec(1, 0, "c")) + "\n\n" + line + "\n")
    assert main(["report", str(path)]) == InputError.exit_code
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"adpulse: error: {path}:3: ") and message in err and "\n" not in err


def test_report_prints_a_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "fb.jsonl"
    recs = [rec(i, int(i % 10 == 0), "control" if i % 2 else "t") for i in range(400)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "400 labelled decisions by arm" in out and "control" in out.splitlines()[2]
    assert main(["report", str(path), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert [g["arm"] for g in body["groups"]] == ["control", "t"]
    assert sum(g["impressions"] for g in body["groups"]) == 400
    assert body["groups"][0]["ctr_diff"] == 0.0
    missing = tmp_path / "none.jsonl"
    assert main(["report", str(missing)]) == InputError.exit_code
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["report", str(empty)]) == InputError.exit_code
