"""The exported ONNX model is the PyTorch model: same outputs, any batch size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scoring.featurespec import FeatureSpec
from scoring.scorer import NumpyScorer, OnnxScorer, SessionOptions

torch = pytest.importorskip("torch")
from scoring.model import CtrNet, export_onnx  # noqa: E402

SPEC = FeatureSpec(dim=16)
ONE_THREAD = SessionOptions(intra_op_threads=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[CtrNet, Path]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = CtrNet(SPEC)
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    export_onnx(model, path, SPEC)
    return model, path


def _torch(model: CtrNet, x: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        out = model(*(torch.from_numpy(x[k]) for k in ("user", "ad", "ids", "dense")))
    return out.numpy().reshape(-1)


def test_onnx_output_matches_pytorch_within_1e_5(exported: tuple[CtrNet, Path]) -> None:
    model, path = exported
    x = SPEC.golden_inputs(500, seed=5)
    got = OnnxScorer(path, device="cpu", options=ONE_THREAD).score(x)
    assert np.max(np.abs(got - _torch(model, x))) <= 1e-5


@pytest.mark.parametrize("batch", [1, 37])
def test_export_has_a_dynamic_batch_axis(exported: tuple[CtrNet, Path], batch: int) -> None:
    model, path = exported
    x = SPEC.golden_inputs(batch, seed=batch)
    got = OnnxScorer(path, device="cpu", options=ONE_THREAD).score(x)
    assert got.shape == (batch,)
    assert np.max(np.abs(got - _torch(model, x))) <= 1e-5


def test_numpy_scorer_equals_onnx_scorer_within_1e_5(exported: tuple[CtrNet, Path]) -> None:
    _, path = exported
    x = SPEC.golden_inputs(300, seed=9)
    a = OnnxScorer(path, device="cpu", options=ONE_THREAD).score(x)
    b = NumpyScorer(path).score(x)
    assert b.dtype == np.float32
    assert np.max(np.abs(a - b)) <= 1e-5


def test_export_refuses_when_onnx_disagrees_with_pytorch(
    exported: tuple[CtrNet, Path], tmp_path: Path
) -> None:
    model, _ = exported
    with pytest.raises(ValueError, match="differs from PyTorch"):
        export_onnx(model, tmp_path / "m.onnx", SPEC, atol=-1.0)


def test_a_cuda_session_on_a_machine_without_gpu_scores_on_cpu_and_warns(
    exported: tuple[CtrNet, Path], caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    _, path = exported
    with caplog.at_level(logging.WARNING, logger="scoring.scorer"):
        scorer = OnnxScorer(path, device="cuda", options=ONE_THREAD)
    if scorer.provider != "CPUExecutionProvider":
        pytest.skip("this machine has a working CUDA provider")
    assert "scoring on CPU" in caplog.text
    assert scorer.score(SPEC.golden_inputs(3)).shape == (3,)


def test_first_cross_layer_folds_its_residual_into_the_bias() -> None:
    from scoring.model import LowRankCross

    torch.manual_seed(1)
    first = LowRankCross(12, 4, first=True)
    x0 = torch.randn(5, 12)
    with torch.no_grad():
        h = first.v(x0) @ first.u.weight.T + (first.u.bias - 1.0)
        assert torch.allclose(first(x0, x0), x0 * h + x0, atol=1e-6)
