"""``adpulse promoter``: guarded promotion of the trainer's candidates, one process per deployment.

Every ``ADPULSE_PROMOTER_POLL_S`` (:meth:`Promoter.tick`):

- with no canary, the newest undecided candidate in ``MODEL_DIR/candidates/`` is
  validated (the registry's checks, ONNX against its PyTorch weights, the
  held-back window against the serving version: :func:`check_candidate`); it is
  refused, or becomes the canary: ``MODEL_DIR/promotion.json`` names it and the
  workers' registry polls serve it to ``ADPULSE_CANARY_SHARE`` of the users;
- with a canary, the labels of each version since the canary began decide
  (:func:`scoring.promotion.canary_verdict`): promote (its directory moves up into
  ``MODEL_DIR`` and the state names it serving) or roll back (the state drops it);
- with neither, a promoted version whose live calibration drifts is rolled back to
  the version it replaced (drift against that version's own calibration, measured
  as the control when the promoted one was the canary).

Every transition is a ``model-events`` record, sent and acknowledged before the
state file that makes it take effect is written (so a crash between the two sends
it again, never loses it), and counted in ``adpulse_model_events_total``.

The tallies are not saved: the consumer reads ``ctr-feedback`` from the oldest
label kept at every start and counts only labels of decisions made since the
canary (or the serving version) began, so a restart recounts the same labels.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np

from adpulse.core.errors import ConfigError, ModelRefused
from adpulse.core.metrics import Metrics
from adpulse.core.settings import Settings
from schemas.messages import UNSET, CtrFeedback, ModelEvent
from scoring.featurespec import FeatureSpec
from scoring.promotion import (
    CanaryRules,
    PromotionState,
    Tally,
    canary_verdict,
    drifted,
    held_back_verdict,
    read_state,
    reference_of,
    write_state,
)
from scoring.registry import CANDIDATES, CHECKPOINT, METRICS, MODEL, ModelRegistry, validate

log = logging.getLogger(__name__)
ONNX_TOLERANCE = 1e-4  # ONNX against PyTorch, largest absolute difference of a pCTR
KEEP_DECIDED = 1000  # candidate names remembered as judged in the state file
Event = Literal["candidate", "refused", "canary", "promoted", "rolled_back"]


def check_candidate(
    path: Path, registry: ModelRegistry, serving_version: str, max_auc_drop: float
) -> str | None:
    """Why the candidate at ``path`` must not be served (None: it may be the canary)."""
    try:
        loaded = validate(path, registry.spec, latency_budget_ms=registry.latency_budget_ms,
                          device=registry.device, options=registry.options)  # fmt: skip
    except ModelRefused as exc:
        return exc.reason
    why = _matches_pytorch(path, loaded.scorer.score, loaded.spec, loaded.metrics)
    if why is not None:
        return why
    if loaded.metrics.get("serving_version") not in (None, serving_version):
        # its held-back window compared it with another version than the one serving now
        log.info("promoter: %s was validated against %s, %s serves now", path.name,
                 loaded.metrics.get("serving_version"), serving_version)  # fmt: skip
    return held_back_verdict(loaded.metrics, max_auc_drop)


def _matches_pytorch(
    path: Path, score: Callable[[dict[str, Any]], Any], spec: FeatureSpec, metrics: dict[str, Any]
) -> str | None:
    """ONNX against the PyTorch weights beside it, on golden inputs (PyTorch when installed,
    else the difference recorded at export)."""
    try:
        import torch  # noqa: PLC0415 - the train extra
    except ImportError:
        recorded = metrics.get("onnx_max_abs_diff")
        if isinstance(recorded, int | float) and recorded <= ONNX_TOLERANCE:
            return None
        return "no PyTorch here and no onnx_max_abs_diff in metrics.json to check ONNX against"
    from scoring.model import _tensors  # noqa: PLC0415
    from scoring.online import load_weights  # noqa: PLC0415

    if not (path / CHECKPOINT).is_file():
        return f"{path / CHECKPOINT} is missing: nothing to check the ONNX file against"
    try:
        model = load_weights(path / CHECKPOINT, spec)
    except (ValueError, RuntimeError, OSError) as exc:
        return f"{path / CHECKPOINT} does not load: {str(exc)[:200]}"
    x = spec.golden_inputs(257, seed=13)
    model.eval()
    with torch.no_grad():
        want = model(*_tensors(x, spec)).numpy().ravel()
    got = np.asarray(score(x)).ravel()
    worst = float(np.max(np.abs(got - want))) if got.shape == want.shape else math.inf
    if not worst <= ONNX_TOLERANCE:
        return f"{path / MODEL} differs from its PyTorch weights by {worst:.3g} > {ONNX_TOLERANCE}"
    return None


class Promoter:
    """The promotion state machine without Kafka: :meth:`observe` labels, :meth:`tick`."""

    def __init__(
        self, settings: Settings, metrics: Metrics, emit: Callable[[ModelEvent], None]
    ) -> None:
        if not settings.model_dir:
            msg = "adpulse promoter manages the model registry: set ADPULSE_MODEL_DIR"
            raise ConfigError(msg)
        if not 0.0 < settings.canary_share < 1.0:
            msg = f"ADPULSE_CANARY_SHARE={settings.canary_share}: must be between 0 and 1"
            raise ConfigError(msg)
        if not 0.5 < settings.canary_confidence < 1.0:
            msg = f"ADPULSE_CANARY_CONFIDENCE={settings.canary_confidence}: must be in (0.5, 1)"
            raise ConfigError(msg)
        self.s, self.m, self.emit = settings, metrics, emit
        self.root = Path(settings.model_dir)
        self.rules = CanaryRules(settings.canary_min_labels, settings.canary_confidence,
                                 settings.canary_max_calibration_drift)  # fmt: skip
        self.registry = ModelRegistry.from_settings(settings)
        state = read_state(self.root)
        if state is None:
            serving = self.registry.latest_valid()
            if serving is None:
                msg = (f"no valid model version in {self.root} to promote against: publish "
                       f"one with `adpulse train --out {self.root}`")  # fmt: skip
                raise ConfigError(msg)
            state = PromotionState(serving=serving.version, last_good=serving.version,
                                   serving_since_ms=_now_ms())  # fmt: skip
            write_state(self.root, state)
        self.state = state
        self.canary = Tally()
        self.control = Tally()

    # -- labels -----------------------------------------------------------------------------
    def observe(self, labels: list[CtrFeedback]) -> None:
        """Count each label for the version that scored its decision, from when it counts."""
        st = self.state
        since = st.canary_since_ms if st.canary else st.serving_since_ms
        for fb in labels:
            if fb.converted == 1 or fb.model_version is UNSET or fb.decision_ts < since:
                continue  # a conversion is a clicked decision's second record
            pctr = fb.features.pctr if fb.features.pctr is not UNSET else fb.pctr
            if pctr is UNSET:
                continue
            if st.canary and fb.model_version == st.canary:
                self.canary = self.canary.add(fb.clicked, pctr)
            elif fb.model_version == st.serving:
                self.control = self.control.add(fb.clicked, pctr)
        self.m.canary_labels.labels("canary").set(self.canary.labels)
        self.m.canary_labels.labels("control").set(self.control.labels)

    # -- transitions --------------------------------------------------------------------------
    def tick(self) -> None:
        if self.state.canary:
            self._judge_canary()
        else:
            self._watch_serving()
            if not self.state.canary:
                self._next_candidate()

    def _judge_canary(self) -> None:
        st = self.state
        if not (self.root / CANDIDATES / st.canary).is_dir():
            if (self.root / st.canary).is_dir():  # moved up, then a crash: finish promoting
                self._promoted(f"{st.canary} found in {self.root}: promotion completed")
            else:
                self._transition("rolled_back", st.canary, st.serving,
                                 f"canary directory {self.root / CANDIDATES / st.canary} is gone",
                                 canary="", decided=_decided(st, st.canary))  # fmt: skip
            return
        verdict = canary_verdict(self.control, self.canary, self.rules)
        if verdict.action == "promote":
            (self.root / CANDIDATES / st.canary).rename(self.root / st.canary)
            self._promoted(verdict.reason)
        elif verdict.action == "rollback":
            self._transition("rolled_back", st.canary, st.serving, verdict.reason,
                             canary="", decided=_decided(st, st.canary))  # fmt: skip

    def _promoted(self, reason: str) -> None:
        st = self.state
        self._transition("promoted", st.canary, st.canary, reason, serving=st.canary,
                         canary="", last_good=st.serving, serving_since_ms=_now_ms(),
                         reference_calibration=reference_of(self.control),
                         decided=_decided(st, st.canary))  # fmt: skip

    def _watch_serving(self) -> None:
        """A promoted version whose live calibration drifts goes back to the one it replaced:
        drifts against that one's, as measured when it was replaced (scoring/promotion.py)."""
        st = self.state
        if not st.last_good or st.last_good == st.serving:
            return
        why = drifted(self.control, self.rules, st.reference_calibration)
        if why is not None and (self.root / st.last_good).is_dir():
            self._transition("rolled_back", st.serving, st.last_good, why, serving=st.last_good,
                             serving_since_ms=_now_ms(), reference_calibration=1.0)  # fmt: skip

    def _next_candidate(self) -> None:
        st = self.state
        folder = self.root / CANDIDATES
        found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(
            ".") and (p / METRICS).is_file()) if folder.is_dir() else []  # fmt: skip
        fresh = [v for v in found if v not in st.decided]
        if not fresh:
            return
        version = fresh[-1]  # the newest; older undecided ones are superseded by it
        decided = _decided(st, *fresh)
        self._send("candidate", version, st.serving, f"found in {folder}", {})
        why = check_candidate(folder / version, self.registry, st.serving,
                              self.s.canary_max_auc_drop)  # fmt: skip
        if why is not None:
            self._transition("refused", version, st.serving, why, decided=decided)
            return
        metrics = json.loads((folder / version / METRICS).read_text(encoding="utf-8"))
        on = (metrics.get("validation") or {}).get("online") or {}
        self._transition("canary", version, st.serving,
                         f"passed validation (held-back AUC {on.get('auc')} on {on.get('labels')} "
                         f"labels); served to {self.s.canary_share:g} of users",
                         canary=version, canary_since_ms=_now_ms(), decided=decided)  # fmt: skip

    def _transition(
        self, event: Event, version: str, after: str, reason: str, **changes: Any
    ) -> None:
        """Send the event (acknowledged), then write the state that makes it take effect;
        ``after`` is the version serving the control once it has."""
        counts: dict[str, Any] = {}
        if event in ("promoted", "rolled_back"):
            # a canary against the control; else a serving version's own labels (drift)
            arms = [("canary", self.canary), ("control", self.control)] if self.state.canary \
                else [("canary", self.control)]  # fmt: skip
            for arm, t in arms:
                counts[f"{arm}_labels"], counts[f"{arm}_clicks"] = t.labels, t.clicks
                if math.isfinite(t.calibration):
                    counts[f"{arm}_calibration"] = round(t.calibration, 6)
        self._send(event, version, after, reason, counts)
        self.state = self.state.with_(**changes)
        write_state(self.root, self.state)
        if event in ("canary", "promoted", "rolled_back"):
            self.canary, self.control = Tally(), Tally()
        level = logging.WARNING if event in ("refused", "rolled_back") else logging.INFO
        log.log(level, "promoter: %s %s (serving %s): %s", version, event, after, reason)

    def _send(
        self, event: Event, version: str, serving: str, reason: str, counts: dict[str, Any]
    ) -> None:
        self.emit(ModelEvent(event=event, version=version, serving=serving,
                             reason=reason[:1024] or event, ts=_now_ms(), **counts))  # fmt: skip
        self.m.model_events.labels(event).inc()


