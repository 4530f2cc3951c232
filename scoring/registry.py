"""Model versions on disk, validated at load, newest valid one served.

Layout: ``<dir>/<version>/{model.onnx, spec.json, metrics.json, model.pt}``; versions
order by name (``v0001`` < ``v0002``, or UTC timestamps ``20240601T120000``).
Publish a version by writing it under a temporary name and renaming the
directory into place, so a poll never sees half a model. ``model.pt`` (the
PyTorch weights, written by ``adpulse train`` and the online trainer) is never
served: it is what ``adpulse trainer`` warm-starts from. Candidates the online
trainer exports wait in ``<dir>/candidates/<version>/``, which is not a version:
nothing there is served until it is moved up into ``<dir>``.

Guarded promotion (scoring/promotion.py): when ``<dir>/promotion.json`` exists, it
decides instead of "newest": its ``serving`` version is current (a rollback swaps
back to an older one), and its ``canary``, a candidate, is validated the same way
and kept in :attr:`ModelRegistry.canary` for the workers' canary arm.

Nothing is served before :func:`validate` passes: the file loads in ONNX
Runtime; its inputs and output have the spec's names, dtypes and widths with a
dynamic batch axis (and a dynamic sequence axis for ``seq``, in a model with the
attention block); its spec equals the serving spec (dimension, embedding seed,
buckets; the sequence length is the model's own, and serving follows it); golden
inputs give finite outputs in [0, 1] (both pCTR and, for a two-head model, pCVR:
outputs ``pctr`` or ``pctr, pcvr``); and a 100-row batch runs within the latency
budget. A refused version is remembered with its reason (retried only if its
files change), and the current one keeps serving.

>>> import tempfile
>>> reg = ModelRegistry(tempfile.mkdtemp(), FeatureSpec(dim=8))
>>> reg.poll() is None, reg.current is None
(True, True)
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import onnxruntime as ort

from adpulse.core.errors import ModelRefused
from scoring.featurespec import CVR_OUTPUT, FeatureSpec
from scoring.promotion import PromotionState, read_state
from scoring.scorer import Device, FallbackRule, OnnxScorer, SessionOptions

log = logging.getLogger(__name__)

MODEL, SPEC, METRICS = "model.onnx", "spec.json", "metrics.json"
CHECKPOINT = "model.pt"  # PyTorch weights beside the ONNX file: the online trainer's warm start
CANDIDATES = "candidates"  # <dir>/candidates/<version>/: exported by the trainer, not served
PACKAGED = Path(__file__).resolve().parent / "models"
GOLDEN_ROWS = 100
_ORT_DTYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}


@dataclass(frozen=True)
class LoadedModel:
    """A validated version, ready to serve."""

    version: str
    path: Path
    scorer: OnnxScorer
    spec: FeatureSpec
    metrics: dict[str, Any]
    latency_ms: float  # median of a 100-row batch at validation

    @property
    def checkpoint(self) -> Path | None:
        """This version's PyTorch weights (``model.pt``), None when it was published without."""
        p = self.path / CHECKPOINT
        return p if p.is_file() else None

    def fallback(self, default_ctr: float) -> FallbackRule:
        """The prior for this model: its training click rate when metrics.json has it."""
        prior = self.metrics.get("train_ctr")
        if isinstance(prior, int | float) and 0.0 < prior < 1.0:
            return FallbackRule(prior_ctr=float(prior))
        return FallbackRule(prior_ctr=default_ctr)


def _check_io(sess: ort.InferenceSession, spec: FeatureSpec) -> None:
    """Raise ValueError naming the first input/output that does not match the spec."""
    got = {i.name: i for i in sess.get_inputs()}
    want = {i.name: i for i in spec.inputs}
    if set(got) != set(want):
        msg = f"inputs {sorted(got)} != spec {sorted(want)}"
        raise ValueError(msg)
    for name, w in want.items():
        g = got[name]
        if g.type != _ORT_DTYPES[w.dtype]:
            msg = f"input {name} has type {g.type}, spec says {_ORT_DTYPES[w.dtype]}"
            raise ValueError(msg)
        dynamic = 2 if w.seq else 1  # leading axes that must be dynamic: batch (and seq)
        if (
            len(g.shape) != dynamic + 1
            or any(isinstance(a, int) for a in g.shape[:dynamic])
            or g.shape[-1] != w.width
        ):
            want_shape = f"[batch, {'seq, ' if w.seq else ''}{w.width}]"
            msg = f"input {name} has shape {g.shape}, spec says {want_shape} (batch dynamic)"
            raise ValueError(msg)
    outs = sess.get_outputs()
    names = [o.name for o in outs]
    if names not in ([spec.output], [spec.output, CVR_OUTPUT]):
        msg = f"outputs {names} != spec [{spec.output!r}] or [{spec.output!r}, {CVR_OUTPUT!r}]"
        raise ValueError(msg)
    for o in outs:
        if o.type != "tensor(float)" or not (
            len(o.shape) in (1, 2) and not isinstance(o.shape[0], int) and o.shape[1:] in ([], [1])
        ):
            msg = f"output {o.name} is {o.type} {o.shape}, spec says float [batch, 1]"
            raise ValueError(msg)


