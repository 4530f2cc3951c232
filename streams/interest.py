"""Apply a batch of raw ``user-events`` messages to the interest table.

One call per consumed batch: decode and validate everything at once, read each
touched user's state once, fold the batch in with numpy (scoring/features.py),
and hand back one write per user. The handler (streams/pipeline.py) owns the
I/O; this module owns the order of the steps, so it can be tested without a
broker.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from adpulse.core.privacy import Pseudonymiser
from adpulse.core.settings import Settings
from schemas.messages import UserEvent
from scoring.abuse import EventRateLimiter
from scoring.embeddings import CachedEmbeddings, EmbeddingTable, HashedEmbeddings
from scoring.features import (
    KINDS,
    OUTCOMES,
    EventBatch,
    InterestParams,
    apply_events,
    decode_all,
    encode_states,
)
from streams.deadletter import Loader, Raw, Rejected
from streams.ingest import decode_events, pseudonymise, rate_limit, to_columns

# (user keys, their partitions) -> stored values (None = new user)


@dataclass
class BatchResult:
    """What one batch did: the table writes to make and what to count and dead-letter."""

    writes: list[tuple[bytes, int, bytes]] = field(default_factory=list)  # key, partition, value
    rejected: list[Rejected] = field(default_factory=list)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, outcome)
    newest_ts: int = 0  # latest event time applied, for freshness
    valid: list[tuple[UserEvent, Raw]] = field(default_factory=list)  # for the click join
    # The valid events as columns (users, batch), for the sequence stage (streams/sequence.py)
    columns: tuple[list[str], EventBatch] | None = None


class InterestStage:
    """Validated, deduplicated, decayed interest updates for batches of events."""

    def __init__(
        self,
        settings: Settings,
        table: EmbeddingTable | None = None,
        pseudonyms: Pseudonymiser | None = None,
    ) -> None:
        self.settings = settings
        self.pseudonyms = pseudonyms or Pseudonymiser.from_settings(settings)
        self.limiter = EventRateLimiter(settings.max_events_per_user_s)
        self.params = InterestParams.from_settings(settings)
        # The hashed vectors behind a bounded cache (ADPULSE_EMBEDDING_CACHE_ROWS): a slice's
        # events mostly touch items and categories seen before, and the rows are identical.
        self.table = table or CachedEmbeddings(
            HashedEmbeddings(settings.dim, settings.embedding_seed), settings.embedding_cache_rows
        )

    def process(self, raws: Sequence[Raw], load: Loader, now_ms: int) -> BatchResult:
        s = self.settings
        good, rejected = decode_events(
            raws, now_ms, s.max_event_bytes, s.max_future_skew_ms, s.max_event_age_days
        )
        pseudonymise(good, self.pseudonyms)  # from here on, user ids are pseudonyms
        good, limited = rate_limit(good, self.limiter, now_ms)
        result = BatchResult(rejected=rejected + limited, valid=good)
        if not good:
            return result
        users, batch = to_columns(good)
        result.columns = (users, batch)
        keys = [u.encode() for u in users]
        first = np.unique(batch.user, return_index=True)[1]
        partitions = [good[i][1].partition for i in first]
        states, cats, items = decode_all(load(keys, partitions), self.params)
        new, cats, items, outcome = apply_events(
            states, cats, items, batch, self.table, self.params, now_ms
        )
        # Every user of the batch is written, duplicates-only ones too: their
        # applied offset moved, and that is what makes a redelivery harmless.
        records = encode_states(new, cats, items)
        result.writes = list(zip(keys, partitions, records, strict=True))
        pairs = np.bincount(
            batch.kind.astype(np.int64) * len(OUTCOMES) + outcome,
            minlength=len(KINDS) * len(OUTCOMES),
        )
        for code, n in enumerate(pairs.tolist()):
            if n:
                result.outcomes[(KINDS[code // len(OUTCOMES)], OUTCOMES[code % len(OUTCOMES)])] = n
        applied = outcome == 0
        if applied.any():
            result.newest_ts = int(batch.ts[applied].max())
        return result
