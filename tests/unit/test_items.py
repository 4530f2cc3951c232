"""The item catalog without a broker: the record rule, and the vectors in force as titles change."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adpulse.core.metrics import Metrics
from adpulse.core.settings import Settings
from streams.adtext import AdTextEmbedder
from streams.items import ITEM_MAX_BYTES, ItemCache, check_item_record, item_mirror


def record(item_id: str = "42", title: str = "Trail running shoes", **extra: object) -> bytes:
    return json.dumps({"item_id": item_id, "title": title, "category_id": 3, **extra}).encode()


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (b"42", record(), None),
        (b"43", record(), "key_mismatch"),
        (b"42", record(price=-1), "schema"),
        (b"042", record("042"), "schema"),  # one item, one key: no leading zeros
        (b"9999999999999999999", record("9999999999999999999"), "item_id_range"),
        (b"42", b"{", "invalid_json"),
        (b"42", record(title="x" * 2000) + b" " * ITEM_MAX_BYTES, "too_large"),
    ],
)
def test_an_item_record_is_refused_with_one_reason(
    key: bytes, value: bytes, reason: str | None
) -> None:
    got = check_item_record(key, value)
    assert (got and got[0]) == reason


@pytest.mark.long  # the text model: make test stays under 10 minutes
def test_the_vectors_in_force_follow_each_items_current_title(
    text_model: Path, tmp_path: Path
) -> None:
    s = Settings(text_model=str(text_model), device="cpu", data_dir=tmp_path)
    e = AdTextEmbedder.from_settings(s)
    assert e is not None
    e.metrics = Metrics.create()
    mirror = item_mirror(s, e.check)
    cache = ItemCache(mirror, e, s)

    def served(item_id: int) -> np.ndarray | None:
        iv = cache.get()
        assert iv is not None
        found, idx = iv._find(np.array([item_id]))
        return iv.text[idx[0]] if found[0] else None

    mirror.apply(b"1", record("1", "Trail running shoes"))
    mirror.apply(b"2", record("2", "Wireless headphones"))
    assert cache.refresh()
    np.testing.assert_allclose(served(1), e.embed(["Trail running shoes"])[0], atol=1e-6)
    mirror.apply(b"1", record("1", "Espresso coffee beans"))  # a changed title
    mirror.apply(b"2", record("2", "   "))  # refused: item 2 keeps its last title
    assert cache.refresh()
    np.testing.assert_allclose(served(1), e.embed(["Espresso coffee beans"])[0], atol=1e-6)
    np.testing.assert_allclose(served(2), e.embed(["Wireless headphones"])[0], atol=1e-6)
    mirror.apply(b"2", None)  # a tombstone: item 2 falls back to its category
    assert cache.refresh()
    assert served(2) is None and served(1) is not None
    assert not cache.refresh()  # nothing moved
    e.close()
