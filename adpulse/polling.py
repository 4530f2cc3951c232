"""Waiting on a process the tools started (a worker, Prometheus): poll a condition until
it holds, and when it never does, fail with the tail of that process's log, which is
where the reason is."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


def poll_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    every: float,
    detail: Callable[[], str],
    error: type[Exception] = TimeoutError,
) -> None:
    """Return once ``check()`` is true; after ``timeout`` seconds raise ``error`` with
    ``detail()`` (the process's log tail) in its message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    msg = f"timed out after {timeout:.0f}s waiting for {what}:\n{detail()}"
    raise error(msg)


def log_tail(path: Path, n: int = 40) -> str:
    """The last ``n`` lines of a log ("" while it does not exist)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
