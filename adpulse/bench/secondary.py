"""``adpulse bench secondary``: how fresh and how dear a RocksDB secondary instance is.

Why: one option for isolating decisions from ingest (issue 13; docs/decide.md, "Isolation
from ingest") is a serving process of its own that reads the worker's tables through a
RocksDB *secondary* instance, which sees the primary's writes only when it calls
``try_catch_up_with_primary`` (it replays the primary's write-ahead log). Whether that
fits the 50 ms freshness target, and what the catching up costs on this box, decides
whether the option is worth building; so it is a command, not a one-off script.

A primary process (spawned) writes ``rate`` keys a second in write batches of ``batch``
keys of ``value_bytes`` (ingest's shape: about two keys an event, interest and sequence,
in batches of ~56 events at 5,000 events/s), with the options a worker's Faust tables
use. Each batch also writes a probe record holding the batch's sequence number. This
process opens the same directory as a secondary and catches up every ``interval`` ms,
reading the probe after each catch-up. A batch is *visible* at the end of the first
catch-up that shows its sequence number or a later one; its freshness is that moment
minus the moment the primary's write of it returned (both ``time.monotonic``, one clock
for every process on Linux). Per interval: freshness p50/p99, the catch-up call's wall
time and CPU, and the secondary's CPU as a share of a core; the same run's baseline is
the primary's own write cost per key (what ingest already pays).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adpulse.bench import machine, machine_line

PROBE = b"__adpulse_bench_probe__"
_PROBE = struct.Struct("<q")  # the batch's sequence number


@dataclass(frozen=True)
class SecondaryBench:
    intervals_ms: tuple[float, ...] = (1.0, 5.0, 20.0)
    rate: int = 10_000  # keys written a second
    batch: int = 56  # keys a write batch
    value_bytes: int = 280
    keys: int = 200_000  # distinct keys written over (users x tables)
    duration_s: float = 10.0  # per interval

    @classmethod
    def smoke(cls) -> SecondaryBench:
        return cls(intervals_ms=(5.0,), rate=2_000, batch=20, keys=1_000, duration_s=1.0)


def _open_primary(path: Path) -> Any:
    from streams.runtime.tablewriter import open_db  # noqa: PLC0415 - the worker's options

    return open_db(path)


def _batches(cfg: SecondaryBench) -> int:
    return max(1, int(cfg.rate * cfg.duration_s / cfg.batch))


def _primary(path: str, cfg: SecondaryBench, ready: Any, stop: Any, out: str) -> None:
    """Write at ``cfg.rate`` keys/s for ``cfg.duration_s``; save each batch's write time.

    The database stays open until ``stop``: a primary that closes flushes its memtable
    and drops its write-ahead log, and a secondary did not see the last batch written
    just before (found by this bench's test)."""
    import rocksdict  # noqa: PLC0415

    db = _open_primary(Path(path))
    value = os.urandom(cfg.value_bytes)
    batches = _batches(cfg)
    every = cfg.batch / cfg.rate
    written = np.zeros(batches, dtype=np.float64)
    write_s = 0.0
    ready.set()
    start, k = time.monotonic() + 0.2, 0  # the secondary opens meanwhile
    for seq in range(batches):
        lag = start + seq * every - time.monotonic()
        if lag > 0:
            time.sleep(lag)
        wb = rocksdict.WriteBatch(raw_mode=True)
        for _ in range(cfg.batch - 1):
            wb.put(b"key-%09d" % (k % cfg.keys), value)
            k += 1
        wb.put(PROBE, _PROBE.pack(seq))
        t = time.monotonic()
        db.write(wb)
        written[seq] = time.monotonic()
        write_s += written[seq] - t
    np.save(out, np.append(written, write_s / (batches * cfg.batch)))
    stop.wait(60)
    db.close()


def _one(cfg: SecondaryBench, interval_ms: float, root: Path) -> dict[str, Any]:
    import rocksdict  # noqa: PLC0415

    path, spath, out = root / "primary", root / "secondary", root / "written.npy"
    for p in (path, spath):
        shutil.rmtree(p, ignore_errors=True)
    _open_primary(path).close()  # the directory exists before either process opens it
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_primary, args=(str(path), cfg, ready, stop, str(out)),
                       daemon=True)  # fmt: skip
    proc.start()
    last = _batches(cfg) - 1
    try:
        if not ready.wait(60):
            msg = f"the bench's primary writer did not start (exit code {proc.exitcode})"
            raise RuntimeError(msg)
        options = rocksdict.Options(raw_mode=True)
        options.set_max_open_files(-1)  # a secondary keeps every file open (RocksDB's rule)
        sec = rocksdict.Rdict(str(path), options=options,
                              access_type=rocksdict.AccessType.secondary(str(spath)))  # fmt: skip
        seen: list[tuple[float, int]] = []  # (visible at, newest sequence number seen)
        wall, cpu = [], []
        cpu0, t0 = time.thread_time(), time.monotonic()
        newest = -1  # until the last batch is seen (the primary waits for it, 60 s at most)
        while newest < last and proc.is_alive():
            time.sleep(interval_ms / 1000)
            w, c = time.monotonic(), time.thread_time()
            sec.try_catch_up_with_primary()
            raw = sec.get(PROBE)
            now = time.monotonic()
            wall.append(now - w)
            cpu.append(time.thread_time() - c)
            if raw is not None:
                newest = _PROBE.unpack(raw)[0]
                seen.append((now, newest))
        share = (time.thread_time() - cpu0) / max(time.monotonic() - t0, 1e-9)
        sec.close()
    finally:
        stop.set()
        proc.join(30)
    if not out.is_file():
        msg = f"the bench's primary writer failed (exit code {proc.exitcode})"
        raise RuntimeError(msg)
    got = np.load(out)
    written, write_us = got[:-1], float(got[-1]) * 1e6
    fresh, unseen = _freshness(written, seen)
    pct = np.percentile
    return {
        "interval_ms": interval_ms,
        "fresh_p50_ms": float(pct(fresh, 50) * 1000) if len(fresh) else float("nan"),
        "fresh_p99_ms": float(pct(fresh, 99) * 1000) if len(fresh) else float("nan"),
        "catch_up_p50_ms": float(pct(wall, 50) * 1000) if wall else float("nan"),
        "catch_up_p99_ms": float(pct(wall, 99) * 1000) if wall else float("nan"),
        "catch_up_cpu_ms": float(np.mean(cpu) * 1000) if cpu else float("nan"),
        "catch_ups": len(wall),
        "secondary_core_share": share,
        "batches": len(written),
        "unseen_batches": unseen,
        "primary_write_us_per_key": write_us,
    }


