"""The trainer exports a candidate only when its weights changed: labels wait in the
learner's pending rows until a full step, and a candidate cut before that step would be
the previous weights under a new name (found by review: the first interval after a warm
start exported a copy of the serving model)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from adpulse.core.errors import ConfigError
from adpulse.core.metrics import Metrics
from adpulse.core.settings import Settings
from scoring.synthetic import generate
from streams.deadletter import Raw

torch = pytest.importorskip("torch")
BASE = "20240101T000000Z"


@pytest.fixture(scope="module")
def base_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scoring.train import train

    out = tmp_path_factory.mktemp("models")
    train(generate(2000, seed=5), out, epochs=1, version=BASE, threads=1)
    return out


def _raws(n: int, seed: int, start: int) -> list[Raw]:
    recs = generate(n, seed=seed)
    return [Raw(json.dumps(r).encode(), b"ad", 0, start + i) for i, r in enumerate(recs)]


def _settings(root: Path, tmp_path: Path) -> Settings:
    return Settings(model_dir=str(root), data_dir=str(tmp_path / "data"),
                    model_latency_budget_ms=math.inf, scorer_threads=1,
                    trainer_step_rows=128)  # fmt: skip


def test_a_step_size_below_one_row_is_a_one_line_config_error(
    base_root: Path, tmp_path: Path
) -> None:
    from adpulse.trainer import Trainer

    s = replace(_settings(base_root, tmp_path), trainer_step_rows=0)
    with pytest.raises(ConfigError, match=r"^trainer settings \(ADPULSE_TRAINER_\*\): step_rows=0"):
        Trainer(s, Metrics.create())


def test_no_candidate_until_the_pending_rows_make_a_step_then_one(
    base_root: Path, tmp_path: Path
) -> None:
    from adpulse.trainer import Trainer

    trainer = Trainer(_settings(base_root, tmp_path), Metrics.create())
    trainer.step(_raws(100, seed=11, start=0))
    assert trainer.learner.learned == 100 and trainer.learner.steps == 0
    assert trainer.export_candidate() is None, "100 pending rows: the weights are the base's"

    trainer.step(_raws(100, seed=12, start=100))
    assert trainer.learner.steps == 1
    assert trainer.export_candidate() is not None
    assert trainer.export_candidate() is None, "nothing stepped since the last candidate"


def test_a_restarted_trainer_does_not_export_the_weights_it_already_exported(
    base_root: Path, tmp_path: Path
) -> None:
    from adpulse.trainer import Trainer

    s = _settings(base_root, tmp_path)
    first = Trainer(s, Metrics.create())
    first.step(_raws(200, seed=13, start=0))
    assert first.export_candidate() is not None
    first.step(_raws(50, seed=14, start=200))  # pending only
    first.checkpoint()

    again = Trainer(s, Metrics.create())
    assert again.learner.steps == 1 and again.learner.pending_rows == 250 - 128
    assert again.export_candidate() is None
