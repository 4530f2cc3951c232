"""``adpulse bench promises``: the engine's timing promises, each over repeats, against its target.

A liveness test only shows that something happens within a generous bound; what
the docs promise about *how soon* is measured here instead (docs/performance.md,
"Timing promises"), with a median and spread over repeats:

1. **catalog change -> decisions** (target 1 s): an ad for a placement no other ad
   targets is published to ``ad-catalog`` (acknowledged); each of two workers is
   asked ``POST /decide`` for one of its own users on that placement every
   ``poll_s`` until it chooses the new ad. The figure is the later of the two.
2. **label -> the other worker's next decision** (stated bound: 1 s): a
   ``ctr-feedback`` label for an ad is produced (acknowledged); both workers' learner
   state for that ad (``GET /ads/{id}/strategy``: what their decision stage reads
   for the next decision) is polled until it counts the label. Only one worker's
   learner applies it; the other sees it through the strategy table's changelog.
3. **broker cut -> resume** (target 5 s): a TCP proxy in front of a dedicated broker
   (:mod:`adpulse.netcut`) cuts one worker's link for ``cut_s`` while events keep
   arriving from a spared client; from the moment the link returns until the
   worker applies events again.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from kafka import KafkaProducer

from adpulse.bench import machine, machine_line, percentiles_ms, spread
from adpulse.broker import embedded_broker, free_port
from adpulse.catalogtool import publish
from adpulse.core.kafkaconf import client_kwargs
from adpulse.core.settings import Settings
from adpulse.netcut import Proxy
from adpulse.workerproc import WorkerProcess
from streams.runtime.topicadmin import create_topics

SPARED = "bench-promises"  # client id of this benchmark's own clients: never cut
TIMEOUT_S = 30.0  # a promise not kept within this is reported as missed (null)


@dataclass(frozen=True)
class PromisesBench:
    catalog_repeats: int = 10
    labels: int = 30
    cuts: int = 3
    cut_s: float = 3.0
    poll_s: float = 0.005

    @classmethod
    def smoke(cls) -> PromisesBench:
        return cls(catalog_repeats=2, labels=3, cuts=1, cut_s=1.0)


def run(base: Settings, cfg: PromisesBench, log: Any = print) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="adpulse-bench-") as tmp:
        with _pair(base, Path(tmp)) as (s, a, b):
            log(f"  catalog change -> decisions on both workers, {cfg.catalog_repeats} times")
            catalog = [_catalog_once(s, a, b, i, cfg.poll_s) for i in range(cfg.catalog_repeats)]
            log(f"  label -> both workers' learner state, {cfg.labels} labels")
            labels = _labels(s, a, b, cfg)
        log(f"  broker cut of {cfg.cut_s:g} s -> resume, {cfg.cuts} times")
        resume = _cuts(base, Path(tmp) / "cut", cfg)
    return {
        "catalog_s": _figure(catalog),
        "catalog_target_s": 1.0,
        "label_s": _figure(labels),
        "label_bound_s": 1.0,
        "resume_s": _figure(resume),
        "resume_target_s": 5.0,
        "cut_s": cfg.cut_s,
        "machine": machine(),
    }


def _figure(samples: list[float | None]) -> dict[str, Any]:
    """Median, spread and p99 of the kept promises; ``missed``: not kept within TIMEOUT_S."""
    kept = [x for x in samples if x is not None]
    out: dict[str, Any] = {"samples": len(samples), "missed": len(samples) - len(kept)}
    if kept:
        out |= spread(kept)
        out["p99"] = percentiles_ms(kept, [99])[0] / 1000
    return out


def result_line(res: dict[str, Any]) -> str:
    def one(name: str, f: dict[str, Any], target: str) -> str:
        if "median" not in f:
            return f"{name}: never ({f['missed']} of {f['samples']} missed; target {target})"
        return (f"{name} median {f['median']:.3f} s ({f['min']:.3f}-{f['max']:.3f}), "
                f"p99 {f['p99']:.3f} s over {f['samples']}, {f['missed']} missed "
                f"(target {target})")  # fmt: skip

    return "promises: " + "; ".join([
        one("catalog -> decisions", res["catalog_s"], "≤ 1 s"),
        one("label -> other worker", res["label_s"], "≤ 1 s"),
        one(f"broker cut {res['cut_s']:g} s -> resume", res["resume_s"], "≤ 5 s"),
    ]) + f"; {machine_line(res['machine'])}"  # fmt: skip


@contextmanager
def _pair(base: Settings, tmp: Path) -> Iterator[tuple[Settings, WorkerProcess, WorkerProcess]]:
    """Two workers sharing the partitions of new topics, each owning some users."""
    tag = uuid.uuid4().hex[:8]
    s = base.with_(
        topic_prefix=f"bench-{tag}.", app_id=f"bench-{tag}",
        data_dir=tmp / "a", session_timeout_s=6.0,
    )  # fmt: skip
    create_topics(s)
    publish(s, s.topic("ad-catalog"), [_ad("seed", "seed")])
    a = WorkerProcess(s, tmp, name="promises-a").start()
    try:
        b = WorkerProcess(s.with_(data_dir=tmp / "b"), tmp, name="promises-b").start()
        try:
            for w in (a, b):
                w.wait_until(partial(_has_ads, w), 60, "catalog")
            a.wait_until(lambda: _owners(a, b) is not None, 90, "both workers to own users")
            yield s, a, b
        finally:
            b.stop()
    finally:
        a.stop()


def _has_ads(w: WorkerProcess) -> bool:
    return w.metric("adpulse_catalog_ads") >= 1


def _more(read: Callable[[], float], than: float) -> bool:
    return read() > than


def _ad(ad_id: str, placement: str) -> dict[str, Any]:
    return {"ad_id": ad_id, "campaign_id": f"c-{placement}", "category_id": 4756105,
            "bid": 1.0, "daily_budget": 1e9, "targeting": {"placements": [placement]}}  # fmt: skip


def _decide(w: WorkerProcess, user: str, placement: str) -> tuple[int, Any]:
    """POST /decide as a client should: a 503 (a partition on the move) is retried."""
    body = {"request_id": uuid.uuid4().hex, "user_id": user, "placement": placement,
            "ts": int(time.time() * 1000)}  # fmt: skip
    for _ in range(40):
        status, got, _ = w.post("/decide", json.dumps(body).encode())
        if status != 503:
            break
        time.sleep(0.05)
    return status, got


def _owners(a: WorkerProcess, b: WorkerProcess) -> tuple[str, str] | None:
    """A user that ``a`` answers itself and one that ``b`` does, or None while the
    partitions are not split."""
    own: dict[int, str] = {}
    for i in range(32):
        user = f"owner-probe-{i}"
        before = a.metric("adpulse_decide_requests_total", 'outcome="forwarded"')
        if _decide(a, user, "seed")[0] != 200:
            continue
        forwarded = a.metric("adpulse_decide_requests_total", 'outcome="forwarded"') > before
        own.setdefault(int(forwarded), user)
        if len(own) == 2:
            return own[0], own[1]
    return None


def _catalog_once(
    s: Settings, a: WorkerProcess, b: WorkerProcess, i: int, poll_s: float
) -> float | None:
    owners = _owners(a, b)
    if owners is None:
        return None
    placement, ad_id = f"promise-{i}-{uuid.uuid4().hex[:6]}", f"promise-{i}"
    publish(s, s.topic("ad-catalog"), [_ad(ad_id, placement)])  # returns once acknowledged
    t0 = time.monotonic()
    waiting = {a: owners[0], b: owners[1]}
    while waiting and time.monotonic() - t0 < TIMEOUT_S:
        for w, user in list(waiting.items()):
            status, got = _decide(w, user, placement)
            if status == 200 and got.get("ad_id") == ad_id:
                del waiting[w]
        time.sleep(poll_s)
    return None if waiting else time.monotonic() - t0


def _labels(
    s: Settings, a: WorkerProcess, b: WorkerProcess, cfg: PromisesBench
) -> list[float | None]:
    ad_id = f"label-{uuid.uuid4().hex[:6]}"
    publish(s, s.topic("ad-catalog"), [_ad(ad_id, "labels")])
    producer = KafkaProducer(**client_kwargs(s), client_id=SPARED, linger_ms=0, acks="all")
    out: list[float | None] = []
    try:
        for i in range(cfg.labels):
            now = int(time.time() * 1000)
            label = {"decision_id": f"{ad_id}-d{i}", "ad_id": ad_id, "user_id": f"lu{i}",
                     "clicked": i % 2, "decision_ts": now - 1000, "label_ts": now,
                     "features": {"interest": [], "placement": "labels", "pctr": 0.02},
                     "propensity": 1.0, "policy": "greedy", "reason": "bench"}  # fmt: skip
            producer.send(s.topic("ctr-feedback"), key=ad_id.encode(),
                          value=json.dumps(label).encode()).get(10)  # fmt: skip
            t0 = time.monotonic()
            seen = lambda i=i: all(_shows(w, ad_id) > i for w in (a, b))  # noqa: E731
            out.append(_until(seen, cfg.poll_s, t0))
    finally:
        producer.close()
    return out


def _shows(w: WorkerProcess, ad_id: str) -> int:
    status, body = w.get(f"/ads/{ad_id}/strategy", authorized=False)
    return int(body["shows"]) if status == 200 else 0


def _until(check: Callable[[], bool], poll_s: float, t0: float) -> float | None:
    while time.monotonic() - t0 < TIMEOUT_S:
        if check():
            return time.monotonic() - t0
        time.sleep(poll_s)
    return None


def _cuts(base: Settings, tmp: Path, cfg: PromisesBench) -> list[float | None]:
    """One worker behind a cuttable link to a dedicated broker; ``cfg.cuts`` cuts."""
    tmp.mkdir(parents=True)
    port = free_port()
    proxy = Proxy(port, SPARED)
    try:
        with embedded_broker(base, port, tmp / "broker.log", advertised_port=proxy.port):
            tag = uuid.uuid4().hex[:8]
            s = base.with_(
                bootstrap=f"127.0.0.1:{proxy.port}", topic_prefix=f"bench-{tag}.",
                app_id=f"bench-{tag}", data_dir=tmp / "data", session_timeout_s=6.0,
            )  # fmt: skip
            create_topics(s)
            worker = WorkerProcess(s, tmp, name="promises-cut").start()
            stop = threading.Event()
            feeder = threading.Thread(target=_feed, args=(s, stop), daemon=True)
            feeder.start()
            try:

                def applied() -> float:
                    return worker.metric("adpulse_events_total")

                worker.wait_until(lambda: applied() > 0, 60, "events flowing")
                out: list[float | None] = []
                for _ in range(cfg.cuts):
                    proxy.cut()
                    time.sleep(cfg.cut_s)
                    during = applied()
                    proxy.restore()
                    back = time.monotonic()
                    out.append(_until(partial(_more, applied, during), cfg.poll_s, back))
                    _until(lambda: worker.get("/health")[0] == 200, 0.05, time.monotonic())
                return out
            finally:
                stop.set()
                feeder.join(10)
                worker.stop()
    finally:
        proxy.close()


def _feed(s: Settings, stop: threading.Event) -> None:
    """About 200 user-events/s from a client the proxy spares, until ``stop``."""
    producer = KafkaProducer(**client_kwargs(s), client_id=SPARED, linger_ms=2)
    try:
        i = 0
        while not stop.is_set():
            now = int(time.time() * 1000)
            for _ in range(10):
                user = f"fu{i % 50}"
                e = {"event_id": f"f{i}", "user_id": user, "kind": "browse",
                     "item_id": i, "category_id": 4756105, "ts": now}  # fmt: skip
                producer.send(s.topic("user-events"), key=user.encode(),
                              value=json.dumps(e).encode())  # fmt: skip
                i += 1
            producer.flush()
            time.sleep(0.05)
    finally:
        producer.close()
