"""The Mosaic GPU backward, kernel by kernel, for each of its configs (issue 18).

For one causal shape (default the issue's bf16 D=128 B=4 H=16 S=8192) and
each backward variant (kernel_options of the MOSAIC_GPU backend: matmul order
`MOSAIC_BWD_PAIRED`, consumer turns `MOSAIC_BWD_SCHEDULE_BARRIER`, ring depth
`MOSAIC_BWD_STAGES`, `MOSAIC_BWD_DKDV_STAGES`, `MOSAIC_FUSED_DQ`): forward + backward (`jax.vjp` with
out's cotangent, as torch's `out.backward(do)`), and the dq and dk/dv kernels alone (`bwd._dq`, `bwd._dkdv` on the
forward's lse and delta), each with the loop timer (`timing.py`); the
gradients' largest difference from the Triton backend's, so a variant that
is fast and wrong shows. With --torch, torch SDPA and compiled torch
flex_attention forward + backward in the same run, timed the same way.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 bench/bench_mosaic_bwd.py \\
        --variants '[{}, {"MOSAIC_BWD_PAIRED": true}]' --torch --out bench/results/<name>
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

import flexjax as fj
from bench.report import meta_info, write_report
from bench.timing import time_loop_jax
from flexjax.api import prepare
from pallas_kernels import dispatch
from pallas_kernels.mosaic_gpu import bwd as mbwd

SHAPES = {
    "bf16 D128": (4, 16, 8192, 128, "bfloat16"),
    "fp16 D64": (16, 16, 8192, 64, "float16"),
    "bf16 D128 gqa4": (4, 16, 8192, 128, "bfloat16"),  # 4 query heads per kv head
    "small": (1, 2, 256, 64, "float16"),  # (relative_bias_ab.py on a CPU: interpret mode)
}
KV_HEADS = {"bf16 D128 gqa4": 4}  # (the others: one kv head per query head)


def causal_inputs(shape: str):
    """(q, k, v, do, causal BlockMask) of a SHAPES entry, random, in [B, H, S, D] (k and v
    with KV_HEADS heads where given)."""
    B, H, S, D, dt = SHAPES[shape]
    Hkv = KV_HEADS.get(shape, H)
    keys = jax.random.split(jax.random.key(0), 4)
    q, do = (jax.random.normal(kk, (B, H, S, D), dt) for kk in keys[::3])
    k, v = (jax.random.normal(kk, (B, Hkv, S, D), dt) for kk in keys[1:3])
    bm = fj.create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S)
    return q, k, v, do, bm


def attend(q, k, v, bm, options):
    """flex_attention of the bench's inputs (grouped-query when k has fewer heads than q)."""
    gqa = q.shape[1] != k.shape[1]
    return fj.flex_attention(q, k, v, block_mask=bm, enable_gqa=gqa, kernel_options=options)


def _grad_fn(bm, options, do):
    """q, k, v -> their gradients for the cotangent `do` of out (torch's `out.backward(do)`)."""

    def grads(q, k, v):
        f = lambda q, k, v: attend(q, k, v, bm, options)
        return jax.vjp(f, q, k, v)[1](do)

    return jax.jit(grads)


def _kernel_fns(q, k, v, do, bm, options):
    """(dq kernel, dk/dv kernel) as jitted calls on the forward's lse and delta; (None, the
    dk/dv kernel with dq's reduce-adds and the zeroing of its accumulator) where the config
    resolves to the fused dq (`bwd.fused_dq`)."""
    gqa = q.shape[1] != k.shape[1]
    call = prepare(q, k, v, None, bm, enable_gqa=gqa, kernel_options={**options, "BACKEND": "MOSAIC_GPU"})  # fmt: skip
    backend = dispatch.backends()["MOSAIC_GPU"]
    own = call.options.for_backend(backend)
    cfg = backend.configs(call.spec, call.mods, own, False).bwd
    out, lse = fj.flex_attention(q, k, v, block_mask=bm, return_lse=True, enable_gqa=gqa,
                                 kernel_options={"BACKEND": "MOSAIC_GPU"})  # fmt: skip
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    kern = mbwd._Kernel(call.spec, call.mods, q.dtype)
    args = (q, k, v, do, lse, delta, call.tables)
    if mbwd.fused_dq(call.spec, cfg):

        def fused(*a):
            dq_acc = jax.new_ref(jnp.zeros(q.shape, jnp.float32))
            dk, dv = mbwd._dkdv(*a, (), kern=kern, cfg=cfg, dq_acc=dq_acc)
            return dq_acc[...], dk, dv

        fused = jax.jit(fused)
        return None, (lambda: fused(*args))
    dq = jax.jit(lambda *a: mbwd._dq(*a, (), kern=kern, cfg=cfg))
    dkdv = jax.jit(lambda *a: mbwd._dkdv(*a, (), kern=kern, cfg=cfg))
    return (lambda: dq(*args)), (lambda: dkdv(*args))


