"""Ads embedded on arrival: real broker, a real worker with the exported text encoder.

The worker runs with ``ADPULSE_TEXT_MODEL`` set to the session's export
(tests/conftest.py ``text_model``) on CPU. Each expected pCTR is recomputed in
the test through the serving path (``Oracle``) on the ad with the embedding the
test computes itself from the text (TextEncoder + project): the decision must
match it, and must not match the hashed default the ad would get without text.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from adpulse.broker import EmbeddedBroker
from adpulse.catalogtool import publish
from adpulse.core.settings import Settings
from adpulse.polling import poll_until
from scoring.registry import PACKAGED
from scoring.textencoder import TextEncoder, project
from streams.runtime.topicadmin import create_topics
from tests.conftest import isolated
from tests.integration.test_decisions import (
    LENIENT,
    Decisions,
    Oracle,
    Requests,
    TopicReader,
    Worker,
    ad,
    request,
)

pytestmark = [pytest.mark.integration, pytest.mark.long]  # make test stays under 10 minutes
SHOES = "Cheap running shoes, free delivery on orders over $50"
HEADPHONES = "Noise-cancelling wireless headphones, 30-hour battery 降噪耳机"


@dataclass
class Env:
    settings: Settings
    worker: Worker
    requests: Requests
    decisions: Decisions
    encoder: TextEncoder
    tag: str

    def id(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def publish(self, *ads: dict[str, Any]) -> None:
        publish(self.settings.bootstrap, self.settings.topic("ad-catalog"), list(ads))

    def decide(self, placement: str) -> dict[str, Any]:
        n = uuid.uuid4().hex[:8]  # a new user each time: no interest, no frequency cap
        r = request(self.id(f"r-{n}"), self.id(f"u-{n}"), placement)
        self.requests.send([r])
        self.decisions.wait([r["request_id"]], timeout=20)
        return self.decisions.one(r["request_id"])

    def expected_pctr(self, a: dict[str, Any], d: dict[str, Any], *, text: bool = True) -> float:
        """pCTR of ``a`` for ``d``'s request, the ad embedded from its text (or not)."""
        s = self.settings
        given = dict(a)
        if text:
            given["embedding"] = project(self.encoder.encode([a["text"]]), s.dim,
                                         s.embedding_seed)[0].tolist()  # fmt: skip
        else:
            given.pop("text", None)
        oracle = Oracle(s, [given], PACKAGED)
        return float(oracle.pctr(None, [a["ad_id"]], d, None)[0])

    def wait_served_as(self, a: dict[str, Any], placement: str, timeout: float = 30.0) -> None:
        """Until a decision on ``placement`` serves ``a`` with the pCTR of its current text
        (a liveness wait: how soon is ``adpulse bench adtext``'s figure)."""
        last: dict[str, Any] = {}

        def served() -> bool:
            last.update(self.decide(placement))
            return bool(last["ad_id"] == a["ad_id"] and last["pctr"] == pytest.approx(
                self.expected_pctr(a, last), rel=1e-5))  # fmt: skip

        poll_until(served, timeout, f"{a['ad_id']} served from its text", every=0.05,
                   detail=lambda: f"last {last}\n{self.worker.tail()}",
                   error=AssertionError)  # fmt: skip


@pytest.fixture(scope="module")
def env(
    broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory, text_model: Path
) -> Iterator[Env]:
    unique = f"txt-{uuid.uuid4().hex[:8]}"
    tmp = tmp_path_factory.mktemp(unique)
    settings = isolated(broker, unique, tmp / "data")
    create_topics(settings)
    extra = {
        "ADPULSE_TEXT_MODEL": str(text_model),
        "ADPULSE_DEVICE": "cpu",  # the fp32 export, as the test's own encoder
        "ADPULSE_POLICY": "greedy",  # the served pCTR is the model's
        "ADPULSE_PACING": "off",
        **LENIENT,
    }
    worker = Worker(settings, tmp, extra).start()
    requests, decisions = Requests(settings), Decisions(settings)
    encoder = TextEncoder(text_model, device="cpu")
    try:
        yield Env(settings, worker, requests, decisions, encoder, unique)
    finally:
        requests.close()
        decisions.close()
        worker.stop()


