"""Forward and backward time of flexjax vs torch's compiled flex_attention, same card, same run.

A side-by-side of the kernels alone (the full table with SDPA and cuDNN rows
is issue 6's). Seed shapes (B=16, H=16, S=8192, D=64, float16; document at
S=32768); medians of triton.testing.do_bench (CUDA events) for torch and of
synchronised wall-clock repetitions for JAX. Backward alone: torch's
`out.backward(dout, retain_graph=True)`; flexjax's pullback from `jax.vjp`,
jitted, with the forward's residuals already computed. TFLOP/s count
4 B H S^2 D density for the forward and 2.5 times that for the backward.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/flex_vs_torch.py --examples causal noop
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from timing import time_jax
from torch.nn.attention import flex_attention as tfa

import flexjax as fj
from flexjax.examples import EXAMPLES


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
        fwd = lambda: compiled(tq, tk, tv, score_mod=score_twin, block_mask=tbm)
        t_fw = do_bench(fwd, return_mode="median")
        tq_, tk_, tv_ = (x.detach().requires_grad_() for x in (tq, tk, tv))
        t_out = compiled(tq_, tk_, tv_, score_mod=score_twin, block_mask=tbm)
        t_dout = torch.randn_like(t_out)
        t_bw = do_bench(
            lambda t_out=t_out, t_dout=t_dout: t_out.backward(t_dout, retain_graph=True),
            grad_to_none=[tq_, tk_, tv_],
            return_mode="median",
        )
        del t_out, tq_, tk_, tv_
        q, k, v, dout = (
            jnp.asarray(np.asarray(x.float().cpu()), case.dtype) for x in (tq, tk, tv, t_dout)
        )
        bm = None
        if case.mask_mod is not None:
            bm = fj.create_block_mask(case.mask_mod, 1, 1, S, S)
        attend = lambda q, k, v: fj.flex_attention(q, k, v, case.score_mod, bm)
        kern = jax.jit(attend)
        j_fw = time_jax(lambda: kern(q, k, v))
        _, pullback = jax.vjp(attend, q, k, v)
        bwd = jax.jit(lambda pullback, dout: pullback(dout))
        j_bw = time_jax(lambda pullback=pullback: bwd(pullback, dout))
        del pullback
        density = 1.0 if bm is None else (100 - bm.sparsity()) / 100
        flops = 4 * density * case.B * case.H * case.D * S * S
        row = dict(
            example=name if S == 8192 else f"{name} (S={S})",
            torch_fw_ms=t_fw,
            flexjax_fw_ms=j_fw,
            fw_ratio=j_fw / t_fw,
            torch_bw_ms=t_bw,
            flexjax_bw_ms=j_bw,
            bw_ratio=j_bw / t_bw,
            flexjax_fw_tflops=flops / j_fw / 1e9,
            flexjax_bw_tflops=2.5 * flops / j_bw / 1e9,
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "\n| example | torch FW ms | flexjax FW ms | FW ratio | torch BW ms | flexjax BW ms "
        "| BW ratio | flexjax FW / BW TFLOP/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['example']} | {r['torch_fw_ms']:.3f} | {r['flexjax_fw_ms']:.3f} | "
            f"{r['fw_ratio']:.2f} | {r['torch_bw_ms']:.3f} | {r['flexjax_bw_ms']:.3f} | "
            f"{r['bw_ratio']:.2f} | {r['flexjax_fw_tflops']:.0f} / {r['flexjax_bw_tflops']:.0f} |"
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
