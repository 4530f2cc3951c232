"""The CTR network (PyTorch, training only) and its verified ONNX export.

Why a deep-and-cross network: DCN-V2 (Wang et al., "DCN V2: Improved Deep &
Cross Network and Practical Lessons for Web-scale Learning to Rank Systems",
WWW 2021) learns explicit bounded-degree feature crosses,
x_{l+1} = x0 * (W_l x_l + b_l) + x_l, beside an MLP. Our strongest signal is
already a cross (user interest x ad embedding, given to the net as the
element-wise product user*ad inside the graph, so the cosine is one sum away),
and the rest are pairwise interactions of a few categorical fields with it
(placement x category, hour x device): what one cross layer captures, where an
FM (Rendle, ICDM 2010) models only pairwise terms without a deep part.

Why this size: serving scores ~100 candidates per request, so cost per row is
the budget. We use one low-rank cross (W = U V^T, rank 16; the paper's
section 3.2) and a 64-32 tower: ~35k parameters (0.14 MB), about a third
of the ONNX Runtime kernel time of the earlier 2 x rank-32 cross + 256-128
tower (1.07 vs 3.05 ms per 1,024 rows), at the same accuracy on the synthetic
log (held-out AUC 0.7856 vs 0.7822, log loss 0.1399 vs 0.1408; 2 rank-16
layers 0.7844, no cross 0.7853, 96-48 tower 0.7869: within seed noise). At
batch >= 256 it scores 2.5-3x the rows/s of the old model on two cores (see
docs/performance.md, "The scorer"). A second cross layer bought nothing
measurable and costs four small ops, which at batch 32 are mostly thread-pool
hand-offs.

Why a second head, pCVR (purchase after a click): an ad that pays per
conversion (billing ``cpa``) is worth pCTR x pCVR x bid, so serving needs both.
The CVR head shares the bottom (ids, cross, tower) and adds a 16-unit layer; it
is trained ESMM-style (Ma et al., "Entire Space Multi-Task Model", SIGIR 2018):
its loss is on pCTR x pCVR against "converted" over *every* impression, not on
the clicked ones alone, so it is not fitted on a selected sample and the few
conversions also shape the shared layers. A model trained without conversions
has no CVR head and exports one output, as before; with it, the graph has two
outputs, ``pctr`` and ``pcvr`` (docs/cvr.md).

With ``FeatureSpec.sequence`` > 0 the net gains DIN's target attention
(scoring/attention.py): the ad attends over the user's behaviours and the
pooled vector joins the cross layer's input beside the dense features. Without
it the net, its parameters and its graph are what they were.

Serving never imports this module: it runs the exported ONNX file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scoring.attention import ATTENTION_HIDDEN, TargetAttention
from scoring.featurespec import BATCH_AXIS, CVR_OUTPUT, SEQ_AXIS, SEQ_BATCH_AXIS, FeatureSpec

ID_EMBED = 8
CROSS_RANK = 16
CROSS_LAYERS = 1
HIDDEN = (64, 32)
CVR_HIDDEN = 16


class LowRankCross(nn.Module):
    """One DCN-V2 cross layer, x0 * (U V^T x + b) + x (Wang et al. 2021, eq. 1, 3.2).

    In the first layer x is x0, so the residual folds into the bias:
    x0 * (U V^T x0 + (b + 1)), the same function with one elementwise op fewer
    in the exported graph. ``first`` stores b + 1 as the bias (initialised so).
    """

    def __init__(self, width: int, rank: int, *, first: bool = False) -> None:
        super().__init__()
        self.first = first
        self.v = nn.Linear(width, rank, bias=False)
        self.u = nn.Linear(rank, width)
        if first:
            with torch.no_grad():
                self.u.bias.add_(1.0)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.u(self.v(x))
        out: torch.Tensor = x0 * h if self.first else x0 * h + x
        return out


class CtrNet(nn.Module):
    """user, ad, user*ad, id embeddings, dense -> low-rank cross -> MLP 64-32-1 -> pCTR.

    ``hidden``, ``cross_rank`` and ``cross_layers`` default to the shipped
    architecture; other values are for experiments (the trade-off above).
    ``cvr_head`` adds the pCVR head (module docstring); ``forward`` stays pCTR
    alone, :meth:`heads` gives both.
    """

    offsets: torch.Tensor

    def __init__(
        self,
        spec: FeatureSpec,
        *,
        hidden: tuple[int, ...] = HIDDEN,
        cross_rank: int = CROSS_RANK,
        cross_layers: int = CROSS_LAYERS,
        cvr_head: bool = False,
        attention_hidden: int = ATTENTION_HIDDEN,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.ids = nn.Embedding(sum(spec.id_buckets), ID_EMBED)
        self.register_buffer(
            "offsets", torch.tensor(spec.id_offsets, dtype=torch.int64), persistent=False
        )
        seq_width = spec.dim if spec.sequence else 0
        width = 3 * spec.dim + len(spec.id_buckets) * ID_EMBED + len(spec.dense) + seq_width
        self.width = width
        self.cross = nn.ModuleList(
            LowRankCross(width, cross_rank, first=i == 0) for i in range(cross_layers)
        )
        layers: list[nn.Module] = []
        for a, b in zip((width, *hidden[:-1]), hidden, strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear((width, *hidden)[-1], 1))
        nn.init.normal_(self.ids.weight, std=0.05)
        self.cvr: nn.Sequential | None = (
            nn.Sequential(nn.Linear(hidden[-1], CVR_HIDDEN), nn.ReLU(), nn.Linear(CVR_HIDDEN, 1))
            if cvr_head
            else None
        )
        # Made last, so a net without the block draws its weights as it always did.
        self.attention = TargetAttention(spec.dim, attention_hidden) if spec.sequence else None

    def start_at(self, ctr: float) -> None:
        """Set the output bias so the untrained net predicts ``ctr`` (faster, stabler start)."""
        head = self.mlp[-1]
        assert isinstance(head, nn.Linear)
        with torch.no_grad():
            head.bias.fill_(math.log(ctr / (1.0 - ctr)))

    def start_cvr_at(self, cvr: float) -> None:
        """Set the CVR head's bias so the untrained head predicts ``cvr`` (after a click)."""
        assert self.cvr is not None
        head = self.cvr[-1]
        assert isinstance(head, nn.Linear)
        with torch.no_grad():
            head.bias.fill_(math.log(cvr / (1.0 - cvr)))

    def tower(
        self,
        user: torch.Tensor,
        ad: torch.Tensor,
        ids: torch.Tensor,
        dense: torch.Tensor,
        seq: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The shared bottom: id embeddings (and the attention over behaviours in a sequence
        model), cross, MLP up to its last hidden layer."""
        e = self.ids(ids + self.offsets).flatten(1)
        parts = [user, ad, user * ad, e, dense]
        if self.attention is not None:
            if seq is None:
                msg = "this net attends over behaviours: give it the seq input"
                raise ValueError(msg)
            parts.append(self.attention(ad, seq))
        x0 = torch.cat(parts, dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        out: torch.Tensor = self.mlp[:-1](x)
        return out

    def logits(self, *inputs: torch.Tensor) -> torch.Tensor:
        """pCTR logit of (user, ad, ids, dense[, seq])."""
        out: torch.Tensor = self.mlp[-1](self.tower(*inputs))
        return out

    def head_logits(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pCTR logit, pCVR logit) from one pass through the shared bottom."""
        assert self.cvr is not None, "this CtrNet has no CVR head (cvr_head=False)"
        h = self.tower(*inputs)
        return self.mlp[-1](h), self.cvr(h)

    def heads(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pCTR, pCVR): what the two-output ONNX graph returns."""
        ctr, cvr = self.head_logits(*inputs)
        return torch.sigmoid(ctr), torch.sigmoid(cvr)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(*inputs))


class _BothHeads(nn.Module):
    """The export's view of a two-head CtrNet: its forward returns (pCTR, pCVR)."""

    def __init__(self, net: CtrNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.heads(*inputs)


def _run(model: CtrNet, x: dict[str, np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
    """PyTorch's outputs, in the ONNX graph's order (pctr, then pcvr when it has it)."""
    with torch.no_grad():
        if model.cvr is None:
            return [model(*_tensors(x, model.spec)).numpy()]
        return [t.numpy() for t in model.heads(*_tensors(x, model.spec))]


def _tensors(
    inputs: dict[str, np.ndarray[Any, Any]], spec: FeatureSpec
) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(inputs[k])) for k in spec.input_names)


def _golden(spec: FeatureSpec, n: int, length: int, seed: int) -> dict[str, np.ndarray[Any, Any]]:
    """Golden inputs with the sequence cut to ``length`` (the export is checked at two)."""
    x = spec.golden_inputs(n, seed=seed)
    if "seq" in x:
        x["seq"] = np.ascontiguousarray(x["seq"][:, :length])
    return x


def export_onnx(
    model: CtrNet,
    path: Path,
    spec: FeatureSpec,
    *,
    atol: float = 1e-5,
    shared_sequence_form: bool = True,
) -> float:
    """Write ``model`` as ONNX with a dynamic batch axis, then verify it.

    Verification runs ONNX Runtime and PyTorch on the same random inputs at
    batch 1 and 257 (a sequence model: sequences of 1 and ``spec.sequence``, so
    both axes are proven dynamic; and 100 candidates sharing one sequence of
    ``spec.sequence``, [1, L, d], the graph's other branch, against PyTorch on the
    sequence repeated per row) and raises ``AssertionError``-free
    ``ValueError`` if any output differs by more than ``atol``. Returns the
    largest difference seen. ``shared_sequence_form`` False exports the attention
    in its general form only (scoring/attention.py; what ``adpulse bench
    seq-scorer`` compares against).
    A model with a CVR head is exported with two outputs, ``pctr`` then
    ``pcvr``, and both are verified.
    """
    import onnxruntime as ort  # noqa: PLC0415 (serving dependency, imported where needed)

    model.eval()
    example = _tensors(spec.golden_inputs(4, seed=1), spec)
    outputs = [spec.output] if model.cvr is None else [spec.output, CVR_OUTPUT]
    axes: dict[str, dict[int, str]] = {
        name: {0: BATCH_AXIS} for name in (*spec.input_names, *outputs)
    }
    if spec.sequence:
        axes["seq"] = {0: SEQ_BATCH_AXIS, 1: SEQ_AXIS}
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.attention is not None:
        model.attention.export_shared_form = shared_sequence_form
    torch.onnx.export(
        model if model.cvr is None else _BothHeads(model),
        example,
        str(path),
        input_names=list(spec.input_names),
        output_names=outputs,
        dynamic_axes=axes,
        opset_version=17,
        do_constant_folding=True,
        dynamo=False,
    )
    quiet = ort.SessionOptions()
    quiet.log_severity_level = 3  # ORT warns about renaming inside the If's branches
    sess = ort.InferenceSession(str(path), quiet, providers=["CPUExecutionProvider"])
    worst = 0.0
    cases = [(1, 1, 11), (257, max(1, spec.sequence), 12)]
    if spec.sequence:
        cases.append((100, -spec.sequence, 13))  # negative: one sequence shared by all rows
    for n, length, seed in cases:
        x = _golden(spec, n, abs(length), seed)
        if length < 0:  # the longest of the golden sequences, sent once as a request does
            x["seq"] = x["seq"][[int(np.argmax(np.abs(x["seq"]).sum(axis=(1, 2))))]]
        repeated = {**x, "seq": np.repeat(x["seq"], n, axis=0)} if length < 0 else x
        got_all, want_all = sess.run(outputs, x), _run(model, repeated)
        for name, got, want in zip(outputs, got_all, want_all, strict=True):
            if got.shape != want.shape:
                msg = f"ONNX output {name} shape {got.shape} != PyTorch {want.shape} at batch {n}"
                raise ValueError(msg)
            worst = max(worst, float(np.max(np.abs(got - want))))
    if not worst <= atol:
        msg = f"ONNX export of {path} differs from PyTorch by {worst:.3g} > {atol:g}"
        raise ValueError(msg)
    return worst
