"""Publish an ad catalog: from a JSONL file, or synthetic ads over given categories.

Every record is checked against the ad-catalog contract before anything is
sent, so a bad file never leaves a half-published catalog behind.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adpulse.core.errors import InputError
from adpulse.core.kafkaconf import client_kwargs
from adpulse.core.settings import Settings
from schemas import first_error


def synthetic_ads(
    n: int, categories: Sequence[int], seed: int = 0, campaigns: int = 50, budget: float = 1e6
) -> list[dict[str, Any]]:
    """``n`` ads spread over ``categories`` (repeat a category to weight it), valid records."""
    rng = np.random.default_rng(seed)
    cats = rng.choice(np.asarray(categories, dtype=np.int64), n)
    bids = np.round(np.exp(rng.normal(0.0, 0.5, n)), 2) + 0.01
    camp = rng.integers(0, campaigns, n)
    return [
        {
            "ad_id": f"ad-{i}",
            "campaign_id": f"camp-{int(camp[i])}",
            "category_id": int(cats[i]),
            "item_id": int(cats[i]) * 1000 + int(rng.integers(0, 50)),
            "bid": float(bids[i]),
            "daily_budget": budget,
            "targeting": {},
        }
        for i in range(n)
    ]


def read_catalog(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        msg = f"{path}: no such file"
        raise InputError(msg)
    ads = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                ad = json.loads(line)
            except ValueError as exc:
                msg = f"{path}:{lineno}: not JSON ({exc})"
                raise InputError(msg) from None
            problem = first_error("ad-catalog", ad)
            if problem:
                msg = f"{path}:{lineno}: {problem}"
                raise InputError(msg)
            ads.append(ad)
    return ads


def publish(bootstrap: Settings | str, topic: str, ads: Sequence[dict[str, Any]]) -> int:
    """Send ads keyed by ad_id (the topic is compacted: the latest record per ad wins)."""
    from kafka import KafkaProducer  # noqa: PLC0415 - slow import

    producer = KafkaProducer(**client_kwargs(bootstrap), linger_ms=5, acks=1)
    try:
        futures = [
            producer.send(topic, key=ad["ad_id"].encode(), value=json.dumps(ad).encode())
            for ad in ads
        ]
        producer.flush()
        for f in futures:
            f.get(timeout=30)
    finally:
        producer.close()
    return len(ads)


def remove(bootstrap: Settings | str, topic: str, ad_ids: Sequence[str]) -> None:
    """Tombstones: the ads disappear from every worker's catalog."""
    from kafka import KafkaProducer  # noqa: PLC0415

    producer = KafkaProducer(**client_kwargs(bootstrap), acks=1)
    try:
        for ad_id in ad_ids:
            producer.send(topic, key=ad_id.encode(), value=None)
        producer.flush()
    finally:
        producer.close()
