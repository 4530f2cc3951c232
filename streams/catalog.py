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


def check_catalog_record(
    key: bytes | None, value: bytes, dim: int | None = None, text_check: TextCheck | None = None
) -> tuple[str, str] | None:
    """``(reason, message)`` for an ad-catalog record the catalog refuses, else None.

    Beyond the schema: the key must be the ad id (the topic is compacted by it),
    and an embedding must have the model's dimension ``dim``: one ad of another
    dimension would otherwise stop every catalog rebuild. With ``text_check`` (the worker
    embeds ad text), an ad to be embedded from its text must have a text it can embed.
    """
    if len(value) > CATALOG_MAX_BYTES:
        return "too_large", f"{len(value)} bytes > limit {CATALOG_MAX_BYTES}"
    ad, why = parse_json(value)
    if why is not None:
        return "invalid_json", why
    try:
        problem = first_error("ad-catalog", ad)
    except RecursionError:
        problem = "nested too deeply to validate"
    if problem is not None:
        return "schema", problem
    if key != ad["ad_id"].encode():
        return "key_mismatch", f"key {key!r:.80} differs from ad_id {ad['ad_id']!r:.80}"
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
        version = self.table.version
        if version == self._version:
            return None
        ads, fresh = [], []
        parsed: _Parsed = {}
        for key, value in self.table.data.items():
            if is_seal(key) or value is None:
                continue
            seen = self._parsed.get(key)  # validate only what changed since the last refresh
            if seen is not None and seen[0] == value:
                ad = seen[1]
            else:
                ad = self._parse(key, value)
                if ad is not None:
                    fresh.append(ad)
            parsed[key] = (value, ad)
            if ad is not None:
                ads.append(ad)
        return _Staged(version, ads, parsed, fresh)

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
