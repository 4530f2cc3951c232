"""``adpulse demo``: the whole pipeline on the real sample data."""

from __future__ import annotations

import argparse
from pathlib import Path

from adpulse.commands import Subparsers, add_bootstrap, add_command
from adpulse.core.errors import ConfigError
from adpulse.core.settings import Settings


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.demo import run_demo  # noqa: PLC0415

    if args.seconds <= 0:
        msg = f"--seconds {args.seconds}: the live part's length, more than 0"
        raise ConfigError(msg)
    return run_demo(settings, data=Path(args.data), out=Path(args.out), seconds=args.seconds)


def register(sub: Subparsers) -> None:
    p = add_command(
        sub,
        "demo",
        cmd_demo,
        help="the whole loop live: Taobao replay, simulated traffic, dashboard, plots",
        description="Start the embedded broker (unless --bootstrap or ADPULSE_BOOTSTRAP is "
        "given), a worker (and Prometheus if installed), replay the real Taobao sample, then "
        "run simulated users with ad requests and clicks for --seconds under a live terminal "
        "dashboard; print a summary and write plots to --out. Ctrl-C ends the live part early.",
    )
    p.add_argument(
        "--seconds", type=float, default=120.0, help="length of the live part (default 120)"
    )
    p.add_argument("--data", default="../shared/data", help="folder with the sample data")
    p.add_argument("--out", default="var/demo", help="folder for the demo's outputs")
    add_bootstrap(p)