def validate(
    version_dir: Path | str,
    spec: FeatureSpec,
    *,
    latency_budget_ms: float = 20.0,
    device: Device = "cpu",
    options: SessionOptions | None = None,
) -> LoadedModel:
    """Load and check one version directory; raise :class:`ModelRefused` with the reason."""
    d = Path(version_dir)
    version = d.name

    def refuse(reason: str) -> NoReturn:
        raise ModelRefused(version, reason) from None

    for name in (MODEL, SPEC):
        if not (d / name).is_file():
            refuse(f"{d / name} is missing")
    try:
        theirs = FeatureSpec.from_json((d / SPEC).read_text(encoding="utf-8"))
    except (ValueError, TypeError) as exc:
        refuse(f"{d / SPEC} is not a feature spec: {exc}")
    spec = replace(spec, sequence=theirs.sequence)  # the model's inputs; serving follows them
    diff = spec.differences(theirs)
    if diff:
        refuse(f"trained for another feature spec ({'; '.join(diff)})")
    metrics: dict[str, Any] = {}
    if (d / METRICS).is_file():
        try:
            metrics = json.loads((d / METRICS).read_text(encoding="utf-8"))
        except ValueError as exc:
            refuse(f"{d / METRICS} is not JSON: {exc}")
    try:
        scorer = OnnxScorer(d / MODEL, version=version, device=device, options=options)
    except Exception as exc:  # ORT raises several types for corrupt files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        refuse(f"ONNX Runtime cannot load {d / MODEL}: {first[:300]}")
    try:
        _check_io(scorer.session, spec)
    except ValueError as exc:
        refuse(str(exc))
    golden = spec.golden_inputs(GOLDEN_ROWS)
    try:
        heads = scorer.score_heads(golden)
    except Exception as exc:
        refuse(f"fails on golden inputs: {str(exc)[:300]}")
    for name, out in zip((spec.output, CVR_OUTPUT), heads, strict=True):
        if out is None:
            continue
        if out.shape != (GOLDEN_ROWS,):
            refuse(f"gives {out.shape[0]} {name} outputs for {GOLDEN_ROWS} golden rows")
        bad = int(np.sum(~(np.isfinite(out) & (out >= 0.0) & (out <= 1.0))))
        if bad:
            refuse(
                f"{bad} of {GOLDEN_ROWS} golden {name} outputs are NaN, infinite or outside [0, 1]"
            )
    latency_ms = _latency_ms(scorer, golden)
    if latency_ms > latency_budget_ms:
        refuse(
            f"too slow: {latency_ms:.2f} ms per {GOLDEN_ROWS}-row batch > budget "
            f"{latency_budget_ms:g} ms (ADPULSE_MODEL_LATENCY_BUDGET_MS)"
        )
    return LoadedModel(version, d, scorer, spec, metrics, latency_ms)


def _latency_ms(scorer: OnnxScorer, inputs: dict[str, Any], runs: int = 15) -> float:
    scorer.score(inputs)  # warm up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        scorer.score(inputs)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000.0)


