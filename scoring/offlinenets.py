"""The offline evaluation's CTR models (PyTorch, training only): today's net and two additions.

* (b) today's model: :class:`scoring.model.CtrNet` exactly, on the inputs of
  :mod:`scoring.offlinefeatures`.
* (c) + title embeddings: the same ``CtrNet`` over twice the width, the user and
  ad vectors being [hashed | text] (a ``FeatureSpec`` with ``dim`` doubled), so
  the net's user*ad product holds both cosines.
* (d) + target attention: :class:`DinCtr`, the attention block of DIN
  (scoring/attention.py, shared with the served model): the candidate item's
  vector attends over the user's last N behaviours, and the weighted sum joins
  (c)'s inputs as extra dense features.

The sequence model here indexes behaviours into a table of item vectors (c)'s
wider space; the served one (scoring/model.py with ``FeatureSpec.sequence``)
takes the behaviours' vectors as an input, so it exports to ONNX.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from scoring.attention import TargetAttention
from scoring.featurespec import FeatureSpec, Inputs
from scoring.model import CtrNet


class DinCtr(nn.Module):
    """Target attention over the behaviour sequence, pooled into CtrNet's dense input."""

    items: torch.Tensor

    def __init__(self, spec: FeatureSpec, item_vectors: npt.NDArray[np.float32]) -> None:
        super().__init__()
        d = item_vectors.shape[1]
        self.register_buffer("items", torch.from_numpy(item_vectors), persistent=False)
        self.attention = TargetAttention(d)
        extra = tuple(f"din_{i}" for i in range(d))
        self.ctr = CtrNet(FeatureSpec(dim=spec.dim, dense=(*spec.dense, *extra)))

    def start_at(self, ctr: float) -> None:
        self.ctr.start_at(ctr)

    def pooled(self, ad: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """[B, d]: sum_j a(k_j, q) k_j over the real (non-padding) behaviours."""
        mask = (seq >= 0).unsqueeze(-1).to(ad.dtype)
        pooled: torch.Tensor = self.attention(ad, self.items[seq.clamp(min=0)], mask)
        return pooled

    def logits(
        self,
        user: torch.Tensor,
        ad: torch.Tensor,
        ids: torch.Tensor,
        dense: torch.Tensor,
        seq: torch.Tensor,
    ) -> torch.Tensor:
        dense = torch.cat([dense, self.pooled(ad, seq)], dim=1)
        return self.ctr.logits(user, ad, ids, dense)


def _batch(x: dict[str, torch.Tensor], idx: torch.Tensor) -> list[torch.Tensor]:
    names = ["user", "ad", "ids", "dense", *(["seq"] if "seq" in x else [])]
    return [x[k][idx] for k in names]


def fit_predict(
    model: Any,
    train: Inputs,
    y: npt.NDArray[np.float64],
    test: Inputs,
    *,
    epochs: int = 3,
    seed: int = 7,
    batch_size: int = 512,
    lr: float = 2e-3,
) -> npt.NDArray[np.float64]:
    """Train ``model`` (CtrNet or DinCtr) as ``adpulse train`` does (Adam, BCE, output bias
    started at the base rate) and return its pCTR on ``test``."""
    torch.manual_seed(seed)
    base = float(np.clip(y.mean(), 1e-4, 1 - 1e-4))
    model.start_at(base)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    xt = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in train.items()}
    yt = torch.from_numpy(y.astype(np.float32)).reshape(-1, 1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(yt), generator=gen)
        for start in range(0, len(perm), batch_size):
            b = perm[start : start + batch_size]
            opt.zero_grad()
            loss_fn(model.logits(*_batch(xt, b)), yt[b]).backward()
            opt.step()
    return predict(model, test)


def predict(model: Any, x: Inputs, batch_size: int = 4096) -> npt.NDArray[np.float64]:
    model.eval()
    xs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in x.items()}
    n = len(x["user"])
    out = np.empty(n, dtype=np.float64)
    with torch.no_grad():
        for s in range(0, n, batch_size):
            idx = torch.arange(s, min(n, s + batch_size))
            out[s : s + len(idx)] = torch.sigmoid(model.logits(*_batch(xs, idx))).numpy()[:, 0]
    return out


def make_model(
    kind: str, spec: FeatureSpec, item_vectors: npt.NDArray[np.float32] | None = None
) -> nn.Module:
    """``"ctr"``: today's CtrNet on ``spec``; ``"din"``: DinCtr over ``item_vectors``."""
    if kind == "din":
        if item_vectors is None:
            msg = "the sequence model needs the item vectors its behaviours index"
            raise ValueError(msg)
        return DinCtr(spec, item_vectors)
    return CtrNet(spec)
