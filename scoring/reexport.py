"""Re-export a registry version's ``model.onnx`` from its ``model.pt`` (PyTorch, training extra).

Why: the exported graph can change while the function stays the same (the sequence
model's shared-sequence form, scoring/attention.py). A version keeps its name,
``spec.json`` and ``metrics.json``, since its weights, and so its scores, do not
change; only the graph that computes them does. The new file is verified against
PyTorch exactly as ``adpulse train`` verifies an export (scoring.model.export_onnx,
same tolerance), and against the old file on golden inputs, then renamed over it.

    .venv/bin/python -m scoring.reexport scoring/models/VERSION
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from scoring.featurespec import FeatureSpec
from scoring.registry import CHECKPOINT, MODEL, SPEC
from scoring.scorer import OnnxScorer, SessionOptions


def reexport(version_dir: Path, atol: float = 1e-5) -> tuple[float, float]:
    """(largest ONNX - PyTorch difference, largest new - old ONNX difference on golden rows).

    Raises ``ValueError`` (the old file kept, no temporary left) when the new graph is
    more than ``atol`` from PyTorch or from the old graph: a re-export must not change
    the scores a version serves under its name.
    """
    from scoring.model import export_onnx  # noqa: PLC0415 (train extra: the runtime lacks torch)
    from scoring.online import load_weights  # noqa: PLC0415

    for need in (SPEC, CHECKPOINT, MODEL):
        if not (version_dir / need).is_file():
            msg = f"{version_dir} has no {need}: not a registry version that can be re-exported"
            raise ValueError(msg)
    spec = FeatureSpec.from_json((version_dir / SPEC).read_text(encoding="utf-8"))
    model = load_weights(version_dir / CHECKPOINT, spec)
    tmp = version_dir / f".{MODEL}.new"
    try:
        worst = export_onnx(model, tmp, spec, atol=atol)
        x = spec.golden_inputs(257, seed=5)
        one = SessionOptions(intra_op_threads=1)
        old, new = (OnnxScorer(p, device="cpu", options=one) for p in (version_dir / MODEL, tmp))
        drift = max(float(np.max(np.abs(a - b)))
                    for a, b in zip(old.score_heads(x), new.score_heads(x), strict=True)
                    if a is not None and b is not None)  # fmt: skip
        if not drift <= atol:
            msg = (f"{version_dir / MODEL}: the new graph is {drift:.2g} from the old one on "
                   f"golden rows (allowed {atol:g}): kept the old file")  # fmt: skip
            raise ValueError(msg)
        os.replace(tmp, version_dir / MODEL)
    finally:
        tmp.unlink(missing_ok=True)
    return worst, drift


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scoring.reexport", description=__doc__)
    ap.add_argument("version_dir", type=Path, help="a registry version: model.pt, spec.json")
    a = ap.parse_args(argv)
    try:
        worst, drift = reexport(a.version_dir)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{a.version_dir / MODEL}: within {worst:.2g} of PyTorch, {drift:.2g} of the old graph")
    return 0


if __name__ == "__main__":
    sys.exit(main())
