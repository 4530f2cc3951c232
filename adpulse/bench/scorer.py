"""``adpulse bench scorer``: candidate rows/s of the ONNX scorer, with its numpy baseline.

Per thread count (1, and every core), batch size and repeat, the ONNX Runtime
session and the numpy forward pass (same exported graph, same inputs) each
score as many batches as fit in ``seconds_per_point``, interleaved so both see
the same machine load. Both are held to the same thread count: ONNX Runtime's
intra-op pool, and numpy's BLAS through threadpoolctl, so neither wins by
using more cores. Then the whole scoring path as the worker runs it:
:class:`adpulse.bench.decisionpath.DecisionPath`, the worker's decision call
(targeting, caps, pacing, feature assembly, ONNX Runtime, policy) on 100-
candidate requests from 10,000 users over a 1,000-ad catalog, in micro-batches
of 1, 8 and 32 requests (what ``POST /decide`` gathers in one event-loop turn
at low, medium and high load). Medians with min/max.

``--device cuda`` on a machine without a GPU still runs: the result says CUDA
was unavailable and CPU was used.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from adpulse.bench import machine, machine_line, spread
from adpulse.bench.decisionpath import DecisionPath, request_bodies, synthetic_inputs
from adpulse.core.settings import Settings
from scoring.featurespec import FeatureSpec, Inputs
from scoring.registry import MODEL, PACKAGED, SPEC, ModelRegistry
from scoring.scorer import CUDA, TENSORRT, Device, NumpyScorer, OnnxScorer
from scoring.scorer import SessionOptions as OrtOptions

BATCH_SIZES = (1, 32, 256, 1024, 4096)
CANDIDATES = 100
PATH_BATCHES = (1, 8, 32)  # requests per decision call: one loop turn at low ... high load


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
    # the version's own inputs (a sequence model adds ``seq``), as the registry serves it
    spec = replace(ModelRegistry.from_settings(s).spec,
                   sequence=FeatureSpec.from_json((version_dir / SPEC).read_text()).sequence)
    base = NumpyScorer(version_dir / MODEL, version=version_dir.name)
    threads = sorted({1, os.cpu_count() or 1})
    by_threads: dict[str, dict[str, Any]] = {}
    provider, note = "", None
    for t in threads:
        options = OrtOptions(intra_op_threads=t)
        onnx = OnnxScorer(version_dir / MODEL, version=version_dir.name, device=device,
                          options=options)  # fmt: skip
        provider = onnx.provider
        if device == "cuda" and onnx.provider not in (CUDA, TENSORRT) and note is None:
            note = "CUDA was unavailable: ran on CPU (CPUExecutionProvider)"
            log(note)
        log(f"model {version_dir.name} on {onnx.provider}, {t} thread(s) for ONNX Runtime and "
            f"numpy's BLAS, {machine_line(machine(steal=False))}")  # fmt: skip
        onnx_rates: dict[str, list[float]] = {str(b): [] for b in batch_sizes}
        base_rates: dict[str, list[float]] = {str(b): [] for b in batch_sizes}
        with threadpool_limits(limits=t):
            for _ in range(repeats):
                for b in batch_sizes:
                    x = spec.golden_inputs(b, seed=b)
                    onnx_rates[str(b)].append(_rate(_batches(onnx, x), seconds_per_point))
                    base_rates[str(b)].append(_rate(_batches(base, x), seconds_per_point))
                    log(f"{t} thread(s), batch {b:>5}: onnx {onnx_rates[str(b)][-1]:>12,.0f} "
                        f"rows/s, numpy {base_rates[str(b)][-1]:>12,.0f} rows/s")  # fmt: skip
        by_threads[str(t)] = {
            "rows_per_s": _medians(onnx_rates),
            "baseline_rows_per_s": _medians(base_rates),
            "rows_per_s_spread": {k: spread(v) for k, v in onnx_rates.items()},
            "baseline_rows_per_s_spread": {k: spread(v) for k, v in base_rates.items()},
        }
    path = _path(s, smoke, seconds_per_point, repeats, log)
    own = by_threads[str(1 if s.scorer_threads == 1 else threads[-1])]
    return {
        "device": device,
        "provider": provider,
        "cuda_note": note,
        "model_version": version_dir.name,
        "threads": s.scorer_threads,
        "thread_counts": threads,
        "repeats": repeats,
        "seconds_per_point": seconds_per_point,
        # the worker's own thread count (ADPULSE_SCORER_THREADS) at the top level
        "rows_per_s": own["rows_per_s"],
        "baseline_rows_per_s": own["baseline_rows_per_s"],
        "rows_per_s_spread": own["rows_per_s_spread"],
        "baseline_rows_per_s_spread": own["baseline_rows_per_s_spread"],
        "by_threads": by_threads,
        **path,
        "candidates": CANDIDATES,
        "machine": machine(),
    }


def _medians(d: dict[str, list[float]]) -> dict[str, float]:
    return {k: round(float(np.median(v))) for k, v in d.items()}


def _path(
    s: Settings, smoke: bool, seconds: float, repeats: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """Rows/s of the worker's decision call per micro-batch of requests."""
    users = 500 if smoke else 10_000
    ads, events = synthetic_inputs(users, 1_000, 20)
    decide = DecisionPath.build(ads, events, s.with_(pseudonymise=False, partitions=1))
    ad_ids = [a["ad_id"] for a in ads]
    bodies = request_bodies(ad_ids, users, CANDIDATES, 4_000, 5, "path")
    per_batch: dict[str, list[float]] = {str(b): [] for b in PATH_BATCHES}
    with threadpool_limits(limits=s.scorer_threads or None):
        for _ in range(repeats):
            for b in PATH_BATCHES:
                turn = iter(range(0, len(bodies) - b, b))

                def once(b: int = b, turn: Iterator[int] = turn) -> int:
                    i = next(turn, None)
                    if i is None:
                        return 0
                    return decide.decide(bodies[i : i + b])

                per_batch[str(b)].append(_rate(once, seconds))
                log(f"path, {b:>2} requests per call: {per_batch[str(b)][-1]:,.0f} rows/s")
    busy = str(PATH_BATCHES[-1])
    return {
        "path_rows_per_s": round(float(np.median(per_batch[busy]))),
        "path_rows_per_s_spread": spread(per_batch[busy]),
        "path_requests_per_call": int(busy),
        "path_by_requests_per_call": _medians(per_batch),
    }


