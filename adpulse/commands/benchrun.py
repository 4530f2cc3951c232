"""What each ``adpulse bench`` subcommand runs: build the bench's config from the flags,
run it (on the embedded broker unless it starts its own), print its lines and tables, and
write its figures to --json. The subcommands themselves are declared in
:mod:`adpulse.commands.bench`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adpulse.commands import Handler
from adpulse.core.errors import InputError
from adpulse.core.settings import Settings
from adpulse.jsonout import finite

# The benches load synthetic history in bulk: their busiest users get hundreds of events
# within a second of broker time, which the live per-user rate limit would refuse as a
# flood. The limiter stays on (its cost is part of what they measure) at a limit no bench
# user reaches; 0 (off) stays off.
BENCH_EVENTS_PER_USER_S = 1_000_000


def with_bench_limits(handler: Handler) -> Handler:
    """The handler, run with the per-user event limit at BENCH_EVENTS_PER_USER_S."""

    def run(args: argparse.Namespace, settings: Settings) -> int:
        if settings.max_events_per_user_s > 0:
            settings = settings.with_(max_events_per_user_s=BENCH_EVENTS_PER_USER_S)
        return handler(args, settings)

    return run


def _on_broker(settings: Settings, run: Callable[[Settings], dict[str, Any]]) -> dict[str, Any]:
    """Run a bench on the embedded broker (or the cluster ``ADPULSE_BOOTSTRAP`` names)."""
    from adpulse.broker import broker_for  # noqa: PLC0415

    with broker_for(settings) as s:
        return run(s)


def _log(line: str) -> None:
    """Progress lines go to stderr: stdout holds the result lines and tables."""
    print(line, file=sys.stderr, flush=True)


def _show(args: argparse.Namespace, key: str, result: dict[str, Any], *shown: str) -> int:
    """Print the bench's tables and result line, and write ``{key: result}`` to --json."""
    for text in shown:
        print(text)
    _write_json(args.json, {key: result})
    return 0


