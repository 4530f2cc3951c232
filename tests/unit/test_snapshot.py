"""The decision's feature snapshot prints as a reader expects: rounded, no signed zeros."""

from __future__ import annotations

import msgspec
import numpy as np

from schemas.messages import AdRequest
from streams.decide import snapshot


def test_snapshot_rounds_the_vector_and_a_weight_that_rounds_away_is_zero_not_minus_zero() -> None:
    req = msgspec.json.decode(
        b'{"request_id": "r1", "user_id": "u1", "placement": "home", "ts": 1764500000000}',
        type=AdRequest,
    )
    vector = np.array([0.123456, -0.00004, -0.2, 0.00001], dtype=np.float32)
    ad = {"category_id": 7, "campaign_id": "c1"}
    got = snapshot(ad, vector, req, 1764500000000, 0.03).interest
    assert got == [0.1235, 0.0, -0.2, 0.0]
    assert b"-0.0" not in msgspec.json.encode(got)
