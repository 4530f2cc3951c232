"""Benchmarks: each prints its baseline from the same run, and medians with their spread.

This machine is shared and noisy, so a figure is only meaningful next to a
baseline measured in the same run on the same messages; every benchmark
repeats and reports the median with min and max, never one sample.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adpulse.bench.cpu import box_s, steal_pct

_since = box_s()  # steal is reported from here (the command's start) to the next machine()


def machine(steal: bool = True) -> dict[str, Any]:
    """Cores, CPU model and GPU (if any) of the machine the figures come from, and the
    share of its time the hypervisor gave other guests (``steal_pct``) since the command
    started or since the last call (each bench calls this once, as its figures are made,
    so under ``bench all`` each gets its own run's share). ``steal=False``: a progress line's
    description, which leaves the share to the figures."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
        gpu = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout else None
    py = platform.python_version()
    out: dict[str, Any] = {"cores": os.cpu_count(), "cpu": cpu, "gpu": gpu, "python": py}
    if steal:
        global _since  # the mark this command's next figures start from
        now = box_s()
        out["steal_pct"], _since = round(steal_pct(_since, now), 1), now
    return out


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median with min and max: how we report any repeated measurement."""
    arr = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(arr)), "min": float(arr.min()), "max": float(arr.max())}


def percentiles_ms(seconds: Sequence[float], qs: Sequence[float]) -> list[float]:
    if not seconds:
        return [float("nan")] * len(qs)
    arr = np.asarray(seconds, dtype=np.float64) * 1000.0
    return [float(x) for x in np.percentile(arr, qs)]


def machine_line(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    steal = m.get("steal_pct")
    known = steal is not None and not math.isnan(steal)
    stolen = f", {steal:g}% of its time stolen by the hypervisor" if known else ""
    return f"{m['cores']} cores, {m['cpu']}{gpu}{stolen}"
