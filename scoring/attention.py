"""Target attention over a user's behaviours: the block of DIN (PyTorch, training only).

DIN (Zhou et al., "Deep Interest Network for Click-Through Rate Prediction",
KDD 2018, section 4.3): the candidate ad's vector q attends over the vectors
k_j of the user's last N behaviours with weights
a(k_j, q) = MLP([k_j, q, k_j - q, k_j * q]), not softmax-normalised (the paper
keeps the intensity of interest: a user with ten shoe views is more of a shoe
buyer than one with one), and the weighted sum sum_j a_j k_j is what the
CTR net gets. The MLP's first layer over [k, q, k - q, k * q] is folded into
W_k k + W_q q + W_p (k * q), the same function with half the multiply-adds.

Used by the served model (scoring/model.py, ``FeatureSpec.sequence`` > 0) and by
the offline evaluation's (d) (scoring/offlinenets.py): one home for the rule.
Padding is a zero vector (a behaviour's vector is a unit vector), so the mask is
computed in the graph and the exported model has one input for the sequence.
"""

from __future__ import annotations

import torch
from torch import nn

ATTENTION_HIDDEN = 32


class TargetAttention(nn.Module):
    """[B, d] candidate, [B, L, d] behaviours (zero rows: padding) -> [B, d] pooled interest."""

    def __init__(self, dim: int, hidden: int = ATTENTION_HIDDEN) -> None:
        super().__init__()
        self.k = nn.Linear(dim, hidden)
        self.q = nn.Linear(dim, hidden, bias=False)
        self.p = nn.Linear(dim, hidden, bias=False)
        self.out = nn.Linear(hidden, 1)

    def forward(
        self, ad: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``mask`` [B, L, 1] (1: a real behaviour); default: the non-zero rows of ``seq``."""
        if mask is None:
            mask = (seq.abs().sum(dim=-1, keepdim=True) > 0).to(seq.dtype)
        q = ad.unsqueeze(1)
        h = torch.relu(self.k(seq) + self.q(q) + self.p(seq * q))
        a = self.out(h) * mask  # [B, L, 1]
        pooled: torch.Tensor = (a * seq).sum(dim=1)
        return pooled
