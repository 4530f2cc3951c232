"""Training on regenerated data learns the click model; bad input names file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adpulse.errors import InputError
from scoring.featurespec import FeatureSpec
from scoring.registry import PACKAGED, ModelRegistry
from scoring.scorer import SessionOptions
from scoring.synthetic import generate, make_world, write_jsonl
from scoring.train import auc, calibration, load_records

pytest.importorskip("torch")
from scoring.train import run_train


def test_training_on_20k_synthetic_rows_beats_chance_on_the_held_out_split(tmp_path: Path) -> None:
    m = run_train(None, 20_000, tmp_path, seed=3, epochs=2, threads=1, version="v0001")
    assert m["auc"] > 0.6
    assert m["logloss"] < m["logloss_prior"]
    assert (m["n_train"], m["n_test"]) == (16_000, 4_000)
    files = sorted(p.name for p in (tmp_path / "v0001").iterdir())
    assert files == ["metrics.json", "model.onnx", "spec.json"]
    assert json.loads((tmp_path / "v0001" / "metrics.json").read_text())["seed"] == 3
    reg = ModelRegistry(tmp_path, FeatureSpec(), options=SessionOptions(intra_op_threads=1))
    assert reg.latest_valid() is not None


def test_a_bad_line_is_reported_with_file_and_line_number(tmp_path: Path) -> None:
    path = tmp_path / "fb.jsonl"
    write_jsonl(generate(3, seed=1, world=make_world(1, n_users=20, n_ads=10)), path)
    with path.open("a") as fh:
        fh.write("{not json\n")
    with pytest.raises(InputError, match=r"fb\.jsonl:4: not JSON"):
        load_records(path)


def test_a_record_of_the_wrong_shape_is_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "fb.jsonl"
    path.write_text('{"clicked": 1}\n')
    with pytest.raises(InputError, match=r"fb\.jsonl:1: not a ctr-feedback record"):
        load_records(path)


def test_auc_and_calibration_oracles() -> None:
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    table = calibration([0, 1] * 50, [i / 100 for i in range(100)])
    assert len(table) == 10 and table[0]["predicted"] < table[-1]["predicted"]


def test_the_shipped_default_model_validates_and_beats_chance() -> None:
    reg = ModelRegistry(PACKAGED, FeatureSpec(), options=SessionOptions(intra_op_threads=1))
    loaded = reg.latest_valid()
    assert loaded is not None, reg.refused
    assert loaded.metrics["auc"] > 0.7
