"""Every subcommand explains itself, and user mistakes end in one line, not a traceback."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from adpulse.broker import free_port
from adpulse.cli import build_parser, main


def _subcommand_paths(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append((*prefix, name))
                paths.extend(_subcommand_paths(sub, (*prefix, name)))
    return paths


SUBCOMMANDS = _subcommand_paths(build_parser())


def test_parser_has_the_documented_subcommands() -> None:
    tops = {p[0] for p in SUBCOMMANDS}
    assert {"broker", "topics", "replay", "demo"} <= tops


@pytest.mark.parametrize("path", SUBCOMMANDS, ids=lambda p: " ".join(p))
def test_every_subcommand_help_exits_zero(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    assert "usage: adpulse" in capsys.readouterr().out


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adpulse.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_console_script_help_works() -> None:
    bin_dir = Path(sys.executable).parent
    out = subprocess.run(
        [bin_dir / "adpulse", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    assert "replay" in out.stdout


def test_missing_file_is_one_line_error(tmp_path: Path) -> None:
    out = _run("replay", "taobao", str(tmp_path / "nope.csv"), "--bootstrap", "127.0.0.1:1")
    assert out.returncode == 4
    assert out.stderr.strip().count("\n") == 0
    assert "nope.csv: no such file" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("rows", "named"),
    [
        ("1,2,3,pv,1511544070\n1,2,3,pv,1511544071\n1,x,3,pv,1511544072\n", "{path}:3:"),
        ("1,2,3,look,1511544070\n", "behavior 'look'"),
    ],
    ids=["bad row names its line", "unknown behavior is named"],
)
def test_bad_csv_is_one_line_error_naming_the_problem(
    tmp_path: Path, rows: str, named: str
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(rows)
    out = _run("replay", "taobao", str(bad), "--bootstrap", "127.0.0.1:1")
    assert out.returncode == 4
    assert named.format(path=bad) in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.long  # 5-11 s: make test stays under 10 minutes
def test_unreachable_broker_is_one_line_error(tmp_path: Path) -> None:
    port = free_port()
    out = _run("topics", "create", "--bootstrap", f"127.0.0.1:{port}")
    assert out.returncode == 3
    assert f"no Kafka broker answered at 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_setting_is_one_line_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "adpulse.cli", "topics", "plan"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"ADPULSE_PARTITIONS": "four", "PATH": ""},
    )
    assert out.returncode == 2
    assert "ADPULSE_PARTITIONS='four'" in out.stderr
    assert "Traceback" not in out.stderr


def test_train_without_pytorch_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    assert main(["train", "--generate", "10"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "adpulse: error: training needs PyTorch: pip install torch==2.13.0 (or make venv)"
    )


def test_catalog_publish_checks_every_line_before_contacting_kafka(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = '{"ad_id": "a", "campaign_id": "c", "category_id": 1, "bid": 1.0, '
    good += '"daily_budget": 10, "targeting": {}}'
    path = tmp_path / "ads.jsonl"
    path.write_text(f"{good}\n{good.replace('1.0', '-1')}\n")
    # The broker address is unreachable: the bad line is reported first, nothing is sent.
    assert main(["catalog", "publish", str(path), "--bootstrap", "127.0.0.1:1"]) == 4
    err = capsys.readouterr().err
    assert err.startswith(f"adpulse: error: {path}:2: ") and err.count("\n") == 1
