"""``adpulse bench adtext``: publish -> servable for ads that arrive with text alone.

Target (issue 16): p99 <= 1 s from publish to servable at 100 new ads/s on CPU.
One worker with ``ADPULSE_TEXT_MODEL`` (on CPU) follows a fresh ``ad-catalog``.
New ads, each with its own text (so every one runs the encoder, none comes
from the cache), are produced at ``rate`` per second for ``duration_s``. An ad is
servable once ``POST /decide`` with it as the only candidate chooses it. Every
``poll_s`` the worker's ``adpulse_catalog_ads`` is read; when it moves, every
ad still pending is asked for. So an ad's figure is from its send to the first
poll that saw it served: an upper bound, within one poll of the truth.

Baseline, same run and same thread count: the bare encoder (ONNX Runtime +
tokenizer in this process), texts/s one at a time and in batches of 64. What
the worker adds on top is the catalog refresh timer (0.25 s), the mirror's
fetch, validation and the catalog rebuild.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adpulse.bench import machine, machine_line, percentiles_ms
from adpulse.core.settings import Settings

TARGET_P99_S = 1.0
PLACEMENT = "adtext"
ADJ = ["cheap", "premium", "lightweight", "waterproof", "organic", "wireless", "vintage", "smart"]
NOUN = ["running shoes", "headphones", "coffee beans", "backpack", "desk lamp", "yoga mat",
        "phone case", "winter jacket", "water bottle", "board game"]  # fmt: skip
PITCH = ["free delivery over $50", "20% off this week", "two-year warranty",
         "ships in 24 hours", "rated 4.8 by 3,000 buyers", "now in six colours"]  # fmt: skip


@dataclass(frozen=True)
class AdTextBench:
    rate: float = 100.0
    duration_s: float = 30.0
    baseline_texts: int = 512
    poll_s: float = 0.01
    timeout_s: float = 30.0  # an ad not servable this long after its send is missed

    @classmethod
    def smoke(cls) -> AdTextBench:
        return cls(rate=20.0, duration_s=2.0, baseline_texts=32)


def texts(n: int, seed: str) -> list[str]:
    """Distinct ad copy (title, then a description), like a real catalog's length."""
    combos = itertools.cycle(itertools.product(ADJ, NOUN, PITCH))
    return [f"{a.title()} {b} {i} ({seed}): {c}. Order today, returns free for 30 days."
            for i, (a, b, c) in zip(range(n), combos, strict=False)]  # fmt: skip


