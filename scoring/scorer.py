"""Scorers: inputs (see ``scoring.featurespec``) in, one pCTR per row out.

A model with a CVR head (scoring/model.py) has a second output, ``pcvr``:
``score_heads`` returns (pCTR, pCVR), pCVR None for a one-head model, and
``score`` stays pCTR alone, so callers that need one number are unchanged.

``Scorer`` is the protocol the decision stage codes against. ``OnnxScorer`` is
the real one (one ONNX Runtime session; providers chosen from
``ADPULSE_DEVICE``; I/O binding on CUDA); ``NumpyScorer`` runs the same
exported graph in plain numpy (the benchmark baseline, and a fallback that needs
no ONNX Runtime). ``FallbackRule`` is what a decision uses when no model can
score. Concurrent requests share one session run through ``POST /decide``'s
service (streams/serve.py), which batches per event-loop turn (a sequence
model runs once per request of the batch: streams/decide.py).
"""

from __future__ import annotations

import ctypes.util
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from scoring.featurespec import CVR_OUTPUT, OUTPUT

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
Heads = tuple[F32, F32 | None]  # (pCTR, pCVR or None: the model has no CVR head)
Device = Literal["auto", "cuda", "cpu"]
_Node = tuple[str, list[str], str, dict[str, Any]]  # NumpyScorer: op, inputs, output, attributes
CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
# Measured on the 2-core dev machine at batch 1,024, 6 interleaved rounds of 0.7 s:
# 1 thread 303k rows/s (235k-357k), 2 threads 409k (285k-487k), so both cores.
# Spinning threads reached 569k but with a wider spread (157k-645k) and they would
# starve Faust and RocksDB between batches, so spinning stays off.
DEFAULT_INTRA_OP_THREADS = 2


class Scorer(Protocol):
    """Anything that turns a batch of model inputs into pCTR, one float32 per row."""

    @property
    def version(self) -> str: ...

    @property
    def provider(self) -> str: ...

    def score(self, inputs: Mapping[str, npt.NDArray[Any]]) -> F32: ...


@dataclass(frozen=True)
class SessionOptions:
    """ONNX Runtime session options as data; :meth:`to_options` builds the library object.

    ``intra_op_threads`` 0 lets ONNX Runtime pick (one per physical core).
    Spinning is off by default: a worker shares its cores with Faust and
    RocksDB, and spinning threads steal them between micro-batches.
    """

    intra_op_threads: int = DEFAULT_INTRA_OP_THREADS
    inter_op_threads: int = 1
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    allow_spinning: bool = False

    def to_options(self) -> ort.SessionOptions:
        o = ort.SessionOptions()
        o.intra_op_num_threads = self.intra_op_threads
        o.inter_op_num_threads = self.inter_op_threads
        o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        o.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.graph_optimization]
        spin = "1" if self.allow_spinning else "0"
        o.add_session_config_entry("session.intra_op.allow_spinning", spin)
        o.add_session_config_entry("session.inter_op.allow_spinning", spin)
        o.log_severity_level = 3
        return o


def gpu_present() -> bool:
    """An NVIDIA driver is loaded (onnxruntime-gpu lists CUDA even on machines without one)."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


def tensorrt_present() -> bool:
    return ctypes.util.find_library("nvinfer") is not None


def providers_for(
    device: Device, available: Sequence[str] | None = None, gpu: bool | None = None
) -> list[str]:
    """Execution providers for ``device``; cuda without a GPU warns once and uses CPU.

    auto: TensorRT (when its libraries are installed), then CUDA, then CPU,
    but only where a GPU is present: asking ONNX Runtime for CUDA on a machine
    without one costs a screenful of errors at every session start.
    """
    have = list(ort.get_available_providers() if available is None else available)
    if device == "cpu":
        return [CPU]
    has_gpu = gpu_present() if gpu is None else gpu
    wanted = [CUDA] if device == "cuda" else [TENSORRT, CUDA] if tensorrt_present() else [CUDA]
    chosen = [p for p in wanted if p in have] if has_gpu else []
    if device == "cuda" and not chosen:
        why = "no NVIDIA GPU found" if not has_gpu else f"no CUDA provider in {', '.join(have)}"
        log.warning("ADPULSE_DEVICE=cuda but %s: scoring on CPU", why)
    elif device == "auto" and not chosen:
        log.info(
            "no usable GPU (%s): scoring on CPU",
            "no NVIDIA GPU found" if not has_gpu else "no CUDA provider",
        )
    return [*chosen, CPU]


class OnnxScorer:
    """One ``InferenceSession`` for a worker's lifetime (sessions are thread-safe to run)."""

    def __init__(
        self,
        path: Path | str | bytes,
        *,
        version: str = "",
        device: Device = "auto",
        options: SessionOptions | None = None,
        output: str = OUTPUT,
    ) -> None:
        model = path if isinstance(path, bytes) else str(path)
        self.session = ort.InferenceSession(
            model,
            sess_options=(options or SessionOptions()).to_options(),
            providers=providers_for(device),
        )
        self._version = version
        self._output = output
        names = [o.name for o in self.session.get_outputs()]
        self._outputs = [output, *([CVR_OUTPUT] if CVR_OUTPUT in names else [])]
        self._provider: str = str(self.session.get_providers()[0])
        if device == "cuda" and self._provider not in (CUDA, TENSORRT):
            log.warning("CUDA session could not start: scoring on %s", self._provider)
        log.info("scorer %s uses %s", version or "(unversioned)", self._provider)
        self._gpu = self._provider in (CUDA, TENSORRT)

    @property
    def version(self) -> str:
        return self._version

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def heads(self) -> int:
        """1: pCTR; 2: pCTR and pCVR."""
        return len(self._outputs)

    def score(self, inputs: Mapping[str, npt.NDArray[Any]]) -> F32:
        return self.score_heads(inputs)[0]

    def score_heads(self, inputs: Mapping[str, npt.NDArray[Any]]) -> Heads:
        outs = (
            self._score_bound(inputs)
            if self._gpu
            else self.session.run(self._outputs, dict(inputs))
        )
        flat = [np.asarray(o, dtype=np.float32).reshape(-1) for o in outs]
        return flat[0], flat[1] if len(flat) > 1 else None

    def _score_bound(self, inputs: Mapping[str, npt.NDArray[Any]]) -> list[Any]:
        """CUDA: bind host inputs and let ORT allocate the outputs on the device once."""
        io = self.session.io_binding()
        for name, arr in inputs.items():
            io.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name in self._outputs:
            io.bind_output(name, "cuda")
        self.session.run_with_iobinding(io)
        out: list[Any] = io.copy_outputs_to_cpu()
        return out


