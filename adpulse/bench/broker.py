"""``adpulse bench broker``: a bare produce->consume echo on each embedded broker in turn.

Why: tansu's fetch lists every stored batch, so its cost grows with everything
written and a consumer starves within minutes at 2,000 msg/s (docs/reference.md, "The embedded
broker"); Apache Kafka's should not. This bench shows that on this machine, with
no adpulse code in the path: the same load generator and consumer run against
each broker in the same process run, one broker at a time.

Per broker: a fresh broker on a free port, one ``partitions``-partition topic
created with the admin client (the Kafka broker does not auto-create topics), a
producer at a steady ``rate`` msg/s of ``size``-byte records (``linger_ms``), and
one consumer (fetch wait 10 ms) assigned every partition from the start. Each
record carries its send time, so latency is receive time - send time on one
clock. Every ``window_s`` seconds: records sent and received in the window,
latency p50/p99 of what arrived (NaN when nothing did), and the broker's CPU as
a percentage of one core (utime+stime from /proc of the broker and its child
processes). Counts are what the consumer received, never end offsets. Only
ratios within one run compare: the machine is shared.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from adpulse.bench import machine, machine_line, percentiles_ms
from adpulse.broker import EmbeddedBroker, embedded_broker, free_port
from adpulse.core.errors import BrokerUnavailable, ConfigError
from adpulse.core.kafkaconf import client_kwargs
from adpulse.core.settings import EmbeddedKind, Settings

TOPIC = "bench-broker-echo"
_SENT = struct.Struct(">d")  # the send time (time.monotonic()) leads every payload
_ECHO_TIMEOUT_S = 30.0  # a first record not back by then: the broker is not serving


@dataclass(frozen=True)
class BrokerBench:
    rate: float = 2000.0
    duration_s: float = 180.0
    window_s: float = 15.0
    size: int = 200
    linger_ms: int = 1
    brokers: tuple[EmbeddedKind, ...] = ("kafka", "tansu")
    partitions: int = 4
    drain_s: float = 10.0  # after the load: how long the consumer may catch up

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.duration_s <= 0 or self.window_s <= 0:
            msg = "--rate, --duration and --window must be positive"
            raise ConfigError(msg)
        if self.window_s > self.duration_s:
            msg = f"--window {self.window_s:g} is longer than --duration {self.duration_s:g}"
            raise ConfigError(msg)
        if self.size < _SENT.size or self.linger_ms < 0:
            msg = f"--size must be at least {_SENT.size} bytes and --linger-ms not negative"
            raise ConfigError(msg)
        if not self.brokers:
            msg = "--brokers names no broker: give kafka, tansu or kafka,tansu"
            raise ConfigError(msg)

    @classmethod
    def smoke(cls, **changes: Any) -> BrokerBench:
        return cls(**{"rate": 200.0, "duration_s": 10.0, "window_s": 5.0, **changes})


def parse_brokers(text: str) -> tuple[EmbeddedKind, ...]:
    """``"kafka,tansu"`` -> ``("kafka", "tansu")``; an unknown name is a ConfigError."""
    known: tuple[EmbeddedKind, ...] = get_args(EmbeddedKind)
    kinds: list[EmbeddedKind] = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        kind = next((k for k in known if k == name), None)
        if kind is None:
            msg = f"--brokers: unknown broker {name!r}; give a comma list of {', '.join(known)}"
            raise ConfigError(msg)
        if kind not in kinds:
            kinds.append(kind)
    return tuple(kinds)


def run(base: Settings, cfg: BrokerBench, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Each broker of ``cfg.brokers`` in turn, each stopped before the next starts."""
    logs = Path(tempfile.mkdtemp(prefix="adpulse-bench-broker-"))
    out: dict[str, Any] = {
        "rate": cfg.rate, "duration_s": cfg.duration_s, "window_s": cfg.window_s,
        "size": cfg.size, "linger_ms": cfg.linger_ms, "partitions": cfg.partitions,
        "brokers": list(cfg.brokers), "machine": machine(),
    }  # fmt: skip
    for kind in cfg.brokers:
        s = base.with_(embedded=kind)
        with embedded_broker(s, port=free_port(), log_path=logs / f"{kind}.log") as broker:
            log(f"{kind}: {broker.name} on {broker.bootstrap}, {cfg.rate:g} msg/s "
                f"for {cfg.duration_s:g} s\n  {_HEADER}")  # fmt: skip
            out[kind] = {"name": broker.name, **asyncio.run(_echo(broker, cfg, log))}
    shutil.rmtree(logs, ignore_errors=True)  # kept when a broker failed: errors name the log
    return out


