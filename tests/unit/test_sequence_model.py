"""The CTR net with target attention: ONNX scores are PyTorch's at any batch and sequence
length, the registry validates and serves it, and serving feeds it the right rows."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from scoring.embeddings import HashedEmbeddings
from scoring.features import EventBatch
from scoring.featurespec import (
    AdIndex,
    FeatureSpec,
    RequestFeatures,
    assemble_many,
    from_feedback,
    item_vectors,
)
from scoring.registry import MODEL, SPEC, ModelRegistry, validate
from scoring.scorer import OnnxScorer, SessionOptions
from scoring.sequence import apply_sequences, decode_sequences, sequence_vectors

torch = pytest.importorskip("torch")
from scoring.model import CtrNet, export_onnx  # noqa: E402

PLAIN = FeatureSpec(dim=16)
SEQ = replace(PLAIN, sequence=12)
ONE_THREAD = SessionOptions(intra_op_threads=1)


def _publish(root: Path, name: str, spec: FeatureSpec, seed: int = 0) -> CtrNet:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = CtrNet(spec)
    with torch.no_grad():  # an untrained block's weights are near zero: make it matter
        for p in model.parameters():
            p.mul_(4.0)
    export_onnx(model, root / name / MODEL, spec)
    (root / name / SPEC).write_text(spec.to_json())
    return model


def _torch(model: CtrNet, x: dict[str, np.ndarray], spec: FeatureSpec) -> np.ndarray:
    """The model in float64: the exact reference for ONNX Runtime's float32 scores.

    Against PyTorch's own float32 the gap is both runtimes' rounding: 1.2e-5 at 64 rows x
    30 behaviours on an AMD EPYC (ONNX Runtime 4.9e-6 from float64, PyTorch 7.4e-6)."""
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        args = (torch.from_numpy(x[k]) for k in spec.input_names)
        out = exact(*(a.double() if a.is_floating_point() else a for a in args))
        return out.numpy().reshape(-1)


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CtrNet]:
    root = tmp_path_factory.mktemp("models")
    _publish(root, "v1", PLAIN)
    return root, _publish(root, "v2", SEQ, seed=1)


@pytest.mark.parametrize(("n", "length"), [(1, 1), (37, 5), (300, 12), (64, 30)])
def test_onnx_scores_equal_pytorch_for_the_sequence_model(
    registry_dir: tuple[Path, CtrNet], n: int, length: int
) -> None:
    root, model = registry_dir
    x = replace(SEQ, sequence=length).golden_inputs(n, seed=n)
    got = OnnxScorer(root / "v2" / MODEL, device="cpu", options=ONE_THREAD).score(x)
    assert np.max(np.abs(got - _torch(model, x, SEQ))) <= 1e-5


def test_padding_rows_change_no_score(registry_dir: tuple[Path, CtrNet]) -> None:
    root, _ = registry_dir
    scorer = OnnxScorer(root / "v2" / MODEL, device="cpu", options=ONE_THREAD)
    x = SEQ.golden_inputs(50, seed=3)
    longer = {**x, "seq": np.concatenate([x["seq"], np.zeros((50, 7, 16), np.float32)], axis=1)}
    assert np.allclose(scorer.score(x), scorer.score(longer), atol=1e-6)


def test_the_behaviours_move_the_score(registry_dir: tuple[Path, CtrNet]) -> None:
    root, _ = registry_dir
    scorer = OnnxScorer(root / "v2" / MODEL, device="cpu", options=ONE_THREAD)
    x = SEQ.golden_inputs(50, seed=4)
    none = {**x, "seq": np.zeros_like(x["seq"])}
    assert np.max(np.abs(scorer.score(x) - scorer.score(none))) > 1e-4


def test_registry_validates_and_serves_the_sequence_model_after_a_plain_one(
    registry_dir: tuple[Path, CtrNet],
) -> None:
    root, _ = registry_dir
    reg = ModelRegistry(root / "missing", PLAIN, options=ONE_THREAD, latency_budget_ms=1e4)
    reg.root = root
    first = validate(root / "v1", PLAIN, options=ONE_THREAD, latency_budget_ms=1e4)
    reg.current = first
    swapped = reg.poll()  # the hot-swap: v2 is newer, attends over behaviours
    assert swapped is not None and swapped.version == "v2"
    assert swapped.spec.sequence == 12 and first.spec.sequence == 0
    assert swapped.spec.input_names == (*PLAIN.input_names, "seq")


def test_a_model_whose_seq_axis_is_not_dynamic_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CtrNet(SEQ)
    x = SEQ.golden_inputs(4)
    d = tmp_path / "fixed"
    d.mkdir()
    torch.onnx.export(
        model, tuple(torch.from_numpy(x[k]) for k in SEQ.input_names), str(d / MODEL),
        input_names=list(SEQ.input_names), output_names=["pctr"],
        dynamic_axes={k: {0: "batch"} for k in [*SEQ.input_names, "pctr"]},
        opset_version=17, dynamo=False,
    )  # fmt: skip
    (d / SPEC).write_text(SEQ.to_json())
    with pytest.raises(Exception, match="seq, 16"):
        validate(d, PLAIN, options=ONE_THREAD, latency_budget_ms=1e4)


def test_serving_rows_equal_training_rows_for_the_same_behaviours() -> None:
    table = HashedEmbeddings(SEQ.dim, SEQ.embedding_seed)
    ads = AdIndex.build([{"ad_id": "a", "campaign_id": "c", "category_id": 3, "bid": 1.0}], SEQ)
    n = 3  # one user's three behaviours, arriving oldest first
    batch = EventBatch(np.zeros(n, np.int64), np.zeros(n, np.uint8), np.array([11, 12, 13]),
                       np.array([1, 2, 1]), np.array([100, 200, 300]), np.array([7, 8, 9],
                       np.uint64), np.full(n, -1, np.int64))  # fmt: skip
    seqs, _ = apply_sequences(decode_sequences([None]), batch, SEQ.sequence)
    vecs = sequence_vectors(seqs, table, SEQ)
    served = assemble_many([RequestFeatures(None, ads.rows(["a", "a"]), "p", None, vecs[0]),
                            RequestFeatures(None, ads.rows(["a"]), "p", None, None)],
                           ads, 0, SEQ)  # fmt: skip
    assert served["seq"].shape == (3, 3, 16)
    assert np.allclose(served["seq"][0], item_vectors(table, [13, 12, 11], [1, 2, 1], SEQ))
    assert not served["seq"][2].any()
    logged = from_feedback(
        [{"decision_ts": 0, "features": {"interest": [], "category_id": 3, "campaign_id": "c",
                                         "sequence": [[13, 1], [12, 2], [11, 1]]}}], SEQ
    )  # fmt: skip
    assert np.allclose(logged["seq"][0], served["seq"][0])


def test_a_plain_net_has_no_block_and_no_seq_input(registry_dir: tuple[Path, CtrNet]) -> None:
    root, _ = registry_dir
    assert CtrNet(PLAIN).attention is None
    assert not any(k.startswith("attention") for k in CtrNet(PLAIN).state_dict())
    scorer = OnnxScorer(root / "v1" / MODEL, device="cpu", options=ONE_THREAD)
    assert [i.name for i in scorer.session.get_inputs()] == ["user", "ad", "ids", "dense"]


def test_a_sequence_model_with_the_cvr_head_exports_and_validates(tmp_path: Path) -> None:
    torch.manual_seed(2)
    d = tmp_path / "v1"
    export_onnx(CtrNet(SEQ, cvr_head=True), d / MODEL, SEQ)  # both outputs checked at 1 and 12
    (d / SPEC).write_text(SEQ.to_json())
    loaded = validate(d, PLAIN, options=ONE_THREAD, latency_budget_ms=1e4)
    outputs = [o.name for o in loaded.scorer.session.get_outputs()]  # type: ignore[attr-defined]
    assert loaded.spec.sequence == 12 and outputs == ["pctr", "pcvr"]


def test_one_request_passes_its_sequence_once_and_scores_as_repeated(
    registry_dir: tuple[Path, CtrNet],
) -> None:
    """All candidates of a request share the user's sequence: sent once ([1, L, D]), the graph
    takes its shared-sequence form, and each score is the one the repeated rows give (the
    general form) up to float rounding: the same function, summed in another order."""
    root, model = registry_dir
    table = HashedEmbeddings(SEQ.dim, SEQ.embedding_seed)
    ads = AdIndex.build([{"ad_id": f"a{i}", "campaign_id": "c", "category_id": i, "bid": 1.0}
                         for i in range(50)], SEQ)  # fmt: skip
    vecs = item_vectors(table, np.arange(100, 109), np.arange(9) % 4, SEQ)
    req = RequestFeatures(None, ads.rows([f"a{i}" for i in range(50)]), "p", None, vecs)
    one = assemble_many([req], ads, 0, SEQ)
    assert one["seq"].shape == (1, 9, SEQ.dim) and one["ad"].shape[0] == 50
    repeated = {**one, "seq": np.repeat(one["seq"], 50, axis=0)}
    scorer = OnnxScorer(root / "v2" / MODEL, device="cpu", options=ONE_THREAD)
    assert np.max(np.abs(scorer.score(one) - scorer.score(repeated))) <= 1e-5  # export tolerance
    assert np.allclose(scorer.score(one), _torch(model, repeated, SEQ), atol=1e-5)
    two = assemble_many([req, req], ads, 0, SEQ)  # two requests: one row per candidate
    assert two["seq"].shape == (100, 9, SEQ.dim)


def test_the_numpy_scorer_runs_the_sequence_model_as_onnx_runtime(
    registry_dir: tuple[Path, CtrNet],
) -> None:
    """`adpulse bench scorer`'s baseline runs the shipped sequence model: same scores."""
    from scoring.scorer import NumpyScorer

    root, _ = registry_dir
    x = SEQ.golden_inputs(57, seed=5)
    got = NumpyScorer(root / "v2" / MODEL).score(x)
    want = OnnxScorer(root / "v2" / MODEL, device="cpu", options=ONE_THREAD).score(x)
    assert np.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize(("n", "length"), [(1, 1), (100, 12), (7, 30), (0, 12)])
