"""Run one forward kernel a few times, flexjax's or torch's, for a profiler to catch.

Performance questions about the kernels are answered by comparing the two
libraries' kernels instruction by instruction: on an H100 under Nsight Compute

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. ncu --clock-control none \\
        -k regex:'flex_fwd|triton_tem' -c 1 --section SpeedOfLight \\
        --section WarpStateStats --section SourceCounters -o noop_jax \\
        python3 bench/profile_fwd.py --example noop --lib jax
    ncu -i noop_jax.ncu-rep --page source --print-source sass --csv > noop_jax_sass.csv

gives the SASS with executed counts and stall samples per instruction
(`bench/results/profile_noop_fwd_h100_2026-11-25.md` is such a comparison).
Shapes are the seed's (fp16, B=16, H=16, S=8192, D=64) or, with
--dtype bfloat16, B=4, D=128.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

import flexjax as fj
from flexjax import masks


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--example", choices=["noop", "causal"], default="noop")
    p.add_argument("--lib", choices=["jax", "torch"], default="jax")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    p.add_argument("--options", default="{}", help="flexjax kernel_options as JSON")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    B, H, S, D = (16, 16, 8192, 64) if args.dtype == "float16" else (4, 16, 8192, 128)
    if args.lib == "torch":
        import torch
        from torch.nn.attention import flex_attention as tfa

        dt = getattr(torch, args.dtype)
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dt) for _ in range(3))
        bm = None
        if args.example == "causal":
            bm = tfa.create_block_mask(causal, 1, 1, S, S, device="cuda")
        f = torch.compile(tfa.flex_attention, dynamic=False)
        for _ in range(args.runs):
            f(q, k, v, block_mask=bm)
        torch.cuda.synchronize()
    else:
        ks = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(kk, (B, H, S, D), jnp.dtype(args.dtype)) for kk in ks)
        bm = None
        if args.example == "causal":
            bm = fj.create_block_mask(masks.causal_mask, 1, 1, S, S)
        options = json.loads(args.options)
        f = jax.jit(
            lambda q, k, v: fj.flex_attention(q, k, v, block_mask=bm, kernel_options=options)
        )
        for _ in range(args.runs):
            out = f(q, k, v)
        jax.block_until_ready(out)
    print(f"ran {args.runs} {args.lib} {args.example} forwards at B={B} H={H} S={S} D={D}")


if __name__ == "__main__":
    main()
