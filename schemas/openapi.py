"""The worker's HTTP API as an OpenAPI 3.1 document, built from the topic contracts.

``POST /decide`` takes an ``ad-requests`` message and answers an ``ad-decisions``
one, so its request and response schemas *are* those JSON Schemas (OpenAPI 3.1
schemas are JSON Schema 2020-12; each keeps its ``$id``, so its ``#/$defs``
references resolve inside it). ``schemas/openapi.json`` is this document, checked
in; ``python -m schemas.openapi > schemas/openapi.json`` rewrites it and a test
holds the two equal. The worker serves it at ``GET /openapi.json``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from schemas import load_schema

VERSION = "1"


def _error(description: str, retry: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry:
        out["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "integer", "minimum": 0},
            }
        }
    return out


def _json(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def openapi() -> dict[str, Any]:
    """The document (deterministic: the same schemas give the same bytes)."""
    request, decision = load_schema("ad-requests"), load_schema("ad-decisions")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "adpulse worker",
            "version": VERSION,
            "description": "Real-time ad decisions and the worker's state. Every worker "
            "serves every path; a worker that does not own the user's partition forwards "
            "POST /decide to the one that does. Bound to loopback unless ADPULSE_WEB_HOST "
            "says otherwise.",
        },
        "paths": {
            "/decide": {
                "post": {
                    "operationId": "decide",
                    "security": [{"bearer": []}],
                    "summary": "One ad decision for one request, answered synchronously.",
                    "description": "The decision is also written to the ad-decisions topic "
                    "(the answer does not wait for the broker's acknowledgement). A request "
                    "whose tmax_ms (default ADPULSE_DECIDE_TMAX_MS) is used up before it is "
                    "scored gets a no fill with no_fill_reason deadline.",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/AdRequest"}
                            }
                        },
                    },
                    "responses": {
                        "200": _json("AdDecision", "The decision (ad_id null: no fill)."),
                        "400": _error("The body breaks the ad-requests contract."),
                        "401": _error("No or a wrong bearer token (ADPULSE_API_TOKEN_FILE)."),
                        "503": _error(
                            "Shed (overloaded, or giving way to ingest), recovering, or the "
                            "user's partition is moving: retry after Retry-After seconds.",
                            retry=True,
                        ),
                    },
                }
            },
            "/owners": {
                "get": {
                    "operationId": "owners",
                    "summary": "Which worker owns each partition of ad-requests, so a client "
                    "can send a user's POST /decide to its owner and skip the forward.",
                    "description": "A user's partition is Kafka's default for a keyed record: "
                    "(murmur2(user_id as UTF-8) & 0x7fffffff) % partitions. A partition no "
                    "worker holds (a rebalance under way) is left out and complete is false; "
                    "send such users to any worker, which forwards them.",
                    "responses": {"200": _json("Owners", "The group's assignment.")},
                }
            },
            "/users/{user_id}/interest": {
                "get": {
                    "operationId": "userInterest",
                    "summary": "A user's interest state, by the raw user id.",
                    "parameters": [_path("user_id")],
                    "security": [{"bearer": []}],
                    "responses": {
                        "200": {"description": "The decoded interest state."},
                        "401": _error("No or a wrong bearer token."),
                        "404": _error("No state for this user."),
                    },
                }
            },
            "/pseudonyms/{pseudonym}/interest": {
                "get": {
                    "operationId": "pseudonymInterest",
                    "summary": "A user's interest state, by pseudonym (this worker's "
                    "partitions only).",
                    "parameters": [_path("pseudonym")],
                    "security": [{"bearer": []}],
                    "responses": {
                        "200": {"description": "The decoded interest state."},
                        "401": _error("No or a wrong bearer token."),
                        "404": _error("No state for this pseudonym here."),
                    },
                }
            },
            "/ads/{ad_id}/strategy": {
                "get": {
                    "operationId": "adStrategy",
                    "summary": "The learner counts the decisions read for one ad.",
                    "parameters": [_path("ad_id")],
                    "responses": {
                        "200": {"description": "Shows, clicks, per-segment counts."},
                        "404": _error("No labels for this ad."),
                    },
                }
            },
            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "200 when serving; 503 while recovering, loading the catalog, "
                    "without a broker, or with a stalled consumer.",
                    "responses": {
                        "200": {"description": "Serving."},
                        "503": {"description": "Not serving yet, or not any more."},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics (text exposition format).",
                    "responses": {"200": {"description": "The metrics."}},
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document.",
                    "responses": {"200": {"description": "The OpenAPI document."}},
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The content of ADPULSE_API_TOKEN_FILE, the same on every "
                    "worker.",
                }
            },
            "schemas": {
                "AdRequest": request,
                "AdDecision": decision,
                "Owners": {
                    "type": "object",
                    "required": ["topic", "partitions", "partitioner", "owners", "complete"],
                    "properties": {
                        "topic": {"type": "string", "description": "The ad-requests topic."},
                        "partitions": {"type": "integer", "minimum": 1},
                        "partitioner": {"const": "murmur2"},
                        "owners": {
                            "type": "object",
                            "description": "Partition number (a string) -> the owner's "
                            "canonical URL (ADPULSE_CANONICAL_URL).",
                            "additionalProperties": {"type": "string"},
                        },
                        "complete": {
                            "type": "boolean",
                            "description": "Every partition has an owner.",
                        },
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {"type": "string", "description": "What went wrong, one line."}
                    },
                },
            }
        },
    }


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def dumps() -> str:
    return json.dumps(openapi(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(dumps())
