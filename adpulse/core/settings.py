"""One frozen settings object for every adpulse process.

Every field reads an ``ADPULSE_<FIELD>`` environment variable and documents its
default beside it, so an operator can configure a worker, the CLI or a test from
the environment alone. Factories take a :class:`Settings`; nothing else reads
``os.environ``.

>>> s = Settings.from_env({"ADPULSE_PARTITIONS": "8"})
>>> s.partitions
8
>>> s.with_(partitions=2).partitions
2
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from adpulse.core.errors import ConfigError

ENV_PREFIX = "ADPULSE_"
KINDS = ("browse", "click", "cart", "fav", "purchase")
Device = Literal["auto", "cuda", "cpu"]
TextPrecision = Literal["auto", "fp32"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
EmbeddedKind = Literal["kafka", "tansu"]
KafkaJit = Literal["quick", "full"]
LinUCBOffset = Literal["model", "none"]
_LITERALS: dict[str, Any] = {
    "EmbeddedKind": EmbeddedKind,
    "KafkaJit": KafkaJit,
    "LinUCBOffset": LinUCBOffset,
    "Device": Device,
    "TextPrecision": TextPrecision,
    "SecurityProtocol": SecurityProtocol,
    "SaslMechanism": SaslMechanism,
}


def _setting(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


def _secret(doc: str) -> Any:
    """A secret: never in ``repr(settings)``, so it cannot reach a log line."""
    return field(default="", repr=False, metadata={"doc": doc})


def _parse_weights(text: str) -> tuple[float, ...]:
    """``"browse=1,click=2,..."`` -> weights in :data:`KINDS` order."""
    given: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in KINDS:
            msg = f"kind weight {part!r}: expected KIND=NUMBER with KIND one of {', '.join(KINDS)}"
            raise ConfigError(msg)
        given[name.strip()] = float(value)
    missing = [k for k in KINDS if k not in given]
    if missing:
        msg = f"kind weights miss {', '.join(missing)}: give all of {', '.join(KINDS)}"
        raise ConfigError(msg)
    return tuple(given[k] for k in KINDS)


@dataclass(frozen=True)
class Settings:
    """Configuration of a worker, the CLI and the tools; see docs/configuration.md."""

    # -- Kafka --------------------------------------------------------------------------
    bootstrap: str = _setting(
        "",
        "Kafka bootstrap servers (host:port,...). Empty: commands that can start the "
        "embedded broker do so; others use 127.0.0.1:9092.",
    )
    broker_port: int = _setting(9092, "Port of the embedded broker (`adpulse broker`).")
    embedded: EmbeddedKind = _setting(
        "kafka",
        "Which embedded broker the demo, tests and benches start: kafka (Apache Kafka in "
        "KRaft mode from its Maven Central jars; needs Java 17+) or tansu (fallback without "
        "Java; its fetches slow down with everything stored, see docs/reference.md, The "
        "embedded broker).",
    )
    kafka_libs: str = _setting(
        "",
        "Folder of the embedded Apache Kafka's jars; empty: ~/.cache/adpulse/kafka-VERSION, "
        "filled once by `make kafka` (mvn dependency:copy-dependencies).",
    )
    kafka_heap_mb: int = _setting(512, "Java heap of the embedded Apache Kafka broker (MiB).")
    kafka_jit: KafkaJit = _setting(
        "quick",
        "JIT of the embedded Apache Kafka broker: quick (the JVM's first-tier compiler "
        "only: its optimising compiler took ~40% of a core in a fresh broker's first "
        "minute, beside the worker on 2 cores) or full (the JVM's default; a little less "
        "CPU per request once warm, for a broker that runs for hours).",
    )
    embedded_broker: bool = _setting(
        False,
        "The broker is an embedded development broker (development pseudonym key allowed; "
        "with EMBEDDED=tansu also its workarounds). Set automatically by the demo/tests, and "
        "on the port of a running `adpulse broker`.",
    )
    partitions: int = _setting(
        4, "Partitions of every co-partitioned topic (user-events, ad-requests, ...)."
    )
    replication: int = _setting(1, "Replication factor for created topics.")
    topic_prefix: str = _setting("", "Prefix for every topic name (several apps, one cluster).")
    security_protocol: SecurityProtocol = _setting(
        "PLAINTEXT",
        "Kafka transport of every client (worker and CLI): PLAINTEXT, SSL, SASL_PLAINTEXT "
        "or SASL_SSL.",
    )
    sasl_mechanism: SaslMechanism = _setting(
        "PLAIN", "SASL mechanism with SASL_*: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512."
    )
    sasl_username: str = _setting("", "SASL user name (required with SASL_*).")
    sasl_password_file: str = _setting(
        "", "File holding the SASL password (preferred: a mounted Secret)."
    )
    sasl_password: str = _secret(
        "SASL password, when no PASSWORD_FILE is given (env only; never logged)."
    )
    ssl_cafile: str = _setting(
        "", "CA bundle (PEM) to verify the brokers with SSL/SASL_SSL; empty: system CAs."
    )
    ssl_certfile: str = _setting("", "Client certificate (PEM) for mutual TLS; needs KEYFILE.")
    ssl_keyfile: str = _setting("", "Client private key (PEM) for mutual TLS; needs CERTFILE.")
    # -- Privacy and abuse ---------------------------------------------------------------
    pseudonymise: bool = _setting(
        True,
        "Replace user ids by HMAC-SHA256(key, id) (32 hex chars) as soon as a user-events or "
        "ad-requests record is decoded: state, decisions, feedback, logs see only that.",
    )
    pseudonym_key_file: str = _setting(
        "",
        "File holding the pseudonym key (preferred: a mounted Secret). Every worker must use "
        "the same key.",
    )
    api_token_file: str = _setting(
        "",
        "File holding the bearer token (16+ bytes) that POST /decide and the user lookups "
        "require (Authorization: Bearer TOKEN); the same on every worker. Empty: those "
        "endpoints answer 401, saying how to set one.",
    )
    pseudonym_key: str = _secret(
        "The pseudonym key itself, when no KEY_FILE is given (env only; never logged). With "
        "neither, only the embedded broker runs (on a published development key).",
    )
    max_events_per_user_s: int = _setting(
        100,
        "user-events beyond this many per user in one second of broker time (LogAppendTime, "
        "else arrival) are dead-lettered (rate_limited); 0: no limit.",
    )
    min_click_delay_ms: int = _setting(
        150,
        "A click reaching the broker sooner than this after its decision is suspect "
        "(too_fast): counted, never labelled clicked.",
    )
    max_clicks_per_user_min: int = _setting(
        20,
        "A user's clicks beyond this many within 60 s of broker time are suspect (burst): "
        "counted, never labelled clicked; 0: no limit.",
    )
    # -- Worker -------------------------------------------------------------------------
    app_id: str = _setting("adpulse", "Faust app id: consumer group and changelog names.")
    data_dir: Path = _setting(Path("var/data"), "Where RocksDB tables live.")
    web_host: str = _setting("127.0.0.1", "Bind address of the worker's HTTP server.")
    web_port: int = _setting(6066, "Port of the worker's HTTP server (interest lookups, health).")
    decide_port: int = _setting(
        0,
        "Port of a second, leaner HTTP server on WEB_HOST that serves POST /decide only "
        "(streams/decideport.py; the web port keeps serving it too); 0: none.",
    )
    canonical_url: str = _setting(
        "",
        "URL other workers use to reach this one (forwarded interest lookups); empty: "
        "http://WEB_HOST:WEB_PORT. Set it when WEB_HOST is 0.0.0.0 (containers, k8s).",
    )
    session_timeout_s: float = _setting(
        10.0, "Consumer-group session timeout; short so a dead worker's partitions move soon."
    )
    producer_linger_ms: float = _setting(
        1.0,
        "linger.ms of the worker's producer (changelogs, decisions, ctr-feedback, dead "
        "letters): how long a record waits for others to share its request.",
    )
    producer_batch_bytes: int = _setting(
        262_144,
        "batch.size of the worker's producer: most bytes per partition in one request "
        "(a changelog burst of a large ingest batch goes out in few requests).",
    )
    stall_s: float = _setting(
        30.0,
        "A source partition with records past its position and no progress this long is "
        "stalled: /health 503, adpulse_consumer_stalled_partitions, resume + re-seek; 0: off.",
    )
    bulk_restore: bool = _setting(
        True,
        "Restore tables by reading their changelog backlog straight into RocksDB before "
        "Faust's per-record recovery replays the rest (streams/runtime/restore.py); "
        "false: Faust's alone.",
    )
    # -- Ingest -------------------------------------------------------------------------
    max_event_bytes: int = _setting(
        8192, "user-events payloads larger than this are dead-lettered (too_large)."
    )
    max_future_skew_ms: int = _setting(
        300_000, "Events stamped further than this into the future are dead-lettered."
    )
    max_event_age_days: int = _setting(
        7305,
        "Events stamped more than this many days before now are dead-lettered (too_old): "
        "20 years refuses a zero, 1970 or seconds-for-milliseconds ts and admits replays of "
        "historical logs (the 2017 Taobao sample); 0: no lower bound.",
    )
    batch_max_events: int = _setting(
        20_000, "Most events one ingest batch takes (larger: fewer table writes per event)."
    )
    batch_max_wait_s: float = _setting(
        0.0,
        "Longest a batch waits for more fetches before it is processed; 0 hands over each "
        "fetch at once (under load fetches are full anyway).",
    )
    batch_slice_ms: float = _setting(
        5.0,
        "A fetched batch is handled in slices of about this long, yielding between them, so "
        "a /decide request waits for one slice, not a whole batch; 0: whole batches. Only "
        "while POST /decide was asked in the last minute; otherwise slices of 50 ms. While "
        "decisions give way to ingest, this divided by their share of the loop, at most 50 ms.",
    )
    fetch_max_wait_ms: int = _setting(
        10,
        "Longest the broker holds the worker's consumer fetch when no data arrives. Kafka "
        "answers at the first data, but no new fetch goes out while one is in flight, so a "
        "partition just drained waits for it: at 500 the Kafka path's p50 was 0.4-0.7 s in "
        "3 of 4 runs. "
        "On the embedded tansu at most 10 (at 2 ms it stopped answering under load).",
    )
    dedupe_ids: int = _setting(8, "Recent event ids remembered per user to drop duplicates.")
    dedupe_ttl_h: int = _setting(
        24, "A user's remembered event ids are forgotten after this many hours with no arrival."
    )
    # -- Interest features --------------------------------------------------------------
    dim: int = _setting(64, "Dimension of the interest space (embeddings and vectors).")
    half_life_h: float = _setting(24.0, "Half-life of an event's weight in the interest vector.")
    kind_weights: tuple[float, ...] = _setting(
        (1.0, 2.0, 4.0, 3.0, 6.0),
        "Weight per kind (browse, click, cart, fav, purchase), as 'browse=1,click=2,cart=4,...'.",
    )
    category_mix: float = _setting(
        0.5, "Share of the category embedding in an event's embedding (rest: the item's)."
    )
    embedding_seed: int = _setting(20171125, "Seed of the hashed embedding table.")
    embedding_cache_rows: int = _setting(
        65_536,
        "Vectors each embedding cache keeps (behaviours' item vectors in decisions; item and "
        "category vectors in ingest): 256 bytes each at dim 64, ~22 MiB a cache with its index.",
    )
    top_categories: int = _setting(4, "Top categories kept per user.")
    category_limit: int = _setting(
        128,
        "Categories whose decayed weights a user's state keeps (12 bytes each); top categories "
        "are exact while a user has at most this many (one decayed below 2^-20 of an event's "
        "weight is dropped).",
    )
    item_limit: int = _setting(
        64,
        "Items whose decayed weights a user's state keeps (20 bytes each) when ADPULSE_TEXT_MODEL "
        "is set, so each item counts by its item-catalog title's vector; a lighter item beyond "
        "this counts by its category vector.",
    )
    sequence_length: int = _setting(
        50,
        "Behaviours (item, category, kind, time) kept per user, newest by event time, for "
        "the sequence model's attention (33 bytes each); 0: no sequence table.",
    )
    # -- Decisions ----------------------------------------------------------------------
    policy: str = _setting(
        "epsilon-greedy:0.05",
        "Serving policy: random, greedy, epsilon-greedy:EPS (exploration share), thompson[:M] "
        "(Beta prior worth M impressions) or linucb[:ALPHA] (confidence width).",
    )
    placement_policies: str = _setting(
        "", "Per-placement policies over the default, as 'home=greedy;feed=epsilon-greedy:0.1'."
    )
    freq_cap_per_day: int = _setting(3, "Impressions of one ad per user per UTC day, at most.")
    # -- Strategy -----------------------------------------------------------------------
    thompson_prior_strength: float = _setting(
        20.0, "Impressions the model's pCTR is worth as Thompson's prior (thompson:M overrides)."
    )
    thompson_draws: int = _setting(
        1000, "Monte Carlo draws per Thompson propensity (standard error <= 0.5/sqrt(draws))."
    )
    thompson_min_segment_shows: float = _setting(
        50.0, "Labels an (ad, segment) needs before Thompson uses them instead of the ad's."
    )
    linucb_alpha: float = _setting(
        0.05,
        "LinUCB confidence width in CTR units (linucb:ALPHA overrides): an ad's bonus is "
        "ALPHA for a context it was never shown in and shrinks as 1/sqrt(labels) there.",
    )
    linucb_ridge: float = _setting(1.0, "LinUCB ridge: A starts at RIDGE * identity.")
    linucb_offset: LinUCBOffset = _setting(
        "model",
        "What LinUCB's linear part is added to: model (the served pCTR; theta learns the "
        "residual click - pCTR, so an unlabelled ad ranks as greedy ranks it, plus its bonus) "
        "or none (Li et al.'s original: theta alone). Changing it needs fresh bandit state.",
    )
    bandit_half_life_h: float = _setting(
        0.0,
        "Half-life in hours of a label in Thompson's counts and LinUCB's statistics, by event "
        "time (decision_ts), so the bandits follow drift. 0: labels never fade.",
    )
    thompson_half_life_h: float = _setting(
        -1.0,
        "Thompson's own half-life in hours (its counts), overriding ADPULSE_BANDIT_HALF_LIFE_H; "
        "-1: that setting's value. 0: no forgetting.",
    )
    linucb_half_life_h: float = _setting(
        -1.0,
        "LinUCB's own half-life in hours (its statistics), overriding "
        "ADPULSE_BANDIT_HALF_LIFE_H; -1: that setting's value. 0: no forgetting.",
    )
    learn_dedupe_ids: int = _setting(
        1024, "Recent decision ids remembered per ad: a label re-emitted among them counts once."
    )
    experiment: str = _setting(
        "",
        "A/B experiment over every placement, as 'NAME:KEY:ARM=POLICY@SHARE,...' (first arm "
        "is the control); users are assigned by HMAC(KEY, user id). Empty: none.",
    )
    # -- Pacing and calibration ---------------------------------------------------------
    pacing: bool = _setting(
        True,
        "Budget pacing (on/off). On: each campaign takes part in a request with a "
        "probability a throttle controller sets so its daily budget is spent along the "
        "day's traffic curve. Off: a campaign serves until its budget share is spent.",
    )
    pacing_interval_s: float = _setting(
        60.0, "Pacing control window: how often a campaign's participation is re-set."
    )
    pacing_profile: str = _setting(
        "",
        "Expected traffic per UTC hour as 24 comma-separated weights (the spend plan "
        "follows it); empty: uniform over the day.",
    )
    calibration: bool = _setting(
        True,
        "Online calibration of served pCTR (on/off) from the learner's click counts per "
        "pCTR bucket; the raw model output stays in the decision as pctr_raw.",
    )
    calibration_min_labels: int = _setting(
        200, "Labels a pCTR bucket needs before calibration uses its observed click rate."
    )
    calibration_refresh_s: float = _setting(
        5.0, "How often the decision stage re-reads the calibration counts."
    )
    # -- Feedback -----------------------------------------------------------------------
    attribution_window_s: float = _setting(
        1800.0, "A click counts for a decision when it comes this long after it, at most."
    )
    conversion_window_s: float = _setting(
        86400.0, "A purchase of the ad's item or category this long after the click converts it."
    )
    watermark_idle_s: float = _setting(
        30.0,
        "A join input read to its end and quiet this long lets the wall clock stand in for its "
        "event time, trailing it by this much: clicks arriving later than this after their "
        "window are late (counted, not labelled). Never applies to a backlog.",
    )
    feedback_grace_s: float = _setting(
        3600.0,
        "A labelled decision's record is kept this long after its windows (late clicks are "
        "recognised, redeliveries change nothing), then deleted.",
    )
    # -- Scoring ------------------------------------------------------------------------
    device: Device = _setting("auto", "ONNX Runtime device: auto (CUDA if present), cuda, cpu.")
    model_dir: str = _setting(
        "", "Model registry directory (DIR/VERSION/model.onnx); empty: the shipped default."
    )
    text_model: str = _setting(
        "",
        "Directory of the ad text encoder (`adpulse models text` prints it); when set, an ad "
        "with text and no embedding, and every item-catalog title, is embedded by the worker. "
        "Empty: text is not embedded.",
    )
    text_precision: TextPrecision = _setting(
        "auto",
        "Graph of the ad text encoder: auto (fp16 on CUDA, int8 on CPU: twice fp32's texts/s, "
        "cosine to fp32 >= 0.97) or fp32 (the reference, everywhere).",
    )
    model_poll_s: float = _setting(10.0, "How often the worker looks for a newer model version.")
    model_latency_budget_ms: float = _setting(
        5.0, "A model whose 100-row batch takes longer than this at validation is refused."
    )
    model_max_slowdown: float = _setting(
        3.0, "A new model this many times slower than the serving one is refused."
    )
    scorer_threads: int = _setting(
        1,
        "ONNX Runtime intra-op threads (0: one per core). 1 on a 2-core box shared with the "
        "broker: fastest at batch 32-256, where decisions run.",
    )
    scorer_max_batch_rows: int = _setting(
        4096, "Most candidate rows one micro-batch sends to the model."
    )
    scorer_thread: bool = _setting(
        False,
        "Run a decision batch's model runs on a thread of their own (ONNX Runtime releases "
        "the GIL) while the event loop serves HTTP and ingest. Off by default: on the 2-core "
        "box it answered fewer requests at a higher p99 (docs/decide.md).",
    )
    scorer_max_wait_ms: float = _setting(
        0.0,
        "POST /decide: longest a request waits for concurrent ones to share its scoring run "
        "(0: it shares with those that arrived in the same event-loop turn, no added wait).",
    )
    decide_tmax_ms: int = _setting(
        100,
        "POST /decide: budget of a request without tmax_ms, from its arrival; a request "
        "that used it up before scoring gets a no fill with no_fill_reason deadline.",
    )
    topic_tmax_ms: int = _setting(
        0,
        "ad-requests topic: budget of a request without tmax_ms, from its record timestamp "
        "(0: none, so a backlog after downtime is still answered).",
    )
    decide_max_queue_ms: float = _setting(
        20.0,
        "POST /decide sheds a request (503 with Retry-After) while requests wait longer "
        "than this: the event loop running that late, or the oldest queued request that old.",
    )
    decide_max_ingest_lag_ms: float = _setting(
        200.0,
        "Decisions give way to ingest: while the events being written are older than "
        "this, the share of the event loop decisions may hold falls, down to a tenth, and "
        "requests over it are shed: POST /decide with a 503 (outcome shed_ingest), an "
        "ad-requests record with a no fill, no_fill_reason shed; 0: never.",
    )
    fallback_ctr: float = _setting(
        0.02, "pCTR of every candidate when no model can score (unless the model's metrics say)."
    )
    fallback_cvr: float = _setting(
        0.05,
        "pCVR of a cpa ad when the model has no CVR head or cannot score (unless its metrics say).",
    )
    # -- Online trainer (adpulse trainer, docs/training.md) ------------------------------
    train_interval_s: float = _setting(
        300.0,
        "adpulse trainer exports a candidate version (MODEL_DIR/candidates/VERSION, not "
        "served) this often, when it learned new labels since the last one.",
    )
    trainer_dir: str = _setting(
        "",
        "Where adpulse trainer keeps its checkpoint (weights, optimiser, replay ring, consumed "
        "offsets, in one file); empty: DATA_DIR/trainer.",
    )
    trainer_checkpoint_s: float = _setting(
        30.0,
        "How often adpulse trainer writes its checkpoint with the offsets it consumed; after a "
        "crash it re-learns at most this much, from the checkpoint, so each label once.",
    )
    trainer_port: int = _setting(6067, "Port of adpulse trainer's Prometheus /metrics.")
    trainer_lr: float = _setting(
        5e-4, "Adam learning rate of adpulse trainer: one step per ADPULSE_TRAINER_STEP_ROWS rows."
    )
    trainer_batch: int = _setting(512, "Most new labels adpulse trainer takes in from one poll.")
    trainer_step_rows: int = _setting(
        128,
        "New rows in each of adpulse trainer's optimiser steps: rows wait (in the checkpoint) "
        "until this many are pending, so every row weighs the same however polls group them.",
    )
    trainer_replay: int = _setting(
        20000,
        "Labelled rows in adpulse trainer's replay ring (about 0.6 KB each at DIM 64, 1.4 KB "
        "with a sequence of 50); each step adds as many of them, drawn at random, to the new "
        "labels.",
    )
    trainer_dedupe_ids: int = _setting(
        200000,
        "Decision ids adpulse trainer remembers: a label whose id it learned among the last "
        "this many is dead-lettered (duplicate), never learned twice.",
    )
    trainer_windows: str = _setting(
        "1000,10000",
        "Sliding windows (labels) of the trainer's progressive validation; the smallest is "
        "the held-back window whose metrics a candidate carries.",
    )
    trainer_threads: int = _setting(1, "PyTorch threads of adpulse trainer (0: PyTorch's choice).")
    # -- Guarded promotion (adpulse promoter, docs/training.md) ---------------------------
    canary_share: float = _setting(
        0.05, "Share of users whose decisions the canary model scores while there is one."
    )
    canary_key: str = _setting(
        "canary",
        "HMAC key of the canary arm's user assignment (the experiment arms' keyed hash).",
    )
    canary_min_labels: int = _setting(
        2000, "Canary labels adpulse promoter waits for before it promotes or rolls back on CTR."
    )
    canary_confidence: float = _setting(
        0.95,
        "Confidence of the promoter's tests: a canary CTR below the control's, or a calibration "
        "drift, counts only when significant at this one-sided level.",
    )
    canary_max_auc_drop: float = _setting(
        0.01,
        "A candidate whose held-back AUC is more than this below the serving version's on "
        "the same labels is refused, never served.",
    )
    canary_max_calibration_drift: float = _setting(
        0.3,
        "Live observed/expected clicks further than this from 1 (and significant) rolls the "
        "canary, or a promoted version, back at once.",
    )
    promoter_poll_s: float = _setting(
        5.0, "How often adpulse promoter looks for candidates and judges the canary."
    )
    promoter_port: int = _setting(6068, "Port of adpulse promoter's Prometheus /metrics.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``ADPULSE_*`` variables, then explicit overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _convert(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def topic(self, name: str) -> str:
        """Full topic name for one of the contract's topics."""
        return self.topic_prefix + name

    @property
    def bootstrap_or_default(self) -> str:
        return self.bootstrap or f"127.0.0.1:{self.broker_port}"

    def kind_weight(self, kind: str) -> float:
        return self.kind_weights[KINDS.index(kind)]


def _convert(f: dataclasses.Field[Any], raw: str) -> Any:
    name = ENV_PREFIX + f.name.upper()
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "bool":
            if raw.lower() in {"1", "true", "yes", "on"}:
                return True
            if raw.lower() in {"0", "false", "no", "off"}:
                return False
            msg = "expected true/false"
            raise ValueError(msg)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw)
        if kind == "tuple[float, ...]":
            return _parse_weights(raw)
        if kind in _LITERALS:
            allowed = get_args(_LITERALS[kind])
            if raw not in allowed:
                msg = f"expected one of {', '.join(allowed)}"
                raise ValueError(msg)
            return raw
        return raw
    except ConfigError as exc:
        msg = f"{name}: {exc}"
        raise ConfigError(msg) from None
    except ValueError as exc:
        msg = f"{name}={raw!r}: {exc}"
        raise ConfigError(msg) from None


def documented() -> list[tuple[str, str, str]]:
    """(variable, default, doc) for every setting: the table of docs/configuration.md."""
    rows = []
    for f in fields(Settings):
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(f"{k}={w:g}" for k, w in zip(KINDS, default, strict=True))
        rows.append((ENV_PREFIX + f.name.upper(), str(default), f.metadata["doc"]))
    return rows
