"""Every Prometheus metric adpulse exports, as one struct built from a registry.

A fresh ``CollectorRegistry`` per worker (and per test) keeps processes and
tests from colliding. Names follow Prometheus conventions: ``adpulse_`` prefix,
``_total`` counters, base units (seconds), and labels from small fixed sets,
never a user id. Buckets are explicit because the defaults are too coarse
around the 10-50 ms targets we care about.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from importlib import metadata

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

# Fine around 1-100 ms, where the freshness and decision targets are, and no coarser
# than 100 ms up to a second, where a loaded worker's figures are: with 250 and 500 ms
# adjacent, every p99 between them read as ~480-495 ms (linear within the bucket).
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 20000, 50000)


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    events: Counter
    dead_letters: Counter
    batch_seconds: Histogram
    batch_events: Histogram
    freshness: Histogram
    table_writes: Counter
    newest_event_ts: Gauge
    decisions: Counter
    decision_latency: Histogram
    no_fill: Counter
    fallbacks: Counter
    scorer_rows: Counter
    scorer_batch_rows: Histogram
    model: Info
    model_swaps: Counter
    catalog_ads: Gauge
    catalog_invalid: Counter
    ad_text_embeddings: Counter
    consumer_lag: Gauge
    unread_changelogs: Gauge
    feedback_labels: Counter
    arm_decisions: Counter
    table_keys: Gauge
    build: Info
    join_labels: Counter
    late_clicks: Counter
    pending_expired: Counter
    suspect_clicks: Counter
    forget_requests: Counter
    pacing_spend: Gauge
    pacing_target: Gauge
    pacing_budget: Gauge
    pacing_participation: Gauge
    pacing_throttled: Counter
    calibration_labels: Gauge
    broker_connected: Gauge
    consumer_stalled: Gauge
    consumer_stalls: Counter
    decide_requests: Counter
    decide_loop_cap: Gauge
    decide_seconds: Histogram
    decide_forward_seconds: Histogram
    decision_log_failures: Counter
    loop_lag: Histogram
    trainer_labels: Counter
    trainer_auc: Gauge
    trainer_logloss: Gauge
    trainer_calibration: Gauge
    trainer_candidates: Counter
    trainer_checkpoint_ts: Gauge
    model_events: Counter
    canary_labels: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> Metrics:
        r = registry if registry is not None else CollectorRegistry()
        m = cls(
            registry=r,
            events=Counter(
                "adpulse_events_total",
                "user-events consumed, by kind and outcome (applied, duplicate, redelivered).",
                ["kind", "outcome"],
                registry=r,
            ),
            dead_letters=Counter(
                "adpulse_dead_letters_total",
                "Messages sent to dead-letters, by source topic and reason.",
                ["topic", "reason"],
                registry=r,
            ),
            batch_seconds=Histogram(
                "adpulse_ingest_batch_seconds",
                "Time to apply one batch of user-events to the interest table.",
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            batch_events=Histogram(
                "adpulse_ingest_batch_events",
                "Messages per ingest batch.",
                buckets=BATCH_BUCKETS,
                registry=r,
            ),
            freshness=Histogram(
                "adpulse_freshness_seconds",
                "Per batch: age of its oldest event (produce time) when its state is written.",
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            table_writes=Counter(
                "adpulse_table_writes_total",
                "Keys written to a table (one per user per batch).",
                ["table"],
                registry=r,
            ),
            newest_event_ts=Gauge(
                "adpulse_newest_event_timestamp_seconds",
                "Event time of the newest event applied to the interest table.",
                registry=r,
            ),
            decisions=Counter(
                "adpulse_decisions_total",
                "Ad decisions emitted, by policy and placement.",
                ["policy", "placement"],
                registry=r,
            ),
            decision_latency=Histogram(
                "adpulse_decision_latency_seconds",
                "Request produced (record timestamp) to decision sent.",
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            no_fill=Counter(
                "adpulse_no_fill_total",
                "Decisions without an ad, by no_fill_reason (no_candidates, deadline, shed).",
                ["reason"],
                registry=r,
            ),
            fallbacks=Counter(
                "adpulse_scorer_fallbacks_total",
                "Requests scored by the fallback rule (no model, or non-finite output).",
                registry=r,
            ),
            scorer_rows=Counter(
                "adpulse_scorer_rows_total", "Candidate rows scored by the model.", registry=r
            ),
            scorer_batch_rows=Histogram(
                "adpulse_scorer_batch_rows",
                "Candidate rows per scoring run (one per decision batch).",
                buckets=(1, 10, 100, 250, 500, 1000, 2500, 5000, 10000, 50000),
                registry=r,
            ),
            model=Info("adpulse_model", "Model version and execution provider in use.", registry=r),
            model_swaps=Counter(
                "adpulse_model_swaps_total",
                "Model versions considered for hot-swap, by outcome (swapped, refused).",
                ["outcome"],
                registry=r,
            ),
            catalog_ads=Gauge(
                "adpulse_catalog_ads", "Active ads in the worker's catalog.", registry=r
            ),
            catalog_invalid=Counter(
                "adpulse_catalog_invalid_total",
                "Catalog records skipped because they break the ad-catalog contract.",
                registry=r,
            ),
            ad_text_embeddings=Counter(
                "adpulse_ad_text_embeddings_total",
                "Ad texts and item titles embedded (streams/adtext.py), by source: model (encoded) "
                "or cache.",
                ["source"],
                registry=r,
            ),
            feedback_labels=Counter(
                "adpulse_feedback_labels_total",
                "ctr-feedback labels seen by the learner, by outcome (applied, redelivered, "
                "duplicate).",
                ["outcome"],
                registry=r,
            ),
            arm_decisions=Counter(
                "adpulse_experiment_decisions_total",
                "Decisions made under an A/B experiment, by experiment and arm.",
                ["experiment", "arm"],
                registry=r,
            ),
            consumer_lag=Gauge(
                "adpulse_consumer_lag_messages",
                "Messages behind the partition's high watermark, per assigned topic-partition "
                "(sampled every few seconds). The watermark is the last one a fetch reported, so "
                "on the embedded broker it can be short by up to one fetched batch.",
                ["topic", "partition"],
                registry=r,
            ),
            unread_changelogs=Gauge(
                "adpulse_consumer_unread_changelog_partitions",
                "Changelog partitions whose fetched records wait unread in the consumer client "
                "(read at each scrape). Any such partition stops every fetch from its broker for "
                "0.1 s at a time; recovery pauses them, so it stays 0 (a standby's may show for "
                "an instant).",
                registry=r,
            ),
            table_keys=Gauge(
                "adpulse_table_keys",
                "Approximate keys per table in this worker's RocksDB (active and standby "
                "partitions; RocksDB's estimate-num-keys, sampled every few seconds).",
                ["table"],
                registry=r,
            ),
            build=Info("adpulse_build", "adpulse version running in this worker.", registry=r),
            join_labels=Counter(
                "adpulse_join_labels_total",
                "ctr-feedback records emitted by the click join, by the policy that chose the "
                "ad and outcome (clicked, zero, converted): CTR by policy over any window is "
                "rate(clicked) / rate(clicked + zero).",
                ["policy", "outcome"],
                registry=r,
            ),
            late_clicks=Counter(
                "adpulse_late_clicks_total",
                "Clicks on a served ad after its label (or its window): counted, never emitted.",
                registry=r,
            ),
            pending_expired=Counter(
                "adpulse_pending_expired_total",
                "Join records deleted after their windows and grace period.",
                registry=r,
            ),
            suspect_clicks=Counter(
                "adpulse_suspect_clicks_total",
                "Clicks never labelled, by rule: no_impression (no decision came), too_fast "
                "(sooner than ADPULSE_MIN_CLICK_DELAY_MS), burst (over the per-user minute cap).",
                ["rule"],
                registry=r,
            ),
            forget_requests=Counter(
                "adpulse_forget_requests_total",
                "forget-requests applied (the user's state deleted, tombstones acknowledged).",
                registry=r,
            ),
            pacing_spend=Gauge(
                "adpulse_pacing_spend",
                "Budget spent today (UTC) by a campaign on this worker's partitions "
                "(cpm: served pCTR x bid per decision; cpc: bid per clicked decision; cpa: bid "
                "per converted decision); sum over workers.",
                ["campaign"],
                registry=r,
            ),
            pacing_target=Gauge(
                "adpulse_pacing_target",
                "Planned spend by now for a campaign on this worker's partitions: budget "
                "share x traffic share of the UTC day elapsed.",
                ["campaign"],
                registry=r,
            ),
            pacing_budget=Gauge(
                "adpulse_pacing_budget",
                "Daily budget of a campaign on this worker's partitions (budget / partitions "
                "x partitions owned).",
                ["campaign"],
                registry=r,
            ),
            pacing_participation=Gauge(
                "adpulse_pacing_participation",
                "Probability a campaign takes part in a request (mean over this worker's "
                "partitions); 1 unthrottled, 0 budget spent.",
                ["campaign"],
                registry=r,
            ),
            pacing_throttled=Counter(
                "adpulse_pacing_throttled_total",
                "Requests in which a campaign's eligible ads were held back by pacing.",
                ["campaign"],
                registry=r,
            ),
            calibration_labels=Gauge(
                "adpulse_calibration_labels",
                "Labels in the pCTR calibration the decision stage serves with (0: the raw "
                "model output is served).",
                registry=r,
            ),
            broker_connected=Gauge(
                "adpulse_broker_connected",
                "1 while a bootstrap broker answers the worker's probe (a Kafka Metadata "
                "request each second), 0 after two probes in a row failed; /health is 503 then.",
                registry=r,
            ),
            consumer_stalled=Gauge(
                "adpulse_consumer_stalled_partitions",
                "Source partitions with records past their position and no progress for "
                "ADPULSE_STALL_S (streams/runtime/watchdog.py); /health is 503 while above 0.",
                registry=r,
            ),
            consumer_stalls=Counter(
                "adpulse_consumer_stalls",
                "Consumer stalls the watchdog detected (each is remedied by resume + seek).",
                registry=r,
            ),
            decide_requests=Counter(
                "adpulse_decide_requests_total",
                "POST /decide requests by outcome: answered, forwarded (to the owner of the "
                "user's partition), shed (503, overload), shed_ingest (503, ingest is behind), "
                "invalid (400), unauthorized (401, no or a wrong API token), unavailable (503, "
                "recovering or no owner known).",
                ["outcome"],
                registry=r,
            ),
            decide_loop_cap=Gauge(
                "adpulse_decide_loop_cap",
                "Share of the event loop's time POST /decide's decisions may hold before "
                "requests are shed (shed_ingest): 1 while ingest keeps up, down to 0.1 while "
                "its events are older than ADPULSE_DECIDE_MAX_INGEST_LAG_MS.",
                registry=r,
            ),
            decide_seconds=Histogram(
                "adpulse_decide_seconds",
                "POST /decide answered here: request read to response ready (queueing for the "
                "scoring run included).",
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            decide_forward_seconds=Histogram(
                "adpulse_decide_forward_seconds",
                "POST /decide forwarded to the owner: the whole extra hop, as this worker saw it.",
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            decision_log_failures=Counter(
                "adpulse_decision_log_failures_total",
                "Decisions answered over HTTP whose ad-decisions record the broker did not "
                "acknowledge: the joiner and learners never see them.",
                registry=r,
            ),
            loop_lag=Histogram(
                "adpulse_event_loop_lag_seconds",
                "How late the worker's event loop ran a 2 ms timer (sampled while /decide is in "
                "use, until 1 s after its last request): the wait a request has before its "
                "handler runs. /decide sheds above ADPULSE_DECIDE_MAX_QUEUE_MS.",
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            trainer_labels=Counter(
                "adpulse_trainer_labels_total",
                "ctr-feedback records seen by adpulse trainer, by outcome: learned, conversion "
                "(a converted decision's second record, skipped), dead_lettered (invalid or a "
                "duplicate decision id).",
                ["outcome"],
                registry=r,
            ),
            trainer_auc=Gauge(
                "adpulse_trainer_auc",
                "Progressive-validation AUC (each label scored before it is learned) over the "
                "last WINDOW labels, by version: online (the model being trained) or the "
                "serving version's name.",
                ["version", "window"],
                registry=r,
            ),
            trainer_logloss=Gauge(
                "adpulse_trainer_logloss",
                "Progressive-validation log loss over the last WINDOW labels, by version.",
                ["version", "window"],
                registry=r,
            ),
            trainer_calibration=Gauge(
                "adpulse_trainer_calibration",
                "Observed / expected CTR (clicks over summed pCTR) over the last WINDOW labels, "
                "by version: 1 is calibrated, below 1 the model over-predicts.",
                ["version", "window"],
                registry=r,
            ),
            trainer_candidates=Counter(
                "adpulse_trainer_candidates_total",
                "Candidate versions adpulse trainer exported to MODEL_DIR/candidates.",
                registry=r,
            ),
            trainer_checkpoint_ts=Gauge(
                "adpulse_trainer_checkpoint_timestamp_seconds",
                "When adpulse trainer last wrote its checkpoint (weights with consumed offsets).",
                registry=r,
            ),
            model_events=Counter(
                "adpulse_model_events_total",
                "Guarded-promotion transitions made by adpulse promoter, by event: candidate, "
                "refused, canary, promoted, rolled_back (each also a model-events record).",
                ["event"],
                registry=r,
            ),
            canary_labels=Gauge(
                "adpulse_canary_labels",
                "Labels counted for the current canary's verdict, by arm (canary, control).",
                ["arm"],
                registry=r,
            ),
        )
        m.build.info({"version": _version()})
        return m

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _version() -> str:
    try:
        return metadata.version("adpulse")
    except metadata.PackageNotFoundError:  # running from a tree that is not installed
        return "unknown"


def documented_metrics() -> list[tuple[str, str, str, str]]:
    """(name, type, labels, help) of every metric: the metric table of docs/operations.md."""
    m = Metrics.create()
    rows = []
    for f in fields(m):
        c = getattr(m, f.name)
        if f.name == "registry":
            continue
        kind = c._type  # prometheus_client keeps these private
        name = c._name + ("_total" if kind == "counter" else "")
        if kind == "info":
            name += "_info"
        labels = ", ".join(c._labelnames)
        rows.append((name, kind, labels, c._documentation))
    return rows