class NumpyScorer:
    """The exported graph run op by op in numpy: same weights, same forward pass.

    Supports the operators ``scoring.model.export_onnx`` emits (Gather, Gemm,
    MatMul, Concat, Relu, Sigmoid, ...); any other raises ``ValueError`` at load.
    """

    OPS = frozenset(
        {"Constant", "Add", "Mul", "Gather", "Flatten", "Concat", "MatMul", "Gemm", "Relu",
         "Sigmoid", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Transpose",
         "If", "Shape", "Equal", "Cast", "ReduceSum"}
    )  # fmt: skip

    def __init__(self, path: Path | str, *, version: str = "") -> None:
        import onnx  # noqa: PLC0415 (only the baseline needs it)

        g = onnx.load(str(path)).graph
        self._version = version
        self._consts: dict[str, npt.NDArray[Any]] = {}
        self._nodes = self._compile(g)
        # Pre-transpose Gemm weights once so the hot loop is a plain matmul.
        for op, ins, _, attrs in self._nodes:
            if op == "Gemm" and attrs.get("transB", 0) and ins[1] in self._consts:
                w = self._consts[ins[1]]
                self._consts[ins[1]] = np.ascontiguousarray(w.T)
                attrs["transB"] = 0
        self._output = g.output[0].name
        names = [o.name for o in g.output]
        self._cvr = CVR_OUTPUT if CVR_OUTPUT in names else None

    def _compile(self, g: Any) -> list[_Node]:
        """A graph's nodes in order, its constants into ``_consts``; an ``If``'s branches
        (the sequence model's shared-sequence form, scoring/attention.py) compiled the same
        way into its attributes."""
        import onnx  # noqa: PLC0415
        from onnx import numpy_helper  # noqa: PLC0415

        self._consts.update({i.name: numpy_helper.to_array(i) for i in g.initializer})
        nodes: list[_Node] = []
        for n in g.node:
            if n.op_type not in self.OPS:
                msg = f"NumpyScorer cannot run ONNX op {n.op_type} (node {n.name})"
                raise ValueError(msg)
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            if n.op_type == "Constant":
                self._consts[n.output[0]] = numpy_helper.to_array(attrs["value"])
                continue
            if n.op_type == "If":
                for branch in ("then_branch", "else_branch"):
                    sub = attrs[branch]
                    attrs[branch] = (self._compile(sub), sub.output[0].name)
            if n.op_type == "Cast":
                attrs["to"] = onnx.helper.tensor_dtype_to_np_dtype(attrs["to"])
            nodes.append((n.op_type, list(n.input), n.output[0], attrs))
        return nodes

    @property
    def version(self) -> str:
        return self._version

    @property
    def provider(self) -> str:
        return "numpy"

    def score(self, inputs: Mapping[str, npt.NDArray[Any]]) -> F32:
        return self.score_heads(inputs)[0]

    def score_heads(self, inputs: Mapping[str, npt.NDArray[Any]]) -> Heads:
        """(pCTR, pCVR), as :meth:`OnnxScorer.score_heads`."""
        v: dict[str, npt.NDArray[Any]] = {**self._consts, **inputs}
        _run(self._nodes, v)
        ctr = np.asarray(v[self._output], dtype=np.float32).reshape(-1)
        if self._cvr is None:
            return ctr, None
        return ctr, np.asarray(v[self._cvr], dtype=np.float32).reshape(-1)


