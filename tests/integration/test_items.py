"""Items in the ads' space end to end: real broker, a real worker with the text encoder.

The worker runs with ``ADPULSE_TEXT_MODEL`` set to the session's export on CPU.
Item titles go to ``item-catalog`` before the events, after them, or never, and
the events arrive shuffled, late and duplicated. Each user's interest vector
(the lookup shows the one decisions read) must equal the numpy reference
computed from scratch: every titled item counted by its title's vector (the
test's own encoder, projected as the worker does), every other item by its
category fallback.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka import KafkaProducer

from adpulse.broker import EmbeddedBroker
from adpulse.catalogtool import publish
from adpulse.core.settings import Settings
from adpulse.polling import poll_until
from adpulse.workerproc import WorkerProcess
from scoring.embeddings import HashedEmbeddings
from scoring.features import InterestParams, reference_vectors
from scoring.textencoder import TextEncoder, project
from streams.runtime.topicadmin import create_topics
from tests.conftest import isolated
from tests.integration.test_decisions import Decisions, Requests, TopicReader, ad, request
from tests.integration.test_interest import BACKFILL, DAY, produce_events, wait_applied

pytestmark = [pytest.mark.integration, pytest.mark.long]  # make test stays under 10 minutes
TITLES = [
    "Trail running shoes, waterproof", "Lightweight road running sneakers",
    "Noise-cancelling wireless headphones", "Bluetooth earbuds with charging case",
    "降噪无线耳机 续航30小时", "Stainless steel chef's knife, 20 cm",
    "Non-stick frying pan with lid", "Organic green tea, 100 bags", "Espresso coffee beans, 1 kg",
    "Yoga mat, extra thick", "Adjustable dumbbells pair", "Children's picture book about space",
    "Hardcover science fiction novel", "Wool winter scarf", "Waterproof hiking jacket",
    "4K television, 55 inch", "Mechanical keyboard, brown switches", "USB-C charging cable, 2 m",
    "Running socks, three pairs", "Ceramic coffee mug",
]  # fmt: skip
ITEMS = 30  # ids 0-29: 0-14 titled before the events, 15-19 after, 20-29 never (25: refused)


@dataclass
class Env:
    settings: Settings
    worker: WorkerProcess
    encoder: TextEncoder

    def publish(self, records: list[tuple[str, bytes | None]]) -> None:
        producer = KafkaProducer(bootstrap_servers=self.settings.bootstrap, acks="all")
        topic = self.settings.topic("item-catalog")
        for key, value in records:
            producer.send(topic, key=key.encode(), value=value).get(10)
        producer.close()

    def vectors(self, ids: list[int]) -> dict[int, np.ndarray]:
        """Each item's title vector as the worker computes it (encoder, then projection)."""
        s = self.settings
        raw = self.encoder.encode([TITLES[i] for i in ids])
        return dict(zip(ids, project(raw, s.dim, s.embedding_seed), strict=True))


def item(i: int, title: str | None = None) -> tuple[str, bytes]:
    body = {"item_id": str(i), "title": TITLES[i] if title is None else title,
            "category_id": i % 5, "price": 10.0 + i}  # fmt: skip
    return str(i), json.dumps(body).encode()


@pytest.fixture(scope="module")
def env(
    broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory, text_model: Path
) -> Iterator[Env]:
    unique = f"items-{uuid.uuid4().hex[:8]}"
    tmp = tmp_path_factory.mktemp(unique)
    settings = isolated(broker, unique, tmp / "data")
    create_topics(settings)
    extra = {"ADPULSE_TEXT_MODEL": str(text_model), "ADPULSE_DEVICE": "cpu", **BACKFILL}
    worker = WorkerProcess(settings, tmp, extra_env=extra).start()
    try:
        yield Env(settings, worker, TextEncoder(text_model, device="cpu"))
    finally:
        worker.stop()


