"""``adpulse bench scorer``: candidate rows/s of the ONNX scorer, with its numpy baseline.

Per batch size and repeat, the ONNX Runtime session and the numpy forward pass
(same exported graph, same inputs) each score as many batches as fit in
``seconds_per_point``, interleaved so both see the same machine load. Then the
whole scoring path: requests of 100 candidates from 10,000 synthetic users and
a 1,000-ad catalog go through feature assembly (``AdIndex`` + ``assemble``),
the ``MicroBatcher``, ONNX Runtime, and ranking by pCTR x bid (top 1), with
enough concurrent requests to fill a micro-batch. Medians with min/max.

``--device cuda`` on a machine without a GPU still runs: the result says CUDA
was unavailable and CPU was used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adpulse.bench import machine, machine_line, spread
from adpulse.settings import Settings
from scoring.featurespec import AdIndex, FeatureSpec, Inputs, assemble
from scoring.registry import MODEL, PACKAGED, ModelRegistry
from scoring.scorer import CUDA, TENSORRT, Device, MicroBatcher, NumpyScorer, OnnxScorer
from scoring.scorer import SessionOptions as OrtOptions
from scoring.synthetic import make_world

BATCH_SIZES = (1, 32, 256, 1024, 4096)
CANDIDATES = 100


def _rate(fn: Callable[[], int], seconds: float) -> float:
    """Rows/s of calling ``fn`` (which returns rows done) for about ``seconds``."""
    fn()  # warm up
    rows, start = 0, time.perf_counter()
    while True:
        rows += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return rows / elapsed


def _batches(scorer: OnnxScorer | NumpyScorer, x: Inputs) -> Callable[[], int]:
    def once() -> int:
        return len(scorer.score(x))

    return once


def _model_dir(model_dir: Path | None) -> Path:
    root = model_dir or PACKAGED
    versions = sorted(p for p in root.iterdir() if (p / MODEL).is_file()) if root.is_dir() else []
    if not versions:
        msg = f"no model under {root}: train one with `python -m scoring.train --generate 200000`"
        raise FileNotFoundError(msg)
    return versions[-1]


async def _path_rows(
    scorer: OnnxScorer, ads: AdIndex, world: Any, spec: FeatureSpec, s: Settings, seconds: float
) -> tuple[float, float]:
    """(rows/s through assemble -> micro-batch -> ONNX -> top-1, mean rows per session run)."""
    batcher = MicroBatcher(
        scorer, max_rows=s.scorer_max_batch_rows, max_wait_ms=s.scorer_max_wait_ms
    )
    concurrency = max(1, s.scorer_max_batch_rows // CANDIDATES)
    rng = np.random.default_rng(0)
    users = [np.asarray(v, dtype=np.float32) for v in world.user_interest]
    placements, devices = ("home_banner", "feed", "search.top"), ("mobile", "desktop")
    deadline = time.perf_counter() + seconds
    done = 0

    async def client(seed: int) -> None:
        nonlocal done
        r = np.random.default_rng(seed)
        while time.perf_counter() < deadline:
            rows = r.choice(len(ads), CANDIDATES, replace=False)
            x: Inputs = assemble(
                users[int(r.integers(len(users)))], rows, ads,
                placements[seed % 3], devices[seed % 2], 1_717_200_000_000 + done, spec,
            )  # fmt: skip
            pctr = await batcher.score(x)
            best = int(np.argmax(pctr * ads.bid[rows]))
            done += CANDIDATES + 0 * best

    start = time.perf_counter()
    await asyncio.gather(*(client(int(rng.integers(1 << 30))) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return done / elapsed, batcher.rows_scored / max(1, batcher.runs)


def run(
    device: Device = "cpu",
    batch_sizes: Sequence[int] = BATCH_SIZES,
    seconds_per_point: float = 1.0,
    repeats: int = 3,
    smoke: bool = False,
    *,
    settings: Settings | None = None,
    model_dir: Path | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Measure and return the figures (JSON-ready); see the module docstring."""
    s = settings or Settings.from_env({})
    if smoke:
        batch_sizes, seconds_per_point, repeats = tuple(b for b in batch_sizes if b <= 256), 0.05, 1
    version_dir = _model_dir(model_dir)
    spec = ModelRegistry.from_settings(s).spec
    options = OrtOptions(intra_op_threads=s.scorer_threads)
    onnx = OnnxScorer(version_dir / MODEL, version=version_dir.name, device=device, options=options)
    base = NumpyScorer(version_dir / MODEL, version=version_dir.name)
    on_gpu = onnx.provider in (CUDA, TENSORRT)
    note = None
    if device == "cuda" and not on_gpu:
        note = "CUDA was unavailable: ran on CPU (CPUExecutionProvider)"
        log(note)
    log(f"model {version_dir.name} on {onnx.provider}, {machine_line(machine())}")

    onnx_rates: dict[str, list[float]] = {str(b): [] for b in batch_sizes}
    base_rates: dict[str, list[float]] = {str(b): [] for b in batch_sizes}
    for _ in range(repeats):
        for b in batch_sizes:
            x = spec.golden_inputs(b, seed=b)
            onnx_rates[str(b)].append(_rate(_batches(onnx, x), seconds_per_point))
            base_rates[str(b)].append(_rate(_batches(base, x), seconds_per_point))
            log(f"batch {b:>5}: onnx {onnx_rates[str(b)][-1]:>12,.0f} rows/s, "
                f"numpy {base_rates[str(b)][-1]:>12,.0f} rows/s")  # fmt: skip

    world = make_world(1, spec, n_users=500 if smoke else 10_000, n_ads=1_000)
    ads = AdIndex.build(world.ads, spec)
    users = [np.asarray(v, dtype=np.float32) for v in world.user_interest]
    rng = np.random.default_rng(2)

    def assemble_only() -> int:
        rows = rng.choice(len(ads), CANDIDATES, replace=False)
        assemble(users[int(rng.integers(len(users)))], rows, ads, "feed", "mobile", 0, spec)
        return CANDIDATES

    path, assembly, fill = [], [], []
    for _ in range(repeats):
        assembly.append(_rate(assemble_only, seconds_per_point))
        rate, rows_per_run = asyncio.run(_path_rows(onnx, ads, world, spec, s, seconds_per_point))
        path.append(rate)
        fill.append(rows_per_run)
        log(f"path: {rate:,.0f} rows/s ({rows_per_run:.0f} rows per session run)")

    def medians(d: dict[str, list[float]]) -> dict[str, float]:
        return {k: round(float(np.median(v))) for k, v in d.items()}

    return {
        "device": device,
        "provider": onnx.provider,
        "cuda_note": note,
        "model_version": version_dir.name,
        "threads": s.scorer_threads,
        "repeats": repeats,
        "seconds_per_point": seconds_per_point,
        "rows_per_s": medians(onnx_rates),
        "baseline_rows_per_s": medians(base_rates),
        "rows_per_s_spread": {k: spread(v) for k, v in onnx_rates.items()},
        "baseline_rows_per_s_spread": {k: spread(v) for k, v in base_rates.items()},
        "path_rows_per_s": round(float(np.median(path))),
        "path_rows_per_s_spread": spread(path),
        "path_rows_per_run": round(float(np.median(fill))),
        "assembly_rows_per_s": round(float(np.median(assembly))),
        "candidates": CANDIDATES,
        "machine": machine(),
    }


