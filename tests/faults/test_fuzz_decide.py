"""Fuzzed ``POST /decide`` bodies over HTTP: 200, 400 or 503 as the contract says, never 500.

The same 10,000 Hypothesis-drawn ad-requests payloads as the topic fuzzing
(tests/faults/fuzzing.py), plus known-valid requests, are POSTed with the API
token to one real worker with production settings, a few dozen at a time over
keep-alive connections. Each answer must be a decision valid under the
ad-decisions schema (200), a one-line contract error (400) or a shed (503 with
Retry-After, which must become 200 or 400 when retried), and 200 against 400 must equal the
reference verdict for that body. The worker must log no traceback, count each
answer by its outcome, and send every decision it answered to ad-decisions.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from adpulse.catalogtool import publish
from adpulse.core.settings import Settings
from schemas import first_error
from streams.runtime.topicadmin import create_topics
from tests.faults.fuzzing import contract_verdict, valid_record
from tests.faults.kit import Reader, Worker
from tests.faults.test_fuzz import NOW_MS, corpus

CONCURRENCY = 32  # requests in flight at once
RETRIES = 10  # most times a client retries one shed request, Retry-After apart
PREFIX = "ad-requests contract: "
ADS = [valid_record("ad-catalog", i, NOW_MS) for i in range(7)]  # what valid requests name

Answer = tuple[int, bytes, str | None]  # status, body, Retry-After


def bodies() -> list[tuple[bytes, bool]]:
    """Each body and whether /decide must decide it (size, strict JSON, schema: no key, no
    clock rule over HTTP). Drawn once per session, shared with test_fuzz.py."""
    return [(v, contract_verdict("ad-requests", v)) for _, v, _ in corpus("ad-requests")]


async def post_all(url: str, token: str, payloads: list[bytes], concurrency: int) -> list[Answer]:
    """POST every body, ``concurrency`` at a time on one keep-alive session; answers in order."""
    answers: list[Answer] = [(0, b"", None)] * len(payloads)
    todo = iter(range(len(payloads)))
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=concurrency)

    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as s:

        async def client() -> None:
            for i in todo:  # shared: each index is taken by one client
                async with s.post(url, data=payloads[i]) as resp:
                    answers[i] = (resp.status, await resp.read(), resp.headers.get("Retry-After"))

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return answers


def retry_shed(url: str, token: str, payloads: list[bytes], answers: list[Answer]) -> int:
    """Retry each shed request as a client would, one at a time after its Retry-After, until
    it is answered (at most RETRIES times); the answers replace the 503s. How many rounds.

    One retry is usually enough; on a machine whose cores other work keeps busy the
    worker's event loop can run late while it is idle, which sheds a lone request too.
    """
    rounds = 0
    shed = [i for i, (status, _, _) in enumerate(answers) if status == 503]
    while shed and rounds < RETRIES:
        for i in shed:
            _, body, retry_after = answers[i]
            assert retry_after == "1" and json.loads(body)["error"], answers[i]
        time.sleep(1.0)  # bench-ok: what Retry-After says
        again = asyncio.run(post_all(url, token, [payloads[i] for i in shed], 1))
        for i, answer in zip(shed, again, strict=True):
            answers[i] = answer
        shed = [i for i in shed if answers[i][0] == 503]
        rounds += 1
    return rounds


def check(body: bytes, must_decide: bool, status: int, answer: bytes) -> str | None:
    """What is wrong with one answer, else None."""
    if status == 200:
        decision = json.loads(answer)
        if not must_decide:
            return "decided a body the contract refuses"
        problem = first_error("ad-decisions", decision)
        if problem is not None:
            return f"decision breaks ad-decisions: {problem}"
        request = json.loads(body)
        if decision["request_id"] != request["request_id"]:
            return "decision answers another request"
        if decision["user_id"] == request["user_id"]:
            return "decision carries the raw user id"
        return None
    if status == 400:
        error = json.loads(answer)
        if must_decide:
            return f"refused a valid body: {error}"
        if set(error) != {"error"} or not error["error"].startswith(PREFIX):
            return f"400 without a contract error: {error}"
        return "400 error spans lines" if "\n" in error["error"] else None
    return f"status {status}: {answer[:300]!r}"


@pytest.mark.integration
def test_decide_answers_each_fuzzed_body_by_the_contract_and_never_fails(
    settings: Settings, tmp_path: Path
) -> None:
    create_topics(settings)
    publish(settings.bootstrap, settings.topic("ad-catalog"), ADS)
    worker = Worker(settings, tmp_path, {})  # production settings: the rate limiter on
    decisions = Reader(settings, "ad-decisions")
    try:
        starting = threading.Thread(target=worker.start)
        starting.start()  # the worker starts while the corpus is drawn
        sent = bodies()
        starting.join()
        worker.wait_until(lambda: worker.metric("adpulse_catalog_ads") == len(ADS), 60, "catalog")
        warm = b'{"request_id": "warm", "user_id": "warm", "placement": "fz", "ts": 1}'

        def ready() -> bool:  # recovery done, partition map known: a decision comes back
            return worker.post("/decide", warm)[0] == 200

        worker.wait_until(ready, 60, "a first decision")
        payloads = [b for b, _ in sent]
        started = time.monotonic()
        answers = asyncio.run(post_all(worker.url + "/decide", worker.token, payloads, CONCURRENCY))
        elapsed = time.monotonic() - started
        shed = sum(status == 503 for status, _, _ in answers)
        rounds = retry_shed(worker.url + "/decide", worker.token, payloads, answers)
        statuses = Counter(status for status, _, _ in answers)
        print(
            f"\n{len(sent)} bodies in {elapsed:.1f}s ({len(sent) / elapsed:.0f}/s): "
            f"{dict(statuses)}; {shed} shed, answered after {rounds} round(s) of retries"
        )

        wrong = [
            (why, body[:200])
            for (body, ok), (status, answer, _) in zip(sent, answers, strict=True)
            if (why := check(body, ok, status, answer)) is not None
        ]
        # Seen once in a fresh-clone CI under a load average of 7: every valid body got
        # 503 "no worker owns this user yet" for 10 retry rounds after a first decision
        # had come back; its cause is not known yet, so a failure carries the worker's log.
        assert not wrong, (
            f"{len(wrong)} answers break the contract, e.g. {wrong[:3]}\n"
            f"worker log:\n{worker.tail(120)}"
        )
        assert statuses[200] and statuses[400]
        assert any(answers[i][0] == 200 for i, (b, _) in enumerate(sent) if len(b) == 8192)
        assert any(json.loads(a)["ad_id"] for s, a, _ in answers if s == 200), "no ad served"
        assert worker.health() == 200
        assert "Traceback" not in worker.log_path.read_text(errors="replace")

        # Counted by outcome, and every decision answered (the warm-up's too) is on
        # ad-decisions, once.
        answered = Counter(json.loads(a)["request_id"] for s, a, _ in answers if s == 200)
        answered["warm"] += 1
        counted = {o: worker.metric("adpulse_decide_requests_total", f'outcome="{o}"')
                   for o in ("answered", "invalid")}  # fmt: skip
        assert counted == {"answered": answered.total(), "invalid": statuses[400]}
        decisions.until(lambda: len(decisions.records) >= answered.total(), 60, "the decisions")
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # bench-ok: a settle wait, for extra records
            decisions.poll()
        assert Counter(json.loads(r.value)["request_id"] for r in decisions.records) == answered
    finally:
        decisions.close()
        worker.stop()