def _freshness(
    written: np.ndarray[Any, np.dtype[np.float64]], seen: list[tuple[float, int]]
) -> tuple[np.ndarray[Any, np.dtype[np.float64]], int]:
    """Per batch: the first catch-up that showed it (or a later batch) minus its write."""
    if not seen:
        return np.zeros(0), len(written)
    at = np.array([t for t, _ in seen])
    newest = np.maximum.accumulate(np.array([s for _, s in seen]))
    first = np.searchsorted(newest, np.arange(len(written)), side="left")  # first >= seq
    shown = first < len(at)
    return at[first[shown]] - written[shown], int((~shown).sum())


def run(cfg: SecondaryBench, log: Callable[[str], None] = print) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="adpulse-secondary-") as tmp:
        for interval in cfg.intervals_ms:
            row = _one(cfg, interval, Path(tmp))
            rows.append(row)
            log(f"  every {interval:g} ms: fresh p50 {row['fresh_p50_ms']:.1f} ms p99 "
                f"{row['fresh_p99_ms']:.1f} ms; catch-up p50 {row['catch_up_p50_ms']:.2f} ms "
                f"p99 {row['catch_up_p99_ms']:.2f} ms ({row['catch_up_cpu_ms']:.2f} ms CPU); "
                f"secondary {100 * row['secondary_core_share']:.0f}% of a core; primary "
                f"{row['primary_write_us_per_key']:.1f} us a key")  # fmt: skip
    return {
        "rows": rows,
        "rate": cfg.rate, "batch": cfg.batch, "value_bytes": cfg.value_bytes,
        "duration_s": cfg.duration_s,
        "machine": machine(),
    }  # fmt: skip


def result_line(res: dict[str, Any]) -> str:
    parts = [f"every {r['interval_ms']:g} ms fresh p99 {r['fresh_p99_ms']:.1f} ms at "
             f"{100 * r['secondary_core_share']:.0f}% of a core" for r in res["rows"]]  # fmt: skip
    base = res["rows"][0]["primary_write_us_per_key"] if res["rows"] else float("nan")
    return (f"secondary: {res['rate']:,} keys/s in batches of {res['batch']}: "
            + "; ".join(parts) + f" (the primary's write: {base:.1f} us a key); "
            f"{machine_line(res['machine'])}")  # fmt: skip
