"""Results of ``adpulse simulate``: the labels counted per arm, regret, the table, JSON and PNG.

Definitions (also in docs/evaluation.md, "Definitions"):

* **CTR** of an arm: clicked labels / labels, from ``ctr-feedback`` (what the
  engine learned from), with a 95% Wilson interval; over the run, before the
  drift, after it, and over the last quarter of the run (the recovery);
* **expected CTR**: the mean true click probability of the ads the arm chose
  (the world's, not a draw): the same ranking with far less noise;
* **oracle regret**: sum over the arm's decisions of (true CTR of the best ad
  the user was eligible for at that moment - true CTR of the ad chosen), in
  expected clicks: the myopic oracle knows the world, the user's drifted
  interest and their fatigue, and respects the frequency cap;
* **regret against the best arm in hindsight**: (CTR of the best arm - CTR of
  this arm) x this arm's labels, in clicks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from adpulse.jsonout import finite
from scoring.simulation import TaobaoFit, World, WorldParams, fit_taobao, make_world
from scoring.strategy.ab import compare, wilson

if TYPE_CHECKING:
    from adpulse.simulate import Run, SimConfig

SAMPLE = Path("../shared/data/taobao_userbehavior_sample.csv")
COLOURS = {
    "greedy": "tab:blue",
    "random": "tab:gray",
    "thompson": "tab:orange",
    "linucb": "tab:green",
}


def load_world(seed: int, sample: Path = SAMPLE, users: int = 2000) -> World:
    """The world fitted to the Taobao sample when it is there, else to its recorded figures."""
    fit = TaobaoFit()
    if sample.is_file():
        from adpulse.replay import read_taobao  # noqa: PLC0415

        fit = fit_taobao((e.user_id, e.category_id, e.kind) for e in read_taobao(sample))
    return make_world(WorldParams(users=users), seed, fit)


def progress_line(run: Run) -> str:
    took = time.monotonic() - run.started
    ctr = {}
    for a, lab in _by_arm_labels(run).items():
        ctr[a] = f"{100 * sum(lab) / len(lab):.2f}%" if lab else "-"
    return (
        f"  {run.decided:,}/{run.n_requests:,} decisions ({run.decided / took:,.0f}/s), "
        f"{len(run.labels):,} labels; CTR so far "
        + " ".join(f"{a} {c}" for a, c in sorted(ctr.items()))
    )


def _by_arm_labels(run: Run) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for did, arm in zip(run.decision_ids, run.arm, strict=True):
        lab = run.labels.get(did)
        if lab:
            out.setdefault(arm, []).append(lab[0])
    return out


def _rate(k: float, n: float) -> dict[str, Any]:
    lo, hi = wilson(k, n)
    return {"labels": int(n), "clicks": int(k), "ctr": k / n if n else None, "ci": [lo, hi]}


def summarise(run: Run, cfg: SimConfig, world: World, extra: dict[str, Any]) -> dict[str, Any]:
    order = np.argsort(np.asarray(run.index, dtype=np.int64), kind="stable")
    idx = np.asarray(run.index, dtype=np.int64)[order]
    arm = np.asarray(run.arm)[order]
    pc = np.asarray(run.p_chosen, dtype=np.float64)[order]
    pb = np.asarray(run.p_best, dtype=np.float64)[order]
    ids = [run.decision_ids[i] for i in order]
    n_lab = np.array([len(run.labels.get(d, ())) for d in ids], dtype=np.int64)
    clicked = np.array([run.labels[d][0] if n_lab[j] else 0 for j, d in enumerate(ids)])
    converted = np.array([d in run.conversions for d in ids], dtype=np.int64)
    has = n_lab > 0
    sent_click = np.array([d in run.clicked_ids for d in ids], dtype=bool)
    names = [a for a in ("greedy", "random", "thompson", "linucb") if a in set(arm.tolist())]
    names += sorted(set(arm.tolist()) - set(names))
    n = run.n_requests
    before, late = idx < run.drift_index, idx >= n - n // 4

    counts = np.array(
        [
            [
                has[arm == a].sum(),
                clicked[has & (arm == a)].sum(),
                converted[has & (arm == a)].sum(),
            ]
            for a in names
        ],
        dtype=np.int64,
    )
    table = compare(names, counts, [_policy_of(run, a) for a in names]) if names else []
    ctrs = {r["arm"]: r["ctr"] for r in table}
    best_arm = max(ctrs, key=lambda a: ctrs[a]) if ctrs else None
    for r in table:
        m = arm == r["arm"]
        r["expected_ctr"] = float(pc[m].mean()) if m.any() else None
        r["oracle_ctr"] = float(pb[m].mean()) if m.any() else None
        r["regret_oracle"] = float((pb[m] - pc[m]).sum())
        r["regret_vs_best_arm"] = (ctrs[best_arm] - r["ctr"]) * r["impressions"] if best_arm else 0
        for name, mask in (
            ("before_drift", before),
            ("after_drift", ~before),
            ("last_quarter", late),
        ):
            sel = m & mask & has
            r[name] = _rate(float(clicked[sel].sum()), float(sel.sum()))
            r[name]["expected_ctr"] = float(pc[m & mask].mean()) if (m & mask).any() else None
    return {
        "requests": n,
        "decisions": run.decided,
        "filled": len(ids),
        "no_fill": run.no_fill,
        "drift_index": run.drift_index,
        "interrupted": run.interrupted,
        "labels": {
            "exactly_one": int((n_lab == 1).sum()),
            "missing": int((n_lab == 0).sum()),
            "more_than_one": int((n_lab > 1).sum()),
            "unknown_decisions": len(set(run.labels) - set(ids)),
            "clicks_sent": run.clicks_sent,
            "clicked_labels": int(clicked.sum()),
            "clicks_sent_but_labelled_0": int((sent_click & has & (clicked == 0)).sum()),
            "clicked_labels_without_a_click": int((~sent_click & (clicked == 1)).sum()),
            "purchases_sent": run.purchases_sent,
            "conversions": len(run.conversions),
            **{k: v for k, v in extra.items() if k != "topic_prefix"},
        },
        "topic_prefix": extra.get("topic_prefix"),
        "events_sent": run.events_sent,
        "seconds": round(time.monotonic() - run.started, 1),
        "best_arm_in_hindsight": best_arm,
        "arms": table,
        "series": _series(idx, arm, clicked, has, pc, pb, names, n, cfg.bins),
        "world": _world_info(world),
        "config": _config(cfg),
    }


def _policy_of(run: Run, arm: str) -> str:
    for a, p in zip(run.arm, run.policy, strict=True):
        if a == arm and not p.startswith("fallback"):
            return p
    return ""


def _series(
    idx: npt.NDArray[np.int64],
    arm: npt.NDArray[Any],
    clicked: npt.NDArray[Any],
    has: npt.NDArray[np.bool_],
    pc: npt.NDArray[np.float64],
    pb: npt.NDArray[np.float64],
    names: list[str],
    n: int,
    bins: int,
) -> dict[str, Any]:
    edges = np.linspace(0, n, bins + 1).astype(np.int64)
    b = np.clip(np.searchsorted(edges, idx, side="right") - 1, 0, bins - 1)
    out: dict[str, Any] = {"bin_edges": edges.tolist(), "ctr": {}, "regret": {}}
    for a in names:
        m = arm == a
        rows = []
        for k in range(bins):
            sel = m & (b == k) & has
            rows.append(_rate(float(clicked[sel].sum()), float(sel.sum())))
        out["ctr"][a] = rows
        cum = np.cumsum(pb[m] - pc[m])
        keep = np.unique(np.linspace(0, len(cum) - 1, min(len(cum), 200)).astype(np.int64))
        out["regret"][a] = {"index": idx[m][keep].tolist(), "cumulative": cum[keep].tolist()}
    return out


def _world_info(w: World) -> dict[str, Any]:
    p = w.params
    return {
        "users": w.n_users,
        "ads": w.n_ads,
        "categories": p.categories,
        "interest_concentration": round(w.concentration, 3),
        "base_ctr": p.base_ctr,
        "quality_sd": p.quality_sd,
        "affinity_power": p.affinity_power,
        "fatigue": p.fatigue,
        "position": dict(p.position),
        "top1_share_fitted": round(w.fit.top1_share, 4),
    }


def _config(cfg: SimConfig) -> dict[str, Any]:
    from dataclasses import asdict  # noqa: PLC0415

    return asdict(cfg)


def _fmt(r: dict[str, Any]) -> str:
    if not r["labels"]:
        return "-"
    lo, hi = r["ci"]
    return f"{100 * r['ctr']:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]"


def format_table(summary: dict[str, Any]) -> str:
    lines = [
        f"{'arm':<9} {'labels':>7} {'CTR % [95% CI]':>21} {'before drift':>21} "
        f"{'after drift':>21} {'last quarter':>21} {'exp. CTR %':>10} {'regret':>8} {'p vs ctl':>8}"
    ]
    for r in summary["arms"]:
        p = "control" if r["control"] else f"{r['ctr_p']:.1e}"
        whole = _rate(r["clicks"], r["impressions"])
        exp_ctr = "-" if r["expected_ctr"] is None else f"{100 * r['expected_ctr']:.2f}"
        lines.append(
            f"{r['arm']:<9} {r['impressions']:>7} {_fmt(whole):>21} {_fmt(r['before_drift']):>21} "
            f"{_fmt(r['after_drift']):>21} {_fmt(r['last_quarter']):>21} {exp_ctr:>10} "
            f"{r['regret_oracle']:>8.0f} {p:>8}"
        )
    return "\n".join(lines)


def write(summary: dict[str, Any], run: Run, cfg: SimConfig, out: Path, log: Any) -> None:
    path = out / "summary.json"
    path.write_text(json.dumps(finite(summary), indent=1, default=str))
    png = out / "simulate.png"
    plot(summary, png)
    lab = summary["labels"]
    log(
        f"\n{summary['filled']:,} filled decisions of {summary['requests']:,} requests in "
        f"{summary['seconds']:.0f} s; labels: {lab['exactly_one']:,} exactly one, "
        f"{lab['missing']:,} missing, {lab['more_than_one']:,} more than one; clicks sent "
        f"{lab['clicks_sent']:,}, clicked labels {lab['clicked_labels']:,}"
        + (" (interrupted)" if run.interrupted else "")
    )
    log(format_table(summary))
    log(
        "CTR from ctr-feedback labels; exp. CTR: mean true CTR of the ads chosen; regret: "
        "expected clicks lost to the oracle (best eligible ad, true CTR); p: CTR against "
        f"greedy (two-proportion z-test). Drift after request {run.drift_index:,}."
    )
    if summary.get("online_auc"):
        from adpulse.simtrainer import format_recovery  # noqa: PLC0415

        log(format_recovery(summary["online_auc"]))
    log(f"wrote {path} and {png}")


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib as mpl  # noqa: PLC0415

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    series = summary["series"]
    edges = np.asarray(series["bin_edges"], dtype=np.float64)
    mid = (edges[:-1] + edges[1:]) / 2
    auc = summary.get("online_auc") or {}
    panels = 3 if auc.get("models") else 2
    fig, axes = plt.subplots(panels, 1, figsize=(10, 4 * panels), sharex=True)
    ax1, ax2 = axes[0], axes[1]
    for a, rows in series["ctr"].items():
        colour = COLOURS.get(a)
        ok = np.array([r["labels"] > 0 for r in rows])
        ctr = np.array([100 * (r["ctr"] or 0.0) for r in rows])
        lo = np.array([100 * r["ci"][0] for r in rows])
        hi = np.array([100 * r["ci"][1] for r in rows])
        ax1.plot(mid[ok], ctr[ok], marker="o", ms=3, label=a, color=colour)
        ax1.fill_between(mid[ok], lo[ok], hi[ok], alpha=0.2, color=colour)
        reg = series["regret"][a]
        ax2.plot(reg["index"], reg["cumulative"], label=a, color=colour)
    if panels == 3:
        _plot_auc(axes[2], auc)
    for ax in axes:
        ax.axvline(summary["drift_index"], color="red", ls="--", lw=1)
        ax.grid(alpha=0.3)
    ax1.text(
        summary["drift_index"],
        0.98,
        " drift",
        color="red",
        va="top",
        transform=ax1.get_xaxis_transform(),
    )
    ax1.set_ylabel("CTR % (labels from ctr-feedback, 95% CI)")
    ax1.legend(loc="upper left", ncol=4)
    ax1.set_title(f"adpulse simulate: {summary['filled']:,} decisions, 4 arms x 25% of users")
    ax2.set_ylabel("cumulative regret vs oracle (expected clicks)")
    axes[-1].set_xlabel("request index (time)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


AUC_STYLE = {"served": ("tab:purple", "served model (trainer on)"),
             "frozen": ("tab:brown", "frozen start model")}  # fmt: skip


def _plot_auc(ax: Any, auc: dict[str, Any]) -> None:
    """Online AUC per window of each model on the same labels, its pre-drift level and the
    window it recovered in (adpulse/simtrainer.py)."""
    edges = np.asarray(auc["bin_edges"], dtype=np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    after = [k for k in range(len(edges) - 1) if edges[k] >= auc["drift_index"]]
    for name, m in auc["models"].items():
        colour, label = AUC_STYLE.get(name, (None, name))
        ys = np.array([np.nan if w["auc"] is None else w["auc"] for w in m["windows"]])
        k = m["windows_to_recover"]
        text = "not recovered" if k is None else f"recovered after {k} window(s)"
        ax.plot(centres, ys, marker="o", ms=3, color=colour, label=f"{label}: {text}")
        if m["level"] is not None:
            ax.axhline(m["level"] - auc["tolerance"], color=colour, ls=":", lw=1)
        if k is not None and k < len(after):
            ax.plot([centres[after[k]]], [ys[after[k]]], marker="*", ms=12, color=colour)
    ax.set_ylabel("online AUC per window (same labels)")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