def test_a_shared_sequence_scores_as_pytorch_on_the_repeated_rows(
    registry_dir: tuple[Path, CtrNet], n: int, length: int
) -> None:
    """The graph's shared-sequence branch (seq [1, L, D], scoring/attention.py's _attend) is the
    served function: ONNX Runtime and the numpy runner on it equal PyTorch's general form."""
    from scoring.scorer import NumpyScorer

    root, model = registry_dir
    x = replace(SEQ, sequence=length).golden_inputs(max(n, 1), seed=40 + n)
    x = {k: v[:n] for k, v in x.items()}
    x["seq"] = _unit_rows(np.random.default_rng(n).standard_normal((1, length, SEQ.dim)))
    want = _torch(model, {**x, "seq": np.repeat(x["seq"], n, axis=0)}, SEQ)
    onnx_rt = OnnxScorer(root / "v2" / MODEL, device="cpu", options=ONE_THREAD)
    for scorer in (onnx_rt, NumpyScorer(root / "v2" / MODEL)) if n else (onnx_rt,):
        got = scorer.score(x)
        assert got.shape == (n,)
        assert n == 0 or np.max(np.abs(got - want)) <= 1e-5


def test_the_sequence_graph_branches_on_a_shared_sequence(
    registry_dir: tuple[Path, CtrNet],
) -> None:
    """The export carries both forms behind one If on seq's batch axis, which has a name of its
    own (ONNX Runtime must not plan buffers as if it were the candidates' batch)."""
    import onnx

    root, _ = registry_dir
    g = onnx.load(str(root / "v2" / MODEL)).graph
    assert [n.op_type for n in g.node].count("If") == 1
    seq = next(i for i in g.input if i.name == "seq")
    ad = next(i for i in g.input if i.name == "ad")
    assert seq.type.tensor_type.shape.dim[0].dim_param != ad.type.tensor_type.shape.dim[0].dim_param


