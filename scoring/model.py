"""The CTR network (PyTorch, training only) and its verified ONNX export.

Why a deep-and-cross network: DCN-V2 (Wang et al., "DCN V2: Improved Deep &
Cross Network and Practical Lessons for Web-scale Learning to Rank Systems",
WWW 2021) learns explicit bounded-degree feature crosses,
x_{l+1} = x0 * (W_l x_l + b_l) + x_l, beside an MLP. Our strongest signal is
already a cross (user interest x ad embedding, given to the net as the
element-wise product user*ad so the cosine is one sum away), and the rest are
pairwise interactions of a few categorical fields with it (placement x
category, hour x device): exactly what two cross layers capture, where an
FM (Rendle, ICDM 2010) models only pairwise terms without a deep part. We use
the paper's low-rank cross (W = U V^T, rank 32, its section 5.2), which keeps
the model small (~130k parameters, ~0.5 MB) and its CPU cost below the MLP's,
so the scorer runs at hundreds of thousands of rows/s on two cores.

Serving never imports this module: it runs the exported ONNX file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scoring.featurespec import BATCH_AXIS, FeatureSpec

ID_EMBED = 8
CROSS_RANK = 32
CROSS_LAYERS = 2
HIDDEN = (256, 128)


class LowRankCross(nn.Module):
    """One DCN-V2 cross layer with W = U V^T (Wang et al. 2021, eq. 1 and 5.2)."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.v = nn.Linear(width, rank, bias=False)
        self.u = nn.Linear(rank, width)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x0 * self.u(self.v(x)) + x
        return out


class CtrNet(nn.Module):
    """user, ad, user*ad, id embeddings, dense -> 2 cross layers -> MLP 256-128-1 -> pCTR."""

    offsets: torch.Tensor

    def __init__(self, spec: FeatureSpec) -> None:
        super().__init__()
        self.spec = spec
        self.ids = nn.Embedding(sum(spec.id_buckets), ID_EMBED)
        self.register_buffer(
            "offsets", torch.tensor(spec.id_offsets, dtype=torch.int64), persistent=False
        )
        width = 3 * spec.dim + len(spec.id_buckets) * ID_EMBED + len(spec.dense)
        self.width = width
        self.cross = nn.ModuleList(LowRankCross(width, CROSS_RANK) for _ in range(CROSS_LAYERS))
        self.mlp = nn.Sequential(
            nn.Linear(width, HIDDEN[0]),
            nn.ReLU(),
            nn.Linear(HIDDEN[0], HIDDEN[1]),
            nn.ReLU(),
            nn.Linear(HIDDEN[1], 1),
        )
        nn.init.normal_(self.ids.weight, std=0.05)

    def start_at(self, ctr: float) -> None:
        """Set the output bias so the untrained net predicts ``ctr`` (faster, stabler start)."""
        head = self.mlp[-1]
        assert isinstance(head, nn.Linear)
        with torch.no_grad():
            head.bias.fill_(math.log(ctr / (1.0 - ctr)))

    def logits(
        self, user: torch.Tensor, ad: torch.Tensor, ids: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        e = self.ids(ids + self.offsets).flatten(1)
        x0 = torch.cat([user, ad, user * ad, e, dense], dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        out: torch.Tensor = self.mlp(x)
        return out

    def forward(
        self, user: torch.Tensor, ad: torch.Tensor, ids: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        return torch.sigmoid(self.logits(user, ad, ids, dense))


def _tensors(inputs: dict[str, np.ndarray[Any, Any]]) -> tuple[torch.Tensor, ...]:
    return tuple(
        torch.from_numpy(np.ascontiguousarray(inputs[k])) for k in ("user", "ad", "ids", "dense")
    )


def export_onnx(model: CtrNet, path: Path, spec: FeatureSpec, *, atol: float = 1e-5) -> float:
    """Write ``model`` as ONNX with a dynamic batch axis, then verify it.

    Verification runs ONNX Runtime and PyTorch on the same random inputs at
    batch 1 and 257 and raises ``AssertionError``-free ``ValueError`` if any
    output differs by more than ``atol``. Returns the largest difference seen.
    """
    import onnxruntime as ort  # noqa: PLC0415 (serving dependency, imported where needed)

    model.eval()
    example = _tensors(spec.golden_inputs(4, seed=1))
    axes = {name: {0: BATCH_AXIS} for name in (*spec.input_names, spec.output)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        example,
        str(path),
        input_names=list(spec.input_names),
        output_names=[spec.output],
        dynamic_axes=axes,
        opset_version=17,
        do_constant_folding=True,
        dynamo=False,
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for n, seed in ((1, 11), (257, 12)):
        x = spec.golden_inputs(n, seed=seed)
        with torch.no_grad():
            want = model(*_tensors(x)).numpy()
        got = sess.run([spec.output], x)[0]
        if got.shape != want.shape:
            msg = f"ONNX output shape {got.shape} != PyTorch {want.shape} at batch {n}"
            raise ValueError(msg)
        worst = max(worst, float(np.max(np.abs(got - want))))
    if not worst <= atol:
        msg = f"ONNX export of {path} differs from PyTorch by {worst:.3g} > {atol:g}"
        raise ValueError(msg)
    return worst
