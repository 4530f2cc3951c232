"""The login check names what to fix when the other end is not what the settings expect."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from adpulse.core.errors import BrokerAuthFailed
from adpulse.core.kafkaauth import verify
from adpulse.core.settings import Settings


@pytest.fixture
def plain_server() -> Iterator[int]:
    """A TCP server that answers every connection in plain text, as a non-TLS port does."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    yield int(srv.getsockname()[1])
    srv.close()


def test_tls_to_a_port_that_does_not_speak_it_is_one_line_naming_the_protocol(
    plain_server: int, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    s = Settings(bootstrap=f"127.0.0.1:{plain_server}", security_protocol="SSL",
                 ssl_cafile=str(ca))  # fmt: skip
    with pytest.raises(BrokerAuthFailed, match=r"TLS handshake with 127\.0\.0\.1:\d+ failed") as e:
        verify(s, "127.0.0.1", plain_server)
    assert "ADPULSE_SECURITY_PROTOCOL" in str(e.value) and "\n" not in str(e.value)
    assert BrokerAuthFailed.exit_code == 3


def test_plaintext_has_nothing_to_check() -> None:
    verify(Settings(), "127.0.0.1", 1)  # no connection is even tried
