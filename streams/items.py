"""Items embedded on arrival: every worker mirrors item-catalog and embeds each item's title.

Active only with a text encoder (``ADPULSE_TEXT_MODEL``). Items take the ads' way
(streams/catalogmirror.py, streams/adtext.py): every worker reads all of the
compacted ``item-catalog`` itself, validates each record with one rule
(:func:`check_item_record`; the partition owner dead-letters what it refuses,
stage ``items``, and every mirror skips it, so the item keeps its last valid
version), and embeds each title through the same :class:`AdTextEmbedder`: the
same RocksDB cache by text hash, the same refusals (``text_empty``,
``text_too_long``, ``text_not_utf8``), the same projection into ``ADPULSE_DIM``.

The vectors are not written into anyone's state: the interest state keeps each
item's decayed weight and the vector in force is looked up when the interest is
read (scoring/itemspace.py), so an item published after its events still counts,
a changed title changes every user's vector at once, and a deleted item falls
back to its category vector.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from scoring.embeddings import HashedEmbeddings
from scoring.itemspace import ItemVectors
from streams.catalog import TextCheck, check_compacted, stage_changes
from streams.catalogmirror import TopicMirror

if TYPE_CHECKING:
    from adpulse.core.settings import Settings
    from streams.adtext import AdTextEmbedder

log = logging.getLogger(__name__)
ITEM_MAX_BYTES = 16 * 1024  # a schema-valid item (2000-character title, 4 bytes a character) fits
INT64_MAX = 2**63 - 1


def check_item_record(
    key: bytes | None, value: bytes, text_check: TextCheck | None = None
) -> tuple[str, str] | None:
    """``(reason, message)`` for an item-catalog record the workers refuse, else None.

    Beyond the schema: the key must be the item id, the id must fit user-events'
    int64 ``item_id`` (the schema's pattern allows 19 digits), and with ``text_check``
    the title must be one the encoder can embed.
    """
    item, refused = check_compacted("item-catalog", "item_id", key, value, ITEM_MAX_BYTES)
    if item is None:
        return refused
    if int(item["item_id"]) > INT64_MAX:
        return "item_id_range", f"item_id {item['item_id']} is above {INT64_MAX}"
    if text_check is not None:
        return text_check(item["title"])
    return None


def item_mirror(settings: Settings, text_check: TextCheck | None) -> TopicMirror:
    """item id -> latest valid item-catalog record (JSON bytes)."""
    return TopicMirror(
        settings,
        settings.topic("item-catalog"),
        "items",
        lambda key, value: check_item_record(key, value, text_check) is None,
    )


class ItemCache:
    """The item vectors in force, rebuilt from the mirror when it changes (like the ads')."""

    def __init__(self, mirror: TopicMirror, embedder: AdTextEmbedder, settings: Settings) -> None:
        self.mirror = mirror
        self.embedder = embedder
        self.table = HashedEmbeddings(settings.dim, settings.embedding_seed)
        self.mix = settings.category_mix
        self._version = -1
        self._parsed: dict[bytes, tuple[bytes, dict[str, Any] | None]] = {}
        self._rows: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}  # id -> cat, text, delta
        self._vectors: ItemVectors | None = None

    def get(self) -> ItemVectors | None:
        return self._vectors

    def refresh(self) -> bool:
        """Rebuild if the mirror moved (titles embedded on this thread); True when rebuilt."""
        staged = stage_changes(self.mirror, self._version, self._parsed, _parse)
        if staged is None:
            return False
        self._install(staged.version, staged.ads, staged.parsed, self._embed(staged.fresh))
        return True

    async def refresh_async(self) -> bool:
        """:meth:`refresh` with the encoder off the event loop, as the ad catalog's."""
        staged = stage_changes(self.mirror, self._version, self._parsed, _parse)
        if staged is None:
            return False
        fresh = await asyncio.to_thread(self._embed, staged.fresh)
        self._install(staged.version, staged.ads, staged.parsed, fresh)
        return True

    def _embed(self, fresh: list[dict[str, Any]]) -> ItemVectors | None:
        if not fresh:
            return None
        ids = [int(item["item_id"]) for item in fresh]
        cats = [int(item["category_id"]) for item in fresh]
        text = self.embedder.embed([item["title"] for item in fresh])
        return ItemVectors.build(ids, cats, text, self.table, self.mix)

    def _install(
        self,
        version: int,
        items: list[dict[str, Any]],
        parsed: dict[bytes, tuple[bytes, dict[str, Any] | None]],
        fresh: ItemVectors | None,
    ) -> None:
        if fresh is not None:
            for i, item_id in enumerate(fresh.ids.tolist()):
                self._rows[item_id] = (int(fresh.cats[i]), fresh.text[i], fresh.delta[i])
        live = {int(item["item_id"]) for item in items}
        self._rows = {k: v for k, v in self._rows.items() if k in live}  # tombstones
        ids = np.array(sorted(self._rows), dtype=np.int64)
        rows = [self._rows[i] for i in ids.tolist()]
        dim = self.table.dim
        self._vectors = ItemVectors(
            ids,
            np.array([r[0] for r in rows], dtype=np.int64),
            np.stack([r[1] for r in rows]) if rows else np.zeros((0, dim), np.float32),
            np.stack([r[2] for r in rows]) if rows else np.zeros((0, dim), np.float32),
            self.table,
            self.mix,
        )
        self._version, self._parsed = version, parsed
        log.debug("item vectors in force: %d", len(ids))


def _parse(key: bytes, value: bytes) -> dict[str, Any] | None:
    """The mirror holds only records :func:`check_item_record` accepted."""
    item, _ = check_compacted("item-catalog", "item_id", key, value, ITEM_MAX_BYTES)
    return item