async def _echo(
    broker: EmbeddedBroker, cfg: BrokerBench, log: Callable[[str], None]
) -> dict[str, Any]:
    assert broker.proc is not None
    await _create_topic(broker.bootstrap, cfg.partitions)
    producer = AIOKafkaProducer(**client_kwargs(broker.bootstrap), linger_ms=cfg.linger_ms)
    consumer = AIOKafkaConsumer(
        **client_kwargs(broker.bootstrap), enable_auto_commit=False, fetch_max_wait_ms=10
    )
    rx = _Receiver(consumer)
    async with producer, consumer:
        task = asyncio.create_task(rx.run())
        try:
            await _first_echo(producer, consumer, rx, broker, cfg.partitions)
            windows, sent = await _offer(producer, rx, broker.proc.pid, cfg, log)
            await producer.flush()
            deadline = time.monotonic() + cfg.drain_s
            while len(rx.latency_s) < sent and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return _summary(windows, sent, len(rx.latency_s))
        finally:
            rx.stopped = True
            await task


async def _create_topic(bootstrap: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(**client_kwargs(bootstrap))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, partitions, 1)])
    finally:
        await admin.close()


class _Receiver:
    """Reads every assigned partition; keeps each record's latency in order of receipt."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self.consumer = consumer
        self.latency_s: list[float] = []
        self.stopped = False

    async def run(self) -> None:
        while not self.stopped:
            batches = await self.consumer.getmany(timeout_ms=100)
            now = time.monotonic()
            for records in batches.values():
                self.latency_s.extend(now - _SENT.unpack_from(r.value or b"")[0] for r in records)


async def _first_echo(
    producer: AIOKafkaProducer,
    consumer: AIOKafkaConsumer,
    rx: _Receiver,
    broker: EmbeddedBroker,
    partitions: int,
) -> None:
    """One record per partition there and back before the clock starts.

    So every partition has its leader and both clients their connections before
    anything is measured; the consumer is assigned only once the writes succeeded,
    so its first metadata already names the leaders.
    """
    for p in range(partitions):
        await producer.send_and_wait(TOPIC, _SENT.pack(time.monotonic()), partition=p)
    tps = [TopicPartition(TOPIC, p) for p in range(partitions)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)  # a fresh topic: every record we send
    deadline = time.monotonic() + _ECHO_TIMEOUT_S
    while len(rx.latency_s) < partitions:
        if time.monotonic() > deadline:
            msg = (
                f"{broker.name} at {broker.bootstrap} took {partitions} records but did not "
                f"return them within {_ECHO_TIMEOUT_S:g} s; its log: {broker.log_path}"
            )
            raise BrokerUnavailable(msg)
        await asyncio.sleep(0.01)
    rx.latency_s.clear()  # not part of the measurement


async def _offer(
    producer: AIOKafkaProducer,
    rx: _Receiver,
    pid: int,
    cfg: BrokerBench,
    log: Callable[[str], None],
) -> tuple[list[dict[str, Any]], int]:
    """Send at ``cfg.rate`` for ``cfg.duration_s``, closing a window every ``cfg.window_s``."""
    pad = b"x" * (cfg.size - _SENT.size)
    hz = os.sysconf("SC_CLK_TCK")
    windows: list[dict[str, Any]] = []
    t0 = start = time.monotonic()
    sent = start_sent = start_rx = 0
    start_ticks = cpu_ticks(pid)
    for end in window_ends(cfg.duration_s, cfg.window_s):
        last = int(end * cfg.rate)
        while True:  # record i is due at (i + 1) / rate: exactly `last` by the window's end
            now = time.monotonic()
            due = min(int((now - t0) * cfg.rate), last)
            while sent < due:
                await producer.send(TOPIC, _SENT.pack(time.monotonic()) + pad)
                sent += 1
            if now >= t0 + end:
                break
            await asyncio.sleep(0.005)
        ticks, received = cpu_ticks(pid), len(rx.latency_s)
        p50, p99 = percentiles_ms(rx.latency_s[start_rx:received], (50, 99))
        w = {
            "end_s": round(end, 3), "sent": sent - start_sent, "received": received - start_rx,
            "broker_cpu_percent": (ticks - start_ticks) / hz / (now - start) * 100,
            "p50_ms": p50, "p99_ms": p99,
        }  # fmt: skip
        windows.append(w)
        log(f"  {_row(w)}")
        start, start_sent, start_rx, start_ticks = now, sent, received, ticks
    return windows, sent


def window_ends(duration_s: float, window_s: float) -> list[float]:
    """Window end times; a last, shorter window when the duration is no multiple.

    >>> window_ends(30, 10), window_ends(25, 10)
    ([10, 20, 30], [10, 20, 25])
    """
    n = math.ceil(duration_s / window_s - 1e-9)
    return [min((i + 1) * window_s, duration_s) for i in range(n)]


def cpu_ticks(pid: int) -> int:
    """utime+stime+cutime+cstime of ``pid`` and its live descendants, in clock ticks.

    A child's time moves into its parent's cutime/cstime when it is reaped, so the
    sum over the live tree neither loses nor double-counts it.
    """
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone since the listing
        p = int(entry.name)
        parent[p] = int(fields[1])
        ticks[p] = sum(int(x) for x in fields[11:15])
    tree, todo = {pid}, [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.update(kids)
        todo.extend(kids)
    return sum(ticks.get(p, 0) for p in tree)


def _summary(windows: list[dict[str, Any]], sent: int, received: int) -> dict[str, Any]:
    first, last = windows[0]["p99_ms"], windows[-1]["p99_ms"]
    starved = [w["end_s"] for w in windows if w["sent"] > 0 and w["received"] == 0]
    growth = (
        last / first if math.isfinite(first) and math.isfinite(last) and first > 0 else math.nan
    )
    return {
        "windows": windows,
        "sent": sent,
        "received": received,
        "not_received": sent - received,
        "received_after_load": received - sum(w["received"] for w in windows),  # in the drain
        "p99_first_ms": first,
        "p99_last_ms": last,
        "p99_last_over_first": growth,
        "starved": bool(starved),
        "starved_windows_end_s": starved,
    }


_HEADER = (
    f"{'second':>7} {'sent':>8} {'received':>9} {'broker_cpu%':>12} {'p50_ms':>8} {'p99_ms':>8}"
)


def _row(w: dict[str, Any]) -> str:
    return (
        f"{w['end_s']:7g} {w['sent']:8d} {w['received']:9d} {w['broker_cpu_percent']:12.0f} "
        f"{w['p50_ms']:8.1f} {w['p99_ms']:8.1f}"
    )


def format_tables(res: dict[str, Any]) -> str:
    """One table per broker, then its summary line."""
    out = [f"broker echo: {res['rate']:g} msg/s x {res['size']} B, linger {res['linger_ms']} ms, "
           f"{res['partitions']} partitions, {res['window_s']:g} s windows "
           "(only ratios within one run compare)"]  # fmt: skip
    for kind in res["brokers"]:
        b = res[kind]
        out += ["", f"{kind} ({b['name']})", _HEADER, *(_row(w) for w in b["windows"])]
        out.append(_broker_line(kind, b))
    return "\n".join(out)


def _broker_line(kind: str, b: dict[str, Any]) -> str:
    starved = (
        f"starved in windows ending {b['starved_windows_end_s']}"
        if b["starved"]
        else "never starved"
    )
    return (
        f"{kind}: p99 {b['p99_first_ms']:.1f} -> {b['p99_last_ms']:.1f} ms "
        f"(last/first {b['p99_last_over_first']:.2f}x), {starved}, "
        f"received {b['received']:,} of {b['sent']:,}"
    )


def result_line(res: dict[str, Any]) -> str:
    parts = "; ".join(_broker_line(k, res[k]) for k in res["brokers"])
    return (
        f"broker: {res['rate']:g} msg/s for {res['duration_s']:g} s per broker; {parts}; "
        f"{machine_line(res['machine'])}"
    )
