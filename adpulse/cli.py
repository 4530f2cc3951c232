"""``adpulse``: one command line for the broker, topics, replay, worker, demo and benchmarks.

Every subcommand that talks to Kafka takes ``--bootstrap`` (or ADPULSE_BOOTSTRAP).
User mistakes end in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from adpulse.errors import AdpulseError, BrokerUnavailable, InputError
from adpulse.settings import Settings

Handler = Callable[[argparse.Namespace, Settings], int]


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(bootstrap=getattr(args, "bootstrap", None))


def _add_bootstrap(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bootstrap",
        metavar="HOST:PORT",
        help="Kafka bootstrap servers (default: $ADPULSE_BOOTSTRAP, else 127.0.0.1:9092)",
    )


def cmd_broker(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.broker import EmbeddedBroker  # noqa: PLC0415

    port = args.port or settings.broker_port
    broker = EmbeddedBroker(port=port).start()
    print(f"embedded broker (tansu) answering on {broker.bootstrap}; Ctrl-C stops it", flush=True)
    _wait_for_signal()
    broker.stop()
    print("embedded broker stopped")
    return 0


def _wait_for_signal() -> None:
    """Sleep until SIGINT or SIGTERM; both mean a clean stop."""
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not received:
            signal.pause()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def cmd_topics_create(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.topics import create_topics  # noqa: PLC0415

    if args.partitions:
        settings = settings.with_(partitions=args.partitions)
    for name, outcome in create_topics(settings):
        print(f"{outcome:8s} {name}")
    return 0


def cmd_topics_plan(_args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.topics import plan  # noqa: PLC0415

    for t in plan(settings):
        conf = " ".join(f"{k}={v}" for k, v in sorted(t.configs.items()))
        print(f"{t.name:24s} partitions={t.partitions} {conf}")
    return 0


def cmd_replay_taobao(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse import replay  # noqa: PLC0415
    from adpulse.broker import wait_for_broker  # noqa: PLC0415
    from adpulse.progress import Progress  # noqa: PLC0415

    if args.speed < 0:
        msg = f"--speed {args.speed:g}: must be 0 (as fast as possible) or a positive factor"
        raise InputError(msg)
    events = replay.read_taobao(Path(args.path))
    if args.limit:
        events = events[: args.limit]
    bootstrap = settings.bootstrap_or_default
    wait_for_broker(bootstrap, timeout=5)
    topic = settings.topic("user-events")
    with Progress(total=len(events), label=f"replay -> {topic}") as bar:
        sent = replay.produce(replay.paced(events, args.speed), bootstrap, topic, bar.advance)
    print(f"sent {sent} events from {args.path} to {topic} at {bootstrap}")
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from streams.worker import run_worker  # noqa: PLC0415

    changes = {
        "web_port": args.web_port,
        "data_dir": Path(args.data_dir) if args.data_dir else None,
        "app_id": args.app_id,
    }
    settings = settings.with_(**{k: v for k, v in changes.items() if v is not None})
    return run_worker(settings, loglevel=args.loglevel)


def cmd_bench_features(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.bench import features  # noqa: PLC0415
    from adpulse.broker import broker_for  # noqa: PLC0415

    taobao = Path(args.data) / "taobao_userbehavior_sample.csv"
    if args.smoke:
        cfg = features.FeaturesBench.smoke(taobao)
    else:
        cfg = features.FeaturesBench(
            events=args.events, repeats=args.repeat, rate=args.rate,
            duration_s=args.duration, users=args.users, taobao=taobao,
        )  # fmt: skip
    with broker_for(settings) as s:
        result = features.run(s, cfg)
    print(features.result_line(result))
    _write_json(args.json, {"features": result})
    return 0


def _write_json(path: str | None, payload: dict[str, object]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(_finite(payload), indent=2, sort_keys=True, allow_nan=False)
        Path(path).write_text(text + "\n")
        print(f"wrote {path}")


def _finite(obj: object) -> object:
    """NaN (a figure that could not be measured) becomes null: JSON has no NaN."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.demo import run_demo  # noqa: PLC0415

    return run_demo(settings, data=Path(args.data), out=Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adpulse",
        description="adpulse: streaming engine for real-time ad delivery "
        "(Kafka events -> interest state -> ONNX scoring -> online strategy).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "broker",
        help="run the embedded Kafka-protocol broker (tansu) on 127.0.0.1",
        description="Start the embedded broker (tansu, memory storage) on 127.0.0.1, wait "
        "until it answers a Kafka Metadata request, and stop it cleanly on Ctrl-C or SIGTERM. "
        "For development and tests; production uses a real Kafka cluster via --bootstrap.",
    )
    p.add_argument("--port", type=int, help="port to listen on (default: $ADPULSE_BROKER_PORT)")
    p.set_defaults(handler=cmd_broker)

    p = sub.add_parser(
        "topics",
        help="create or show adpulse's Kafka topics",
        description="Manage the topics of the adpulse contract (schemas/topics.py).",
    )
    tsub = p.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    c = tsub.add_parser(
        "create",
        help="create every topic that is missing (idempotent)",
        description="Create every adpulse topic with its partition count, compaction and "
        "retention. Topics that already exist are left alone, so this is safe to rerun.",
    )
    _add_bootstrap(c)
    c.add_argument("--partitions", type=int, help="partitions per topic ($ADPULSE_PARTITIONS)")
    c.set_defaults(handler=cmd_topics_create)
    c = tsub.add_parser(
        "plan",
        help="print the topics and configs 'create' would make",
        description="Print each topic's name, partitions and configs without contacting Kafka.",
    )
    c.set_defaults(handler=cmd_topics_plan)

    p = sub.add_parser(
        "replay",
        help="replay a real behaviour log into user-events",
        description="Send the rows of a real behaviour log to the user-events topic, "
        "keyed by user id.",
    )
    rsub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    c = rsub.add_parser(
        "taobao",
        help="the Taobao UserBehavior CSV (user,item,category,behavior,timestamp)",
        description="Map the Taobao UserBehavior CSV (pv->browse, cart, fav, buy->purchase; "
        "timestamps in seconds) to user-events messages and send them, with a progress bar.",
    )
    c.add_argument("path", help="the CSV file, e.g. ../shared/data/taobao_userbehavior_sample.csv")
    c.add_argument(
        "--speed",
        type=float,
        default=0.0,
        help="0 = as fast as possible (file order); N = N x real time, in event-time order",
    )
    c.add_argument("--limit", type=int, help="send only the first N rows")
    _add_bootstrap(c)
    c.set_defaults(handler=cmd_replay_taobao)

    p = sub.add_parser(
        "worker",
        help="run a stream worker (Faust app: ingest, interest table, web server)",
        description="Run one adpulse worker: consumes user-events in batches, keeps the "
        "interest table (RocksDB, changelogged), dead-letters bad input, and serves "
        "GET /users/{id}/interest, /health and /metrics. Start several with different "
        "--web-port and --data-dir to split the partitions. Stops cleanly on SIGTERM/Ctrl-C.",
    )
    _add_bootstrap(p)
    p.add_argument("--web-port", type=int, help="HTTP port ($ADPULSE_WEB_PORT, default 6066)")
    p.add_argument("--data-dir", help="RocksDB directory ($ADPULSE_DATA_DIR)")
    p.add_argument("--app-id", help="Faust app id / consumer group ($ADPULSE_APP_ID)")
    p.add_argument(
        "--loglevel",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default: info)",
    )
    p.set_defaults(handler=cmd_worker)

    p = sub.add_parser(
        "bench",
        help="benchmarks, each with its baseline measured in the same run",
        description="Benchmarks print medians with their spread and a baseline measured in "
        "the same run on the same messages (this machine is shared and noisy: compare ratios).",
    )
    bsub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    c = bsub.add_parser(
        "features",
        help="interest-feature throughput and freshness of one worker",
        description="Produce N Taobao-shaped events, then measure a worker's events/s against "
        "a bare aiokafka consume->produce loop over the same messages, and event-to-state "
        "freshness at a fixed offered load.",
    )
    c.add_argument("--events", type=int, default=200_000, help="events per repeat (200000)")
    c.add_argument("--repeat", type=int, default=3, help="repeats; the median is reported (3)")
    c.add_argument("--rate", type=float, default=5000.0, help="offered events/s for freshness")
    c.add_argument("--duration", type=float, default=10.0, help="seconds of freshness load (10)")
    c.add_argument("--users", type=int, default=10_000, help="distinct users (10000)")
    c.add_argument("--data", default="../shared/data", help="folder with the Taobao sample to fit")
    c.add_argument("--smoke", action="store_true", help="tiny sizes: checks it runs, not speed")
    c.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    _add_bootstrap(c)
    c.set_defaults(handler=cmd_bench_features)

    p = sub.add_parser(
        "demo",
        help="run the pipeline on the real sample data and show what it did",
        description="Start the embedded broker (unless --bootstrap or ADPULSE_BOOTSTRAP is "
        "given), create the topics, replay the real Taobao sample and report what landed.",
    )
    p.add_argument("--data", default="../shared/data", help="folder with the sample data")
    p.add_argument("--out", default="var/demo", help="folder for the demo's outputs")
    _add_bootstrap(p)
    p.set_defaults(handler=cmd_demo)
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
