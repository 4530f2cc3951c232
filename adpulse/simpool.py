"""``adpulse simulate --seeds``: one closed-loop run per seed, then each arm against greedy,
per seed and pooled.

One seed is one world and one traffic: a policy's lead on it may be luck (issue 17 found
LinUCB above greedy on seed 7 and below it on another). Pooled, an arm's labels and clicks
are summed over the seeds (each run offers the same number of requests, so no seed
dominates) and compared with greedy's by a Wald 95% interval of the difference; per seed,
the same interval says whether the arm is below greedy there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from scoring.strategy.ab import diff_ci, wilson

CONTROL = "greedy"
PERIODS = ("whole", "after_drift")


def _counts(arm: dict[str, Any], period: str) -> tuple[int, int]:
    if period == "whole":
        return int(arm["clicks"]), int(arm["impressions"])
    return int(arm[period]["clicks"]), int(arm[period]["labels"])


def _versus(k: int, n: int, k0: int, n0: int) -> dict[str, Any]:
    lo, hi = wilson(k, n)
    dlo, dhi = diff_ci(k0, n0, k, n)
    ctr = k / n if n else math.nan
    return {"clicks": k, "labels": n, "ctr": ctr, "ci": [lo, hi],
            "diff": ctr - (k0 / n0 if n0 else math.nan), "diff_ci": [dlo, dhi]}  # fmt: skip


def pool(summaries: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """Per seed and pooled, for the whole run and after the drift: each arm's CTR and its
    difference from greedy with 95% intervals; ``below_control`` lists (seed, arm, period)
    where an arm's interval of the difference lies wholly below 0."""
    names = [a["arm"] for a in summaries[0]["arms"]]
    per_seed: list[dict[str, Any]] = []
    totals = {(a, p): [0, 0] for a in names for p in PERIODS}  # clicks, labels
    below: list[list[Any]] = []
    for seed, s in zip(seeds, summaries, strict=True):
        arms = {a["arm"]: a for a in s["arms"]}
        row: dict[str, Any] = {"seed": seed, "arms": {}}
        for p in PERIODS:
            k0, n0 = _counts(arms[CONTROL], p)
            for a in names:
                k, n = _counts(arms[a], p)
                totals[(a, p)][0] += k
                totals[(a, p)][1] += n
                v = _versus(k, n, k0, n0)
                row["arms"].setdefault(a, {})[p] = v
                if a != CONTROL and v["diff_ci"][1] < 0:
                    below.append([seed, a, p])
        per_seed.append(row)
    pooled: dict[str, Any] = {}
    for p in PERIODS:
        k0, n0 = totals[(CONTROL, p)]
        for a in names:
            k, n = totals[(a, p)]
            pooled.setdefault(a, {})[p] = _versus(k, n, k0, n0)
    out = {"seeds": list(seeds), "per_seed": per_seed, "pooled": pooled,
           "below_control": below}  # fmt: skip
    recovery = [_recovery(seed, s) for seed, s in zip(seeds, summaries, strict=True)
                if (s.get("online_auc") or {}).get("models")]  # fmt: skip
    if recovery:
        out["recovery"] = recovery
    return out


def _recovery(seed: int, summary: dict[str, Any]) -> dict[str, Any]:
    """A seed's online-AUC recovery per model (simulate --trainer; adpulse/simtrainer.py)."""
    models = summary["online_auc"]["models"]
    return {"seed": seed, **{name: {k: m[k] for k in ("level", "floor", "windows_to_recover")}
                             for name, m in models.items()}}  # fmt: skip


def _cell(v: dict[str, Any], control: bool) -> str:
    ctr = f"{100 * v['ctr']:.2f} [{100 * v['ci'][0]:.2f}, {100 * v['ci'][1]:.2f}]"
    if control:
        return ctr
    lo, hi = (100 * x for x in v["diff_ci"])
    return f"{ctr} ({100 * v['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}])"


def format_pool(result: dict[str, Any]) -> str:
    """A markdown table: CTR % [95% CI] and (difference from greedy in points [95% CI])."""
    names = list(result["pooled"])
    head = "| seed | period | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    rows = [(str(r["seed"]), r["arms"]) for r in result["per_seed"]]
    rows.append(("pooled", result["pooled"]))
    for seed, arms in rows:
        for p in PERIODS:
            cells = " | ".join(_cell(arms[a][p], a == CONTROL) for a in names)
            lines.append(f"| {seed} | {p.replace('_', ' ')} | {cells} |")
    below = result["below_control"]
    lines.append("")
    lines.append("below greedy (difference CI wholly under 0): "
                 + (", ".join(f"seed {s} {a} {p}" for s, a, p in below) or "none"))  # fmt: skip
    for r in result.get("recovery", []):
        parts = [f"{name} {_windows(m['windows_to_recover'])}"
                 for name, m in r.items() if name != "seed"]  # fmt: skip
        lines.append(f"seed {r['seed']}: online AUC back at its pre-drift level after "
                     + ", ".join(parts))  # fmt: skip
    return "\n".join(lines)


def _windows(k: int | None) -> str:
    return "never (within the run)" if k is None else f"{k} window(s)"
