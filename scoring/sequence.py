"""A user's behaviour sequence: the last N events by event time, exact, as stored.

The target-attention block of the CTR model (scoring/attention.py) reads what
a user did, not a summary of it, so each user keeps their last N behaviours
(``ADPULSE_SEQUENCE_LENGTH``, default 50): item, category, kind and event time,
newest first.

Why no dedupe ring is needed here, unlike the interest record: the entries are
ordered by the total key (ts, fingerprint of event_id), newest first, and an
arriving event with the key of a stored one is a duplicate. A
duplicate of an event that is no longer stored cannot get back in: it left
because N events ranked above it, the stored events only ever rank higher
since (the N-th key never decreases), and the duplicate has the key it had.
So the stored N are exactly the N highest keys of the deduplicated events,
whatever the arrival order, redeliveries and duplicates included
(:func:`reference_sequences` is that statement as code, and the tests hold
the streaming update to it). The one assumption: an event id names one event,
so its copies carry the same ts, as they do when a producer retries.

Record: a 4-byte header (version, flags, count) then ``count`` entries of
:data:`ENTRY_DTYPE` (33 bytes), newest first: 1,654 bytes for 50 behaviours.
Pure numpy; the Faust stage that owns the table is streams/sequence.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from scoring.arrays import LOW_TOP, group_order, prepend, ranks_in_runs
from scoring.embeddings import EmbeddingTable
from scoring.features import KIND_INDEX, KINDS, EventBatch, fingerprint
from scoring.featurespec import FeatureSpec, ItemVectorCache, item_vectors

SEQUENCE_VERSION = 1
ENTRY_DTYPE = np.dtype(
    [("ts", "<i8"), ("item", "<i8"), ("category", "<i8"), ("fp", "<u8"), ("kind", "u1")]
)
HEADER_DTYPE = np.dtype([("version", "u1"), ("flags", "u1"), ("count", "<u2")])
# The entries as opaque 33-byte records: numpy copies a structured dtype field by field, so
# a gather or a concatenation of them as records is 4-10x slower (2.6 against 0.28 ms to
# gather 27,000).
_RECORD = np.dtype((np.void, ENTRY_DTYPE.itemsize))
# Outcomes of one event in apply_sequences.
KEPT, DUPLICATE, OLDER = 0, 1, 2  # OLDER: older than the user's last N; nothing to keep
OUTCOMES = ("kept", "duplicate", "older")

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Sequences:
    """Many users' sequences, ragged: user i's entries are ``entries[start[i]:start[i+1]]``,
    newest first (ts descending, then fingerprint descending)."""

    start: I64  # [n + 1]
    entries: npt.NDArray[Any]  # ENTRY_DTYPE

    def __len__(self) -> int:
        return len(self.start) - 1

    def of(self, i: int) -> npt.NDArray[Any]:
        return self.entries[int(self.start[i]) : int(self.start[i + 1])]

    def lengths(self) -> I64:
        return self.start[1:] - self.start[:-1]  # np.diff's dispatch costs more here


def decode_sequences(values: list[bytes | None]) -> Sequences:
    """Stored values to sequences; an absent value (None) is an empty sequence."""
    counts: list[int] = []
    parts: list[bytes] = []
    h, e = HEADER_DTYPE.itemsize, ENTRY_DTYPE.itemsize
    for v in values:
        if v is None:
            counts.append(0)
            continue
        count = int.from_bytes(v[2:4], "little")  # HEADER_DTYPE's count
        if len(v) < h or len(v) != h + e * count:
            msg = f"stored behaviour sequence has a wrong size ({len(v)} bytes): corrupt record"
            raise ValueError(msg)
        if v[0] != SEQUENCE_VERSION:
            msg = f"stored behaviour sequence has an unknown version {v[0]}"
            raise ValueError(msg)
        counts.append(count)
        parts.append(v[h:])
    # copied as bytes, then seen as entries: a structured copy goes field by field (10x)
    entries = np.frombuffer(b"".join(parts), np.uint8).copy().view(ENTRY_DTYPE)
    start = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(np.array(counts, dtype=np.int64), out=start[1:])
    return Sequences(start, entries)


def encode_sequences(seqs: Sequences) -> list[bytes]:
    """One stored value per user: header, then the entries newest first."""
    raw = seqs.entries.tobytes()
    at = (seqs.start * ENTRY_DTYPE.itemsize).tolist()
    version = bytes((SEQUENCE_VERSION, 0))  # HEADER_DTYPE: version, flags, count
    return [
        version + n.to_bytes(2, "little") + raw[at[i] : at[i + 1]]
        for i, n in enumerate(seqs.lengths().tolist())
    ]


def apply_sequences(
    old: Sequences, batch: EventBatch, length: int
) -> tuple[Sequences, npt.NDArray[np.uint8]]:
    """Every user's sequence with the batch folded in, and each event's outcome.

    ``batch.user`` indexes ``old``. One numpy pass: old entries and new events
    are grouped by user, copies of a fingerprint dropped (a stored one wins, then
    the earliest arrival), the rest ordered newest first and cut at ``length``.
    """
    n = len(batch.user)
    new = np.zeros(n, dtype=ENTRY_DTYPE)
    new["ts"], new["item"], new["category"] = batch.ts, batch.item, batch.category
    new["fp"], new["kind"] = batch.fingerprint, batch.kind
    owner = np.repeat(np.arange(len(old)), old.lengths())
    user = np.concatenate([owner, batch.user])
    ent = np.concatenate([old.entries.view(_RECORD), new.view(_RECORD)]).view(ENTRY_DTYPE)
    # -1: stored before
    src = np.concatenate((np.full(len(owner), -1, np.int64), np.arange(n, dtype=np.int64)))
    outcome = np.full(n, KEPT, dtype=np.uint8)

    # One sort: per user, newest first (ts descending, then fingerprint descending: a total
    # order), copies of an event (same ts and fingerprint) adjacent, the stored one (src
    # -1) or else the first arrival first; the copies after it are dropped.
    fp, ts = ent["fp"], ent["ts"]
    o = group_order(user, LOW_TOP - ts, ~fp, src)  # LOW_TOP - ts: ts descending
    # The entries (33-byte records) are gathered once, at the end, through ``o``.
    user, src, fp, ts = user[o], src[o], fp[o], ts[o]
    dup = prepend(False, (user[1:] == user[:-1]) & (fp[1:] == fp[:-1]) & (ts[1:] == ts[:-1]))
    outcome[src[dup & (src >= 0)]] = DUPLICATE
    user, src, o = user[~dup], src[~dup], o[~dup]
    first = np.flatnonzero(prepend(True, user[1:] != user[:-1])) if len(user) else np.zeros(0, int)
    cut = ranks_in_runs(first, len(user)) >= length
    outcome[src[cut & (src >= 0)]] = OLDER
    user, o = user[~cut], o[~cut]
    start = prepend(0, np.cumsum(np.bincount(user, minlength=len(old)))).astype(np.int64)
    return Sequences(start, take_entries(ent, o)), outcome


def take_entries(entries: npt.NDArray[Any], at: npt.NDArray[np.intp]) -> npt.NDArray[Any]:
    """``entries[at]``, copied as whole records (see ``_RECORD``)."""
    records = np.ascontiguousarray(entries).view(_RECORD)
    out: npt.NDArray[Any] = np.take(records, at).view(ENTRY_DTYPE)
    return out


def reference_sequences(
    events: Iterable[Mapping[str, Any]], length: int
) -> dict[str, list[tuple[int, int, int, int]]]:
    """The oracle: user -> last ``length`` (ts, item_id, category_id, kind index), newest first,
    recomputed from scratch; copies of an event id count once, order is irrelevant."""
    by_user: dict[str, dict[str, Mapping[str, Any]]] = {}
    for ev in events:
        by_user.setdefault(ev["user_id"], {}).setdefault(ev["event_id"], ev)
    out = {}
    for user, evs in by_user.items():
        keyed = sorted(
            ((int(e["ts"]), fingerprint(eid), e) for eid, e in evs.items()),
            key=lambda t: (t[0], t[1]),
            reverse=True,
        )[:length]
        out[user] = [
            (t, int(e["item_id"]), int(e["category_id"]), KIND_INDEX[e["kind"]])
            for t, _, e in keyed
        ]
    return out


def as_tuples(entries: npt.NDArray[Any]) -> list[tuple[int, int, int, int]]:
    """A stored sequence in :func:`reference_sequences`' shape, for tests and tools."""
    return [(int(e["ts"]), int(e["item"]), int(e["category"]), int(e["kind"])) for e in entries]


