"""The click join's event-time watermark per partition: two inputs, idle only when caught up.

Why: the join labels a decision 0 once the watermark passes its window end, so
the watermark must never pass a time for which a click may still be waiting on
the topic. It used to be the newest time seen on either input, moved to at least
``now - idle`` on every batch and tick. After downtime (or lag) longer than the
window plus the idle time, a restarted worker reading its backlog closed every
decision it read before that decision's clicks, which were still further down
``user-events``: clicks inside the window labelled 0.

Now each input of a partition (``decisions``, ``events``) has its own progress,
the newest event time it has handed to the join (capped at the wall clock, so a
future-stamped record cannot close windows early), and the watermark is the
lower of the two: a backlog on either input holds it back, as in a two-input
join of the Dataflow model (Akidau et al., VLDB 2015, section 3.3). The wall
clock may stand in for an input's progress (``now - idle``) only while that input
is really idle: caught up to the end of its partition (the caller says so: read
position at the high watermark) and nothing handed over for ``idle`` since the
last record, or since the partition was assigned. A restarted worker reading a
backlog therefore advances by event time only. The watermark never goes back.

>>> wm = Watermarks(idle_ms=1000)
>>> wm.seen(0, "decisions", 5_000, now_ms=60_000)
>>> wm.advance(0, 60_000, caught_up=lambda inp: False)  # events not read yet: no progress
0
>>> wm.seen(0, "events", 4_000, now_ms=60_000)
>>> wm.advance(0, 60_000, caught_up=lambda inp: False)  # the lower input
4000
>>> wm.advance(0, 61_000, caught_up=lambda inp: True)  # both idle for 1 s at their end
60000
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Input = Literal["decisions", "events"]
INPUTS: tuple[Input, Input] = ("decisions", "events")


@dataclass
class _Progress:
    newest: int = 0  # newest event time handed over (capped at the wall clock then)
    active_ms: int = 0  # wall time of the last handover, or of the first look after assignment
    next_offset: int | None = None  # offset after the last record handed over


class Watermarks:
    """Event-time watermark per partition of a join of two co-partitioned inputs."""

    def __init__(self, idle_ms: int) -> None:
        self.idle_ms = idle_ms
        self._wm: dict[int, int] = {}
        self._inputs: dict[tuple[int, Input], _Progress] = {}

    def reset_inputs(self) -> None:
        """After a rebalance: a partition's input is not idle until it is watched anew.

        The watermarks stay (they never go back); each input's progress starts
        again from what this worker reads.
        """
        self._inputs.clear()

    def seen(
        self, part: int, inp: Input, newest_ts: int, now_ms: int, next_offset: int | None = None
    ) -> None:
        """Records of ``inp`` on ``part`` handed to the join; ``newest_ts`` the newest of them."""
        p = self._progress(part, inp, now_ms)
        p.newest = max(p.newest, min(newest_ts, now_ms))
        p.active_ms = now_ms
        if next_offset is not None:
            p.next_offset = max(p.next_offset or 0, next_offset)

    def next_offset(self, part: int, inp: Input) -> int | None:
        """The offset after the last record of ``inp`` handed over on ``part``, if any."""
        p = self._inputs.get((part, inp))
        return None if p is None else p.next_offset

    def advance(self, part: int, now_ms: int, caught_up: Callable[[Input], bool]) -> int:
        """The partition's watermark now; ``caught_up(inp)``: read position at the end."""
        progress = []
        for inp in INPUTS:
            p = self._progress(part, inp, now_ms)
            at = p.newest
            if now_ms - p.active_ms >= self.idle_ms and caught_up(inp):
                at = max(at, now_ms - self.idle_ms)
            progress.append(at)
        wm = max(self._wm.get(part, 0), min(progress))
        self._wm[part] = wm
        return wm

    def get(self, part: int) -> int:
        return self._wm.get(part, 0)

    def _progress(self, part: int, inp: Input, now_ms: int) -> _Progress:
        p = self._inputs.get((part, inp))
        if p is None:
            p = self._inputs[(part, inp)] = _Progress(active_ms=now_ms)
        return p
