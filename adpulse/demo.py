"""``make demo``: the whole engine on one machine, live, in about three minutes.

1. Starts the embedded broker (unless a bootstrap server is configured), a real
   worker running a 4-arm experiment (greedy, random, thompson, linucb), and,
   when Prometheus is installed, a real Prometheus scraping it through the
   shipped config.
2. Replays the real Taobao sample and shows what the engine made of it: what
   landed, the users' interest vectors, decisions for them.
3. Runs simulated traffic (``adpulse simulate``'s world: users fitted to the
   sample, events, ad requests, clicks drawn from a known truth) for
   ``--seconds``, with a live terminal dashboard read from the worker's own
   ``/metrics``: events/s, decisions/s, decision p50/p99, freshness, CTR by
   policy, dead letters.
4. Prints a summary and writes plots (CTR over time by policy, latency
   histograms, the simulator's CTR/regret plot, and the Grafana dashboard's
   panels drawn from Prometheus) to the folder it names. Ctrl-C ends step 3
   early and still writes them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from adpulse import dashboard, plots, replay, simresults
from adpulse import prometheus as prom
from adpulse.bench.cpu import box_s, steal_pct
from adpulse.broker import broker_for
from adpulse.core.errors import InputError
from adpulse.core.kafkaconf import client_kwargs
from adpulse.core.settings import Settings
from adpulse.inspect import read_topic
from adpulse.simulate import Run, SimConfig, run_loop, sim_worker
from adpulse.workerproc import WorkerProcess

TAOBAO_FILE = "taobao_userbehavior_sample.csv"


def run_demo(settings: Settings, data: Path, out: Path, seconds: float = 120.0) -> int:
    sample = data / TAOBAO_FILE
    if not sample.is_file():
        msg = f"{sample}: sample data not found; pass --data FOLDER (see README)"
        raise InputError(msg)
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    rate = 200.0
    cfg = SimConfig(
        decisions=max(100, int(rate * seconds)), rate=rate, sample=sample, label_wait_s=10.0
    )
    world = simresults.load_world(cfg.seed, cfg.sample, cfg.users)
    with ExitStack() as stack:
        b = stack.enter_context(broker_for(settings, console.print))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="adpulse-demo-")))
        tag = secrets.token_hex(3)
        s = b.with_(
            app_id=f"adpulse-demo-{tag}", data_dir=tmp / "data",
            topic_prefix=f"{settings.topic_prefix}demo-{tag}.",
        )  # fmt: skip
        worker, scrape = stack.enter_context(sim_worker(s, cfg, world, out, console.print))
        # the apps call POST /decide, with the worker's API token
        cfg = dataclasses.replace(cfg, decide_url=worker.decide_url, decide_token=worker.token)
        console.print(f"worker metrics: [bold]{worker.url}/metrics[/bold]")
        server = _prometheus(worker, tmp, console)
        if server is not None:
            stack.callback(server.stop)
        started = time.time()
        summary = _replay_taobao(s, sample, worker, cfg.half_life_s)
        console.print(format_summary(summary))
        unproven = _unproven(summary["model"])
        if unproven:
            console.print(f"[bold red]error:[/bold red] {unproven}")
            return 1
        run = Run(cfg.decisions, int(cfg.drift_at * cfg.decisions))
        board = dashboard.Dashboard(worker.url + "/metrics")
        stop = threading.Event()
        result: dict[str, Any] = {}

        def play() -> None:
            result.update(run_loop(s, cfg, world, run, worker, scrape, console.print, stop))

        console.print(
            f"simulated traffic for {seconds:.0f} s at up to {rate:.0f} requests/s "
            "(Ctrl-C ends it early) ..."
        )
        player = threading.Thread(target=play, name="simulated-users", daemon=True)
        box_at_start = box_s()
        player.start()
        deadline = time.monotonic() + seconds
        try:
            with Live(console=console, refresh_per_second=2, transient=False) as live:
                while player.is_alive():
                    if time.monotonic() > deadline:
                        stop.set()
                    if board.tick() is not None:
                        live.update(dashboard.render(board.views, "adpulse demo: live"))
                    player.join(1.0)
        except KeyboardInterrupt:
            console.print("stopping: winding the simulated users down ...")
            stop.set()
            run.interrupted = True
            player.join(30)
        board.tick()
        stolen = steal_pct(box_at_start, box_s())
        sim = simresults.summarise(run, cfg, world, result)
        simresults.write(sim, run, cfg, out, lambda *_: None)
        written = _plots(board, server, started, out)
    summary["live"] = dashboard.summary(board.views)
    if summary["live"]:
        summary["live"]["windows_10s"] = board.p99_windows(10.0)
        summary["live"]["steal_pct"] = round(stolen, 1)
    summary["simulation"] = {k: sim[k] for k in ("arms", "labels") if k in sim}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    console.print(format_live(summary["live"]))
    console.print(simresults.format_table(sim))
    for path in [*written, out / "simulate.png", out / "summary.json"]:
        console.print(f"wrote {path}")
    return 0


def _prometheus(worker: WorkerProcess, tmp: Path, console: Console) -> prom.Prometheus | None:
    executable = prom.binary()
    if executable is None:
        console.print("prometheus not installed: no dashboard.png (apt-get install prometheus)")
        return None
    config = prom.scrape_config([worker.url], tmp / "prometheus.yml")
    (tmp / "prom").mkdir()
    server = prom.Prometheus(executable, config, tmp / "prom")
    console.print(f"prometheus (shipped config and alert rules): [bold]{server.url}[/bold]")
    return server


def _replay_taobao(
    s: Settings, sample: Path, worker: WorkerProcess, half_life_s: float
) -> dict[str, Any]:
    # Replayed as if it just happened (2017's interests decayed to nothing by now), on
    # the worker's clock: its half-life stands for the default one, so the sample's gaps
    # shrink by that ratio (24 h / 120 s = 720x), and its vectors weigh the days between
    # a user's events as a production worker would.
    speedup = Settings().half_life_h * 3600 / half_life_s
    events = replay.rebased(replay.read_taobao(sample), int(time.time() * 1000), speedup)
    t0 = time.perf_counter()
    sent = replay.produce(events, s, s.topic("user-events"))
    elapsed = time.perf_counter() - t0
    print(
        f"replayed {sent} real Taobao events into {s.topic('user-events')} "
        f"in {elapsed:.2f}s ({sent / elapsed:,.0f} events/s), times shifted to now and "
        f"compressed {speedup:g}x (half-life {half_life_s:g} s here)"
    )
    landed = read_topic(s, s.topic("user-events"), expect=sent, idle_s=1.0)
    summary = summarise(landed)
    users = sorted({e.user_id for e in events})
    worker.wait_until(lambda: _all_applied(worker, events), 60, "the sample applied")
    summary["interest"] = _interest_summary(worker, users)
    decisions = _ask_for_ads(s, users)
    summary["model"] = served_model(s, decisions.pop("all"))
    summary["decisions"] = decisions
    return summary


def served_model(s: Settings, decisions: list[dict[str, Any]]) -> dict[str, Any]:
    """The version the decisions name, its sequence length and heads (its spec.json and
    metrics.json in the worker's registry), and how many filled decisions were scored with
    the user's behaviours (``features.sequence`` in the snapshot, logged only when the
    model attends over them)."""
    from scoring.registry import METRICS, PACKAGED, SPEC  # noqa: PLC0415

    filled = [d for d in decisions if d.get("ad_id")]
    versions = Counter(str(d.get("model_version")) for d in filled)
    version = versions.most_common(1)[0][0] if versions else None
    folder = (Path(s.model_dir) if s.model_dir else PACKAGED) / str(version)
    spec = json.loads((folder / SPEC).read_text()) if (folder / SPEC).is_file() else {}
    metrics = json.loads((folder / METRICS).read_text()) if (folder / METRICS).is_file() else {}
    return {
        "version": version,
        "sequence": int(spec.get("sequence", 0)),
        "heads": int(metrics.get("heads", 1)),
        "filled": len(filled),
        "with_pcvr": sum("pcvr" in d for d in filled),
        "with_sequence": sum(bool(d.get("features", {}).get("sequence")) for d in filled),
    }


def _plots(
    board: dashboard.Dashboard, server: prom.Prometheus | None, started: float, out: Path
) -> list[Path]:
    written = []
    if board.views:
        written.append(plots.ctr_over_time(board.views, out / "ctr_by_policy.png"))
        written.append(plots.latency_png(board.final, out / "latency.png"))
    if server is not None:
        time.sleep(2)  # one more scrape of the last seconds
        written.append(plots.dashboard_png(server, started, time.time(), out / "dashboard.png"))
    return written


def format_live(live: dict[str, Any]) -> str:
    if not live:
        return "no live figures (the dashboard never scraped the worker)"
    lines = [
        f"live run ({live['seconds']} s, from the worker's /metrics):",
        f"  events {live['events']:,}, decisions {live['decisions']:,} "
        f"(median {live['decisions_per_s_median']}/s)",
        f"  decision p99 (median of 1 s windows) {live['decision_p99_ms_median']} ms, "
        f"freshness p99 {live['freshness_p99_ms_median']} ms",
        *_window_lines(live.get("windows_10s", [])),
        *_steal_line(live.get("steal_pct", math.nan)),
        f"  dead letters {live['dead_letters'] or 'none'}",
    ]
    for policy, r in sorted(live["ctr_by_policy"].items()):
        lo, hi = r["ci95"]
        lines.append(
            f"  CTR {policy:24s} {r['ctr']:.2%} [{lo:.2%}, {hi:.2%}] over {r['labels']:,} labels"
        )
    return "\n".join(lines)


def _steal_line(pct: float) -> list[str]:
    """On a virtual machine other guests may take the host's cores: every latency above
    moves with that share, so it is printed next to them."""
    if math.isnan(pct):
        return []
    return [f"  the hypervisor gave {pct:.0f}% of this box's CPU time to other guests meanwhile"]


def _window_lines(windows: list[dict[str, float]]) -> list[str]:
    """The worst 10 s window: the demo's latency target holds in every window or not at all."""
    if not windows:
        return []
    dec = [w["decision_p99_ms"] for w in windows if w["decisions"] > 0]
    fresh = [w["freshness_p99_ms"] for w in windows if not math.isnan(w["freshness_p99_ms"])]
    worst_d = f"{max(dec):.1f}" if dec else "n/a"
    worst_f = f"{max(fresh):.1f}" if fresh else "n/a"
    return [f"  worst of {len(windows)} 10 s windows: decision p99 {worst_d} ms, "
            f"freshness p99 {worst_f} ms"]  # fmt: skip