def format_table(r: dict[str, Any]) -> str:
    """Markdown: rows/s by thread count and batch size, ONNX vs numpy, medians (min-max)."""
    lines = [
        f"ONNX Runtime on {r['provider']} vs numpy, each held to the same thread count, "
        f"{machine_line(r['machine'])}, median (min-max) of {r['repeats']}",
        "",
        "| threads | batch | ONNX rows/s | numpy rows/s | ONNX / numpy |",
        "|---:|---:|---:|---:|---:|",
    ]
    for t, fig in r["by_threads"].items():
        for b, v in fig["rows_per_s"].items():
            o, n = fig["rows_per_s_spread"][b], fig["baseline_rows_per_s_spread"][b]
            base = fig["baseline_rows_per_s"][b]
            lines.append(
                f"| {t} | {b} | {v:,} ({o['min']:,.0f}-{o['max']:,.0f}) | "
                f"{base:,} ({n['min']:,.0f}-{n['max']:,.0f}) | {v / max(1, base):.2f}x |"
            )
    p = r["path_rows_per_s_spread"]
    lines += [
        "",
        f"Whole scoring path (the worker's decision call, {r['candidates']} candidates a "
        f"request, {r['path_requests_per_call']} requests a call): {r['path_rows_per_s']:,} "
        f"rows/s ({p['min']:,.0f}-{p['max']:,.0f}); by requests a call: "
        + ", ".join(f"{k}: {v:,.0f}" for k, v in r["path_by_requests_per_call"].items())
        + ".",
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