def _decided(st: PromotionState, *versions: str) -> list[str]:
    return [*st.decided, *versions][-KEEP_DECIDED:]


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- the Kafka loop ---------------------------------------------------------------------------
def run(settings: Settings, stop: threading.Event | None = None) -> int:
    """Consume ctr-feedback and judge every ``ADPULSE_PROMOTER_POLL_S`` until SIGTERM/SIGINT."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: PLC0415 - slow
    from prometheus_client import start_http_server  # noqa: PLC0415

    from adpulse.core.kafkaconf import client_kwargs  # noqa: PLC0415
    from adpulse.trainer import _assign  # noqa: PLC0415

    metrics = Metrics.create()
    producer = KafkaProducer(**client_kwargs(settings), acks="all", linger_ms=0)
    events = settings.topic("model-events")

    def emit(ev: ModelEvent) -> None:
        producer.send(events, key=ev.version.encode(), value=msgspec.json.encode(ev))
        producer.flush()

    promoter = Promoter(settings, metrics, emit)
    start_http_server(settings.promoter_port, registry=metrics.registry)
    stop = stop or threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    topic = settings.topic("ctr-feedback")
    consumer = KafkaConsumer(**client_kwargs(settings), enable_auto_commit=False,
                             auto_offset_reset="earliest", fetch_max_wait_ms=200,
                             client_id="adpulse-promoter")  # fmt: skip
    decode = msgspec.json.Decoder(CtrFeedback)
    try:
        parts = _assign(consumer, topic, {}, TopicPartition)
        log.info("promoter: serving %s, canary %s; judging every %gs", promoter.state.serving,
                 promoter.state.canary or "none", settings.promoter_poll_s)  # fmt: skip
        last_tick = 0.0
        # The tallies are recounted from the oldest label at every start: judging before
        # the recount reaches where ctr-feedback ended at start would judge (and, finishing
        # a promotion a crash cut short, freeze as its drift reference) a partial count.
        behind = consumer.end_offsets(parts)
        while not stop.is_set():
            polled = consumer.poll(timeout_ms=500, max_records=5000)
            labels = []
            for recs in polled.values():
                for r in recs:
                    with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                        labels.append(decode.decode(r.value))  # the trainer dead-letters bad ones
            promoter.observe(labels)
            behind = {tp: end for tp, end in behind.items() if consumer.position(tp) < end}
            if not behind and time.monotonic() - last_tick >= settings.promoter_poll_s:
                promoter.tick()
                last_tick = time.monotonic()
    finally:
        consumer.close()
        producer.close()
    return 0
