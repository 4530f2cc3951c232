"""Fold a batch's valid events into the sequence table: each user's last N behaviours.

Called by the ingest handler (streams/pipeline.py) with the events the interest
stage accepted (decoded, pseudonymised, rate-limited), so both tables see the
same events. Its writes join the batch's, so the batch is acknowledged only once
both changelogs have them: after kill -9 the batch is read again and re-applied,
and a re-applied event is a copy the update drops (scoring/sequence.py says why
that is exact).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from schemas.messages import UserEvent
from scoring.features import EventBatch
from scoring.sequence import OUTCOMES, apply_sequences, decode_sequences, encode_sequences
from streams.deadletter import Loader, Raw
from streams.ingest import to_columns


@dataclass
class SequenceResult:
    writes: list[tuple[bytes, int, bytes]] = field(default_factory=list)  # key, partition, value
    outcomes: Counter[str] = field(default_factory=Counter)  # kept / duplicate / older


class SequenceStage:
    """Per-user behaviour sequences, ``length`` long, for a batch of valid events."""

    def __init__(self, length: int) -> None:
        self.length = length

    def process(
        self,
        good: Sequence[tuple[UserEvent, Raw]],
        load: Loader,
        columns: tuple[list[str], EventBatch] | None = None,
    ) -> SequenceResult:
        """``columns``: ``to_columns(good)`` when the caller has them (the interest stage's)."""
        result = SequenceResult()
        if not good:
            return result
        users, batch = columns or to_columns(good)
        keys = [u.encode() for u in users]
        first = np.unique(batch.user, return_index=True)[1]
        partitions = [good[i][1].partition for i in first]
        new, outcome = apply_sequences(decode_sequences(load(keys, partitions)), batch, self.length)
        result.writes = list(zip(keys, partitions, encode_sequences(new), strict=True))
        for code, n in enumerate(np.bincount(outcome, minlength=len(OUTCOMES)).tolist()):
            if n:
                result.outcomes[OUTCOMES[code]] = n
        return result
