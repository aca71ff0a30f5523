"""Everyday-loop costs (issue 16): new closures, eager overhead, bool captured arrays; beside torch.

Three parts, flexjax and torch in one run:

* `block_mask`: eager `create_block_mask` with a *new closure over new
  document ids* every step (the packed-sequence loop), per call, after the
  first; torch's compiled `create_block_mask` the same way. S = 8192, 32768,
  131072 (B=1, H=1, 16 documents). Each step's ids are already on the device
  (made before the timed loop, for both libraries): the time is
  create_block_mask's, not the host-to-device copy of the ids (about 0.5 ms
  for a jnp.asarray of a numpy array on an H100, against 0.02 ms for torch's
  `as_tensor(..., device="cuda")`; rows timed before 2026-11-28's second run
  include each library's copy).
* `overhead`: B=2, H=4, S=4096, D=64 fp16, no mask: an eager `flex_attention`
  call, the same call through `torch_bridge`, and the jitted call; the
  overhead is eager - jitted (and bridge - jitted).
* `bool`: the seed's shape (B=16, H=16, S=8192, D=64 fp16): a Longformer
  mask with 1% global tokens, `(|q - kv| <= 512) | g[kv] | g[q]`, and a
  causal key-padding mask, `(q >= kv) & keep[b, kv]`, with the arrays as bool
  and as int32, forward and forward+backward, flexjax (jitted) and torch
  (compiled flex_attention).

Timing: the loop timer (`timing.py`) for kernels; per-call wall time with a
sync for the eager calls (that is what a loop pays).

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 bench/bench_traps.py \\
        --out bench/results/traps_h100_<date>

With no GPU it runs tiny sizes in interpret mode (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from report import meta_info, write_report
from timing import time_loop_jax, time_loop_torch
from torch.nn.attention import flex_attention as tfa

import flexjax as fj
import torch_bridge
from pallas_kernels.runtime import has_gpu


def wall_ms(step, reps: int, sync) -> float:
    """Median per-call ms of step(i) for i = 1..reps, each synchronised (step(0) warms up)."""
    sync(step(0))
    ts = []
    for i in range(1, reps + 1):
        t0 = time.perf_counter()
        sync(step(i))
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def doc_ids(S: int, step: int, n_docs: int = 16) -> np.ndarray:
    rng = np.random.default_rng(step)
    cuts = np.sort(rng.choice(np.arange(1, S), n_docs - 1, replace=False))
    return np.searchsorted(cuts, np.arange(S), side="right").astype(np.int32)


def block_mask_rows(seqs, reps, dev):
    rows = []
    t_cbm = torch.compile(tfa.create_block_mask) if dev == "cuda" else tfa.create_block_mask
    for S in seqs:
        ids = [doc_ids(S, i) for i in range(reps + 1)]
        j_docs = [jax.block_until_ready(jnp.asarray(d)) for d in ids]
        t_docs = [torch.as_tensor(d, device=dev) for d in ids]

        def jax_step(i, S=S):
            doc = j_docs[i]
            return fj.create_block_mask(lambda b, h, q, kv: doc[q] == doc[kv], 1, 1, S, S)

        def torch_step(i, S=S):
            doc = t_docs[i]
            return t_cbm(lambda b, h, q, kv: doc[q] == doc[kv], 1, 1, S, S, device=dev)

        sync_j = lambda bm: jax.block_until_ready(bm.kv_num_blocks)
        sync_t = lambda bm: torch.cuda.synchronize() if dev == "cuda" else None
        rows.append(
            dict(part="block_mask", S=S, impl="flexjax", ms=wall_ms(jax_step, reps, sync_j))
        )
        rows.append(
            dict(part="block_mask", S=S, impl="torch", ms=wall_ms(torch_step, reps, sync_t))
        )
        print(rows[-2], rows[-1], flush=True)
    return rows


def overhead_rows(sizes, reps, dev, dtype):
    B, H, S, D = sizes
    torch.manual_seed(0)
    tq, tk, tv = (torch.randn(B, H, S, D, device=dev, dtype=dtype) for _ in range(3))
    q, k, v = (torch_bridge.tensor_to_jax(x, "x") for x in (tq, tk, tv))
    jitted = jax.jit(lambda q, k, v: fj.flex_attention(q, k, v))
    sync_j = jax.block_until_ready
    sync_t = lambda out: torch.cuda.synchronize() if dev == "cuda" else None
    kernel = time_loop_jax(lambda: jitted(q, k, v), reps)
    eager = wall_ms(lambda i: fj.flex_attention(q, k, v), reps, sync_j)
    jit_call = wall_ms(lambda i: jitted(q, k, v), reps, sync_j)
    bridge = wall_ms(lambda i: torch_bridge.flex_attention(tq, tk, tv), reps, sync_t)
    row = dict(
        part="overhead", shape=str(sizes), kernel_ms=kernel, jitted_call_ms=jit_call,
        eager_ms=eager, bridge_ms=bridge, eager_overhead_ms=eager - jit_call,
        bridge_overhead_ms=bridge - jit_call,
    )  # fmt: skip
    print(row, flush=True)
    return [row]


def bool_rows(sizes, reps, dev, dtype, gpu):
    B, H, S, D = sizes
    rng = np.random.default_rng(0)
    g = rng.random(S) < 0.01
    keep = rng.random((B, S)) < 0.9
    torch.manual_seed(0)
    tq, tk, tv, tdo = (
        torch.randn(B, H, S, D, device=dev, dtype=dtype, requires_grad=gpu and i < 3)
        for i in range(4)
    )
    q, k, v, do = (torch_bridge.tensor_to_jax(x.detach(), "x") for x in (tq, tk, tv, tdo))
    t_flex = torch.compile(tfa.flex_attention, dynamic=False) if gpu else tfa.flex_attention
    rows = []
    for mask_name in ("longformer", "key_padding"):
        for dtype_name in ("bool", "int32"):
            j_arr = jnp.asarray(g if mask_name == "longformer" else keep)
            t_arr = torch.as_tensor(g if mask_name == "longformer" else keep, device=dev)
            if dtype_name == "int32":
                j_arr, t_arr = j_arr.astype(jnp.int32), t_arr.to(torch.int32)
            if mask_name == "longformer":
                mod = lambda b, h, q, kv, a: (abs(q - kv) <= 512) | (a[kv] != 0) | (a[q] != 0)
            else:
                mod = lambda b, h, q, kv, a: (q >= kv) & (a[b, kv] != 0)
            j_bm = fj.create_block_mask(lambda b, h, qi, ki: mod(b, h, qi, ki, j_arr), B, 1, S, S)
            t_bm = tfa.create_block_mask(
                lambda b, h, qi, ki: mod(b, h, qi, ki, t_arr), B, 1, S, S, device=dev
            )
            fwd = jax.jit(lambda q, k, v, bm=j_bm: fj.flex_attention(q, k, v, block_mask=bm))
            fb = jax.jit(lambda q, k, v, do, bm=j_bm: jax.vjp(
                lambda q, k, v: fj.flex_attention(q, k, v, block_mask=bm), q, k, v
            )[1](do))  # fmt: skip

            def t_fb(bm=t_bm):
                t_flex(tq, tk, tv, block_mask=bm).backward(tdo)

            with torch.no_grad():
                t_fwd_ms = time_loop_torch(
                    lambda bm=t_bm: t_flex(tq, tk, tv, block_mask=bm), reps, gpu
                )
            row = dict(
                part="bool", mask=mask_name, dtype=dtype_name,
                flexjax_fwd_ms=time_loop_jax(lambda: fwd(q, k, v), reps),
                flexjax_fwd_bwd_ms=time_loop_jax(lambda: fb(q, k, v, do), reps),
                torch_fwd_ms=t_fwd_ms,
                # torch's flex_attention has no backward on a CPU
                torch_fwd_bwd_ms=time_loop_torch(t_fb, reps, gpu, grads=(tq, tk, tv)) if gpu else "-",
            )  # fmt: skip
            rows.append(row)
            print(row, flush=True)
    return rows


def table(rows, keys) -> str:
    fmt = lambda x: f"{x:.3g}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="block_mask,overhead,bool")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument(
        "--seqs",
        default=None,
        help="block_mask part: comma-separated S (GPU default 8192,32768,131072)",
    )
    p.add_argument("--out", default=None, help="path prefix for .md and .json")
    args = p.parse_args(argv)
    gpu = has_gpu() and torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    reps = args.reps or (20 if gpu else 2)
    seqs = [8192, 32768, 131072] if gpu else [256]
    if args.seqs:
        seqs = [int(x) for x in args.seqs.split(",")]
    over = (2, 4, 4096, 64) if gpu else (1, 2, 128, 16)
    seed = (16, 16, 8192, 64) if gpu else (2, 2, 256, 16)
    dtype = torch.float16 if gpu else torch.float32
    parts = args.parts.split(",")
    meta = meta_info("GPU" if gpu else "CPU smoke test", gpu)
    text, payload = [f"# Everyday-loop costs, {meta['gpu']}, {meta['date']}\n", str(meta), ""], {}
    payload["meta"] = meta
    if "block_mask" in parts:
        rows = payload["block_mask"] = block_mask_rows(seqs, reps, dev)
        text += [
            "## create_block_mask, new closure each call (ms)\n",
            table(rows, ["S", "impl", "ms"]),
            "",
        ]
    if "overhead" in parts:
        rows = payload["overhead"] = overhead_rows(over, reps, dev, dtype)
        keys = ["shape", "kernel_ms", "jitted_call_ms", "eager_ms", "bridge_ms",
                "eager_overhead_ms", "bridge_overhead_ms"]  # fmt: skip
        text += ["## Call overhead (ms)\n", table(rows, keys), ""]
    if "bool" in parts:
        rows = payload["bool"] = bool_rows(seed, reps, dev, dtype, gpu)
        keys = ["mask", "dtype", "flexjax_fwd_ms", "flexjax_fwd_bwd_ms", "torch_fwd_ms",
                "torch_fwd_bwd_ms"]  # fmt: skip
        text += [
            f"## bool vs int32 captured arrays, B,H,S,D = {seed} (ms)\n",
            table(rows, keys),
            "",
        ]
    write_report(args.out, "\n".join(text), payload)


if __name__ == "__main__":
    main()
