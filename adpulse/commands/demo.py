"""``adpulse demo``: the whole pipeline on the real sample data."""

from __future__ import annotations

import argparse
from pathlib import Path

from adpulse.commands import Subparsers, add_bootstrap, add_command
from adpulse.settings import Settings


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.demo import run_demo  # noqa: PLC0415

    return run_demo(settings, data=Path(args.data), out=Path(args.out))


def register(sub: Subparsers) -> None:
    p = add_command(
        sub,
        "demo",
        cmd_demo,
        help="run the pipeline on the real sample data and show what it did",
        description="Start the embedded broker (unless --bootstrap or ADPULSE_BOOTSTRAP is "
        "given), create the topics, replay the real Taobao sample and report what landed.",
    )
    p.add_argument("--data", default="../shared/data", help="folder with the sample data")
    p.add_argument("--out", default="var/demo", help="folder for the demo's outputs")
    add_bootstrap(p)
