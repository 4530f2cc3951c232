"""``adpulse trainer``: the CTR model learns online from ctr-feedback, one process per deployment.

One pass of the loop (:func:`run`): poll a batch of labels -> :meth:`Trainer.step`
(decode, refuse bad and repeated labels, score the batch with the online model and
the serving version *before* learning it, then take it in: one update per full
``ADPULSE_TRAINER_STEP_ROWS`` of pending rows) -> dead letters sent ->
every ``ADPULSE_TRAINER_CHECKPOINT_S`` a checkpoint -> every
``ADPULSE_TRAIN_INTERVAL_S`` a candidate version in ``MODEL_DIR/candidates/``.

Exactly once across restarts. The consumer is in no group: it is assigned every
partition of ctr-feedback and commits nothing to Kafka. The offsets it consumed
are stored *inside* the checkpoint file with the weights, optimiser, the rows
pending for the next step, the replay and dedupe rings, written atomically (temp
file, fsync, rename): the file holds the model that took in exactly the labels
before those offsets, each in its weights or pending. On start the trainer
loads it and seeks to them. A kill -9 between checkpoints loses the batches
learned since the last one, and the restart learns them again from the same
state: each label is in the model once. Dead letters are flushed before each
checkpoint, so none is lost; a crash may send one of them twice.

The pure parts are in scoring/ (:mod:`scoring.online`, :mod:`scoring.progressive`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from adpulse.core.errors import ConfigError
from adpulse.core.metrics import Metrics
from adpulse.core.settings import Settings
from scoring.featurespec import FeatureSpec, Inputs, from_feedback
from scoring.online import OnlineLearner, atomic_save, build, export_version, load_saved
from scoring.progressive import ProgressiveValidation, WindowSummary, parse_sizes
from scoring.registry import CANDIDATES, LoadedModel, ModelRegistry
from streams.deadletter import Raw, Rejected
from streams.learn import feedback_decoder

log = logging.getLogger(__name__)
STAGE = "trainer"
CHECKPOINT_FILE = "checkpoint.pt"
ONLINE = "online"  # the version label of the model being trained


@dataclass
class StepResult:
    learned: int = 0
    conversions: int = 0  # conversion records: learned by a two-head model, else skipped
    rejected: list[Rejected] = field(default_factory=list)


class Trainer:
    """The trainer's state and one step per batch, without Kafka (the loop does the I/O)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        if not settings.model_dir:
            msg = ("adpulse trainer exports candidates into the model registry: set "
                   "ADPULSE_MODEL_DIR to a writable registry directory")  # fmt: skip
            raise ConfigError(msg)
        try:
            sizes = parse_sizes(settings.trainer_windows)
        except ValueError as exc:
            msg = f"ADPULSE_TRAINER_WINDOWS={settings.trainer_windows!r}: {exc}"
            raise ConfigError(msg) from None
        self.s, self.m = settings, metrics
        self.spec = FeatureSpec.from_settings(settings)
        self.root = Path(settings.model_dir)
        self.dir = Path(settings.trainer_dir) if settings.trainer_dir else (
            Path(settings.data_dir) / "trainer")  # fmt: skip
        self.decoder = feedback_decoder()
        self.registry = ModelRegistry.from_settings(settings)
        self.serving: LoadedModel | None = self.registry.latest_valid()
        self.pv = ProgressiveValidation(sizes)
        self.offsets: dict[int, int] = {}
        self.base_version = ""
        self.last_candidate = ""
        self.steps_at_export = 0  # the learner's optimiser steps when the last candidate went out
        saved = load_saved(self.dir / CHECKPOINT_FILE)
        self.learner = self._restore(saved) if saved is not None else self._warm_start()
        self.spec = self.learner.spec  # the sequence length the weights were trained on

    def _warm_start(self) -> OnlineLearner:
        from scoring.online import load_weights  # noqa: PLC0415

        if self.serving is None:
            msg = (f"no valid model version in {self.root} to start from: publish one with "
                   f"`adpulse train --out {self.root}`")  # fmt: skip
            raise ConfigError(msg)
        if self.serving.checkpoint is None:
            msg = (f"serving version {self.serving.version} has no model.pt to warm-start "
                   f"from (published before the trainer existed): retrain it with `adpulse "
                   f"train --out {self.root}`, which keeps the PyTorch weights beside "
                   "model.onnx")  # fmt: skip
            raise ConfigError(msg)
        try:
            model = load_weights(self.serving.checkpoint, self.serving.spec)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.base_version = self.serving.version
        log.info("trainer: warm start from %s (%d head(s), sequence %d; no checkpoint in %s)",
                 self.base_version, 1 if model.cvr is None else 2, model.spec.sequence,
                 self.dir)  # fmt: skip
        return self._learner(model)

    def _learner(self, model: Any) -> OnlineLearner:
        s = self.s
        try:  # the learner (and torch's optimiser) check their arguments: one home each
            return OnlineLearner(model, lr=s.trainer_lr, replay=s.trainer_replay,
                                 dedupe_ids=s.trainer_dedupe_ids,
                                 step_rows=s.trainer_step_rows)  # fmt: skip
        except ValueError as exc:  # from the ADPULSE_TRAINER_* settings: one line, no traceback
            msg = f"trainer settings (ADPULSE_TRAINER_*): {exc}"
            raise ConfigError(msg) from None

    def _restore(self, saved: dict[str, Any]) -> OnlineLearner:
        learner = self._learner(build(self.spec, saved["arch"]))
        learner.load(saved)
        self.offsets = {int(p): int(o) for p, o in saved["offsets"].items()}
        self.base_version = str(saved["base_version"])
        self.last_candidate = str(saved["last_candidate"])
        # -1 (a checkpoint from before steps were counted): the next candidate goes out
        self.steps_at_export = int(saved.get("steps_at_export", -1))
        self.pv = ProgressiveValidation.from_state(self.pv.sizes, saved["validation"])
        log.info("trainer: resumed from %s: %d labels learned, offsets %s",
                 self.dir / CHECKPOINT_FILE, learner.learned, self.offsets)  # fmt: skip
        return learner

    # -- one batch ---------------------------------------------------------------------------
    def step(self, raws: list[Raw]) -> StepResult:
        """Refuse the bad, score the rest before learning them, learn; advance the offsets."""
        out = StepResult()
        keep: list[dict[str, Any]] = []
        conv: list[dict[str, Any]] = []
        batch_ids: set[str] = set()
        conv_ids: set[str] = set()
        for raw in raws:
            self.offsets[raw.partition] = max(self.offsets.get(raw.partition, 0), raw.offset + 1)
            why = self._refusal(raw, batch_ids, conv_ids)
            if isinstance(why, Rejected):
                out.rejected.append(why)
            elif why is None or why.get("converted") == 1:
                out.conversions += 1
                if why is not None:
                    conv.append(why)
            else:
                keep.append(why)
        if keep or conv:
            x = self._inputs(keep, self.spec)
            y = np.array([int(r["clicked"]) for r in keep], dtype=np.float32)
            if keep:
                self.pv.add(ONLINE, y, self.learner.score(x))
                if self.serving is not None:
                    spec = self.serving.spec
                    sx = x if spec == self.spec else from_feedback(keep, spec)
                    sx = {k: sx[k] for k in spec.input_names}  # not the ids the replay keeps
                    self.pv.add(self.serving.version, y, self.serving.scorer.score(sx))
            cx = None
            if conv:
                cx = (self._inputs(conv, self.spec), [str(r["decision_id"]) for r in conv])
            self.learner.learn(x, y, [str(r["decision_id"]) for r in keep], cx)
            out.learned = len(keep)
        self._count(out)
        return out

    @staticmethod
    def _inputs(recs: list[dict[str, Any]], spec: FeatureSpec) -> Inputs:
        """The model inputs of records, with a sequence model's behaviours as ids as well
        (what the learner's replay ring keeps)."""
        from scoring.sequence import behaviour_ids  # noqa: PLC0415

        x = from_feedback(recs, spec)
        if spec.sequence:
            x["behaviours"], x["seq_len"] = behaviour_ids(recs, spec)
        return x

    def _refusal(
        self, raw: Raw, batch_ids: set[str], conv_ids: set[str]
    ) -> Rejected | dict[str, Any] | None:
        """The record to learn (a label, or a conversion a two-head model learns), a
        rejection, or None for a conversion a one-head model skips."""
        msg = self.decoder.decode(raw)
        if isinstance(msg, Rejected):
            return msg
        conversion = msg.converted == 1
        if conversion and self.learner.heads == 1:
            return None  # the decision's label came (or comes) on its own record
        n = len(msg.features.interest)
        if n not in (0, self.spec.dim):
            return Rejected(raw, "features", f"interest has {n} values, the model's dim is "
                            f"{self.spec.dim} (ADPULSE_DIM)")  # fmt: skip
        did = msg.decision_id
        seen, repeat = (conv_ids, self.learner.is_duplicate_conversion) if conversion else (
            batch_ids, self.learner.is_duplicate)  # fmt: skip
        if did in seen or repeat(did):
            what = "conversion" if conversion else "label"
            return Rejected(raw, "duplicate", f"decision {did}'s {what} was learned already: "
                            f"a {what} is learned once")  # fmt: skip
        seen.add(did)
        rec: dict[str, Any] = msgspec.to_builtins(msg)
        return rec

    def _count(self, out: StepResult) -> None:
        c = self.m.trainer_labels
        c.labels(outcome="learned").inc(out.learned)
        c.labels(outcome="conversion").inc(out.conversions)
        c.labels(outcome="dead_lettered").inc(len(out.rejected))
        for rej in out.rejected:
            self.m.dead_letters.labels(topic=self.s.topic("ctr-feedback"), reason=rej.reason).inc()

    # -- metrics, serving version, candidates, checkpoints -------------------------------
    def publish_metrics(self) -> None:
        for version, windows in self.pv.summaries().items():
            for n, w in windows.items():
                labels = {"version": version, "window": str(n)}
                self.m.trainer_auc.labels(**labels).set(w.auc)
                self.m.trainer_logloss.labels(**labels).set(w.logloss)
                self.m.trainer_calibration.labels(**labels).set(w.calibration)

    def poll_serving(self) -> None:
        """Follow the registry: a new serving version is scored from then on, the old forgotten."""
        new = self.registry.poll()
        if new is None or self.serving is None or new.version == self.serving.version:
            self.serving = new or self.serving
            return
        old, self.serving = self.serving.version, new
        self.pv.forget(old)
        for g in (self.m.trainer_auc, self.m.trainer_logloss, self.m.trainer_calibration):
            for n in self.pv.sizes:
                with contextlib.suppress(KeyError):
                    g.remove(old, str(n))
        log.info("trainer: serving version now %s (was %s)", new.version, old)

    def export_candidate(self) -> Path | None:
        """A candidate version when the weights changed since the last one, else None.

        Counted in optimiser steps, not labels taken in: labels wait in the learner's
        pending rows until a full step, and a candidate exported before that step would be
        the previous weights under a new name (and a warm start's first one a copy of the
        serving model).
        """
        learner = self.learner
        if learner.steps == self.steps_at_export:
            return None
        out = self.root / CANDIDATES
        version = _version_name(out, self.root)
        recent = self.pv.recent(ONLINE)
        serving = self.pv.recent(self.serving.version) if self.serving is not None else None
        metrics: dict[str, Any] = {
            "version": version,
            "source": "adpulse trainer",
            "base_version": self.base_version,
            "parent": self.last_candidate or self.base_version,
            "serving_version": self.serving.version if self.serving is not None else None,
            **_flat(recent),
            "validation": {
                "method": "progressive: each label scored before it was learned",
                "window_labels": self.pv.sizes[0],
                "online": None if recent is None else recent.as_json(),
                "serving": None if serving is None else serving.as_json(),
            },
            "train_ctr": round(learner.clicks / max(learner.learned, 1), 6),
            "labels_learned": learner.learned,  # taken in: in the weights, or pending
            "rows_pending": learner.pending_rows,  # not in these weights yet (next step's)
            "conversions_learned": learner.conversions,
            "heads": learner.heads,
            "sequence": self.spec.sequence,
            "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
            "optimizer": f"Adam lr={self.s.trainer_lr:g}, {learner.step_rows} new rows a step "
            f"(and as many replayed), replay {self.s.trainer_replay}",
            "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        path = export_version(learner.model, self.spec, out, version, metrics)
        self.last_candidate, self.steps_at_export = version, learner.steps
        self.m.trainer_candidates.inc()
        log.info("trainer: candidate %s exported (%d labels learned, window AUC %s)",
                 version, learner.learned, metrics.get("auc"))  # fmt: skip
        return path

    def checkpoint(self) -> None:
        payload = {
            **self.learner.state(),
            "offsets": {str(p): o for p, o in self.offsets.items()},
            "base_version": self.base_version,
            "last_candidate": self.last_candidate,
            "steps_at_export": self.steps_at_export,
            "validation": self.pv.state(),
        }
        atomic_save(payload, self.dir / CHECKPOINT_FILE)
        self.m.trainer_checkpoint_ts.set(time.time())


def _flat(w: WindowSummary | None) -> dict[str, Any]:
    """The registry's top-level metric keys (``auc``, ``logloss``) from the held-back window."""
    if w is None:
        return {}
    j = w.as_json()
    return {"auc": j["auc"], "logloss": j["logloss"], "observed_over_expected": j["calibration"]}


def _version_name(candidates: Path, root: Path) -> str:
    """A UTC timestamp, as ``adpulse train`` names versions (suffixed if taken this second)."""
    base = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    name, i = base, 0
    while (candidates / name).exists() or (root / name).exists():
        i += 1
        name = f"{base}-{i}"
    return name


# -- the Kafka loop ---------------------------------------------------------------------------
def run(settings: Settings, stop: threading.Event | None = None) -> int:
    """Consume ctr-feedback until SIGTERM/SIGINT (or ``stop``), then checkpoint and return 0."""
    import json  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: PLC0415 - slow
    from prometheus_client import start_http_server  # noqa: PLC0415

    from adpulse.core.kafkaconf import client_kwargs  # noqa: PLC0415
    from streams.deadletter import dead_letter  # noqa: PLC0415

    if settings.trainer_threads > 0:
        torch.set_num_threads(settings.trainer_threads)
    metrics = Metrics.create()
    trainer = Trainer(settings, metrics)
    start_http_server(settings.trainer_port, registry=metrics.registry)
    stop = stop or threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    topic, dlq = settings.topic("ctr-feedback"), settings.topic("dead-letters")
    # earliest: a saved offset that retention has deleted resumes at the oldest label kept
    consumer = KafkaConsumer(**client_kwargs(settings), enable_auto_commit=False,
                             auto_offset_reset="earliest", fetch_max_wait_ms=200,
                             client_id="adpulse-trainer")  # fmt: skip
    producer = KafkaProducer(**client_kwargs(settings), acks="all", linger_ms=5)
    try:
        tps = _assign(consumer, topic, trainer.offsets, TopicPartition)
        log.info("trainer: consuming %s (%d partitions), candidates every %gs into %s",
                 topic, len(tps), settings.train_interval_s, trainer.root / CANDIDATES)  # fmt: skip
        last_ckpt = last_export = last_poll = last_metrics = time.monotonic()
        while not stop.is_set():
            polled = consumer.poll(timeout_ms=500, max_records=settings.trainer_batch)
            raws = sorted((Raw(r.value, r.key, r.partition, r.offset, r.timestamp)
                           for recs in polled.values() for r in recs),
                          key=lambda r: (r.partition, r.offset))  # fmt: skip
            if raws:
                result = trainer.step(raws)
                now_ms = int(time.time() * 1000)
                for rej in result.rejected:
                    body = dead_letter(rej, topic, now_ms, STAGE)
                    producer.send(dlq, value=json.dumps(body).encode())
            now = time.monotonic()
            if now - last_metrics >= 1.0:
                trainer.publish_metrics()
                last_metrics = now
            if now - last_poll >= settings.model_poll_s:
                trainer.poll_serving()
                last_poll = now
            if now - last_export >= settings.train_interval_s:
                trainer.export_candidate()
                last_export = now
                last_ckpt = 0.0  # the checkpoint follows the export at once
            if now - last_ckpt >= settings.trainer_checkpoint_s:
                producer.flush()  # dead letters acknowledged before their offsets are saved
                trainer.checkpoint()
                last_ckpt = now
        producer.flush()
        trainer.checkpoint()
        log.info("trainer: stopped after %d labels learned", trainer.learner.learned)
    finally:
        consumer.close()
        producer.close()
    return 0


def _assign(consumer: Any, topic: str, offsets: dict[int, int], tp_type: Any) -> list[Any]:
    """Assign every partition and seek each to its saved offset (the beginning when none)."""
    deadline = time.monotonic() + 30.0
    parts = consumer.partitions_for_topic(topic)
    while not parts:
        if time.monotonic() > deadline:
            msg = f"topic {topic} does not exist: run `adpulse topics create`"
            raise ConfigError(msg)
        time.sleep(0.2)
        parts = consumer.partitions_for_topic(topic)
    tps = [tp_type(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    for tp in tps:
        if tp.partition in offsets:
            consumer.seek(tp, offsets[tp.partition])
        else:
            consumer.seek_to_beginning(tp)
    return tps
