"""forget-requests -> one user's state deleted everywhere, by tombstones through the changelogs.

A request (schemas/forget-requests.schema.json) is keyed by the *raw* user id,
so the default partitioner puts it on the user's partition, the one whose
interest, freqcap and pending records this worker owns (one under another key,
or none, is dead-lettered ``key_mismatch``: it would delete nothing there and
confirm anyway). This module decides what a request is (:func:`check`) and what
its confirmation says; the handler (``forget_user``, streams/pipeline.py) turns the
id into its pseudonym and deletes, on that partition:

- ``interest`` (vector, counters, dedupe memory) and ``freqcap``: one tombstone
  each, written whether or not this worker holds a value, so the changelog
  deletes it on every replica and restore;
- ``pending``: every open or labelled click-join record of the user
  (streams/join.py), with the join's in-memory indexes.

Only once every tombstone is acknowledged by the changelog does it write a
``forget-confirmations`` record (request id and counts, no user id) on the
same partition number, which ``adpulse forget --wait`` waits for. Per-ad learner
state (learn/strategy) aggregates many users and holds no user id; it is kept.
"""

from __future__ import annotations

import msgspec

from schemas.messages import ForgetConfirmation, ForgetRequest
from streams.deadletter import Raw, Rejected
from streams.validate import ContractDecoder, key_problem

_decoder = ContractDecoder("forget-requests", ForgetRequest)


def check(raw: Raw) -> ForgetRequest | Rejected:
    """The request, or why it is refused: invalid, or keyed by another user (the user's
    state is not on this partition, so it would delete nothing and confirm anyway)."""
    req = _decoder.decode(raw)
    if not isinstance(req, Rejected) and (why := key_problem(raw.key, req.user_id)) is not None:
        return Rejected(raw, "key_mismatch", why)
    return req


def confirmation(req: ForgetRequest, now_ms: int, part: int, counts: dict[str, int]) -> bytes:
    """The forget-confirmations record: request id and counts, no user id."""
    return msgspec.json.encode(ForgetConfirmation(
        request_id=req.request_id, ts=now_ms, partition=part, interest=counts["interest"],
        freqcap=counts["freqcap"], pending=counts["pending"],
    ))  # fmt: skip
