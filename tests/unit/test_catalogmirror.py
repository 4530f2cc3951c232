"""The catalog mirror's record rules: valid ads in, invalid ones skipped, tombstones out."""

from __future__ import annotations

import json

from adpulse.catalogtool import synthetic_ads
from adpulse.core.settings import Settings
from streams.catalogmirror import catalog_mirror
from streams.runtime.seal import SEAL_KEY


def ad_bytes(i: int) -> tuple[bytes, bytes]:
    ad = synthetic_ads(i + 1, [1, 2, 3], seed=5)[i]
    return ad["ad_id"].encode(), json.dumps(ad).encode()


def test_valid_ads_enter_and_each_change_moves_the_version_once() -> None:
    m = catalog_mirror(Settings(), dim=None)
    key, value = ad_bytes(0)
    m.apply(key, value)
    assert m.data == {key: value} and m.version == 1
    m.apply(key, value)  # a redelivery changes nothing
    assert m.version == 1


def test_an_invalid_record_leaves_the_ads_last_valid_version() -> None:
    m = catalog_mirror(Settings(), dim=None)
    key, value = ad_bytes(0)
    m.apply(key, value)
    m.apply(key, b"{not json")
    m.apply(b"other-id", value)  # key differs from ad_id
    assert m.data == {key: value} and m.version == 1


def test_a_tombstone_removes_the_ad_and_the_seal_is_ignored() -> None:
    m = catalog_mirror(Settings(), dim=None)
    key, value = ad_bytes(1)
    m.apply(key, value)
    m.apply(SEAL_KEY, None)
    m.apply(None, value)
    assert m.version == 1
    m.apply(key, None)
    assert m.data == {} and m.version == 2
