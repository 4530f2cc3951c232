"""``adpulse report``: per-arm (or per-policy) CTR and CVR from ctr-feedback, with intervals.

Counting, from the joiner's contract (docs/design.md, "Feedback labels"): a decision's
*label* is its record without ``converted: 1`` (clicked 0 or 1): one per
decision, so labels are impressions and their ``clicked`` are clicks; a record
with ``converted: 1`` is a conversion of a clicked decision. A decision id seen
twice (the joiner's one duplicate window after a crash) counts once. Records
are grouped by ``arm`` when any carries one, else by ``policy``. The maths
(Wilson intervals, the pooled two-proportion z-test against the control) is
:func:`scoring.strategy.ab.compare`.

>>> t = tally([{"decision_id": "a", "clicked": 1, "arm": "x"},
...            {"decision_id": "b", "clicked": 0, "arm": "x"},
...            {"decision_id": "a", "clicked": 1, "converted": 1, "arm": "x"}])
>>> t.by, t.counts
('arm', {'x': [2, 1, 1]})
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adpulse.core.errors import InputError
from scoring.strategy.ab import compare


@dataclass
class Tally:
    by: str = "policy"  # "arm" or "policy"
    counts: dict[str, list[int]] = field(default_factory=dict)  # group -> [imp, clicks, conv]
    policies: dict[str, str] = field(default_factory=dict)  # arm -> its policy
    duplicates: int = 0


class _Bad(ValueError):
    """A record breaks the contract; the reader adds where it came from."""


def tally(records: Iterable[dict[str, Any]], where: Iterable[str] | None = None) -> Tally:
    """Counts per group; ``where`` names each record's origin for error messages."""
    recs = list(records)
    places = list(where) if where is not None else [f"record {i + 1}" for i in range(len(recs))]
    out = Tally(by="arm" if any("arm" in r for r in recs if isinstance(r, dict)) else "policy")
    labelled: set[str] = set()
    converted: set[str] = set()
    for rec, place in zip(recs, places, strict=True):
        try:
            did, clicked, conv, group, policy = _fields(rec, out.by)
        except _Bad as exc:
            msg = f"{place}: {exc}"
            raise InputError(msg) from None
        row = out.counts.setdefault(group, [0, 0, 0])
        if policy and out.by == "arm":
            out.policies.setdefault(group, policy)
        seen = converted if conv else labelled
        if did in seen:
            out.duplicates += 1
            continue
        seen.add(did)
        if conv:
            row[2] += 1
        else:
            row[0] += 1
            row[1] += clicked
    return out


def _fields(rec: Any, by: str) -> tuple[str, int, bool, str, str]:
    if not isinstance(rec, dict):
        msg = f"expected a ctr-feedback JSON object, got {type(rec).__name__}"
        raise _Bad(msg)
    did, clicked = rec.get("decision_id"), rec.get("clicked")
    if not isinstance(did, str) or not did:
        msg = "no decision_id: not a ctr-feedback record"
        raise _Bad(msg)
    if clicked not in (0, 1) or isinstance(clicked, bool):
        msg = f"clicked must be 0 or 1, got {clicked!r:.40}"
        raise _Bad(msg)
    conv = rec.get("converted", 0)
    if conv not in (0, 1) or isinstance(conv, bool):
        msg = f"converted must be 0 or 1, got {conv!r:.40}"
        raise _Bad(msg)
    policy = rec.get("policy", "")
    group = rec.get(by, "(none)") if by == "arm" else policy or "(none)"
    if not isinstance(group, str) or not isinstance(policy, str):
        msg = f"{by} must be a string"
        raise _Bad(msg)
    return did, int(clicked), conv == 1, group, policy


def rows(t: Tally, control: str | None = None) -> list[dict[str, Any]]:
    """Per group, control first: :func:`scoring.strategy.ab.compare`'s rows."""
    if not t.counts:
        return []
    names = sorted(t.counts)
    if control is None:
        control = "control" if "control" in t.counts else names[0]
    if control not in t.counts:
        article = "an" if t.by == "arm" else "a"
        msg = f"control {control!r} is not {article} {t.by} in the records: {', '.join(names)}"
        raise InputError(msg)
    names.remove(control)
    names.insert(0, control)
    counts = np.array([t.counts[n] for n in names], dtype=np.int64)
    policies = [t.policies.get(n, n if t.by == "policy" else "") for n in names]
    return compare(names, counts, policies)


def read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) per non-blank line; InputError naming file and line when not JSON."""
    try:
        fh = path.open(encoding="utf-8")
    except OSError as exc:
        msg = f"{path}: cannot read ({exc.strerror})"
        raise InputError(msg) from None
    with fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    yield f"{path}:{lineno}", _json(line, f"{path}:{lineno}")
        except UnicodeDecodeError:
            msg = f"{path}: not UTF-8 text; expected JSONL of ctr-feedback records"
            raise InputError(msg) from None


def _json(text: str | bytes, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        msg = f"{where}: not JSON ({exc}); expected one ctr-feedback record per line"
        raise InputError(msg) from None


def read_feedback_topic(target: Any, topic: str, timeout_s: float = 30.0) -> list[tuple[str, Any]]:
    """(where, record) for every record of the topic, read from the beginning."""
    from adpulse.inspect import read_topic  # noqa: PLC0415 - Kafka client import is slow

    return [
        (f"{topic} p{r.partition} @{r.offset}", _json(r.value or b"null", f"{topic} @{r.offset}"))
        for r in read_topic(target, topic, idle_s=1.0, timeout_s=timeout_s)
    ]


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.2f}%"


def _ci(ci: tuple[float, float]) -> str:
    return f"[{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"


def format_table(table: list[dict[str, Any]], by: str) -> str:
    head = (
        f"{by:<12} {'policy':<24} {'impr':>8} {'clicks':>7} {'CTR':>7} {'95% CI':>16} "
        f"{'conv':>5} {'CVR':>7} {'95% CI':>16} {'dCTR':>8} {'p':>7}"
    )
    lines = [head]
    for r in table:
        diff = "control" if r["control"] else f"{100 * r['ctr_diff']:+.2f}pp"
        p = "" if r["control"] else f"{r['ctr_p']:.2g}"
        lines.append(
            f"{r['arm']:<12.12} {r['policy']:<24.24} {r['impressions']:>8} {r['clicks']:>7} "
            f"{_pct(r['ctr']):>7} {_ci(r['ctr_ci']):>16} {r['conversions']:>5} "
            f"{_pct(r['cvr']):>7} {_ci(r['cvr_ci']):>16} {diff:>8} {p:>7}"
        )
    return "\n".join(lines)
