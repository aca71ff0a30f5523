"""Timing helpers shared by the benchmarks: medians, synchronised, after a warm-up.

JAX: wall clock around `jax.block_until_ready` (the first call traces and compiles).
torch on a GPU: `triton.testing.do_bench` (CUDA events, its own warm-up); on a CPU
the same wall-clock loop as for JAX.
"""

from __future__ import annotations

import statistics
import time

import jax


def _median_ms(run, reps: int) -> float:
    run()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def time_jax(fn, reps: int = 20) -> float:
    """Median ms of `fn()` (a JAX computation), synchronised."""
    return _median_ms(lambda: jax.block_until_ready(fn()), reps)


def time_torch(fn, reps: int, gpu: bool, grads=()) -> float:
    """Median ms of `fn()` (torch); grads: tensors whose .grad do_bench clears between runs."""
    if gpu:
        from triton.testing import do_bench

        return do_bench(fn, grad_to_none=list(grads), return_mode="median")
    return _median_ms(fn, reps)
