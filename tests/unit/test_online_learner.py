"""The online learner (scoring/online.py): exact resume, bounded replay, dedupe, weights files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from scoring.featurespec import FeatureSpec, from_feedback  # noqa: E402
from scoring.model import CtrNet  # noqa: E402
from scoring.online import (  # noqa: E402
    DedupeRing,
    OnlineLearner,
    ReplayBuffer,
    atomic_save,
    build,
    load_saved,
    load_weights,
    save_weights,
)
from scoring.registry import ModelRegistry  # noqa: E402
from scoring.synthetic import generate  # noqa: E402

SPEC = FeatureSpec()


def _batches(n_batches: int, size: int = 64) -> list[tuple[dict, np.ndarray, list[str]]]:
    recs = generate(n_batches * size, seed=5)
    out = []
    for i in range(n_batches):
        part = recs[i * size : (i + 1) * size]
        for j, r in enumerate(part):
            r["decision_id"] = f"d{i}-{j}"
        x = from_feedback(part, SPEC)
        y = np.array([r["clicked"] for r in part], dtype=np.float32)
        out.append((x, y, [r["decision_id"] for r in part]))
    return out


def _learner(seed: int = 1) -> OnlineLearner:
    torch.manual_seed(seed)
    return OnlineLearner(CtrNet(SPEC), SPEC, lr=1e-3, replay=100, dedupe_ids=1000)


def test_a_learner_restored_from_its_checkpoint_continues_exactly_as_if_never_stopped(
    tmp_path: Path,
) -> None:
    batches = _batches(5)
    straight = _learner()
    for x, y, ids in batches:
        straight.learn(x, y, ids)

    first = _learner()
    for x, y, ids in batches[:2]:
        first.learn(x, y, ids)
    atomic_save(first.state(), tmp_path / "ckpt.pt")
    saved = load_saved(tmp_path / "ckpt.pt")
    assert saved is not None
    torch.manual_seed(99)  # a restart initialises other weights: the checkpoint must win
    resumed = OnlineLearner(build(SPEC, saved["arch"]), SPEC, lr=1e-3, replay=100,
                            dedupe_ids=1000)  # fmt: skip
    resumed.load(saved)
    for x, y, ids in batches[2:]:
        resumed.learn(x, y, ids)

    for (name, a), (_, b) in zip(straight.model.state_dict().items(),
                                 resumed.model.state_dict().items(), strict=True):  # fmt: skip
        assert torch.equal(a, b), name
    assert (resumed.learned, resumed.checksum) == (straight.learned, straight.checksum)
    assert resumed.learned == 5 * 64


def test_the_replay_ring_is_bounded_and_keeps_the_newest_rows() -> None:
    buf = ReplayBuffer(50, SPEC)
    for i in range(10):
        x = {k: np.full((30, v.width), i, dtype=v.dtype) for k, v in
             ((s.name, s) for s in SPEC.inputs)}  # fmt: skip
        buf.add(x, np.full(30, i % 2, dtype=np.float32))
    assert len(buf) == 50
    kept = sorted(buf.state()["x"]["dense"][:, 0].numpy().tolist())
    assert kept == [8.0] * 20 + [9.0] * 30  # only the last 50 rows
    smaller = ReplayBuffer(25, SPEC)  # restarted with a smaller ring: keeps the newest
    smaller.load(buf.state())
    assert sorted(smaller.state()["x"]["dense"][:, 0].numpy().tolist()) == [9.0] * 25
    x, y = buf.sample(200, torch.Generator().manual_seed(0))
    assert set(np.unique(x["dense"][:, 0]).tolist()) <= {8.0, 9.0} and len(y) == 200


def test_the_dedupe_ring_forgets_the_oldest_id_beyond_its_capacity() -> None:
    ring = DedupeRing(3)
    for fp in (1, 2, 3, 4):
        ring.add(fp)
    assert 1 not in ring and all(fp in ring for fp in (2, 3, 4))
    back = DedupeRing(3)
    back.load(ring.state())
    assert back.ordered() == [2, 3, 4]
    big = DedupeRing(2)
    big.add(2**64 - 1)  # fingerprints are unsigned 64-bit: survive the int64 tensor
    again = DedupeRing(2)
    again.load(big.state())
    assert 2**64 - 1 in again


def test_a_learned_decision_id_is_a_duplicate() -> None:
    learner = _learner()
    x, y, ids = _batches(1)[0]
    assert not learner.is_duplicate(ids[0])
    learner.learn(x, y, ids)
    assert learner.is_duplicate(ids[0]) and not learner.is_duplicate("never-seen")


def test_weights_saved_beside_a_version_load_back_into_the_same_model(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = CtrNet(SPEC, hidden=(16, 8), cross_rank=4)
    save_weights(model, tmp_path / "model.pt")
    back = load_weights(tmp_path / "model.pt", SPEC)
    x = SPEC.golden_inputs(10)
    args = [torch.from_numpy(x[k]) for k in SPEC.input_names]
    with torch.no_grad():
        assert torch.equal(model(*args), back(*args))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"bad\.pt: not a model checkpoint"):
        load_weights(tmp_path / "bad.pt", SPEC)


def test_the_candidates_folder_is_not_a_version_the_registry_serves(tmp_path: Path) -> None:
    (tmp_path / "candidates" / "20990101T000000Z").mkdir(parents=True)
    (tmp_path / "20240101T000000Z").mkdir()
    assert ModelRegistry(tmp_path, SPEC).versions() == ["20240101T000000Z"]
