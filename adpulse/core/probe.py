"""Is a Kafka broker answering? The one probe the worker, the tools and the tests share.

It lives in the core because the worker's ``/health`` and ``adpulse_broker_connected``
ask the same question as ``adpulse broker`` and every tool before it connects, and the
worker must not import the tools. A raw Metadata v0 request, so that no client
library's 30 s bootstrap loop hides a wrong address.
"""

from __future__ import annotations

import socket
import struct
import time

from adpulse.core.errors import BrokerUnavailable
from adpulse.core.settings import Settings


def metadata_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a Kafka Metadata (v0, all topics) request gets a well-formed reply."""
    correlation_id = 0x0ADB
    client_id = b"adpulse"
    body = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id
    body += struct.pack(">i", 0)  # v0: empty topic array = all topics
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            head = _recv_exact(s, 8)
    except OSError:
        return False
    if head is None:
        return False
    _size, got_id = struct.unpack(">ii", head)
    return bool(got_id == correlation_id)


def _accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _recv_exact(s: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def wait_for_broker(target: Settings | str, timeout: float = 10.0) -> None:
    """Block until the first bootstrap server answers, else raise BrokerUnavailable.

    A plaintext broker must answer a Metadata request; behind TLS or SASL, one
    login with the configured settings (:func:`adpulse.core.kafkaauth.verify`) must
    succeed, so a wrong password or an untrusted certificate is one line
    (BrokerAuthFailed, exit 3) instead of the clients' 30 s "Unable to bootstrap".
    """
    plaintext = isinstance(target, str) or target.security_protocol == "PLAINTEXT"
    bootstrap = target if isinstance(target, str) else target.bootstrap_or_default
    host, _, port = bootstrap.split(",", maxsplit=1)[0].rpartition(":")
    if not host or not port.isdigit():
        msg = f"bootstrap {bootstrap!r} is not HOST:PORT"
        raise BrokerUnavailable(msg)
    deadline = time.monotonic() + timeout
    while True:
        if metadata_answers(host, int(port)) if plaintext else _accepts(host, int(port)):
            if not isinstance(target, str):
                from adpulse.core.kafkaauth import verify  # noqa: PLC0415

                verify(target, host, int(port))
            return
        if time.monotonic() > deadline:
            msg = f"no Kafka broker answered at {bootstrap} within {timeout:g}s"
            raise BrokerUnavailable(msg)
        time.sleep(0.05)
