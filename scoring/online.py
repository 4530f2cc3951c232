"""The online CTR learner: warm-started weights, one update per batch of labels, replay, dedupe.

Why these choices:

* **Warm start.** The learner begins from the serving version's PyTorch weights
  (``model.pt``, kept beside ``model.onnx`` by ``adpulse train``), so it refines
  what serves instead of relearning it from a few minutes of labels.
* **Adam at a small learning rate** (``ADPULSE_TRAINER_LR``, default 5e-4, a quarter
  of the offline trainer's 2e-3), one step per ``ADPULSE_TRAINER_STEP_ROWS`` new
  rows (below). Adam's
  per-parameter step sizes suit the sparse id embeddings, whose rows see a label
  only now and then (McMahan et al., KDD 2013, argue the same for per-coordinate
  rates); a small rate keeps one unlucky batch from moving the served model far.
* **Steps of a fixed number of rows.** New rows wait in a pending buffer until it
  holds ``step_rows`` of them; each step learns exactly that many (oldest first),
  and the rest wait for the next poll. Steps were once taken per polled batch,
  whatever its size, and that biased pCTR upwards: the joiner sends a click's label
  at once and a non-click's only when its attribution window closes, so polls bring
  small click-rich batches and larger click-free ones; each got one step of the
  same size (Adam normalises the gradient's scale away), so a handful of clicks
  pushed pCTR up as far as hundreds of non-clicks pulled it down. With equal steps
  every row weighs the same, however the rows were grouped when they arrived, and
  in a steady stream the mix of a step (the clicks of now, the non-clicks of one
  window ago) is the true one. The alternative, holding each click back until its
  window closes so that both outcomes of a period arrive together, would delay the
  freshest signal by the window and make the trainer know the joiner's window; it
  is not needed once rows weigh the same
  (tests/unit/test_online_learner.py::test_clicks_early_and_non_clicks_late_leave_the_learner_calibrated).
  The pending rows are part of :meth:`OnlineLearner.state`, saved atomically with
  the offsets that consumed them, so a kill -9 neither learns them twice nor skips
  them.
* **A replay buffer** of the last ``ADPULSE_TRAINER_REPLAY`` labelled rows (a ring:
  bounded memory, about 0.6 KB a row at dim 64, 1.4 KB with a sequence of 50). Each
  step learns the new batch together with as many rows drawn uniformly from the
  buffer: the gradient of a batch of a few hundred fresh labels is noisy, and
  mixing in the recent past damps that noise and the forgetting a stream of
  one-pass updates causes, while a ring (not a reservoir) keeps the mix recent
  when the world drifts.
* **Dedupe by decision id.** A label's identity is its ``decision_id``; the
  joiner's one duplicate window may send a label twice. The learner keeps the
  fingerprints of the last ``ADPULSE_TRAINER_DEDUPE_IDS`` learned decision ids and
  refuses a repeat.

* **A sequence model** (``FeatureSpec.sequence`` > 0) learns as it serves: each
  label's ``seq`` input is rebuilt from the behaviours its decision logged
  (``features.sequence``, (item, category) pairs), by the rule serving used. The
  replay ring keeps those ids, not the vectors (0.8 KB a row at N = 50 where the
  vectors are 13 KB), and rebuilds the vectors of the rows it replays.
* **A two-head model** keeps learning both heads: pCTR from each label, and pCVR
  by the ESMM loss it was trained with (scoring/model.py), pCTR x pCVR against
  "converted" over every label. A conversion comes after its label (the joiner's
  ``converted: 1`` record), so a label is learned as not converted, and its
  conversion, when it comes, as one more row that is (Ktena et al., "Addressing
  Delayed Feedback for Continuous Training with Neural Networks in CTR
  Prediction", RecSys 2019: fake negatives). A converted decision so counts as
  one negative and one positive: the learned conversion rate is p / (1 + p),
  under 0.5% off at the synthetic world's p of 0.6% per impression. A conversion
  row is left out of pCTR's own log loss (its click was learned from its label) but,
  as in offline ESMM, its pCTR x pCVR term moves both towers.

Everything a restart needs is in :meth:`OnlineLearner.state`: weights, Adam's
moments, the pending rows, the replay ring, the dedupe ring, the sampling
generator, and a ledger (labels taken in, in the weights or pending, and the sum
of their decision-id fingerprints mod 2**64, so a test can prove each label was
learned exactly once).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from scoring.embeddings import HashedEmbeddings
from scoring.features import fingerprint
from scoring.featurespec import FeatureSpec, Inputs
from scoring.model import CtrNet
from scoring.replay import DedupeRing, ReplayBuffer
from scoring.sequence import behaviour_inputs

CHECKPOINT_FORMAT = 1
# The attention block's width of every model.pt written before files recorded it.
UNRECORDED_ATTENTION_HIDDEN = 32
_MASK64 = (1 << 64) - 1
# rows as the replay ring keeps them: inputs, then y (clicked), c (converted), m (a label)
_Rows = tuple[dict[str, npt.NDArray[Any]], npt.NDArray[np.float32], npt.NDArray[np.float32],
              npt.NDArray[np.float32]]  # fmt: skip


def arch_of(model: CtrNet) -> dict[str, Any]:
    """The constructor arguments that rebuild ``model``'s shape (read from its layers)."""
    linears = [m for m in model.mlp if isinstance(m, torch.nn.Linear)]
    first = model.cross[0]
    assert isinstance(first, torch.nn.Module)
    v = first.v
    assert isinstance(v, torch.nn.Linear)
    return {
        "hidden": [int(m.out_features) for m in linears[:-1]],
        "cross_rank": int(v.out_features),
        "cross_layers": len(model.cross),
        "cvr_head": model.cvr is not None,
        "sequence": model.spec.sequence,
        # the attention block's width: a net of another width cannot take these weights
        "attention_hidden": (
            int(model.attention.out.in_features) if model.attention is not None else 0
        ),
    }


