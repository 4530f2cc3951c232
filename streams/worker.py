"""Run a worker process: the Faust app for these settings, until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import gc
import logging
import os

from adpulse.core.errors import StateError
from adpulse.core.settings import Settings


def check_data_dir(settings: Settings) -> None:
    """Fail at start, naming the path, if RocksDB could not write its tables."""
    path = settings.data_dir
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".adpulse-write-check"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        msg = f"data dir {path} is not writable ({exc.strerror}); set ADPULSE_DATA_DIR"
        raise StateError(msg) from None
    if not os.access(path, os.W_OK):
        msg = f"data dir {path} is not writable; set ADPULSE_DATA_DIR"
        raise StateError(msg)


def check_config(settings: Settings) -> None:
    """Fail at start, in one line, on a missing pseudonym key or unusable Kafka security."""
    from adpulse.core.kafkaconf import check  # noqa: PLC0415
    from adpulse.core.privacy import Pseudonymiser, load_api_token  # noqa: PLC0415

    check(settings)
    Pseudonymiser.from_settings(settings)
    load_api_token(settings)  # an unreadable or short token file stops the worker here


def run_worker(settings: Settings, loglevel: str = "info") -> int:
    from faust.worker import Worker  # noqa: PLC0415 - heavy import, CLI --help stays fast

    from streams.app import create_app  # noqa: PLC0415
    from streams.runtime.topicadmin import create_topics  # noqa: PLC0415

    check_data_dir(settings)
    check_config(settings)
    create_topics(settings)  # idempotent: a worker never waits on a topic nobody made
    wiring = create_app(settings)

    @wiring.app.task
    async def freeze_startup_heap() -> None:
        """Keep the collector off the startup heap: a full collection over Faust's and
        aiokafka's ~10^5 long-lived objects stalled ingest for ~100 ms at a time."""
        await asyncio.sleep(1.0)
        gc.collect()
        gc.freeze()

    worker = Worker(wiring.app, loglevel=loglevel, quiet=True)
    # Faust's debug-level client logging costs ~8% of throughput when enabled; keep it off.
    if loglevel != "debug":
        for name in ("aiokafka", "kafka", "faust.transport", "faust.tables.recovery"):
            logging.getLogger(name).setLevel(logging.WARNING)
    worker.execute_from_commandline()
    return 0
