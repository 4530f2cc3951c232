"""Scorer plumbing: device fallback, micro-batching, the fallback rule."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from scoring import scorer as scorer_module
from scoring.scorer import CPU, FallbackRule, providers_for


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


def test_fallback_rule_replaces_non_finite_scores_with_the_prior() -> None:
    rule = FallbackRule(prior_ctr=0.04)
    ok, used = rule.guard(np.array([0.1, 0.2], dtype=np.float32), 2)
    assert not used and ok[1] == np.float32(0.2)
    bad, used = rule.guard(np.array([0.1, np.inf], dtype=np.float32), 2)
    assert used and np.all(bad == np.float32(0.04)) and rule.policy == "fallback:prior"
    none, used = rule.guard(None, 3)
    assert used and none.shape == (3,)


def test_fallback_guard_refuses_every_score_outside_unit_interval() -> None:
    """The guard's two reductions refuse what the elementwise check refused: NaN, either
    infinity, below 0, above 1; an empty request's scores pass as they are."""
    rule = FallbackRule(prior_ctr=0.03)
    for bad in (np.nan, np.inf, -np.inf, -0.01, 1.01):
        got, used = rule.guard(np.array([0.5, bad, 0.2], dtype=np.float32), 3)
        assert used and got.tolist() == pytest.approx([0.03] * 3)
    edge = np.array([0.0, 1.0], dtype=np.float32)
    got, used = rule.guard(edge, 2)
    assert not used and got is edge
    empty = np.zeros(0, dtype=np.float32)
    got, used = rule.guard(empty, 0)
    assert not used and len(got) == 0
