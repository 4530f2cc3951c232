"""The benches' shared request generator: what ``bench decisions`` and ``bench mixed`` offer."""

from __future__ import annotations

import json

import numpy as np

from adpulse.bench.requests import PoissonRequests
from schemas import first_error


def test_poisson_requests_are_valid_ad_requests_once_their_ts_is_filled_in() -> None:
    ads = [f"ad-{i}" for i in range(50)]
    reqs = PoissonRequests.build(np.random.default_rng(1), 200.0, 0.5, 30, ads, 10, "r0-")
    assert len(reqs) == 100 and len(reqs.keys) == 100
    assert np.all(np.diff(reqs.arrivals) > 0)
    for i, (head, tail) in enumerate(reqs.bodies):
        body = json.loads(head + b'"ts": 1764500000000' + tail)
        assert first_error("ad-requests", body) is None
        assert body["request_id"] == f"r0-{i}"
        assert reqs.keys[i] == body["user_id"].encode()
        assert len(set(body["candidates"])) == 10


def test_the_same_seed_gives_the_same_requests() -> None:
    ads = [f"ad-{i}" for i in range(20)]
    a, b = (PoissonRequests.build(np.random.default_rng(7), 50.0, 1.0, 5, ads, 3, "x-")
            for _ in range(2))  # fmt: skip
    assert a.bodies == b.bodies and a.keys == b.keys
    assert np.array_equal(a.arrivals, b.arrivals)