@dataclass
class ModelRegistry:
    """A directory of versions; ``poll()`` hands the worker a newer valid one to hot-swap.

    ``on_refused(version, reason)`` is called once per refusal (the worker
    counts it in a metric); ``refused`` keeps every refusal's reason.
    """

    root: Path | str
    spec: FeatureSpec
    latency_budget_ms: float = 20.0
    max_slowdown: float = 3.0
    device: Device = "cpu"
    options: SessionOptions | None = None
    on_refused: Callable[[str, str], None] | None = None
    current: LoadedModel | None = None
    canary: LoadedModel | None = None  # promotion.json's canary, when it passed validation
    refused: dict[str, str] = field(default_factory=dict)
    _seen: dict[str, tuple[Any, ...]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @classmethod
    def from_settings(cls, s: Any, **kw: Any) -> ModelRegistry:
        """The registry a worker uses: ADPULSE_MODEL_DIR (default: the shipped models)."""
        return cls(
            root=Path(s.model_dir) if s.model_dir else PACKAGED,
            spec=FeatureSpec.from_settings(s),
            latency_budget_ms=s.model_latency_budget_ms,
            max_slowdown=s.model_max_slowdown,
            device=s.device,
            options=SessionOptions(intra_op_threads=s.scorer_threads),
            **kw,
        )

    def versions(self) -> list[str]:
        """Version names, oldest first (directories with a model file)."""
        root = Path(self.root)
        if not root.is_dir():
            return []
        return sorted(
            p.name
            for p in root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name != CANDIDATES
        )

    def _signature(self, version: str) -> tuple[Any, ...]:
        d = Path(self.root) / version
        out: list[Any] = []
        for name in (MODEL, SPEC, METRICS):
            p = d / name
            st = p.stat() if p.is_file() else None
            out.append(None if st is None else (st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _try(self, version: str) -> LoadedModel | None:
        sig = self._signature(version)
        if version in self.refused and self._seen.get(version) == sig:
            return None  # refused before and unchanged: do not retry every poll
        self._seen[version] = sig
        try:
            loaded = validate(
                Path(self.root) / version,
                self.spec,
                latency_budget_ms=self.latency_budget_ms,
                device=self.device,
                options=self.options,
            )
            self._check_slowdown(loaded)
        except ModelRefused as exc:
            self.refused[version] = exc.reason
            log.warning("%s; still serving %s", exc, self.serving)
            if self.on_refused is not None:
                self.on_refused(version, exc.reason)
            return None
        self.refused.pop(version, None)
        return loaded

    def _check_slowdown(self, new: LoadedModel) -> None:
        """Refuse a candidate much slower than the serving model, timed side by side now.

        Only between models of one kind: the attention block costs about 10x a
        plain net per row by design (docs/performance.md), so a swap to or from a
        sequence model is held to the absolute latency budget alone.
        """
        if self.current is None or bool(self.current.spec.sequence) != bool(new.spec.sequence):
            return
        ours = _latency_ms(self.current.scorer, self.current.spec.golden_inputs(GOLDEN_ROWS))
        theirs = _latency_ms(new.scorer, new.spec.golden_inputs(GOLDEN_ROWS))
        if theirs > self.max_slowdown * ours:
            msg = (
                f"{theirs / ours:.1f}x slower than serving {self.current.version} "
                f"({theirs:.2f} vs {ours:.2f} ms per {GOLDEN_ROWS} rows; limit "
                f"{self.max_slowdown:g}x, ADPULSE_MODEL_MAX_SLOWDOWN)"
            )
            raise ModelRefused(new.version, msg)

    @property
    def serving(self) -> str:
        return self.current.version if self.current else "no model (fallback:prior)"

    def latest_valid(self) -> LoadedModel | None:
        """The promotion state's serving version if valid, else validate from the newest
        version down; make the first that passes current."""
        state = read_state(Path(self.root))
        if state is not None:
            pinned = self._pinned(state)
            if pinned is not None:
                self._swap(pinned)
                return pinned
        for version in reversed(self.versions()):
            loaded = self._try(version)
            if loaded is not None:
                self._swap(loaded)
                return loaded
        return None

    def poll(self) -> LoadedModel | None:
        """A newer valid version than the current one (or, under a promotion state, the
        version it says serves), now current; None if there is none."""
        state = read_state(Path(self.root))
        if state is not None:
            pinned = self._pinned(state)
            if pinned is not None:
                self._swap(pinned)
            return pinned
        self.canary = None
        floor = self.current.version if self.current else ""
        for version in reversed(self.versions()):
            if version <= floor:
                break
            loaded = self._try(version)
            if loaded is not None:
                self._swap(loaded)
                return loaded
        return None

    def _pinned(self, state: PromotionState) -> LoadedModel | None:
        """Follow the state's canary; its serving version when it is not current yet and valid."""
        self._follow_canary(state.canary)
        if self.current is not None and self.current.version == state.serving:
            return None
        if not state.serving or not (Path(self.root) / state.serving).is_dir():
            return None
        return self._try(state.serving)

    def _follow_canary(self, canary: str) -> None:
        if not canary:
            self.canary = None
            return
        if self.canary is not None and self.canary.version == canary:
            return
        rel = f"{CANDIDATES}/{canary}"
        loaded = self._try(rel) if (Path(self.root) / rel).is_dir() else None
        if loaded is not None:
            log.info("canary model %s on %s", canary, loaded.scorer.provider)
        self.canary = loaded

    def _swap(self, loaded: LoadedModel) -> None:
        old = self.serving
        self.current = loaded
        auc = loaded.metrics.get("auc")
        auc_text = (
            f", held-out AUC {auc:.3f}" if isinstance(auc, float) and math.isfinite(auc) else ""
        )
        log.info(
            "serving model %s (was %s) on %s, %.2f ms per %d rows%s",
            loaded.version,
            old,
            loaded.scorer.provider,
            loaded.latency_ms,
            GOLDEN_ROWS,
            auc_text,
        )