def test_the_general_form_alone_exports_the_same_function(tmp_path: Path) -> None:
    """``shared_sequence_form=False`` (the graph before the branch, for `bench seq-scorer`)."""
    import onnx

    model = _publish(tmp_path, "v1", SEQ, seed=1)
    export_onnx(model, tmp_path / "general.onnx", SEQ, shared_sequence_form=False)
    assert "If" not in [n.op_type for n in onnx.load(str(tmp_path / "general.onnx")).graph.node]
    x = SEQ.golden_inputs(40, seed=9)
    a = OnnxScorer(tmp_path / "general.onnx", device="cpu", options=ONE_THREAD).score(x)
    b = OnnxScorer(tmp_path / "v1" / MODEL, device="cpu", options=ONE_THREAD).score(x)
    assert np.max(np.abs(a - b)) <= 1e-5


def _unit_rows(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    return out


def test_the_shipped_model_onnx_is_its_model_pt() -> None:
    """The shipped version's graph (re-exported by scoring.reexport, in the shared-sequence form)
    computes what its PyTorch weights do, a shared sequence and a sequence per row alike."""
    import onnx

    from scoring.online import load_weights
    from scoring.registry import CHECKPOINT

    root = Path(__file__).resolve().parents[2] / "scoring" / "models"
    (version,) = sorted(root.iterdir())
    spec = FeatureSpec.from_json((version / SPEC).read_text())
    model = load_weights(version / CHECKPOINT, spec)
    assert "If" in [n.op_type for n in onnx.load(str(version / MODEL)).graph.node]
    scorer = OnnxScorer(version / MODEL, device="cpu", options=ONE_THREAD)
    x = spec.golden_inputs(100, seed=21)
    shared = {**x, "seq": x["seq"][[int(np.argmax(np.abs(x["seq"]).sum(axis=(1, 2))))]]}
    for inputs, repeated in ((x, x), (shared, {**x, "seq": np.repeat(shared["seq"], 100, 0)})):
        got = scorer.score_heads(inputs)
        with torch.no_grad():
            want = model.heads(*(torch.from_numpy(repeated[k]) for k in spec.input_names))
        for g, w in zip(got, want, strict=True):
            assert g is not None and np.max(np.abs(g - w.numpy().reshape(-1))) <= 1e-5


def test_a_batch_of_requests_scores_each_as_it_scores_alone(tmp_path: Path) -> None:
    """The decision stage runs a sequence model once per request (each sends its sequence once
    and gets the graph's shared-sequence form), so a request's raw pCTR is the same, bit for
    bit, whether it was decided alone or micro-batched with others."""
    from adpulse.bench.decisionpath import DecisionPath, request_bodies
    from adpulse.catalogtool import synthetic_ads
    from adpulse.core.settings import Settings
    from adpulse.workload import Workload, WorkloadModel
    from streams.deadletter import Raw

    s = Settings.from_env({}).with_(pseudonymise=False, partitions=1, policy="greedy")
    _publish(tmp_path, "v1", replace(FeatureSpec.from_settings(s), sequence=10), seed=3)
    workload = Workload(WorkloadModel(), users=20, seed=2)
    ads = synthetic_ads(200, workload.columns(2_000)["category"].tolist(), seed=3)
    _, events = workload.payloads(600, 1_700_000_000_000, prefix="w")
    path = DecisionPath.build(ads, events, s.with_(model_dir=str(tmp_path), sequence_length=10))
    bodies = request_bodies([a["ad_id"] for a in ads], 20, 40, 6, 5, "b")

    def raw_pctr(batch: list[bytes]) -> dict[str, float]:
        now = 1_700_000_100_000
        reqs = [(path._decoder.decode(Raw(b, None, 0, 0, now)), Raw(None, None, 0, 0, now))
                for b in batch]  # fmt: skip
        out = path.stage.decide(reqs, path.tables, now)
        assert out.rows_scored == 40 * len(batch) and not out.fallbacks
        return {d.request_id: d.pctr_raw for _k, _r, d in out.decisions}

    together = raw_pctr(bodies)
    alone = {k: v for b in bodies for k, v in raw_pctr([b]).items()}
    assert len(together) == 6 and together == alone


def test_reexport_replaces_the_graph_only_when_it_computes_the_same_scores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m scoring.reexport DIR`` rewrites model.onnx from model.pt; a version
    whose model.onnx no longer matches its weights keeps its file (its name promises its
    scores), and no temporary file is left either way; a folder that is not a version
    is one line of error."""
    import shutil

    from scoring.reexport import main, reexport

    root = Path(__file__).resolve().parents[2] / "scoring" / "models"
    (shipped,) = sorted(root.iterdir())
    version = tmp_path / shipped.name
    shutil.copytree(shipped, version)
    worst, drift = reexport(version)
    assert worst <= 1e-5 and drift <= 1e-5
    assert [p.name for p in version.iterdir() if p.name.startswith(".")] == []

    other = tmp_path / "other"  # the same graph under other weights
    shutil.copytree(shipped, other)
    state = torch.load(str(other / "model.pt"), map_location="cpu", weights_only=True)
    first = next(k for k, v in state["state_dict"].items() if v.is_floating_point())
    state["state_dict"][first] = state["state_dict"][first] + 0.5
    torch.save(state, str(other / "model.pt"))
    before = (other / MODEL).read_bytes()
    with pytest.raises(ValueError, match="from the old one"):
        reexport(other)
    assert (other / MODEL).read_bytes() == before
    assert [p.name for p in other.iterdir() if p.name.startswith(".")] == []

    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a registry version" in err


def test_the_width_bench_times_the_block_at_each_width_and_refuses_bad_widths(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``python -m adpulse.bench.seqscorer --widths 32,16,8``: what a narrower attention block
    would cost, timed before anyone retrains one; a bad list is one line of error."""
    from adpulse.bench import seqscorer

    narrow = CtrNet(SEQ, attention_hidden=8).attention
    assert narrow is not None and narrow.k.out_features == 8 and narrow.out.in_features == 8
    cpu = seqscorer.widths(PLAIN, 6, [8, 4], seconds=0.01, repeats=2)
    assert list(cpu) == ["plain", "hidden 8", "hidden 4"]
    # one figure per repeat for each net; how fast is the bench's business, not the test's
    assert [len(v) for v in cpu.values()] == [2, 2, 2]
    assert all(isinstance(x, float) for v in cpu.values() for x in v)
    with pytest.raises(SystemExit) as exit_:
        seqscorer.main(["--widths", "0,8"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "positive integers" in err and "Traceback" not in err


def test_a_narrower_attention_block_survives_its_checkpoint(tmp_path: Path) -> None:
    """``model.pt`` records the block's width: the trainer's warm start, the online learner
    and ``scoring.reexport`` rebuild the net from it. A file written before the width was
    recorded (no ``attention_hidden``) still loads, as the default width it had."""
    import torch

    from scoring.online import UNRECORDED_ATTENTION_HIDDEN, load_weights, save_weights

    torch.manual_seed(3)
    narrow = CtrNet(SEQ, attention_hidden=8)
    save_weights(narrow, tmp_path / "narrow.pt")
    back = load_weights(tmp_path / "narrow.pt", SEQ)
    assert back.attention is not None and back.attention.k.out_features == 8
    x = SEQ.golden_inputs(5, seed=2)
    t = [torch.from_numpy(np.ascontiguousarray(x[k])) for k in SEQ.input_names]
    with torch.no_grad():
        assert torch.equal(narrow(*t), back(*t))

    wide = CtrNet(SEQ, attention_hidden=32)
    save_weights(wide, tmp_path / "old.pt")
    saved = torch.load(str(tmp_path / "old.pt"), weights_only=True)
    del saved["arch"]["attention_hidden"]  # as written before the width was recorded
    torch.save(saved, str(tmp_path / "old.pt"))
    old = load_weights(tmp_path / "old.pt", SEQ)
    assert UNRECORDED_ATTENTION_HIDDEN == 32
    assert old.attention is not None and old.attention.k.out_features == 32
