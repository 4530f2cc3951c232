"""``adpulse bench seq-scorer``: what the attention block costs the scorer, in one run.

Two CTR nets of the shipped architecture, one without and one with target
attention over ``length`` behaviours (scoring/attention.py), are exported side
by side (untrained: speed does not depend on the weights). Per repeat, the two
are measured interleaved, so both see the same machine load:

* the bare ONNX Runtime session's rows/s at each batch size (100: one request's
  candidates; 8,192: what ``POST /decide`` gathers under load, issue 16 item 7),
  every row with a full sequence: the block's worst case;
* the worker's decision call (:class:`adpulse.bench.decisionpath.DecisionPath`:
  targeting, caps, pacing, feature assembly with the users' sequences read and
  embedded, ONNX Runtime, policy) on 100-candidate requests, one per call and
  8 per call: rows/s.

On the GPU machine, with models exported here first (``--export DIR``; it needs
PyTorch, the device machine only ONNX Runtime)::

    PYTHONPATH=. python3 -m adpulse.bench.seqscorer --models DIR --device cuda --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from adpulse.bench import machine, machine_line
from adpulse.bench.decisionpath import DecisionPath, request_bodies
from adpulse.catalogtool import synthetic_ads
from adpulse.core.settings import Settings
from adpulse.workload import Workload, WorkloadModel
from scoring.featurespec import FeatureSpec
from scoring.registry import MODEL, SPEC
from scoring.scorer import Device, OnnxScorer, SessionOptions

KINDS = ("plain", "sequence")
BATCHES = (100, 8192)
CALLS = (1, 8)  # requests per decision call
CANDIDATES = 100


@dataclass(frozen=True)
class SeqScorerBench:
    """The sizes ``adpulse bench seq-scorer`` and ``python -m adpulse.bench.seqscorer`` take."""

    length: int = 50  # behaviours per user
    seconds: float = 1.0  # per measured point
    repeats: int = 3


def export_models(out: Path, spec: FeatureSpec, length: int) -> Path:
    """``out/plain/v1`` and ``out/sequence/v1``: registries of one version each."""
    import torch  # noqa: PLC0415 (training extra)

    from scoring.model import CtrNet, export_onnx  # noqa: PLC0415

    for kind, s in zip(KINDS, (spec, replace(spec, sequence=length)), strict=True):
        torch.manual_seed(0)
        d = out / kind / "v1"
        export_onnx(CtrNet(s), d / MODEL, s)
        (d / SPEC).write_text(s.to_json() + "\n", encoding="utf-8")
    return out


def _rate(fn: Callable[[], int], seconds: float) -> float:
    fn()  # warm up
    rows, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        rows += fn()
    return rows / elapsed


def _scoring(scorer: OnnxScorer, x: dict[str, np.ndarray]) -> Callable[[], int]:
    return lambda: len(scorer.score(x))


def run(
    models: Path,
    settings: Settings | None = None,
    *,
    device: Device = "cpu",
    seconds: float = 1.0,
    repeats: int = 3,
    users: int = 2_000,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Rows/s of both models, bare and on the decision path (medians of ``repeats``)."""
    s = (settings or Settings.from_env({})).with_(pseudonymise=False, partitions=1,
                                                   policy="greedy", device=device)  # fmt: skip
    specs = {k: FeatureSpec.from_json((models / k / "v1" / SPEC).read_text()) for k in KINDS}
    length = specs["sequence"].sequence
    opts = SessionOptions(intra_op_threads=s.scorer_threads)
    scorers = {k: OnnxScorer(models / k / "v1" / MODEL, device=device, options=opts) for k in KINDS}
    workload = Workload(WorkloadModel(), users=users, seed=2)
    ads = synthetic_ads(1_000, workload.columns(20_000)["category"].tolist(), seed=3)
    _, events = workload.payloads(20 * users, int(time.time() * 1000), prefix="warm")
    paths = {
        k: DecisionPath.build(ads, events, s.with_(model_dir=str(models / k), sequence_length=n))
        for k, n in (("plain", 0), ("sequence", length))
    }
    bodies = request_bodies([a["ad_id"] for a in ads], users, CANDIDATES, 2_000, 5, "seq")
    bare: dict[str, dict[str, list[float]]] = {k: {str(b): [] for b in BATCHES} for k in KINDS}
    path: dict[str, dict[str, list[float]]] = {k: {str(c): [] for c in CALLS} for k in KINDS}
    for _ in range(repeats):
        for b in BATCHES:
            for k in KINDS:
                x = specs[k].golden_inputs(b, seed=b)
                if "seq" in x:  # every row's sequence full: the block's worst case
                    x["seq"] = specs[k].golden_inputs(b, seed=b + 1)["seq"]
                    x["seq"][:] = np.where(x["seq"].any(axis=2, keepdims=True), x["seq"], 1 / 8)
                bare[k][str(b)].append(_rate(_scoring(scorers[k], x), seconds))
                log(f"{k:>8} batch {b:>5}: {bare[k][str(b)][-1]:>12,.0f} rows/s")
        for c in CALLS:
            for k in KINDS:
                turn = iter(range(0, len(bodies) - c, c))

                def once(k: str = k, c: int = c, turn: Iterator[int] = turn) -> int:
                    i = next(turn, None)
                    return 0 if i is None else paths[k].decide(bodies[i : i + c])

                path[k][str(c)].append(_rate(once, seconds))
                log(f"{k:>8} path, {c} request(s) a call: {path[k][str(c)][-1]:>10,.0f} rows/s")
    return {
        "device": device,
        "provider": scorers["sequence"].provider,
        "length": length,
        "candidates": CANDIDATES,
        "repeats": repeats,
        "seconds_per_point": seconds,
        "threads": s.scorer_threads,
        "rows_per_s": {k: _medians(v) for k, v in bare.items()},
        "path_rows_per_s": {k: _medians(v) for k, v in path.items()},
        "machine": machine(),
    }


