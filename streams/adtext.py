"""Ads embedded on arrival: an ad with ``text`` and no ``embedding`` gets one from its text.

Every worker embeds the ads it mirrors itself (streams/catalogmirror.py: each
worker reads all of ad-catalog), so no second topic has to carry vectors and no
rebalance can lose one: the encoder is deterministic on one device, so workers
agree. A text is encoded once per worker: its vector is kept in RocksDB under
``sha256(model file hash, text)``, so a restart, a republished ad with the same
text or another ad with the same copy costs a lookup, while a changed text (a new
hash) is encoded afresh. The cache holds the 384-d model output; the ad gets it
projected into the scorer's ``ADPULSE_DIM`` space (scoring/textencoder.py,
``project``), where the hashed default embeddings live too.

Which texts cannot be embedded is decided once, by :meth:`AdTextEmbedder.check`,
on both paths a record takes: the partition owner dead-letters it (reason
``text_empty``, ``text_too_long`` or ``text_not_utf8``) and every mirror refuses
it, so the ad keeps its last valid version.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adpulse.core.errors import ConfigError
from scoring.textencoder import (
    F32,
    MANIFEST,
    TEXT_DIM,
    TextEncoder,
    check_text,
    manifest_problem,
    project,
)

if TYPE_CHECKING:
    from adpulse.core.metrics import Metrics
    from adpulse.core.settings import Settings

log = logging.getLogger(__name__)
CACHE_DIR = "adtext-cache"


class AdTextEmbedder:
    """Text -> ad vector in the scorer's space, with a RocksDB cache keyed by text hash."""

    def __init__(
        self, encoder: TextEncoder, cache_path: Path, dim: int, seed: int, model_hash: str
    ) -> None:
        import rocksdict  # noqa: PLC0415

        self.encoder = encoder
        self.dim, self.seed = dim, seed
        self._salt = model_hash.encode()  # a new model file never reuses an old vector
        cache_path.mkdir(parents=True, exist_ok=True)
        self._db = rocksdict.Rdict(str(cache_path), rocksdict.Options(raw_mode=True))
        self.metrics: Metrics | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> AdTextEmbedder | None:
        """The worker's embedder, or None when ``ADPULSE_TEXT_MODEL`` is empty; a model
        directory whose files do not match its manifest is refused at startup."""
        if not settings.text_model:
            return None
        model_dir = Path(settings.text_model)
        problem = manifest_problem(model_dir)
        if problem is not None:
            msg = f"ADPULSE_TEXT_MODEL: {problem}"
            raise ConfigError(msg)
        encoder = TextEncoder(model_dir, device=settings.device, threads=settings.scorer_threads,
                              precision=settings.text_precision)  # fmt: skip
        outputs = json.loads((model_dir / MANIFEST).read_text())["outputs"]
        model_hash = str(outputs[encoder.path.name])
        return cls(
            encoder, settings.data_dir / CACHE_DIR, settings.dim, settings.embedding_seed,
            model_hash,
        )  # fmt: skip

    def check(self, text: str) -> tuple[str, str] | None:
        """``(reason, message)`` when the text cannot be embedded (see ``check_text``)."""
        return check_text(text, self.encoder.tokenizer)

    def embed(self, texts: Sequence[str]) -> F32:
        """[len(texts), dim] unit vectors; only texts not in the cache run the model."""
        keys = [hashlib.sha256(self._salt + b"\0" + t.encode()).digest() for t in texts]
        raw = np.zeros((len(texts), TEXT_DIM), dtype=np.float32)
        missing: dict[bytes, list[int]] = {}
        for i, k in enumerate(keys):
            v = self._db.get(k)
            if v is not None and len(v) == TEXT_DIM * 4:
                raw[i] = np.frombuffer(v, dtype=np.float32)
            else:
                missing.setdefault(k, []).append(i)
        if missing:
            firsts = [rows[0] for rows in missing.values()]
            vecs = self.encoder.encode([texts[i] for i in firsts])
            for (k, rows), vec in zip(missing.items(), vecs, strict=True):
                raw[rows] = vec
                self._db[k] = vec.astype(np.float32).tobytes()
        if self.metrics is not None:
            self.metrics.ad_text_embeddings.labels("model").inc(len(missing))
            self.metrics.ad_text_embeddings.labels("cache").inc(len(texts) - len(missing))
        return project(raw, self.dim, self.seed)

    def fill(self, ads: Sequence[dict[str, Any]]) -> None:
        """Give every ad with text and no embedding its text's vector (in place)."""
        todo = [a for a in ads if "embedding" not in a and isinstance(a.get("text"), str)]
        if not todo:
            return
        vecs = self.embed([a["text"] for a in todo])
        for a, v in zip(todo, vecs, strict=True):
            a["embedding"] = v.tolist()

    def close(self) -> None:
        self._db.close()
