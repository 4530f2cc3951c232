"""A Faust consumer that hands whole fetched batches of chosen topics to a handler.

Why: Faust's consumer delivers one message at a time (an Event, a task pair in
``wait_first``, a flow-control queue, sensors and an ack under a lock per
message). Measured on this project's 2-core machine against the embedded
broker, that path peaks at ~19k messages/s with no work at all and ~7k/s with a
table write per key, while a bare aiokafka loop reads 400k+/s. Our interest
stage works on whole batches anyway (decode, dedupe and decay in numpy), so for
the topics registered with :meth:`BatchApp.batch_topic` the fetch loop skips the
per-message machinery and calls ``await handler({tp: [records]})``.

Offsets stay Faust's business: after a batch is handled, ``last + 1`` per
partition is recorded as committable and Faust's own commit logic (interval,
``commit_every``, ``wait_empty`` on rebalance and stop) commits it. Records of
every other topic still take the normal per-message path, so agents and tables
work as usual. The Faust internals this relies on are listed, with why, in
streams/runtime/__init__.py, pinned by the faust-streaming version in pyproject.toml.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator, Mapping
from time import monotonic
from typing import Any, cast

import faust
from aiokafka.errors import IllegalStateError
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as _drv
from faust.types import TP

Batch = dict[TP, list[Any]]  # aiokafka ConsumerRecords per partition
# A handler may return an awaitable that completes when its effects are durable
# (its table and changelog writes acknowledged). The batch is acknowledged only
# then, while the consumer already moves on to the next batch.
BatchHandler = Callable[[Batch], Awaitable[Awaitable[Any] | None]]
MAX_UNSETTLED = 4  # batches whose writes may be in flight at once


class BatchConsumer(_drv.Consumer):
    """Faust's aiokafka consumer with a batch path for registered topics."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._batch_next: dict[TP, int] = {}  # next offset to commit, per partition
        self._batch_idle = asyncio.Event()
        self._batch_idle.set()
        self._unsettled: list[asyncio.Task[None]] = []  # in batch order
        super().__init__(*args, **kwargs)

    # -- offsets: batch acks feed Faust's commit() ------------------------------------
    def _filter_tps_with_pending_acks(self, topics: Iterable[Any] | None = None) -> Iterator[TP]:
        wanted = None if topics is None else set(topics)
        for tp in dict.fromkeys([*self._acked, *self._batch_next]):
            if wanted is None or tp in wanted or tp.topic in wanted:
                yield tp

    def _new_offset(self, tp: TP) -> int | None:
        nxt = self._batch_next.pop(tp, None)
        return nxt if nxt is not None else super()._new_offset(tp)

    async def wait_empty(self) -> None:
        """Rebalance and stop wait for the batch in flight and its writes, then commit."""
        await self._batch_idle.wait()
        if self._unsettled:
            await asyncio.gather(*self._unsettled, return_exceptions=True)
        await super().wait_empty()

    async def on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
        for tp in [tp for tp in self._batch_next if tp not in assigned]:
            self._batch_next.pop(tp, None)
        await super().on_partitions_assigned(assigned, generation_id)

    async def _seek_back(self) -> None:
        """Seek back to the committed offsets while a rebalance has paused the flow.

        aiokafka's ``seek_to_committed`` awaits the committed offset of each assigned
        partition in turn, so a rebalance that lands in between takes a partition away
        and the seek raises ``IllegalStateError`` (or trips its "no partitions" assert).
        That killed the fetcher, and the worker with it, when a second worker joined
        during the first's recovery (``bench rebalance``). The new assignment seeks its
        own partitions, so the stale seek is dropped, as Faust's ``getmany`` does.
        """
        try:
            await self.perform_seek()
        except (IllegalStateError, AssertionError) as exc:
            self.log.info("seek back to committed offsets superseded by a rebalance: %r", exc)

    # -- the fetch loop ----------------------------------------------------------------
    async def _drain_messages(self, fetcher: Any) -> None:  # replaces Faust's per-message loop
        handlers: dict[str, BatchHandler] = getattr(self.app, "batch_handlers", {})
        limits = cast("BatchApp", self.app)
        batch_max, batch_within = limits.batch_max, limits.batch_within
        app, callback, read_offset = self.app, self.callback, self._read_offset
        should_stop, fetcher_stopped = self._stopped.is_set, fetcher._stopped.is_set
        pending: Batch = {}
        n_pending, t_first, gen = 0, 0.0, None
        try:
            while not (should_stop() or fetcher_stopped()):
                self.diag.set_flag(CONSUMER_FETCHING)
                wait = batch_within - (monotonic() - t_first) if n_pending else 1.0
                records, active = await self._wait_next_records(max(0.0, wait))
                await asyncio.sleep(0)
                if self.should_stop:
                    break
                if not self.flow_active or (gen is not None and gen != app.consumer_generation_id):
                    # Rebalancing: drop what is not handled yet; it was never acked, so it
                    # is fetched again from the committed offset by whoever owns it next.
                    pending.clear()
                    n_pending, gen = 0, None
                    if records and not self.flow_active:
                        await self._seek_back()
                    continue
                for tp, fetched in (records or {}).items():
                    if (
                        active is not None
                        and tp not in active
                        and tp not in self._buffered_partitions
                    ):
                        continue
                    recs, r_off = fetched, read_offset[tp]
                    if r_off is not None and recs[0].offset < r_off:
                        recs = [r for r in recs if r.offset >= r_off]
                        if not recs:
                            continue
                    if tp.topic in handlers:
                        if not n_pending:
                            t_first, gen = monotonic(), app.consumer_generation_id
                        pending.setdefault(tp, []).extend(recs)
                        n_pending += len(recs)
                        read_offset[tp] = recs[-1].offset + 1
                    else:  # every other topic: Faust's ordinary per-message path
                        for rec in recs:
                            await callback(self._to_message(tp, rec))
                            read_offset[tp] = rec.offset
                if n_pending and (n_pending >= batch_max or monotonic() - t_first >= batch_within):
                    batch, n = pending, n_pending
                    pending, n_pending = {}, 0
                    await self._run_batch(handlers, batch, n, gen)
                    gen = None
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise

    async def _run_batch(
        self, handlers: dict[str, BatchHandler], batch: Batch, n: int, gen: int | None
    ) -> None:
        by_topic: dict[str, Batch] = {}
        for tp, recs in batch.items():
            by_topic.setdefault(tp.topic, {})[tp] = recs
        self._batch_idle.clear()
        durable: list[Awaitable[Any]] = []
        slicer = cast("BatchApp", self.app).slicer
        try:
            for topic, tps in by_topic.items():
                for part in slicer.slices(topic, tps):
                    started = monotonic()
                    done = await handlers[topic](part)
                    if done is not None:
                        durable.append(done)
                    if slicer.slice_s <= 0:
                        continue
                    slicer.observe(topic, sum(map(len, part.values())), monotonic() - started)
                    # Bounded time slices: whatever else is ready (a /decide request, a
                    # heartbeat) runs before the next slice of this batch.
                    await asyncio.sleep(0)
                    if gen != self.app.consumer_generation_id:
                        return  # rebalanced mid-batch: never acked, refetched by the owner
        finally:
            self._batch_idle.set()
        while len(self._unsettled) >= MAX_UNSETTLED:  # bound the writes in flight
            await asyncio.wait([self._unsettled[0]])
        previous = self._unsettled[-1] if self._unsettled else None
        task = asyncio.ensure_future(self._settle(batch, n, gen, durable, previous))
        self._unsettled.append(task)
        task.add_done_callback(self._unsettled.remove)

    async def _settle(
        self,
        batch: Batch,
        n: int,
        gen: int | None,
        durable: list[Awaitable[Any]],
        previous: asyncio.Task[None] | None,
    ) -> None:
        """Acknowledge a batch once its writes are durable, never before an earlier batch."""
        try:
            await asyncio.gather(*durable)
            if previous is not None:
                await asyncio.wait([previous])
        except Exception as exc:  # a changelog write failed: never ack, stop the worker
            await self.crash(exc)
            return
        if gen != self.app.consumer_generation_id:
            return  # rebalanced meanwhile: no ack; the next owner handles it again
        now, inbound = monotonic(), self.app.monitor.stream_inbound_time
        for tp, recs in batch.items():
            if self.app.topics.acks_enabled_for(tp.topic):
                self._batch_next[tp] = recs[-1].offset + 1
            inbound[tp] = now  # keeps Faust's livelock detector quiet
        self._n_acked += n
        if self._commit_every is not None and self._n_acked >= self._commit_every:
            self._n_acked = 0
            await self.commit()


