"""Training on regenerated data learns the click model; bad input names file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adpulse.core.errors import InputError
from scoring.featurespec import FeatureSpec
from scoring.registry import PACKAGED, ModelRegistry
from scoring.scorer import SessionOptions
from scoring.synthetic import generate, make_world, write_jsonl
from scoring.train import auc, calibration, load_records, once_per_decision

pytest.importorskip("torch")
from scoring.train import run_train, train


def test_training_on_20k_synthetic_rows_beats_chance_on_the_held_out_split(tmp_path: Path) -> None:
    m = run_train(None, 20_000, tmp_path, seed=3, epochs=2, threads=1, version="v0001")
    assert m["auc"] > 0.6
    assert m["logloss"] < m["logloss_prior"]
    assert (m["n_train"], m["n_test"]) == (16_000, 4_000)
    files = sorted(p.name for p in (tmp_path / "v0001").iterdir())
    assert files == ["metrics.json", "model.onnx", "model.pt", "spec.json"]
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


def test_a_repeated_label_and_a_conversion_train_one_row_per_decision(tmp_path: Path) -> None:
    recs = generate(400, seed=5)
    clicked = [r for r in recs if r["clicked"]]
    repeats = [dict(r) for r in recs[:60]]  # the joiner's duplicate window, at a new offset
    conversions = [{**r, "converted": 1} for r in clicked[:10]]  # a second record, same id
    path = tmp_path / "labels.jsonl"
    write_jsonl(recs + repeats + conversions, path)
    m = train(path, tmp_path / "models", epochs=1, threads=1, version="v1")
    assert m["n_train"] + m["n_test"] == 400
    assert m["train_ctr"] * m["n_train"] + m["test_ctr"] * m["n_test"] == pytest.approx(
        len(clicked), abs=0.01
    )


def test_a_conversion_stands_in_for_its_missing_label_and_ids_keep_their_first_row() -> None:
    rows, dropped = once_per_decision(
        [
            {"decision_id": "c", "clicked": 1, "converted": 1, "n": 1},
            {"decision_id": "a", "clicked": 0, "n": 2},
            {"decision_id": "a", "clicked": 0, "n": 3},
            {"clicked": 1, "n": 4},  # no identity: kept as it is
            {"clicked": 1, "n": 4},
        ]
    )
    assert [r["n"] for r in rows] == [2, 4, 4, 1] and dropped == 1


def test_train_with_sequence_gives_a_sequence_model_the_registry_serves(tmp_path: Path) -> None:
    path = tmp_path / "labels.jsonl"
    write_jsonl(generate(2_000, seed=5, world=make_world(5, n_users=300), sequence=20), path)
    assert any(json.loads(line)["features"].get("sequence") for line in path.open())
    m = train(path, tmp_path / "models", epochs=1, threads=1, version="v1", sequence=20)
    assert m["sequence"] == 20 and m["onnx_max_abs_diff"] <= 1e-5
    reg = ModelRegistry(
        tmp_path / "models", FeatureSpec(), options=SessionOptions(intra_op_threads=1)
    )
    loaded = reg.latest_valid()
    assert loaded is not None and loaded.spec.sequence == 20
    assert "seq" in loaded.spec.input_names


def test_train_gives_the_attention_block_the_width_asked_and_refuses_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--attention-hidden H``: the version's ``model.pt`` rebuilds an H-wide block (what
    the trainer's warm start loads) and ``metrics.json`` says H; 0 is one line of error."""
    from scoring.online import load_weights
    from scoring.registry import CHECKPOINT, SPEC
    from scoring.train import main

    path = tmp_path / "labels.jsonl"
    write_jsonl(generate(1_000, seed=5, world=make_world(5, n_users=200), sequence=6), path)
    m = train(path, tmp_path / "models", epochs=1, threads=1, version="v4", sequence=6,
              attention_hidden=4)  # fmt: skip
    assert m["attention_hidden"] == 4
    version = tmp_path / "models" / "v4"
    net = load_weights(version / CHECKPOINT, FeatureSpec.from_json((version / SPEC).read_text()))
    assert net.attention is not None and net.attention.k.out_features == 4
    assert main([str(path), "--sequence", "6", "--attention-hidden", "0",
                 "--out", str(tmp_path / "none")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "width must be 1 or more" in err and "Traceback" not in err
    assert not (tmp_path / "none").exists()
