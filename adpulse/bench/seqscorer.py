"""``adpulse bench seq-scorer``: what the attention block costs the scorer, in one run.

Three CTR nets of the default architecture are exported side by side (untrained:
speed does not depend on the weights): ``plain``, without the block; ``general``,
with target attention over ``length`` behaviours (scoring/attention.py) exported
in its general form only, the graph served before the shared-sequence branch; and
``sequence``, the same net as exported today, which takes a single-GEMM form when
all rows share one sequence. Per repeat, the three are measured interleaved (the
bare sessions call by call, the decision calls point by point), so all see the
same machine load:

* the bare ONNX Runtime session at batch 100 with one shared sequence ([1, L, d]:
  what a single request sends, the decide path's usual case), at 100 and 8,192
  with a sequence per row (several requests in one run; 8,192 is what ``POST
  /decide`` gathers under load, issue 16 item 7), every sequence full: rows/s
  (wall clock) and, for the shared case, milliseconds of the calling thread's CPU
  per 100-candidate call (all of the session's CPU at one intra-op thread, the
  worker's default; steadier than wall time on a shared machine);
* the worker's decision call (:class:`adpulse.bench.decisionpath.DecisionPath`:
  targeting, caps, pacing, feature assembly with the users' sequences read and
  embedded, ONNX Runtime, policy) on 100-candidate requests, one per call and
  8 per call: rows/s.

``--widths 32,16,8`` only times the block at other attention widths (the default block is
32 wide, the shipped model's 8 since 2026-12-02, docs/evaluation.md) against the net
without it: what a narrower block saves.

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from adpulse.bench import machine, machine_line
from adpulse.bench.decisionpath import DecisionPath, request_bodies, synthetic_inputs
from adpulse.core.settings import Settings
from scoring.featurespec import FeatureSpec
from scoring.registry import MODEL, SPEC
from scoring.scorer import Device, OnnxScorer, SessionOptions

KINDS = ("plain", "general", "sequence")  # no block; the block's general form; as exported
SHARED = "100-shared"  # batch 100, one sequence for all rows
BATCHES = (SHARED, "100", "8192")
CALLS = (1, 8)  # requests per decision call
CANDIDATES = 100


@dataclass(frozen=True)
class SeqScorerBench:
    """The sizes ``adpulse bench seq-scorer`` and ``python -m adpulse.bench.seqscorer`` take."""

    length: int = 50  # behaviours per user
    seconds: float = 1.0  # per measured point
    repeats: int = 3


def export_models(out: Path, spec: FeatureSpec, length: int) -> Path:
    """``out/<kind>/v1`` for each of :data:`KINDS`: registries of one version each."""
    import torch  # noqa: PLC0415 (training extra)

    from scoring.model import CtrNet, export_onnx  # noqa: PLC0415

    seq = replace(spec, sequence=length)
    for kind, s in zip(KINDS, (spec, seq, seq), strict=True):
        torch.manual_seed(0)
        d = out / kind / "v1"
        export_onnx(CtrNet(s), d / MODEL, s, shared_sequence_form=kind != "general")
        (d / SPEC).write_text(s.to_json() + "\n", encoding="utf-8")
    return out


def _rate(fn: Callable[[], int], seconds: float) -> float:
    """Rows/s by the wall clock."""
    fn()  # warm up
    rows, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        rows += fn()
    return rows / elapsed


def _alternating(
    fns: dict[str, Callable[[], int]], seconds: float
) -> dict[str, tuple[float, float]]:
    """{name: (rows/s by the wall clock, seconds of this thread's CPU per call)}: the calls
    alternate one by one for ``seconds`` per function, so a burst of load on the shared
    machine hits all of them alike."""
    for fn in fns.values():
        fn()  # warm up
    rows = dict.fromkeys(fns, 0)
    wall = dict.fromkeys(fns, 0.0)
    cpu = dict.fromkeys(fns, 0.0)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds * len(fns):
        for k, fn in fns.items():
            w, c = time.perf_counter(), time.thread_time()
            rows[k] += fn()
            cpu[k] += time.thread_time() - c
            wall[k] += time.perf_counter() - w
        calls += 1
    return {k: (rows[k] / wall[k], cpu[k] / calls) for k in fns}


def _scoring(scorer: OnnxScorer, x: dict[str, np.ndarray]) -> Callable[[], int]:
    return lambda: len(scorer.score(x))


def _inputs(spec: FeatureSpec, batch: str) -> dict[str, np.ndarray]:
    """Golden rows, every sequence full (the block's worst case); one sequence for ``SHARED``."""
    n = int(batch.split("-", maxsplit=1)[0])
    x = spec.golden_inputs(n, seed=n)
    if "seq" in x:
        x["seq"] = spec.golden_inputs(n, seed=n + 1)["seq"]
        x["seq"][:] = np.where(x["seq"].any(axis=2, keepdims=True), x["seq"], 1 / 8)
        if batch == SHARED:
            x["seq"] = np.ascontiguousarray(x["seq"][:1])
    return x


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
    """Rows/s of the three models, bare and on the decision path (medians of ``repeats``)."""
    s = (settings or Settings.from_env({})).with_(pseudonymise=False, partitions=1,
                                                   policy="greedy", device=device)  # fmt: skip
    specs = {k: FeatureSpec.from_json((models / k / "v1" / SPEC).read_text()) for k in KINDS}
    length = specs["sequence"].sequence
    opts = SessionOptions(intra_op_threads=s.scorer_threads)
    scorers = {k: OnnxScorer(models / k / "v1" / MODEL, device=device, options=opts) for k in KINDS}
    ads, events = synthetic_inputs(users, 1_000, 20, category_rows=20_000)
    paths = {
        k: DecisionPath.build(ads, events, s.with_(model_dir=str(models / k),
                                                   sequence_length=specs[k].sequence))
        for k in KINDS
    }  # fmt: skip
    bodies = request_bodies([a["ad_id"] for a in ads], users, CANDIDATES, 2_000, 5, "seq")
    bare: dict[str, dict[str, list[float]]] = {k: {b: [] for b in BATCHES} for k in KINDS}
    cpu_ms: dict[str, list[float]] = {k: [] for k in KINDS}
    path: dict[str, dict[str, list[float]]] = {k: {str(c): [] for c in CALLS} for k in KINDS}
    for _ in range(repeats):
        for b in BATCHES:
            got = _alternating({k: _scoring(scorers[k], _inputs(specs[k], b)) for k in KINDS},
                               seconds)  # fmt: skip
            for k, (rate, cpu) in got.items():
                bare[k][b].append(rate)
                if b == SHARED:
                    cpu_ms[k].append(cpu * 1000)
                log(f"{k:>8} batch {b:>10}: {rate:>12,.0f} rows/s")
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
        "ms_per_request": {
            k: round(CANDIDATES * 1000 / float(np.median(v[SHARED])), 3) for k, v in bare.items()
        },
        "cpu_ms_per_request": {k: round(float(np.median(v)), 3) for k, v in cpu_ms.items()},
        "path_rows_per_s": {k: _medians(v) for k, v in path.items()},
        "machine": machine(),
    }


def _medians(d: dict[str, list[float]]) -> dict[str, float]:
    return {k: round(float(np.median(v))) for k, v in d.items()}


def format_table(r: dict[str, Any]) -> str:
    """Markdown: rows/s without the block, with its general form, and as exported."""
    lines = [
        f"The scorer without and with target attention over {r['length']} behaviours, "
        f"{r['provider']}, {r['threads']} thread(s), {machine_line(r['machine'])}, "
        f"median of {r['repeats']}",
        "",
        "| what | plain rows/s | general form rows/s | as exported rows/s | exported / general "
        "| exported / plain |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    labels = {SHARED: "session, batch 100, one shared sequence (a request)",
              "100": "session, batch 100, a sequence per row",
              "8192": "session, batch 8,192, a sequence per row"}  # fmt: skip
    rows = [(labels[b], r["rows_per_s"], b) for b in BATCHES] + [
        (f"decision call, {c} request(s) of 100 candidates", r["path_rows_per_s"], str(c))
        for c in CALLS
    ]
    for label, table, b in rows:
        p, g, q = (table[k][b] for k in KINDS)
        lines.append(f"| {label} | {p:,} | {g:,} | {q:,} | {q / max(1, g):.2f} "
                     f"| {q / max(1, p):.2f} |")  # fmt: skip
    for key, what in (("ms_per_request", "ms per 100-candidate request (wall, from rows/s)"),
                      ("cpu_ms_per_request", "ms of CPU per 100-candidate request")):  # fmt: skip
        p, g, q = (r[key][k] for k in KINDS)
        lines.append(f"| session: {what} | {p:.3f} | {g:.3f} | {q:.3f} | {q / g:.2f} "
                     f"| {q / p:.2f} |")  # fmt: skip
    return "\n".join(lines)


def profile(models: Path, runs: int = 300, top: int = 10) -> str:
    """Where each graph's time goes at batch 100 with one shared sequence: ONNX Runtime's
    profiler (``enable_profiling``, one intra-op thread), the median kernel time per node over
    ``runs`` runs, the ``top`` nodes of each graph (a node inside the sequence graph's If is
    listed by itself; the If's own line includes them and the profiler's cost for each)."""
    import onnxruntime as ort  # noqa: PLC0415

    lines = []
    with tempfile.TemporaryDirectory(prefix="adpulse-seqprof-") as tmp:
        for k in KINDS:
            spec = FeatureSpec.from_json((models / k / "v1" / SPEC).read_text())
            o = SessionOptions(intra_op_threads=1).to_options()
            o.enable_profiling = True
            o.profile_file_prefix = str(Path(tmp) / k)
            sess = ort.InferenceSession(str(models / k / "v1" / MODEL), o,
                                        providers=["CPUExecutionProvider"])  # fmt: skip
            x = _inputs(spec, SHARED)
            for _ in range(runs):
                sess.run(None, x)
            events = json.loads(Path(sess.end_profiling()).read_text())
            per: dict[str, list[float]] = {}
            ops: dict[str, str] = {}
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    per.setdefault(e["name"][:-12], []).append(e["dur"])
                    ops[e["name"][:-12]] = e["args"].get("op_name", "")
            med = sorted(((float(np.median(v)), n) for n, v in per.items()), reverse=True)
            total = sum(m for m, n in med if ops[n] != "If")  # an If's nodes are listed too
            lines.append(f"{k}: median kernel time per node, us (sum of the nodes {total:,.0f})")
            lines += [f"  {m:8.1f}  {ops[n]:<12} {n}" for m, n in med[:top]]
    return "\n".join(lines)


def widths(
    spec: FeatureSpec, length: int, hidden: Sequence[int], seconds: float, repeats: int
) -> dict[str, list[float]]:
    """Milliseconds of CPU per 100-candidate request (one shared sequence of ``length``, all
    of it behaviours, one intra-op thread) of the block at each attention width in ``hidden``,
    and without it (``plain``), calls alternating one by one: what a narrower block would
    save before anyone retrains one (untrained nets: speed does not depend on the weights).
    """
    import torch  # noqa: PLC0415 (training extra)

    from scoring.model import CtrNet, export_onnx  # noqa: PLC0415

    seq = replace(spec, sequence=length)
    fns: dict[str, Callable[[], int]] = {}
    with tempfile.TemporaryDirectory(prefix="adpulse-seqwidth-") as tmp:
        for name, s, h in [("plain", spec, 0), *((f"hidden {h}", seq, h) for h in hidden)]:
            torch.manual_seed(0)
            path = Path(tmp) / f"{h}.onnx"
            net = CtrNet(s, attention_hidden=h) if h else CtrNet(s)
            export_onnx(net, path, s)
            scorer = OnnxScorer(path, device="cpu", options=SessionOptions(intra_op_threads=1))
            fns[name] = _scoring(scorer, _inputs(s, SHARED))
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, (_, per_call) in _alternating(fns, seconds).items():
            cpu[k].append(per_call * 1000)
    return cpu


def _widths_arg(value: str) -> list[int]:
    try:
        got = [int(x) for x in value.split(",")]
    except ValueError:
        got = []
    if not got or min(got) < 1:
        msg = f"{value!r}: give attention widths as positive integers, e.g. 32,16,8"
        raise argparse.ArgumentTypeError(msg)
    return got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m adpulse.bench.seqscorer")
    ap.add_argument("--models", type=Path, help="exported models (default: export them now)")
    ap.add_argument("--export", type=Path, help="only export the three models to this folder")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    cfg = SeqScorerBench()
    ap.add_argument("--length", type=int, default=cfg.length)
    ap.add_argument("--seconds", type=float, default=cfg.seconds)
    ap.add_argument("--repeats", type=int, default=cfg.repeats)
    ap.add_argument("--out", type=Path, help="write seqscorer.json here")
    ap.add_argument("--widths", type=_widths_arg,
                    help="only time the block at these attention widths, e.g. 32,16,8")
    ap.add_argument("--profile", action="store_true",
                    help="only profile each graph per node (batch 100, one shared sequence)")
    a = ap.parse_args(argv)
    spec = FeatureSpec.from_settings(Settings.from_env({}))
    if a.export:
        export_models(a.export, spec, a.length)
        return 0
    if a.widths:
        cpu = widths(spec, a.length, a.widths, a.seconds, a.repeats)
        for k, v in cpu.items():
            each = ", ".join(f"{x:.3f}" for x in v)
            print(f"{k:>10}: {np.median(v):.3f} ms of CPU per request (median; {each})")
        return 0
    if a.profile:
        with tempfile.TemporaryDirectory(prefix="adpulse-seqbench-") as tmp:
            print(profile(a.models or export_models(Path(tmp), spec, a.length)))
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