class _ConsumerThread(_drv.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Faust hard-codes 1500 ms; with a batch waiting, a quiet partition would stall it.
        consumer._fetch_max_wait_ms = cast("BatchApp", self.app).fetch_max_wait_ms
        return consumer


def _new_consumer_thread(self: BatchConsumer) -> _ConsumerThread:
    return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


BatchConsumer._new_consumer_thread = _new_consumer_thread  # type: ignore[method-assign,assignment]


class BatchTransport(_drv.Transport):
    Consumer = BatchConsumer


class Slicer:
    """Cuts a fetched batch into slices that each take about ``slice_s`` to handle.

    Why: one event loop serves ``POST /decide`` and ingest. A 5,000-event batch
    takes tens of milliseconds; handled whole, every request that arrives
    meanwhile waits for all of it. Handled in slices of about ``slice_s`` with a
    yield between them, a request waits for one slice at most. The size of a
    slice follows each topic's measured cost per record (a moving average), so
    one setting fits cheap and expensive topics. Each slice is still a batch
    (one table read and one write per key per slice), and the whole fetched
    batch is acknowledged as one, once every slice's writes are durable.

    Short slices cost ingest: each has a fixed part (about 2 ms with the sequence
    table), and at 5,000 events/s with 5 ms slices the freshness p99 was 215 and 493 ms
    against 106 and 144 ms unsliced (docs/performance.md, "Ingest slices"). So they are
    cut short only while someone waits on the loop: ``contended`` says whether a
    ``POST /decide`` request came lately (streams/serve.py); otherwise slices are
    :data:`QUIET_S` long, which still lets timers and agents in 20 times a second.

    And they lengthen while decisions give way to ingest: ``stretch`` is 1 / the share
    of the loop decisions may hold (streams/serve.py, ``IngestGuard.cap``), so slices
    grow from ``slice_s`` up to :data:`QUIET_S` as that share falls. Short slices are
    for the requests, and while ingest is behind most requests are shed anyway; kept
    short, the fixed part of each slice took the time ingest needed to catch up: at
    1,000 requests/s and 5,000 events/s the slices held 37-52 events at 90-145 us an
    event, against 32 us in slices of ~1,264, and the state read by decisions fell 1-10 s
    behind (docs/decide.md, "Decisions give way to ingest").
    """

    FIRST = 256  # records in a topic's first slice, before its cost is known
    SMALLEST = 32  # below this the per-slice overhead would dominate
    QUIET_S = 0.05  # a slice's length while no request waits on the loop

    def __init__(
        self,
        slice_s: float,
        contended: Callable[[], bool] = lambda: True,
        stretch: Callable[[], float] = lambda: 1.0,
    ) -> None:
        self.slice_s = slice_s
        self.contended = contended
        self.stretch = stretch
        self._per_record: dict[str, float] = {}

    def budget_s(self) -> float:
        """How long the next slice may take."""
        quiet = max(self.slice_s, self.QUIET_S)
        return min(quiet, self.slice_s * max(1.0, self.stretch())) if self.contended() else quiet

    def size(self, topic: str) -> int:
        cost = self._per_record.get(topic)
        if cost is None:
            return self.FIRST
        return max(self.SMALLEST, round(self.budget_s() / max(cost, 1e-7)))

    def observe(self, topic: str, n: int, seconds: float) -> None:
        cost = seconds / max(1, n)
        old = self._per_record.get(topic)
        self._per_record[topic] = cost if old is None else 0.8 * old + 0.2 * cost

    def slices(self, topic: str, batch: Batch) -> Iterator[Batch]:
        """The batch itself when slicing is off; else slices in partition order."""
        if self.slice_s <= 0:
            yield batch
            return
        part: Batch = {}
        room = self.size(topic)
        for tp, recs in batch.items():
            start = 0
            while start < len(recs):
                take = recs[start : start + room]
                part[tp] = take
                start += len(take)
                room -= len(take)
                if room == 0:
                    yield part
                    part, room = {}, self.size(topic)
        if part:
            yield part


class BatchApp(faust.App):
    """A faust.App whose consumer hands batches of :meth:`batch_topic` topics to handlers."""

    def __init__(
        self,
        *args: Any,
        batch_max: int = 20_000,
        batch_within: float = 0.005,
        fetch_max_wait_ms: int = 10,
        slice_ms: float = 0.0,
        seal_changelogs: bool = False,
        bulk_restore_client: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.seal_changelogs = seal_changelogs  # before each recovery (restore.py, seal.py)
        self.bulk_restore_client = bulk_restore_client  # aiokafka kwargs; None: no bulk restore
        self.batch_handlers: dict[str, BatchHandler] = {}
        self.batch_max = batch_max  # hand a batch over at this many records ...
        self.batch_within = batch_within  # ... or this long after its first record
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.slicer = Slicer(slice_ms / 1000)

    def _new_transport(self) -> BatchTransport:
        return BatchTransport(self.conf.broker_consumer, self)

    def batch_topic(self, topic: faust.TopicT) -> Callable[[BatchHandler], BatchHandler]:
        """Register ``handler(batch)`` for a topic; it is subscribed without an agent."""

        def register(fn: BatchHandler) -> BatchHandler:
            for name in topic.topics:
                self.batch_handlers[name] = fn
            self.topics.add(topic)
            return fn

        return register


def read_position(app: Any, tp: TP) -> int | None:
    """The next offset the worker will process on ``tp`` (None: nothing read yet).

    Faust's ``Consumer._read_offset`` holds, for the batch path, the next offset to
    read, and for Faust's own per-message path the last one read.
    """
    read = app.consumer._read_offset.get(tp)
    if read is None:
        return None
    return int(read) if tp.topic in getattr(app, "batch_handlers", {}) else int(read) + 1


class Positions:
    """Where the worker's consumer stands on a partition: what a stage may ask of it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def highwater(self, topic: str, partition: int) -> int | None:
        """The end offset the last fetch saw (None: not fetched yet, or not assigned)."""
        try:
            end = self.app.consumer.highwater(TP(topic, partition))
        except (AssertionError, KeyError):  # not (or no longer) assigned
            return None
        return None if end is None else int(end)

    def position(self, topic: str, partition: int) -> int | None:
        """:func:`read_position` of the partition."""
        return read_position(self.app, TP(topic, partition))


class FaustConsumerView:
    """The watchdog's view (streams/runtime/watchdog.py) of a Faust worker's consumer.

    Faust internals used: ``Consumer._read_offset`` (:func:`read_position`),
    ``app.tables.changelog_topics`` (changelog partitions are recovery's business,
    not the watchdog's), ``Consumer.resume_partitions``, ``seek`` and ``highwaters``.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    def eligible(self) -> bool:
        """Only a recovered worker outside a rebalance is expected to make progress."""
        app = self.app
        return bool(
            app.tables.recovery.completed.is_set()
            and not app.rebalancing
            and app.consumer.flow_active
        )

    def partitions(self) -> list[Hashable]:
        changelogs = self.app.tables.changelog_topics
        return [tp for tp in self.app.consumer.assignment() if tp.topic not in changelogs]

    def position(self, tp: Any) -> int | None:  # Any: a Faust TP
        return read_position(self.app, tp)

    async def end_offsets(self, tps: list[Hashable]) -> dict[Hashable, int]:
        return dict(await self.app.consumer.highwaters(*tps))

    async def unstick(self, tps: Mapping[Hashable, int]) -> None:
        consumer = self.app.consumer
        consumer.resume_partitions(tps)
        for tp, offset in tps.items():
            await consumer.seek(tp, offset)
