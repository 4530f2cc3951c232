"""Scorer plumbing: device fallback, micro-batching, the fallback rule."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from scoring import scorer as scorer_module
from scoring.featurespec import FeatureSpec
from scoring.scorer import CPU, FallbackRule, MicroBatcher, providers_for

FS = FeatureSpec(dim=8)


class _RowIndex:
    """A scorer that returns each row's first user value, so results are traceable."""

    version, provider = "test", "fake"

    def __init__(self) -> None:
        self.batches: list[int] = []

    def score(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        self.batches.append(len(inputs["user"]))
        return inputs["user"][:, 0].astype(np.float32)


def _request(tag: float, rows: int) -> dict[str, np.ndarray]:
    x = FS.golden_inputs(rows)
    x["user"][:, 0] = tag + np.arange(rows) / 1000
    return x


def test_cuda_without_a_gpu_falls_back_to_cpu_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="scoring.scorer"):
        providers = providers_for("cuda", available=[CPU])
    assert providers == [CPU]
    assert "scoring on CPU" in caplog.text


def test_auto_uses_cuda_where_a_gpu_is_present_and_cpu_where_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    have = [CPU, "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    monkeypatch.setattr(scorer_module, "tensorrt_present", lambda: True)
    assert providers_for("auto", have, gpu=True) == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        CPU,
    ]
    monkeypatch.setattr(scorer_module, "tensorrt_present", lambda: False)
    assert providers_for("auto", have, gpu=True) == ["CUDAExecutionProvider", CPU]
    assert providers_for("auto", have, gpu=False) == [CPU]
    assert providers_for("cpu", have, gpu=True) == [CPU]


def test_cuda_requested_on_a_machine_without_gpu_warns_and_uses_cpu(
    caplog: pytest.LogCaptureFixture,
) -> None:
    have = [CPU, "CUDAExecutionProvider"]
    with caplog.at_level(logging.WARNING, logger="scoring.scorer"):
        assert providers_for("cuda", have, gpu=False) == [CPU]
    assert "no NVIDIA GPU found" in caplog.text


def test_micro_batcher_returns_each_caller_its_own_rows() -> None:
    fake = _RowIndex()

    async def main() -> list[np.ndarray]:
        b = MicroBatcher(fake, max_rows=10_000, max_wait_ms=5)
        return await asyncio.gather(*(b.score(_request(t, 3 + t)) for t in range(5)))

    results = asyncio.run(main())
    assert fake.batches == [sum(3 + t for t in range(5))]
    for t, r in enumerate(results):
        assert np.allclose(r, t + np.arange(3 + t) / 1000)


def test_micro_batcher_never_exceeds_max_rows() -> None:
    fake = _RowIndex()

    async def main() -> list[np.ndarray]:
        b = MicroBatcher(fake, max_rows=25, max_wait_ms=50)
        return await asyncio.gather(*(b.score(_request(t, 10)) for t in range(7)))

    results = asyncio.run(main())
    assert max(fake.batches) <= 25 and sum(fake.batches) == 70
    assert all(np.allclose(r, t + np.arange(10) / 1000) for t, r in enumerate(results))


def test_a_scoring_error_reaches_every_waiting_caller() -> None:
    class Broken(_RowIndex):
        def score(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
            raise RuntimeError("boom")

    async def main() -> list[object]:
        b = MicroBatcher(Broken(), max_rows=100, max_wait_ms=1)
        return await asyncio.gather(
            *(b.score(_request(0, 2)) for _ in range(3)), return_exceptions=True
        )

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(main()))


def test_fallback_rule_replaces_non_finite_scores_with_the_prior() -> None:
    rule = FallbackRule(prior_ctr=0.04)
    ok, used = rule.guard(np.array([0.1, 0.2], dtype=np.float32), 2)
    assert not used and ok[1] == np.float32(0.2)
    bad, used = rule.guard(np.array([0.1, np.inf], dtype=np.float32), 2)
    assert used and np.all(bad == np.float32(0.04)) and rule.policy == "fallback:prior"
    none, used = rule.guard(None, 3)
    assert used and none.shape == (3,)
