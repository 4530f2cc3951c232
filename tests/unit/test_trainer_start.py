"""`adpulse trainer` refuses to start, in one line that says the fix, without what it needs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from adpulse.cli import main
from scoring.registry import MODEL, PACKAGED

pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("ADPULSE_MODEL_DIR", "ADPULSE_TRAINER_WINDOWS", "ADPULSE_TRAINER_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ADPULSE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ADPULSE_DEVICE", "cpu")
    monkeypatch.setenv("ADPULSE_MODEL_LATENCY_BUDGET_MS", "inf")
    monkeypatch.setenv("ADPULSE_TRAINER_PORT", "0")


def _error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["trainer", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_without_a_model_dir_it_asks_for_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert "set ADPULSE_MODEL_DIR" in _error(capsys)


def test_a_serving_version_without_pytorch_weights_is_refused_with_the_command_to_fix_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shipped = sorted(p for p in PACKAGED.iterdir() if (p / MODEL).is_file())[-1]
    old = tmp_path / "models" / shipped.name  # published before the trainer: no model.pt
    shutil.copytree(shipped, old, ignore=shutil.ignore_patterns("model.pt"))
    err = _error(capsys, "--model-dir", str(tmp_path / "models"))
    assert f"serving version {shipped.name} has no model.pt" in err
    assert f"adpulse train --out {tmp_path / 'models'}" in err


def test_an_empty_registry_says_how_to_publish_a_first_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "publish one with `adpulse train" in _error(capsys, "--model-dir", str(tmp_path))


def test_bad_window_sizes_name_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ADPULSE_TRAINER_WINDOWS", "1000,lots")
    assert "ADPULSE_TRAINER_WINDOWS='1000,lots'" in _error(capsys, "--model-dir", str(tmp_path))
