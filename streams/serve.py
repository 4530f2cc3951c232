"""``POST /decide``: a synchronous decision from the worker that owns the user's partition.

The body follows the ad-requests contract and the answer the ad-decisions one:
the decision is made by the same :meth:`DecideStage.decide` call as a request
from the ad-requests topic (streams/pipeline.py ``decide_requests``), and sent to
ad-decisions like it, so the click join, the learners and every downstream
consumer see it.

- **Owner.** The user's raw id picks the partition (as it does on the topics);
  a worker that does not own it forwards the request once, over HTTP, to the
  one that does (Faust's partition assignment says which), with the time the
  budget started. A forwarded request that lands on a non-owner again (a
  rebalance in between) gets a 503.
- **Micro-batching.** Requests that arrive while the event loop is busy, or while
  the previous run is being decided (its model runs on a thread, streams/lane.py),
  are decided together in one call (one scoring run, split at
  ``ADPULSE_SCORER_MAX_BATCH_ROWS``); one run at a time; ``ADPULSE_SCORER_MAX_WAIT_MS``
  can hold a request back to wait for more.
- **Deadlines.** A request's budget is its ``tmax_ms``, else
  ``ADPULSE_DECIDE_TMAX_MS``, from its arrival: one used up before scoring gets
  a ``deadline`` no fill at once.
- **Overload.** While requests wait longer than ``ADPULSE_DECIDE_MAX_QUEUE_MS``
  (the event loop runs late by that much, or the oldest queued request is that
  old), a new request is shed at once: 503 with ``Retry-After``. Both are
  measured, not estimated, so the queue cannot grow into seconds.
- **Logging.** The response does not wait for the broker's acknowledgement of
  the decision's ad-decisions record (that would add a produce round trip to
  every answer). A crash between the answer and the acknowledgement loses those
  records: the caller has its decision, but the join never labels it. A record
  the broker refuses is counted (``adpulse_decision_log_failures_total``) and
  alerted on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import aiohttp.web
import msgspec
from aiokafka.partitioner import murmur2
from yarl import URL

from adpulse.core.privacy import API_TOKEN_HELP, bearer_ok, load_api_token
from adpulse.core.settings import Settings
from schemas.messages import AdDecision, AdRequest
from streams import decideport
from streams.deadletter import Raw, Rejected
from streams.decide import request_decoder
from streams.runtime.tablewriter import aiokafka_producer

if TYPE_CHECKING:
    from streams.wiring import Wiring

log = logging.getLogger(__name__)

FORWARDED = "X-Adpulse-Forwarded"  # set on a request one worker forwards to another
STARTED = "X-Adpulse-Start-Ms"  # when the forwarded request's budget started (epoch ms)
_TICK_S = 0.002  # how often the event loop's lateness is sampled
# The sampling stops once no request has been checked for this long, and the next request
# starts it again: 500 timers a second cost an idle worker about 5% of a core
# (docs/decide.md), and a lateness nobody asks about sheds nothing.
_TICK_IDLE_S = 1.0
# A worker asked for a decision within this long keeps ingest's slices short, so the next
# request waits for one short slice; one asked none for a minute hands over longer slices.
ASKED_WINDOW_S = 60.0

# Decide the given requests (each budget started at its raw's timestamp) at once, state
# written; returns each one's decision, in order, and what sends them to ad-decisions
# (its result: the broker's acknowledgements to come, one per decision); or an awaitable
# of that, for a decide whose model runs on a thread while the event loop goes on.
Log = Callable[[], Awaitable[list[Awaitable[Any]]]]
Decided = tuple[list[AdDecision], Log]
Decide = Callable[[Sequence[tuple[AdRequest, Raw]]], Decided | Awaitable[Decided]]


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def error(cls, status: int, message: str, retry_after_s: int = 0) -> Reply:
        headers = {"Retry-After": str(retry_after_s)} if retry_after_s else {}
        return cls(status, msgspec.json.encode({"error": message}), headers)


@dataclass
class _Call:
    req: AdRequest
    raw: Raw
    rows: int
    queued_at: float  # DecideService.clock time
    done: asyncio.Future[AdDecision]


class DecideService:
    """The queue in front of :data:`Decide`: micro-batches, deadlines, shedding.

    Framework-free, so its rules are unit-tested without a worker; ``wire``
    puts it behind the Faust web server. ``clock`` (seconds, monotonic) times the
    queue and the event loop's lateness, so a test can move time itself instead of
    sleeping and depending on how busy the machine is.
    """

    def __init__(
        self,
        settings: Settings,
        decide: Decide,
        catalog_rows: Callable[[], int],
        on_log_failure: Callable[[BaseException], None],
        on_lag: Callable[[float], None] = lambda _s: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.decoder = request_decoder(settings.max_event_bytes)
        self.decide = decide
        self.catalog_rows = catalog_rows
        self.on_log_failure = on_log_failure
        self.on_lag = on_lag
        self.max_wait_s = settings.scorer_max_wait_ms / 1000
        self.max_rows = settings.scorer_max_batch_rows
        self.max_queue_s = settings.decide_max_queue_ms / 1000
        self.queue: list[_Call] = []
        self.queued_rows = 0
        self.lag_s = 0.0  # how late the event loop ran the last tick
        self._due: float | None = None  # when the next tick is due (loop time); None: not running
        self._checked = -math.inf  # when overloaded() was last asked (clock time)
        self._flush: asyncio.Handle | asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._deciding = False  # a run is being decided: the next one waits for it
        self._next_due = False  # the queue was due meanwhile: it goes when that run is done
        self._asked = -math.inf  # when the last request came (clock time), answered or not

    def asked(self) -> None:
        """A request came in (any outcome)."""
        self._asked = self.clock()

    def asked_within(self, seconds: float) -> bool:
        """Whether a request came in the last ``seconds``: while one did, ingest keeps its
        slices short (streams/runtime/consumer.py, ``Slicer``)."""
        return self.clock() - self._asked < seconds

    def parse(self, body: bytes) -> AdRequest | Reply:
        out = self.decoder.decode(Raw(body, None, -1, -1))
        if isinstance(out, Rejected):
            return Reply.error(400, f"ad-requests contract: {out.message}")
        return out

    @property
    def sampling(self) -> bool:
        """Whether the event loop's lateness is being sampled (a tick is scheduled)."""
        return self._due is not None

    def overloaded(self) -> bool:
        """Whether requests now wait longer than the queue limit, measured two ways: the
        event loop running late (requests wait unseen in sockets and handlers while it
        is busy) and the oldest queued request's age."""
        loop = asyncio.get_running_loop()
        now = self._checked = self.clock()
        if self._due is None:
            self._due = now + _TICK_S
            loop.call_later(_TICK_S, self._tick)
        late = max(self.lag_s, now - self._due)
        head = now - self.queue[0].queued_at if self.queue else 0.0
        return max(late, head) > self.max_queue_s

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = self.clock()
        self.lag_s = max(0.0, now - (self._due or now))
        self.on_lag(self.lag_s)
        if now - self._checked > _TICK_IDLE_S:  # no request for a while: stop sampling
            self._due, self.lag_s = None, 0.0
            return
        self._due = now + _TICK_S
        loop.call_later(_TICK_S, self._tick)

    async def submit(self, req: AdRequest, partition: int, start_ms: int) -> AdDecision:
        """Queue one request for the next scoring run; its decision when made."""
        loop = asyncio.get_running_loop()
        rows = len(req.candidates) if req.candidates is not msgspec.UNSET else self.catalog_rows()
        raw = Raw(None, req.user_id.encode(), partition, -1, start_ms)
        call = _Call(req, raw, max(1, rows), self.clock(), loop.create_future())
        self.queue.append(call)
        self.queued_rows += call.rows
        if self.queued_rows >= self.max_rows:  # full: this run goes now, a new one starts
            self._start(loop)
        elif self._flush is None:
            go = lambda: self._start(loop)  # noqa: E731
            wait = self.max_wait_s
            self._flush = loop.call_later(wait, go) if wait > 0 else loop.call_soon(go)
        return await call.done

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._deciding:  # one run at a time: what queues meanwhile is the next run
            self._next_due = True
            return
        calls = self._take()
        if not calls:
            return
        self._deciding = True
        task = loop.create_task(self._run(calls))
        self._running.add(task)  # held until done: the loop keeps only a weak reference
        task.add_done_callback(self._running.discard)

    def _take(self) -> list[_Call]:
        if self._flush is not None:
            self._flush.cancel()
        calls, self.queue, self.queued_rows, self._flush = self.queue, [], 0, None
        return calls

    def _decided(self) -> None:
        self._deciding = False
        if self._next_due:
            self._next_due = False
            self._start(asyncio.get_running_loop())

    async def _run(self, calls: list[_Call]) -> None:
        try:
            got = self.decide([(c.req, c.raw) for c in calls])
            decisions, send = got if isinstance(got, tuple) else await got
        except Exception as exc:  # every waiting caller gets an answer, never a hang
            log.exception("decide failed for %d request(s)", len(calls))
            for c in calls:
                if not c.done.done():
                    c.done.set_exception(exc)
            return
        finally:  # state written (or nothing done): the next run may read it
            self._decided()
        for c, decision in zip(calls, decisions, strict=True):
            if not c.done.done():  # a caller that went away leaves its future cancelled
                c.done.set_result(decision)
        try:  # answered first: the log does not delay the callers
            sends = await send()
        except Exception as exc:  # not even handed to the producer
            for _ in decisions:
                self.on_log_failure(exc)
            return
        for sent in sends:  # the producer's futures: the broker's acknowledgement
            asyncio.ensure_future(sent).add_done_callback(self._logged)

    def _logged(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            self.on_log_failure(asyncio.CancelledError())
        elif fut.exception() is not None:
            self.on_log_failure(fut.exception())  # type: ignore[arg-type]


class IngestGuard:
    """Sheds ``POST /decide`` requests while ingest falls behind and decisions hold the loop.

    One event loop answers requests and writes events. Shedding by the requests' own
    wait (:meth:`DecideService.overloaded`) bounds their p99, but nothing bounded
    ingest's: offered more than the worker could carry, decisions took the loop and
    the state they read fell seconds behind (``bench serve`` with 5,000 events/s:
    freshness p99 6.0 s; docs/decide.md, "Decisions give way to ingest"). An event
    cannot be shed (each one is state), so decisions give way.

    Two measures: ingest's lag (``saw``: how old the events of each slice are as it is
    written; not told again within :data:`STALE_S`, it is over: no events, nothing
    behind) and the decisions' load (``busy``: the seconds their steps held the loop,
    streams/lane.py; :attr:`load` is that per second, averaged over about
    :data:`WINDOW_S`). While the lag exceeds ``ADPULSE_DECIDE_MAX_INGEST_LAG_MS`` the
    load decisions may have, :attr:`cap`, halves every :data:`HALVING_S` down to
    :data:`FLOOR`; once it does not, it climbs back to all of the loop within
    :data:`RECOVER_S`. A request is shed while the load is over the cap. So a few
    requests a second are never shed for a lag they did not cause, and a worker
    catching up on a backlog still gives decisions a tenth of its loop. Ingest's slices
    lengthen as the cap falls (streams/runtime/consumer.py, ``Slicer``): short slices
    are for the requests the cap now sheds.
    """

    FLOOR = 0.1
    HALVING_S = 0.1
    RECOVER_S = 1.0
    STALE_S = 1.0
    WINDOW_S = 0.2

    def __init__(self, limit_ms: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_s = limit_ms / 1000
        self.clock = clock
        self.cap = 1.0  # of the loop's time that decisions may hold
        self.load = 0.0  # of the loop's time they held lately
        self._busy_s = 0.0  # held since the last question
        self._lag_s = 0.0
        self._seen = -math.inf  # when ingest last said how far behind it is
        self._at: float | None = None  # the last question

    def saw(self, lag_s: float) -> None:
        """Ingest is writing events ``lag_s`` seconds old now."""
        self._lag_s, self._seen = lag_s, self.clock()

    def busy(self, seconds: float) -> None:
        """Decisions' steps held the event loop this long."""
        self._busy_s += seconds

    def behind(self) -> bool:
        fresh = self.clock() - self._seen < self.STALE_S
        return self.limit_s > 0 and fresh and self._lag_s > self.limit_s

    def admit(self) -> bool:
        """Whether this request may go on (False: shed it)."""
        if self.limit_s <= 0:
            return True
        now = self.clock()
        dt = 0.0 if self._at is None else now - self._at
        self._at = now
        self.load = self.load * math.exp(-dt / self.WINDOW_S) + self._busy_s / self.WINDOW_S
        self._busy_s = 0.0
        if self.behind():
            self.cap = max(self.FLOOR, self.cap * 0.5 ** (dt / self.HALVING_S))
        else:
            self.cap = min(1.0, self.cap + dt / self.RECOVER_S)
        return self.load <= self.cap


class Relearn:
    """Learns the partition map again when a request finds none, one try at a time and
    at most one per ``every_s``.

    A worker learns the topics' partition counts once at start
    (``learn_partition_counts``); on a loaded box some starts ended with no partitions
    of ad-requests in the producer's metadata, and such a worker answered every request
    503 "no worker owns this user yet" for its whole life (docs/decide.md). Retrying the
    lookup heals it; a request that finds no map is still answered 503 at once.
    """

    def __init__(
        self,
        learn: Callable[[], Awaitable[None]],
        every_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.learn, self.every_s, self.clock = learn, every_s, clock
        self.tries = 0
        self._task: asyncio.Task[None] | None = None
        self._last = -math.inf

    def kick(self) -> asyncio.Task[None] | None:
        """The try started now, or None (one is running, or one started within
        ``every_s``)."""
        busy = self._task is not None and not self._task.done()
        if busy or self.clock() - self._last < self.every_s:
            return None
        self._last = self.clock()
        self.tries += 1
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self._task

    async def _run(self) -> None:
        try:
            await self.learn()
        except Exception as exc:  # the next request that finds no map tries again
            log.warning("learning the partition map again failed: %r", exc)


def wire(
    w: Wiring, decide: Decide, catalog_rows: Callable[[], int], guard: IngestGuard
) -> DecideService:
    """``POST /decide`` on the worker's web server, in front of ``decide``; ``guard``:
    what ingest's lag admits (ingest tells it, streams/pipeline.py)."""
    app, m = w.app, w.metrics
    requests_topic = w.settings.topic("ad-requests")

    def log_failure(exc: BaseException) -> None:
        m.decision_log_failures.inc()
        log.error("a decision answered over HTTP was not logged to ad-decisions: %r", exc)

    service = DecideService(w.settings, decide, catalog_rows, log_failure, m.loop_lag.observe)
    token = load_api_token(w.settings)
    own = _ident(URL(app.conf.canonical_url))

    def owner(user_id: str) -> URL | None:
        """None when this worker owns the user's partition, else the owner's URL.

        The raw id picks the partition of ad-requests, as on the topics (Kafka's
        murmur2 of the key); Faust's assignment says which worker holds it. Routed by
        the source topic, not by the interest table's changelog: the changelog's
        owners are only known once the changelog existed at assignment, and a
        worker whose first assignment came before it answered 503 for some users
        for its whole life (tests/faults/test_fuzz_decide.py found it; the two
        worker tests hit it too). KeyError: none known yet.
        """
        try:
            url = app.router.external_topic_key_store(w.ad_requests, user_id.encode())
        except TypeError:  # the producer has no partition count for the topic yet
            raise KeyError(user_id) from None
        return None if _ident(url) == own else url

    async def learn_partitions() -> None:
        producer = aiokafka_producer(app)
        for topic in (w.interest.changelog_topic.get_topic_name(), requests_topic):
            await producer.partitions_for(topic)

    relearn = Relearn(learn_partitions)

    @app.task
    async def learn_partition_counts() -> None:
        """Both topics that pick a request's partition (the interest changelog, where
        Faust's router looks up the owner, and ad-requests) become known to the
        producer. A worker only learns a topic's partition count when it first
        sends to it, so a fresh worker, before its first user event, answered
        /decide with an error; until this completes it answers 503 (and a request
        that finds no map later makes it learn again: :class:`Relearn`)."""
        await learn_partitions()

    async def forward(url: URL, body: bytes, start_ms: int, auth: str) -> Reply:
        started = time.perf_counter()
        headers = {FORWARDED: "1", STARTED: str(start_ms), "Content-Type": "application/json",
                   "Authorization": auth}  # fmt: skip
        try:
            async with app.http_client.post(
                url.with_path("/decide"), data=body, headers=headers, timeout=_FORWARD_TIMEOUT
            ) as resp:
                keep = {k: v for k, v in resp.headers.items() if k == "Retry-After"}
                return Reply(resp.status, await resp.read(), keep)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Reply.error(503, f"the owner of this user, {url}, did not answer: {exc!r}", 1)
        finally:
            m.decide_forward_seconds.observe(time.perf_counter() - started)

    async def handle(
        body: bytes, start_ms: int, forwarded: bool, auth: str | None
    ) -> tuple[str, Reply]:
        if not bearer_ok(token, auth):
            reply = Reply.error(401, API_TOKEN_HELP)
            return "unauthorized", Reply(401, reply.body, dict(_CHALLENGE))
        if not app.tables.recovery.completed.is_set():  # type: ignore[attr-defined]
            return "unavailable", Reply.error(503, "recovering state: retry shortly", 1)
        if not w.catalog.ready:
            return "unavailable", Reply.error(503, "loading the ad catalog: retry shortly", 1)
        req = service.parse(body)
        if isinstance(req, Reply):
            return "invalid", req
        try:
            url = owner(req.user_id)
        except KeyError:
            relearn.kick()
            return "unavailable", Reply.error(503, "no worker owns this user yet: retry", 1)
        if url is not None:
            if forwarded:  # the assignment moved while it was on its way
                return "unavailable", Reply.error(503, "this user's partition is moving", 1)
            return "forwarded", await forward(url, body, start_ms, auth or "")
        if service.overloaded():
            return "shed", Reply.error(503, "overloaded: request shed", 1)
        admitted = guard.admit()
        m.decide_loop_cap.set(guard.cap)
        if not admitted:
            return "shed_ingest", Reply.error(503, "ingest is behind: request shed", 1)
        try:
            partition = app.producer.key_partition(requests_topic, req.user_id.encode()).partition
        except TypeError:  # see learn_partition_counts
            relearn.kick()
            return "unavailable", Reply.error(503, "learning the partition map: retry", 1)
        decision = await service.submit(req, partition, start_ms)
        m.decide_seconds.observe(max(0.0, time.time() - start_ms / 1000))
        return "answered", Reply(200, msgspec.json.encode(decision))

    async def answer(body: bytes, header: Callable[[str], str | None]) -> Reply:
        """Both ports' requests: ``header`` looks a header up by its lower-case name."""
        service.asked()
        now_ms = int(time.time() * 1000)
        forwarded = header(_FORWARDED) == "1"
        start_ms = _int(header(_STARTED), now_ms) if forwarded else now_ms
        outcome, reply = await handle(body, start_ms, forwarded, header("authorization"))
        m.decide_requests.labels(outcome).inc()
        return reply

    async def post(request: aiohttp.web.Request) -> aiohttp.web.Response:
        body = await request.read()
        reply = await answer(body, request.headers.get)
        return aiohttp.web.Response(
            body=reply.body, status=reply.status, headers=reply.headers,
            content_type="application/json",
        )  # fmt: skip

    async def owners(request: aiohttp.web.Request) -> aiohttp.web.Response:
        """Which worker owns each partition of ad-requests (:func:`owner_map`)."""
        count = len(await aiokafka_producer(app).partitions_for(requests_topic))
        body = owner_map(app.router.external_topics_metadata(), requests_topic, count)
        return aiohttp.web.Response(body=msgspec.json.encode(body), content_type="application/json")

    # Straight on Faust's aiohttp application, not through a Faust View: its dispatch
    # and web sensors cost more than the rest of the HTTP handling.
    app.web.web_app.router.add_post("/decide", post)  # type: ignore[attr-defined]
    app.web.web_app.router.add_get("/owners", owners)  # type: ignore[attr-defined]

    async def on_port(body: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        reply = await answer(body, headers.get)
        return reply.status, reply.body, reply.headers

    if w.settings.decide_port:

        @app.task
        async def decide_port() -> None:
            """The lean server of streams/decideport.py, the same answers on a port of its own."""
            s = w.settings
            try:
                server = await decideport.serve(on_port, s.web_host, s.decide_port)
            except OSError as exc:  # a port in use: say so in one line and stop the worker
                where = f"{s.web_host}:{s.decide_port}"
                msg = f"cannot serve POST /decide on {where} (ADPULSE_DECIDE_PORT): {exc}"
                log.error(msg)
                await app.crash(RuntimeError(msg))
                return
            log.info("POST /decide also served on %s:%d", s.web_host, server.port)
            app.decide_server = server  # type: ignore[attr-defined] # held for the app's life

    return service


_FORWARD_TIMEOUT = aiohttp.ClientTimeout(total=2.0)
_FORWARDED, _STARTED = FORWARDED.lower(), STARTED.lower()
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="adpulse"'}


def user_partition(user_id: str, partitions: int) -> int:
    """The partition of a user's records and requests: Kafka's default for a keyed record
    (the Java client's ``Utils.murmur2``), ``(murmur2(user_id as UTF-8) & 0x7fffffff) %
    partitions``; what a client routing by ``GET /owners`` computes."""
    return (int(murmur2(user_id.encode())) & 0x7FFFFFFF) % partitions


def owner_map(
    distribution: Mapping[str, Mapping[str, Sequence[int]]], topic: str, partitions: int
) -> dict[str, Any]:
    """``GET /owners``: the worker (its canonical URL) that owns each partition of ``topic``,
    from the group's assignment (``distribution``: URL -> topic -> partitions).

    A request sent to its user's owner (:func:`user_partition`) skips the forward: sent
    round robin to two workers on the 2-core box, answers cost 5.9 ms of worker CPU
    against 2.2 for one worker alone (docs/decide.md, "More workers on the same two
    cores"). A partition no worker holds (a rebalance under way) is left out and
    ``complete`` is false: send such users to any worker, which forwards them.
    """
    owned = {p: url for url, topics in distribution.items() for p in topics.get(topic, ())}
    ordered = {str(p): owned[p] for p in range(partitions) if p in owned}
    return {"topic": topic, "partitions": partitions, "partitioner": "murmur2",
            "owners": ordered, "complete": len(ordered) == partitions}  # fmt: skip


def _ident(url: URL) -> tuple[str, int]:
    return url.host or "", url.port or 80


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text else default
    except ValueError:
        return default
