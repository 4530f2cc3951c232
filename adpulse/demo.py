"""``make demo``: the whole engine on the real Taobao sample, on one machine.

Starts the embedded broker unless a bootstrap server is configured, creates the
topics, replays the sample and reads it back to show exactly what landed.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from adpulse import replay
from adpulse.broker import broker_for
from adpulse.errors import InputError
from adpulse.inspect import read_topic
from adpulse.settings import Settings
from adpulse.topics import create_topics

TAOBAO_FILE = "taobao_userbehavior_sample.csv"


def run_demo(settings: Settings, data: Path, out: Path) -> int:
    sample = data / TAOBAO_FILE
    if not sample.is_file():
        msg = f"{sample}: sample data not found; pass --data FOLDER (see README)"
        raise InputError(msg)
    out.mkdir(parents=True, exist_ok=True)
    with broker_for(settings) as s:
        for name, outcome in create_topics(s):
            print(f"  topic {name}: {outcome}")
        events = replay.read_taobao(sample)
        t0 = time.perf_counter()
        sent = replay.produce(events, s.bootstrap, s.topic("user-events"))
        elapsed = time.perf_counter() - t0
        print(
            f"replayed {sent} real Taobao events into {s.topic('user-events')} "
            f"in {elapsed:.2f}s ({sent / elapsed:,.0f} events/s)"
        )
        landed = read_topic(s.bootstrap, s.topic("user-events"), expect=sent, idle_s=1.0)
        summary = summarise(landed)
    print(format_summary(summary))
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=True))
    print(f"summary written to {path}")
    return 0


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
    return "\n".join(lines)
