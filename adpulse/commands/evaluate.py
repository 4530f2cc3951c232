"""``adpulse evaluate LOG --policy NAME``: off-policy evaluation of a logged-decision file.

Reads the documented log formats (docs/evaluation.md, "Off-policy evaluation") and hands the
rounds to :mod:`scoring.ope`. Every malformed line ends in one InputError naming
the file and line; nothing is estimated from a partly read file.

JSONL, one round per line::

    {"context": {"segment": 3, "pctr": [0.1, 0.2]}, "actions": ["a", "b"],
     "action": "b", "reward": 1, "propensity": 0.5}

CSV: columns ``actions`` (JSON list), ``action``, ``reward``, ``propensity``,
optional ``position`` and ``propensities`` (JSON list), and the context either
as a ``context`` column (JSON object) or as ``x_NAME`` columns (a JSON list or
object, a number, or text). A JSONL line with ``decision_id`` and ``clicked`` is
adpulse's own ``ctr-feedback`` record; see :func:`feedback_rounds`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from adpulse.commands import Subparsers, add_command
from adpulse.core.errors import InputError
from adpulse.core.settings import Settings

if TYPE_CHECKING:  # scoring.ope needs numpy: imported in the readers, so --help stays fast
    from scoring.ope import LoggedRound

# Kept in step with scoring.ope.POLICIES (a test checks).
POLICY_HELP = "uniform, logged, greedy-feature:FEATURE, epsilon-greedy:EPS:FEATURE"
Format = Literal["jsonl", "csv"]
REQUIRED = ("actions", "action", "reward", "propensity")


class _Bad(ValueError):
    """A field is wrong; the reader adds file and line."""


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        msg = f"{name} {value!r} is not a number"
        raise _Bad(msg)
    try:
        x = float(value)
    except ValueError:
        msg = f"{name} {value!r} is not a number"
        raise _Bad(msg) from None
    if not math.isfinite(x):
        msg = f"{name} {value!r} is not finite"
        raise _Bad(msg)
    return x


def _round(rec: dict[str, Any]) -> LoggedRound:
    """One round from a JSON-like record (both formats end here)."""
    from scoring.ope import LoggedRound  # noqa: PLC0415

    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        msg = f"missing field(s) {', '.join(missing)} (need {', '.join(REQUIRED)})"
        raise _Bad(msg)
    actions = rec["actions"]
    if not isinstance(actions, list) or not actions:
        msg = f"actions must be a non-empty JSON list of action ids, got {actions!r:.60}"
        raise _Bad(msg)
    ids = tuple(str(a) for a in actions)
    if len(set(ids)) != len(ids):
        msg = "actions lists an action id twice"
        raise _Bad(msg)
    action = str(rec["action"])
    if action not in ids:
        msg = f"action {action!r} is not among actions {list(ids)!r:.60}"
        raise _Bad(msg)
    propensity = _number(rec["propensity"], "propensity")
    if not 0.0 < propensity <= 1.0:
        msg = f"propensity {propensity!r} must be in (0, 1] (logging probability of action)"
        raise _Bad(msg)
    context = rec.get("context", {})
    if not isinstance(context, dict):
        msg = "context must be a JSON object"
        raise _Bad(msg)
    position = rec.get("position")
    probs = rec.get("propensities")
    if probs is not None:
        if not isinstance(probs, list) or len(probs) != len(ids):
            msg = f"propensities must be a list of {len(ids)} numbers, one per action"
            raise _Bad(msg)
        probs = tuple(_number(x, "propensities item") for x in probs)
    return LoggedRound(
        context=context,
        actions=ids,
        action=action,
        reward=_number(rec["reward"], "reward"),
        propensity=propensity,
        position=None if position in (None, "") else int(_number(position, "position")),
        propensities=probs,
    )


def read_jsonl(path: Path) -> list[LoggedRound]:
    """Rounds from a JSONL log: the documented format or ctr-feedback records."""
    rounds: list[LoggedRound] = []
    feedback: list[tuple[int, dict[str, Any]]] = []
    with _open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    msg = "not a JSON object"
                    raise _Bad(msg)
                if "decision_id" in rec and "clicked" in rec:
                    feedback.append((lineno, rec))
                else:
                    rounds.append(_round(rec))
            except (ValueError, TypeError) as exc:
                msg = f"{path}:{lineno}: {exc}"
                raise InputError(msg) from None
    if rounds and feedback:
        msg = f"{path}:{feedback[0][0]}: mixes ctr-feedback records with logged rounds"
        raise InputError(msg)
    return rounds or feedback_rounds(path, feedback)


def feedback_rounds(path: Path, records: list[tuple[int, dict[str, Any]]]) -> list[LoggedRound]:
    """Rounds from ctr-feedback records (adpulse's own log).

    ctr-feedback does not log the candidate set. A record's ``actions`` are used
    when present; otherwise the candidates of a decision are taken to be every
    ad served at the same placement anywhere in the file. That assumption is
    exact for ``logged`` (IPS/SNIPS only read the logged propensity) and sound
    for a target that only picks ads the logger could have picked; a feature
    known only for the served ad (``features.pctr``) cannot rank the others.
    """
    pools: dict[str, set[str]] = defaultdict(set)
    for _, rec in records:
        feats = rec.get("features")
        placement = str(feats.get("placement", "")) if isinstance(feats, dict) else ""
        pools[placement].add(str(rec.get("ad_id")))
    rounds = []
    for lineno, rec in records:
        try:
            feats = rec.get("features", {})
            if not isinstance(feats, dict):
                msg = "features must be a JSON object"
                raise _Bad(msg)
            context = {k: v for k, v in rec.items() if k not in {"features", "clicked"}}
            context.update(feats)
            actions = rec.get("actions") or sorted(pools[str(feats.get("placement", ""))])
            rounds.append(
                _round(
                    {
                        "context": context,
                        "actions": actions,
                        "action": rec.get("ad_id"),
                        "reward": rec["clicked"],
                        "propensity": rec.get("propensity"),
                    }
                )
            )
        except (ValueError, TypeError, KeyError) as exc:
            msg = f"{path}:{lineno}: {exc}"
            raise InputError(msg) from None
    return rounds


def read_csv(path: Path) -> list[LoggedRound]:
    """Rounds from a CSV log (header row; context as ``context`` or ``x_*`` columns)."""
    rounds = []
    with _open(path) as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            lineno = reader.line_num
            try:
                rec: dict[str, Any] = {k: v for k, v in row.items() if k in REQUIRED}
                rec["actions"] = json.loads(row.get("actions") or "null")
                for key in ("position", "propensities"):
                    if row.get(key):
                        rec[key] = json.loads(row[key])
                if row.get("context"):
                    rec["context"] = json.loads(row["context"])
                else:
                    rec["context"] = {
                        k[2:]: _cell(v) for k, v in row.items() if k and k.startswith("x_")
                    }
                rounds.append(_round(rec))
            except (ValueError, TypeError) as exc:
                msg = f"{path}:{lineno}: {exc}"
                raise InputError(msg) from None
    return rounds


def _cell(text: str | None) -> Any:
    """An ``x_`` cell: JSON list/object, number, or the text itself."""
    text = text or ""
    if text[:1] in "[{" and text:
        return json.loads(text)
    try:
        return float(text)
    except ValueError:
        return text


def read_log(path: Path, fmt: Format | None = None) -> list[LoggedRound]:
    """Rounds from ``path``; the format defaults from the suffix (``.csv`` or JSONL)."""
    fmt = fmt or ("csv" if path.suffix.lower() == ".csv" else "jsonl")
    rounds = read_csv(path) if fmt == "csv" else read_jsonl(path)
    if not rounds:
        msg = f"{path}: no logged rounds in the file"
        raise InputError(msg)
    return rounds


def _open(path: Path) -> Any:
    try:
        return path.open(newline="", encoding="utf-8")
    except OSError as exc:
        msg = f"{path}: {exc.strerror or exc}"
        raise InputError(msg) from None


def _record(r: LoggedRound) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "context": dict(r.context),
        "actions": list(r.actions),
        "action": r.action,
        "reward": r.reward,
        "propensity": r.propensity,
    }
    if r.position is not None:
        rec["position"] = r.position
    if r.propensities is not None:
        rec["propensities"] = list(r.propensities)
    return rec


def write_jsonl(rounds: Iterable[LoggedRound], path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for r in rounds:
            fh.write(json.dumps(_record(r)) + "\n")


def write_csv(rounds: Iterable[LoggedRound], path: Path) -> None:
    """CSV with a ``context`` column (JSON); ``read_csv`` also takes ``x_*`` columns."""
    cols = ["context", "actions", "action", "reward", "propensity", "position", "propensities"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        out = csv.DictWriter(fh, fieldnames=cols)
        out.writeheader()
        for r in rounds:
            rec = _record(r)
            for key in ("context", "actions", "propensities"):
                if key in rec:
                    rec[key] = json.dumps(rec[key])
            out.writerow(rec)


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from scoring import ope  # noqa: PLC0415

    path = Path(args.log)
    try:
        policy = ope.make_policy(args.policy)
    except ValueError as exc:
        msg = f"--policy {args.policy}: {exc}"
        raise InputError(msg) from None
    rounds = read_log(path, args.format)
    try:
        model = ope.MeanReward.fit(rounds, by=args.reward_by)
        report = ope.evaluate(rounds, policy, model)
    except ValueError as exc:
        msg = f"{path}: {exc}"
        raise InputError(msg) from None
    print(f"policy {args.policy} on {report.n} logged rounds from {path}")
    print(f"{'estimator':<10}{'value':>10}  95% CI")
    for name, e in report.estimators():
        print(f"{name:<10}{e.value:>10.5f}  [{e.lo:.5f}, {e.hi:.5f}]")
    print(
        f"effective sample size {report.ess:.1f} of {report.n} ({report.ess / report.n:.1%}), "
        f"max weight {report.max_weight:.3g}; logged policy's mean reward {report.logged_mean:.5f}"
    )
    for flag in report.flags:
        print(f"warning: {flag}")
    if args.json:
        out = {"log": str(path), "policy": args.policy, **report.as_dict()}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def register(sub: Subparsers) -> None:
    p = add_command(
        sub,
        "evaluate",
        cmd_evaluate,
        help="estimate a policy's CTR on logged decisions (IPS, SNIPS, DR)",
        description="Off-policy evaluation: the expected reward a target policy would have had "
        "on logged decisions, by IPS, self-normalised IPS and doubly robust, with 95%% "
        "intervals and the effective sample size. Formats: docs/evaluation.md, 'Off-policy "
        "evaluation'.",
    )
    p.add_argument("log", metavar="LOG", help="logged rounds (JSONL, CSV, or ctr-feedback JSONL)")
    p.add_argument("--policy", required=True, metavar="NAME", help=f"target: {POLICY_HELP}")
    p.add_argument(
        "--format", choices=["jsonl", "csv"], help="log format (default: from the suffix)"
    )
    p.add_argument(
        "--reward-by",
        metavar="FEATURE",
        help="DR reward model: mean reward per action and value of this context feature "
        "(default: per action)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the estimates as JSON here")
