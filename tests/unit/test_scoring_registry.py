"""The registry serves only validated models and keeps serving when a new one is bad."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from adpulse.core.errors import ModelRefused
from scoring.featurespec import FeatureSpec
from scoring.registry import MODEL, SPEC, ModelRegistry, validate
from scoring.scorer import SessionOptions

torch = pytest.importorskip("torch")
from scoring.model import CtrNet, export_onnx  # noqa: E402

FS = FeatureSpec(dim=16)
OPTS = SessionOptions(intra_op_threads=1)


class _Renamed(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, poison: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.poison = poison

    def forward(self, *x: torch.Tensor) -> torch.Tensor:
        out = self.inner(*x)
        return out * float("nan") if self.poison else out


def _export(module: torch.nn.Module, path: Path, names: list[str]) -> None:
    x = FS.golden_inputs(4)
    args = tuple(torch.from_numpy(x[k]) for k in FS.input_names)
    axes = {n: {0: "batch"} for n in [*names, "pctr"]}
    torch.onnx.export(
        module, args, str(path), input_names=names, output_names=["pctr"],
        dynamic_axes=axes, opset_version=17, dynamo=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("good") / "v"
    export_onnx(CtrNet(FS), d / MODEL, FS)
    (d / SPEC).write_text(FS.to_json())
    return d


def _version(root: Path, name: str, good: Path) -> Path:
    d = root / name
    shutil.copytree(good, d)
    return d


def _refusal(d: Path, **kw: float) -> str:
    with pytest.raises(ModelRefused) as info:
        validate(d, FS, options=OPTS, **kw)
    return info.value.reason


def test_a_good_version_validates_and_scores_in_unit_range(good: Path) -> None:
    loaded = validate(good, FS, options=OPTS)
    out = loaded.scorer.score(FS.golden_inputs(10))
    assert ((out >= 0) & (out <= 1)).all()


def test_truncated_model_file_is_refused_with_reason(good: Path, tmp_path: Path) -> None:
    d = _version(tmp_path, "v1", good)
    data = (d / MODEL).read_bytes()
    (d / MODEL).write_bytes(data[: len(data) // 3])
    assert "cannot load" in _refusal(d)


def test_wrong_input_names_are_refused(good: Path, tmp_path: Path) -> None:
    d = _version(tmp_path, "v1", good)
    _export(_Renamed(CtrNet(FS)), d / MODEL, ["u", "a", "ids", "dense"])
    assert "inputs" in _refusal(d)


def test_nan_outputs_are_refused(good: Path, tmp_path: Path) -> None:
    d = _version(tmp_path, "v1", good)
    _export(_Renamed(CtrNet(FS), poison=True), d / MODEL, list(FS.input_names))
    assert "NaN" in _refusal(d)


def test_a_model_slower_than_the_budget_is_refused(good: Path) -> None:
    assert "too slow" in _refusal(good, latency_budget_ms=1e-6)  # bench-ok: refusal, not speed


def test_a_model_for_another_spec_is_refused(good: Path, tmp_path: Path) -> None:
    d = _version(tmp_path, "v1", good)
    (d / SPEC).write_text(FeatureSpec(dim=16, embedding_seed=1).to_json())
    assert "embedding_seed" in _refusal(d)


def test_registry_picks_the_newest_valid_version(good: Path, tmp_path: Path) -> None:
    _version(tmp_path, "v0001", good)
    _version(tmp_path, "v0002", good)
    bad = _version(tmp_path, "v0003", good)
    (bad / MODEL).write_bytes(b"not onnx")
    reg = ModelRegistry(tmp_path, FS, options=OPTS)
    loaded = reg.latest_valid()
    assert loaded is not None and loaded.version == "v0002"
    assert "cannot load" in reg.refused["v0003"]


def test_a_bad_new_version_keeps_the_current_one_and_is_not_retried(
    good: Path, tmp_path: Path
) -> None:
    _version(tmp_path, "v0001", good)
    refusals: list[str] = []
    reg = ModelRegistry(tmp_path, FS, options=OPTS, on_refused=lambda v, r: refusals.append(v))
    assert reg.latest_valid() is not None
    bad = _version(tmp_path, "v0002", good)
    _export(_Renamed(CtrNet(FS), poison=True), bad / MODEL, list(FS.input_names))
    assert reg.poll() is None
    assert reg.poll() is None
    assert reg.current is not None and reg.current.version == "v0001"
    assert refusals == ["v0002"]
    _version(tmp_path, "v0003", good)
    swapped = reg.poll()
    assert swapped is not None and swapped.version == "v0003" and reg.current is swapped


def test_a_new_version_much_slower_than_the_serving_one_is_refused(
    good: Path, tmp_path: Path
) -> None:
    _version(tmp_path, "v0001", good)
    reg = ModelRegistry(tmp_path, FS, options=OPTS, max_slowdown=1e-6)
    assert reg.latest_valid() is not None
    _version(tmp_path, "v0002", good)
    assert reg.poll() is None
    assert "slower than serving v0001" in reg.refused["v0002"]


def test_no_model_means_the_population_prior(good: Path) -> None:
    loaded = validate(good, FS, options=OPTS)
    rule = loaded.fallback(default_ctr=0.03)
    assert rule.prior_ctr == 0.03
    scores, used = rule.guard(np.array([0.1, np.nan], dtype=np.float32), 2)
    assert used and np.all(scores == np.float32(0.03))
