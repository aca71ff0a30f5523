"""What the kernels and the tools around them ask of the running JAX: a GPU? how long does a call take?

One place for both, so the dispatch layer, the autotuner, the gym, the bridge,
the tests and the benchmarks agree.
"""

from __future__ import annotations

import statistics
import time

import jax

__all__ = ["has_gpu", "median_ms"]


def has_gpu() -> bool:
    """Whether JAX has a GPU device (False when no backend initialises)."""
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def median_ms(fn, reps: int, sync=jax.block_until_ready) -> float:
    """Median wall-clock ms of `fn()`, each call synchronised with `sync`, after one warm-up call.

    Each call is timed alone, host sync included: fine for choosing between
    configs and for the gym; `bench/timing.py` has the same-way loop timers
    the published tables use. sync: JAX's by default; pass another for
    other frameworks' results.
    """
    sync(fn())  # warm-up: trace, compile, run
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
