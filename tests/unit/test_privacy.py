"""Pseudonyms: keyed, stable, never the key in a log line; no key means no start (off dev)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adpulse.core.errors import ConfigError
from adpulse.core.privacy import (
    API_TOKEN_HELP,
    DEVELOPMENT_KEY,
    PSEUDONYM_HEX,
    Pseudonymiser,
    bearer_ok,
    load_api_token,
    load_key,
)
from adpulse.core.settings import Settings
from streams.deadletter import Raw
from streams.ingest import decode_events, pseudonymise

KEY = "a-test-key-of-at-least-16-bytes"


def test_pseudonym_is_the_truncated_hmac_sha256_of_the_user_id() -> None:
    p = Pseudonymiser(KEY.encode())
    expected = hmac.new(KEY.encode(), b"1000040", hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]
    assert p("1000040") == expected
    assert len(p("x")) == 32
    assert p("1000040") != Pseudonymiser(b"another-key-16-bytes!")("1000040")


def test_memo_gives_the_same_answer_after_it_starts_over() -> None:
    p = Pseudonymiser(KEY.encode())
    first = [p(f"u{i}") for i in range(70_000)]  # more than the memo holds
    assert [p(f"u{i}") for i in range(70_000)] == first
    assert len(set(first)) == len(first)


def test_key_file_wins_over_the_variable_and_is_stripped(tmp_path: Path) -> None:
    f = tmp_path / "key"
    f.write_text(KEY + "\n")
    s = Settings(pseudonym_key_file=str(f), pseudonym_key="ignored-because-file-given")
    assert load_key(s) == KEY.encode()
    assert load_key(Settings(pseudonym_key=KEY)) == KEY.encode()


@pytest.mark.parametrize(
    ("settings", "names"),
    [
        (Settings(bootstrap="kafka:9092"), "ADPULSE_PSEUDONYM_KEY_FILE"),
        (Settings(pseudonym_key="short"), "ADPULSE_PSEUDONYM_KEY"),
        (Settings(pseudonym_key_file="/nonexistent/key"), "/nonexistent/key"),
    ],
)
def test_no_usable_key_off_the_embedded_broker_is_a_one_line_config_error(
    settings: Settings, names: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Pseudonymiser.from_settings(settings)
    assert names in str(info.value)
    assert "\n" not in str(info.value)


def test_embedded_broker_without_key_uses_the_development_key_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="adpulse.core.privacy"):
        p = Pseudonymiser.from_settings(Settings(embedded_broker=True), warn=True)
    assert p("u1") == Pseudonymiser(DEVELOPMENT_KEY)("u1")
    (record,) = caplog.records
    assert "development key" in record.getMessage() and "\n" not in record.getMessage()


def test_the_key_never_shows_in_reprs(caplog: pytest.LogCaptureFixture) -> None:
    s = Settings.from_env({"ADPULSE_PSEUDONYM_KEY": KEY, "ADPULSE_SASL_PASSWORD": "hunter2"})
    assert s.pseudonym_key == KEY
    assert KEY not in repr(s) and "hunter2" not in repr(s)
    assert KEY not in repr(Pseudonymiser.from_settings(s))


def test_pseudonymise_false_keeps_raw_ids() -> None:
    p = Pseudonymiser.from_settings(Settings(pseudonymise=False))
    assert not p.enabled and p("1000040") == "1000040"


def test_decoded_events_carry_the_pseudonym_from_then_on() -> None:
    value = (
        b'{"event_id":"e1","user_id":"1000040","kind":"browse","item_id":1,"category_id":2,"ts":1}'
    )
    good, _ = decode_events([Raw(value, b"1000040", 0, 0)], 10, 8192, 1000)
    p = Pseudonymiser(KEY.encode())
    pseudonymise(good, p)
    assert good[0][0].user_id == p("1000040") != "1000040"


def test_a_worker_with_no_key_on_a_real_cluster_refuses_to_start_in_one_line(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADPULSE_")}
    env.update(ADPULSE_BOOTSTRAP="127.0.0.1:1", ADPULSE_DATA_DIR=str(tmp_path / "data"))
    out = subprocess.run(
        [sys.executable, "-m", "adpulse.cli", "worker"],
        capture_output=True, text=True, timeout=60, env=env,  # bench-ok: a wait bound
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "ADPULSE_PSEUDONYM_KEY_FILE" in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0


def test_api_token_comes_from_its_file_and_unset_means_closed(tmp_path: Path) -> None:
    assert load_api_token(Settings()) is None
    assert not bearer_ok(None, "Bearer anything-at-all-long-enough")  # no token: closed
    path = tmp_path / "token"
    path.write_text("  s3cret-token-of-24-bytes \n")
    token = load_api_token(Settings(api_token_file=str(path)))
    assert token == b"s3cret-token-of-24-bytes"
    assert bearer_ok(token, "Bearer s3cret-token-of-24-bytes")
    for header in (None, "", "s3cret-token-of-24-bytes", "Bearer wrong", "Basic s3cret"):
        assert not bearer_ok(token, header), header
    path.write_text("short")
    with pytest.raises(ConfigError, match="need >= 16"):
        load_api_token(Settings(api_token_file=str(path)))
    with pytest.raises(ConfigError, match="cannot read it"):
        load_api_token(Settings(api_token_file=str(tmp_path / "missing")))
    assert "ADPULSE_API_TOKEN_FILE" in API_TOKEN_HELP and "\n" not in API_TOKEN_HELP
