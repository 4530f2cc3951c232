"""The GPU check: the scorer on CUDA against CPU, on the machine the ``device`` tool lends.

Run there as one short command (it needs only numpy and onnxruntime with its CUDA
provider, no broker, no Faust)::

    PYTHONPATH=. python3 -m adpulse.bench.gpucheck --out "$OUT"

It prints the ONNX Runtime providers the machine offers, then, for the packaged
model, rows/s of the same session on CUDA and on CPU (same inputs, interleaved,
median of ``--repeats``) per batch size up to 65,536 rows: on a GPU, large
micro-batches (``POST /decide`` gathering concurrent requests into one run) are
what pays, and this shows from which batch size. ``gpucheck.json`` under
``--out`` holds the figures. Without a CUDA provider it says so on one line and
exits 0 after the CPU figures: CI never depends on it.

With ``--text-model DIR`` (an ``adpulse models text`` output, or a folder with only
``model.fp16.onnx`` and ``tokenizer.json``: the device tool carries at most 64 MiB), it
also times the ad-text encoder: texts/s of every graph the folder holds, on CPU and on
CUDA, same texts, in batches as the worker runs them (int8 one text a run)::

    mkdir -p var/gpu-text && cp ~/.cache/adpulse/models/text-*/model.fp16.onnx \
        ~/.cache/adpulse/models/text-*/tokenizer.json var/gpu-text/
    PYTHONPATH=. python3 -m adpulse.bench.gpucheck --text-model var/gpu-text --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from adpulse.bench import machine
from scoring.featurespec import FeatureSpec
from scoring.registry import MODEL, PACKAGED, SPEC
from scoring.scorer import CUDA, OnnxScorer
from scoring.textencoder import FP16_FILE, FP32_FILE, INT8_FILE, TextEncoder

BATCHES = (256, 1024, 4096, 16384, 65536)
TEXT_GRAPHS = {"fp32": FP32_FILE, "fp16": FP16_FILE, "int8": INT8_FILE}
# Ad copy of the lengths the catalog carries: short titles to a 60-word description, with
# Chinese (its tokens are characters: longer sequences for the same length).
_WORDS = [
    "lightweight",
    "running",
    "shoes",
    "free",
    "delivery",
    "today",
    "only",
    "new",
    "season",
    "sale",
    "on",
    "phones",
    "smart",
    "watch",
    "discount",
    "family",
    "holiday",
    "deals",
    "organic",
    "coffee",
    "beans",
    "subscription",
]
_HANZI = "限时特价轻便跑步鞋全场包邮新款智能手机八折优惠仅限今天北京烤鸭外卖三十分钟送达"


def bench_texts(n: int, seed: int = 7) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 4 == 3:
            out.append("".join(rng.choice(list(_HANZI), int(rng.integers(8, 60)))))
        else:
            out.append(" ".join(rng.choice(_WORDS, int(rng.integers(3, 60)))))
    return out


def _rows_per_s(
    scorer: OnnxScorer, x: dict[str, np.ndarray], seconds: float
) -> tuple[float, int]:
    """(rows/s, batches timed): at least one timed batch, however short ``seconds`` is."""
    scorer.score(x)  # warm-up: the first CUDA run builds its kernels
    start = time.perf_counter()
    rows, batches = len(scorer.score(x)), 1
    while (elapsed := time.perf_counter() - start) < seconds:
        rows += len(scorer.score(x))
        batches += 1
    return rows / elapsed, batches


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m adpulse.bench.gpucheck")
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--text-model", type=Path, default=None, help="also time the text encoder")
    a = ap.parse_args(argv)
    available = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}, providers {available}", flush=True)
    version = sorted(p for p in PACKAGED.iterdir() if (p / MODEL).is_file())[-1]
    spec = FeatureSpec.from_json((version / SPEC).read_text(encoding="utf-8"))
    scorers = {"cpu": OnnxScorer(version / MODEL, version=version.name, device="cpu")}
    cuda = OnnxScorer(version / MODEL, version=version.name, device="cuda")
    if cuda.provider == CUDA:
        scorers["cuda"] = cuda
    else:  # no CUDA provider in this build, or no GPU: the session fell back
        print(f"no CUDA session here ({cuda.provider}): CPU figures only", flush=True)
    rates: dict[str, dict[str, list[float]]] = {k: {} for k in scorers}
    timed: dict[str, dict[str, int]] = {k: {} for k in scorers}  # batches behind each figure
    for b in BATCHES:
        x = spec.golden_inputs(b, seed=b)
        for _ in range(a.repeats):
            for name, scorer in scorers.items():
                rate, batches = _rows_per_s(scorer, x, a.seconds)
                rates[name].setdefault(str(b), []).append(rate)
                timed[name][str(b)] = timed[name].get(str(b), 0) + batches
        line = ", ".join(f"{k} {np.median(v[str(b)]):,.0f}" for k, v in rates.items())
        print(f"batch {b:>6}: rows/s {line}", flush=True)
    result = {
        "providers": available,
        "onnxruntime": ort.__version__,
        "model_version": version.name,
        "rows_per_s": {k: {b: float(np.median(v)) for b, v in r.items()} for k, r in rates.items()},
        "batches_timed": timed,
        "used": {k: s.provider for k, s in scorers.items()},
        "machine": machine(),
    }
    if a.text_model is not None:
        result["text_encoder"] = text_rates(a.text_model, a.seconds, a.repeats)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpucheck.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


def text_rates(model_dir: Path, seconds: float, repeats: int) -> dict[str, dict[str, float]]:
    """texts/s per graph and device (median of ``repeats``), runs interleaved."""
    encoders: dict[str, TextEncoder] = {}
    for name, file in TEXT_GRAPHS.items():
        if not (model_dir / file).is_file():
            continue
        for device in ("cpu", "cuda"):
            if name == "int8" and device == "cuda":
                continue  # int8 graphs are for CPU (docs/evaluation.md, "Ad text encoder")
            enc = TextEncoder(model_dir / file, device=device, threads=0)
            if device == "cuda" and enc.provider != CUDA:
                continue  # no CUDA here: that session fell back to CPU
            encoders[f"{name} {device}"] = enc
    texts = bench_texts(512)
    rates: dict[str, list[float]] = {k: [] for k in encoders}
    for _ in range(repeats):
        for key, enc in encoders.items():
            enc.encode(texts[:64])  # warm-up
            n, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds:
                n += len(enc.encode(texts[n % 448 : n % 448 + 64]))
            rates[key].append(n / elapsed)
    out: dict[str, dict[str, float]] = {}
    for key, r in rates.items():
        graph, device = key.split()
        out.setdefault(device, {})[graph] = float(np.median(r))
        print(f"text encoder {graph} on {device}: {np.median(r):,.0f} texts/s", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
