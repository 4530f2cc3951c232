"""``adpulse report``: per-arm CTR and CVR with 95% intervals, from ctr-feedback."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adpulse.commands import Subparsers, add_bootstrap, add_command
from adpulse.core.errors import InputError
from adpulse.core.settings import Settings
from adpulse.jsonout import finite


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse import report  # noqa: PLC0415 - numpy

    if args.prefix is not None:
        settings = settings.with_(topic_prefix=args.prefix)
    if args.file:
        got = list(report.read_jsonl(Path(args.file)))
        source = args.file
    else:
        topic = settings.topic("ctr-feedback")
        got = report.read_feedback_topic(settings, topic, timeout_s=args.timeout)
        source = f"topic {topic} at {settings.bootstrap_or_default}"
    if not got:
        msg = f"{source}: no ctr-feedback records"
        raise InputError(msg)
    t = report.tally((r for _, r in got), (w for w, _ in got))
    table = report.rows(t, args.control)
    if args.json:
        print(
            json.dumps(
                {
                    "source": source,
                    "by": t.by,
                    "duplicates": t.duplicates,
                    "groups": [finite(r) for r in table],
                },
                indent=2,
            )
        )
    else:
        print(
            f"{source}: {sum(r['impressions'] for r in table)} labelled decisions by {t.by}"
            + (f" ({t.duplicates} duplicate records counted once)" if t.duplicates else "")
        )
        print(report.format_table(table, t.by))
        print(
            "CTR = clicks / labelled decisions, CVR = conversions / clicks; 95% Wilson "
            "intervals; dCTR and p: against the control (pooled two-proportion z-test, "
            "no correction for several arms or for peeking)."
        )
    return 0


def register(sub: Subparsers) -> None:
    p = add_command(
        sub,
        "report",
        cmd_report,
        help="per-arm CTR/CVR with 95%% intervals and p-values, from ctr-feedback",
        description="Read ctr-feedback (the topic from the beginning, or a JSONL file of its "
        "records) and print per experiment arm (per policy when no record has an arm): "
        "labelled decisions, clicks, CTR and CVR with 95%% Wilson intervals, and the CTR "
        "difference against the control arm with its two-sided p-value.",
    )
    p.add_argument("file", nargs="?", help="JSONL of ctr-feedback records (default: the topic)")
    add_bootstrap(p)
    p.add_argument("--topic-prefix", dest="prefix", help="topic prefix ($ADPULSE_TOPIC_PREFIX)")
    p.add_argument(
        "--control", help="control arm (default: 'control' if present, else the first by name)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to read the topic at most")
