"""``adpulse worker``: one stream worker (the Faust app)."""

from __future__ import annotations

import argparse
from pathlib import Path

from adpulse.commands import Subparsers, add_bootstrap, add_command
from adpulse.core.settings import Settings


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from streams.worker import run_worker  # noqa: PLC0415

    changes = {
        "web_port": args.web_port,
        "data_dir": Path(args.data_dir) if args.data_dir else None,
        "app_id": args.app_id,
    }
    settings = settings.with_(**{k: v for k, v in changes.items() if v is not None})
    return run_worker(settings, loglevel=args.loglevel)


def register(sub: Subparsers) -> None:
    p = add_command(
        sub,
        "worker",
        cmd_worker,
        help="run a stream worker (Faust app: ingest, interest table, web server)",
        description="Run one adpulse worker: consumes user-events in batches, keeps the "
        "interest table (RocksDB, changelogged), dead-letters bad input, and serves "
        "GET /users/{id}/interest, /health and /metrics. Start several with different "
        "--web-port and --data-dir to split the partitions. Stops cleanly on SIGTERM/Ctrl-C.",
    )
    add_bootstrap(p)
    p.add_argument("--web-port", type=int, help="HTTP port ($ADPULSE_WEB_PORT, default 6066)")
    p.add_argument("--data-dir", help="RocksDB directory ($ADPULSE_DATA_DIR)")
    p.add_argument("--app-id", help="Faust app id / consumer group ($ADPULSE_APP_ID)")
    p.add_argument(
        "--loglevel",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default: info)",
    )
