"""The worker's timers and background tasks: what runs on a clock, not on a batch.

Model hot-swap (the registry polled every ``ADPULSE_MODEL_POLL_S``), the catalog's
decision arrays rebuilt, the topic mirrors followed (item-catalog's too, with a text
model), and the gauges sampled (streams/runtime/gauges.py). The click join's window
timer sits with its handlers in streams/pipeline.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from scoring.registry import LoadedModel, ModelRegistry
from streams.catalog import CATALOG_REFRESH_S, CatalogCache
from streams.decide import DecideStage, ServingModels
from streams.runtime.gauges import (
    SAMPLE_S,
    sample_consumer_lag,
    sample_pacing,
    sample_table_keys,
    unread_changelog_partitions,
)

if TYPE_CHECKING:
    from streams.wiring import Wiring

log = logging.getLogger(__name__)


def wire(w: Wiring, models: ServingModels, catalog: CatalogCache, decide: DecideStage) -> None:
    @w.app.task
    async def mirror_catalog() -> None:
        await w.catalog.run()

    @w.app.task
    async def mirror_strategy() -> None:
        await w.strategy.run()

    @w.app.timer(CATALOG_REFRESH_S)
    async def refresh_catalog() -> None:
        await catalog.refresh_async()

    if w.items is not None:  # ADPULSE_TEXT_MODEL set: item-catalog (streams/items.py)
        items = w.items

        @w.app.task
        async def mirror_items() -> None:
            await items.mirror.run()

        @w.app.timer(CATALOG_REFRESH_S)
        async def refresh_items() -> None:
            await items.refresh_async()

    @w.app.timer(w.settings.model_poll_s)
    async def poll_models() -> None:
        loaded = await asyncio.to_thread(models.registry.poll)
        models.canary = models.registry.canary
        if loaded is not None:
            models.swap(loaded, w.settings.fallback_ctr)
            _model_in_use(w, loaded)
            w.metrics.model_swaps.labels("swapped").inc()

    w.metrics.unread_changelogs.set_function(lambda: unread_changelog_partitions(w.app))
    lag_labelled: set[tuple[str, str]] = set()
    pacing_labelled: set[str] = set()

    @w.app.timer(SAMPLE_S)
    async def sample_gauges() -> None:
        sample_consumer_lag(w.app, w.metrics, lag_labelled)
        sample_table_keys((w.interest, w.freqcap, w.spend), w.metrics)
        sample_pacing(decide.budget.gauges(int(time.time() * 1000)), w.metrics, pacing_labelled)
        w.metrics.calibration_labels.set(decide.calibration.labels)


def load_models(w: Wiring) -> ServingModels:
    def refused(version: str, reason: str) -> None:
        log.error("model %s refused, current model keeps serving: %s", version, reason)
        w.metrics.model_swaps.labels("refused").inc()

    registry = ModelRegistry.from_settings(w.settings, on_refused=refused)
    models = ServingModels.load(registry, w.settings.fallback_ctr)
    models.canary_share, models.canary_key = w.settings.canary_share, w.settings.canary_key.encode()
    if models.current is None:
        log.error("no valid model in %s: decisions use the fallback rule", registry.root)
    else:
        _model_in_use(w, models.current)
    return models


def _model_in_use(w: Wiring, loaded: LoadedModel) -> None:
    log.info("serving model %s on %s", loaded.version, loaded.scorer.provider)
    w.metrics.model.info({"version": loaded.version, "provider": loaded.scorer.provider})
