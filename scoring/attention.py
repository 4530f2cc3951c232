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
Padding is a zero vector (a behaviour's vector is a unit vector), which adds
nothing to the weighted sum, so the exported model needs no mask input.

Serving cost: a request sends its user's sequence once ([1, L, d]) for all its
candidates, and the exported graph then takes a shared-sequence form
(:func:`_attend`), about 1.5x as fast in ONNX Runtime at 100 candidates and
L = 50 as the general form (docs/performance.md, "The scorer with the sequence
block"). The block still costs B x L x d x hidden multiply-adds, whatever the form.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

ATTENTION_HIDDEN = 32


def _attend(
    ad: torch.Tensor,
    seq: torch.Tensor,
    wk: torch.Tensor,
    bk: torch.Tensor,
    wq: torch.Tensor,
    wp: torch.Tensor,
    wo: torch.Tensor,
    bo: torch.Tensor,
) -> torch.Tensor:
    """The block's function, in the form the ONNX graph runs (TorchScript: the branch on the
    sequence's batch axis becomes an ONNX ``If``).

    One shared sequence (seq [1, L, d], a single request): with k_j the behaviours, every
    pre-activation k_j W_k^T + (k_j * q) W_p^T + q W_q^T + b_k of every candidate q is one
    2-D product q [B, d] x M^T [d, L * hidden], M[(j, h)] = k_j * W_p[h] + W_q[h], with
    bias k_j W_k^T + b_k: a single well-shaped GEMM (N = L * hidden), ReLU fused into it by
    ONNX Runtime, and the per-candidate [d, hidden] matrices of the general form never built.
    The output bias is summed once, b_out * sum_j k_j, rather than added to each weight.
    A sequence per row (several requests in one batch): the general form, one product per
    candidate with its own matrix (the M above would be per row, L x hidden x d each).
    Both are the same function; they differ in float rounding only (~1e-7).
    """
    if seq.shape[0] == 1:
        k = seq[0]  # [L, d]
        m = (k.unsqueeze(1) * wp + wq).reshape(-1, k.shape[1])  # [L * hidden, d]
        z = torch.addmm((k @ wk.t() + bk).reshape(-1), ad, m.t())  # [B, L * hidden]
        # [B * L, hidden] x [hidden, 1]: a 2-D product (a 1-D right side is ~40x slower in ORT)
        a = (torch.relu(z).reshape(-1, wo.shape[1]) @ wo.t()).reshape(ad.shape[0], k.shape[0])
        return a @ k + bo * k.sum(0)
    mb = wk.t() + ad.unsqueeze(2) * wp.t()  # [B, d, hidden]
    h = torch.relu(seq @ mb + (ad @ wq.t() + bk).unsqueeze(1))  # [B, L, hidden]
    a = (h @ wo.t()).squeeze(2)  # [B, L]
    return (a.unsqueeze(1) @ seq).squeeze(1) + bo * seq.sum(1)


@functools.cache
def _scripted() -> Callable[..., torch.Tensor]:
    """:func:`_attend` compiled by TorchScript, once, when a model is first exported."""
    out: Callable[..., torch.Tensor] = torch.jit.script(_attend)
    return out


class TargetAttention(nn.Module):
    """[B, d] candidate, [B, L, d] behaviours (zero rows: padding) -> [B, d] pooled interest."""

    def __init__(self, dim: int, hidden: int = ATTENTION_HIDDEN) -> None:
        super().__init__()
        self.k = nn.Linear(dim, hidden)
        self.q = nn.Linear(dim, hidden, bias=False)
        self.p = nn.Linear(dim, hidden, bias=False)
        self.out = nn.Linear(hidden, 1)
        # Export the shared-sequence branch (an attribute, not a parameter: the state_dict,
        # and so every saved model.pt, is unchanged). False: the general form alone, the
        # graph exported before the branch existed (``adpulse bench seq-scorer`` compares).
        self.export_shared_form = True

    def forward(
        self, ad: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``mask`` [B, L, 1] (1: a real behaviour) is needed only where padding rows are not
        zero: a zero row adds a_j * 0 to the sum whatever its weight.

        Computed as W_k k + W_p (k * q) = k (W_k^T + q W_p^T): one batched product with a
        per-candidate [d, hidden] matrix instead of two products and a broadcast multiply
        over [B, L, d] (ONNX Runtime's slowest op here; 3x fewer operations at L = 50),
        and the weighted sum as a product too.

        While ``torch.onnx.export`` runs it (and no mask is given), it runs :func:`_attend`
        instead: the same function, with a fast form for a shared sequence, so the exported
        graph carries both forms; training runs the lines below, unchanged.
        """
        if mask is None and self.export_shared_form and torch.onnx.is_in_onnx_export():
            return _scripted()(
                ad, seq, self.k.weight, self.k.bias, self.q.weight, self.p.weight,
                self.out.weight, self.out.bias,
            )  # fmt: skip
        m = self.k.weight.t() + ad.unsqueeze(2) * self.p.weight.t()  # [B, d, hidden]
        h = torch.relu(seq @ m + (self.q(ad) + self.k.bias).unsqueeze(1))  # [B, L, hidden]
        a = self.out(h)  # [B, L, 1]
        if mask is not None:
            a = a * mask
        pooled: torch.Tensor = (a.transpose(1, 2) @ seq).squeeze(1)
        return pooled