def cmd_bench_features(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.bench import features  # noqa: PLC0415

    taobao = Path(args.data) / "taobao_userbehavior_sample.csv"
    cfg = features.FeaturesBench.smoke(taobao) if args.smoke else features.FeaturesBench(
        events=args.events, repeats=args.repeat, rate=args.rate,
        duration_s=args.duration, users=args.users, taobao=taobao,
    )  # fmt: skip
    result = _on_broker(settings, lambda s: features.run(s, cfg))
    return _show(args, "features", result, features.result_line(result))


def cmd_bench_decisions(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.bench import decisions  # noqa: PLC0415

    cfg = decisions.DecisionsBench.smoke() if args.smoke else decisions.DecisionsBench(
        rate=args.rate, duration_s=args.duration, repeats=args.repeat, users=args.users,
        candidates=args.candidates, ads=args.ads,
    )  # fmt: skip
    result = _on_broker(settings, lambda s: decisions.run(s, cfg))
    return _show(args, "decisions", result, decisions.result_line(result))


def cmd_bench_serve(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.bench import serve  # noqa: PLC0415

    cfg = serve.ServeBench.smoke() if args.smoke else serve.ServeBench(
        rate=args.rate, duration_s=args.duration, event_rate=args.event_rate,
        users=args.users, candidates=args.candidates, ads=args.ads,
    )  # fmt: skip
    cfg = dataclasses.replace(cfg, swap=args.swap, workers=args.workers, route=args.route)
    result = _on_broker(settings, lambda s: serve.run(s, cfg, log=_log))
    return _show(args, "serve", result, serve.result_line(result))


def cmd_bench_seq_scorer(args: argparse.Namespace, settings: Settings) -> int:
    import tempfile  # noqa: PLC0415

    from adpulse.bench import seqscorer  # noqa: PLC0415
    from scoring.featurespec import FeatureSpec  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="adpulse-seqbench-") as tmp:
        try:
            models = seqscorer.export_models(Path(tmp), FeatureSpec.from_settings(settings),
                                             args.length)  # fmt: skip
        except ImportError:
            msg = "bench seq-scorer exports its three models with PyTorch: pip install torch"
            raise InputError(msg) from None
        seconds, repeats = (0.05, 1) if args.smoke else (args.seconds, args.repeats)
        result = seqscorer.run(models, settings, device=args.device, seconds=seconds,
                               repeats=repeats, log=_log)  # fmt: skip
    return _show(args, "seq_scorer", result, seqscorer.format_table(result))


def _ms_list(text: str, flag: str, what: str, least: float = 0.0) -> tuple[float, ...]:
    """A comma-separated list of distinct milliseconds of at least ``least``, or one line."""
    msg = (f"--{flag} takes one or more {what} of {least:g} ms or more, comma-separated, "
           f"not {text!r}")  # fmt: skip
    try:
        values = tuple(float(g) for g in text.split(",") if g.strip())
    except ValueError:
        raise InputError(msg) from None
    if not values or min(values) < least or not all(map(math.isfinite, values)):
        raise InputError(msg)
    if len(set(values)) < len(values):
        msg = f"--{flag} names a {what[:-1]} twice: {text!r}"
        raise InputError(msg)
    return values


def cmd_bench_gaps(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.bench import gaps  # noqa: PLC0415

    gaps_ms = _ms_list(args.gaps, "gaps", "gaps")
    if args.calls < 1 or args.rounds < 1:
        msg = "--calls and --rounds take 1 or more"
        raise InputError(msg)
    cfg = gaps.GapsBench.smoke() if args.smoke else gaps.GapsBench(
        gaps_ms=gaps_ms, calls=args.calls, rounds=args.rounds, candidates=args.candidates,
        spin=args.spin,
    )  # fmt: skip
    result = gaps.run(cfg, log=_log)
    return _show(args, "gaps", result, gaps.result_line(result))


def cmd_bench_scorer(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.bench import scorer  # noqa: PLC0415

    model_dir = Path(settings.model_dir) if settings.model_dir else None
    try:
        result = scorer.run(args.device, smoke=args.smoke, settings=settings,
                            model_dir=model_dir, log=_log)  # fmt: skip
    except FileNotFoundError as exc:  # no model version to measure
        raise InputError(str(exc)) from None
    return _show(args, "scorer", result, scorer.format_table(result), scorer.summary(result))


def cmd_bench_state(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.bench import state  # noqa: PLC0415

    cfg = state.StateBench.smoke() if args.smoke else state.StateBench(
        users=args.users, realistic_users=args.realistic_users,
        events_per_user=args.events_per_user, restore_repeats=args.restore_repeats,
    )  # fmt: skip
    result = _on_broker(settings, lambda s: state.run(s, cfg))
    return _show(args, "state", result, state.result_line(result))


def cmd_bench_mixed(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.bench import mixed  # noqa: PLC0415

    cfg = mixed.MixedBench.smoke() if args.smoke else mixed.MixedBench(
        event_rate=args.event_rate, request_rate=args.request_rate,
        duration_s=args.duration, repeats=args.repeat, users=args.users,
        candidates=args.candidates, ctr=args.ctr,
    )  # fmt: skip
    result = _on_broker(settings, lambda s: mixed.run(s, cfg))
    return _show(args, "mixed", result, mixed.result_line(result))


def cmd_bench_promises(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.bench import promises  # noqa: PLC0415

    cfg = promises.PromisesBench.smoke() if args.smoke else promises.PromisesBench(
        catalog_repeats=args.catalog_repeats, labels=args.labels, cuts=args.cuts,
        cut_s=args.cut_s,
    )  # fmt: skip
    result = _on_broker(settings, lambda s: promises.run(s, cfg, log=_log))
    return _show(args, "promises", result, promises.result_line(result))


def cmd_bench_rebalance(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.bench import rebalance  # noqa: PLC0415

    cfg = rebalance.RebalanceBench.smoke() if args.smoke else rebalance.RebalanceBench(
        rate=args.rate, users=args.users, session_timeout_s=args.session_timeout,
        kill=not args.no_kill, repeats=args.repeats,
    )  # fmt: skip
    result = _on_broker(settings, lambda s: rebalance.run(s, cfg))
    return _show(args, "rebalance", result, rebalance.result_line(result))


def cmd_bench_adtext(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse import textmodels  # noqa: PLC0415
    from adpulse.bench import adtext  # noqa: PLC0415

    out = Path(settings.text_model or textmodels.default_out())
    model = textmodels.build_text_model(out, textmodels.cache_root() / "wheels").path
    cfg = adtext.AdTextBench.smoke() if args.smoke else adtext.AdTextBench(
        rate=args.rate, duration_s=args.duration
    )  # fmt: skip
    result = _on_broker(settings, lambda s: adtext.run(s, cfg, model, log=_log))
    return _show(args, "adtext", result, adtext.result_line(result))


def cmd_bench_broker(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.bench import broker  # noqa: PLC0415

    common = {"size": args.size, "linger_ms": args.linger_ms,
              "brokers": broker.parse_brokers(args.brokers)}  # fmt: skip
    cfg = broker.BrokerBench.smoke(**common) if args.smoke else broker.BrokerBench(
        rate=args.rate, duration_s=args.duration, window_s=args.window, **common
    )  # fmt: skip
    result = broker.run(settings, cfg, log=_log)
    return _show(args, "broker", result, broker.format_tables(result), broker.result_line(result))


def cmd_bench_startup(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.bench import broker, startup  # noqa: PLC0415

    common = {"brokers": broker.parse_brokers(args.brokers), "stall_s": args.stall_s,
              "ready_timeout_s": args.ready_timeout_s}  # fmt: skip
    cfg = startup.StartupBench.smoke(**common) if args.smoke else startup.StartupBench(
        fill_sets=args.fill_sets, fill_events=args.fill_events,
        fill_workers=args.fill_workers, workers=args.workers, **common,
    )  # fmt: skip
    result = startup.run(settings, cfg, log=_log)
    return _show(args, "startup", result, startup.format_tables(result),
                 startup.result_line(result))  # fmt: skip


def cmd_bench_catalog_join(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.bench import catalogjoin  # noqa: PLC0415

    cfg = catalogjoin.CatalogJoinBench.smoke() if args.smoke else catalogjoin.CatalogJoinBench(
        trials=args.trials, ads=args.ads, delay_s=args.delay
    )  # fmt: skip
    result = catalogjoin.run(settings, cfg, log=_log)
    return _show(args, "catalog_join", result, catalogjoin.result_line(result))


def cmd_bench_eos(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.bench import eos  # noqa: PLC0415

    cfg = eos.EosBench.smoke() if args.smoke else eos.EosBench(events=args.events, kills=args.kills)
    result = eos.run(settings, cfg, log=_log)
    return _show(args, "eos", result, eos.format_table(result))


def cmd_bench_all(args: argparse.Namespace, settings: Settings) -> int:
    """Every benchmark at its defaults (or --smoke) on one broker; one JSON, one table."""
    from adpulse.bench import (  # noqa: PLC0415
        decisions,
        features,
        mixed,
        promises,
        rebalance,
        scorer,
        serve,
        state,
    )
    from adpulse.bench.report import markdown  # noqa: PLC0415
    from adpulse.broker import broker_for  # noqa: PLC0415

    taobao = Path(args.data) / "taobao_userbehavior_sample.csv"
    f_cfg = (
        features.FeaturesBench.smoke(taobao)
        if args.smoke
        else features.FeaturesBench(taobao=taobao)
    )
    d_cfg = decisions.DecisionsBench.smoke() if args.smoke else decisions.DecisionsBench()
    report: dict[str, object] = {}
    with broker_for(settings) as s:
        report["features"] = f = features.run(s, f_cfg)
        print(features.result_line(f), flush=True)
        report["decisions"] = d = decisions.run(s, d_cfg)
        print(decisions.result_line(d), flush=True)
        sv_cfg = serve.ServeBench.smoke() if args.smoke else serve.ServeBench()
        report["serve"] = sv = serve.run(s, sv_cfg)
        print(serve.result_line(sv), flush=True)
        st_cfg = state.StateBench.smoke() if args.smoke else state.StateBench()
        report["state"] = st = state.run(s, st_cfg)
        print(state.result_line(st), flush=True)
        mx_cfg = mixed.MixedBench.smoke() if args.smoke else mixed.MixedBench()
        report["mixed"] = mx = mixed.run(s, mx_cfg)
        print(mixed.result_line(mx), flush=True)
        rb_cfg = rebalance.RebalanceBench.smoke() if args.smoke else rebalance.RebalanceBench()
        report["rebalance"] = rb = rebalance.run(s, rb_cfg)
        print(rebalance.result_line(rb), flush=True)
        pr_cfg = promises.PromisesBench.smoke() if args.smoke else promises.PromisesBench()
        report["promises"] = pr = promises.run(s, pr_cfg)
        print(promises.result_line(pr), flush=True)
    model_dir = Path(settings.model_dir) if settings.model_dir else None
    report["scorer"] = sc = scorer.run("cpu", smoke=args.smoke, settings=settings,
                                       model_dir=model_dir)  # fmt: skip
    print(scorer.summary(sc))
    print()
    print(markdown(report))
    _write_json(args.json, report)
    return 0


def cmd_bench_table(args: argparse.Namespace, settings: Settings) -> int:
    """The Markdown table of a ``bench all`` JSON; with --into, written into that document
    in place of its generated table (how docs/performance.md's table is made)."""
    from adpulse.bench.report import markdown, with_table  # noqa: PLC0415

    try:
        table = markdown(json.loads(Path(args.source).read_text()))
    except (OSError, ValueError, KeyError) as exc:
        msg = f"bench table: {args.source} is not a readable bench all JSON: {exc!r}"
        raise InputError(msg) from None
    if not args.into:
        print(table)
        return 0
    try:
        Path(args.into).write_text(with_table(Path(args.into).read_text(), table))
    except (OSError, ValueError) as exc:
        msg = f"bench table: {args.into}: {exc}"
        raise InputError(msg) from None
    print(f"wrote the table of {args.source} into {args.into}")
    return 0


def _write_json(path: str | None, payload: dict[str, object]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(finite(payload), indent=2, sort_keys=True, allow_nan=False)
        Path(path).write_text(text + "\n")
        print(f"wrote {path}")



def cmd_bench_secondary(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.bench import secondary  # noqa: PLC0415

    intervals = _ms_list(args.intervals, "intervals", "intervals", least=0.1)
    if args.rate < 1 or args.batch < 2 or not args.duration > 0:
        msg = "--rate takes 1 or more, --batch 2 or more, --duration more than 0"
        raise InputError(msg)
    cfg = secondary.SecondaryBench.smoke() if args.smoke else secondary.SecondaryBench(
        intervals_ms=intervals, rate=args.rate, batch=args.batch, duration_s=args.duration,
    )  # fmt: skip
    result = secondary.run(cfg, log=_log)
    return _show(args, "secondary", result, secondary.result_line(result))
