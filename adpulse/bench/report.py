"""The benchmark report as a Markdown table: target, measured value, same-run baseline."""

from __future__ import annotations

import math
from typing import Any

from adpulse import gendoc
from adpulse.bench import machine_line
from adpulse.bench.rebalance import by_signal


def _fmt(x: Any, unit: str = "", digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.{digits}f}{unit}"


def markdown(report: dict[str, Any]) -> str:
    """The table of every target in ``report`` (a ``bench all`` JSON, or any of its sections)."""
    rows: list[tuple[str, str, str, str]] = []
    f = report.get("features")
    if f:
        rows += [
            ("features events/s per worker", "≥ 35,000", _fmt(f["events_per_s"]),
             f"bare aiokafka loop {_fmt(f['baseline_events_per_s'])}/s"),
            ("features ratio to bare loop", "≥ 0.5", _fmt(f["ratio"], digits=2), ""),
            (f"freshness p99 at {_fmt(f['freshness_offered_per_s'])} events/s", "≤ 50 ms",
             _fmt(f["freshness_p99_ms"], " ms", 1), f"p50 {_fmt(f['freshness_p50_ms'], ' ms', 1)}"),
        ]  # fmt: skip
    sv = report.get("serve")
    if sv:
        load = f"{_fmt(sv['offered_per_s'])} req/s x {sv['candidates']}"
        rows += [
            (f"/decide p99 at {load}", "≤ 10 ms", _fmt(sv["latency_p99_ms"], " ms", 2),
             f"HTTP floor (/health) p99 {_fmt(sv['floor_p99_ms'], ' ms', 2)}; in-process "
             f"decision p99 {_fmt(sv['in_process_p99_ms'], ' ms', 2)}"),
            (f"/decide p99 with {_fmt(sv['event_rate'])} events/s ingest", "≤ 20 ms",
             _fmt(sv["with_ingest_latency_p99_ms"], " ms", 2),
             f"p50 {_fmt(sv['with_ingest_latency_p50_ms'], ' ms', 2)}"),
            ("freshness p99 (event produced -> visible to /decide)", "≤ 50 ms",
             _fmt(sv["freshness_p99_ms"], " ms", 1),
             f"p50 {_fmt(sv['freshness_p50_ms'], ' ms', 1)}"),
            ("/decide errors, shed, no-fill", "0 errors", f"{sv['errors']}, {sv['shed']}, "
             f"{sv['no_fill']}", f"achieved {_fmt(sv['achieved_per_s'])}/s"),
        ]  # fmt: skip
        per_min = sv.get("p99_per_minute_ms") or []
        if len(per_min) >= 2:
            rows.append(("/decide p99 last minute / second minute", "≤ 1.5x",
                         f"{per_min[-1] / per_min[1]:.2f}x",
                         " ".join(f"{m:.1f}" for m in per_min) + " ms"))  # fmt: skip
    d = report.get("decisions")
    if d:
        rows.append((
            f"Kafka path: decision p99 at {_fmt(d['offered_per_s'])} req/s x {d['candidates']}",
            "≤ 30 ms", _fmt(d["latency_p99_ms"], " ms", 2),
            f"p50 {_fmt(d['latency_p50_ms'], ' ms', 2)}, achieved {_fmt(d['achieved_per_s'])}/s",
        ))  # fmt: skip
    st = report.get("state")
    if st:
        rows += [
            (f"bytes on disk per user ({_fmt(st['users'])} users)", "≤ 400",
             _fmt(st["bytes_per_user_on_disk"]), f"raw record {st['record_bytes']} bytes"),
            ("worker RSS with that table", "≤ 1 GiB",
             _fmt(st["worker_rss_bytes"] / 2**20, " MiB"), ""),
            ("restore of that table from the changelog", "≤ 60 s",
             _fmt(st["restore_s"], " s", 1) + (
                 f" ({_fmt(st['restore_s_spread']['min'], '', 1)}-"
                 f"{_fmt(st['restore_s_spread']['max'], ' s', 1)}, "
                 f"median of {st['restore_repeats']})" if "restore_s_spread" in st else ""),
             f"bare changelog read {_fmt(st['baseline_changelog_read_s'], ' s', 1)}"),
        ]  # fmt: skip
    if st and "realistic_users" in st:
        rows.append((f"bytes on disk per user ({_fmt(st['realistic_users'])} users of "
                     f"{st['events_per_user']} events)", "≤ 400",
                     _fmt(st["realistic_bytes_per_user_on_disk"]),
                     "one event each: the first state row"))  # fmt: skip
    mx = report.get("mixed")
    if mx:
        load = (f"{_fmt(mx['offered_events_per_s'])} events/s + "
                f"{_fmt(mx['offered_requests_per_s'])} req/s")  # fmt: skip
        rows += [
            (f"mixed: decision p99 at {load}", "≤ 15 ms", _fmt(mx["latency_p99_ms"], " ms", 1),
             f"p50 {_fmt(mx['latency_p50_ms'], ' ms', 1)}, p99.9 "
             f"{_fmt(mx['latency_p999_ms'], ' ms', 1)}"),
            ("mixed: freshness p99", "≤ 100 ms", _fmt(mx["freshness_p99_ms"], " ms", 1),
             f"p50 {_fmt(mx['freshness_p50_ms'], ' ms', 1)}"),
            ("mixed: achieved events/s, decisions/s", "as offered",
             f"{_fmt(mx['worker_events_per_s'])}, {_fmt(mx['requests_per_s'])}",
             f"generators offered {_fmt(mx['events_offered_per_s'])}, "
             f"{_fmt(mx['requests_offered_per_s'])}"
             + (f"; requests shed {_fmt(mx['shed_per_s'])}/s" if "shed_per_s" in mx else "")),
            ("mixed: worker CPU, RSS", "", f"{_fmt(mx['worker_cpu_percent'], '%')}, "
             f"{_fmt(mx['worker_rss_bytes'] / 2**20, ' MiB')}", ""),
        ]  # fmt: skip
    rb = report.get("rebalance")
    if rb:
        for how, f in (rb.get("by_signal") or by_signal(rb["rounds"])).items():
            g, o = f["longest_gap_s"], f["moved_outage_s"]
            rows.append((
                f"rebalance pause, {how} (longest gap between decisions)", "≤ 10 s",
                f"median {_fmt(g['median'], ' s', 1)} ({_fmt(g['min'], '', 1)}-"
                f"{_fmt(g['max'], ' s', 1)})",
                f"{f['rounds']} rounds; moved partitions median {_fmt(o['median'], ' s', 1)} "
                f"({_fmt(o['min'], '', 1)}-{_fmt(o['max'], ' s', 1)}); state equal "
                f"{rb['state_equal']}",
            ))  # fmt: skip
    pr = report.get("promises")
    if pr:
        for key, name, target in (
            ("catalog_s", "catalog change -> decisions on both workers", "≤ 1 s"),
            ("label_s", "label -> the other worker's learner state", "≤ 1 s (stated bound)"),
            ("resume_s", f"broker cut {pr['cut_s']:g} s -> events applied again", "≤ 5 s"),
        ):
            f = pr[key]
            got = (f"median {_fmt(f['median'], ' s', 3)} ({_fmt(f['min'], '', 3)}-"
                   f"{_fmt(f['max'], ' s', 3)}), p99 {_fmt(f['p99'], ' s', 3)}"
                   if "median" in f else "never")  # fmt: skip
            rows.append((name, target, got, f"{f['samples']} repeats, {f['missed']} missed"))
    sc = report.get("scorer")
    if sc:
        for threads, fig in sc.get("by_threads", {"": sc}).items():
            label = f", {threads} thread{'s' if threads != '1' else ''}" if threads else ""
            for batch, rate in fig["rows_per_s"].items():
                base = fig["baseline_rows_per_s"][batch]
                ratio = rate / base if base else float("nan")
                target = "≥ 1.3x numpy" if int(batch) >= 32 else ""
                rows.append((f"scorer rows/s, batch {batch}{label}", target,
                             f"{_fmt(rate)} ({ratio:.2f}x)", f"numpy {_fmt(base)}"))  # fmt: skip
        per_call = sc.get("path_requests_per_call")
        what = f" (decision call, {per_call} requests a call)" if per_call else ""
        rows.append((f"whole scoring path rows/s{what}", "≥ 300,000",
                     _fmt(sc["path_rows_per_s"]), ""))  # fmt: skip
    m = next(
        (r["machine"] for r in report.values() if isinstance(r, dict) and "machine" in r), None
    )
    lines = ["| benchmark | target | measured | baseline (same run) |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {e} |" for a, b, c, e in rows]
    if m:
        lines.append(f"\nMachine: {machine_line(m)}.")
    return "\n".join(lines)


# The table of docs/performance.md is this module's output for the committed JSON, between
# these two lines; tests/unit/test_performance_doc.py fails when the two differ.
BEGIN = (
    "<!-- generated by: adpulse bench table --from docs/bench/all.json "
    "--into docs/performance.md -->"
)
END = "<!-- end of the generated table -->"


def table_in(doc: str) -> str:
    """The generated table of a document: the text between BEGIN and END."""
    return gendoc.table_in(doc, BEGIN, END)


def with_table(doc: str, table: str) -> str:
    """``doc`` with its generated table replaced by ``table``."""
    return gendoc.with_table(doc, table, BEGIN, END)
