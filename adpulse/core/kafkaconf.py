"""Kafka client settings for every client adpulse makes: one function, no copies.

aiokafka and kafka-python take the same keyword names for transport security
(``security_protocol``, ``sasl_mechanism``, ``sasl_plain_username``,
``sasl_plain_password``, ``ssl_context``), so :func:`client_kwargs` serves both;
:func:`faust_credentials` gives the Faust app the same settings as its
``broker_credentials``. A combination that cannot work (a SASL user without a
SASL protocol, a certificate without its key, a missing file) is a one-line
:class:`~adpulse.core.errors.ConfigError` at startup, not a broker error later.

>>> client_kwargs("127.0.0.1:9092")
{'bootstrap_servers': '127.0.0.1:9092'}
>>> s = Settings(bootstrap="k:9093", security_protocol="SASL_PLAINTEXT",
...              sasl_username="adpulse", sasl_password="pw")
>>> kw = client_kwargs(s)
>>> kw["security_protocol"], kw["sasl_mechanism"], kw["sasl_plain_username"]
('SASL_PLAINTEXT', 'PLAIN', 'adpulse')
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from adpulse.core.errors import ConfigError
from adpulse.core.settings import Settings

SSL_PROTOCOLS = ("SSL", "SASL_SSL")
SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
TANSU_FETCH_WAIT_MS = 10
MIRROR_FETCH_WAIT_MS, TANSU_MIRROR_FETCH_WAIT_MS = 500, 20


def client_kwargs(target: Settings | str) -> dict[str, Any]:
    """``bootstrap_servers`` plus the transport settings, for an aiokafka or kafka-python client.

    A bare ``HOST:PORT`` string means a plaintext broker (the embedded one in tests).
    """
    if isinstance(target, str):
        return {"bootstrap_servers": target}
    return {"bootstrap_servers": target.bootstrap_or_default, **security_kwargs(target)}


def on_embedded_tansu(s: Settings) -> bool:
    """Whether the broker is the embedded tansu, whose workarounds apply (short fetch waits,
    sealed changelogs: streams/runtime/seal.py); never for a broker run elsewhere."""
    return s.embedded_broker and s.embedded == "tansu"


def fetch_wait_ms(s: Settings) -> int:
    """How long the broker may hold the worker's consumer fetch: ``ADPULSE_FETCH_MAX_WAIT_MS``,
    at most 10 ms on the embedded tansu (it holds every fetch for the full wait, data or
    not: docs/reference.md, The embedded broker).

    Kept short on Apache Kafka too, though Kafka answers at the first data: aiokafka sends
    no fetch to a broker while one is in flight, and leaves out a partition whose records
    the worker has not taken yet, so when it takes them that partition waits for the
    fetch in flight. At 500 ms `bench decisions` (the Kafka path) had p50 411-709 ms in three
    of four runs (42 in the fourth) against 41-83 ms at 10 (docs/decide.md).
    """
    wait = s.fetch_max_wait_ms
    return min(wait, TANSU_FETCH_WAIT_MS) if on_embedded_tansu(s) else wait


def mirror_fetch_wait_ms(s: Settings) -> int:
    """The topic mirrors' fetch wait (streams/catalogmirror.py): 500 ms on Apache Kafka, which
    answers at the first data (a mirror's ``getmany`` takes up to 10,000 records a fetch
    brings, so none waits out a fetch as the worker's consumer can); 20 ms on the embedded
    tansu, where it is how late a catalog change or a label can be. At 20 ms on Kafka an
    idle worker used 20% of a core, at 500 15% (``bench serve --rate 10``, one run each)."""
    return TANSU_MIRROR_FETCH_WAIT_MS if on_embedded_tansu(s) else MIRROR_FETCH_WAIT_MS


def security_kwargs(s: Settings) -> dict[str, Any]:
    """The transport part alone; empty for PLAINTEXT (the clients' default)."""
    check(s)
    if s.security_protocol == "PLAINTEXT":
        return {}
    out: dict[str, Any] = {"security_protocol": s.security_protocol}
    if s.security_protocol in SASL_PROTOCOLS:
        out["sasl_mechanism"] = s.sasl_mechanism
        out["sasl_plain_username"] = s.sasl_username
        out["sasl_plain_password"] = sasl_password(s)
    if s.security_protocol in SSL_PROTOCOLS:
        out["ssl_context"] = ssl_context(s)
    return out


def faust_credentials(s: Settings) -> Any:
    """``broker_credentials`` for the Faust app (None for PLAINTEXT)."""
    import faust  # noqa: PLC0415 - the CLI tools do not need Faust

    check(s)
    if s.security_protocol == "PLAINTEXT":
        return None
    if s.security_protocol == "SSL":
        return faust.SSLCredentials(ssl_context(s))
    return faust.SASLCredentials(
        username=s.sasl_username,
        password=sasl_password(s),
        mechanism=s.sasl_mechanism,
        ssl_context=ssl_context(s) if s.security_protocol == "SASL_SSL" else None,
    )


def check(s: Settings) -> None:
    """Refuse combinations that cannot work, naming the variable to fix."""
    proto = s.security_protocol
    sasl = proto in SASL_PROTOCOLS
    tls = proto in SSL_PROTOCOLS
    if not sasl and (s.sasl_username or s.sasl_password or s.sasl_password_file):
        msg = f"ADPULSE_SASL_* is set but ADPULSE_SECURITY_PROTOCOL={proto}: use SASL_SSL"
        raise ConfigError(msg)
    if sasl and not s.sasl_username:
        msg = f"ADPULSE_SECURITY_PROTOCOL={proto} needs ADPULSE_SASL_USERNAME"
        raise ConfigError(msg)
    if sasl and not (s.sasl_password_file or s.sasl_password):
        msg = f"ADPULSE_SECURITY_PROTOCOL={proto} needs ADPULSE_SASL_PASSWORD_FILE"
        raise ConfigError(msg)
    if not tls and (s.ssl_cafile or s.ssl_certfile or s.ssl_keyfile):
        msg = f"ADPULSE_SSL_* is set but ADPULSE_SECURITY_PROTOCOL={proto}: use SSL or SASL_SSL"
        raise ConfigError(msg)
    if bool(s.ssl_certfile) != bool(s.ssl_keyfile):
        msg = "ADPULSE_SSL_CERTFILE and ADPULSE_SSL_KEYFILE go together: set both or neither"
        raise ConfigError(msg)
    for var, path in (
        ("ADPULSE_SASL_PASSWORD_FILE", s.sasl_password_file),
        ("ADPULSE_SSL_CAFILE", s.ssl_cafile),
        ("ADPULSE_SSL_CERTFILE", s.ssl_certfile),
        ("ADPULSE_SSL_KEYFILE", s.ssl_keyfile),
    ):
        if path and not Path(path).is_file():
            msg = f"{var}={path}: no such file"
            raise ConfigError(msg)


def sasl_password(s: Settings) -> str:
    if not s.sasl_password_file:
        return s.sasl_password
    try:
        return Path(s.sasl_password_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"ADPULSE_SASL_PASSWORD_FILE={s.sasl_password_file}: cannot read it ({exc})"
        raise ConfigError(msg) from None


def ssl_context(s: Settings) -> ssl.SSLContext:
    """Verifying TLS context: the CA file (else the system's CAs), the client pair if given."""
    try:
        ctx = ssl.create_default_context(cafile=s.ssl_cafile or None)
        if s.ssl_certfile:
            ctx.load_cert_chain(s.ssl_certfile, s.ssl_keyfile)
    except (OSError, ssl.SSLError) as exc:
        msg = f"ADPULSE_SSL_*: cannot load the TLS files: {exc}"
        raise ConfigError(msg) from None
    return ctx
