"""What each topic is: its schema, message type, key and retention, in one table.

Partition counts are deliberately absent: topics joined on the same key
(user-events, ad-requests, ad-decisions) must have the same count, so it is one
setting for the deployment, not a per-topic fact of the contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from schemas.messages import MESSAGES

DAY_MS = 24 * 60 * 60 * 1000
WEEK_MS = 7 * DAY_MS


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One topic of the contract.

    ``key_field`` names the payload field whose value is the message key (None:
    unkeyed, round-robin). ``retention_ms`` None means keep forever (Kafka
    ``retention.ms=-1``). ``broker_time``: the broker stamps each record
    (``message.timestamp.type=LogAppendTime``), because the abuse rules count by
    that time and a producer can set a CreateTime to anything (scoring/abuse.py).
    """

    name: str
    schema_file: str
    message: type[msgspec.Struct]  # schemas/messages.py
    key_field: str | None
    compacted: bool
    retention_ms: int | None
    description: str
    broker_time: bool = False

    def configs(self) -> dict[str, str]:
        """Kafka topic configs beyond partitions, retention and cleanup."""
        return {"message.timestamp.type": "LogAppendTime"} if self.broker_time else {}


def _spec(
    name: str,
    key_field: str | None,
    description: str,
    *,
    compacted: bool = False,
    retention_ms: int | None = WEEK_MS,
    broker_time: bool = False,
) -> TopicSpec:
    return TopicSpec(
        name=name,
        schema_file=f"{name}.schema.json",
        message=MESSAGES[name],
        key_field=key_field,
        compacted=compacted,
        retention_ms=retention_ms,
        description=description,
        broker_time=broker_time,
    )


TOPICS: dict[str, TopicSpec] = {
    spec.name: spec
    for spec in (
        _spec(
            "user-events",
            "user_id",
            "User actions (browse, click, cart, fav, purchase); input of the interest state.",
            broker_time=True,
        ),
        _spec(
            "ad-requests",
            "user_id",
            "Pages asking for an ad; co-partitioned with user-events so interest is local.",
        ),
        _spec(
            "ad-decisions",
            "user_id",
            "One answer per request with pctr and propensity; joined with clicks by user.",
        ),
        _spec(
            "ctr-feedback",
            "ad_id",
            "Labelled decisions with their feature snapshot; one writer per ad's learner.",
        ),
        _spec(
            "ad-catalog",
            "ad_id",
            "Current state of every ad; compacted, a null value deletes the ad.",
            compacted=True,
            retention_ms=None,
        ),
        _spec(
            "item-catalog",
            "item_id",
            "Current title, category and price of every item; compacted, a null value deletes.",
            compacted=True,
            retention_ms=None,
        ),
        _spec(
            "dead-letters",
            None,
            "Refused messages with origin and reason, for an operator to fix and replay.",
        ),
        _spec(
            "forget-requests",
            "user_id",
            "Delete one user's state by tombstones; keyed by the raw user id (user's partition).",
        ),
        _spec(
            "forget-confirmations",
            "request_id",
            "A forget request applied; on the request's partition number, no user id.",
        ),
    )
}
