"""The online CTR learner: warm-started weights, one update per batch of labels, replay, dedupe.

Why these choices:

* **Warm start.** The learner begins from the serving version's PyTorch weights
  (``model.pt``, kept beside ``model.onnx`` by ``adpulse train``), so it refines
  what serves instead of relearning it from a few minutes of labels.
* **Adam at a small learning rate** (``ADPULSE_TRAINER_LR``, default 5e-4, a quarter
  of the offline trainer's 2e-3): one step per batch of new labels. Adam's
  per-parameter step sizes suit the sparse id embeddings, whose rows see a label
  only now and then (McMahan et al., KDD 2013, argue the same for per-coordinate
  rates); a small rate keeps one unlucky batch from moving the served model far.
* **A replay buffer** of the last ``ADPULSE_TRAINER_REPLAY`` labelled rows (a ring:
  bounded memory, about 0.6 KB a row at dim 64). Each step learns the new batch
  together with as many rows drawn uniformly from the buffer: the gradient of a
  batch of a few hundred fresh labels is noisy, and mixing in the recent past
  damps that noise and the forgetting a stream of one-pass updates causes, while
  a ring (not a reservoir) keeps the mix recent when the world drifts.
* **Dedupe by decision id.** A label's identity is its ``decision_id``; the
  joiner's one duplicate window may send a label twice. The learner keeps the
  fingerprints of the last ``ADPULSE_TRAINER_DEDUPE_IDS`` learned decision ids and
  refuses a repeat.

Everything a restart needs is in :meth:`OnlineLearner.state`: weights, Adam's
moments, the replay ring, the dedupe ring, the sampling generator, and a ledger
(labels learned and the sum of their decision-id fingerprints mod 2**64, so a
test can prove each label was learned exactly once).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from scoring.features import fingerprint
from scoring.featurespec import FeatureSpec, Inputs
from scoring.model import CtrNet

CHECKPOINT_FORMAT = 1
_MASK64 = (1 << 64) - 1


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
        "cvr_head": model.cvr is not None,  # kept as trained: the online learner fits pCTR
    }


def build(spec: FeatureSpec, arch: Mapping[str, Any]) -> CtrNet:
    return CtrNet(
        spec,
        hidden=tuple(int(h) for h in arch["hidden"]),
        cross_rank=int(arch["cross_rank"]),
        cross_layers=int(arch["cross_layers"]),
        cvr_head=bool(arch.get("cvr_head", False)),
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


class ReplayBuffer:
    """The last ``capacity`` labelled rows (inputs and labels), oldest overwritten first."""

    def __init__(self, capacity: int, spec: FeatureSpec) -> None:
        self.capacity = capacity
        self.x = {i.name: np.zeros((capacity, i.width), dtype=i.dtype) for i in spec.inputs}
        self.y = np.zeros(capacity, dtype=np.float32)
        self._next = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, x: Inputs, y: npt.NDArray[np.float32]) -> None:
        n = min(len(y), self.capacity)
        if n == 0:
            return
        idx = (self._next + np.arange(n)) % self.capacity
        for k, v in self.x.items():
            v[idx] = x[k][-n:]
        self.y[idx] = y[-n:]
        self._next = int((self._next + n) % self.capacity)
        self._count = min(self.capacity, self._count + n)

    def sample(self, n: int, gen: torch.Generator) -> tuple[Inputs, npt.NDArray[np.float32]]:
        """``n`` rows drawn uniformly with replacement (``gen``: so a restart draws the same)."""
        idx = torch.randint(0, self._count, (n,), generator=gen).numpy()
        return {k: v[idx] for k, v in self.x.items()}, self.y[idx]

    def state(self) -> dict[str, Any]:
        """The filled part of the ring as laid out (rows 0..count-1) and where the next goes:
        a restored buffer samples the same rows for the same random draws."""
        n = self._count
        return {
            "x": {k: torch.from_numpy(np.ascontiguousarray(v[:n])) for k, v in self.x.items()},
            "y": torch.from_numpy(np.ascontiguousarray(self.y[:n])),
            "next": self._next,
        }

    def load(self, state: Mapping[str, Any]) -> None:
        x = {k: v.numpy() for k, v in state["x"].items()}
        y = state["y"].numpy()
        nxt = int(state["next"])
        if len(y) <= self.capacity and (nxt == len(y) or len(y) == self.capacity):
            for k, v in self.x.items():  # same layout: the same draws pick the same rows
                v[: len(y)] = x[k]
            self.y[: len(y)] = y
            self._next, self._count = nxt % self.capacity, len(y)
            return
        order = (nxt + np.arange(len(y))) % len(y)  # capacity changed: oldest first
        self.add({k: v[order] for k, v in x.items()}, y[order])


class DedupeRing:
    """Fingerprints of the last ``capacity`` decision ids learned, with a set to look them up."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ring: list[int] = []
        self._start = 0  # index of the oldest entry once the ring is full
        self._set: set[int] = set()

    def __contains__(self, fp: int) -> bool:
        return fp in self._set

    def add(self, fp: int) -> None:
        if len(self._ring) < self.capacity:
            self._ring.append(fp)
        else:
            self._set.discard(self._ring[self._start])
            self._ring[self._start] = fp
            self._start = (self._start + 1) % self.capacity
        self._set.add(fp)

    def ordered(self) -> list[int]:
        return self._ring[self._start :] + self._ring[: self._start]

    def state(self) -> torch.Tensor:
        return torch.from_numpy(np.array(self.ordered(), dtype=np.uint64).view(np.int64))

    def load(self, state: torch.Tensor) -> None:
        for fp in state.numpy().view(np.uint64).tolist()[-self.capacity :]:
            self.add(int(fp))


