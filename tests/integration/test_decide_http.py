"""POST /decide end to end: real broker, two real workers sharing the partitions.

Worker ``a`` starts alone, then ``b`` joins the group, so each owns some users'
partitions and a request sent to the other worker must be forwarded. Windows are
short (5 s attribution, 1 s idle watermark) so the joiner labels within seconds.
"""

from __future__ import annotations

import json
import socket
import threading
import time
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
from adpulse.workerproc import WorkerProcess
from schemas import first_error
from streams.runtime.topicadmin import create_topics
from tests.conftest import isolated
from tests.integration.test_decisions import Decisions, ad, partition_of, request
from tests.integration.test_join import Feedback

pytestmark = pytest.mark.integration
HOUR = 3600 * 1000
CATS = [4756105, 982926, 2355072, 1320293, 4145813]
EXTRA = {
    "ADPULSE_POLICY": "greedy",
    "ADPULSE_ATTRIBUTION_WINDOW_S": "5",
    "ADPULSE_WATERMARK_IDLE_S": "1",
    "ADPULSE_FREQ_CAP_PER_DAY": "1000",
    # a few ms of queue: the overload test sheds without needing a slow machine
    "ADPULSE_DECIDE_MAX_QUEUE_MS": "3",
    "ADPULSE_MODEL_LATENCY_BUDGET_MS": "200",
    "ADPULSE_MODEL_MAX_SLOWDOWN": "100",
    "ADPULSE_PLACEMENT_POLICIES": "bandit2=thompson:5",  # the label test's placement only
}


