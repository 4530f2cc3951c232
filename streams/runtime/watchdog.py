"""The consumer watchdog: a source partition with lag that makes no progress is a stall.

Why: a worker was seen to report ready, hold its partitions, and then fetch
nothing at all (docs/reference.md, "The embedded broker"); nothing noticed, /health stayed 200,
and requests went unanswered. Lag alone cannot tell a stall from load (a worker
far behind still moves), and a lag gauge built from fetched high watermarks says
nothing when nothing is fetched. So the watchdog asks two questions per
assigned source partition: did the read position move in the last
``ADPULSE_STALL_S`` seconds, and does the broker (a ListOffsets request, not a
fetch) hold records past that position? Both "no, yes" is a stall.

A stall is reported (``adpulse_consumer_stalled_partitions``, /health 503, one
log line, the ``AdpulseConsumerStalled`` alert) and remedied in place: the
partitions are resumed and re-seeked to their position, which makes the client
drop its fetch state for them and fetch anew. If the stall outlives another
period, the remedy is tried again, and /health stays 503, so an orchestrator's
liveness probe restarts the worker as the last resort.

The logic here is pure (positions and end offsets in, verdicts out); the two
views over a real consumer (Faust's, ``FaustConsumerView`` in
streams/runtime/consumer.py; a bare aiokafka consumer in the tests) implement :class:`ConsumerView`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)
TICK_S = 1.0  # how often the worker runs a check
END_OFFSETS_TIMEOUT_S = 5.0  # a consumer that cannot even answer this is stalled


class ConsumerView(Protocol):
    """What the watchdog needs of a consumer; partitions are any hashable id."""

    def partitions(self) -> list[Hashable]:
        """Assigned source partitions the watchdog should watch right now ([]: none)."""
        ...

    def position(self, tp: Hashable) -> int | None:
        """Next offset the application will process (None: not known yet)."""
        ...

    async def end_offsets(self, tps: list[Hashable]) -> Mapping[Hashable, int]:
        """The broker's end offsets (a ListOffsets request, independent of fetching)."""
        ...

    async def unstick(self, tps: Mapping[Hashable, int]) -> None:
        """Resume the partitions and seek each to the given offset."""
        ...


@dataclass
class _Track:
    position: int | None
    since: float  # when the position last moved (or watching began)


@dataclass
class StallWatchdog:
    """Tracks progress per partition; :meth:`check` returns the stalled ones.

    >>> wd = StallWatchdog(stall_s=10.0)
    >>> wd.observe({"p0": 5}, now=0.0)
    []
    >>> wd.observe({"p0": 5}, now=11.0)
    ['p0']
    """

    stall_s: float
    stalled: dict[Hashable, float] = field(default_factory=dict)  # tp -> stalled since
    stalls: int = 0  # stalls detected over the lifetime
    remedies: int = 0
    _tracks: dict[Hashable, _Track] = field(default_factory=dict)

    def reset(self, now: float) -> None:
        """Forget progress (a rebalance or recovery: pauses then are by design)."""
        self._tracks.clear()
        self.stalled.clear()

    def observe(self, positions: Mapping[Hashable, int | None], now: float) -> list[Hashable]:
        """Record positions; return the partitions without progress for ``stall_s``."""
        for tp in [tp for tp in self._tracks if tp not in positions]:
            del self._tracks[tp]
            self.stalled.pop(tp, None)
        suspects = []
        for tp, pos in positions.items():
            track = self._tracks.get(tp)
            if track is None or track.position != pos:
                self._tracks[tp] = _Track(pos, now)
                self.stalled.pop(tp, None)
            elif now - track.since >= self.stall_s:
                suspects.append(tp)
        return suspects

    def judge(
        self, suspects: list[Hashable], ends: Mapping[Hashable, int] | None, now: float
    ) -> dict[Hashable, int]:
        """Mark suspects with records past their position as stalled; returns them with
        the offset to seek to. ``ends`` None means the consumer did not answer: all stall."""
        found: dict[Hashable, int] = {}
        for tp in suspects:
            pos = self._tracks[tp].position
            end = None if ends is None else ends.get(tp)
            if ends is not None and (end is None or end <= (pos or 0)):
                self._tracks[tp].since = now  # caught up: idle, not stalled
                continue
            if tp not in self.stalled:
                self.stalls += 1
                self.stalled[tp] = now
            found[tp] = pos or 0
            self._tracks[tp].since = now  # next remedy only after another period
        return found


async def check(
    wd: StallWatchdog,
    view: ConsumerView,
    clock: Callable[[], float] = time.monotonic,
) -> dict[Hashable, int]:
    """One watchdog round over a view: observe, ask the broker about suspects, remedy."""
    now = clock()
    tps = view.partitions()
    suspects = wd.observe({tp: view.position(tp) for tp in tps}, now)
    if not suspects:
        return {}
    try:
        ends: Mapping[Hashable, int] | None = await asyncio.wait_for(
            view.end_offsets(suspects), END_OFFSETS_TIMEOUT_S
        )
    except (TimeoutError, Exception):  # a client that cannot answer is what we look for
        log.warning("watchdog: end offsets unavailable for %d partition(s)", len(suspects))
        ends = None
    found = wd.judge(suspects, ends, now)
    if found:
        log.error(
            "consumer stalled: %d partition(s) with records past their position made no "
            "progress for %.0f s (%s); resuming and re-seeking them, /health is 503 until "
            "they move",
            len(found), wd.stall_s, ", ".join(map(str, sorted(found, key=str))),
        )  # fmt: skip
        wd.remedies += 1
        try:
            await view.unstick(found)
        except Exception:  # the remedy failing must not kill the timer; next round retries
            log.exception("watchdog: remedy failed")
    return found
