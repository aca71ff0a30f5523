"""GPU time per call from a profiler trace, beside the loop timer, for flexjax and torch SDPA.

The loop timer (`timing.py`) is wall clock over back-to-back calls: it counts
any time the GPU sits idle between the calls, for reasons on the host side
(an allocator growing its pool, a synchronising call). On an H200 the Mosaic
fwd+bwd loop-timed at 8.03 ms a call while a `jax.profiler` trace of five
back-to-back calls showed 7.12 ms of GPU work a call and one idle gap of
8.8 ms (`bench/results/mosaic_bwd_registers_h200_2026-11-29.md`). This script
measures both ways in one process, the same way for both libraries: the loop
timer's figure, and from a CUPTI trace of `--calls` back-to-back calls (JAX:
`jax.profiler` read back with `jax.profiler.ProfileData`; torch:
`torch.profiler`) the kernels' summed time a call, the GPU's busy time a call
(the union of the kernels' intervals) and every idle gap over 10 us, with the
kernel it fell before; and how long each call takes the host to return (dispatch).

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 bench/kernel_trace.py \\
        --shape "bf16 D128" --backends MOSAIC_GPU --libs jax --out bench/results/<name>_jax
    ... --libs torch --out bench/results/<name>_torch

(one library a process: both profilers subscribe to CUPTI, which may take only one).

The environment's XLA_PYTHON_CLIENT_* settings are written with the results,
so runs under other allocator settings can be told apart.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import tempfile
import time

import jax

from bench.bench_mosaic_bwd import SHAPES, _grad_fn, attend, causal_inputs
from bench.report import write_report
from bench.timing import time_loop_jax, time_loop_torch

GAP_NS = 10_000  # idle time shorter than this between kernels is launch latency, not a gap


def summarize(events, calls: int) -> dict:
    """Per-call figures of a trace: events (start_ns, duration_ns, name), any order, possibly
    overlapping (several streams, or nested host events).

    kernel_ms: summed durations / calls; busy_ms: the union of the intervals / calls;
    span_ms: first start to last end / calls; gaps: [(events ended before it, ms)] for each
    idle stretch over GAP_NS; kernels: {name: (count, mean ms)}, the longest total first."""
    if not events:
        raise ValueError("summarize: the trace has no events (no GPU kernels were recorded)")
    events = sorted(events)
    busy = 0
    gaps = []
    end = None
    for i, (start, duration, _) in enumerate(events):
        if end is None or start > end:
            if end is not None and start - end > GAP_NS:
                gaps.append((i, (start - end) / 1e6))
            busy += duration
            end = start + duration
        elif start + duration > end:
            busy += start + duration - end
            end = start + duration
    by_name: dict[str, list[float]] = {}
    for _, duration, name in events:
        by_name.setdefault(name, []).append(duration / 1e6)
    kernels = {n: (len(d), sum(d) / len(d)) for n, d in by_name.items()}
    kernels = dict(sorted(kernels.items(), key=lambda kv: -kv[1][0] * kv[1][1]))
    return dict(
        kernel_ms=sum(d for _, d, _ in events) / 1e6 / calls,
        busy_ms=busy / 1e6 / calls,
        span_ms=(end - events[0][0]) / 1e6 / calls,
        gaps=gaps,
        kernels=kernels,
    )


def jax_events(fn, calls: int, plane: str = "/device:GPU", line: str = "Stream"):
    """(start_ns, duration_ns, name) of every event on `plane`'s lines named `line...` while
    `calls` back-to-back calls of `fn` (a JAX computation, already compiled) run."""
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            result = None
            for _ in range(calls):
                result = fn()
            jax.block_until_ready(result)
        (path,) = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        data = ProfileData.from_file(path)
        return [
            (e.start_ns, e.duration_ns, e.name)
            for p in data.planes
            if p.name.startswith(plane)
            for ln in p.lines
            if ln.name.startswith(line)
            for e in ln.events
        ]


def torch_events(fn, calls: int, cuda: bool = True, before=None):
    """(start_ns, duration_ns, name) of the CUDA kernels (with cuda=False, the host events)
    while `calls` back-to-back calls of `fn` run; `before()` (if given) runs before each."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(calls):
            if before is not None:
                before()
            fn()
        if cuda:
            torch.cuda.synchronize()
    return [
        (int(e.time_range.start * 1000), int(e.time_range.elapsed_us() * 1000), e.name)
        for e in prof.events()
        if e.device_type == kind
    ]


