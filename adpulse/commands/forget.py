"""``adpulse forget USER_ID``: delete one user's state on the workers (forget-requests)."""

from __future__ import annotations

import argparse

from adpulse.commands import Subparsers, add_bootstrap, add_command
from adpulse.core.settings import Settings


def cmd_forget(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.forget import request_forget  # noqa: PLC0415 - Kafka client import is slow

    wait_s = args.timeout if args.wait else 0.0
    request_id, partition, done = request_forget(
        settings, args.user_id, reason=args.reason, wait_s=wait_s
    )
    print(f"sent {request_id} to {settings.topic('forget-requests')} (partition {partition})")
    if done is not None:
        print(
            f"confirmed: deleted interest {done['interest']}, freqcap {done['freqcap']}, "
            f"pending {done['pending']} record(s); tombstones acknowledged"
        )
    return 0


def register(sub: Subparsers) -> None:
    p = add_command(
        sub,
        "forget",
        cmd_forget,
        help="delete one user's state on every worker (right to erasure)",
        description="Send a forget request for USER_ID (the raw id apps send events with) to "
        "forget-requests. The worker owning the user's partition deletes its interest, "
        "frequency caps and click-join records by tombstones through the changelogs, so a "
        "restored worker does not bring them back. Events of the user produced later (or "
        "replayed) create new state: stop them at the producer first.",
    )
    p.add_argument(
        "user_id", metavar="USER_ID", help="the user id as apps send it (not the pseudonym)"
    )
    add_bootstrap(p)
    p.add_argument(
        "--wait", action="store_true", help="wait for the worker's confirmation (exit 7 if none)"
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds --wait waits (default: 60)")
    p.add_argument("--reason", default="", help="free text kept in the request (e.g. a ticket)")