@dataclass
class Pair:
    settings: Settings
    a: WorkerProcess
    b: WorkerProcess
    producer: KafkaProducer
    decisions: Decisions
    feedback: Feedback
    tag: str

    def id(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def events(self, events: list[dict[str, Any]]) -> None:
        for e in events:
            self.producer.send(
                self.settings.topic("user-events"),
                key=e["user_id"].encode(),
                value=json.dumps(e).encode(),
            ).get(10)  # acknowledged, one by one

    def owner(self, user: str) -> WorkerProcess:
        """The worker whose /decide answers ``user`` itself (the other forwards)."""
        before = self.a.metric("adpulse_decide_requests_total", 'outcome="forwarded"')
        status, _, _ = decide(self.a, body(self.id("probe"), user))
        assert status == 200
        after = self.a.metric("adpulse_decide_requests_total", 'outcome="forwarded"')
        return self.b if after > before else self.a


def decide(
    worker: WorkerProcess, raw: bytes, headers: dict[str, str] | None = None, port: str = "web"
) -> tuple[int, Any, dict[str, str]]:
    """POST /decide as a client should: a 503 (shed with Retry-After, or a partition on the
    move) is retried a few times. The queue limit in these workers is 3 ms, so a
    garbage-collection pause can shed a lone request."""
    for _ in range(20):
        base = worker.decide_url if port == "decide" else worker.url
        status, got, hdrs = worker.post("/decide", raw, headers, base=base)
        if status != 503:
            break
        time.sleep(0.05)
    return status, got, hdrs


def body(rid: str, user: str, placement: str = "http", **extra: Any) -> bytes:
    return json.dumps(request(rid, user, placement, **extra)).encode()


def history(user: str, n: int = 6) -> list[dict[str, Any]]:
    now = int(time.time() * 1000)
    return [
        {"event_id": f"{user}-e{i}", "user_id": user, "kind": ["browse", "cart", "fav"][i % 3],
         "item_id": 2000 + i, "category_id": CATS[i % 5], "ts": now - (i + 1) * HOUR}
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def pair(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    unique = f"http-{uuid.uuid4().hex[:8]}"
    tmp = tmp_path_factory.mktemp(unique)
    settings = isolated(broker, unique, tmp / "a")
    create_topics(settings)
    ads = [ad(f"h-{i}", "http", round(1.0 + 0.05 * i, 2), CATS[i % 5]) for i in range(20)]
    publish(settings.bootstrap, settings.topic("ad-catalog"), ads)
    a = WorkerProcess(settings, tmp, name="a", extra_env=EXTRA).start()
    b = WorkerProcess(settings.with_(data_dir=tmp / "b"), tmp, name="b", extra_env=EXTRA)
    b.start()
    for w in (a, b):
        w.wait_until(lambda w=w: w.metric("adpulse_catalog_ads") == len(ads), 30, "catalog")
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, linger_ms=1, acks="all")
    pair = Pair(settings, a, b, producer, Decisions(settings), Feedback(settings), unique)
    try:
        a.wait_until(lambda: _split(pair), 40, "both workers to own partitions")
        yield pair
    finally:
        producer.close()
        pair.decisions.close()
        b.stop()
        a.stop()


def _events_in(worker: WorkerProcess, user: str) -> int:
    body = worker.interest(user)
    return 0 if body is None else sum(body["counts"].values())


def _split(p: Pair) -> bool:
    """Whether a and b both answer /decide for some users of their own (a rebalance is over)."""
    if not all(w.get("/health")[0] == 200 for w in (p.a, p.b)):
        return False
    try:
        owners = {id(p.owner(f"{p.tag}-split{i}")) for i in range(12)}
    except AssertionError:  # a 503 while the partitions move
        return False
    return len(owners) == 2


def test_decide_matches_the_kafka_path_is_logged_and_gets_labelled(pair: Pair) -> None:
    p = pair
    via_http, via_topic = p.id("twin-http"), p.id("twin-topic")
    # Same history, so the same interest vector: the two paths must rank alike.
    p.events(history(via_http) + [{**e, "user_id": via_topic, "event_id": e["event_id"] + "t"}
                                  for e in history(via_http)])  # fmt: skip
    for user in (via_http, via_topic):
        owner = p.owner(user)
        owner.wait_until(lambda o=owner, u=user: _events_in(o, u) == 6, 20, f"{user}'s history")

    status, got, _ = decide(p.a, body(p.id("h1"), via_http))
    assert status == 200, got
    assert first_error("ad-decisions", got) is None
    time.sleep(0.4)  # a person's click: sooner is suspect (ADPULSE_MIN_CLICK_DELAY_MS)
    click = {"event_id": p.id("click-h1"), "user_id": via_http, "kind": "click",
             "item_id": 1, "category_id": CATS[0], "ts": int(time.time() * 1000),
             "ad_id": got["ad_id"], "decision_id": got["request_id"]}  # fmt: skip
    p.events([click])  # inside the attribution window
    twin = json.dumps(request(p.id("k1"), via_topic, "http")).encode()
    p.producer.send(p.settings.topic("ad-requests"), key=via_topic.encode(), value=twin).get(10)
    p.decisions.wait([p.id("h1"), p.id("k1")])
    logged, kafka = p.decisions.one(p.id("h1")), p.decisions.one(p.id("k1"))
    assert logged["ad_id"] == got["ad_id"] and logged["pctr"] == got["pctr"]
    assert logged["_partition"] == partition_of(via_http, p.settings.partitions)
    assert got["features"]["interest"]  # the user's history was seen
    assert kafka["ad_id"] == got["ad_id"]
    assert kafka["pctr"] == pytest.approx(got["pctr"], rel=1e-3)  # decay over the ms between
    assert (kafka["candidates"], kafka["policy"]) == (got["candidates"], got["policy"])

    p.feedback.wait([got["request_id"]], timeout=30)
    labels = p.feedback.by_id[got["request_id"]]
    assert [lab["clicked"] for lab in labels] == [1]


def test_a_non_owner_forwards_the_request(pair: Pair) -> None:
    p = pair
    users = [p.id(f"fwd{i}") for i in range(16)]
    away = [u for u in users if p.owner(u) is p.b]
    assert away, "no user of b among 16: the partitions are not split"
    before_a = p.a.metric("adpulse_decide_requests_total", 'outcome="forwarded"')
    before_b = p.b.metric("adpulse_decide_requests_total", 'outcome="answered"')
    rids = []
    for i, u in enumerate(away):
        status, got, _ = decide(p.a, body(p.id(f"f{i}"), u))
        assert status == 200, got
        assert got["request_id"] == p.id(f"f{i}")
        rids.append(got["request_id"])
    forwarded = p.a.metric("adpulse_decide_requests_total", 'outcome="forwarded"') - before_a
    answered = p.b.metric("adpulse_decide_requests_total", 'outcome="answered"') - before_b
    assert forwarded >= len(away) and answered >= len(away)  # more if a 503 was retried
    assert p.a.metric("adpulse_decide_forward_seconds_count") >= len(away)
    p.decisions.wait(rids)
    assert all(len(p.decisions.by_id[r]) == 1 for r in rids)


def test_a_request_past_its_deadline_gets_a_deadline_no_fill(pair: Pair) -> None:
    p = pair
    user = p.id("late")
    owner = p.owner(user)
    # A request forwarded after sitting 500 ms (the header carries when its budget began).
    old = {"X-Adpulse-Forwarded": "1", "X-Adpulse-Start-Ms": str(int(time.time() * 1000) - 500)}
    status, got, _ = decide(owner, body(p.id("late1"), user, tmax_ms=100), old)
    assert status == 200
    assert (got["ad_id"], got["no_fill_reason"]) == (None, "deadline")
    assert first_error("ad-decisions", got) is None
    # The same age within the largest budget the contract allows: 59.5 s left, longer than
    # the client waits for any answer, so this checks the rule, not the worker's speed.
    status, got, _ = decide(owner, body(p.id("late2"), user, tmax_ms=60_000), old)
    assert got["ad_id"] is not None
    # The topic path: a record stamped 500 ms ago with a 100 ms budget.
    stamp = int(time.time() * 1000) - 500
    p.producer.send(p.settings.topic("ad-requests"), key=user.encode(), timestamp_ms=stamp,
                    value=json.dumps(request(p.id("late3"), user, "http", tmax_ms=100)).encode()
                    ).get(10)  # fmt: skip
    p.decisions.wait([p.id("late3")])
    assert p.decisions.one(p.id("late3"))["no_fill_reason"] == "deadline"


def test_a_malformed_body_gets_a_400_and_its_contract_error(pair: Pair) -> None:
    p = pair
    cases = [
        b"{not json",
        json.dumps({"request_id": "x", "placement": "http", "ts": 1}).encode(),
        body(p.id("bad"), p.id("u"), candidates=["a", "a"]),
        body(p.id("bad"), p.id("u"), tmax_ms=-1),
    ]
    for raw in cases:
        status, got, _ = p.a.post("/decide", raw)
        assert status == 400, (raw, got)
        assert got["error"].startswith("ad-requests contract: ")
        assert "\n" not in got["error"]
    assert "user_id" in p.a.post("/decide", cases[1])[1]["error"]


def test_a_decision_reads_the_state_its_worker_has_applied(pair: Pair) -> None:
    """Read-after-write without a timing claim: once the owner's table shows an event
    (the lookup /decide shares), the next decision's features include it. How soon that
    is after the event is acknowledged is a benchmark figure (``bench serve``,
    ``freshness_p99_ms``), not something a test should time."""
    p = pair
    for i in range(3):
        user = p.id(f"raw{i}")
        owner = p.owner(user)  # a first decision: no history yet
        p.events(history(user, 1))  # acknowledged by the broker
        owner.wait_until(lambda o=owner, u=user: _events_in(o, u) == 1, 20, f"{user}'s event")
        status, got, _ = decide(owner, body(p.id(f"raw{i}-d"), user))
        assert status == 200
        assert got["features"]["interest"], f"{user}: applied but not in the decision"


@pytest.mark.parametrize("port", ["web", "decide"])
def test_under_overload_the_excess_is_shed_with_503_and_nothing_else_is_lost(
    pair: Pair, port: str
) -> None:
    p = pair
    owner = p.owner(p.id("load0"))
    base = owner.decide_url if port == "decide" else owner.url
    users = [u for u in (p.id(f"load{i}") for i in range(40)) if p.owner(u) is owner]
    results: list[tuple[str, int, dict[str, str]]] = []
    lock = threading.Lock()

    def fire(t: int) -> None:
        for i in range(25):
            rid = p.id(f"o{port}{t}-{i}")
            raw = body(rid, users[(t + i) % len(users)])
            status, _, headers = owner.post("/decide", raw, base=base)
            with lock:
                results.append((rid, status, headers))

    threads = [threading.Thread(target=fire, args=(t,)) for t in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [s for _, s, _ in results]
    assert len(results) == 32 * 25
    assert set(statuses) <= {200, 503}, set(statuses)
    shed = [h for _, s, h in results if s == 503]
    assert shed, "32 concurrent callers never overloaded a 3 ms queue"
    assert all(h.get("Retry-After") == "1" for h in shed)
    answered = [r for r, s, _ in results if s == 200]
    p.decisions.wait(answered, settle=1.0)
    assert all(len(p.decisions.by_id[r]) == 1 for r in answered)
    refused = [r for r, s, _ in results if s == 503]
    assert not any(r in p.decisions.by_id for r in refused)  # a shed request decided nothing


def test_the_worker_serves_its_openapi_document(pair: Pair) -> None:
    from schemas.openapi import openapi

    status, doc = pair.b.get("/openapi.json")
    assert status == 200
    assert doc == json.loads(json.dumps(openapi()))


def test_user_data_needs_the_api_token_and_the_rest_stays_open(pair: Pair) -> None:
    p, w = pair, pair.a
    raw = body(p.id("noauth"), p.id("u-noauth"))
    for status, got, headers in (
        w.post("/decide", raw, authorized=False),
        w.post("/decide", raw, {"Authorization": "Bearer wrong-token-wrong-token"}, False),
    ):
        assert status == 401
        assert "ADPULSE_API_TOKEN_FILE" in got["error"]
        assert headers["WWW-Authenticate"].startswith("Bearer")
    assert w.get(f"/users/{p.id('u-noauth')}/interest", authorized=False)[0] == 401
    assert w.get("/pseudonyms/0123456789abcdef/interest", authorized=False)[0] == 401
    assert w.get(f"/users/{p.id('u-noauth')}/interest")[0] == 404  # authorized: unknown user
    for path in ("/health", "/metrics", "/openapi.json"):
        assert w.get(path, authorized=False)[0] == 200, path
    assert w.metric("adpulse_decide_requests_total", 'outcome="unauthorized"') >= 2
    p.decisions.poll()
    assert p.id("noauth") not in p.decisions.by_id  # refused before anything was decided


def test_a_lookup_reaches_the_owner_from_either_worker(pair: Pair) -> None:
    p = pair
    users = [p.id(f"look{i}") for i in range(8)]
    for u in users:
        p.events(history(u, 2))
    for u in users:
        owner = p.owner(u)
        owner.wait_until(lambda o=owner, u=u: _events_in(o, u) == 2, 20, f"{u}'s events")
        for w in (p.a, p.b):  # the other one forwards the lookup to the owner
            status, body = w.get(f"/users/{u}/interest")
            assert status == 200, body
            assert sum(body["counts"].values()) == 2


def test_a_client_routing_by_the_owner_map_reaches_the_owner_without_a_forward(
    pair: Pair,
) -> None:
    """``GET /owners`` and Kafka's murmur2 of the raw user id (docs/decide.md) name the
    worker that answers the user's ``/decide`` itself, from either worker."""
    p = pair
    maps = [w.get("/owners") for w in (p.a, p.b)]
    for status, got in maps:
        assert status == 200, got
        assert got["complete"] is True
    got = maps[0][1]
    assert maps[1][1] == got  # the group's one assignment
    assert got["topic"] == p.settings.topic("ad-requests")
    assert set(got["owners"].values()) == {p.a.url, p.b.url}
    for i in range(12):
        user = p.id(f"route{i}")
        part = partition_of(user, got["partitions"])
        assert got["owners"][str(part)] == p.owner(user).url, user


def test_the_catalog_reaches_both_workers(pair: Pair) -> None:
    p = pair
    new = ad(p.id("late-ad"), "late", 1.0, CATS[0])
    publish(p.settings.bootstrap, p.settings.topic("ad-catalog"), [new])
    users = [p.id(f"cat{i}") for i in range(12)]
    owners = {id(p.owner(u)): u for u in users}  # a user of each worker
    assert len(owners) == 2, "the partitions are not split"
    for w in (p.a, p.b):
        w.wait_until(lambda w=w: w.metric("adpulse_catalog_ads") == 21, 30, "the new ad")
    def chooses_it(u: str) -> bool:  # the mirror has it; the stage rebuilds within a moment
        status, got, _ = decide(p.a, body(p.id(f"cat-{u}-{time.monotonic()}"), u,
                                          placement="late"))  # fmt: skip
        return status == 200 and got["ad_id"] == new["ad_id"]

    for u in owners.values():  # liveness only: how soon is `bench promises`' figure
        p.a.wait_until(lambda u=u: chooses_it(u), 30, f"{u}'s decision choosing the new ad")


def test_a_label_learned_on_one_worker_moves_the_other_workers_decisions(pair: Pair) -> None:
    """ctr-feedback for an ad is learned by the worker owning its partition; every
    worker's decisions read it (the strategy mirror). How soon is a benchmark
    figure (``adpulse bench promises``: label -> the other worker)."""
    p = pair
    ads = [ad(p.id(f"bandit-{i}"), "bandit2", 1.0, CATS[0]) for i in range(3)]
    known = {id(w): w.metric("adpulse_catalog_ads") for w in (p.a, p.b)}
    publish(p.settings.bootstrap, p.settings.topic("ad-catalog"), ads)
    for w in (p.a, p.b):  # in both workers' decision stage
        w.wait_until(lambda w=w: w.metric("adpulse_catalog_ads") >= known[id(w)] + 3, 30, "ads")
    winner = ads[1]["ad_id"]
    now = int(time.time() * 1000)
    for k in range(60):
        for a in ads:
            label = {"decision_id": p.id(f"past-{k}-{a['ad_id']}"), "ad_id": a["ad_id"],
                     "user_id": f"old{k}", "clicked": int(a["ad_id"] == winner),
                     "decision_ts": now - 60_000, "label_ts": now,
                     "features": {"interest": [], "placement": "bandit2", "pctr": 0.02},
                     "propensity": 1 / 3, "policy": "thompson(m=5)", "reason": "test"}  # fmt: skip
            p.producer.send(p.settings.topic("ctr-feedback"), key=a["ad_id"].encode(),
                            value=json.dumps(label).encode())  # fmt: skip
    p.producer.flush()
    for w in (p.a, p.b):  # one learner applied them; both workers' decisions read them
        w.wait_until(lambda w=w: _learned(w, winner) == (60, 60), 30, "the winner's labels")
    users = [p.id(f"reader{i}") for i in range(16)]
    for w in (p.a, p.b):
        chosen = [decide(w, body(p.id(f"bd-{id(w)}-{u}"), u, placement="bandit2"))[1]["ad_id"]
                  for u in users]  # fmt: skip
        assert sum(c == winner for c in chosen) >= 0.9 * len(users), chosen


def _learned(w: WorkerProcess, ad_id: str) -> tuple[float, float]:
    status, state = w.get(f"/ads/{ad_id}/strategy", authorized=False)
    return (state["shows"], state["clicks"]) if status == 200 else (0, 0)


@pytest.mark.long  # ~10 s, a worker of its own: make test stays under 10 minutes
def test_a_fresh_worker_answers_before_it_has_seen_any_event(
    settings: Settings, tmp_path: Path
) -> None:
    """A worker learns a topic's partition count when it first sends to it; one that
    had not yet applied a single user event could not find the owner of a user and
    answered /decide (and lookups) with a server error."""
    create_topics(settings)
    publish(settings.bootstrap, settings.topic("ad-catalog"), [ad("fresh-0", "fresh", 1.0, 7)])
    worker = WorkerProcess(settings, tmp_path, name="fresh", extra_env=EXTRA).start()
    try:
        worker.wait_until(lambda: worker.metric("adpulse_catalog_ads") == 1, 30, "catalog")
        status, got, _ = decide(worker, json.dumps(request("fresh-r", "nobody", "fresh")).encode())
        assert status == 200, got
        assert got["ad_id"] == "fresh-0"
        assert worker.get("/users/nobody/interest")[0] == 404  # unknown, not an error
        assert "Traceback" not in worker.log_path.read_text(errors="replace")
    finally:
        worker.stop()


def test_the_decide_port_answers_as_the_web_port_does(pair: Pair) -> None:
    """ADPULSE_DECIDE_PORT's lean server (streams/decideport.py): the same decisions, logged
    the same way, the same refusals, and forwarding from a non-owner."""
    p = pair
    users = [p.id(f"port{i}") for i in range(16)]
    for u in users:
        p.events(history(u, 3))
    mine = next(u for u in users if p.owner(u) is p.a)
    away = next(u for u in users if p.owner(u) is p.b)
    p.a.wait_until(lambda: _events_in(p.a, mine) == 3, 20, f"{mine}'s events")
    web = decide(p.a, body(p.id("pw"), mine))
    status, got, _ = decide(p.a, body(p.id("pd"), mine), port="decide")
    assert (web[0], status) == (200, 200)
    assert got["request_id"] == p.id("pd") and got["ad_id"] == web[1]["ad_id"]
    assert first_error("ad-decisions", got) is None
    before = p.a.metric("adpulse_decide_requests_total", 'outcome="forwarded"')
    status, fwd, _ = decide(p.a, body(p.id("pf"), away), port="decide")
    assert status == 200 and fwd["request_id"] == p.id("pf"), fwd
    assert p.a.metric("adpulse_decide_requests_total", 'outcome="forwarded"') > before
    p.decisions.wait([p.id("pd"), p.id("pf")])
    assert len(p.decisions.by_id[p.id("pd")]) == len(p.decisions.by_id[p.id("pf")]) == 1
    status, bad, _ = p.a.post("/decide", b"{not json", base=p.a.decide_url)
    assert status == 400 and bad["error"].startswith("ad-requests contract: ")
    status, refused, headers = p.a.post("/decide", body(p.id("pn"), mine), authorized=False,
                                        base=p.a.decide_url)  # fmt: skip
    assert status == 401 and "ADPULSE_API_TOKEN_FILE" in refused["error"]
    assert headers["WWW-Authenticate"].startswith("Bearer")
    with socket.create_connection(("127.0.0.1", p.a.settings.decide_port), 10) as s:
        s.sendall(b"POST /decide HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n")
        s.settimeout(10)
        assert s.recv(4096).startswith(b"HTTP/1.1 413 ")
