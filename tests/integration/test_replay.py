"""`adpulse replay taobao` lands exactly the real sample on user-events."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from adpulse.cli import main
from adpulse.core.settings import Settings
from adpulse.inspect import read_topic
from schemas import first_error
from schemas.topics import TOPICS

pytestmark = pytest.mark.integration


@pytest.mark.long  # ~25 s: make test stays under 10 minutes
def test_replay_lands_every_taobao_row_exactly_once(
    settings: Settings, taobao: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADPULSE_TOPIC_PREFIX", settings.topic_prefix)
    assert main(["topics", "create", "--bootstrap", settings.bootstrap]) == 0
    assert main(["replay", "taobao", str(taobao), "--bootstrap", settings.bootstrap]) == 0

    records = read_topic(settings.bootstrap, settings.topic("user-events"), expect=4321, idle_s=1.5)
    messages = [json.loads(r.value or b"") for r in records]
    assert len(messages) == 4321
    assert len({m["event_id"] for m in messages}) == 4321
    assert Counter(m["kind"] for m in messages) == {
        "browse": 3926,
        "cart": 190,
        "fav": 128,
        "purchase": 77,
    }
    assert len({m["user_id"] for m in messages}) == 43
    assert all(first_error("user-events", m) is None for m in messages)


def test_replay_keys_each_user_to_one_partition(
    settings: Settings, taobao: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADPULSE_TOPIC_PREFIX", settings.topic_prefix)
    assert main(["topics", "create", "--bootstrap", settings.bootstrap]) == 0
    assert (
        main(["replay", "taobao", str(taobao), "--limit", "500", "--bootstrap", settings.bootstrap])
        == 0
    )
    records = read_topic(settings.bootstrap, settings.topic("user-events"), expect=500, idle_s=1.0)
    partitions_of: dict[bytes, set[int]] = {}
    for r in records:
        assert r.key is not None
        partitions_of.setdefault(r.key, set()).add(r.partition)
    assert len(records) == 500
    assert all(len(ps) == 1 for ps in partitions_of.values())
    assert len({p for ps in partitions_of.values() for p in ps}) > 1


def test_topics_create_is_idempotent(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ADPULSE_TOPIC_PREFIX", settings.topic_prefix)
    assert main(["topics", "create", "--bootstrap", settings.bootstrap]) == 0
    first = capsys.readouterr().out
    assert main(["topics", "create", "--bootstrap", settings.bootstrap]) == 0
    second = capsys.readouterr().out
    assert first.count("created") == len(TOPICS)
    assert second.count("exists") == len(TOPICS) and "created" not in second
