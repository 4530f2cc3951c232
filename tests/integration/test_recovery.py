"""A worker killed with SIGKILL mid-stream comes back with exact state: nothing lost or doubled."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from adpulse.core.settings import Settings
from adpulse.workerproc import WorkerProcess
from streams.runtime.topicadmin import create_topics
from tests.integration.test_interest import (
    BACKFILL,
    assert_equals_reference,
    produce_events,
    synthetic,
    wait_applied,
)

pytestmark = pytest.mark.integration


def applied_so_far(worker: WorkerProcess) -> float:
    return worker.metric("adpulse_events_total")


@pytest.mark.long  # ~15 s each, kill -9
@pytest.mark.parametrize("local_state", ["kept", "wiped"])
def test_sigkill_mid_stream_then_restart_equals_reference(
    settings: Settings, tmp_path: Path, local_state: str
) -> None:
    """'wiped' restores every table from the changelog alone; 'kept' reuses local RocksDB."""
    create_topics(settings)
    events = synthetic(20_000, users=300, seed=11)
    worker = WorkerProcess(settings, tmp_path, extra_env=BACKFILL).start()
    producer = threading.Thread(target=produce_events, args=(settings, events, 500))
    producer.start()
    worker.wait_until(lambda: applied_so_far(worker) >= 6000, 60, "6000 events consumed")
    worker.kill()
    producer.join()
    if local_state == "wiped":
        shutil.rmtree(settings.data_dir)

    again = WorkerProcess(settings, tmp_path, name="restarted", extra_env=BACKFILL).start()
    try:
        wait_applied(again, events, timeout=90)
        assert_equals_reference(again, events)
    finally:
        again.stop()
