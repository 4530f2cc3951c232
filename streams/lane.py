"""Decision batches one at a time, their model runs on a thread of their own.

The worker's event loop also runs HTTP, ingest and the click join; a decision's ONNX
Runtime runs (a sequence model: one per request) were its largest single cost.
ONNX Runtime releases the GIL while it runs, so :class:`DecisionLane` hands a
batch's runs, with their input assembly, to one dedicated thread in one hand-off
(:meth:`DecideStage.score`) and the loop serves everything else meanwhile
(``ADPULSE_SCORER_THREAD``; docs/decide.md, "Isolation from ingest").

Batches stay strictly serial: every writer of the caps and spend tables (a decision
batch from either entry point, a forget request's cap tombstone, the click join's
charges) holds :attr:`DecisionLane.lock` from its reads to its RocksDB writes and
their changelog hand-off, so no batch ever reads caps or spend another one has read
and not yet written, and no cap or budget is spent twice. Requests that arrive while
a batch is on the thread wait for the next batch (``POST /decide``'s queue,
streams/serve.py, starts one run at a time).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from schemas.messages import AdRequest
from streams.deadletter import Raw
from streams.decide import DecideResult, DecideStage, StateReaders

W = TypeVar("W")
# The GIL switch interval while the thread is on. Each ONNX Runtime run releases the GIL
# and must take it back from a busy event loop, which by default hands it over only
# every 5 ms: a batch of 20 one-request runs of the shipped sequence model took 44 ms
# on the thread against a busy loop (6 ms inline), 4 ms at 1 ms and 3.6 ms at 0.2 ms.
SWITCH_INTERVAL_S = 0.0005


def _now_ms() -> int:
    return int(time.time() * 1000)


class DecisionLane:
    """The one way into :class:`DecideStage` on the worker: a lock and a scoring thread.

    ``thread`` False: the model runs stay on the caller's thread (``ADPULSE_SCORER_THREAD``).
    ``clock``: epoch ms, read when a batch starts (after the lock), not when it queued.
    ``busy``: told the seconds each batch's steps held the event loop (its model runs on
    the thread do not), the load ``POST /decide`` gives way by (streams/serve.py), as
    ``timer`` (seconds, monotonic) measures them.
    """

    def __init__(
        self,
        stage: DecideStage,
        thread: bool = True,
        clock: Callable[[], int] = _now_ms,
        busy: Callable[[float], None] = lambda _s: None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.stage = stage
        self.clock = clock
        self.busy = busy
        self.timer = timer
        self.lock = asyncio.Lock()  # held from a batch's reads to its writes
        self._pool = ThreadPoolExecutor(1, "adpulse-scorer") if thread else None
        if thread:  # process-wide; only costs while two threads want the GIL
            sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))

    async def decide(
        self,
        requests: Sequence[tuple[AdRequest, Raw]],
        tables: StateReaders,
        default_tmax_ms: int,
        write: Callable[[DecideResult], W],
    ) -> tuple[DecideResult, W]:
        """:meth:`DecideStage.decide` at the batch's start time, its model runs on the
        thread, then ``write`` (the result's caps and spend to RocksDB and the changelog
        buffers), all under :attr:`lock`; the result and what ``write`` returned."""
        async with self.lock:
            started = self.timer()
            batch = self.stage.begin(requests, tables, self.clock(), default_tmax_ms)
            if self._pool is None or not batch.runs_model:
                scored = self.stage.score(batch)
            else:  # the batch's objects are the thread's alone until it returns
                held = self.timer() - started
                loop = asyncio.get_running_loop()
                scored = await loop.run_in_executor(self._pool, self.stage.score, batch)
                started = self.timer() - held
            result = self.stage.finish(batch, scored)
            written = write(result)
            self.busy(self.timer() - started)
            return result, written

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
