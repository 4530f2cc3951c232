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

BATCHES = (256, 1024, 4096, 16384, 65536)


def _rows_per_s(scorer: OnnxScorer, x: dict[str, np.ndarray], seconds: float) -> float:
    scorer.score(x)  # warm-up: the first CUDA run builds its kernels
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        n += len(scorer.score(x))
    return n / elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m adpulse.bench.gpucheck")
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
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
    for b in BATCHES:
        x = spec.golden_inputs(b, seed=b)
        for _ in range(a.repeats):
            for name, scorer in scorers.items():
                rates[name].setdefault(str(b), []).append(_rows_per_s(scorer, x, a.seconds))
        line = ", ".join(f"{k} {np.median(v[str(b)]):,.0f}" for k, v in rates.items())
        print(f"batch {b:>6}: rows/s {line}", flush=True)
    result = {
        "providers": available,
        "onnxruntime": ort.__version__,
        "model_version": version.name,
        "rows_per_s": {k: {b: float(np.median(v)) for b, v in r.items()} for k, r in rates.items()},
        "used": {k: s.provider for k, s in scorers.items()},
        "machine": machine(),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpucheck.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
