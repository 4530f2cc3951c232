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
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from adpulse.errors import AdpulseError, BrokerUnavailable, ConfigError, InputError
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
    if args.now:
        events = replay.rebased(events, int(time.time() * 1000))
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


def cmd_catalog_publish(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse import catalogtool  # noqa: PLC0415

    ads = catalogtool.read_catalog(Path(args.path))  # every line checked before any is sent
    if not ads:
        msg = f"{args.path}: no ads in the file"
        raise InputError(msg)
    topic = _ready(settings, "ad-catalog")
    n = catalogtool.publish(settings.bootstrap_or_default, topic, ads)
    print(f"published {n} ads from {args.path} to {topic} at {settings.bootstrap_or_default}")
    return 0


def cmd_catalog_synth(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse import catalogtool, replay  # noqa: PLC0415

    if args.ads < 1:
        msg = f"--ads {args.ads}: must be at least 1"
        raise InputError(msg)
    # Every event's category, repeated as often as it occurs: ads follow real interest.
    categories = [e.category_id for e in replay.read_taobao(Path(args.categories_from))]
    ads = catalogtool.synthetic_ads(args.ads, categories, seed=args.seed)
    topic = _ready(settings, "ad-catalog")
    n = catalogtool.publish(settings.bootstrap_or_default, topic, ads)
    print(
        f"published {n} synthetic ads (categories drawn from the {len(set(categories))} in "
        f"{args.categories_from}) to {topic} at {settings.bootstrap_or_default}"
    )
    return 0


def cmd_catalog_remove(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse import catalogtool  # noqa: PLC0415

    topic = _ready(settings, "ad-catalog")
    catalogtool.remove(settings.bootstrap_or_default, topic, args.ad_ids)
    print(f"sent {len(args.ad_ids)} tombstone(s) to {topic}: {' '.join(args.ad_ids)}")
    return 0


def _ready(settings: Settings, topic: str) -> str:
    """The full topic name, once the broker answers (else one-line BrokerUnavailable)."""
    from adpulse.broker import wait_for_broker  # noqa: PLC0415

    wait_for_broker(settings.bootstrap_or_default, timeout=5)
    return settings.topic(topic)


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    try:
        import torch  # noqa: F401, PLC0415 - only to give a clear message when it is missing
    except ImportError:
        msg = "training needs PyTorch: pip install torch==2.13.0 (or make venv)"
        raise ConfigError(msg) from None
    from scoring import train  # noqa: PLC0415

    if args.input is not None and args.generate:
        msg = "give either an input file or --generate N, not both"
        raise InputError(msg)
    out = Path(args.out or settings.model_dir or "var/models")
    if args.input is not None and not Path(args.input).is_file():
        msg = f"{args.input}: no such file"
        raise InputError(msg)
    m = train.run_train(args.input, args.generate, out, seed=args.seed, epochs=args.epochs)
    print(train.summary(m))
    print(f"version directory: {m['path']}")
    return 0


def cmd_bench_scorer(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.bench import scorer  # noqa: PLC0415

    try:
        result = scorer.run(
            args.device,
            smoke=args.smoke,
            settings=settings,
            model_dir=Path(settings.model_dir) if settings.model_dir else None,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except FileNotFoundError as exc:  # no model version to measure
        raise InputError(str(exc)) from None
    print(scorer.format_table(result))
    print(scorer.summary(result))
    _write_json(args.json, {"scorer": result})
    return 0


def cmd_bench_decisions(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.bench import decisions  # noqa: PLC0415
    from adpulse.broker import broker_for  # noqa: PLC0415

    if args.smoke:
        cfg = decisions.DecisionsBench.smoke()
    else:
        cfg = decisions.DecisionsBench(
            rate=args.rate, duration_s=args.duration, repeats=args.repeat, users=args.users,
            candidates=args.candidates, ads=args.ads,
        )  # fmt: skip
    with broker_for(settings) as s:
        result = decisions.run(s, cfg)
    print(decisions.result_line(result))
    _write_json(args.json, {"decisions": result})
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
    c.add_argument(
        "--now",
        action="store_true",
        help="shift event times so the newest is now (keeps the gaps): the 2017 sample "
        "would otherwise be decayed to nothing by a 24 h half-life",
    )
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
        "catalog",
        help="publish, generate or remove ads on the ad-catalog topic",
        description="Manage the ad catalog every worker holds (the compacted ad-catalog topic, "
        "keyed by ad_id: the latest record per ad wins, a tombstone removes it). Workers pick "
        "changes up within about a second.",
    )
    csub = p.add_subparsers(dest="catalog_command", required=True, metavar="ACTION")
    c = csub.add_parser(
        "publish",
        help="check a JSONL file of ads against the ad-catalog schema, then publish it",
        description="Read PATH (one ad-catalog record per line), check every line against "
        "schemas/ad-catalog.schema.json, and only then send the ads keyed by ad_id. A bad "
        "line stops the command with its line number and nothing is sent.",
    )
    c.add_argument("path", metavar="PATH.jsonl", help="ads, one JSON object per line")
    _add_bootstrap(c)
    c.set_defaults(handler=cmd_catalog_publish)
    c = csub.add_parser(
        "synth",
        help="publish N synthetic ads over the categories of the Taobao sample",
        description="Generate N valid ads (ad-0 ... ad-N-1, 50 campaigns, log-normal bids) "
        "whose categories follow how often each category occurs in a Taobao UserBehavior "
        "CSV, and publish them. Same --seed, same ads.",
    )
    c.add_argument("--ads", type=int, required=True, metavar="N", help="how many ads to make")
    c.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    c.add_argument(
        "--categories-from",
        default="../shared/data/taobao_userbehavior_sample.csv",
        metavar="CSV",
        help="Taobao CSV whose categories the ads promote "
        "(default ../shared/data/taobao_userbehavior_sample.csv)",
    )
    _add_bootstrap(c)
    c.set_defaults(handler=cmd_catalog_synth)
    c = csub.add_parser(
        "remove",
        help="remove ads from every worker's catalog (tombstones)",
        description="Send a tombstone (null value) for each AD_ID: the ad stops being served "
        "and compaction later drops it from the topic.",
    )
    c.add_argument("ad_ids", nargs="+", metavar="AD_ID", help="ad ids to remove")
    _add_bootstrap(c)
    c.set_defaults(handler=cmd_catalog_remove)

    p = sub.add_parser(
        "train",
        help="train the CTR model and write a new model version (needs PyTorch)",
        description="Train the CTR model on logged ctr-feedback records (a JSONL or Parquet "
        "file) or on N synthetic ones, report held-out AUC, log loss and calibration on the "
        "last 20% by time, export ONNX (checked against PyTorch) and write a new version "
        "directory under --out. The default --out is $ADPULSE_MODEL_DIR, else ./var/models, "
        "never the shipped scoring/models, so a run cannot replace the default model by "
        "accident. A worker whose ADPULSE_MODEL_DIR is that folder hot-swaps to the new "
        "version once it passes validation.",
    )
    p.add_argument(
        "--input", metavar="PATH.jsonl", help="ctr-feedback records to train on (JSONL/Parquet)"
    )
    p.add_argument("--generate", type=int, metavar="N", help="train on N synthetic records")
    p.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the data (default 3)")
    p.add_argument(
        "--out", metavar="DIR", help="model registry folder ($ADPULSE_MODEL_DIR, else var/models)"
    )
    p.set_defaults(handler=cmd_train)

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
    c = bsub.add_parser(
        "decisions",
        help="end-to-end decision latency under Poisson-arriving ad requests",
        description="Warm interest vectors for --users users, then offer ad requests "
        "(Poisson arrivals at --rate/s, --candidates ads each) to one worker and measure "
        "request produced -> decision consumed latency p50/p99/p99.9 and throughput.",
    )
    c.add_argument("--rate", type=float, default=1000.0, help="offered requests/s (1000)")
    c.add_argument("--duration", type=float, default=20.0, help="seconds per repeat (20)")
    c.add_argument("--repeat", type=int, default=3, help="repeats; medians reported (3)")
    c.add_argument("--users", type=int, default=10_000, help="users with warm vectors (10000)")
    c.add_argument("--candidates", type=int, default=100, help="candidate ads per request (100)")
    c.add_argument("--ads", type=int, default=2000, help="ads in the catalog (2000)")
    c.add_argument("--smoke", action="store_true", help="tiny sizes: checks it runs, not speed")
    c.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    _add_bootstrap(c)
    c.set_defaults(handler=cmd_bench_decisions)

    c = bsub.add_parser(
        "scorer",
        help="candidate rows/s of the ONNX scorer by batch size, against numpy",
        description="Score batches of 1 to 4096 candidate rows with the newest model version "
        "in ONNX Runtime and, in the same run, with a plain numpy forward pass of the same "
        "graph; then the whole scoring path (feature assembly, micro-batching, ONNX Runtime, "
        "ranking) at 100 candidates per request. Prints a table and a one-line summary. "
        "--device cuda on a machine without a GPU runs on CPU and says so.",
    )
    c.add_argument(
        "--device",
        choices=["cpu", "cuda", "auto"],
        default="cpu",
        help="where ONNX Runtime runs (default cpu; auto: CUDA if present)",
    )
    c.add_argument("--smoke", action="store_true", help="tiny sizes: checks it runs, not speed")
    c.add_argument("--json", metavar="PATH", help='also write {"scorer": figures} as JSON')
    c.set_defaults(handler=cmd_bench_scorer)

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
