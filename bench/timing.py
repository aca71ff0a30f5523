"""Timing helpers shared by the benchmarks: medians, synchronised, after a warm-up.

JAX: wall clock around `jax.block_until_ready` (the first call traces and compiles).
torch on a GPU: `triton.testing.do_bench` (CUDA events, its own warm-up); on a CPU
the same wall-clock loop as for JAX.

The two GPU timers are not the same measurement: do_bench clears L2 with a
256 MB memset before each call and times the call alone with CUDA events;
`time_jax` includes a host sync per call. `time_loop_jax` / `time_loop_torch`
time both libraries the same way instead: `reps` calls back to back, one sync
at the end, wall clock per call (the GPU's time per call once dispatch runs
ahead of it; median of three such loops).
"""

from __future__ import annotations

import statistics
import time

import jax

from pallas_kernels.runtime import median_ms


def time_jax(fn, reps: int = 20) -> float:
    """Median ms of `fn()` (a JAX computation), synchronised."""
    return median_ms(fn, reps)


def time_torch(fn, reps: int, gpu: bool, grads=()) -> float:
    """Median ms of `fn()` (torch); grads: tensors whose .grad do_bench clears between runs."""
    if gpu:
        from triton.testing import do_bench

        return do_bench(fn, grad_to_none=list(grads), return_mode="median")
    return median_ms(fn, reps, sync=lambda result: result)


def _loop_ms(run, sync, reps: int, before=None) -> float:
    run()  # warm-up
    sync()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            if before is not None:
                before()
            run()
        sync()
        ts.append((time.perf_counter() - t0) * 1e3 / reps)
    return statistics.median(ts)


def time_loop_jax(fn, reps: int) -> float:
    """Per-call ms of `reps` back-to-back calls of `fn` (JAX), one sync at the end."""
    last = [None]

    def run():
        last[0] = fn()

    return _loop_ms(run, lambda: jax.block_until_ready(last[0]), reps)


def time_loop_torch(fn, reps: int, gpu: bool, grads=()) -> float:
    """Per-call ms of `reps` back-to-back calls of `fn` (torch), one sync at the end.

    grads: tensors whose .grad is set to None before each call (as do_bench does), so
    a backward writes its gradients instead of adding to the previous call's.
    """
    import torch

    def clear():
        for g in grads:
            g.grad = None

    sync = torch.cuda.synchronize if gpu else (lambda: None)
    return _loop_ms(fn, sync, reps, before=clear if grads else None)


# (torch timer, JAX timer) by --timer name: "default" (do_bench / synchronised calls) or
# "loop" (both libraries back to back, the way the committed tables are timed).
TIMERS = {"default": (time_torch, time_jax), "loop": (time_loop_torch, time_loop_jax)}
