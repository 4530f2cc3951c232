"""The learner-state records the learners write and the decision side reads.

One record per ad (:class:`AdState`, msgpack): the highest ctr-feedback offset
applied, a ring of recent decision-id fingerprints (dedupe), Thompson counts,
counts per segment, the LinUCB state and, under forgetting, the event time
they are scaled to. Calibration counts are additive, so
each ctr-feedback partition keeps its own :class:`CalibrationShard`. How they
are written and broadcast is streams/learn.py's business; this module is only
their shape and keys, so both sides agree without importing each other.
"""

from __future__ import annotations

import msgspec
import numpy as np
import numpy.typing as npt


class AdState(msgspec.Struct, array_like=True, omit_defaults=True):
    """One ad's learner state: what the decision stage reads and the dedupe guarding it."""

    offset: int = -1  # highest ctr-feedback offset applied (the ad's partition)
    ring: list[int] = []  # fingerprints of the last decision ids applied, oldest first
    shows: float = 0.0  # Thompson counts, pooled over segments
    clicks: float = 0.0
    segments: dict[int, tuple[float, float]] = {}  # segment -> (shows, clicks)
    linucb: bytes = b""  # LinUCB state_dtype record; empty until a label with a context
    # Event time (epoch ms) the counts and LinUCB statistics are scaled to, under a
    # half-life (scoring/strategy/forgetting.py); 0 without forgetting. Last, with a
    # default, so records written before it decode, and a worker of the version before
    # reads new records (msgspec drops trailing array elements a Struct does not name).
    ts: int = 0
    # Conversions (``converted: 1`` records) on the same scale as ``shows``: the evidence a
    # cpa ad's Thompson posterior weighs (scoring/strategy/policy.py). Last, for the same
    # reason as ``ts``.
    conversions: float = 0.0


class CalibrationShard(msgspec.Struct, array_like=True):
    offset: int = -1
    state: bytes = b""


encode = msgspec.msgpack.Encoder().encode
_decode_ad = msgspec.msgpack.Decoder(AdState).decode
decode_shard = msgspec.msgpack.Decoder(CalibrationShard).decode


def decode_ad(raw: bytes | None) -> AdState:
    return AdState() if raw is None else _decode_ad(raw)


ARM_SEP = "\x1f"  # unit separator, between arm and ad id: a control character ids avoid


def state_key(ad_id: str, arm: str | None = None) -> str:
    """Learner-state key of an ad: the ad id, or ``ARM\\x1fAD`` for one experiment arm's."""
    return f"{arm}{ARM_SEP}{ad_id}" if arm else ad_id


def calibration_key(partition: int) -> bytes:
    """Key of one partition's calibration shard (NUL-prefixed: no ad id collides)."""
    return b"\x00calibration|%d" % partition


def segment_of(vector: npt.ArrayLike | None) -> int | None:
    """The user's dominant interest dimension, or None for no (or an all-zero) vector."""
    if vector is None:
        return None
    v = np.asarray(vector, dtype=np.float64)
    if v.size == 0 or not np.any(v):
        return None
    return int(np.argmax(v))