def describe(entries: npt.NDArray[Any]) -> list[dict[str, Any]]:
    """A user's sequence as JSON-ready data, newest first (operators' lookup)."""
    return [
        {"ts": t, "item_id": i, "category_id": c, "kind": KINDS[k]}
        for t, i, c, k in as_tuples(entries)
    ]


def sequence_vectors(
    seqs: Sequences,
    table: EmbeddingTable,
    spec: FeatureSpec,
    cache: ItemVectorCache | None = None,
) -> list[npt.NDArray[np.float32] | None]:
    """Each user's behaviours as the model's ``seq`` rows ([L, D], newest first; None for
    a user with none), at most ``spec.sequence`` of them, one embedding call for all.

    The vectors are the items' as ads get them (:func:`scoring.featurespec.item_vectors`);
    a table of item text embeddings plugs in as ``table``. ``cache``, when it
    :meth:`~scoring.featurespec.ItemVectorCache.fits` ``table`` and ``spec``, serves the
    same rows from memory.
    """
    lengths = np.minimum(seqs.lengths(), spec.sequence)
    ends = np.cumsum(lengths)  # where each user's rows end in ``vecs``
    # user i's row j (j < lengths[i]) is entry start[i] + j, and sits at ends[i] - lengths[i] + j
    shift = np.repeat(seqs.start[:-1] - (ends - lengths), lengths)
    ent = take_entries(seqs.entries, np.arange(len(shift)) + shift)
    if cache is not None and cache.fits(table, spec):
        vecs = cache(ent["item"], ent["category"])
    else:
        vecs = item_vectors(table, ent["item"], ent["category"], spec)
    at = [0, *ends.tolist()]
    return [vecs[at[i] : at[i + 1]] if at[i + 1] > at[i] else None for i in range(len(seqs))]


