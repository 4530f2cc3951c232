"""``adpulse simulate --trainer``: the online trainer learns beside the simulated worker, and the
served model's online AUC is compared with the model frozen at the start, window by window.

What runs, on the simulation's broker and topics:

- a **registry of its own** (a temporary ``ADPULSE_MODEL_DIR``), seeded with a *start
  version* trained here by :func:`scoring.train.train` on ``scoring.synthetic`` labels
  (``adpulse train --generate``'s world, not the simulator's: the start model knows
  how interest and ad embeddings combine, not this world's ads), with ``model.pt`` for
  the trainer's warm start, under the feature spec the worker uses;
- ``adpulse trainer`` as a subprocess, exporting a candidate every
  ``ADPULSE_TRAIN_INTERVAL_S`` (default here 10 s: the world's time runs fast);
- **promotion**: ``direct`` moves each candidate up into the registry as it appears
  (docs/training.md's manual promotion) so the workers hot-swap to it at their next
  poll; ``promoter`` runs ``adpulse promoter`` with the simulation's scale (canary share
  50%, 300 labels per arm; each overridable by its ADPULSE_ variable).

Afterwards every label the simulator read from ``ctr-feedback`` is scored by the start
version (its ONNX file, on the features logged with the label), and
:mod:`scoring.recovery` computes both curves and each model's time to recover.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from adpulse.broker import free_port
from adpulse.core.errors import ConfigError
from adpulse.core.settings import Settings
from adpulse.workerproc import ChildProcess, metric_sum
from scoring.recovery import Recovery, Window, paired_auc_diff, recovery
from scoring.train import auc

if TYPE_CHECKING:
    from adpulse.simulate import Run, SimConfig

START_VERSION = "20000101T000000Z-start"  # sorts before every version the trainer names
Promotion = Literal["direct", "promoter"]
PROMOTIONS: tuple[Promotion, ...] = ("direct", "promoter")
# The simulation's time scale (the world's time runs fast); the environment wins.
TRAINER_ENV = {"ADPULSE_TRAIN_INTERVAL_S": "10", "ADPULSE_TRAINER_CHECKPOINT_S": "5",
               "ADPULSE_TRAINER_THREADS": "1"}  # fmt: skip
LEARNED, CANDIDATES_METRIC = "adpulse_trainer_labels_total", "adpulse_trainer_candidates_total"
PROMOTER_ENV = {"ADPULSE_CANARY_SHARE": "0.5", "ADPULSE_CANARY_MIN_LABELS": "300",
                "ADPULSE_PROMOTER_POLL_S": "1"}  # fmt: skip


def seed_registry(settings: Settings, root: Path, rows: int = 20_000, seed: int = 5) -> Path:
    """Train the start version into ``root`` (needs PyTorch); returns its directory."""
    try:
        import torch  # noqa: F401, PLC0415 - only to say clearly what is missing
    except ImportError:
        msg = ("simulate --trainer trains a start model and runs adpulse trainer: both need "
               "PyTorch (pip install torch==2.13.0, or make venv)")  # fmt: skip
        raise ConfigError(msg) from None
    from scoring.featurespec import FeatureSpec  # noqa: PLC0415
    from scoring.synthetic import generate  # noqa: PLC0415
    from scoring.train import train  # noqa: PLC0415

    spec = FeatureSpec.from_settings(settings)
    train(generate(rows, seed=seed, sequence=spec.sequence), root, epochs=2, version=START_VERSION,
          threads=1, spec=spec)  # fmt: skip
    return root / START_VERSION


class AdpulseProcess(ChildProcess):
    """``adpulse <command>`` as a subprocess with the worker's environment plus ``env``;
    ``port`` is its metrics port, when it has one."""

    def __init__(
        self, command: str, env: Mapping[str, str], log_path: Path, port: int | None = None
    ) -> None:
        self.command, self.env, self.log_path, self.port = command, dict(env), log_path, port
        self.proc: subprocess.Popen[bytes] | None = None

    def metric(self, name: str, labels: str = "") -> float | None:
        """A metric's sum from its metrics port; None while the port does not answer.

        An exited process fails at once, with its log (nothing would ever answer)."""
        if self.proc is not None and self.proc.poll() is not None:
            msg = f"adpulse {self.command} exited with {self.proc.returncode}:\n{self.tail()}"
            raise AssertionError(msg)
        try:
            url = f"http://127.0.0.1:{self.port}/metrics"
            with urllib.request.urlopen(url, timeout=2) as r:
                return metric_sum(r.read().decode(), name, labels)
        except OSError:
            return None

    def start(self) -> AdpulseProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "adpulse.cli", self.command],
                env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        return self


def publish_candidates(root: Path, stop: threading.Event, every: float = 1.0) -> list[str]:
    """Move each finished candidate up into the registry until ``stop``; returns their names.

    The trainer writes a candidate under a dot-name and renames it into place, so a
    directory seen here is whole; the rename up is atomic as well."""
    from scoring.registry import CANDIDATES  # noqa: PLC0415

    moved: list[str] = []

    def move() -> None:
        cand = root / CANDIDATES
        if cand.is_dir():
            for d in sorted(cand.iterdir()):
                if d.is_dir() and not d.name.startswith(".") and not (root / d.name).exists():
                    d.rename(root / d.name)
                    moved.append(d.name)

    while not stop.is_set():
        move()
        stop.wait(every)
    move()  # a candidate finished since the last pass is moved too
    return moved


@dataclass
class Training:
    """The trainer beside the run, and what :func:`online_auc` reports of it afterwards."""

    trainer: AdpulseProcess
    result: dict[str, Any]

    def catch_up(self, labels: int, timeout: float = 120.0) -> bool:
        """Wait until the trainer has taken in ``labels`` labels and exported a candidate.

        The run's end stops the trainer; without this, a box on which the trainer starts or
        learns slowly would stop it before its first candidate, and the summary would show
        a served curve no candidate could have moved. False (and said in the summary) if
        the trainer has not caught up within ``timeout`` seconds."""

        def caught_up() -> bool:
            learned = self.trainer.metric(LEARNED, 'outcome="learned"') or 0.0
            return learned >= labels and (self.trainer.metric(CANDIDATES_METRIC) or 0.0) >= 1

        try:
            self.trainer.wait_until(caught_up, timeout, f"the trainer learning {labels} labels")
        except AssertionError:
            self.result["trainer_caught_up"] = False
            return False
        self.result["trainer_caught_up"] = True
        return True


@contextlib.contextmanager
def online_training(
    worker_env: Mapping[str, str], root: Path, data: Path, out: Path, promotion: Promotion,
    log: Any = print,
) -> Iterator[Training]:  # fmt: skip
    """The trainer (and the promoter, or the direct publisher) for the duration of the block;
    yields the :class:`Training`, whose result holds, afterwards, the versions promoted."""
    env = {**worker_env, "ADPULSE_MODEL_DIR": str(root), "ADPULSE_MODEL_POLL_S": "1"}
    for k, v in TRAINER_ENV.items():
        env.setdefault(k, os.environ.get(k, v))
    port = free_port()
    env.update(ADPULSE_TRAINER_DIR=str(data / "trainer"), ADPULSE_TRAINER_PORT=str(port))
    trainer = AdpulseProcess("trainer", env, out / "simulate-trainer.log", port).start()
    # the run starts once the trainer has warm-started (its metrics port answers then): a
    # slow box's start-up (PyTorch's import, the model) is not taken out of the run
    trainer.wait_until(lambda: trainer.metric(LEARNED) is not None, 180,
                       "adpulse trainer ready (its metrics port answering)")  # fmt: skip
    log(f"started adpulse trainer (log: {trainer.log_path}); promotion: {promotion}")
    result: dict[str, Any] = {"promotion": promotion, "promoted": []}
    stop = threading.Event()
    publisher: threading.Thread | None = None
    promoter: AdpulseProcess | None = None
    try:
        if promotion == "direct":

            def publish() -> None:
                result["promoted"] = publish_candidates(root, stop)

            publisher = threading.Thread(target=publish, name="sim-publisher", daemon=True)
            publisher.start()
        else:
            penv = {**env, "ADPULSE_PROMOTER_PORT": str(free_port())}
            for k, v in PROMOTER_ENV.items():
                penv.setdefault(k, os.environ.get(k, v))
            promoter = AdpulseProcess("promoter", penv, out / "simulate-promoter.log").start()
        yield Training(trainer, result)
    finally:
        stop.set()
        if publisher is not None:
            publisher.join(10)
        result["trainer_exit_code"] = trainer.proc.poll() if trainer.proc else None
        for p in (promoter, trainer):
            if p is not None:
                p.stop()
        if promoter is not None:
            from scoring.promotion import read_state  # noqa: PLC0415

            state = read_state(root)
            result["promoted"] = sorted(
                d.name for d in root.iterdir()
                if d.is_dir() and d.name not in (START_VERSION, "candidates")
                and not d.name.startswith(".")
            )  # fmt: skip
            result["serving_at_end"] = state.serving if state is not None else None


# -- after the run: both curves -------------------------------------------------------------
def frozen_scores(
    start: Path, settings: Settings, records: list[dict[str, Any]]
) -> npt.NDArray[np.float64]:
    """The start version's pCTR for each record's logged features (ONNX Runtime only)."""
    from scoring.featurespec import FeatureSpec, from_feedback  # noqa: PLC0415
    from scoring.registry import validate  # noqa: PLC0415

    loaded = validate(start, FeatureSpec.from_settings(settings),
                      latency_budget_ms=float("inf"))  # fmt: skip
    out = np.zeros(len(records), dtype=np.float64)
    for lo in range(0, len(records), 4096):
        chunk = records[lo : lo + 4096]
        out[lo : lo + len(chunk)] = np.asarray(
            loaded.scorer.score(from_feedback(chunk, loaded.spec))
        ).reshape(-1)
    return out


def online_auc(
    run: Run, cfg: SimConfig, settings: Settings, start: Path | None,
    extra: Mapping[str, Any] | None = None, out: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The served model's curve per window and its recovery, and the start version's (when
    ``start`` is given) on the same labels, as written into summary.json."""
    ids = [d for d in run.decision_ids
           if d in run.feedback and "pctr" in run.feedback[d].get("features", {})]  # fmt: skip
    where = dict(zip(run.decision_ids, run.index, strict=True))
    recs = [run.feedback[d] for d in ids]
    index = np.array([where[d] for d in ids], dtype=np.int64)
    y = np.array([int(r.get("clicked", 0)) for r in recs], dtype=np.float64)
    served = np.array([float(r["features"]["pctr"]) for r in recs], dtype=np.float64)
    edges = np.linspace(0, run.n_requests, cfg.bins + 1).astype(np.int64).tolist()

    def curve(p: npt.NDArray[np.float64]) -> tuple[list[Window], Recovery]:
        return recovery(index, y, p, edges, run.drift_index, reference=cfg.recover_reference,
                        tolerance=cfg.recover_tolerance, hold=cfg.recover_hold)  # fmt: skip

    versions = [str(r.get("model_version", "")) for r in recs]
    start_version = start.name if start is not None else None
    by_start = np.array([v == start_version for v in versions], dtype=bool)
    curves = {"served": curve(served)}
    check: dict[str, Any] = {}
    if start is not None:
        frozen = frozen_scores(start, settings, recs)
        curves["frozen"] = curve(frozen)
        # where the start version served, both curves score a label alike: a self-check
        gap = np.abs(frozen - served)[by_start]
        check["start_labels_max_abs_diff"] = float(gap.max()) if len(gap) else None
        check["served_minus_frozen"] = {
            name: _paired(y[m], served[m], frozen[m])
            for name, m in (("before_drift", index < run.drift_index),
                            ("after_drift", index >= run.drift_index))
        }  # fmt: skip
        if out is not None:  # every label's scores, to recompute any figure here
            np.savez_compressed(out / "online_auc.npz", index=index, clicked=y, served=served,
                                frozen=frozen, version=np.array(versions))  # fmt: skip
    return {
        "definition": "AUC per window of the labels read from ctr-feedback: 'served' scores "
        "each with the pCTR of the model that served it (features.pctr, before any model "
        "learned it), 'frozen' with the start version; windows_to_recover: windows after the "
        "drift before the first of `hold` in a row with AUC >= level - tolerance, level the "
        "mean AUC of the last `reference` windows before the drift (scoring/recovery.py)",
        "bin_edges": edges,
        "drift_index": run.drift_index,
        "reference": cfg.recover_reference,
        "tolerance": cfg.recover_tolerance,
        "hold": cfg.recover_hold,
        "start_version": start_version,
        "served_versions": len(set(versions)),
        "labels_served_by_start": int(by_start.sum()),
        **check,
        **dict(extra or {}),
        "models": {
            name: {"windows": [_window(w) for w in ws], **rec.as_json()}
            for name, (ws, rec) in curves.items()
        },
    }