def format_table(r: dict[str, Any]) -> str:
    """Markdown: rows/s by batch size, ONNX vs numpy, medians (min-max)."""
    lines = [
        f"ONNX Runtime on {r['provider']} vs numpy, {machine_line(r['machine'])}, "
        f"median (min-max) of {r['repeats']}",
        "",
        "| batch | ONNX rows/s | numpy rows/s | ONNX / numpy |",
        "|---:|---:|---:|---:|",
    ]
    for b, v in r["rows_per_s"].items():
        o, n = r["rows_per_s_spread"][b], r["baseline_rows_per_s_spread"][b]
        lines.append(
            f"| {b} | {v:,} ({o['min']:,.0f}-{o['max']:,.0f}) | "
            f"{r['baseline_rows_per_s'][b]:,} ({n['min']:,.0f}-{n['max']:,.0f}) | "
            f"{v / max(1, r['baseline_rows_per_s'][b]):.2f}x |"
        )
    p = r["path_rows_per_s_spread"]
    lines += [
        "",
        f"Whole scoring path ({r['candidates']} candidates/request, assembly + micro-batching + "
        f"ONNX + top-1): {r['path_rows_per_s']:,} rows/s ({p['min']:,.0f}-{p['max']:,.0f}), "
        f"{r['path_rows_per_run']:,} rows per session run; assembly alone "
        f"{r['assembly_rows_per_s']:,} rows/s.",
    ]
    if r.get("cuda_note"):
        lines.append(f"\n{r['cuda_note']}.")
    return "\n".join(lines)


def summary(r: dict[str, Any]) -> str:
    """One line: the headline figures."""
    big = max(r["rows_per_s"], key=int)
    return (
        f"scorer on {r['provider']}: {r['rows_per_s'][big]:,} rows/s at batch {big} "
        f"(numpy {r['baseline_rows_per_s'][big]:,}), path {r['path_rows_per_s']:,} rows/s"
        + (f"; {r['cuda_note']}" if r.get("cuda_note") else "")
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adpulse.bench.scorer")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="cpu")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    sizes = tuple(int(b) for b in a.batch_sizes.split(","))
    r = run(a.device, sizes, a.seconds, a.repeats, a.smoke, log=lambda m: print(m, file=sys.stderr))
    if a.json:
        a.json.write_text(json.dumps(r, indent=2) + "\n")
    print(format_table(r))
    print(summary(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