def test_an_ad_published_with_text_alone_is_embedded_then_scored(env: Env) -> None:
    new = ad(env.id("shoes"), "txt-new", 1.0, 4756105, text=SHOES)
    env.publish(new)
    env.wait_served_as(new, "txt-new")
    d = env.decide("txt-new")
    without = env.expected_pctr(new, d, text=False)  # the hashed category default
    assert d["pctr"] != pytest.approx(without, rel=1e-5), "the text changed nothing"
    assert env.worker.metric("adpulse_ad_text_embeddings_total", 'source="model"') >= 1


def test_a_changed_text_is_re_embedded_and_a_known_text_comes_from_the_cache(env: Env) -> None:
    first = ad(env.id("gadget"), "txt-change", 1.0, 982926, text=SHOES)
    env.publish(first)
    env.wait_served_as(first, "txt-change")
    encoded = env.worker.metric("adpulse_ad_text_embeddings_total", 'source="model"')
    changed = {**first, "text": HEADPHONES}
    env.publish(changed)
    env.wait_served_as(changed, "txt-change")
    assert env.worker.metric("adpulse_ad_text_embeddings_total", 'source="model"') == encoded + 1
    back = {**first, "bid": 1.5}  # SHOES again: this worker has encoded it already
    env.publish(back)
    env.wait_served_as(back, "txt-change")
    assert env.worker.metric("adpulse_ad_text_embeddings_total", 'source="model"') == encoded + 1


def test_a_text_that_cannot_be_embedded_is_dead_lettered_with_its_reason(env: Env) -> None:
    s = env.settings
    good = ad(env.id("kept"), "txt-bad", 1.0, 2355072, text=SHOES)
    env.publish(good)
    env.wait_served_as(good, "txt-bad")
    empty = {**good, "text": "  \n "}  # the same ad: it must keep its last valid version
    too_long = ad(env.id("long"), "txt-bad", 9.0, 2355072, text="shoe " * 300)  # > 256 tokens
    env.publish(empty, too_long)
    not_utf8 = json.dumps(ad(env.id("latin1"), "txt-bad", 9.0, 2355072, text="caf-"))
    raw = not_utf8.replace("caf-", "caf\xe9").encode("latin-1")  # é as one byte: not UTF-8
    producer = KafkaProducer(bootstrap_servers=s.bootstrap, acks="all")
    producer.send(s.topic("ad-catalog"), key=env.id("latin1").encode(), value=raw).get(10)
    producer.close()

    letters = TopicReader(s.bootstrap, s.topic("dead-letters"), s.partitions)
    want = {env.id("kept"): "text_empty", env.id("long"): "text_too_long",
            env.id("latin1"): "invalid_json"}  # fmt: skip
    got: dict[str, tuple[str, str]] = {}

    def all_dead_lettered() -> bool:
        letters.poll()
        for _, _, value in letters.records:
            body = json.loads(value)
            key = base64.b64decode(body["key_b64"] or "").decode()
            if body["topic"] == s.topic("ad-catalog") and key in want:
                got[key] = (body["error"], body["message"])
        return set(got) == set(want)

    try:
        poll_until(all_dead_lettered, 60, "the three refused ads on dead-letters", every=0.05,
                   detail=lambda: f"so far: {got}", error=AssertionError)  # fmt: skip
    finally:
        letters.close()
    assert {k: v[0] for k, v in got.items()} == want
    assert "256" in got[env.id("long")][1]
    assert "utf-8" in got[env.id("latin1")][1].lower()
    env.wait_served_as(good, "txt-bad")  # still its last valid text
    assert env.decide("txt-bad")["candidates"] == 1  # and neither refused ad is a candidate
