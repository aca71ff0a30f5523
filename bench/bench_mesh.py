"""flexjax on a mesh of GPUs against one GPU of the same host, total work fixed (issue 15).

Two parts, each timing forward and forward+backward (`jax.vjp` with a fixed
cotangent) with the loop timer (`timing.time_loop_jax`), one GPU first, in
the same process:

* `shard`: B=8, H=16, S=8192, D=128, bf16, causal BlockMask, q/k/v split on
  batch or on heads over n GPUs: `jax.jit` of `flex_attention` on arrays
  placed by a NamedSharding (Auto axes: the custom_partitioning path), and
  the same call inside a `jax.shard_map` with check_vma=True. Also records
  the output's sharding and the collectives in the compiled programs.
* `cp`: context parallelism, GQA 32 query / 8 kv heads, D=128, bf16,
  S = 65536 and 131072, causal (head-tail order) and 16 documents (PTRR
  order), `flexjax.parallel.context_parallel_attention` over n GPUs
  (strategies all_gather and ulysses) against `flex_attention` on one. Records the per-GPU memory of the compiled
  forward+backward (arguments + outputs + temporaries, `memory_analysis`)
  and the orders' balance (max / mean kv blocks per GPU).

Speedup = one GPU's time / n GPUs' time. XLA flags (e.g.
--xla_gpu_enable_latency_hiding_scheduler=true) are read from XLA_FLAGS at
start: run the script once per setting.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 bench/bench_mesh.py \\
        --part shard --gpus 1,2,4 --out bench/results/mesh_shard_h100_<date>

With no GPU it runs tiny shapes in interpret mode on forced host devices
(a smoke test of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from report import meta_info, write_report
from timing import time_loop_jax

import flexjax as fj
from flexjax import masks
from flexjax import parallel as cp
from pallas_kernels.runtime import has_gpu

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def collectives(compiled) -> str:
    """'op x count' of the collectives in a compiled program ('-' when none)."""
    hlo = compiled.as_text()
    counts = {op: len(re.findall(rf" {op}(?:-start)?\(", hlo)) for op in COLLECTIVES}
    return ", ".join(f"{op} x{c}" for op, c in counts.items() if c) or "-"


def memory_gib(compiled) -> float:
    """Per-device bytes of a compiled program: arguments + outputs + temporaries, in GiB."""
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return total / 2**30


def random(key, shape, dtype, sharding=None):
    x = jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)
    return x if sharding is None else jax.device_put(x, sharding)


def timed(fn, args, reps):
    """(ms per call, compiled program) of jax.jit(fn)(*args)."""
    jitted = jax.jit(fn)
    compiled = jitted.lower(*args).compile()
    return time_loop_jax(lambda: compiled(*args), reps), compiled


def fwd_bwd_of(attend):
    def fwd_bwd(q, k, v, do):
        _, pullback = jax.vjp(attend, q, k, v)
        return pullback(do)

    return fwd_bwd


# ---------------------------------------------------------------------------- batch / heads


def shard_rows(sizes, gpus, reps, dtype):
    B, H, S, D = sizes
    devices = jax.devices()
    bm = fj.create_block_mask(masks.causal_mask, 1, 1, S, S)
    attend = lambda q, k, v: fj.flex_attention(q, k, v, block_mask=bm)
    shape = (B, H, S, D)
    base = {}
    rows = []
    for n in gpus:
        mesh = Mesh(np.array(devices[:n]), ("x",))
        layouts = [("one GPU", P())] if n == 1 else [("batch", P("x")), ("heads", P(None, "x"))]
        for layout, spec in layouts:
            place = NamedSharding(mesh, spec)
            q, k, v, do = (random(i, shape, dtype, place) for i in range(4))
            modes = [("jit + NamedSharding", attend)]
            if n > 1:
                local = lambda q, k, v, spec=spec: fj.flex_attention(
                    q, k, v, block_mask=bm, q_sharding=spec
                )
                # Pallas' CPU interpreter cannot run under check_vma=True.
                sm = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                                   check_vma=has_gpu())  # fmt: skip
                modes.append((f"shard_map (check_vma={has_gpu()})", sm))
            for mode, fn in modes:
                t_fwd, c_fwd = timed(fn, (q, k, v), reps)
                t_fb, c_fb = timed(fwd_bwd_of(fn), (q, k, v, do), reps)
                out_spec = jax.jit(fn)(q, k, v).sharding.spec
                if n == 1:
                    base = dict(fwd=t_fwd, fwd_bwd=t_fb)
                rows.append(dict(
                    n_gpus=n, layout=layout, mode=mode, fwd_ms=t_fwd, fwd_bwd_ms=t_fb,
                    fwd_speedup=base["fwd"] / t_fwd, fwd_bwd_speedup=base["fwd_bwd"] / t_fb,
                    out_spec=str(out_spec), fwd_collectives=collectives(c_fwd),
                    fwd_bwd_collectives=collectives(c_fb),
                ))  # fmt: skip
                print(rows[-1], flush=True)
            del q, k, v, do
    return rows


# ---------------------------------------------------------------------------- context parallel


def document_mask(S: int, n_docs: int = 16):
    """Causal attention inside n_docs documents of random lengths (numpy seed 0)."""
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, S), n_docs - 1, replace=False))
    lengths = np.diff(np.concatenate([[0], cuts, [S]])).tolist()
    return masks.generate_doc_mask_mod(masks.document_id_from_lengths(lengths))


CP_MASKS = {
    "causal": (lambda S: masks.causal_mask, "head_tail"),
    "docs16": (document_mask, "ptrr"),
}


def order_for(name, bm, S, n):
    if name == "head_tail":
        return cp.head_tail_order(S, n, bm.BLOCK_SIZE[0])
    if name == "contiguous":
        return cp.contiguous_order(S, n, bm.BLOCK_SIZE[0])
    return cp.ptrr_order(bm, n)


def cp_rows(sizes, seqs, mask_names, gpus, reps, dtype, all_orders, strategies):
    Hq, Hkv, D = sizes
    devices = jax.devices()
    rows = []
    for S in seqs:
        for mask_name in mask_names:
            make_mask, default_order = CP_MASKS[mask_name]
            bm = fj.create_block_mask(make_mask(S), 1, 1, S, S)
            q = random(0, (1, Hq, S, D), dtype)
            k, v = (random(i, (1, Hkv, S, D), dtype) for i in (1, 2))
            do = random(3, (1, Hq, S, D), dtype)
            base = {}
            for n in gpus:
                runs = [(None, None)] if n == 1 else [(default_order, s) for s in strategies]
                if all_orders and n > 1:
                    runs += [
                        (o, "all_gather")
                        for o in ("contiguous", "head_tail", "ptrr")
                        if o != default_order
                    ]
                for order_name, strategy in runs:
                    if n == 1:
                        fn = lambda q, k, v: fj.flex_attention(
                            q, k, v, block_mask=bm, enable_gqa=True
                        )
                        args, balance = (q, k, v), 1.0
                    else:
                        order = order_for(order_name, bm, S, n)
                        mesh = Mesh(np.array(devices[:n]), ("cp",))
                        place = NamedSharding(mesh, P(None, None, "cp"))
                        args = [jax.device_put(order.shard(x), place) for x in (q, k, v)]
                        fn = functools.partial(
                            cp.context_parallel_attention, block_mask=bm, enable_gqa=True,
                            order=order, axis="cp", mesh=mesh, strategy=strategy,
                        )  # fmt: skip
                        work = order.work(bm)
                        balance = float(work.max() / work.mean())
                        do_n = jax.device_put(order.shard(do), place)
                    t_fwd, c_fwd = timed(fn, tuple(args), reps)
                    t_fb, c_fb = timed(fwd_bwd_of(fn), (*args, do if n == 1 else do_n), reps)
                    if n == 1:
                        base = dict(fwd=t_fwd, fwd_bwd=t_fb)
                    rows.append(dict(
                        S=S, mask=mask_name, n_gpus=n, order=order_name or "-",
                        strategy=strategy or "-",
                        imbalance=balance, fwd_ms=t_fwd, fwd_bwd_ms=t_fb,
                        fwd_speedup=base["fwd"] / t_fwd, fwd_bwd_speedup=base["fwd_bwd"] / t_fb,
                        mem_gib_per_gpu=memory_gib(c_fb), fwd_collectives=collectives(c_fwd),
                        fwd_bwd_collectives=collectives(c_fb),
                    ))  # fmt: skip
                    print(rows[-1], flush=True)
                    del args
            del q, k, v, do
    return rows


# ---------------------------------------------------------------------------- report


def table(rows, keys) -> str:
    def fmt(x):
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("shard", "cp", "all"), default="all")
    p.add_argument("--gpus", default="1,2,4", help="device counts, 1 first (the baseline)")
    p.add_argument("--seqs", default="65536,131072", help="cp: sequence lengths")
    p.add_argument("--masks", default="causal,docs16", help="cp: " + ",".join(CP_MASKS))
    p.add_argument("--strategies", default="all_gather,ulysses", help="cp: strategies to time")
    p.add_argument("--all-orders", action="store_true", help="cp: every order, not just the mask's")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", default=None, help="path prefix for .md and .json")
    args = p.parse_args(argv)
    gpu = has_gpu()
    gpus = [int(x) for x in args.gpus.split(",")]
    if gpus[0] != 1 or max(gpus) > len(jax.devices()):
        p.error(f"--gpus must start with 1 and use at most {len(jax.devices())} devices")
    dtype = jnp.bfloat16 if gpu else jnp.float32
    reps = args.reps or (10 if gpu else 1)
    seqs = [int(s) for s in args.seqs.split(",")]
    shard_sizes, cp_sizes = (8, 16, 8192, 128), (32, 8, 128)
    if not gpu:  # smoke-test sizes
        shard_sizes, cp_sizes, seqs = (4, 4, 256, 16), (8, 4, 16), [512]

    meta = meta_info("GPU" if gpu else "CPU smoke test", gpu)
    meta["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    meta["devices"] = len(jax.devices())
    text = [f"# flexjax on {max(gpus)} devices against one\n", str(meta), ""]
    payload = dict(meta=meta)
    if args.part in ("shard", "all"):
        rows = shard_rows(shard_sizes, gpus, reps, dtype)
        payload["shard"] = rows
        keys = ["n_gpus", "layout", "mode", "fwd_ms", "fwd_speedup", "fwd_bwd_ms",
                "fwd_bwd_speedup", "out_spec", "fwd_collectives", "fwd_bwd_collectives"]  # fmt: skip
        text += [
            f"## Batch / head sharding, B,H,S,D = {shard_sizes}, causal\n",
            table(rows, keys),
            "",
        ]
    if args.part in ("cp", "all"):
        rows = cp_rows(
            cp_sizes, seqs, args.masks.split(","), gpus, reps, dtype, args.all_orders,
            args.strategies.split(","),
        )  # fmt: skip
        payload["cp"] = rows
        keys = ["S", "mask", "n_gpus", "order", "strategy", "imbalance", "fwd_ms", "fwd_speedup", "fwd_bwd_ms",
                "fwd_bwd_speedup", "mem_gib_per_gpu", "fwd_collectives", "fwd_bwd_collectives"]  # fmt: skip
        text += [f"## Context parallel, Hq,Hkv,D = {cp_sizes}\n", table(rows, keys), ""]
    write_report(args.out, "\n".join(text), payload)


if __name__ == "__main__":
    main()
