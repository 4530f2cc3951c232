"""``adpulse bench NAME`` without size flags runs the bench at its own defaults: every size
flag's default is the matching field's default in the bench's config."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from adpulse.commands.bench import BENCHES, Bench

CONFIGS = {
    "features": ("features", "FeaturesBench"), "serve": ("serve", "ServeBench"),
    "decisions": ("decisions", "DecisionsBench"), "state": ("state", "StateBench"),
    "mixed": ("mixed", "MixedBench"), "promises": ("promises", "PromisesBench"),
    "rebalance": ("rebalance", "RebalanceBench"), "broker": ("broker", "BrokerBench"),
    "startup": ("startup", "StartupBench"), "eos": ("eos", "EosBench"),
    "catalog-join": ("catalogjoin", "CatalogJoinBench"), "adtext": ("adtext", "AdTextBench"),
    "seq-scorer": ("seqscorer", "SeqScorerBench"), "gaps": ("gaps", "GapsBench"),
    "secondary": ("secondary", "SecondaryBench"),
}  # fmt: skip
FIELD = {"repeat": "repeats", "duration": "duration_s", "window": "window_s",
         "session_timeout": "session_timeout_s", "delay": "delay_s"}  # fmt: skip


@pytest.mark.parametrize("spec", [b for b in BENCHES if b.sizes], ids=lambda b: b.name)
def test_each_size_flag_defaults_to_the_bench_config_default(spec: Bench) -> None:
    module, cls = CONFIGS[spec.name]
    config = getattr(importlib.import_module(f"adpulse.bench.{module}"), cls)
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for flag, (default, _help) in spec.sizes.items():
        assert defaults[FIELD.get(flag, flag)] == default, flag
