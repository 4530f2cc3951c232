"""The online learner (scoring/online.py): exact resume, bounded replay, dedupe, weights files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from scoring.featurespec import FeatureSpec, from_feedback  # noqa: E402
from scoring.model import CtrNet  # noqa: E402
from scoring.online import (  # noqa: E402
    OnlineLearner,
    atomic_save,
    build,
    load_saved,
    load_weights,
    save_weights,
)
from scoring.registry import ModelRegistry  # noqa: E402
from scoring.replay import DedupeRing, ReplayBuffer  # noqa: E402
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
    return OnlineLearner(CtrNet(SPEC), lr=1e-3, replay=100, dedupe_ids=1000)


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
    resumed = OnlineLearner(build(SPEC, saved["arch"]), lr=1e-3, replay=100,
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


SEQ_SPEC = FeatureSpec(sequence=8)


def _seq_batches(n_batches: int, size: int = 64) -> list[tuple[dict, np.ndarray, list[str], tuple]]:
    """Label batches of a sequence model's log, each with the conversions that followed."""
    from scoring.sequence import behaviour_ids

    recs = generate(n_batches * size * 2, seed=5, conversions=True, sequence=8)

    def inputs(part: list[dict]) -> dict:
        x = from_feedback(part, SEQ_SPEC)
        x["behaviours"], x["seq_len"] = behaviour_ids(part, SEQ_SPEC)
        return x

    labels = [r for r in recs if r.get("converted") != 1]
    convs = {r["decision_id"]: r for r in recs if r.get("converted") == 1}
    out = []
    for i in range(n_batches):
        part = labels[i * size : (i + 1) * size]
        conv = [convs[r["decision_id"]] for r in part if r["decision_id"] in convs]
        y = np.array([r["clicked"] for r in part], dtype=np.float32)
        cx = (inputs(conv), [r["decision_id"] for r in conv]) if conv else None
        out.append((inputs(part), y, [r["decision_id"] for r in part], cx))
    return out


def _seq_learner(seed: int = 1) -> OnlineLearner:
    torch.manual_seed(seed)
    return OnlineLearner(CtrNet(SEQ_SPEC, cvr_head=True), lr=1e-3, replay=100,
                         dedupe_ids=1000)  # fmt: skip


def test_the_behaviour_ids_the_replay_keeps_rebuild_the_sequence_input_serving_sees() -> None:
    from scoring.embeddings import HashedEmbeddings
    from scoring.sequence import behaviour_ids, behaviour_inputs

    recs = generate(300, seed=3, sequence=8)
    recs[0]["features"]["sequence"] = []  # a user with no behaviours
    ids, lengths = behaviour_ids(recs, SEQ_SPEC)
    table = HashedEmbeddings(SEQ_SPEC.dim, SEQ_SPEC.embedding_seed)
    got = behaviour_inputs(ids, lengths, SEQ_SPEC, table)
    assert np.array_equal(got, from_feedback(recs, SEQ_SPEC)["seq"])
    assert lengths[0] == 0 and lengths.max() == 8


def test_a_sequence_model_with_two_heads_learns_both_and_resumes_exactly(
    tmp_path: Path,
) -> None:
    batches = _seq_batches(4)
    assert sum(len(b[3][1]) for b in batches if b[3]) > 0  # conversions among them
    straight = _seq_learner()
    assert (straight.spec.sequence, straight.heads) == (8, 2)  # the weights' spec wins
    cvr_before = [p.detach().clone() for p in straight.model.cvr.parameters()]
    for x, y, ids, conv in batches:
        straight.learn(x, y, ids, conv)
    assert straight.conversions == sum(len(b[3][1]) for b in batches if b[3])
    assert straight.is_duplicate_conversion(next(b[3][1][0] for b in batches if b[3]))
    moved = [not torch.equal(a, b) for a, b in zip(cvr_before, straight.model.cvr.parameters(),
                                                   strict=True)]  # fmt: skip
    assert all(moved)  # the pCVR head learns too
    attention = straight.model.attention
    assert attention is not None and attention.k.weight.grad is not None  # and attention

    first = _seq_learner()
    for x, y, ids, conv in batches[:2]:
        first.learn(x, y, ids, conv)
    atomic_save(first.state(), tmp_path / "ckpt.pt")
    saved = load_saved(tmp_path / "ckpt.pt")
    assert saved is not None and saved["arch"]["sequence"] == 8
    torch.manual_seed(99)
    resumed = OnlineLearner(build(SPEC, saved["arch"]), lr=1e-3, replay=100,
                            dedupe_ids=1000)  # fmt: skip
    resumed.load(saved)
    for x, y, ids, conv in batches[2:]:
        resumed.learn(x, y, ids, conv)
    for (name, a), (_, b) in zip(straight.model.state_dict().items(),
                                 resumed.model.state_dict().items(), strict=True):  # fmt: skip
        assert torch.equal(a, b), name
    assert (resumed.learned, resumed.conversions, resumed.checksum) == (
        straight.learned, straight.conversions, straight.checksum)  # fmt: skip


