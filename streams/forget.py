"""forget-requests -> one user's state deleted everywhere, by tombstones through the changelogs.

A request (schemas/forget-requests.schema.json) is keyed by the *raw* user id,
so the default partitioner puts it on the user's partition, the one whose
interest, freqcap and pending records this worker owns (one under another key,
or none, is dead-lettered ``key_mismatch``: it would delete nothing there and
confirm anyway). The agent turns the id into its pseudonym and deletes, on that
partition:

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

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from streams.deadletter import Raw, Rejected, dead_letter
from streams.runtime.tablewriter import ChangelogBuffer, read_many, write_local, write_many
from streams.validate import ContractDecoder, key_problem

if TYPE_CHECKING:
    from streams.app import Wiring
    from streams.join import JoinStage

log = logging.getLogger(__name__)

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class ForgetRequestMsg(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """schemas/forget-requests.schema.json as a msgspec Struct."""

    request_id: Id
    user_id: Id
    ts: Annotated[int, msgspec.Meta(ge=0, le=253_402_300_799_999)]
    reason: Annotated[str, msgspec.Meta(max_length=256)] | msgspec.UnsetType = msgspec.UNSET


_decoder = ContractDecoder("forget-requests", ForgetRequestMsg, ("ts",))


async def forget(
    w: Wiring, join: JoinStage | None, raw: Raw, caps: ChangelogBuffer | None = None
) -> None:
    """Apply one forget request: tombstones acked, then the confirmation sent.

    ``caps`` is the buffer the decisions' cap records wait in: the tombstone goes
    through it, so no cap record written just before can be sent after it.
    """
    req = _decoder.decode(raw)
    now_ms = int(time.time() * 1000)
    if not isinstance(req, Rejected) and (why := key_problem(raw.key, req.user_id)) is not None:
        req = Rejected(raw, "key_mismatch", why)  # the user's state is not on this partition
    if isinstance(req, Rejected):
        topic = w.settings.topic("forget-requests")
        value = json.dumps(dead_letter(req, topic, now_ms, stage="forget")).encode()
        await w.dead_letters.send(value=value)
        w.metrics.dead_letters.labels(topic, req.reason).inc()
        return
    user = w.pseudonyms(req.user_id)
    key, part = user.encode(), raw.partition
    counts: dict[str, Any] = {}
    futures: list[Any] = []
    # Under the partition's lock: an ingest batch that read the user before this
    # tombstone has its changelog records sent before it (streams/runtime/tablewriter.py).
    async with w.interest_locks.hold([part]):
        counts["interest"] = sum(v is not None for v in read_many(w.interest, part, [key]))
        futures += await write_many(w.interest, part, [(key, None)])
    counts["freqcap"] = sum(v is not None for v in read_many(w.freqcap, part, [key]))
    if caps is not None:
        write_local(w.freqcap, part, [(key, None)])
        futures.append(caps.add(part, [(key, None)]))
    else:
        futures += await write_many(w.freqcap, part, [(key, None)])
    counts["pending"] = 0
    if join is not None:
        more, counts["pending"] = await join.forget(part, user)
        futures += more
    await asyncio.gather(*futures)  # every tombstone is in its changelog
    confirmation = {"request_id": req.request_id, "ts": now_ms, "partition": part, **counts}
    topic = w.settings.topic("forget-confirmations")
    sent = await w.app.producer.send(
        topic, req.request_id.encode(), json.dumps(confirmation).encode(), part, None, None
    )
    await sent
    w.metrics.forget_requests.inc()
    log.info(
        "forgot user %s on partition %d: interest %d, freqcap %d, pending %d record(s)",
        user, part, counts["interest"], counts["freqcap"], counts["pending"],
    )  # fmt: skip


def wire(w: Wiring, join: JoinStage | None, caps: ChangelogBuffer | None = None) -> None:
    @w.app.agent(w.forget_requests)
    async def forget_requests(stream: Any) -> None:
        async for event in stream.events():
            m = event.message
            ts_ms = int(m.timestamp * 1000)
            await forget(w, join, Raw(event.value, event.key, m.partition, m.offset, ts_ms), caps)
