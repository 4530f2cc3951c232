"""The worker's view of the ad catalog: rebuilt from the catalog mirror when it changes.

Every worker reads the compacted ad-catalog topic itself (streams/catalogmirror.py);
the decision stage reads the :class:`Catalog` arrays built from that copy. A
refresh runs on a short timer and only when the copy has changed since the last
one, so updates and tombstones take effect within one timer period
(``CATALOG_REFRESH_S``) of reaching the worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

from adpulse.core.metrics import Metrics
from schemas import first_error
from scoring.catalog import Catalog
from scoring.featurespec import FeatureSpec
from streams.runtime.seal import is_seal
from streams.validate import parse_json

log = logging.getLogger(__name__)
CATALOG_REFRESH_S = 0.25


CATALOG_MAX_BYTES = 64 * 1024  # a schema-valid ad (1024-float embedding, 2000-char text) fits
TextCheck = Callable[[str], "tuple[str, str] | None"]  # streams/adtext.py: AdTextEmbedder.check
Embed = Callable[[list[dict[str, Any]]], None]  # fills "embedding" from "text", in place


def check_compacted(
    topic: str, id_field: str, key: bytes | None, value: bytes, max_bytes: int
) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
    """A record of a compacted catalog topic (ad-catalog, item-catalog) and why it is
    refused, if it is: too large, not JSON, against the schema, or keyed by another id
    than its ``id_field`` (compaction would keep the wrong copy)."""
    if len(value) > max_bytes:
        return None, ("too_large", f"{len(value)} bytes > limit {max_bytes}")
    record, why = parse_json(value)
    if why is not None:
        return None, ("invalid_json", why)
    try:
        problem = first_error(topic, record)
    except RecursionError:
        problem = "nested too deeply to validate"
    if problem is not None:
        return None, ("schema", problem)
    if key != record[id_field].encode():
        return None, ("key_mismatch", f"key {key!r:.80} differs from {id_field} "
                                      f"{record[id_field]!r:.80}")  # fmt: skip
    return record, None


def check_catalog_record(
    key: bytes | None, value: bytes, dim: int | None = None, text_check: TextCheck | None = None
) -> tuple[str, str] | None:
    """``(reason, message)`` for an ad-catalog record the catalog refuses, else None.

    Beyond the schema: the key must be the ad id (the topic is compacted by it),
    and an embedding must have the model's dimension ``dim``: one ad of another
    dimension would otherwise stop every catalog rebuild. With ``text_check`` (the worker
    embeds ad text), an ad to be embedded from its text must have a text it can embed.
    """
    ad, refused = check_compacted("ad-catalog", "ad_id", key, value, CATALOG_MAX_BYTES)
    if ad is None:
        return refused
    if dim is not None and "embedding" in ad and len(ad["embedding"]) != dim:
        n = len(ad["embedding"])
        return "embedding_dim", f"embedding has {n} values, the model expects dim={dim}"
    if text_check is not None and "embedding" not in ad and "text" in ad:
        return text_check(ad["text"])
    return None


_Parsed = dict[bytes, tuple[bytes, dict[str, Any] | None]]


class _Staged(NamedTuple):
    version: int
    ads: list[dict[str, Any]]
    parsed: _Parsed  # key -> (value, ad): the next refresh re-parses only what changed
    fresh: list[dict[str, Any]]  # ads parsed in this refresh: the ones to embed


def stage_changes(
    table: Any,
    seen_version: int,
    before: _Parsed,
    parse: Callable[[bytes, bytes], dict[str, Any] | None],
) -> _Staged | None:
    """A mirror's records if it moved since ``seen_version``, else None; only records whose
    bytes changed since ``before`` are parsed again, and they are the ``fresh`` ones (to
    embed). Shared by the ad catalog and the item catalog (streams/items.py)."""
    version = table.version
    if version == seen_version:
        return None
    records, fresh = [], []
    parsed: _Parsed = {}
    for key, value in table.data.items():
        if is_seal(key) or value is None:
            continue
        seen = before.get(key)  # validate only what changed since the last refresh
        if seen is not None and seen[0] == value:
            record = seen[1]
        else:
            record = parse(key, value)
            if record is not None:
                fresh.append(record)
        parsed[key] = (value, record)
        if record is not None:
            records.append(record)
    return _Staged(version, records, parsed, fresh)


class CatalogCache:
    def __init__(
        self, table: Any, spec: FeatureSpec, metrics: Metrics, embed: Embed | None = None
    ) -> None:
        self.table = table
        self.embed = embed  # ads with text and no embedding get one (streams/adtext.py)
        self.spec = spec
        self.metrics = metrics
        self._version = -1
        self._catalog: Catalog | None = None
        self._parsed: _Parsed = {}  # key -> value, ad

    def get(self) -> Catalog | None:
        return self._catalog

    def refresh(self) -> bool:
        """Rebuild if the table moved; True when a new catalog is in force."""
        staged = self._stage()
        if staged is None:
            return False
        if staged.fresh and self.embed is not None:
            self.embed(staged.fresh)
        return self._install(staged)

    async def refresh_async(self) -> bool:
        """:meth:`refresh` with the text encoder off the event loop (tens of ms per batch
        on CPU); reading the mirror and installing the catalog stay on the loop."""
        staged = self._stage()
        if staged is None:
            return False
        if staged.fresh and self.embed is not None:
            await asyncio.to_thread(self.embed, staged.fresh)
        return self._install(staged)

    def _stage(self) -> _Staged | None:
        """The table's ads if it moved since the last install, else None."""
        return stage_changes(self.table, self._version, self._parsed, self._parse)

    def _install(self, staged: _Staged) -> bool:
        version, ads, self._parsed = staged.version, staged.ads, staged.parsed
        try:
            catalog = Catalog(ads, self.spec)
        except ValueError as exc:  # e.g. an embedding of the wrong dimension
            log.error("catalog not rebuilt, the previous one stays in force: %s", exc)
            self._version = version
            return False
        self._catalog, self._version = catalog, version
        self.metrics.catalog_ads.set(len(catalog))
        return True

    def _parse(self, key: bytes, value: bytes) -> dict[str, Any] | None:
        problem: str | None
        try:
            ad = json.loads(value)
        except ValueError:
            ad, problem = None, "not JSON"
        else:
            problem = first_error("ad-catalog", ad)
        if problem is None and ad.get("ad_id", "").encode() != key:
            problem = f"key {key!r} differs from ad_id {ad.get('ad_id')!r}"
        if problem is not None:
            self.metrics.catalog_invalid.inc()
            log.warning("skipping catalog record %r: %s", key[:64], problem)
            return None
        return dict(ad)
