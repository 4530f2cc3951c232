"""PNG plots: the demo's CTR and latency figures, and the Grafana dashboard drawn from Prometheus.

Grafana cannot run here, so :func:`dashboard_png` draws the same panels with
matplotlib: it reads the provisioned dashboard JSON (deploy/grafana/...), sends
each panel's own PromQL to a real Prometheus as a range query and plots what
comes back, one subplot per panel, titles and legends from the JSON. A panel
that Grafana would show is therefore a panel this draws, with the same query.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only: no display here, in CI or in containers
import matplotlib.pyplot as plt

from adpulse.dashboard import Scrape, View, ctr_since, latency_histogram

if TYPE_CHECKING:
    from adpulse.prometheus import Prometheus

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy/grafana/dashboards/adpulse.json"


def ctr_over_time(views: Sequence[View], path: Path, window_s: float = 30.0) -> Path:
    """CTR per policy over a sliding window of labels, with its 95% Wilson band."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    t0 = views[0].t if views else 0.0
    series: dict[str, list[tuple[float, float, float, float]]] = {}
    for i in range(1, len(views) + 1):
        for policy, (p, lo, hi, _) in ctr_since(views[:i], window_s).items():
            series.setdefault(policy, []).append((views[i - 1].t - t0, p, lo, hi))
    for policy, pts in sorted(series.items()):
        ts, ps, los, his = (list(x) for x in zip(*pts, strict=True))
        (line,) = ax.plot(ts, ps, label=policy)
        ax.fill_between(ts, los, his, alpha=0.2, color=line.get_color())
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel(f"CTR (labels of the last {window_s:.0f} s)")
    ax.set_title("CTR by policy, from the worker's adpulse_join_labels_total")
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    if series:
        ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def latency_png(scrape: Scrape, path: Path) -> Path:
    """Decision latency and freshness histograms, as the worker's buckets hold them."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (hist, title) in zip(
        axes,
        (
            ("adpulse_decision_latency_seconds", "decision latency (request produced -> sent)"),
            ("adpulse_freshness_seconds", "freshness (event produced -> state written)"),
        ),
        strict=True,
    ):
        bars = [(le, n) for le, n in latency_histogram(scrape, hist) if not math.isinf(le)]
        labels = [f"{le * 1000:g}" for le, _ in bars]
        ax.bar(range(len(bars)), [n for _, n in bars])
        ax.set_xticks(range(len(bars)), labels, rotation=60, fontsize=7)
        ax.set_xlabel("bucket upper bound (ms)")
        ax.set_ylabel("count")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def panels(dashboard: Path = DASHBOARD) -> list[dict[str, Any]]:
    """The dashboard's time-series and stat panels: title, queries and legend formats."""
    data = json.loads(dashboard.read_text())
    out = []
    for p in data.get("panels", []):
        if p.get("type") not in ("timeseries", "stat"):
            continue
        targets = [t for t in p.get("targets", []) if t.get("expr")]
        if targets:
            out.append({"title": p.get("title", ""), "targets": targets})
    return out


def _legend(fmt: str | None, labels: dict[str, str], expr: str) -> str:
    if fmt:
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)
    shown = {k: v for k, v in labels.items() if k not in ("__name__", "instance", "job")}
    return ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) or expr[:40]


def dashboard_png(
    prom: Prometheus,
    start: float,
    end: float,
    path: Path,
    dashboard: Path = DASHBOARD,
    step: float = 2.0,
) -> Path:
    """Every panel of the Grafana dashboard, its own queries run against ``prom``."""
    ps = panels(dashboard)
    cols = 3
    rows = math.ceil(len(ps) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False, layout="constrained"
    )
    for ax, panel in zip(axes.flat, ps, strict=False):
        drawn = 0
        for target in panel["targets"]:
            for series in prom.range(target["expr"], start, end, step):
                pts = [(float(t) - start, float(v)) for t, v in series["values"]]
                pts = [(t, v) for t, v in pts if math.isfinite(v)]
                if not pts:
                    continue
                xs, ys = zip(*pts, strict=True)
                name = _legend(target.get("legendFormat"), series["metric"], target["expr"])
                ax.plot(xs, ys, label=name[:48])
                drawn += 1
        ax.set_title(panel["title"], fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if 0 < drawn <= 8:
            ax.legend(fontsize=6, loc="upper left")
        elif drawn:
            ax.set_title(f"{panel['title']} ({drawn} series)", fontsize=9)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(ps) :]:
        ax.axis("off")
    fig.suptitle("adpulse dashboard (deploy/grafana), queries run against a real Prometheus")
    fig.supxlabel("seconds since the start of the window")
    return _save(fig, path, tight=False)


def _save(fig: Any, path: Path, tight: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
