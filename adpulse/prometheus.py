"""A real Prometheus server on loopback, run with the shipped config: for the demo and tests.

The shipped ``deploy/prometheus/prometheus.yml`` is used with only its targets,
its intervals and the rules path rewritten, so the alert rules are loaded and
evaluated by the same server an operator would run. Prometheus itself comes
from the system (Debian's ``prometheus`` package); :func:`binary` says whether
it is there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from adpulse.broker import free_port
from adpulse.polling import log_tail, poll_until

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
JOB = "adpulse"  # the workers' scrape job; the alerts and dashboard select by job


def binary() -> str | None:
    return shutil.which("prometheus")


def scrape_config(
    targets: Sequence[str],
    out: Path,
    interval: str = "1s",
    others: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """The shipped prometheus.yml, pointed at these workers (URLs), scraping every ``interval``.

    ``others`` points the shipped config's other jobs (``adpulse-trainer``,
    ``adpulse-promoter``) at URLs too; a job not named there is left out, since its
    compose host name would not resolve here and its ``up`` of 0 would fire alerts."""
    others = others or {}
    config = yaml.safe_load(CONFIG.read_text())
    config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    config["rule_files"] = [str(CONFIG.parent / f) for f in config["rule_files"]]
    urls = {JOB: targets, **others}
    unknown = set(urls) - {job["job_name"] for job in config["scrape_configs"]}
    if unknown:
        msg = f"no scrape job {sorted(unknown)} in {CONFIG}"
        raise ValueError(msg)
    config["scrape_configs"] = [job for job in config["scrape_configs"] if job["job_name"] in urls]
    for job in config["scrape_configs"]:
        job["static_configs"] = [
            {"targets": [t.removeprefix("http://") for t in urls[job["job_name"]]]}
        ]
    out.write_text(yaml.safe_dump(config))
    return out


class Prometheus:
    """One ``prometheus`` process on a free loopback port, its TSDB under ``workdir``."""

    def __init__(self, executable: str, config: Path, workdir: Path, timeout: float = 30) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = workdir / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    executable,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait(self._ready, timeout, "prometheus ready (/-/ready)")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            msg = f"prometheus exited with {self.proc.returncode}:\n{self.tail()}"
            raise RuntimeError(msg)
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return int(r.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            msg = f"prometheus {path}: {body}"
            raise RuntimeError(msg)
        return body["data"]

    def value(self, expr: str) -> float | None:
        """The single value of an instant query; None while it has no result."""
        result = self.api("query", query=expr)["result"]
        return float(result[0]["value"][1]) if result else None

    def range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """A range query: one ``{"metric": labels, "values": [[t, "v"], ...]}`` per series."""
        data = self.api(
            "query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}"
        )
        return list(data["result"])

    def wait(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        poll_until(check, timeout, what, every=0.5, detail=self.tail)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def tail(self, n: int = 20) -> str:
        return log_tail(self.log_path, n)