def behaviour_ids(
    records: Sequence[Mapping[str, Any]], spec: FeatureSpec
) -> tuple[npt.NDArray[np.int64], I64]:
    """The logged behaviours of ctr-feedback records (``features.sequence``) as ids:
    [n, spec.sequence, 2] (item, category), newest first, zero-padded, and each row's length.

    0.8 KB a row at N = 50 (int64 pairs), where the vectors are 13 KB: what the online
    learner keeps in its replay ring, rebuilding the vectors (:func:`behaviour_inputs`) when
    it learns a row again.
    """
    ids = np.zeros((len(records), spec.sequence, 2), dtype=np.int64)
    lengths = np.zeros(len(records), dtype=np.int64)
    for i, rec in enumerate(records):
        pairs = rec["features"].get("sequence") or ()
        n = min(len(pairs), spec.sequence)
        if n:
            ids[i, :n] = np.asarray(pairs[:n], dtype=np.int64)
        lengths[i] = n
    return ids, lengths


def behaviour_inputs(
    ids: npt.NDArray[np.int64], lengths: I64, spec: FeatureSpec, table: EmbeddingTable
) -> npt.NDArray[np.float32]:
    """The model's ``seq`` input from :func:`behaviour_ids`: [n, L, D], L the longest row
    (at least 1), padding rows zero. Equal to what ``from_feedback`` builds (a test holds
    them to it): the same per-behaviour rule (:func:`item_vectors`)."""
    width = max(1, int(lengths.max())) if len(lengths) else 1
    out = np.zeros((len(ids), width, spec.dim), dtype=np.float32)
    real = np.arange(width)[None, :] < lengths[:, None]
    if real.any():
        kept = ids[:, :width][real]
        out[real] = item_vectors(table, kept[:, 0], kept[:, 1], spec)
    return out
