"""The Mosaic GPU backend beside Triton, cuDNN, torch SDPA and torch flex_attention (issue 18).

Shapes (causal, one run, one card): the issue's bf16 D=128 B=4 H=16 S=8192,
and the seed's fp16 D=64 B=16 H=16 S=8192. For each: forward, and forward +
backward (flexjax's MOSAIC_GPU backend runs its own forward and backward
kernels; "fused dq" is its backward with dq accumulated in the dk/dv kernel by
TMA reduce-add rather than in a separate kernel). Every row is timed the same way, the loop timer
(`timing.py`: back-to-back calls, one sync, median of three loops).
TFLOP/s counts the causal half of 4*B*H*S*S*D (forward; x2.5 with the
backward). flexjax's MOSAIC_GPU rows give each forward config tried (K/V
ring depth, schedule barrier, longest rows first, pipelined: each step's
QK^T issued together with the previous step's PV), forward + backward for
the first only (they share its backward); a config that does not fit shared
memory is reported and skipped.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 bench/bench_mosaic.py \\
        --out bench/results/mosaic_gpu_h100_<date>
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as tfa

import flexjax as fj
from bench.report import meta_info, write_report
from bench.timing import time_loop_jax, time_loop_torch
from torch_bridge import tensor_to_jax

SHAPES = {
    "bf16 D128": (4, 16, 8192, 128, torch.bfloat16),
    "fp16 D64": (16, 16, 8192, 64, torch.float16),
}
# (MOSAIC_STAGES, MOSAIC_SCHEDULE_BARRIER, MOSAIC_LONGEST_FIRST, MOSAIC_PIPELINED); the first
# is D=128's default, the last D=64's (`fwd.default_config`)
CONFIGS = [(2, False, True, True), (2, True, True, True), (2, True, True, False),
           (2, False, True, False), (2, False, False, True), (3, True, True, False),
           (4, True, True, False)]  # fmt: skip


def _add(rows, row):
    rows.append(row)
    print(f"{row[0]} | {row[1]} | {row[2]:.3f} ms", flush=True)


def _jax_rows(q, k, v, do, bm, reps, n_configs):
    rows = []

    def fwd_bwd(options):
        def loss(q, k, v):
            out = fj.flex_attention(q, k, v, block_mask=bm, kernel_options=options)
            return jnp.vdot(out.astype(jnp.float32), do.astype(jnp.float32))

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    variants = [("flexjax TRITON", {"BACKEND": "TRITON"})]
    variants += [
        (f"flexjax MOSAIC_GPU stages={s} sched={b} longest_first={lf} pipelined={pipe}",
         {"BACKEND": "MOSAIC_GPU", "MOSAIC_STAGES": s, "MOSAIC_SCHEDULE_BARRIER": b,
          "MOSAIC_LONGEST_FIRST": lf, "MOSAIC_PIPELINED": pipe})
        for s, b, lf, pipe in CONFIGS[:n_configs]
    ]  # fmt: skip
    variants.append(
        ("flexjax MOSAIC_GPU fused dq", {"BACKEND": "MOSAIC_GPU", "MOSAIC_FUSED_DQ": True})
    )
    with_bwd = {variants[0][0], variants[1][0], variants[-1][0]}
    for name, options in variants:
        f = jax.jit(functools.partial(fj.flex_attention, block_mask=bm, kernel_options=options))
        try:
            _add(rows, (name, "fwd", time_loop_jax(lambda: f(q, k, v), reps)))
        except Exception as e:  # noqa: BLE001 -- a config that does not fit is reported, not fatal
            print(f"{name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        if name in with_bwd:  # (the other forward configs share the default's backward)
            g = fwd_bwd(options)
            _add(rows, (name, "fwd+bwd", time_loop_jax(lambda: g(q, k, v), reps)))
    qs, ks, vs = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    cud = jax.jit(
        lambda a, b, c: jax.nn.dot_product_attention(
            a, b, c, is_causal=True, implementation="cudnn"
        )
    )
    _add(rows, ("jax cuDNN", "fwd", time_loop_jax(lambda: cud(qs, ks, vs), reps)))

    def cud_loss(a, b, c):
        out = jax.nn.dot_product_attention(a, b, c, is_causal=True, implementation="cudnn")
        return jnp.vdot(out.astype(jnp.float32), do.transpose(0, 2, 1, 3).astype(jnp.float32))

    cg = jax.jit(jax.grad(cud_loss, argnums=(0, 1, 2)))
    _add(rows, ("jax cuDNN", "fwd+bwd", time_loop_jax(lambda: cg(qs, ks, vs), reps)))
    return rows


def _torch_rows(tq, tk, tv, tdo, reps):
    rows = []
    S = tq.shape[2]
    gqa = {"enable_gqa": True} if tk.shape[1] != tq.shape[1] else {}  # fewer kv heads
    sdpa = lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, **gqa)
    _add(rows, ("torch SDPA", "fwd", time_loop_torch(sdpa, reps, True)))
    leaves = [x.detach().requires_grad_() for x in (tq, tk, tv)]
    fb = lambda: F.scaled_dot_product_attention(*leaves, is_causal=True, **gqa).backward(tdo)
    _add(rows, ("torch SDPA", "fwd+bwd", time_loop_torch(fb, reps, True, leaves)))
    t_bm = tfa.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, S, S, device="cuda")
    torch._dynamo.reset()
    flex = torch.compile(tfa.flex_attention, dynamic=False)
    _add(
        rows,
        (
            "torch flex",
            "fwd",
            time_loop_torch(lambda: flex(tq, tk, tv, block_mask=t_bm, **gqa), reps, True),
        ),
    )
    fbf = lambda: flex(*leaves, block_mask=t_bm, **gqa).backward(tdo)
    _add(rows, ("torch flex", "fwd+bwd", time_loop_torch(fbf, reps, True, leaves)))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--configs", type=int, default=len(CONFIGS), help="MOSAIC_GPU configs to time")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_mosaic.py measures an H100/H200: it needs a CUDA GPU")
    meta = meta_info("GPU", True)
    text = f"# Mosaic GPU backend, {meta['gpu']}, {meta['date']}\n\n{meta}\n"
    payload = dict(meta=meta, rows=[])
    for shape_name in args.shapes.split(","):
        B, H, S, D, dt = SHAPES[shape_name]
        gen = torch.Generator(device="cuda").manual_seed(0)
        tq, tk, tv, tdo = (
            torch.randn(B, H, S, D, generator=gen, device="cuda", dtype=dt) for _ in range(4)
        )
        q, k, v, do = (tensor_to_jax(x, "x") for x in (tq, tk, tv, tdo))
        bm = fj.create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S)
        rows = _jax_rows(q, k, v, do, bm, args.reps, args.configs) + _torch_rows(
            tq, tk, tv, tdo, args.reps
        )
        flops = 4 * B * H * S * S * D / 2
        sdpa = {kind: ms for name, kind, ms in rows if name == "torch SDPA"}
        text += f"\n## {shape_name}: B={B} H={H} S={S} D={D} causal\n\n"
        text += "| impl | pass | ms | TFLOP/s | / SDPA |\n|---|---|---|---|---|\n"
        for name, kind, ms in rows:
            tf = flops * (2.5 if kind == "fwd+bwd" else 1.0) / ms / 1e9
            text += f"| {name} | {kind} | {ms:.3f} | {tf:.0f} | {ms / sdpa[kind]:.3f} |\n"
            payload["rows"].append(dict(shape=shape_name, impl=name, kind=kind, ms=ms, tflops=tf))
        print(text.splitlines()[-1], flush=True)
    write_report(args.out, text, payload)


if __name__ == "__main__":
    main()
