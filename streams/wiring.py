"""What the handlers need from the app, handed to them explicitly: one typed record.

Built once by :func:`streams.app.create_app`; read by streams/pipeline.py (the
handlers), streams/web.py and streams/serve.py. The stages never see it: they get
readers and return results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from streams.runtime.tablewriter import PartitionLocks

if TYPE_CHECKING:
    from faust.types import TableT, TopicT

    from adpulse.core.metrics import Metrics
    from adpulse.core.privacy import Pseudonymiser
    from adpulse.core.settings import Settings
    from streams.adtext import AdTextEmbedder
    from streams.catalogmirror import TopicMirror
    from streams.items import ItemCache
    from streams.runtime.consumer import BatchApp


@dataclass(frozen=True)
class Wiring:
    """The worker's app, topics, tables, mirrors and metrics. Tables hold raw bytes both
    ways: their values are packed records, decoded by the stage that owns them."""

    settings: Settings
    app: BatchApp
    metrics: Metrics
    pseudonyms: Pseudonymiser  # raw user id -> pseudonym (adpulse/core/privacy.py)
    user_events: TopicT
    ad_requests: TopicT
    ad_decisions: TopicT
    ad_catalog: TopicT
    ctr_feedback: TopicT
    forget_requests: TopicT  # erase one user's state (streams/forget.py)
    dead_letters: TopicT
    interest: TableT[bytes, bytes]  # pseudonym -> interest state (scoring.features)
    freqcap: TableT[bytes, bytes]  # pseudonym -> scoring.caps.CapRecord (msgpack)
    spend: TableT[bytes, bytes]  # campaign id -> pacing record (streams/budget.py), per partition
    pending: TableT[bytes, bytes]  # decision id -> scoring.joinstate.Pending (the click join)
    learn: TableT[bytes, bytes]  # ad id -> scoring.strategy.state.AdState, by ctr-feedback
    catalog: TopicMirror  # every ad-catalog record, read by this worker itself
    strategy: TopicMirror  # every learn record, whoever wrote it (streams/catalogmirror.py)
    # Per partition of ``interest``: an ingest batch and a forget exclude each other.
    interest_locks: PartitionLocks = field(default_factory=PartitionLocks)
    adtext: AdTextEmbedder | None = None  # ADPULSE_TEXT_MODEL set: ad text -> embedding
    # ADPULSE_TEXT_MODEL set: item-catalog and its items' title vectors (streams/items.py)
    item_catalog: TopicT | None = None
    items: ItemCache | None = None
    # pseudonym -> last N behaviours (scoring.sequence); None: ADPULSE_SEQUENCE_LENGTH=0
    sequence: TableT[bytes, bytes] | None = None