def events(n: int, users: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    base = int(time.time() * 1000) - DAY  # recent: decisions see the vector barely decayed
    out = []
    for i in range(n):
        it = rng.randrange(ITEMS)
        out.append({
            "event_id": f"i{seed}-{i}", "user_id": f"iu{seed}-{rng.randrange(users)}",
            "kind": rng.choice(["browse", "click", "cart", "fav", "purchase"]), "item_id": it,
            # the item's own category mostly; now and then filed under another one
            "category_id": it % 5 if rng.random() < 0.9 else 50 + it % 2,
            "ts": base + rng.randrange(DAY // 2),
        })  # fmt: skip
    return out


def test_item_embeddings_feed_interest_vectors_equal_to_reference_under_shuffled_duplicated_replay(
    env: Env,
) -> None:
    env.publish([item(i) for i in range(15)])  # titles before the events
    evs = events(1500, users=20, seed=1)
    rng = random.Random(2)
    sent = list(evs)
    rng.shuffle(sent)
    cutoff = sorted(e["ts"] for e in sent)[150]
    sent.sort(key=lambda e: e["ts"] < cutoff)  # the oldest 10% arrive last (late)
    for i in sorted(rng.sample(range(len(sent)), 150), reverse=True):  # producer retries
        sent.insert(min(len(sent), i + rng.randrange(1, 4)), dict(sent[i]))
    produce_events(env.settings, sent, chunk=250)
    wait_applied(env.worker, evs)
    # Titles after the events; one refused title (item 25 keeps its category fallback).
    env.publish([item(i) for i in range(15, 20)] + [item(25, "   ")])

    assert env.settings.item_limit >= 2 * ITEMS  # the worker keeps every pair of a user
    ref = wait_reference(env, evs, titled=20)
    assert env.worker.metric("adpulse_events_total", 'outcome="duplicate"') == 150
    # Not the category-only vector: the titles moved it.
    s = env.settings
    params = InterestParams.from_settings(s)
    plain = reference_vectors(evs, HashedEmbeddings(s.dim, s.embedding_seed), params)
    user = next(iter(ref))
    assert not np.allclose(plain[user][1], ref[user][1], rtol=1e-2)
    # Decisions read the same vector: the snapshot holds it decayed to the decision's time.
    publish(s.bootstrap, s.topic("ad-catalog"), [ad("items-ad", "items-p", 1.0, 3)])
    requests, decisions = Requests(s), Decisions(s)
    try:
        last: dict[str, Any] = {}

        def served() -> bool:
            r = request(f"items-r-{uuid.uuid4().hex[:8]}", user, "items-p")
            requests.send([r])
            decisions.wait([r["request_id"]], timeout=20)
            last.update(decisions.one(r["request_id"]))
            return last["ad_id"] == "items-ad"

        poll_until(served, 30, "the ad served", every=0.2, error=AssertionError,
                   detail=lambda: f"last {last}\n{env.worker.tail()}")  # fmt: skip
    finally:
        requests.close()
        decisions.close()
    t, v, _ = ref[user]
    expect = v * np.exp(-(last["ts"] - t) / params.tau_ms)
    np.testing.assert_allclose(last["features"]["interest"], expect, rtol=1e-4, atol=1e-4)


def wait_reference(
    env: Env, evs: list[dict[str, Any]], titled: int
) -> dict[str, tuple[int, np.ndarray, dict[str, int]]]:
    """Until every user's vector equals the reference with items 0..titled-1 by their titles."""
    s = env.settings
    params = InterestParams.from_settings(s)
    ref = reference_vectors(evs, HashedEmbeddings(s.dim, s.embedding_seed), params,
                            env.vectors(list(range(titled))))  # fmt: skip
    pairs = {(e["user_id"], e["item_id"], e["category_id"]) for e in evs if e["item_id"] < titled}
    last: dict[str, Any] = {}

    def all_equal() -> bool:
        for user, (t, v, _) in ref.items():
            body = env.worker.interest(user)
            last.update(user=user, body=body)
            if body is None or body["reference_ts"] != t:
                return False
            if body["items_embedded"] != sum(1 for u, _, _ in pairs if u == user):
                return False  # the worker has not embedded every title yet
            got = np.array(body["vector_at_reference"])
            tol = 1e-4 * max(1.0, float(np.abs(v).max()))
            if not np.allclose(got, v, rtol=1e-4, atol=tol):
                last.update(diff=float(np.abs(got - v).max()))
                return False
        return True

    poll_until(all_equal, 60, "every user's vector equal to the reference with item titles",
               every=0.2, detail=lambda: f"last {last.get('user')}: diff {last.get('diff')}\n"
               f"{env.worker.tail()}", error=AssertionError)  # fmt: skip
    return ref


def test_item_interest_is_exact_after_kill_9_and_a_wiped_data_dir(env: Env) -> None:
    """The item map is in the interest record, so the changelog restores it; the title
    vectors come back from item-catalog (the text cache went with the data dir)."""
    env.publish([item(i) for i in range(20)])
    evs = events(600, users=8, seed=3)
    produce_events(env.settings, evs[:300], chunk=100)
    wait_applied(env.worker, evs[:300])
    env.worker.kill()
    shutil.rmtree(env.settings.data_dir)
    env.worker.start()
    rest = list(evs[300:])
    for i in range(len(rest) - 1, 0, -7):  # retries: some events sent twice in a row
        rest.insert(i, dict(rest[i]))
    produce_events(env.settings, rest, chunk=100)
    wait_applied(env.worker, evs)
    wait_reference(env, evs, titled=20)


def test_an_item_that_cannot_be_embedded_is_dead_lettered_with_its_reason(env: Env) -> None:
    s = env.settings
    too_long = item(26, "shoe " * 300)  # > 256 tokens
    wrong_key = ("27", item(28, "Garden hose, 25 m")[1])  # keyed by another item
    env.publish([item(25, "  \n "), too_long, wrong_key, ("29", b"{not json")])
    want = {"25": "text_empty", "26": "text_too_long", "27": "key_mismatch",
            "29": "invalid_json"}  # fmt: skip
    letters = TopicReader(s.bootstrap, s.topic("dead-letters"), s.partitions)
    got: dict[str, tuple[str, str, str]] = {}

    def all_dead_lettered() -> bool:
        letters.poll()
        for _, _, value in letters.records:
            body = json.loads(value)
            key = base64.b64decode(body["key_b64"] or "").decode()
            if body["topic"] == s.topic("item-catalog") and key in want:
                got[key] = (body["error"], body["message"], body.get("stage", ""))
        return set(got) == set(want)

    try:
        poll_until(all_dead_lettered, 60, "the refused items on dead-letters", every=0.05,
                   detail=lambda: f"so far: {got}", error=AssertionError)  # fmt: skip
    finally:
        letters.close()
    assert {k: v[0] for k, v in got.items()} == want
    assert {v[2] for v in got.values()} == {"items"}
    assert "256" in got["26"][1]
