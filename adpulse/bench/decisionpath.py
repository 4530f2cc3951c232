"""The worker's own decision call, run in this process: a decision without HTTP or Kafka.

``bench serve`` times it one request at a time (its in-process floor) and
``bench scorer`` times it on micro-batches of requests, as ``POST /decide``'s
service forms them from concurrent requests in one event-loop turn. Both run
:meth:`streams.decide.DecideStage.decide` (targeting, caps, pacing, feature
assembly, ONNX Runtime, calibration, policy) on in-memory copies of the
worker's tables, so what is timed is the path the worker runs, not a model of it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adpulse.bench.requests import pick, request_body
from adpulse.catalogtool import synthetic_ads
from adpulse.core.settings import Settings
from adpulse.workload import Workload, WorkloadModel
from schemas.messages import AdRequest
from scoring.catalog import Catalog
from scoring.featurespec import FeatureSpec
from scoring.registry import ModelRegistry
from streams.deadletter import Raw, Rejected
from streams.decide import DecideStage, ServingModels, StateReaders, request_decoder
from streams.interest import InterestStage
from streams.sequence import SequenceStage


def request_bodies(
    ad_ids: Sequence[str], users: int, candidates: int, n: int, seed: int, tag: str
) -> list[bytes]:
    """``n`` ad-requests bodies, each for a random one of ``users`` users and naming
    ``candidates`` distinct random ads of ``ad_ids``."""
    rng = np.random.default_rng(seed)
    who = rng.integers(0, users, n)
    return [
        request_body(f"{tag}-{i}", f"u{who[i]}", pick(rng, ad_ids, candidates),
                     int(time.time() * 1000))
        for i in range(n)
    ]  # fmt: skip


def synthetic_inputs(
    users: int, ads: int, events_per_user: int, category_rows: int = 50_000
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """A synthetic catalog of ``ads`` ads over the workload's categories (drawn from
    ``category_rows`` of its rows) and ``events_per_user`` x ``users`` warm user-events
    payloads: what :meth:`DecisionPath.build` takes, as the in-process benches use it."""
    workload = Workload(WorkloadModel(), users=users, seed=2)
    catalog = synthetic_ads(ads, workload.columns(category_rows)["category"].tolist(), seed=3)
    _, events = workload.payloads(events_per_user * users, int(time.time() * 1000), prefix="warm")
    return catalog, events


@dataclass
class DecisionPath:
    stage: DecideStage
    tables: StateReaders
    settings: Settings
    _decoder: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._decoder = request_decoder(self.settings.max_event_bytes)

    @classmethod
    def build(
        cls, ads: list[dict[str, Any]], events: Sequence[bytes], settings: Settings | None = None
    ) -> DecisionPath:
        """The decision stage over ``ads`` and the interest state and behaviour sequences
        ``events`` (user-events payloads) leave; caps and spend start empty, as in a fresh
        worker."""
        s = settings or Settings(pseudonymise=False, policy="greedy", partitions=1)
        interest_table: dict[bytes, bytes] = {}
        sequence_table: dict[bytes, bytes] = {}
        sequences = SequenceStage(s.sequence_length) if s.sequence_length > 0 else None
        caps: dict[bytes, bytes] = {}
        spend: dict[bytes, bytes] = {}
        # A backfill: keyed as a producer keys them (by user_id), all "arriving" now, so
        # the live per-user rate limit (broker time) is off for it.
        interest = InterestStage(s.with_(max_events_per_user_s=0))
        now = int(time.time() * 1000)
        raws = [Raw(v, json.loads(v)["user_id"].encode(), 0, i, now) for i, v in enumerate(events)]
        for i in range(0, len(raws), 10_000):
            res = interest.process(
                raws[i : i + 10_000], lambda k, _p: [interest_table.get(x) for x in k], now
            )
            interest_table.update({k: v for k, _p, v in res.writes if v is not None})
            if sequences is not None:
                seq = sequences.process(
                    res.valid, lambda k, _p: [sequence_table.get(x) for x in k], res.columns
                )
                sequence_table.update({k: v for k, _p, v in seq.writes})
        catalog = Catalog(ads, FeatureSpec.from_settings(s))
        models = ServingModels.load(ModelRegistry.from_settings(s), s.fallback_ctr)
        tables = StateReaders(
            lambda k, _p: [interest_table.get(x) for x in k],
            lambda k, _p: [caps.get(x) for x in k],
            lambda k, _p: [spend.get(x) for x in k],
            lambda k, _p: [sequence_table.get(x) for x in k],
        )
        # the interest stage's cached table, warmed by the backfill as a worker's by ingest
        stage = DecideStage(s, models, lambda: catalog, embeddings=interest.table)
        return cls(stage, tables, s)

    def decide(self, bodies: Sequence[bytes]) -> int:
        """Decode and decide ``bodies`` as one micro-batch; returns the candidate rows scored."""
        decode = self._decoder.decode
        now = int(time.time() * 1000)
        requests: list[tuple[AdRequest, Raw]] = []
        for b in bodies:
            req = decode(Raw(b, None, 0, 0, now))
            if isinstance(req, Rejected):
                msg = f"bench request refused: {req.message}"
                raise ValueError(msg)
            requests.append((req, Raw(None, None, 0, 0, now)))
        return self.stage.decide(requests, self.tables, now).rows_scored
