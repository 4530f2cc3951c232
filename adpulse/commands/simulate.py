"""``adpulse simulate``: the closed loop through the real pipeline against a known ground truth."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from adpulse.commands import Subparsers, add_bootstrap, add_command
from adpulse.core.errors import ConfigError
from adpulse.core.settings import Settings

if TYPE_CHECKING:
    from adpulse.simulate import SimConfig


def cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.simulate import SimConfig, simulate  # noqa: PLC0415

    if args.decisions < 100:
        msg = f"--decisions {args.decisions}: at least 100"
        raise ConfigError(msg)
    if not 0.0 <= args.drift_at <= 1.0:
        msg = f"--drift-at {args.drift_at}: a fraction of the run, 0 to 1"
        raise ConfigError(msg)
    if args.rate <= 0:
        msg = f"--rate {args.rate}: requests per second, more than 0"
        raise ConfigError(msg)
    if args.windows < 4:
        msg = f"--windows {args.windows}: at least 4 (the CTR and AUC curves' points)"
        raise ConfigError(msg)
    cfg = SimConfig(
        decisions=args.decisions,
        drift_at=args.drift_at,
        seed=args.seed,
        rate=args.rate,
        sample=Path(args.data) / "taobao_userbehavior_sample.csv",
        bins=args.windows,
        trainer=args.trainer is not None,
        promotion=args.trainer or "direct",
    )
    if not args.seeds:
        summary = simulate(settings, cfg, Path(args.out))
        return 130 if summary["interrupted"] else 0
    return _simulate_seeds(args, settings, cfg)


def _simulate_seeds(args: argparse.Namespace, settings: Settings, cfg: SimConfig) -> int:
    """One run per seed into OUT/seed-S, then the per-seed and pooled table (adpulse/simpool.py)."""
    import dataclasses  # noqa: PLC0415
    import json  # noqa: PLC0415

    from adpulse.jsonout import finite  # noqa: PLC0415
    from adpulse.simpool import format_pool, pool  # noqa: PLC0415
    from adpulse.simulate import simulate  # noqa: PLC0415

    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        msg = f"--seeds {args.seeds!r}: a comma-separated list of integers, e.g. 1,2,3,4,5"
        raise ConfigError(msg) from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        msg = f"--seeds {args.seeds!r}: at least two different seeds"
        raise ConfigError(msg)
    out = Path(args.out)
    summaries = []
    for seed in seeds:
        print(f"== seed {seed}")
        summary = simulate(settings, dataclasses.replace(cfg, seed=seed), out / f"seed-{seed}")
        if summary["interrupted"]:
            return 130
        summaries.append(summary)
    result = pool(summaries, seeds)
    path = out / "seeds.json"
    path.write_text(json.dumps(finite(result), indent=1))
    print(format_pool(result))
    print(f"CTR % [95% Wilson CI] (difference from greedy in points [95% Wald CI]); wrote {path}")
    return 0


def register(sub: Subparsers) -> None:
    p = add_command(
        sub,
        "simulate",
        cmd_simulate,
        help="close the feedback loop against a simulated world; compare 4 policies",
        description="Start the embedded broker (unless --bootstrap) and a worker running an "
        "A/B experiment of four policies (greedy = control, random, thompson, linucb; 25%% of "
        "users each); play simulated users with latent interests fitted to the Taobao sample "
        "(events, ad requests, clicks and purchases drawn from a known ground truth, with an "
        "interest drift mid-run); report CTR over time per policy with 95%% intervals, "
        "regret against the oracle, and write summary.json and simulate.png to --out.",
    )
    p.add_argument("--decisions", type=int, default=100_000, help="ad requests (default 100000)")
    p.add_argument(
        "--drift-at",
        type=float,
        default=0.5,
        help="fraction of the run after which user interests rotate (default 0.5)",
    )
    p.add_argument("--seed", type=int, default=7, help="world and traffic seed (default 7)")
    p.add_argument(
        "--seeds",
        default="",
        help="run once per seed (comma-separated, e.g. 1,2,3,4,5) into OUT/seed-S, then print "
        "each arm against greedy per seed and pooled, and write OUT/seeds.json",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=300.0,
        help="requests per second offered at most (default 300)",
    )
    p.add_argument(
        "--windows",
        type=int,
        default=20,
        help="windows the run is cut into for the CTR and online-AUC curves (default 20)",
    )
    p.add_argument(
        "--trainer",
        nargs="?",
        const="direct",
        choices=["direct", "promoter"],
        help="run adpulse trainer beside the worker, from a start version trained here, and "
        "compare the served model's online AUC per window with that start version frozen; "
        "'direct' (the default) serves each candidate as it is exported, 'promoter' runs "
        "adpulse promoter (canary 50%%, 300 labels). Needs PyTorch (docs/training.md, Drift)",
    )
    p.add_argument("--out", default="var/simulate", help="output folder (default var/simulate)")
    p.add_argument("--data", default="../shared/data", help="folder with the Taobao sample")
    add_bootstrap(p)
