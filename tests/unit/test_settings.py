"""Settings come from ADPULSE_* variables, each documented, with one-line errors."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from adpulse.core.errors import ConfigError
from adpulse.core.kafkaconf import fetch_wait_ms, mirror_fetch_wait_ms
from adpulse.core.settings import KINDS, Settings, documented


def test_defaults_need_no_environment() -> None:
    s = Settings.from_env({})
    assert s.partitions == 4
    assert s.dim == 64
    assert dict(zip(KINDS, s.kind_weights, strict=True)) == {
        "browse": 1,
        "click": 2,
        "fav": 3,
        "cart": 4,
        "purchase": 6,
    }
    assert s.bootstrap_or_default == "127.0.0.1:9092"


def test_every_field_reads_its_variable() -> None:
    env = {
        "ADPULSE_BOOTSTRAP": "k1:9092,k2:9092",
        "ADPULSE_PARTITIONS": "12",
        "ADPULSE_HALF_LIFE_H": "6.5",
        "ADPULSE_EMBEDDED_BROKER": "yes",
        "ADPULSE_DATA_DIR": "/tmp/x",
        "ADPULSE_KIND_WEIGHTS": "browse=1,click=1,fav=1,cart=1,purchase=10",
        "ADPULSE_DEVICE": "cpu",
    }
    s = Settings.from_env(env)
    assert s.bootstrap == "k1:9092,k2:9092"
    assert s.partitions == 12
    assert s.half_life_h == 6.5
    assert s.embedded_broker is True
    assert s.data_dir == Path("/tmp/x")
    assert s.kind_weight("purchase") == 10.0
    assert s.device == "cpu"


def test_overrides_beat_environment_but_none_does_not() -> None:
    s = Settings.from_env({"ADPULSE_PARTITIONS": "12"}, partitions=3, bootstrap=None)
    assert s.partitions == 3
    assert s.bootstrap == ""


@pytest.mark.parametrize(
    ("var", "value", "needle"),
    [
        ("ADPULSE_PARTITIONS", "four", "ADPULSE_PARTITIONS='four'"),
        ("ADPULSE_EMBEDDED_BROKER", "maybe", "expected true/false"),
        ("ADPULSE_DEVICE", "tpu", "expected one of auto, cuda, cpu"),
        ("ADPULSE_KIND_WEIGHTS", "browse=1", "miss click"),
        ("ADPULSE_KIND_WEIGHTS", "view=1", "KIND=NUMBER"),
    ],
)
def test_bad_values_raise_config_error_naming_the_variable(
    var: str, value: str, needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        Settings.from_env({var: value})
    assert var in str(info.value)
    assert "\n" not in str(info.value)


def test_every_setting_is_documented() -> None:
    rows = documented()
    assert len(rows) == len(fields(Settings))
    assert all(var.startswith("ADPULSE_") and doc for var, _default, doc in rows)
    weights = dict((var, default) for var, default, _ in rows)["ADPULSE_KIND_WEIGHTS"]
    assert weights == ",".join(f"{k}={w}" for k, w in zip(KINDS, (1, 2, 4, 3, 6), strict=True))


def test_fetch_waits_stay_short_for_the_consumer_and_long_for_kafka_mirrors() -> None:
    kafka = Settings.from_env({"ADPULSE_EMBEDDED_BROKER": "true"})
    tansu = Settings.from_env({"ADPULSE_EMBEDDED_BROKER": "true", "ADPULSE_EMBEDDED": "tansu"})
    longer = {"ADPULSE_EMBEDDED_BROKER": "true", "ADPULSE_EMBEDDED": "tansu",
              "ADPULSE_FETCH_MAX_WAIT_MS": "50"}  # fmt: skip
    external = Settings.from_env({"ADPULSE_EMBEDDED": "tansu", "ADPULSE_FETCH_MAX_WAIT_MS": "50"})
    assert fetch_wait_ms(kafka) == 10
    assert fetch_wait_ms(Settings.from_env(longer)) == 10  # tansu: never more
    assert fetch_wait_ms(external) == 50  # not embedded: a real Kafka, the setting as given
    assert (mirror_fetch_wait_ms(kafka), mirror_fetch_wait_ms(tansu)) == (500, 20)
