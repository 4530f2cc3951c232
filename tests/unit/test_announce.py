"""``adpulse broker`` announces itself; only a claim that holds marks a bootstrap as embedded.

The listener in these tests is a real socket of this process (or of a child), so
the /proc checks run for real.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from adpulse.core.announce import _path, announce, folder, recognise, withdraw
from adpulse.core.settings import Settings


@pytest.fixture(autouse=True)
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state"


@pytest.fixture
def listener() -> Iterator[int]:
    """A port this process listens on, as the embedded broker's JVM does."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def on(port: int, host: str = "127.0.0.1") -> Settings:
    return Settings(bootstrap=f"{host}:{port}")


def test_the_announced_listener_is_recognised_as_the_embedded_broker(
    listener: int, state_home: Path
) -> None:
    path = announce(listener, os.getpid(), "tansu")
    assert path.parent == folder() and folder().is_relative_to(state_home)
    got = recognise(on(listener))
    assert got.embedded_broker and got.embedded == "tansu"
    assert recognise(on(listener, "localhost")).embedded_broker
    # the default bootstrap (no ADPULSE_BOOTSTRAP) is 127.0.0.1:ADPULSE_BROKER_PORT
    assert recognise(Settings(broker_port=listener)).embedded_broker
    withdraw(listener, os.getpid())
    assert not path.exists()
    assert not recognise(on(listener)).embedded_broker


def test_no_announcement_means_a_real_cluster(listener: int) -> None:
    assert not recognise(on(listener)).embedded_broker


def test_an_announcement_naming_a_process_that_does_not_listen_there_is_refused(
    listener: int,
) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        announce(listener, child.pid, "kafka")  # alive, but not the listener
        assert not recognise(on(listener)).embedded_broker
    finally:
        child.kill()
        child.wait()
    announce(listener, child.pid, "kafka")  # stale: that process is gone
    assert not recognise(on(listener)).embedded_broker


def test_an_announcement_with_nothing_listening_is_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])  # bound, not listening
        announce(port, os.getpid(), "kafka")
        assert not recognise(on(port)).embedded_broker


def test_only_one_loopback_server_can_be_the_embedded_broker(listener: int) -> None:
    announce(listener, os.getpid(), "kafka")
    assert not recognise(on(listener, "10.0.0.7")).embedded_broker
    assert not recognise(Settings(bootstrap=f"127.0.0.1:{listener},127.0.0.1:1")).embedded_broker


def test_an_announcement_others_can_write_is_refused(listener: int) -> None:
    path = announce(listener, os.getpid(), "kafka")
    path.chmod(0o622)
    assert not recognise(on(listener)).embedded_broker


def test_a_broken_announcement_is_refused_not_an_error(listener: int) -> None:
    announce(listener, os.getpid(), "kafka")
    _path(listener).write_text("{not json")
    assert not recognise(on(listener)).embedded_broker
    _path(listener).write_text('{"pid": 1, "port": 1, "kind": "redpanda"}')
    assert not recognise(on(listener)).embedded_broker


def test_withdraw_leaves_another_brokers_announcement(listener: int) -> None:
    path = announce(listener, os.getpid(), "kafka")
    withdraw(listener, os.getpid() + 1)
    assert path.exists()


def test_announcing_drops_the_files_of_brokers_that_are_gone(listener: int) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = announce(listener + 1 if listener < 65535 else listener - 1, child.pid, "kafka")
    fresh = announce(listener, os.getpid(), "kafka")
    assert fresh.exists() and not stale.exists()
