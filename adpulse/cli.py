"""``adpulse``: one command line for the broker, topics, replay, worker, demo and benchmarks.

Every subcommand that talks to Kafka takes ``--bootstrap`` (or ADPULSE_BOOTSTRAP).
User mistakes end in one line on stderr and a non-zero exit, never a traceback.
The subcommands live in :mod:`adpulse.commands`, one module per group.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from adpulse.commands import (
    Handler,
    bench,
    catalog,
    decide,
    demo,
    evaluate,
    forget,
    kafka,
    models,
    offline,
    report,
    simulate,
    trainer,
    worker,
)
from adpulse.core.errors import AdpulseError, BrokerUnavailable
from adpulse.core.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    """The environment's settings; on a running ``adpulse broker``, marked as embedded."""
    from adpulse.core.announce import recognise  # noqa: PLC0415

    return recognise(Settings.from_env(bootstrap=getattr(args, "bootstrap", None)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adpulse",
        description="adpulse: streaming engine for real-time ad delivery "
        "(Kafka events -> interest state -> ONNX scoring -> online strategy).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The order here is the order `adpulse --help` lists the commands in.
    kafka.register(sub)  # broker, topics, replay
    worker.register(sub)  # worker
    decide.register(sub)  # decide (one decision over HTTP)
    forget.register(sub)  # forget (delete one user's state)
    catalog.register(sub)  # catalog, train
    trainer.register(sub)  # trainer (online learning from ctr-feedback)
    models.register(sub)  # models text (the ad text encoder)
    bench.register(sub)  # bench
    evaluate.register(sub)  # evaluate (off-policy evaluation)
    offline.register(sub)  # evaluate-offline, datasets (models compared on real logs)
    demo.register(sub)  # demo
    simulate.register(sub)  # simulate (closed loop against a known world)
    report.register(sub)  # report (per-arm CTR/CVR from ctr-feedback)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args, _settings(args))
    except AdpulseError as exc:
        print(f"adpulse: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("adpulse: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a Kafka client's own errors are user-facing too
        if type(exc).__module__.startswith(("kafka", "aiokafka")):
            unavailable = BrokerUnavailable(f"Kafka: {type(exc).__name__}: {exc}")
            print(f"adpulse: error: {unavailable}", file=sys.stderr)
            return unavailable.exit_code
        raise


if __name__ == "__main__":
    sys.exit(main())
