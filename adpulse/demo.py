"""``make demo``: the whole engine on the real Taobao sample, on one machine.

Starts the embedded broker unless a bootstrap server is configured, creates the
topics, starts a worker, publishes a catalog of ads in the sample's categories,
replays the sample, asks for ads for its users and shows what the engine did:
what landed, the users' interest vectors, and the decisions with their latency.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from adpulse import replay
from adpulse.broker import broker_for
from adpulse.catalogtool import publish, synthetic_ads
from adpulse.errors import InputError
from adpulse.inspect import read_topic
from adpulse.kafkaconf import client_kwargs
from adpulse.settings import Settings
from adpulse.topics import create_topics
from adpulse.workerproc import WorkerProcess

TAOBAO_FILE = "taobao_userbehavior_sample.csv"


def run_demo(settings: Settings, data: Path, out: Path) -> int:
    sample = data / TAOBAO_FILE
    if not sample.is_file():
        msg = f"{sample}: sample data not found; pass --data FOLDER (see README)"
        raise InputError(msg)
    out.mkdir(parents=True, exist_ok=True)
    with broker_for(settings) as b, tempfile.TemporaryDirectory(prefix="adpulse-demo-") as tmp:
        s = b.with_(app_id=f"adpulse-demo-{int(time.time())}", data_dir=Path(tmp) / "data")
        for name, outcome in create_topics(s):
            print(f"  topic {name}: {outcome}")
        worker = WorkerProcess(s, out, name="demo-worker")
        print(f"starting a worker (log: {worker.log_path}) ...")
        worker.start()
        try:
            print(f"worker ready; metrics at {worker.url}/metrics")
            # Replayed as if it just happened: 2017's interests decayed to nothing by now.
            events = replay.rebased(replay.read_taobao(sample), int(time.time() * 1000))
            ads = synthetic_ads(200, [e.category_id for e in events], seed=1)
            publish(s, s.topic("ad-catalog"), ads)
            print(f"published {len(ads)} ads over the sample's categories to ad-catalog")
            t0 = time.perf_counter()
            sent = replay.produce(events, s, s.topic("user-events"))
            elapsed = time.perf_counter() - t0
            print(
                f"replayed {sent} real Taobao events into {s.topic('user-events')} "
                f"in {elapsed:.2f}s ({sent / elapsed:,.0f} events/s)"
            )
            landed = read_topic(s, s.topic("user-events"), expect=sent, idle_s=1.0)
            summary = summarise(landed)
            users = sorted({e.user_id for e in events})
            worker.wait_until(lambda: _all_applied(worker, events), 60, "the sample applied")
            summary["interest"] = _interest_summary(worker, users)
            summary["decisions"] = _ask_for_ads(s, users)
        finally:
            worker.stop()
    print(format_summary(summary))
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=True))
    print(f"summary written to {path}")
    return 0


def _all_applied(worker: WorkerProcess, events: list[replay.Event]) -> bool:
    per_user = Counter(e.user_id for e in events)
    for user, n in per_user.items():
        body = worker.interest(user)
        if body is None or sum(body["counts"].values()) != n:
            return False
    return True


def _interest_summary(worker: WorkerProcess, users: list[str]) -> dict[str, Any]:
    bodies = {u: worker.interest(u) for u in users}
    example = users[0]
    body = bodies[example] or {}
    return {
        "users_with_state": sum(b is not None for b in bodies.values()),
        "example_user": example,
        "example_counts": body.get("counts"),
        "example_top_categories": body.get("top_categories"),
        "example_vector_head": [round(x, 4) for x in body.get("vector_now", [])[:6]],
    }


def _ask_for_ads(s: Settings, users: list[str], per_user: int = 5) -> dict[str, Any]:
    """Requests spread over a few seconds (about 80/s); read the decisions back."""
    from kafka import KafkaProducer  # noqa: PLC0415 - slow import

    producer = KafkaProducer(**client_kwargs(s), linger_ms=0, acks=1)
    n = 0
    for round_ in range(per_user):
        for user in users:
            req = {
                "request_id": f"demo-{round_}-{user}", "user_id": user, "placement": "home",
                "ts": int(time.time() * 1000), "context": {"device": "mobile"},
            }  # fmt: skip
            producer.send(s.topic("ad-requests"), key=user.encode(), value=json.dumps(req).encode())
            n += 1
            time.sleep(0.012)
        producer.flush()
    producer.close()
    records = read_topic(s, s.topic("ad-decisions"), expect=n, idle_s=1.0)
    decisions = [json.loads(r.value or b"{}") for r in records]
    latency = sorted(d["latency_ms"] for d in decisions)
    filled = [d for d in decisions if d.get("ad_id")]
    return {
        "requests": n,
        "decisions": len(decisions),
        "filled": len(filled),
        "policies": dict(Counter(d["policy"] for d in decisions)),
        "latency_p50_ms": round(latency[len(latency) // 2], 2) if latency else None,
        "latency_max_ms": round(latency[-1], 2) if latency else None,
        "example": filled[0] if filled else None,
    }


def summarise(records: list) -> dict[str, object]:  # type: ignore[type-arg]
    kinds: Counter[str] = Counter()
    partitions: Counter[int] = Counter()
    users = set()
    for r in records:
        msg = json.loads(r.value)
        kinds[msg["kind"]] += 1
        users.add(msg["user_id"])
        partitions[r.partition] += 1
    return {
        "messages": len(records),
        "users": len(users),
        "by_kind": dict(sorted(kinds.items())),
        "by_partition": {str(p): n for p, n in sorted(partitions.items())},
    }


def format_summary(summary: dict[str, object]) -> str:
    lines = [
        "what landed on user-events (read back from the broker):",
        f"  messages  {summary['messages']:>6}",
        f"  users     {summary['users']:>6}",
    ]
    by_kind = summary["by_kind"]
    assert isinstance(by_kind, dict)
    lines += [f"  {k:9s} {n:>6}" for k, n in by_kind.items()]
    by_partition = summary["by_partition"]
    assert isinstance(by_partition, dict)
    lines.append("  partitions " + " ".join(f"p{p}={n}" for p, n in by_partition.items()))
    interest = summary.get("interest")
    if isinstance(interest, dict):
        lines += [
            "interest state (GET /users/{id}/interest):",
            f"  users with a vector  {interest['users_with_state']}",
            f"  user {interest['example_user']}: counts {interest['example_counts']}",
            f"    top categories {interest['example_top_categories']}",
            f"    vector now (first 6 of 64) {interest['example_vector_head']}",
        ]
    decisions = summary.get("decisions")
    if isinstance(decisions, dict):
        lines += [
            "ad decisions (read back from ad-decisions):",
            f"  requests {decisions['requests']}, decisions {decisions['decisions']}, "
            f"filled {decisions['filled']}, policies {decisions['policies']}",
            f"  latency request->decision p50 {decisions['latency_p50_ms']} ms, "
            f"max {decisions['latency_max_ms']} ms",
            f"  example {json.dumps(decisions['example'])}",
        ]
    return "\n".join(lines)
