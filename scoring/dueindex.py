"""Deadlines of the click join's pending records: which are due, without a scan.

Why: the join asked, on every batch, for the pending decisions whose window
deadline is before the watermark by scanning all of them. Pending records live
for the attribution window (30 min by default), so at 1,000 decisions/s the scan
grew towards 1.8 million entries per batch, and a worker's decisions got slower
the longer it ran: py-spy on a 5-minute `bench decisions` run put 12.7% of the
worker's samples in that one set comprehension after the first minute. A heap
with lazy deletion answers "due before w" in O(due · log n).
"""

from __future__ import annotations

import heapq


class DueIndex:
    """key -> deadline, and the keys due before a watermark.

    >>> d = DueIndex()
    >>> d.set("a", 5); d.set("b", 9); d.set("a", 12)
    >>> d.due(10)
    ['b']
    >>> d.discard("b"); d.due(10), len(d)
    ([], 1)
    """

    def __init__(self) -> None:
        self._deadline: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []  # may hold stale entries: checked on pop

    def __len__(self) -> int:
        return len(self._deadline)

    def set(self, key: str, deadline: int) -> None:
        if self._deadline.get(key) == deadline:
            return
        self._deadline[key] = deadline
        heapq.heappush(self._heap, (deadline, key))
        if len(self._heap) > 2 * len(self._deadline) + 1024:  # too many stale entries
            self._heap = [(t, k) for k, t in self._deadline.items()]
            heapq.heapify(self._heap)

    def discard(self, key: str) -> None:
        self._deadline.pop(key, None)

    def due(self, watermark: int) -> list[str]:
        """Keys whose deadline is before ``watermark``; they stay indexed until discarded
        or set to a new deadline (a caller that leaves one open sees it again)."""
        out: list[str] = []
        while self._heap and self._heap[0][0] < watermark:
            t, key = heapq.heappop(self._heap)
            if self._deadline.get(key) == t and (not out or out[-1] != key):
                out.append(key)
        for key in out:
            heapq.heappush(self._heap, (self._deadline[key], key))
        return out
