"""The HTTP API document: checked in, equal to what the contracts generate, and exact."""

from __future__ import annotations

import json

from schemas import SCHEMA_DIR, examples, first_error, load_schema
from schemas.openapi import dumps, openapi


def test_the_checked_in_document_is_the_generated_one() -> None:
    checked_in = (SCHEMA_DIR / "openapi.json").read_text(encoding="utf-8")
    assert checked_in == dumps(), "run: python -m schemas.openapi > schemas/openapi.json"


def test_decide_takes_an_ad_request_and_answers_an_ad_decision() -> None:
    doc = openapi()
    schemas = doc["components"]["schemas"]
    assert schemas["AdRequest"] == load_schema("ad-requests")
    assert schemas["AdDecision"] == load_schema("ad-decisions")
    post = doc["paths"]["/decide"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/AdRequest"}
    assert set(post["responses"]) == {"200", "400", "401", "503"}
    assert post["security"] == [{"bearer": []}]
    assert "Retry-After" in post["responses"]["503"]["headers"]
    json.dumps(doc, allow_nan=False)  # plain JSON


def test_the_contract_examples_still_hold_for_the_new_fields() -> None:
    for body in examples("ad-requests")[0]:
        assert first_error("ad-requests", {**body, "tmax_ms": 50}) is None
    assert first_error("ad-requests", {**examples("ad-requests")[0][0], "tmax_ms": 0})
    for body in examples("ad-decisions")[0]:
        if body["ad_id"] is None:
            assert first_error("ad-decisions", {**body, "no_fill_reason": "deadline"}) is None
