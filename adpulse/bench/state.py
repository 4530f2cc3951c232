"""``adpulse bench state``: interest state per user on disk, worker memory, restore time.

Grows the interest table to ``users`` users (one synthetic event each, so every
user has a full state record), then reports
  * bytes on disk per user: the RocksDB files of the interest table after a clean
    stop (SST, WAL and manifests), against the raw record size as the baseline;
    and the same for ``realistic_users`` users of ``events_per_user`` events each
    (distinct items and categories, so the dedupe ring is full and the top
    categories are all taken): a record with one event compresses better than a
    real user's, so the first figure alone would flatter the engine;
  * the worker's resident memory with that table;
  * the time for a fresh worker with an empty data directory to restore the
    table from its changelog (until /health says recovered), against a bare
    aiokafka consumer reading the same changelog as the baseline.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from adpulse.bench import machine, machine_line, spread
from adpulse.bench.warm import fresh_settings, loaded_worker
from adpulse.core.kafkaconf import client_kwargs
from adpulse.core.settings import Settings
from adpulse.workerproc import WorkerProcess
from scoring.features import CATEGORY_DTYPE, InterestParams, header_dtype
from streams.runtime.seal import is_seal


@dataclass(frozen=True)
class StateBench:
    users: int = 1_000_000
    realistic_users: int = 50_000
    events_per_user: int = 20
    restore_repeats: int = 3

    @classmethod
    def smoke(cls) -> StateBench:
        return cls(users=2_000, realistic_users=200, restore_repeats=1)


def run(base: Settings, cfg: StateBench, log: Any = print) -> dict[str, Any]:
    # One event each: the header and one category.
    record = header_dtype(InterestParams.from_settings(base)).itemsize + CATEGORY_DTYPE.itemsize
    n_real, per_user = cfg.realistic_users, cfg.events_per_user
    with tempfile.TemporaryDirectory(prefix="adpulse-bench-") as tmp:
        log(f"  {n_real:,} users of {per_user} events each ...")
        real_disk, _, _ = _grow(base, Path(tmp) / "real", _events(n_real, per_user))
        log(f"  {n_real:,} users of {per_user} events: {real_disk / n_real:.0f} bytes/user on disk")
        log(f"  producing one event for each of {cfg.users:,} users ...")
        disk, rss, s = _grow(base, Path(tmp) / "one", _events(cfg.users, 1))
        log(
            f"  {cfg.users:,} users: {disk / cfg.users:.0f} bytes/user on disk, RSS {rss >> 20} MiB"
        )

        baselines, restores = [], []
        for r in range(cfg.restore_repeats):
            baselines.append(asyncio.run(_read_changelog(s, cfg.users)))
            shutil.rmtree(s.data_dir, ignore_errors=True)
            restored = WorkerProcess(s, Path(tmp) / "one", name=f"worker-restore-{r}")
            started = time.perf_counter()
            restored.start(timeout=3600)  # ready = /health 200 = recovery completed
            restores.append(time.perf_counter() - started)
            try:
                body = restored.interest("u0")
            finally:
                restored.stop()
            if body is None:
                msg = "restored worker has no state for u0"
                raise RuntimeError(msg)
            log(f"  restore {r + 1}/{cfg.restore_repeats}: {restores[-1]:.1f} s "
                f"(bare changelog read {baselines[-1]:.1f} s)")  # fmt: skip
        restore, baseline = spread(restores), spread(baselines)
    return {
        "users": cfg.users,
        "bytes_per_user_on_disk": disk / cfg.users,
        "realistic_users": n_real,
        "events_per_user": per_user,
        "realistic_bytes_per_user_on_disk": real_disk / n_real,
        "record_bytes": record,
        "worker_rss_bytes": rss,
        "restore_s": restore["median"],
        "restore_s_spread": restore,
        "baseline_changelog_read_s": baseline["median"],
        "baseline_changelog_read_s_spread": baseline,
        "restore_repeats": cfg.restore_repeats,
        "machine": machine(),
    }


def result_line(res: dict[str, Any]) -> str:
    return (
        f"state: {res['users']:,} users, {res['bytes_per_user_on_disk']:.0f} bytes/user on disk "
        f"(record {res['record_bytes']} bytes; {res['realistic_bytes_per_user_on_disk']:.0f} "
        f"bytes/user with {res['events_per_user']} events each), "
        f"worker RSS {res['worker_rss_bytes'] / 2**20:.0f} MiB, "
        f"restore {res['restore_s']:.1f} s (bare read of the changelog "
        f"{res['baseline_changelog_read_s']:.1f} s); {machine_line(res['machine'])}"
    )


def _grow(
    base: Settings, root: Path, events: tuple[list[bytes], list[bytes]]
) -> tuple[int, int, Settings]:
    """A worker applies ``events`` on new topics: (bytes on disk of its interest table
    after a clean stop, its RSS with the table, the settings it ran with)."""
    root.mkdir(parents=True)
    s = fresh_settings(base, root)
    with loaded_worker(s, root, *events, timeout=3600, what="every event applied",
                       name="worker-grow") as worker:  # fmt: skip
        rss = _rss_bytes(worker)
    return _dir_bytes(s.data_dir, "interest"), rss, s


def _events(users: int, per_user: int) -> tuple[list[bytes], list[bytes]]:
    """``per_user`` events for each user, each on its own item and category, 1 s apart."""
    now = int(time.time() * 1000)
    enc = msgspec.json.encode
    keys, values = [], []
    for k in range(per_user):
        for u in range(users):
            user = f"u{u}"
            keys.append(user.encode())
            event = {"event_id": f"s{u}-{k}", "user_id": user, "kind": "browse",
                     "item_id": (u * per_user + k) % 1_000_000, "category_id": (u + 97 * k) % 5000,
                     "ts": now - 1000 * (per_user - k)}  # fmt: skip
            values.append(enc(event))
    return keys, values


def _rss_bytes(worker: WorkerProcess) -> int:
    assert worker.proc is not None
    for line in Path(f"/proc/{worker.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _dir_bytes(root: Path, table: str) -> int:
    """Bytes of every file of the table's RocksDB directories (one per partition)."""
    return sum(
        f.stat().st_size
        for d in root.rglob(f"{table}-*.db")
        if d.is_dir()
        for f in d.rglob("*")
        if f.is_file()
    )


async def _read_changelog(s: Settings, expect: int) -> float:
    topic = f"{s.app_id}-interest-changelog"
    consumer = AIOKafkaConsumer(
        **client_kwargs(s), enable_auto_commit=False, fetch_max_wait_ms=10,
        max_partition_fetch_bytes=16 << 20,
    )  # fmt: skip
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(s.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        keys: set[bytes] = set()
        started = time.perf_counter()
        while len(keys) < expect and time.perf_counter() - started < 3600:
            batch = await consumer.getmany(timeout_ms=1000, max_records=50_000)
            for records in batch.values():
                keys.update(r.key for r in records if r.key is not None and not is_seal(r.key))
        return time.perf_counter() - started
    finally:
        await consumer.stop()
