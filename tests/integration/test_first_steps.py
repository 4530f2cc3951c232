"""First steps by hand: `adpulse broker` in one terminal, `adpulse worker` in another.

The worker is given the bootstrap and nothing else (no pseudonym key, no
ADPULSE_EMBEDDED_BROKER): it must recognise the broker `adpulse broker` announced
and run on the development key, while a worker on a broker nobody announced still
refuses to start without a real key.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adpulse.broker import EmbeddedBroker, free_port
from adpulse.core.probe import wait_for_broker
from adpulse.core.settings import Settings
from adpulse.workerproc import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.long]  # make test stays under 10 minutes


def bare_env(tmp_path: Path, **more: str) -> dict[str, str]:
    """This machine's environment without any ADPULSE_ setting, plus ``more``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADPULSE_")}
    return {**env, "XDG_STATE_HOME": str(tmp_path / "state"), **more}


def test_a_worker_given_only_the_bootstrap_of_adpulse_broker_runs(tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "broker.out").open("wb")
    broker = subprocess.Popen(
        [sys.executable, "-m", "adpulse.cli", "broker", "--port", str(port)],
        env=bare_env(tmp_path), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    worker: WorkerProcess | None = None
    try:
        wait_for_broker(f"127.0.0.1:{port}", timeout=90)
        # announced once it answers: wait for what it prints then, as a newcomer would
        deadline = time.monotonic() + 30
        while "recognise it" not in (tmp_path / "broker.out").read_text():
            assert time.monotonic() < deadline and broker.poll() is None, "no announcement"
            time.sleep(0.1)
        [announced] = (tmp_path / "state" / "adpulse" / "embedded-brokers").glob("*.json")
        assert json.loads(announced.read_text())["port"] == port
        # No pseudonym key and ADPULSE_EMBEDDED_BROKER=false: only the bootstrap says where
        # it is (plus the ports, data dir and API token every test worker gets).
        s = Settings(bootstrap=f"127.0.0.1:{port}", data_dir=tmp_path / "data")
        no_key = {"ADPULSE_PSEUDONYM_KEY_FILE": "", "ADPULSE_PSEUDONYM_KEY": ""}
        worker = WorkerProcess(s, tmp_path, extra_env=bare_env(tmp_path, **no_key))
        worker.start(timeout=120)  # /health 200
        assert "published development key" in worker.tail(200)
    finally:
        if worker is not None:
            worker.stop()
        broker.send_signal(signal.SIGTERM)
        broker.wait(60)
    out = (tmp_path / "broker.out").read_text()
    assert f"workers and tools on 127.0.0.1:{port} recognise it" in out, out
    assert broker.returncode == 0, out
    assert not list((tmp_path / "state" / "adpulse" / "embedded-brokers").glob("*.json"))


def test_a_worker_on_a_broker_nobody_announced_still_needs_a_key(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """The session's broker is embedded too, but not announced: to a worker it is a cluster."""
    state = tmp_path / "state" / "adpulse" / "embedded-brokers"
    state.mkdir(parents=True)
    # A stale or forged announcement for its port, naming a process that is not its listener.
    port = broker.bootstrap.rpartition(":")[2]
    (state / f"127.0.0.1-{port}.json").write_text(
        json.dumps({"port": int(port), "pid": os.getpid(), "kind": "kafka"})
    )
    env = bare_env(
        tmp_path, ADPULSE_BOOTSTRAP=broker.bootstrap, ADPULSE_DATA_DIR=str(tmp_path / "data"),
        ADPULSE_WEB_PORT=str(free_port()),
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "adpulse.cli", "worker"],
        env=env, capture_output=True, text=True, timeout=120, check=False,  # a wait bound
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("adpulse: error: no pseudonym key: set ADPULSE_PSEUDONYM_KEY_FILE")