def _paired(y: npt.NDArray[np.float64], a: npt.NDArray[np.float64],
            b: npt.NDArray[np.float64]) -> dict[str, Any]:  # fmt: skip
    """AUC of each and the paired difference with its bootstrap 95% interval."""
    d, lo, hi = paired_auc_diff(y, a, b)
    r = [None if np.isnan(v) else round(float(v), 4) for v in (auc(y, a), auc(y, b), d, lo, hi)]
    return {"labels": len(y), "served": r[0], "frozen": r[1], "diff": r[2], "ci": r[3:]}


def _window(w: Window) -> dict[str, Any]:
    return {"labels": w.labels, "clicks": w.clicks,
            "auc": None if np.isnan(w.auc) else round(w.auc, 5)}  # fmt: skip


def format_recovery(block: Mapping[str, Any]) -> str:
    """One line per model: pre-drift level, floor after the drift, windows to recover."""
    lines = []
    for name, m in block["models"].items():
        level = "-" if m["level"] is None else f"{m['level']:.3f}"
        floor = "-" if m["floor"] is None else f"{m['floor']:.3f}"
        w = m["windows_to_recover"]
        back = "never (within the run)" if w is None else f"after {w} window(s)"
        lines.append(f"  {name:<7} AUC before drift {level}, lowest after {floor}, "
                     f"recovered {back}")  # fmt: skip
    for period, d in (block.get("served_minus_frozen") or {}).items():
        if d["diff"] is not None:
            lines.append(f"  {period.replace('_', ' ')}: served {d['served']:.3f}, frozen "
                         f"{d['frozen']:.3f} over {d['labels']:,} labels; difference "
                         f"{d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] (paired "
                         "bootstrap 95%)")  # fmt: skip
    return (f"online AUC per window (tolerance {block['tolerance']:g}, {block['hold']} windows "
            "in a row):\n" + "\n".join(lines))  # fmt: skip