def _torch_rows(q, k, v, do, reps):
    """torch SDPA's and compiled flex_attention's forward + backward rows, timed as
    `bench_mosaic.py` times them (its forward-only rows dropped)."""
    from bench.bench_mosaic import _torch_rows as torch_rows
    from torch_bridge import array_to_torch

    rows = torch_rows(*(array_to_torch(x) for x in (q, k, v, do)), reps)
    return [row for row in rows if row[1] == "fwd+bwd"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="bf16 D128", choices=list(SHAPES))
    p.add_argument("--variants", default="[{}]", help="JSON list of MOSAIC_GPU kernel_options")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--torch", action="store_true", help="torch SDPA and flex rows too")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not any(d.platform == "gpu" for d in jax.devices()):
        raise SystemExit("bench_mosaic_bwd.py measures an H100/H200: it needs a CUDA GPU")
    B, H, S, D, _ = SHAPES[args.shape]
    q, k, v, do, bm = causal_inputs(args.shape)
    flops = 4 * B * H * S * S * D / 2 * 2.5  # causal forward + backward
    want = _grad_fn(bm, {"BACKEND": "TRITON"}, do)(q, k, v)
    rows = []
    for options in json.loads(args.variants):
        name = json.dumps(options, sort_keys=True)
        g = _grad_fn(bm, {**options, "BACKEND": "MOSAIC_GPU"}, do)
        try:
            got = g(q, k, v)
        except ValueError as e:  # a config that does not fit is reported, not fatal
            print(f"{name}: {e}", flush=True)
            continue
        err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                  for a, b in zip(got, want, strict=True))  # fmt: skip
        row = dict(impl=f"MOSAIC_GPU {name}", kind="fwd+bwd", ms=time_loop_jax(lambda: g(q, k, v), args.reps), err=err)  # fmt: skip
        dq, dkdv = _kernel_fns(q, k, v, do, bm, options)
        row["dq_ms"] = None if dq is None else time_loop_jax(dq, args.reps)
        row["dkdv_ms"] = time_loop_jax(dkdv, args.reps)
        rows.append(row)
        print(row, flush=True)
    triton = _grad_fn(bm, {"BACKEND": "TRITON"}, do)
    rows.append(dict(impl="TRITON", kind="fwd+bwd", ms=time_loop_jax(lambda: triton(q, k, v), args.reps), err=0.0))  # fmt: skip
    if args.torch:
        rows += [dict(impl=n, kind=kd, ms=ms, err=None) for n, kd, ms in _torch_rows(q, k, v, do, args.reps)]  # fmt: skip
    meta = meta_info("GPU", True)
    text = f"# Mosaic GPU backward variants, {meta['gpu']}, {meta['date']}\n\n{meta}\n\n"
    text += f"{args.shape}: B={B} H={H} S={S} D={D} causal; err: max |grad - Triton backend's|\n\n"
    text += "no dq kernel: dq fused into the dk/dv kernel (its time includes dq's)\n\n"
    text += "| impl | fwd+bwd ms | TFLOP/s | dq kernel ms | dk/dv kernel ms | err |\n"
    text += "|---|---|---|---|---|---|\n"
    fmt = lambda x: "" if x is None else f"{x:.3f}"
    for r in rows:
        text += (f"| {r['impl']} | {r['ms']:.3f} | {flops / r['ms'] / 1e9:.0f} | "
                 f"{fmt(r.get('dq_ms'))} | {fmt(r.get('dkdv_ms'))} | {fmt(r['err'])} |\n")  # fmt: skip
    print(text)
    write_report(args.out, text, dict(meta=meta, rows=rows))
    return rows


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
