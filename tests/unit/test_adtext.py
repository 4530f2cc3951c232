"""The worker's ad text embedder without a broker: cache by text hash, fill, refusal at start."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from adpulse.core.errors import ConfigError
from adpulse.core.metrics import Metrics
from adpulse.core.settings import Settings
from scoring.featurespec import FeatureSpec
from streams.adtext import AdTextEmbedder
from streams.catalog import CatalogCache
from streams.catalogmirror import catalog_mirror

pytestmark = pytest.mark.long  # the text model, 12 s to build: make test stays under 10 min

pytest.importorskip("torch")  # the text_model fixture exports with it


def embedder(text_model: Path, data_dir: Path) -> AdTextEmbedder:
    s = Settings(text_model=str(text_model), device="cpu", data_dir=data_dir)
    e = AdTextEmbedder.from_settings(s)
    assert e is not None
    e.metrics = Metrics.create()
    return e


def counted(e: AdTextEmbedder, source: str) -> float:
    assert e.metrics is not None
    return float(e.metrics.ad_text_embeddings.labels(source)._value.get())


def test_a_known_text_comes_from_the_cache_even_after_a_restart(
    text_model: Path, tmp_path: Path
) -> None:
    e = embedder(text_model, tmp_path)
    first = e.embed(["Cheap running shoes", "Discount sneakers", "Cheap running shoes"])
    assert first.shape == (3, 64) and counted(e, "model") == 2  # one run per distinct text
    np.testing.assert_array_equal(first[0], first[2])
    e.close()
    again = embedder(text_model, tmp_path)  # a restarted worker: same RocksDB directory
    np.testing.assert_array_equal(again.embed(["Discount sneakers"])[0], first[1])
    assert counted(again, "model") == 0 and counted(again, "cache") == 1
    again.close()


def test_fill_embeds_only_ads_with_text_and_no_embedding(text_model: Path, tmp_path: Path) -> None:
    e = embedder(text_model, tmp_path)
    given = [0.125] * 64
    ads = [{"ad_id": "a", "text": "Cheap running shoes"}, {"ad_id": "b"},
           {"ad_id": "c", "text": "Sneakers", "embedding": given}]  # fmt: skip
    e.fill(ads)
    assert len(ads[0]["embedding"]) == 64
    assert np.isclose(np.linalg.norm(ads[0]["embedding"]), 1.0, atol=1e-5)
    assert "embedding" not in ads[1] and ads[2]["embedding"] == given
    e.close()


def test_a_worker_refuses_a_model_whose_files_differ_from_the_manifest(
    text_model: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "model"
    shutil.copytree(text_model, copy)
    with (copy / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    s = Settings(text_model=str(copy), device="cpu", data_dir=tmp_path / "data")
    with pytest.raises(ConfigError, match=r"^ADPULSE_TEXT_MODEL: .*model.onnx: sha256 differs"):
        AdTextEmbedder.from_settings(s)
    assert AdTextEmbedder.from_settings(Settings(text_model="")) is None  # off by default


def test_the_catalog_serves_the_vector_of_each_ads_current_text(
    text_model: Path, tmp_path: Path
) -> None:
    """Mirror -> catalog refresh -> the scorer's ad rows, as a worker runs them (no broker)."""
    e = embedder(text_model, tmp_path)
    s = Settings()
    mirror = catalog_mirror(s, s.dim, e.check)
    cache = CatalogCache(mirror, FeatureSpec.from_settings(s), Metrics.create(), e.fill)

    def put(text: str) -> None:
        ad = {"ad_id": "a1", "campaign_id": "c", "category_id": 7, "bid": 1.0,
              "daily_budget": 10.0, "targeting": {}, "text": text}  # fmt: skip
        mirror.apply(b"a1", json.dumps(ad).encode())

    def served() -> np.ndarray:
        catalog = cache.get()
        assert catalog is not None
        return catalog.index.embedding[catalog.index.row["a1"]]

    put("Cheap running shoes")
    assert cache.refresh()
    np.testing.assert_allclose(served(), e.embed(["Cheap running shoes"])[0], atol=1e-6)
    put("Wireless headphones")
    assert cache.refresh()
    np.testing.assert_allclose(served(), e.embed(["Wireless headphones"])[0], atol=1e-6)
    put("   ")  # refused by the mirror: the ad keeps its last valid text
    assert not cache.refresh()
    np.testing.assert_allclose(served(), e.embed(["Wireless headphones"])[0], atol=1e-6)
    e.close()