def build(spec: FeatureSpec, arch: Mapping[str, Any]) -> CtrNet:
    """The net of ``arch`` for ``spec``, with the sequence length the weights were trained on
    (``arch["sequence"]``; absent in files written before sequence models: none) and
    its attention block's width (``arch["attention_hidden"]``)."""
    return CtrNet(
        replace(spec, sequence=int(arch.get("sequence", 0))),
        hidden=tuple(int(h) for h in arch["hidden"]),
        cross_rank=int(arch["cross_rank"]),
        cross_layers=int(arch["cross_layers"]),
        cvr_head=bool(arch.get("cvr_head", False)),
        attention_hidden=int(arch.get("attention_hidden") or UNRECORDED_ATTENTION_HIDDEN),
    )


def save_weights(model: CtrNet, path: Path) -> None:
    """``model.pt`` of a registry version: the weights and the shape that holds them."""
    torch.save(
        {"format": CHECKPOINT_FORMAT, "arch": arch_of(model), "state_dict": model.state_dict()},
        str(path),
    )


def load_weights(path: Path, spec: FeatureSpec) -> CtrNet:
    """The PyTorch model of a registry version (ValueError naming the file if unusable)."""
    try:
        saved = torch.load(str(path), map_location="cpu", weights_only=True)
        model = build(spec, saved["arch"])
        model.load_state_dict(saved["state_dict"])
    except (OSError, EOFError, KeyError, RuntimeError, TypeError, ValueError,
            pickle.UnpicklingError) as exc:  # fmt: skip
        msg = f"{path}: not a model checkpoint for this feature spec ({type(exc).__name__}: {exc})"
        raise ValueError(msg) from None
    return model


