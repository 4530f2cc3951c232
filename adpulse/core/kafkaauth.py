"""One login the way the Kafka clients make it, so bad credentials stop a command at once.

kafka-python and aiokafka retry a refused TLS handshake or SASL login until their
bootstrap gives up (30 s), then say only "Unable to bootstrap from HOST:PORT". A
worker with a wrong password or an untrusted broker certificate should instead stop
at start with one line that names what to fix (exit 3). So before any client
starts, :func:`verify` opens one connection with the same settings
(:mod:`adpulse.core.kafkaconf`): the verifying TLS handshake, then SaslHandshake (v1) and
SaslAuthenticate (v0) of the Kafka protocol, the tokens made by kafka-python's own
mechanism (PLAIN, SCRAM-SHA-256/512), so the probe and the clients cannot disagree
on how a password is sent.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from typing import Any

from adpulse.core.errors import BrokerAuthFailed, BrokerUnavailable
from adpulse.core.kafkaconf import SASL_PROTOCOLS, SSL_PROTOCOLS, sasl_password, ssl_context
from adpulse.core.settings import Settings

_SASL_HANDSHAKE, _SASL_AUTHENTICATE = 17, 36
_CLIENT_ID = b"adpulse-login-check"


def verify(s: Settings, host: str, port: int, timeout: float = 10.0) -> None:
    """Log in once to ``host:port``; BrokerAuthFailed names the setting to fix.

    A dropped or refused connection is BrokerUnavailable (the broker, not the
    credentials); PLAINTEXT has nothing to check.
    """
    if s.security_protocol == "PLAINTEXT":
        return
    try:
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(socket.create_connection((host, port), timeout=timeout))
            if s.security_protocol in SSL_PROTOCOLS:
                sock = stack.enter_context(_tls(s, sock, host, port))
            if s.security_protocol in SASL_PROTOCOLS:
                _sasl_login(s, sock, f"{host}:{port}")
    except (OSError, EOFError) as exc:  # the handshake's own errors are BrokerAuthFailed
        msg = f"lost the connection to {host}:{port} while logging in ({exc}): is it Kafka?"
        raise BrokerUnavailable(msg) from None


def _tls(s: Settings, sock: socket.socket, host: str, port: int) -> ssl.SSLSocket:
    try:
        return ssl_context(s).wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        trusted = f"ADPULSE_SSL_CAFILE={s.ssl_cafile}" if s.ssl_cafile else "the system's CAs"
        msg = (
            f"TLS to {host}:{port}: the broker's certificate is not trusted "
            f"({exc.verify_message}) by {trusted}: set ADPULSE_SSL_CAFILE to the CA that signed it"
        )
        raise BrokerAuthFailed(msg) from None
    except ssl.SSLError as exc:
        msg = (
            f"TLS handshake with {host}:{port} failed ({exc.reason or exc}): is it a "
            f"{s.security_protocol} listener (ADPULSE_SECURITY_PROTOCOL)?"
        )
        raise BrokerAuthFailed(msg) from None


def _sasl_login(s: Settings, sock: socket.socket, where: str) -> None:
    from kafka.net.sasl import get_sasl_mechanism  # noqa: PLC0415 - slow import

    mech = s.sasl_mechanism
    head = _call(sock, _SASL_HANDSHAKE, 1, _string(mech.encode()))
    error, offered = struct.unpack_from(">h", head)[0], _strings(head, 2)
    if error != 0:
        msg = (
            f"the broker at {where} does not offer SASL {mech} (it offers "
            f"{', '.join(offered) or 'none'}): set ADPULSE_SASL_MECHANISM"
        )
        raise BrokerAuthFailed(msg)
    config: dict[str, Any] = {
        "sasl_mechanism": mech, "sasl_plain_username": s.sasl_username,
        "sasl_plain_password": sasl_password(s), "security_protocol": s.security_protocol,
    }  # fmt: skip
    mechanism = get_sasl_mechanism(mech)(**config)
    refused = (
        f"the broker at {where} refused SASL {mech} login as {s.sasl_username!r}: check "
        "ADPULSE_SASL_USERNAME and the password in ADPULSE_SASL_PASSWORD_FILE"
    )
    while not mechanism.is_done():
        body = _call(sock, _SASL_AUTHENTICATE, 0, _bytes(mechanism.auth_bytes()))
        error, message, at = _auth_reply(body)
        if error != 0:
            msg = f"{refused} ({message or f'error code {error}'})"
            raise BrokerAuthFailed(msg)
        try:
            mechanism.receive(body[at + 4 :])
        except Exception as exc:  # the mechanism's own check of the server's proof
            msg = f"{refused} (the server's answer did not verify: {exc})"
            raise BrokerAuthFailed(msg) from None
    if not mechanism.is_authenticated():
        raise BrokerAuthFailed(refused)


def _call(sock: socket.socket, api_key: int, version: int, body: bytes) -> bytes:
    """One request (header v1) and its response body, without the correlation id."""
    correlation_id = 0x5A51
    frame = struct.pack(">hhi", api_key, version, correlation_id) + _string(_CLIENT_ID) + body
    sock.sendall(struct.pack(">i", len(frame)) + frame)
    (size,) = struct.unpack(">i", _recv(sock, 4))
    reply = _recv(sock, size)
    if struct.unpack_from(">i", reply)[0] != correlation_id:
        msg = "unexpected reply"
        raise EOFError(msg)
    return reply[4:]


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            msg = "connection closed"
            raise EOFError(msg)
        buf += chunk
    return buf


def _string(b: bytes) -> bytes:
    return struct.pack(">h", len(b)) + b


def _bytes(b: bytes) -> bytes:
    return struct.pack(">i", len(b)) + b


def _strings(body: bytes, at: int) -> list[str]:
    (n,) = struct.unpack_from(">i", body, at)
    at += 4
    out = []
    for _ in range(max(n, 0)):
        (length,) = struct.unpack_from(">h", body, at)
        out.append(body[at + 2 : at + 2 + length].decode(errors="replace"))
        at += 2 + length
    return out


def _auth_reply(body: bytes) -> tuple[int, str, int]:
    """SaslAuthenticate v0: error code, error message, offset of the auth bytes' length."""
    error, length = struct.unpack_from(">hh", body)
    message = "" if length < 0 else body[4 : 4 + length].decode(errors="replace")
    return error, message, 4 + max(length, 0)