def _run(nodes: list[_Node], v: dict[str, npt.NDArray[Any]]) -> None:
    """Run ``nodes`` in order over the values ``v`` (a branch sees its outer scope's)."""
    for op, ins, out, a in nodes:
        x = [v[i] for i in ins if i]
        if op == "If":
            branch, result = a["then_branch"] if bool(x[0]) else a["else_branch"]
            _run(branch, v)
            v[out] = v[result]
        else:
            v[out] = _OPS[op](x, a)


def _reduce_sum(x: list[npt.NDArray[Any]], a: dict[str, Any]) -> npt.NDArray[Any]:
    axes = tuple(int(i) for i in x[1]) if len(x) > 1 else None
    out: npt.NDArray[Any] = np.sum(x[0], axis=axes, keepdims=bool(a.get("keepdims", 1)))
    return out


def _gemm(x: list[npt.NDArray[Any]], a: dict[str, Any]) -> npt.NDArray[Any]:
    m = x[0].T if a.get("transA", 0) else x[0]
    w = x[1].T if a.get("transB", 0) else x[1]
    y = m @ w
    if a.get("alpha", 1.0) != 1.0:
        y *= a["alpha"]
    if len(x) > 2:
        y += x[2] * a.get("beta", 1.0)
    out: npt.NDArray[Any] = y
    return out


def _flatten(x: list[npt.NDArray[Any]], a: dict[str, Any]) -> npt.NDArray[Any]:
    k = a.get("axis", 1)
    return x[0].reshape(int(np.prod(x[0].shape[:k])), -1)


def _sigmoid(x: list[npt.NDArray[Any]], a: dict[str, Any]) -> npt.NDArray[Any]:
    out: npt.NDArray[Any] = 1.0 / (1.0 + np.exp(-x[0]))
    return out


_OPS: dict[str, Callable[[list[npt.NDArray[Any]], dict[str, Any]], npt.NDArray[Any]]] = {
    "Add": lambda x, a: x[0] + x[1],
    "Mul": lambda x, a: x[0] * x[1],
    "Gather": lambda x, a: np.take(x[0], x[1], axis=a.get("axis", 0)),
    "Flatten": _flatten,
    "Concat": lambda x, a: np.concatenate(x, axis=a["axis"]),
    "MatMul": lambda x, a: x[0] @ x[1],
    "Gemm": _gemm,
    "Relu": lambda x, a: np.maximum(x[0], 0),
    "Sigmoid": _sigmoid,
    "Identity": lambda x, a: x[0],
    "Reshape": lambda x, a: x[0].reshape(x[1]),
    # the attention block's (opset 13+: axes are an input)
    "Unsqueeze": lambda x, a: np.expand_dims(x[0], tuple(int(i) for i in x[1])),
    "Squeeze": lambda x, a: np.squeeze(x[0], tuple(int(i) for i in x[1])),
    "Transpose": lambda x, a: np.transpose(x[0], a.get("perm")),
    # the sequence model's branch on seq's batch axis (scoring/attention.py)
    "Shape": lambda x, a: np.asarray(x[0].shape, dtype=np.int64),
    "Equal": lambda x, a: np.equal(x[0], x[1]),
    "Cast": lambda x, a: np.asarray(x[0]).astype(a["to"]),
    "ReduceSum": _reduce_sum,
}


@dataclass(frozen=True)
class FallbackRule:
    """What pCTR a decision uses when the model cannot score.

    Rule: every candidate gets the population prior CTR (the training set's
    click rate from the serving model's ``metrics.json``, else
    ``ADPULSE_FALLBACK_CTR``), so ranking falls back to bid order (pCTR x bid
    with a constant pCTR). It applies when no model is loaded, or when any row
    of a request's scores is non-finite or outside [0, 1]; the decision's
    ``policy`` then reads ``fallback:prior``.
    """

    prior_ctr: float = 0.02
    policy: str = "fallback:prior"

    def pctr(self, n: int) -> F32:
        return np.full(n, self.prior_ctr, dtype=np.float32)

    def guard(self, scores: F32 | None, n: int) -> tuple[F32, bool]:
        """(scores to use, True if the fallback was applied)."""
        if scores is None or len(scores) != n or not probabilities(scores):
            return self.pctr(n), True
        return scores, False


def probabilities(x: npt.NDArray[np.floating[Any]]) -> bool:
    """Whether every value of ``x`` is finite and within [0, 1] (True when empty).

    Two reductions instead of three masks and their conjunction: a NaN fails both
    comparisons, an infinity one of them. Asked of each decision's pCTR and pCVR.
    """
    return not len(x) or (float(x.min()) >= 0.0 and float(x.max()) <= 1.0)
