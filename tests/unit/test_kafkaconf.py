"""Transport security: one function builds every client's kwargs; bad combinations fail early."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import faust
import pytest

from adpulse.core.errors import ConfigError
from adpulse.core.kafkaconf import client_kwargs, faust_credentials
from adpulse.core.settings import Settings


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A self-signed certificate and key (PEM), made with the openssl command."""
    tool = shutil.which("openssl")
    if tool is None:
        pytest.skip("openssl not on PATH: cannot make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [tool, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1"],
        check=True, capture_output=True, timeout=60,  # bench-ok: a wait bound
    )  # fmt: skip
    return {"ssl_cafile": str(cert), "ssl_certfile": str(cert), "ssl_keyfile": str(key)}


def env(**values: str) -> Settings:
    return Settings.from_env({f"ADPULSE_{k.upper()}": v for k, v in values.items()})


def test_plaintext_adds_nothing_to_the_bootstrap() -> None:
    assert client_kwargs(env(bootstrap="k:9092")) == {"bootstrap_servers": "k:9092"}
    assert faust_credentials(Settings()) is None


def test_sasl_ssl_scram_with_password_file(tmp_path: Path, tls_files: dict[str, str]) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    s = env(bootstrap="k:9093", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
            sasl_username="adpulse", sasl_password_file=str(pw),
            ssl_cafile=tls_files["ssl_cafile"])  # fmt: skip
    kw = client_kwargs(s)
    ctx = kw.pop("ssl_context")
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert kw == {
        "bootstrap_servers": "k:9093", "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "adpulse",
        "sasl_plain_password": "s3cret",
    }  # fmt: skip
    creds = faust_credentials(s)
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.protocol.value == "SASL_SSL" and creds.mechanism.value == "SCRAM-SHA-512"
    assert (creds.username, creds.password) == ("adpulse", "s3cret")
    assert "s3cret" not in repr(creds)


def test_mutual_tls_loads_the_client_pair(tls_files: dict[str, str]) -> None:
    s = env(security_protocol="SSL", **tls_files)
    kw = client_kwargs(s)
    assert kw["security_protocol"] == "SSL" and "sasl_mechanism" not in kw
    creds = faust_credentials(s)
    assert isinstance(creds, faust.SSLCredentials) and creds.protocol.value == "SSL"


def test_sasl_plaintext_password_from_the_environment() -> None:
    s = env(security_protocol="SASL_PLAINTEXT", sasl_username="u", sasl_password="p")
    kw = client_kwargs(s)
    assert (kw["security_protocol"], kw["sasl_mechanism"], kw["sasl_plain_password"]) == (
        "SASL_PLAINTEXT", "PLAIN", "p",
    )  # fmt: skip
    assert "ssl_context" not in kw
    assert faust_credentials(s).protocol.value == "SASL_PLAINTEXT"


def test_the_faust_app_gets_the_same_credentials(tmp_path: Path) -> None:
    from streams.app import create_app

    s = Settings(security_protocol="SASL_PLAINTEXT", sasl_username="u", sasl_password="p",
                 embedded_broker=True, data_dir=tmp_path, model_poll_s=3600)  # fmt: skip
    creds = create_app(s).app.conf.broker_credentials
    assert isinstance(creds, faust.SASLCredentials) and creds.username == "u"


@pytest.mark.parametrize(
    ("values", "blamed"),
    [
        ({"sasl_username": "u"}, "ADPULSE_SASL_*"),
        ({"security_protocol": "SASL_SSL", "sasl_password": "p"}, "ADPULSE_SASL_USERNAME"),
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_username": "u"}, "PASSWORD_FILE"),
        ({"ssl_cafile": __file__}, "ADPULSE_SSL_*"),
        ({"security_protocol": "SSL", "ssl_certfile": __file__}, "ADPULSE_SSL_KEYFILE"),
        ({"security_protocol": "SSL", "ssl_cafile": "/no/such/ca.pem"}, "/no/such/ca.pem"),
        ({"security_protocol": "SSL", "ssl_cafile": __file__}, "TLS files"),
        ({"security_protocol": "TLS"}, "ADPULSE_SECURITY_PROTOCOL"),
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI"}, "SASL_MECHANISM"),
    ],
)
def test_bad_combinations_are_one_line_config_errors(values: dict[str, Any], blamed: str) -> None:
    with pytest.raises(ConfigError) as info:
        client_kwargs(env(bootstrap="k:9092", **values))
    assert blamed in str(info.value) and "\n" not in str(info.value)
