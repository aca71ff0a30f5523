"""Forward time of flexjax vs torch's compiled flex_attention, same card, same run.

A first side-by-side for the forward kernel (the full table with backward,
SDPA and cuDNN rows is bench/ issue 6's). Seed shape: B=16, H=16, S=8192,
D=64, float16; medians of triton.testing.do_bench (CUDA events) for torch and
of synchronised wall-clock repetitions for JAX.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/fwd_vs_torch.py --examples causal noop
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch.nn.attention import flex_attention as tfa

import flexjax as fj
from flexjax.examples import EXAMPLES


def time_jax(fn, reps=20):
    jax.block_until_ready(fn())
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main():
    import sys

    sys.path.insert(0, "tests")
    import torch_twins
    from triton.testing import do_bench

    p = argparse.ArgumentParser()
    p.add_argument(
        "--examples", nargs="+", default=["noop", "causal", "sliding_window", "document"]
    )
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_default_device("cuda")  # the twins' captured tensors live on the GPU
    compiled = torch.compile(tfa.flex_attention, dynamic=False)
    rows = []
    for name in args.examples:
        case = EXAMPLES[name].case("seed")
        S = case.KV_LEN
        shape = (case.B, case.H, S, case.D)
        tdtype = {jnp.float16: torch.float16, jnp.bfloat16: torch.bfloat16}.get(
            case.dtype.type, torch.float32
        )
        tq, tk, tv = (torch.randn(shape, device="cuda", dtype=tdtype) for _ in range(3))
        score_twin, mask_twin = torch_twins.twin(name, case.H, S)
        tbm = None
        if mask_twin is not None:
            tbm = tfa.create_block_mask(mask_twin, 1, 1, S, S, device="cuda")
        t_ms = do_bench(
            lambda: compiled(tq, tk, tv, score_mod=score_twin, block_mask=tbm), return_mode="median"
        )
        q, k, v = (jnp.asarray(np.asarray(x.float().cpu()), case.dtype) for x in (tq, tk, tv))
        bm = None
        if case.mask_mod is not None:
            bm = fj.create_block_mask(case.mask_mod, 1, 1, S, S)
        kern = jax.jit(lambda q, k, v: fj.flex_attention(q, k, v, case.score_mod, bm))
        j_ms = time_jax(lambda: kern(q, k, v))
        density = 1.0 if bm is None else (100 - bm.sparsity()) / 100
        flops = 4 * density * case.B * case.H * case.D * S * S
        row = dict(
            example=name,
            torch_ms=t_ms,
            flexjax_ms=j_ms,
            ratio=j_ms / t_ms,
            torch_tflops=flops / t_ms / 1e9,
            flexjax_tflops=flops / j_ms / 1e9,
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| example | torch flex FW ms | flexjax FW ms | flexjax/torch | flexjax TFLOP/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['example']} | {r['torch_ms']:.3f} | {r['flexjax_ms']:.3f} | "
            f"{r['ratio']:.2f} | {r['flexjax_tflops']:.0f} |"
        )
    if args.out:
        meta = dict(
            gpu=torch.cuda.get_device_name(),
            jax=jax.__version__,
            torch=torch.__version__,
            date=time.strftime("%Y-%m-%d"),
        )
        with open(args.out, "w") as fh:
            json.dump(dict(meta=meta, rows=rows), fh, indent=2)


if __name__ == "__main__":
    main()