def test_a_learned_sequence_model_exports_a_version_the_registry_serves_as_pytorch_scores(
    tmp_path: Path,
) -> None:
    import math

    from scoring.online import export_version
    from scoring.registry import validate

    learner = _seq_learner()
    for x, y, ids, conv in _seq_batches(2):
        learner.learn(x, y, ids, conv)
    path = export_version(learner.model, learner.spec, tmp_path, "20990101T000000Z", {})
    loaded = validate(path, FeatureSpec(), latency_budget_ms=math.inf)  # the serving spec
    assert loaded.spec.sequence == 8 and loaded.scorer.heads == 2
    x = _seq_batches(1)[0][0]
    want = learner.score(x)
    onnx_in = {k: x[k] for k in SEQ_SPEC.input_names}
    got = loaded.scorer.score_heads(onnx_in)
    assert np.max(np.abs(got[0] - want)) < 1e-5
    back = load_weights(path / "model.pt", FeatureSpec())
    assert back.spec.sequence == 8 and back.cvr is not None


@pytest.mark.long  # 5-11 s: make test stays under 10 minutes
def test_clicks_early_and_non_clicks_late_leave_the_learner_calibrated(tmp_path: Path) -> None:
    """The joiner sends a click's label at once and a non-click's when its window closes,
    so polls bring small click-rich batches and larger click-free ones. Learned as they
    come, from a calibrated start, pCTR must stay calibrated (it once rose sixfold:
    observed/expected 1.1 -> 0.14 here, one equal step per batch whatever its size)."""
    from scoring.synthetic import make_world
    from scoring.train import train

    world = make_world(11)
    recs = generate(36_000, seed=11, world=world)
    for i, r in enumerate(recs):
        r["decision_id"] = f"d{i}"
    train(recs[:16_000], tmp_path, epochs=2, threads=1, version="v1")
    stream, held = recs[16_000:30_000], recs[30_000:]
    torch.manual_seed(0)
    learner = OnlineLearner(load_weights(tmp_path / "v1" / "model.pt", SPEC), lr=5e-4,
                            replay=20_000)  # fmt: skip

    def observed_over_expected(rs: list[dict]) -> float:
        y = np.array([r["clicked"] for r in rs])
        return float(y.sum() / learner.score(from_feedback(rs, SPEC)).sum())

    start = observed_over_expected(held)
    assert 0.8 <= start <= 1.25  # the start version is calibrated
    # per 100 decisions: their clicks as one batch at once, their non-clicks 3 batches later
    chunks = [stream[i : i + 100] for i in range(0, len(stream), 100)]
    lag, polls = 3, []
    for i in range(len(chunks) + lag):
        if i < len(chunks):
            polls.append([r for r in chunks[i] if r["clicked"]])
        if i >= lag:
            polls.append([r for r in chunks[i - lag] if not r["clicked"]])
    ys, ps = [], []
    for batch in (b for b in polls if b):
        x = from_feedback(batch, SPEC)
        y = np.array([r["clicked"] for r in batch], dtype=np.float32)
        ps.append(learner.score(x))  # progressive validation: scored before it is learned
        ys.append(y)
        learner.learn(x, y, [r["decision_id"] for r in batch])
    y, p = np.concatenate(ys), np.concatenate(ps)
    late = len(y) // 2
    progressive = float(y[late:].sum() / p[late:].sum())  # the stream's second half
    end = observed_over_expected(held)
    assert 0.8 <= progressive <= 1.25, (start, progressive, end)
    assert 0.8 <= end <= 1.25, (start, progressive, end)
    assert learner.learned == len(stream) and learner.steps == len(stream) // 128


def test_rows_pending_for_a_full_step_are_in_the_checkpoint_and_learned_once_after_a_restart(
    tmp_path: Path,
) -> None:
    batches = _batches(6, size=50)  # 300 rows: steps of 128 leave rows pending between polls

    def learner() -> OnlineLearner:
        torch.manual_seed(1)
        return OnlineLearner(CtrNet(SPEC), lr=1e-3, replay=100, dedupe_ids=1000,
                             step_rows=128)  # fmt: skip

    straight = learner()
    for x, y, ids in batches:
        straight.learn(x, y, ids)
    assert (straight.steps, straight.pending_rows) == (2, 300 - 256)

    first = learner()
    for x, y, ids in batches[:3]:  # 150 rows: one step, 22 pending
        first.learn(x, y, ids)
    assert (first.steps, first.pending_rows) == (1, 22)
    atomic_save(first.state(), tmp_path / "ckpt.pt")
    saved = load_saved(tmp_path / "ckpt.pt")
    assert saved is not None
    resumed = learner()
    resumed.load(saved)
    assert resumed.pending_rows == 22
    for x, y, ids in batches[3:]:
        resumed.learn(x, y, ids)
    for (name, a), (_, b) in zip(straight.model.state_dict().items(),
                                 resumed.model.state_dict().items(), strict=True):  # fmt: skip
        assert torch.equal(a, b), name
    assert (resumed.learned, resumed.checksum, resumed.steps, resumed.pending_rows) == (
        straight.learned, straight.checksum, straight.steps, straight.pending_rows)  # fmt: skip