def _medians(d: dict[str, list[float]]) -> dict[str, float]:
    return {k: round(float(np.median(v))) for k, v in d.items()}


def format_table(r: dict[str, Any]) -> str:
    """Markdown: rows/s without and with the block, bare session and decision path."""
    lines = [
        f"The scorer with and without target attention over {r['length']} behaviours, "
        f"{r['provider']}, {r['threads']} thread(s), {machine_line(r['machine'])}, "
        f"median of {r['repeats']}",
        "",
        "| what | plain rows/s | sequence rows/s | sequence / plain |",
        "|---|---:|---:|---:|",
    ]
    for key, label in (("rows_per_s", "session, batch {}"), ("path_rows_per_s",
                       "decision call, {} request(s) of 100 candidates")):  # fmt: skip
        for b, plain in r[key]["plain"].items():
            seq = r[key]["sequence"][b]
            lines.append(f"| {label.format(b)} | {plain:,} | {seq:,} | {seq / max(1, plain):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m adpulse.bench.seqscorer")
    ap.add_argument("--models", type=Path, help="exported models (default: export them now)")
    ap.add_argument("--export", type=Path, help="only export the two models to this folder")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    cfg = SeqScorerBench()
    ap.add_argument("--length", type=int, default=cfg.length)
    ap.add_argument("--seconds", type=float, default=cfg.seconds)
    ap.add_argument("--repeats", type=int, default=cfg.repeats)
    ap.add_argument("--out", type=Path, help="write seqscorer.json here")
    a = ap.parse_args(argv)
    spec = FeatureSpec.from_settings(Settings.from_env({}))
    if a.export:
        export_models(a.export, spec, a.length)
        return 0
    with tempfile.TemporaryDirectory(prefix="adpulse-seqbench-") as tmp:
        models = a.models or export_models(Path(tmp), spec, a.length)
        r = run(models, device=a.device, seconds=a.seconds, repeats=a.repeats,
                log=lambda m: print(m, flush=True))  # fmt: skip
    print(format_table(r))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "seqscorer.json").write_text(json.dumps({"seq_scorer": r}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