def _all_applied(worker: WorkerProcess, events: list[replay.Event]) -> bool:
    per_user = Counter(e.user_id for e in events)
    for user, n in per_user.items():
        body = worker.interest(user)
        if body is None or sum(body["counts"].values()) != n:
            return False
    return True


def _interest_summary(worker: WorkerProcess, users: list[str]) -> dict[str, Any]:
    bodies = {u: worker.interest(u) for u in users}
    example = users[0]
    body = bodies[example] or {}
    return {
        "users_with_state": sum(b is not None for b in bodies.values()),
        "example_user": example,
        "example_counts": body.get("counts"),
        "example_top_categories": [
            {**c, "weight": round(c["weight"], 4) + 0.0} for c in body.get("top_categories", [])
        ],
        # + 0.0 turns a rounded -0.0 into 0.0: a decayed-away weight prints as zero
        "example_vector_head": [round(x, 4) + 0.0 for x in body.get("vector_now", [])[:6]],
    }


def _ask_for_ads(s: Settings, users: list[str], per_user: int = 5) -> dict[str, Any]:
    """Requests spread over a few seconds (about 80/s); read the decisions back."""
    from kafka import KafkaProducer  # noqa: PLC0415 - slow import

    producer = KafkaProducer(**client_kwargs(s), linger_ms=0, acks=1)
    n = 0
    for round_ in range(per_user):
        for user in users:
            req = {
                "request_id": f"demo-{round_}-{user}", "user_id": user, "placement": "home",
                "ts": int(time.time() * 1000), "context": {"device": "mobile"},
            }  # fmt: skip
            producer.send(s.topic("ad-requests"), key=user.encode(), value=json.dumps(req).encode())
            n += 1
            time.sleep(0.012)
        producer.flush()
    producer.close()
    records = read_topic(s, s.topic("ad-decisions"), expect=n, idle_s=1.0)
    decisions = [json.loads(r.value or b"{}") for r in records]
    latency = sorted(d["latency_ms"] for d in decisions)
    filled = [d for d in decisions if d.get("ad_id")]
    return {
        "requests": n,
        "decisions": len(decisions),
        "filled": len(filled),
        "policies": dict(Counter(d["policy"] for d in decisions)),
        "latency_p50_ms": round(latency[len(latency) // 2], 2) if latency else None,
        "latency_max_ms": round(latency[-1], 2) if latency else None,
        "example": filled[0] if filled else None,
        "all": decisions,
    }


def summarise(records: list) -> dict[str, object]:  # type: ignore[type-arg]
    kinds: Counter[str] = Counter()
    partitions: Counter[int] = Counter()
    users = set()
    for r in records:
        msg = json.loads(r.value)
        kinds[msg["kind"]] += 1
        users.add(msg["user_id"])
        partitions[r.partition] += 1
    return {
        "messages": len(records),
        "users": len(users),
        "by_kind": dict(sorted(kinds.items())),
        "by_partition": {str(p): n for p, n in sorted(partitions.items())},
    }


def _unproven(model: dict[str, Any]) -> str | None:
    """Why the decisions do not show the served model at work, or None when they do."""
    if model["filled"] == 0:
        return "no decision was filled: nothing shows which model served"
    if model["sequence"] and model["with_sequence"] == 0:
        return (f"model {model['version']} attends over {model['sequence']} behaviours, but no "
                "decision was scored with the user's sequence (features.sequence)")  # fmt: skip
    if model["heads"] == 2 and model["with_pcvr"] == 0:
        return f"model {model['version']} has a pCVR head, but no decision carries pcvr"
    return None


def format_summary(summary: dict[str, object]) -> str:
    lines = [
        "what landed on user-events (read back from the broker):",
        f"  messages  {summary['messages']:>6}",
        f"  users     {summary['users']:>6}",
    ]
    by_kind = summary["by_kind"]
    assert isinstance(by_kind, dict)
    lines += [f"  {k:9s} {n:>6}" for k, n in by_kind.items()]
    by_partition = summary["by_partition"]
    assert isinstance(by_partition, dict)
    lines.append("  partitions " + " ".join(f"p{p}={n}" for p, n in by_partition.items()))
    interest = summary.get("interest")
    if isinstance(interest, dict):
        lines += [
            "interest state (GET /users/{id}/interest):",
            f"  users with a vector  {interest['users_with_state']}",
            f"  user {interest['example_user']}: counts {interest['example_counts']}",
            f"    top categories {interest['example_top_categories']}",
            f"    vector now (first 6 of 64) {interest['example_vector_head']}",
        ]
    decisions = summary.get("decisions")
    if isinstance(decisions, dict):
        lines += [
            "ad decisions (read back from ad-decisions):",
            f"  requests {decisions['requests']}, decisions {decisions['decisions']}, "
            f"filled {decisions['filled']}, policies {decisions['policies']}",
            f"  latency request->decision p50 {decisions['latency_p50_ms']} ms, "
            f"max {decisions['latency_max_ms']} ms",
            f"  example {json.dumps(decisions['example'])}",
        ]
    model = summary.get("model")
    if isinstance(model, dict):
        seq = (f"attention over the last {model['sequence']} behaviours"
               if model["sequence"] else "no sequence block")  # fmt: skip
        heads = "pCTR and pCVR" if model["heads"] == 2 else "pCTR"
        lines += [
            f"served model {model['version']}: {seq}, heads {heads}",
            f"  {model['with_sequence']} of {model['filled']} filled decisions scored with the "
            f"user's behaviour sequence, {model['with_pcvr']} with pCVR",
        ]
    return "\n".join(lines)
