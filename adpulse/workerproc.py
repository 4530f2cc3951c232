"""A real `adpulse worker` subprocess for tests and benchmarks: start, wait, query, kill."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adpulse.broker import free_port
from adpulse.core.settings import Settings
from adpulse.polling import log_tail, poll_until


def metric_sum(text: str, name: str, labels: str = "") -> float:
    """Sum of one metric's samples in a Prometheus text page whose labels contain ``labels``."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{")
        and labels in line
    )  # fmt: skip


class ChildProcess:
    """An adpulse process the tools and tests start (a worker, the trainer): its log, and
    how to wait on it, stop it gracefully or kill it."""

    proc: subprocess.Popen[bytes] | None
    log_path: Path

    def wait_until(
        self, check: Callable[[], bool], timeout: float, what: str, every: float = 0.2
    ) -> None:
        poll_until(check, timeout, what, every=every, detail=self.tail, error=AssertionError)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final commit, no flush."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, n: int = 40) -> str:
        return log_tail(self.log_path, n)


class WorkerProcess(ChildProcess):
    def __init__(
        self,
        settings: Settings,
        log_dir: Path,
        name: str = "worker",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings.with_(web_port=free_port(), decide_port=free_port())
        self.extra_env = dict(extra_env or {})  # more ADPULSE_* variables (policy, windows)
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # The API token the user-data endpoints require: the settings', else one made here
        # (one per log folder, so workers started side by side share it, as they must).
        token_file = Path(settings.api_token_file) if settings.api_token_file else None
        if token_file is None:
            token_file = log_dir / "api-token"
            if not token_file.exists():
                token_file.write_text(secrets.token_hex(24))
                token_file.chmod(0o600)
        self.token_file = token_file
        self.token = token_file.read_text().strip()

    @property
    def pid(self) -> int:
        """The worker's process id (started: benches read its CPU time from /proc)."""
        assert self.proc is not None, "worker not started"
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.web_port}"

    @property
    def decide_url(self) -> str:
        """The lean server of ``POST /decide`` alone (``ADPULSE_DECIDE_PORT``)."""
        return f"http://127.0.0.1:{self.settings.decide_port}"

    def env(self) -> dict[str, str]:
        s = self.settings
        env = dict(os.environ)
        env.update(
            ADPULSE_BOOTSTRAP=s.bootstrap,
            ADPULSE_EMBEDDED_BROKER="true" if s.embedded_broker else "false",
            ADPULSE_EMBEDDED=s.embedded,
            ADPULSE_TOPIC_PREFIX=s.topic_prefix,
            ADPULSE_APP_ID=s.app_id,
            ADPULSE_DATA_DIR=str(s.data_dir),
            ADPULSE_WEB_PORT=str(s.web_port),
            ADPULSE_DECIDE_PORT=str(s.decide_port),
            ADPULSE_SESSION_TIMEOUT_S=str(s.session_timeout_s),
            ADPULSE_PARTITIONS=str(s.partitions),
            ADPULSE_API_TOKEN_FILE=str(self.token_file),
            ADPULSE_MODEL_POLL_S=str(s.model_poll_s),
        )
        if s.model_dir:  # a registry of its own (bench serve --swap publishes into it)
            env["ADPULSE_MODEL_DIR"] = s.model_dir
        # The settings' rate limit (the benches raise it), unless the environment sets one.
        env.setdefault("ADPULSE_MAX_EVENTS_PER_USER_S", str(s.max_events_per_user_s))
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        self.spawn()
        return self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> WorkerProcess:
        """Block until /health answers 200 (an exited worker fails at once, with its log)."""
        self.wait_until(lambda: self._health() == 200, timeout, "worker ready (/health 200)")
        if self.settings.decide_port:
            self.wait_until(self._decide_listens, timeout, "the decide port listening")
        return self

    def _decide_listens(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.settings.decide_port), 2).close()
        except OSError:
            return False
        return True

    def spawn(self) -> WorkerProcess:
        """Start the process and return at once (a fault test may kill it while it starts)."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adpulse.cli", "worker", "--loglevel", "info"],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    def _health(self) -> int | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            msg = f"worker exited with {self.proc.returncode}:\n{self.tail()}"
            raise AssertionError(msg)
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError:
            return None

    @property
    def auth(self) -> dict[str, str]:
        """The header the worker's user-data endpoints require."""
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, authorized: bool = True) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, headers=self.auth if authorized else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                body = r.read()
                status = int(r.status)
        except urllib.error.HTTPError as e:
            body, status = e.read(), int(e.code)
        return status, json.loads(body) if body[:1] in (b"{", b"[") else body.decode()

    def post(
        self,
        path: str,
        body: bytes,
        headers: dict[str, str] | None = None,
        authorized: bool = True,
        base: str | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        """POST ``body`` (to ``base``, default the web port): status, JSON answer, response
        headers (an HTTP error is an answer)."""
        req = urllib.request.Request(
            (base or self.url) + path,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", **(self.auth if authorized else {}),
                     **(headers or {})},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw, status, got = r.read(), int(r.status), dict(r.headers.items())
        except urllib.error.HTTPError as e:
            raw, status, got = e.read(), int(e.code), dict(e.headers.items())
        return status, json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode(), got

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of one metric's samples whose labels contain ``labels``.

        0 when the metric is absent or the worker does not answer (down, busy,
        restarting): callers poll it until it reaches what they wait for.
        """
        try:
            status, text = self.get("/metrics")
        except OSError:
            return 0.0
        return metric_sum(str(text), name, labels) if status == 200 else 0.0

    def buckets(self, name: str) -> dict[float, float]:
        """A histogram's cumulative bucket counts, upper bound -> count ({} if absent)."""
        try:
            status, text = self.get("/metrics")
        except OSError:
            return {}
        out: dict[float, float] = {}
        prefix = f'{name}_bucket{{le="'
        for line in str(text).splitlines() if status == 200 else []:
            if line.startswith(prefix):
                le, _, count = line[len(prefix) :].partition('"} ')
                out[float(le)] = float(count)
        return out

    def interest(self, user: str) -> dict[str, Any] | None:
        status, body = self.get(f"/users/{user}/interest")
        return body if status == 200 else None
