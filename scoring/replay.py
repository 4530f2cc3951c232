"""The online learner's two rings: the replay buffer of learned rows and the dedupe ring.

Both are part of the learner's checkpoint (scoring/online.py): ``state`` gives
tensors ``torch.save`` can write with ``weights_only`` loading, ``load`` takes
them back so a restored learner draws and refuses exactly as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from scoring.featurespec import FeatureSpec, Inputs

SEQ_IDS = ("behaviours", "seq_len")  # a sequence model's rows: ids, not vectors (module doc)


class ReplayBuffer:
    """The last ``capacity`` learned rows (inputs and labels), oldest overwritten first.

    Labels per row: ``y`` clicked, ``c`` converted, ``m`` 1 when the row is in pCTR's log
    loss (a label) and 0 when it is only in ESMM's pCTR x pCVR loss (a conversion).
    """

    def __init__(self, capacity: int, spec: FeatureSpec) -> None:
        self.capacity = capacity
        self.x: dict[str, npt.NDArray[Any]] = {
            i.name: np.zeros((capacity, i.width), dtype=i.dtype) for i in spec.inputs if not i.seq
        }
        if spec.sequence:
            self.x["behaviours"] = np.zeros((capacity, spec.sequence, 2), dtype=np.int64)
            self.x["seq_len"] = np.zeros(capacity, dtype=np.int64)
        self.y = np.zeros(capacity, dtype=np.float32)
        self.c = np.zeros(capacity, dtype=np.float32)
        self.m = np.ones(capacity, dtype=np.float32)
        self._next = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(
        self,
        x: Inputs,
        y: npt.NDArray[np.float32],
        c: npt.NDArray[np.float32] | None = None,
        m: npt.NDArray[np.float32] | None = None,
    ) -> None:
        n = min(len(y), self.capacity)
        if n == 0:
            return
        idx = (self._next + np.arange(n)) % self.capacity
        for k, v in self.x.items():
            v[idx] = x[k][-n:]
        self.y[idx] = y[-n:]
        self.c[idx] = 0.0 if c is None else c[-n:]
        self.m[idx] = 1.0 if m is None else m[-n:]
        self._next = int((self._next + n) % self.capacity)
        self._count = min(self.capacity, self._count + n)

    def sample(self, n: int, gen: torch.Generator) -> tuple[Inputs, npt.NDArray[np.float32]]:
        """``n`` rows drawn uniformly with replacement (``gen``: so a restart draws the same)."""
        x, labels = self.sample_rows(n, gen)
        return x, labels[0]

    def sample_rows(
        self, n: int, gen: torch.Generator
    ) -> tuple[Inputs, tuple[npt.NDArray[np.float32], ...]]:
        """As :meth:`sample`, with all three labels (y, c, m)."""
        idx = torch.randint(0, self._count, (n,), generator=gen).numpy()
        return {k: v[idx] for k, v in self.x.items()}, (self.y[idx], self.c[idx], self.m[idx])

    def state(self) -> dict[str, Any]:
        """The filled part of the ring as laid out (rows 0..count-1) and where the next goes:
        a restored buffer samples the same rows for the same random draws."""
        n = self._count
        return {
            "x": {k: torch.from_numpy(np.ascontiguousarray(v[:n])) for k, v in self.x.items()},
            "y": torch.from_numpy(np.ascontiguousarray(self.y[:n])),
            "c": torch.from_numpy(np.ascontiguousarray(self.c[:n])),
            "m": torch.from_numpy(np.ascontiguousarray(self.m[:n])),
            "next": self._next,
        }

    def load(self, state: Mapping[str, Any]) -> None:
        x = {k: v.numpy() for k, v in state["x"].items()}
        y = state["y"].numpy()
        # a checkpoint written before the two-head learner: every row a label, none converted
        c = state["c"].numpy() if "c" in state else np.zeros_like(y)
        m = state["m"].numpy() if "m" in state else np.ones_like(y)
        nxt = int(state["next"])
        if len(y) <= self.capacity and (nxt == len(y) or len(y) == self.capacity):
            for k, v in self.x.items():  # same layout: the same draws pick the same rows
                v[: len(y)] = x[k]
            self.y[: len(y)], self.c[: len(y)], self.m[: len(y)] = y, c, m
            self._next, self._count = nxt % self.capacity, len(y)
            return
        order = (nxt + np.arange(len(y))) % len(y)  # capacity changed: oldest first
        self.add({k: v[order] for k, v in x.items()}, y[order], c[order], m[order])


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
