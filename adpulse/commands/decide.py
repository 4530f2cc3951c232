"""``adpulse decide``: ask a worker for one decision over ``POST /decide`` and print it."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from adpulse.commands import Subparsers, add_command
from adpulse.core.errors import InputError, WorkerUnavailable
from adpulse.core.privacy import load_api_token
from adpulse.core.settings import Settings


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {
        "request_id": args.request_id or f"cli-{uuid.uuid4().hex[:12]}",
        "user_id": args.user_id,
        "placement": args.placement,
        "ts": int(time.time() * 1000),
    }
    context = {k: v for k, v in (("device", args.device), ("country", args.country)) if v}
    if context:
        body["context"] = context
    if args.candidates:
        body["candidates"] = [c for c in args.candidates.split(",") if c]
    if args.tmax_ms is not None:
        body["tmax_ms"] = args.tmax_ms
    return body


def post_decide(
    url: str, body: bytes, token: bytes | None, timeout_s: float = 10.0
) -> tuple[int, dict[str, Any]]:
    """Status and JSON answer of one ``POST /decide``; a worker that does not answer raises."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token.decode()}"
    req = urllib.request.Request(url.rstrip("/") + "/decide", body, headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = {"error": raw.decode(errors="replace")[:200]}
        return int(e.code), answer
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        msg = f"no worker answered at {url}: {reason} (is `adpulse worker` running there?)"
        raise WorkerUnavailable(msg) from None


def cmd_decide(args: argparse.Namespace, settings: Settings) -> int:
    port = settings.decide_port or settings.web_port  # the lean /decide server, if there is one
    url = args.url or f"http://{settings.web_host}:{port}"
    token = load_api_token(settings)  # ADPULSE_API_TOKEN_FILE, as the worker's
    status, answer = post_decide(url, json.dumps(request_body(args)).encode(), token)
    if status != 200:
        msg = f"{url}/decide answered {status}: {answer.get('error', answer)}"
        if status == 401:
            msg = f"{url}/decide answered 401: set ADPULSE_API_TOKEN_FILE to the workers' token"
        raise InputError(msg) if status in (400, 401) else WorkerUnavailable(msg)
    json.dump(answer, sys.stdout, indent=2 if args.pretty else None)
    print()
    return 0


def register(sub: Subparsers) -> None:
    p = add_command(
        sub,
        "decide",
        cmd_decide,
        help="ask a worker for one ad decision (POST /decide) and print it",
        description="Sends one ad request to a worker's POST /decide and prints the decision "
        "(the ad-decisions contract) as JSON. Any worker will do: one that does not own the "
        "user's partition forwards the request. Exit 4 for a request the contract refuses, "
        "8 when no worker answers or it is recovering or overloaded.",
    )
    p.add_argument("user_id", help="the user id as the app knows it (user-events.user_id)")
    p.add_argument("--placement", required=True, help="the slot to fill, e.g. home_banner")
    p.add_argument("--candidates", help="comma-separated ad ids allowed (default: all)")
    p.add_argument("--device", help="context.device: mobile, desktop, tablet, tv or other")
    p.add_argument("--country", help="context.country, ISO 3166-1 alpha-2, e.g. DE")
    p.add_argument("--tmax-ms", type=int, help="time budget in ms (default: the worker's)")
    p.add_argument("--request-id", help="the decision id (default: a random one)")
    p.add_argument(
        "--url",
        help="the worker's base URL (default: http://$ADPULSE_WEB_HOST:$ADPULSE_DECIDE_PORT, "
        "else $ADPULSE_WEB_PORT)",
    )
    p.add_argument("--pretty", action="store_true", help="indent the JSON")