def host_ms(fn, calls: int, sync, before=None) -> list[float]:
    """Wall ms each of `calls` back-to-back calls of `fn` takes to return (dispatch: the host's
    side, with no sync between calls); one `sync()` after them. A host that cannot run ahead of
    the GPU shows here as calls as long as the GPU's."""
    times = []
    for _ in range(calls):
        if before is not None:
            before()
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    sync(result)
    return times


def _row(impl: str, kind: str, loop_ms: float, host: list[float], trace: dict) -> dict:
    row = dict(impl=impl, kind=kind, loop_ms=loop_ms, host_ms=host, **trace)
    gaps = trace["gaps"]
    print(
        f"{impl} | {kind} | loop {loop_ms:.3f} ms | host {statistics.median(host):.3f} "
        f"(max {max(host):.3f}) | kernels {trace['kernel_ms']:.3f} | "
        f"busy {trace['busy_ms']:.3f} | gaps {[(i, round(ms, 3)) for i, ms in gaps]}",
        flush=True,
    )
    return row


def table(rows) -> str:
    """The rows as a markdown table."""
    text = ("| impl | kind | loop ms | host ms, median (max) | kernels ms | GPU busy ms | "
            "idle gaps (kernel # it fell before, ms) |\n|---|---|---|---|---|---|---|\n")  # fmt: skip
    for r in rows:
        gaps = ", ".join(f"{i}: {ms:.3f}" for i, ms in r["gaps"]) or "none"
        host = f"{statistics.median(r['host_ms']):.3f} ({max(r['host_ms']):.3f})"
        text += (f"| {r['impl']} | {r['kind']} | {r['loop_ms']:.3f} | {host} | "
                 f"{r['kernel_ms']:.3f} | {r['busy_ms']:.3f} | {gaps} |\n")  # fmt: skip
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="bf16 D128", choices=list(SHAPES))
    p.add_argument("--backends", default="MOSAIC_GPU", help="comma-separated flexjax backends")
    p.add_argument("--calls", type=int, default=10, help="back-to-back calls traced and timed")
    p.add_argument("--libs", default="jax", help="jax (flexjax rows), torch (SDPA rows), or both")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not any(d.platform == "gpu" for d in jax.devices()):
        raise SystemExit("kernel_trace.py traces GPU kernels: it needs a CUDA GPU")
    from bench.report import meta_info

    B, H, S, D, _ = SHAPES[args.shape]
    q, k, v, do, bm = causal_inputs(args.shape)
    rows = []
    libs = args.libs.split(",")
    for backend in args.backends.split(",") if "jax" in libs else ():
        options = {"BACKEND": backend}
        fwd = jax.jit(lambda q, k, v, o=options: attend(q, k, v, bm, o))
        grads = _grad_fn(bm, options, do)
        for kind, f in (("fwd", lambda: fwd(q, k, v)), ("fwd+bwd", lambda: grads(q, k, v))):
            jax.block_until_ready(f())
            loop = time_loop_jax(f, args.calls)
            host = host_ms(f, args.calls, jax.block_until_ready)
            trace = summarize(jax_events(f, args.calls), args.calls)
            rows.append(_row(f"flexjax {backend}", kind, loop, host, trace))
    if "torch" in libs:
        import torch
        import torch.nn.functional as F

        from torch_bridge import array_to_torch

        tq, tk, tv, tdo = (array_to_torch(x) for x in (q, k, v, do))
        leaves = [x.detach().requires_grad_() for x in (tq, tk, tv)]

        def clear():
            for x in leaves:
                x.grad = None

        gqa = {"enable_gqa": True} if tk.shape[1] != tq.shape[1] else {}  # fewer kv heads
        sdpa = lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, **gqa)
        fb = lambda: F.scaled_dot_product_attention(*leaves, is_causal=True, **gqa).backward(tdo)
        for kind, f, before in (("fwd", sdpa, None), ("fwd+bwd", fb, clear)):
            f()
            torch.cuda.synchronize()
            loop = time_loop_torch(f, args.calls, True, leaves if before else ())
            host = host_ms(f, args.calls, lambda _: torch.cuda.synchronize(), before)
            trace = summarize(torch_events(f, args.calls, before=before), args.calls)
            rows.append(_row("torch SDPA", kind, loop, host, trace))
    meta = meta_info("GPU", True)
    meta["env"] = {k: v for k, v in os.environ.items() if k.startswith("XLA_PYTHON_CLIENT")}
    text = f"# Loop timer against profiler trace, {meta['gpu']}, {meta['date']}\n\n{meta}\n\n"
    text += f"{args.shape}: B={B} H={H} S={S} D={D} causal, {args.calls} back-to-back calls\n\n"
    text += table(rows)
    print(text)
    write_report(args.out, text, dict(meta=meta, rows=rows))
    return rows


if __name__ == "__main__":
    main()