class OnlineLearner:
    """One CTR model learning from a stream of labelled batches (see the module docstring)."""

    def __init__(
        self,
        model: CtrNet,
        spec: FeatureSpec,
        *,
        lr: float = 5e-4,
        replay: int = 20_000,
        dedupe_ids: int = 200_000,
        seed: int = 7,
    ) -> None:
        self.model, self.spec, self.lr = model, spec, lr
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)
        self.replay = ReplayBuffer(replay, spec)
        self.seen = DedupeRing(dedupe_ids)
        self.gen = torch.Generator().manual_seed(seed)
        self.learned = 0  # labels learned since the warm start
        self.clicks = 0
        self.checksum = 0  # sum of learned decision-id fingerprints mod 2**64
        self._loss = torch.nn.BCEWithLogitsLoss()

    def is_duplicate(self, decision_id: str) -> bool:
        return fingerprint(decision_id) in self.seen

    def _tensors(self, x: Inputs) -> list[torch.Tensor]:
        return [torch.from_numpy(np.ascontiguousarray(x[k])) for k in self.spec.input_names]

    def score(self, x: Inputs) -> npt.NDArray[np.float64]:
        """pCTR of each row by the current weights (the progressive-validation prediction)."""
        self.model.eval()
        with torch.no_grad():
            out = self.model(*self._tensors(x))
        scores: npt.NDArray[np.float64] = out.numpy().reshape(-1).astype(np.float64)
        return scores

    def learn(self, x: Inputs, y: npt.NDArray[np.float32], decision_ids: list[str]) -> float:
        """One Adam step on the batch plus as many replayed rows; returns the batch's loss.

        The caller has dropped duplicates (:meth:`is_duplicate`) and scored the batch first.
        """
        n = len(y)
        if n == 0:
            return float("nan")
        xs, ys = x, y
        k = min(len(self.replay), n)
        if k:
            rx, ry = self.replay.sample(k, self.gen)
            xs = {name: np.concatenate([x[name], rx[name]]) for name in x}
            ys = np.concatenate([y, ry])
        self.model.train()
        self.opt.zero_grad()
        logits = self.model.logits(*self._tensors(xs))
        loss = self._loss(logits, torch.from_numpy(ys.astype(np.float32)).reshape(-1, 1))
        loss.backward()
        self.opt.step()
        self.replay.add(x, y)
        for did in decision_ids:
            fp = fingerprint(did)
            self.seen.add(fp)
            self.checksum = (self.checksum + fp) & _MASK64
        self.learned += n
        self.clicks += int(y.sum())
        return float(loss.detach())

    def state(self) -> dict[str, Any]:
        """Everything a restart needs to continue exactly where this learner is."""
        return {
            "format": CHECKPOINT_FORMAT,
            "arch": arch_of(self.model),
            "state_dict": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "replay": self.replay.state(),
            "seen": self.seen.state(),
            "generator": self.gen.get_state(),
            "learned": self.learned,
            "clicks": self.clicks,
            "checksum": self.checksum,
        }

    def load(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["state_dict"])
        self.opt.load_state_dict(state["optimizer"])
        for group in self.opt.param_groups:
            group["lr"] = self.lr  # the configured rate wins over the saved one
        self.replay.load(state["replay"])
        self.seen.load(state["seen"])
        self.gen.set_state(state["generator"])
        self.learned = int(state["learned"])
        self.clicks = int(state["clicks"])
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
