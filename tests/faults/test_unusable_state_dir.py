"""A worker whose RocksDB directory cannot be written stops at once, naming the path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_unwritable_data_dir_is_one_line_error_naming_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the data directory should be")
    data_dir = blocker / "rocksdb"
    env = {**os.environ, "ADPULSE_DATA_DIR": str(data_dir), "ADPULSE_BOOTSTRAP": "127.0.0.1:1"}
    out = subprocess.run(
        [sys.executable, "-m", "adpulse.cli", "worker"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert out.returncode == 5
    assert str(data_dir) in out.stderr
    assert "not writable" in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0