def atomic_save(payload: Mapping[str, Any], path: Path) -> None:
    """Write with torch.save to a temporary file, fsync, rename over ``path``, fsync the folder.

    A kill -9 at any instant leaves either the old file or the new one, whole.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        torch.save(dict(payload), fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_saved(path: Path) -> dict[str, Any] | None:
    """A file written by :func:`atomic_save`, or None when there is none."""
    if not path.is_file():
        return None
    out: dict[str, Any] = torch.load(str(path), map_location="cpu", weights_only=True)
    return out


class OnlineLearner:
    """One CTR model learning from a stream of labelled batches (see the module docstring).

    A sequence model's inputs carry the behaviours as ids (:data:`SEQ_IDS`, from
    :func:`scoring.sequence.behaviour_ids`); ``seq`` is built from them here.
    """

    def __init__(
        self,
        model: CtrNet,
        *,
        lr: float = 5e-4,
        replay: int = 20_000,
        dedupe_ids: int = 200_000,
        seed: int = 7,
        step_rows: int = 128,
    ) -> None:
        if step_rows < 1:
            msg = f"step_rows={step_rows}: a step learns at least one row"
            raise ValueError(msg)
        spec = model.spec  # the weights' own spec (and sequence length), not the settings'
        self.model, self.spec, self.lr, self.step_rows = model, spec, lr, step_rows
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)
        self.replay = ReplayBuffer(replay, spec)
        # rows taken in but not yet stepped on: inputs (the replay's keys) and y, c, m
        none = np.zeros(0, np.float32)
        self.pending: _Rows = ({k: v[:0].copy() for k, v in self.replay.x.items()},
                               none, none.copy(), none.copy())  # fmt: skip
        self.steps = 0  # optimiser steps since the warm start
        self.seen = DedupeRing(dedupe_ids)
        self.seen_conversions = DedupeRing(dedupe_ids)
        self.gen = torch.Generator().manual_seed(seed)
        self.learned = 0  # labels learned since the warm start
        self.clicks = 0
        self.conversions = 0  # conversions learned (two-head models)
        self.checksum = 0  # sum of learned decision-id fingerprints mod 2**64
        self._table = HashedEmbeddings(spec.dim, spec.embedding_seed)

    @property
    def heads(self) -> int:
        return 1 if self.model.cvr is None else 2

    def is_duplicate(self, decision_id: str) -> bool:
        return fingerprint(decision_id) in self.seen

    def is_duplicate_conversion(self, decision_id: str) -> bool:
        return fingerprint(decision_id) in self.seen_conversions

    def _tensors(self, x: Inputs) -> list[torch.Tensor]:
        if self.spec.sequence and "seq" not in x:
            x = {**x, "seq": behaviour_inputs(x["behaviours"], x["seq_len"], self.spec,
                                              self._table)}  # fmt: skip
        return [torch.from_numpy(np.ascontiguousarray(x[k])) for k in self.spec.input_names]

    def score(self, x: Inputs) -> npt.NDArray[np.float64]:
        """pCTR of each row by the current weights (the progressive-validation prediction)."""
        self.model.eval()
        with torch.no_grad():
            out = self.model(*self._tensors(x))
        scores: npt.NDArray[np.float64] = out.numpy().reshape(-1).astype(np.float64)
        return scores

    @property
    def pending_rows(self) -> int:
        """Rows taken in and waiting for a full step (labels and conversions)."""
        return len(self.pending[1])

    def learn(
        self,
        x: Inputs,
        y: npt.NDArray[np.float32],
        decision_ids: Sequence[str],
        conversions: tuple[Inputs, Sequence[str]] | None = None,
    ) -> float:
        """Take the batch in; one Adam step per full ``step_rows`` of pending rows, each
        with as many replayed rows. Returns the last step's loss (NaN: no step).

        The rows are the learner's from here on (ledger, dedupe ring, :meth:`state`),
        whether stepped on now or pending. ``conversions``: the inputs and decision ids
        of conversion records, learned by a two-head model's pCVR (module docstring;
        ignored by a one-head model). The caller has dropped duplicates
        (:meth:`is_duplicate`, :meth:`is_duplicate_conversion`) and scored the batch first.
        """
        keys = list(self.replay.x)
        xs = {k: x[k] for k in keys}
        n_conv = 0
        if conversions is not None and self.model.cvr is not None and conversions[1]:
            cx, conv_ids = conversions
            n_conv = len(conv_ids)
            xs = {k: np.concatenate([xs[k], cx[k]]) for k in keys}
        else:
            conv_ids = ()
        ys = np.concatenate([y, np.ones(n_conv, np.float32)]).astype(np.float32)
        cs = np.r_[np.zeros(len(y)), np.ones(n_conv)].astype(np.float32)
        ms = np.r_[np.ones(len(y)), np.zeros(n_conv)].astype(np.float32)
        px, py, pc, pm = self.pending
        px = {k: np.concatenate([px[k], xs[k]]) for k in keys}
        py, pc, pm = np.r_[py, ys], np.r_[pc, cs], np.r_[pm, ms]
        loss, b, start = float("nan"), self.step_rows, 0
        while len(py) - start >= b:
            part = slice(start, start + b)
            loss = self._replayed_step({k: v[part] for k, v in px.items()}, py[part],
                                       pc[part], pm[part])  # fmt: skip
            start += b
        self.pending = ({k: v[start:].copy() for k, v in px.items()}, py[start:].copy(),
                        pc[start:].copy(), pm[start:].copy())  # fmt: skip
        for did in decision_ids:
            fp = fingerprint(did)
            self.seen.add(fp)
            self.checksum = (self.checksum + fp) & _MASK64
        for did in conv_ids:
            self.seen_conversions.add(fingerprint(did))
        self.learned += len(y)
        self.clicks += int(y.sum())
        self.conversions += n_conv
        return loss

    def _replayed_step(
        self,
        xs: dict[str, npt.NDArray[Any]],
        ys: npt.NDArray[np.float32],
        cs: npt.NDArray[np.float32],
        ms: npt.NDArray[np.float32],
    ) -> float:
        """One Adam step on ``step_rows`` new rows and as many drawn from the replay ring."""
        new = (xs, ys, cs, ms)
        k = min(len(self.replay), len(ys))
        if k:
            rx, (ry, rc, rm) = self.replay.sample_rows(k, self.gen)
            xs = {name: np.concatenate([xs[name], rx[name]]) for name in xs}
            ys, cs, ms = np.r_[ys, ry], np.r_[cs, rc], np.r_[ms, rm]
        loss = self._step(xs, ys, cs, ms)
        self.replay.add(*new)
        self.steps += 1
        return loss

    def _step(
        self,
        x: Inputs,
        y: npt.NDArray[np.float32],
        c: npt.NDArray[np.float32],
        m: npt.NDArray[np.float32],
    ) -> float:
        """pCTR log loss over the label rows (``m``), plus ESMM's over all rows with pCVR."""
        from scoring.train import esmm_loss  # noqa: PLC0415

        self.model.train()
        self.opt.zero_grad()
        inputs = self._tensors(x)
        yt, ct, mt = (torch.from_numpy(a).reshape(-1, 1) for a in (y, c, m))
        if self.model.cvr is None:
            ctr_logit, cvr_logit = self.model.logits(*inputs), None
        else:
            ctr_logit, cvr_logit = self.model.head_logits(*inputs)
        per_row = torch.nn.functional.binary_cross_entropy_with_logits(
            ctr_logit, yt, reduction="none"
        )
        loss: Any = (per_row * mt).sum() / mt.sum().clamp(min=1.0)
        if cvr_logit is not None:
            loss = loss + esmm_loss(ctr_logit, cvr_logit, ct)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def state(self) -> dict[str, Any]:
        """Everything a restart needs to continue exactly where this learner is."""
        return {
            "format": CHECKPOINT_FORMAT,
            "arch": arch_of(self.model),
            "state_dict": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "replay": self.replay.state(),
            "pending": {
                "x": {
                    k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.pending[0].items()
                },
                **{
                    name: torch.from_numpy(np.ascontiguousarray(a))
                    for name, a in zip("ycm", self.pending[1:], strict=True)
                },
            },
            "steps": self.steps,
            "seen": self.seen.state(),
            "seen_conversions": self.seen_conversions.state(),
            "generator": self.gen.get_state(),
            "learned": self.learned,
            "clicks": self.clicks,
            "conversions": self.conversions,
            "checksum": self.checksum,
        }

    def load(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["state_dict"])
        self.opt.load_state_dict(state["optimizer"])
        for group in self.opt.param_groups:
            group["lr"] = self.lr  # the configured rate wins over the saved one
        self.replay.load(state["replay"])
        saved = state.get("pending")  # absent in checkpoints written before fixed-size steps
        if saved is not None:
            self.pending = ({k: v.numpy().copy() for k, v in saved["x"].items()},
                            saved["y"].numpy().copy(), saved["c"].numpy().copy(),
                            saved["m"].numpy().copy())  # fmt: skip
        self.steps = int(state.get("steps", 0))
        self.seen.load(state["seen"])
        if "seen_conversions" in state:  # absent in checkpoints of one-head learners
            self.seen_conversions.load(state["seen_conversions"])
        self.gen.set_state(state["generator"])
        self.learned = int(state["learned"])
        self.clicks = int(state["clicks"])
        self.conversions = int(state.get("conversions", 0))
        self.checksum = int(state["checksum"])


def export_version(
    model: CtrNet, spec: FeatureSpec, out_dir: Path, version: str, metrics: Mapping[str, Any]
) -> Path:
    """Write ``out_dir/version/`` (ONNX verified against PyTorch, weights, spec, metrics).

    Written under a temporary name and renamed into place, as every registry
    version is, so no reader sees half of it. Returns the version's directory.
    """
    import shutil  # noqa: PLC0415

    from scoring.model import export_onnx  # noqa: PLC0415
    from scoring.registry import CHECKPOINT, METRICS, MODEL, SPEC  # noqa: PLC0415

    final = out_dir / version
    if final.exists():
        msg = f"{final} already exists"
        raise FileExistsError(msg)
    tmp = out_dir / f".{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    diff = export_onnx(model, tmp / MODEL, spec)
    save_weights(model, tmp / CHECKPOINT)
    (tmp / SPEC).write_text(spec.to_json() + "\n", encoding="utf-8")
    body = {**metrics, "onnx_max_abs_diff": diff}
    (tmp / METRICS).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    tmp.rename(final)
    return final
