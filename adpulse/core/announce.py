"""How a worker started by hand learns that its broker is ``adpulse broker``'s embedded one.

The first steps by hand are ``adpulse broker`` in one terminal and ``adpulse
worker`` in another (docs/security.md, "Privacy"). The embedded broker allows the
published development pseudonym key; a real cluster must not. A worker the demo or a
test starts is told (``ADPULSE_EMBEDDED_BROKER``), but one started by hand on that
broker was not, and stopped with "no pseudonym key".

So ``adpulse broker`` announces itself: while it runs, a file in the user's state
folder (``$XDG_STATE_HOME/adpulse/embedded-brokers/``, else
``~/.local/state/adpulse/embedded-brokers/``) names its port, kind and process id.
:func:`recognise` accepts that claim only when all of it holds, so no stale or
forged file can turn a real cluster into a development one:

- the bootstrap is one loopback address (127.0.0.1 or localhost) and port;
- the file belongs to the current user and is not writable by anyone else;
- the process it names is alive and is the only one listening on that port
  (every listening socket's inode in ``/proc/net/tcp*`` is among its open files).

Anything else, or a platform without ``/proc``, is "not recognised": the worker
then needs a real key, as before.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from adpulse.core.settings import EmbeddedKind, Settings

LOOPBACK = ("127.0.0.1", "localhost")  # where the embedded broker listens
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


def folder() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "adpulse" / "embedded-brokers"


def _path(port: int) -> Path:
    return folder() / f"127.0.0.1-{port}.json"


def announce(port: int, pid: int, kind: EmbeddedKind) -> Path:
    """Record that ``pid`` is the embedded broker on ``port``; :func:`withdraw` removes it."""
    path = _path(port)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _prune(path.parent)
    part = path.with_suffix(f".{os.getpid()}.part")
    part.write_text(json.dumps({"port": port, "pid": pid, "kind": kind}))
    part.chmod(0o600)
    part.replace(path)
    return path


def withdraw(port: int, pid: int) -> None:
    """Remove the announcement for ``port`` if it is still ``pid``'s."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        path = _path(port)
        if json.loads(path.read_text())["pid"] == pid:
            path.unlink()


def _prune(where: Path) -> None:
    """Drop announcements of brokers that are gone (their owner was killed with -9)."""
    for stale in where.glob("127.0.0.1-*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            if not Path(f"/proc/{int(json.loads(stale.read_text())['pid'])}").exists():
                stale.unlink()


def recognise(settings: Settings) -> Settings:
    """``settings`` marked as on the embedded broker when its announcement holds; else as is."""
    if settings.embedded_broker:
        return settings
    port = _loopback_port(settings.bootstrap_or_default)
    if port is None:
        return settings
    try:
        path = _path(port)
        info = path.stat()
        claim = json.loads(path.read_text())
        pid, kind = int(claim["pid"]), claim["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        return settings
    if info.st_uid != os.getuid() or info.st_mode & 0o022 or kind not in ("kafka", "tansu"):
        return settings
    if not _listens(pid, port):
        return settings
    return settings.with_(embedded_broker=True, embedded=kind)


def _loopback_port(bootstrap: str) -> int | None:
    servers = [b.strip() for b in bootstrap.split(",") if b.strip()]
    if len(servers) != 1:
        return None
    host, _, port = servers[0].rpartition(":")
    if host not in LOOPBACK or not port.isdigit():
        return None
    return int(port)


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds every socket listening on ``port`` (Linux /proc).

    Every, not one: a client resolving ``localhost`` may reach another process on ::1.
    """
    listening: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rpartition(":")[2], 16) if len(fields) > 9 else -1
                if local_port == port and fields[3] == _LISTEN:
                    listening.add(f"socket:[{fields[9]}]")
    owned: set[str] = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            owned.add(os.readlink(fd))
    return bool(listening) and listening <= owned
