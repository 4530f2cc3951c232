"""The offline evaluation's CTR models (PyTorch, training only): today's net and two additions.

* (b) today's model: :class:`scoring.model.CtrNet` exactly, on the inputs of
  :mod:`scoring.offlinefeatures`.
* (c) + title embeddings: the same ``CtrNet`` over twice the width, the user and
  ad vectors being [hashed | text] (a ``FeatureSpec`` with ``dim`` doubled), so
  the net's user*ad product holds both cosines.
* (d) + target attention: :class:`DinCtr`, the attention block of DIN (Zhou et
  al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018,
  section 4.3): the candidate item's vector q attends over the vectors k_j of the
  user's last N behaviours with weights a(k_j, q) = MLP([k_j, q, k_j - q, k_j * q]),
  not softmax-normalised (the paper keeps the intensity of interest), and the
  weighted sum joins (c)'s inputs as extra dense features. The MLP's first layer
  over [k, q, k - q, k * q] is folded into W_k k + W_q q + W_p (k * q), the same
  function with half the multiply-adds.

The sequence model here is for measurement; the served model with the block
(ONNX export, registry) is issue 16 item 4.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from scoring.featurespec import FeatureSpec, Inputs
from scoring.model import CtrNet

ATTENTION_HIDDEN = 32


class DinCtr(nn.Module):
    """Target attention over the behaviour sequence, pooled into CtrNet's dense input."""

    items: torch.Tensor

    def __init__(self, spec: FeatureSpec, item_vectors: npt.NDArray[np.float32]) -> None:
        super().__init__()
        d = item_vectors.shape[1]
        self.register_buffer("items", torch.from_numpy(item_vectors), persistent=False)
        self.k = nn.Linear(d, ATTENTION_HIDDEN)
        self.q = nn.Linear(d, ATTENTION_HIDDEN, bias=False)
        self.p = nn.Linear(d, ATTENTION_HIDDEN, bias=False)
        self.out = nn.Linear(ATTENTION_HIDDEN, 1)
        extra = tuple(f"din_{i}" for i in range(d))
        self.ctr = CtrNet(FeatureSpec(dim=spec.dim, dense=(*spec.dense, *extra)))

    def start_at(self, ctr: float) -> None:
        self.ctr.start_at(ctr)

    def pooled(self, ad: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """[B, d]: sum_j a(k_j, q) k_j over the real (non-padding) behaviours."""
        mask = (seq >= 0).unsqueeze(-1).to(ad.dtype)
        k = self.items[seq.clamp(min=0)]  # [B, N, d]
        q = ad.unsqueeze(1)
        h = torch.relu(self.k(k) + self.q(q) + self.p(k * q))
        a = self.out(h) * mask  # [B, N, 1]
        pooled: torch.Tensor = (a * k).sum(dim=1)
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
