"""``adpulse broker``, ``adpulse topics create|plan`` and ``adpulse replay taobao``."""

from __future__ import annotations

import argparse
import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from adpulse.commands import Subparsers, add_bootstrap, add_command, add_group
from adpulse.core.errors import InputError
from adpulse.core.settings import Settings


def cmd_broker(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse.broker import embedded_broker  # noqa: PLC0415
    from adpulse.core.announce import announce, withdraw  # noqa: PLC0415

    if args.kind:
        settings = settings.with_(embedded=args.kind)
    if args.fetch_only:
        from adpulse.kafkabroker import kafka_libs  # noqa: PLC0415

        print(f"Apache Kafka jars in {kafka_libs(settings)}")
        return 0
    port = args.port or settings.broker_port
    broker = embedded_broker(settings, port=port)
    # The signal handler is in place before the JVM starts: a SIGTERM during the start
    # still stops it cleanly instead of killing this process and orphaning the broker.
    with _signals_recorded() as received:
        broker.start()
        assert broker.proc is not None
        pid = broker.proc.pid
        announce(port, pid, broker.kind)  # workers on this port recognise it (core.announce)
        try:
            print(f"embedded broker ({broker.name}) answering on {broker.bootstrap}; "
                  "Ctrl-C stops it", flush=True)  # fmt: skip
            print(_recognised_note(broker.bootstrap, port == settings.broker_port), flush=True)
            while not received:
                signal.pause()
        finally:
            withdraw(port, pid)
    broker.stop()
    print(f"embedded broker ({broker.name}) stopped", flush=True)
    return 0


def _recognised_note(bootstrap: str, default: bool) -> str:
    note = (
        f"workers and tools on {bootstrap} recognise it as the embedded broker and may use "
        "the published development pseudonym key (a real cluster needs "
        "ADPULSE_PSEUDONYM_KEY_FILE)"
    )
    return note if default else f"{note}; point them at it: export ADPULSE_BOOTSTRAP={bootstrap}"


@contextlib.contextmanager
def _signals_recorded() -> Iterator[list[int]]:
    """Record SIGINT and SIGTERM (both mean a clean stop) instead of dying of them."""
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def cmd_topics_create(args: argparse.Namespace, settings: Settings) -> int:
    from streams.runtime.topicadmin import create_topics  # noqa: PLC0415

    if args.partitions:
        settings = settings.with_(partitions=args.partitions)
    for name, outcome in create_topics(settings):
        print(f"{outcome:8s} {name}")
    return 0


def cmd_topics_plan(_args: argparse.Namespace, settings: Settings) -> int:
    from streams.runtime.topicadmin import plan  # noqa: PLC0415

    for t in plan(settings):
        conf = " ".join(f"{k}={v}" for k, v in sorted(t.configs.items()))
        print(f"{t.name:24s} partitions={t.partitions} {conf}")
    return 0


def cmd_replay_taobao(args: argparse.Namespace, settings: Settings) -> int:
    from adpulse import replay  # noqa: PLC0415
    from adpulse.core.probe import wait_for_broker  # noqa: PLC0415
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
    wait_for_broker(settings, timeout=5)
    topic = settings.topic("user-events")
    with Progress(total=len(events), label=f"replay -> {topic}") as bar:
        sent = replay.produce(replay.paced(events, args.speed), settings, topic, bar.advance)
    print(f"sent {sent} events from {args.path} to {topic} at {bootstrap}")
    return 0


def register(sub: Subparsers) -> None:
    p = add_command(
        sub,
        "broker",
        cmd_broker,
        help="run the embedded broker (Apache Kafka, KRaft) on 127.0.0.1",
        description="Start the embedded broker on 127.0.0.1: Apache Kafka in KRaft mode from "
        "its Maven Central jars (a fresh storage directory, removed at stop), or tansu with "
        "--kind tansu. Waits until it answers a Kafka Metadata request and stops it cleanly "
        "on Ctrl-C or SIGTERM. While it runs it announces itself, so workers on its port "
        "may use the published development pseudonym key. For development and tests; "
        "production uses a real cluster via --bootstrap.",
    )
    p.add_argument("--port", type=int, help="port to listen on (default: $ADPULSE_BROKER_PORT)")
    p.add_argument(
        "--kind", choices=("kafka", "tansu"), help="which broker (default: $ADPULSE_EMBEDDED)"
    )
    p.add_argument(
        "--fetch-only",
        action="store_true",
        help="only fetch Apache Kafka's jars into the cache (Maven) and print where",
    )

    topics = add_group(
        sub,
        "topics",
        dest="topics_command",
        metavar="ACTION",
        help="create or show adpulse's Kafka topics",
        description="Manage the topics of the adpulse contract (schemas/topics.py).",
    )
    p = add_command(
        topics,
        "create",
        cmd_topics_create,
        help="create every topic that is missing (idempotent)",
        description="Create every adpulse topic with its partition count, compaction and "
        "retention. Topics that already exist are left alone, so this is safe to rerun.",
    )
    add_bootstrap(p)
    p.add_argument("--partitions", type=int, help="partitions per topic ($ADPULSE_PARTITIONS)")
    add_command(
        topics,
        "plan",
        cmd_topics_plan,
        help="print the topics and configs 'create' would make",
        description="Print each topic's name, partitions and configs without contacting Kafka.",
    )

    replay = add_group(
        sub,
        "replay",
        dest="source",
        metavar="SOURCE",
        help="replay a real behaviour log into user-events",
        description="Send the rows of a real behaviour log to the user-events topic, "
        "keyed by user id.",
    )
    p = add_command(
        replay,
        "taobao",
        cmd_replay_taobao,
        help="the Taobao UserBehavior CSV (user,item,category,behavior,timestamp)",
        description="Map the Taobao UserBehavior CSV (pv->browse, cart, fav, buy->purchase; "
        "timestamps in seconds) to user-events messages and send them, with a progress bar.",
    )
    p.add_argument("path", help="the CSV file, e.g. ../shared/data/taobao_userbehavior_sample.csv")
    p.add_argument(
        "--speed",
        type=float,
        default=0.0,
        help="0 = as fast as possible (file order); N = N x real time, in event-time order",
    )
    p.add_argument("--limit", type=int, help="send only the first N rows")
    p.add_argument(
        "--now",
        action="store_true",
        help="shift event times so the newest is now (keeps the gaps): the 2017 sample "
        "would otherwise be decayed to nothing by a 24 h half-life",
    )
    add_bootstrap(p)
