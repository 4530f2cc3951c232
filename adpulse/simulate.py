"""``adpulse simulate``: the feedback loop closed through the real pipeline, against a known truth.

One embedded broker (or ``--bootstrap``), one real worker subprocess with a
4-arm experiment (greedy = the control, random, thompson, linucb; 25% of users
each, by the worker's own HMAC assignment), the world's catalog, and this
process playing the users (:mod:`scoring.simulation`):

1. each simulated user emits browse/cart/fav/purchase events drawn from their
   latent interest into ``user-events`` (so their interest vectors form, and
   follow the drift), then an ad request into ``ad-requests``;
2. for every decision read back from ``ad-decisions`` the true CTR of the
   chosen ad (and of the best ad the user was eligible for: the oracle) is
   computed, and a click drawn from it; a click goes back to ``user-events``
   (``kind=click`` with decision_id and ad_id) a moment later, stamped inside
   the attribution window, and sometimes a purchase of the ad's item after it;
3. the worker joins decisions and clicks into ``ctr-feedback`` and learns from
   it; this process reads ``ctr-feedback`` too and counts the labels per
   decision: what the engine learned from is what the results are computed on.

Requests are offered at ``rate`` per second with at most ``max_inflight``
without a decision, so a slower machine runs slower, not differently. Event
timestamps are real wall-clock milliseconds; time in the world is compressed by
settings passed to the worker (a short attribution window, a short interest
half-life). Ctrl-C stops the run, the worker and the broker and still writes
what was collected.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adpulse import simresults
from adpulse.core.errors import BrokerUnavailable
from adpulse.core.settings import Settings
from adpulse.workerproc import WorkerProcess
from scoring.simulation import World

# (arm, policy); the first is the control. Bandit arguments come from SimConfig.
SHED_RETRIES = 3
ARMS = (("greedy", "greedy"), ("random", "random"), ("thompson", "thompson"), ("linucb", "linucb"))
DAY_MS = 86_400_000


@dataclass(frozen=True)
class SimConfig:
    decisions: int = 100_000
    drift_at: float = 0.5  # share of requests after which user interests rotate
    seed: int = 7
    users: int = 2000
    rate: float = 300.0  # requests offered per second, at most
    max_inflight: int = 400  # requests without a decision yet, at most
    window_s: float = 4.0  # attribution window (wall clock)
    half_life_s: float = 120.0  # interest half-life: the world's time runs fast
    events_per_request: float = 2.0  # mean user events before each request (Poisson)
    warm_events: int = 8  # events per user before the first request
    click_delay_s: tuple[float, float] = (0.2, 1.5)  # decision -> click, uniform
    thompson_draws: int = 200  # Monte Carlo draws per Thompson propensity (speed)
    thompson_prior: float = 100.0  # thompson:M, impressions the model's pCTR is worth
    thompson_min_segment_shows: float = 10.0
    linucb_alpha: float = 0.05  # linucb:ALPHA, for rewards of a few percent (1 suits 0..1 scale)
    bins: int = 20
    label_wait_s: float = 60.0  # after the last decision, for the last labels
    sample: Path = Path("../shared/data/taobao_userbehavior_sample.csv")  # the world's fit
    decide_url: str | None = None  # a worker's base URL: requests go to POST /decide there
    decide_token: str = ""  # the bearer token that worker requires (ADPULSE_API_TOKEN_FILE)
    # --trainer (adpulse/simtrainer.py): online training beside the worker, and recovery
    trainer: bool = False
    promotion: str = "direct"  # direct | promoter
    start_rows: int = 20_000  # synthetic labels the start version is trained on
    recover_reference: int = 3  # windows before the drift whose pooled AUC is the level
    recover_tolerance: float = 0.02  # AUC below the level still counted as recovered
    recover_hold: int = 2  # windows in a row at the level

    def arms(self) -> list[tuple[str, str]]:
        """(arm, policy spec), the control first."""
        args = {"thompson": f":{self.thompson_prior:g}", "linucb": f":{self.linucb_alpha:g}"}
        return [(a, p + args.get(p, "")) for a, p in ARMS]

    def worker_env(self, experiment_key: str) -> dict[str, str]:
        arms = ",".join(f"{a}={p}@{1 / len(ARMS):g}" for a, p in self.arms())
        return {
            "ADPULSE_EXPERIMENT": f"sim:{experiment_key}:{arms}",
            "ADPULSE_ATTRIBUTION_WINDOW_S": f"{self.window_s:g}",
            "ADPULSE_WATERMARK_IDLE_S": "1",
            "ADPULSE_CONVERSION_WINDOW_S": f"{4 * self.window_s:g}",
            "ADPULSE_FEEDBACK_GRACE_S": f"{4 * self.window_s:g}",
            "ADPULSE_HALF_LIFE_H": f"{self.half_life_s / 3600:g}",
            "ADPULSE_THOMPSON_DRAWS": str(self.thompson_draws),
            "ADPULSE_THOMPSON_MIN_SEGMENT_SHOWS": f"{self.thompson_min_segment_shows:g}",
            # Validation's latency gates are for production hardware; a busy 2-core
            # machine must not refuse the model (the greedy arm would be the prior).
            "ADPULSE_MODEL_LATENCY_BUDGET_MS": "200",
            "ADPULSE_MODEL_MAX_SLOWDOWN": "100",
            **(self.promoter_env() if self.trainer and self.promotion == "promoter" else {}),
        }

    def promoter_env(self) -> dict[str, str]:
        """The canary share the workers must share with the promoter (the simulation's scale)."""
        from adpulse.simtrainer import PROMOTER_ENV  # noqa: PLC0415

        key = "ADPULSE_CANARY_SHARE"
        return {key: os.environ.get(key, PROMOTER_ENV[key])}


@dataclass
class Run:
    """Everything collected; :mod:`adpulse.simresults` turns it into the results."""

    n_requests: int
    drift_index: int
    sent: int = 0  # requests sent
    requests: dict[str, tuple[int, int, str]] = field(default_factory=dict)  # id -> i, user, slot
    # One row per filled decision: request index, arm, policy, true CTR chosen, oracle CTR.
    index: list[int] = field(default_factory=list)
    arm: list[str] = field(default_factory=list)
    policy: list[str] = field(default_factory=list)
    p_chosen: list[float] = field(default_factory=list)
    p_best: list[float] = field(default_factory=list)
    decision_ids: list[str] = field(default_factory=list)
    decided: int = 0  # decisions read, filled or not
    no_fill: int = 0
    clicks_sent: int = 0
    purchases_sent: int = 0
    events_sent: int = 0
    labels: dict[str, list[int]] = field(default_factory=dict)  # decision id -> clicked values
    conversions: dict[str, int] = field(default_factory=dict)
    clicked_ids: set[str] = field(default_factory=set)  # decisions we sent a click for
    feedback: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> its first label
    started: float = field(default_factory=time.monotonic)
    interrupted: bool = False


class Loop:
    """The simulated users: requests and events out, decisions and labels in."""

    def __init__(self, s: Settings, cfg: SimConfig, world: World, run: Run, log: Any) -> None:
        self.s, self.cfg, self.world, self.run, self.log = s, cfg, world, run, log
        self.rng = np.random.default_rng(cfg.seed + 1)  # traffic
        self.click_rng = np.random.default_rng(cfg.seed + 2)  # clicks and purchases
        activity = self.rng.lognormal(0.0, 0.82, world.n_users)  # Taobao: sd of log activity
        self.user_p = activity / activity.sum()
        self.shown = np.zeros((world.n_users, world.n_ads), dtype=np.int32)  # ever: fatigue
        self.today = np.zeros((world.n_users, world.n_ads), dtype=np.int32)  # the cap's count
        self.day = -1
        self.cap = s.freq_cap_per_day
        self.due: list[tuple[float, int, bytes, bytes]] = []  # (wall s, seq, key, value)
        self.seq = 0
        self.tag = secrets.token_hex(3)
        self.stop: threading.Event | None = None  # set: offer no more requests, wind down
        self.session: Any = None  # aiohttp ClientSession, when requests go to POST /decide
        self.posts: set[asyncio.Task[None]] = set()
        self.shed = 0  # 503 answers (each retried, up to SHED_RETRIES times)

    # -- out ----------------------------------------------------------------------------
    def event(self, user: int, kind: str, item: int, cat: int, ts: int, **extra: Any) -> bytes:
        self.seq += 1
        body = {
            "event_id": f"sim-{self.tag}-{self.seq}",
            "user_id": f"u{user}",
            "kind": kind,
            "item_id": item,
            "category_id": cat,
            "ts": ts,
            **extra,
        }
        return json.dumps(body, separators=(",", ":")).encode()

    async def warm(self, producer: Any) -> int:
        now = int(time.time() * 1000)
        n = 0
        for u in range(self.world.n_users):
            for kind, item, cat in self.world.events(u, self.cfg.warm_events, False, self.rng):
                await producer.send(
                    self.s.topic("user-events"),
                    self.event(u, kind, item, cat, now),
                    key=f"u{u}".encode(),
                )
                n += 1
        await producer.flush()
        self.run.events_sent += n
        return n

    async def offer(self, producer: Any) -> None:
        """Requests at ``rate``/s, each after the user's events; clicks as they fall due."""
        cfg, run, w = self.cfg, self.run, self.world
        users = self.rng.choice(w.n_users, run.n_requests, p=self.user_p)
        start = time.monotonic()
        events_topic, requests_topic = self.s.topic("user-events"), self.s.topic("ad-requests")
        for i in range(run.n_requests):
            if self.stop is not None and self.stop.is_set():
                run.n_requests = run.sent  # what was offered is the run
                return
            while run.sent - run.decided >= cfg.max_inflight:
                await self.flush_due(producer)
                await asyncio.sleep(0.005)
            delay = start + i / cfg.rate - time.monotonic()
            if delay > 0.002:
                await asyncio.sleep(delay)
            await self.flush_due(producer)
            u, drifted = int(users[i]), i >= run.drift_index
            now = int(time.time() * 1000)
            key = f"u{u}".encode()
            for kind, item, cat in w.events(
                u, int(self.rng.poisson(cfg.events_per_request)), drifted, self.rng
            ):
                await producer.send(events_topic, self.event(u, kind, item, cat, now), key=key)
                run.events_sent += 1
            rid = f"sim-{self.tag}-{i}"
            slot = w.placement(self.rng)
            run.requests[rid] = (i, u, slot)
            req = {
                "request_id": rid,
                "user_id": f"u{u}",
                "placement": slot,
                "ts": now,
                "context": {"device": "mobile"},
            }
            if self.session is None:
                await producer.send(requests_topic, json.dumps(req).encode(), key=key)
            else:  # the app asks a worker synchronously, as an ad server would
                task = asyncio.create_task(self.post(json.dumps(req).encode(), rid))
                self.posts.add(task)
                task.add_done_callback(self.posts.discard)
            run.sent += 1

    async def post(self, body: bytes, rid: str) -> None:
        """One POST /decide; a shed request (503) is retried after a pause, then given up
        as a no fill (the simulation counts every request it offered)."""
        url = f"{self.cfg.decide_url}/decide"
        for _ in range(SHED_RETRIES + 1):
            async with self.session.post(url, data=body) as resp:
                if resp.status == 200:
                    self.on_decision(await resp.json())
                    return
                self.shed += resp.status == 503
                if resp.status != 503:
                    text = (await resp.text())[:200]
                    self.log(f"POST /decide answered {resp.status}: {text}")
                    break
            await asyncio.sleep(0.05)
        self.on_decision({"request_id": rid, "ad_id": None})

    async def flush_due(self, producer: Any) -> None:
        now = time.time()
        topic = self.s.topic("user-events")
        while self.due and self.due[0][0] <= now:
            _, _, key, value = heapq.heappop(self.due)
            await producer.send(topic, value, key=key)

    def schedule(self, at_ms: int, user: int, value: bytes) -> None:
        heapq.heappush(self.due, (at_ms / 1000, self.seq, f"u{user}".encode(), value))

    # -- in -----------------------------------------------------------------------------
    def on_decision(self, d: dict[str, Any]) -> None:
        run, w = self.run, self.world
        run.decided += 1
        got = run.requests.pop(d["request_id"], None)
        if got is None:
            return  # not ours (a topic shared with an earlier run)
        if d.get("ad_id") is None:
            run.no_fill += 1
            return
        i, u, slot = got
        drifted = i >= run.drift_index
        day = d["ts"] // DAY_MS
        if day != self.day:  # the worker's caps are per UTC day
            self.today[:] = 0
            self.day = day
        ad = int(d["ad_id"].rsplit("-", 1)[1])
        p = w.ctr(u, np.arange(w.n_ads), slot, self.shown[u], drifted)
        eligible = self.today[u] < self.cap
        best = float(p[eligible].max()) if eligible.any() else float(p[ad])
        self.shown[u, ad] += 1
        self.today[u, ad] += 1
        run.index.append(i)
        run.arm.append(d.get("arm", "(none)"))
        run.policy.append(d.get("policy", ""))
        run.p_chosen.append(float(p[ad]))
        run.p_best.append(max(best, float(p[ad])))
        run.decision_ids.append(d["request_id"])
        if self.click_rng.random() >= p[ad]:
            return
        lo, hi = self.cfg.click_delay_s
        click_ts = d["ts"] + int(1000 * self.click_rng.uniform(lo, hi))
        item, cat = int(w.ad_item[ad]), int(w.category_ids[w.ad_cat[ad]])
        self.schedule(
            click_ts,
            u,
            self.event(
                u, "click", item, cat, click_ts, ad_id=d["ad_id"], decision_id=d["request_id"]
            ),
        )
        run.clicks_sent += 1
        run.clicked_ids.add(d["request_id"])
        if self.click_rng.random() < w.cvr(u, ad, drifted):
            buy_ts = click_ts + int(1000 * self.click_rng.uniform(0.2, 2.0))
            self.schedule(buy_ts, u, self.event(u, "purchase", item, cat, buy_ts))
            run.purchases_sent += 1

    def on_label(self, rec: dict[str, Any]) -> None:
        did = rec.get("decision_id", "")
        if rec.get("converted") == 1:
            self.run.conversions[did] = self.run.conversions.get(did, 0) + 1
        else:
            self.run.labels.setdefault(did, []).append(int(rec.get("clicked", 0)))
            self.run.feedback.setdefault(did, rec)  # its features: the online AUC's input


async def drive(
    s: Settings, loop: Loop, on_progress: Callable[[], None], applied: Callable[[], float]
) -> None:
    """Warm-up events, then requests; decisions and labels read meanwhile; then the last labels."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: PLC0415

    from adpulse.core.kafkaconf import client_kwargs  # noqa: PLC0415

    kw = client_kwargs(s)
    producer = AIOKafkaProducer(**kw, linger_ms=5, acks=1)
    consumers = []
    for _ in ("ad-decisions", "ctr-feedback"):
        c = AIOKafkaConsumer(
            **kw, enable_auto_commit=False, fetch_max_wait_ms=10, auto_offset_reset="earliest"
        )
        consumers.append(c)
    await producer.start()
    tasks: list[asyncio.Task[None]] = []
    try:
        for c, name in zip(consumers, ("ad-decisions", "ctr-feedback"), strict=True):
            await c.start()
            c.assign([TopicPartition(s.topic(name), p) for p in range(s.partitions)])
        run = loop.run

        async def consume(c: Any, handle: Callable[[dict[str, Any]], None]) -> None:
            while True:
                batch = await c.getmany(timeout_ms=100, max_records=5000)
                for records in batch.values():
                    for r in records:
                        handle(json.loads(r.value))

        tasks = [asyncio.create_task(consume(consumers[1], loop.on_label))]
        if loop.cfg.decide_url is None:  # else decisions are the answers to POST /decide
            tasks.append(asyncio.create_task(consume(consumers[0], loop.on_decision)))
        else:
            import aiohttp  # noqa: PLC0415

            conn = aiohttp.TCPConnector(limit=64)
            loop.session = aiohttp.ClientSession(
                connector=conn, timeout=aiohttp.ClientTimeout(total=10),
                headers={"Authorization": f"Bearer {loop.cfg.decide_token}"},
            )  # fmt: skip

        async def progress() -> None:
            while True:
                await asyncio.sleep(5)
                on_progress()

        tasks.append(asyncio.create_task(progress()))
        n = await loop.warm(producer)
        loop.log(f"sent {n:,} warm-up events ({loop.cfg.warm_events} per user)")
        deadline = time.monotonic() + 120
        while await asyncio.to_thread(applied) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        loop.log(f"interest vectors formed; offering {run.n_requests:,} requests")
        await loop.offer(producer)
        while run.decided < run.n_requests or loop.due:  # the last clicks fall due
            for t in tasks:
                if t.done():
                    t.result()  # a consumer died: raise its error
            await loop.flush_due(producer)
            await asyncio.sleep(0.01)
        await producer.flush()
        deadline = time.monotonic() + loop.cfg.window_s + loop.cfg.label_wait_s
        wanted = set(run.decision_ids)
        while time.monotonic() < deadline and not wanted.issubset(run.labels):
            await asyncio.sleep(0.2)
        await asyncio.sleep(min(2.0, loop.cfg.window_s))  # a duplicate would show by now
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, *loop.posts, return_exceptions=True)
        if loop.session is not None:
            await loop.session.close()
        for c in consumers:
            await c.stop()
        await producer.stop()


@contextlib.contextmanager
def sim_worker(
    s: Settings, cfg: SimConfig, world: World, out: Path, log: Any = print
) -> Iterator[tuple[WorkerProcess, Callable[[str], float]]]:
    """A worker running the 4-arm experiment with the world's catalog loaded; and a scraper.

    ``s`` names the broker, topics (created here), app id and data dir.
    """
    from adpulse.catalogtool import publish  # noqa: PLC0415
    from streams.runtime.topicadmin import create_topics  # noqa: PLC0415

    create_topics(s)
    ads = world.catalog()
    worker = WorkerProcess(
        s, out, name="simulate-worker", extra_env=cfg.worker_env(secrets.token_hex(8))
    )
    log(f"starting a worker (log: {worker.log_path}) ...")
    try:
        worker.start(timeout=120)

        def scrape(name: str) -> float:
            return worker.metric(name)

        # Published once the worker runs (as the demo does); sent again if part of it
        # did not arrive (the topic is compacted by ad id: a repeat changes nothing).
        for attempt in range(3):
            publish(s, s.topic("ad-catalog"), ads)
            with contextlib.suppress(AssertionError):
                worker.wait_until(lambda: scrape("adpulse_catalog_ads") >= len(ads), 20, "")
                break
            if attempt == 2:
                msg = f"the worker never loaded the {len(ads)} ads; see {worker.log_path}"
                raise BrokerUnavailable(msg)
        log(
            f"worker ready; {len(ads)} ads in {world.params.categories} categories; "
            f"{world.n_users:,} users; experiment arms {', '.join(a for a, _ in ARMS)}"
        )
        yield worker, scrape
    finally:
        worker.stop()


def run_loop(
    s: Settings,
    cfg: SimConfig,
    world: World,
    run: Run,
    worker: WorkerProcess,
    scrape: Callable[[str], float],
    log: Any = print,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Play the users against a running worker until the run ends (or ``stop`` is set)."""
    loop = Loop(s, cfg, world, run, log)
    loop.stop = stop
    try:
        asyncio.run(
            drive(
                s,
                loop,
                lambda: log(simresults.progress_line(run)),
                lambda: scrape("adpulse_events_total"),
            )
        )
    except KeyboardInterrupt:
        run.interrupted = True
        log("interrupted: stopping the worker and writing what was collected")
    alive = worker.proc is not None and worker.proc.poll() is None
    extra: dict[str, Any] = {"topic_prefix": s.topic_prefix}
    if alive:
        extra["late_clicks"] = scrape("adpulse_late_clicks_total")
    return extra


def simulate(settings: Settings, cfg: SimConfig, out: Path, log: Any = print) -> dict[str, Any]:
    """Run the closed loop; returns the summary (also written with the plot under ``out``)."""
    from adpulse import simtrainer  # noqa: PLC0415
    from adpulse.broker import broker_for  # noqa: PLC0415

    world = simresults.load_world(cfg.seed, cfg.sample, cfg.users)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(cfg.decisions, int(cfg.drift_at * cfg.decisions))
    tag = secrets.token_hex(4)
    training: simtrainer.Training | None = None
    start: Path | None = None
    with broker_for(settings, log) as b, tempfile.TemporaryDirectory(prefix="adpulse-sim-") as tmp:
        s = b.with_(
            topic_prefix=f"{settings.topic_prefix}sim-{tag}.",
            app_id=f"adpulse-sim-{tag}",
            data_dir=Path(tmp) / "data",
        )
        if cfg.trainer:
            root = Path(tmp) / "models"
            log(f"training the start version into {root} (synthetic labels) ...")
            start = simtrainer.seed_registry(s, root, cfg.start_rows)
            s = s.with_(model_dir=str(root), model_poll_s=1.0)
        with sim_worker(s, cfg, world, out, log) as (worker, scrape), contextlib.ExitStack() as st:
            if cfg.trainer:
                training = st.enter_context(simtrainer.online_training(
                    worker.env(), Path(s.model_dir), Path(tmp), out,
                    "promoter" if cfg.promotion == "promoter" else "direct", log,
                ))  # fmt: skip
            extra = run_loop(s, cfg, world, run, worker, scrape, log)
            if training is not None and not run.interrupted:
                log(f"waiting for the trainer to learn the run's {len(run.feedback)} labels ...")
                training.catch_up(len(run.feedback))
        summary = simresults.summarise(run, cfg, world, extra)
        summary["online_auc"] = simtrainer.online_auc(
            run, cfg, s, start, training.result if training is not None else None, out)
    simresults.write(summary, run, cfg, out, log)
    return summary
