"""Helpers shared by the benchmark scripts: machine description, timing, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path
from typing import Callable


def machine() -> str:
    """One line naming the CPU, core count and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import jax

    parts = [cpu, f"{os.cpu_count()} cores", f"jax {jax.__version__} ({jax.default_backend()})"]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except ImportError:
        pass
    return ", ".join(parts)


def timeit(fn: Callable[[], object], repeats: int = 3) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` over ``repeats`` runs (the caller warms up first)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def time_interleaved(sides: dict[str, Callable[[], object]], repeats: int = 3) -> dict[str, list[float]]:
    """Wall times of each side over ``repeats`` rounds, the sides alternating within a round.

    Load that drifts during the run (other jobs on the machine) then hits every side
    alike; the caller warms every side up first and usually reports the median.
    """
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(repeats):
        for k, fn in sides.items():
            times[k].append(timeit(fn, 1)[0])
    return times


def relative_sq_error(x, ref) -> float:
    """``Σ‖x − ref‖² / Σ‖ref‖²`` (float64): how far ``x`` drifted from ``ref``."""
    import numpy as np

    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.sum((x - ref) ** 2) / np.sum(ref ** 2))


def write_result(name: str, result: dict) -> Path:
    """Store a JSON result under benchmarks/results/ with today's date and the machine."""
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    result = {"date": date.today().isoformat(), "machine": machine(), **result}
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