def baseline(model_dir: Path, threads: int, n: int) -> dict[str, float]:
    """Texts/s of the bare encoder: one text per call, and batches of 64; and how many
    texts each rate timed."""
    from scoring.textencoder import TextEncoder  # noqa: PLC0415

    enc = TextEncoder(model_dir, device="cpu", threads=threads)
    sample = texts(n, "baseline")
    enc.encode(sample[:8])  # warm-up: session arenas, tokenizer
    singles = sample[: max(1, n // 4)]
    started = time.perf_counter()
    for t in singles:
        enc.encode([t])
    one = len(singles) / (time.perf_counter() - started)
    started = time.perf_counter()
    enc.encode(sample)
    return {"texts_per_s_batch1": one, "texts_per_s_batch64": n / (time.perf_counter() - started),
            "texts_timed_batch1": len(singles), "texts_timed_batch64": n}  # fmt: skip


def run(base: Settings, cfg: AdTextBench, model_dir: Path, log: Any = print) -> dict[str, Any]:
    from adpulse.catalogtool import publish  # noqa: PLC0415
    from adpulse.workerproc import WorkerProcess  # noqa: PLC0415
    from streams.runtime.topicadmin import create_topics  # noqa: PLC0415

    threads = base.scorer_threads
    log(f"  baseline: bare encoder on CPU, {cfg.baseline_texts} texts, {threads} thread(s)")
    base_fig = baseline(model_dir, threads, cfg.baseline_texts)
    tag = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="adpulse-bench-") as tmp:
        s = base.with_(topic_prefix=f"bench-{tag}.", app_id=f"bench-{tag}",
                       data_dir=Path(tmp) / "data")  # fmt: skip
        create_topics(s)
        publish(s, s.topic("ad-catalog"), [_ad("seed", "Seed ad, no offer")])
        extra = {"ADPULSE_TEXT_MODEL": str(model_dir), "ADPULSE_DEVICE": "cpu",
                 "ADPULSE_POLICY": "greedy", "ADPULSE_PACING": "off"}  # fmt: skip
        worker = WorkerProcess(s, Path(tmp), name="adtext", extra_env=extra).start()
        try:
            worker.wait_until(lambda: worker.metric("adpulse_catalog_ads") >= 1, 60, "seed ad")
            n = max(1, int(cfg.rate * cfg.duration_s))
            log(f"  publishing {n} ads with text at {cfg.rate:g}/s")
            latencies, missed, achieved = _publish_and_watch(s, worker, cfg, n, tag)
        finally:
            worker.stop()
    p50, p99 = percentiles_ms(latencies, [50, 99]) if latencies else (float("nan"),) * 2
    return {
        "ads": n, "offered_per_s": cfg.rate, "achieved_per_s": achieved, "missed": missed,
        "servable_p50_s": p50 / 1000, "servable_p99_s": p99 / 1000,
        "servable_max_s": max(latencies, default=float("nan")),
        "target_p99_s": TARGET_P99_S, "threads": threads, **base_fig, "machine": machine(),
    }  # fmt: skip


def _ad(ad_id: str, text: str) -> dict[str, Any]:
    return {
        "ad_id": ad_id, "campaign_id": "c-adtext", "category_id": 4756105, "bid": 1.0,
        "daily_budget": 1e9, "targeting": {"placements": [PLACEMENT]}, "text": text,
    }  # fmt: skip


def _publish_and_watch(
    s: Settings, worker: Any, cfg: AdTextBench, n: int, tag: str
) -> tuple[list[float], int, float]:
    """(publish -> servable seconds of each servable ad, ads missed, achieved ads/s)."""
    from kafka import KafkaProducer  # noqa: PLC0415

    from adpulse.core.kafkaconf import client_kwargs  # noqa: PLC0415

    copy = texts(n, tag)
    sent: dict[str, float] = {}
    lock = threading.Lock()
    done = threading.Event()
    producer = KafkaProducer(**client_kwargs(s), linger_ms=0, acks=1)
    span: list[float] = []

    def produce() -> None:
        start = time.monotonic()
        for k in range(n):
            time.sleep(max(0.0, start + k / cfg.rate - time.monotonic()))  # bench-ok: pacing
            ad = _ad(f"ad-{k}", copy[k])
            with lock:
                sent[ad["ad_id"]] = time.monotonic()
            producer.send(s.topic("ad-catalog"), key=ad["ad_id"].encode(),
                          value=json.dumps(ad).encode())  # fmt: skip
        producer.flush()
        span.append(time.monotonic() - start)
        done.set()

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    servable: dict[str, float] = {}
    seen = worker.metric("adpulse_catalog_ads")
    shed: set[str] = set()  # asked while the worker shed: asked again at the next poll
    deadline = None
    while len(servable) < n:
        if done.is_set() and deadline is None:
            deadline = time.monotonic() + cfg.timeout_s
        if deadline is not None and time.monotonic() > deadline:
            break
        time.sleep(cfg.poll_s)  # bench-ok: the polling period
        now_count, at = worker.metric("adpulse_catalog_ads"), time.monotonic()
        if now_count != seen:
            seen = now_count
            with lock:
                pending = [a for a in sent if a not in servable]
        else:
            pending = sorted(shed)
        for ad_id in pending:
            verdict = _chooses(worker, ad_id)
            if verdict is None:
                shed.add(ad_id)
                continue
            shed.discard(ad_id)
            if verdict:
                servable[ad_id] = at
    thread.join()
    producer.close()
    latencies = [servable[a] - sent[a] for a in servable]
    return latencies, n - len(servable), n / span[0] if span and span[0] > 0 else float("nan")


def _chooses(worker: Any, ad_id: str) -> bool | None:
    """Whether ``/decide`` with the ad alone chooses it; None: the worker shed every try or
    answered past the request's budget (a loaded box), so the answer is unknown and the ad
    is asked again at the next poll, not counted missed."""
    rid = uuid.uuid4().hex[:12]
    body = {"request_id": rid, "user_id": f"u-{rid}", "placement": PLACEMENT,
            "ts": int(time.time() * 1000), "candidates": [ad_id]}  # fmt: skip
    for _ in range(10):
        status, got, _ = worker.post("/decide", json.dumps(body).encode())
        if status == 200 and got.get("no_fill_reason") == "deadline":
            return None  # waited past its budget in a busy worker: not an answer either
        if status != 503:
            return bool(status == 200 and got.get("ad_id") == ad_id)
        time.sleep(0.02)  # bench-ok: shed, retry
    return None


def result_line(r: dict[str, Any]) -> str:
    return (
        f"adtext: {r['ads']} new ads with text at {r['achieved_per_s']:.0f}/s: publish -> "
        f"servable p50 {r['servable_p50_s']:.3f} s, p99 {r['servable_p99_s']:.3f} s "
        f"(target <= {r['target_p99_s']:g} s), {r['missed']} missed; bare encoder "
        f"{r['texts_per_s_batch1']:.0f} texts/s one by one, {r['texts_per_s_batch64']:.0f} "
        f"in batches of 64 ({r['threads']} thread(s)); {machine_line(r['machine'])}"
    )
