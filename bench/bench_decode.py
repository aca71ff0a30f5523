"""Decoding: one new token's query over a long KV cache, flexjax beside torch in one run.

Shape (issue 7): B=8, 32 query heads over 8 kv heads (GQA), Q_LEN=1,
KV_LEN=32768, D=128, bf16, no mask, forward only. The work is reading K and
V once, so the figure of merit is the effective K/V read bandwidth:
bytes(K) + bytes(V) / time. Rows: flexjax (split-KV decode kernel, chosen
automatically; one row per kernel backend, `--backends`), flexjax with
`decode=False` (the regular forward), torch
flex_attention under torch.compile (its own decode kernel) and torch SDPA
(enable_gqa). A causal row (the query is the last position, so every key is
visible through a BlockMask with partial blocks) shows the mask_mod path.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 bench/bench_decode.py \\
        --out bench/results/decode_h100_<date>

With no GPU it runs a tiny shape in interpret mode and eager torch (a smoke
test of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from report import meta_info, write_report
from seed_table import rel_err
from timing import TIMERS
from torch.nn.attention import flex_attention as tfa

import flexjax as fj
from pallas_kernels.runtime import has_gpu
from torch_bridge import tensor_to_jax


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for dim, default in (("B", 8), ("Hq", 32), ("Hkv", 8), ("L", 1), ("S", 32768), ("D", 128)):
        p.add_argument(f"--{dim}", type=int, default=default)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", default=None, help="path prefix for .md and .json")
    p.add_argument(
        "--variants", default="[]",
        help='JSON list of extra kernel_options for more flexjax decode rows, e.g. [{"decode_block_n": 128}]',
    )  # fmt: skip
    p.add_argument(
        "--backends", default=None,
        help="kernel backends of the flexjax decode rows (kernel_options BACKEND); "
        "default TRITON,MOSAIC_GPU on a GPU, TRITON on a CPU (the smoke test's head dim is 16)",
    )  # fmt: skip
    p.add_argument(
        "--timer", choices=list(TIMERS), default="default",
        help="default: torch do_bench, JAX synchronised calls; loop: both back to back",
    )  # fmt: skip
    args = p.parse_args(argv)
    time_torch, time_jax = TIMERS[args.timer]
    variants = json.loads(args.variants)
    gpu = torch.cuda.is_available() and has_gpu()
    if not gpu:  # smoke-test sizes
        args.B, args.Hq, args.Hkv, args.S, args.D = 1, 4, 2, 256, 16
    reps = args.reps or (50 if gpu else 1)
    backends = (args.backends or ("TRITON,MOSAIC_GPU" if gpu else "TRITON")).split(",")
    dev = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16
    B, Hq, Hkv, L, S, D = args.B, args.Hq, args.Hkv, args.L, args.S, args.D
    torch.manual_seed(0)
    q = torch.randn(B, Hq, L, D, device=dev, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype)
    kv_bytes = 2 * k.numel() * k.element_size()

    def causal_end(b, h, q_idx, kv_idx):  # the query rows are the last L positions
        return q_idx + (S - L) >= kv_idx

    rows = []

    def add(impl, mask, ms, check):
        rows.append(dict(impl=impl, mask=mask, ms=ms, tb_per_s=kv_bytes / ms / 1e9, check=check))
        print(json.dumps(rows[-1]), flush=True)

    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        sdpa_ms = time_torch(
            lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), reps, gpu
        )
        add("torch SDPA", "none", sdpa_ms, None)
        flex = torch.compile(tfa.flex_attention, dynamic=False) if gpu else tfa.flex_attention
        t_bm = tfa.create_block_mask(
            lambda b, h, q_idx, kv_idx: q_idx + (S - L) >= kv_idx, 1, 1, L, S, device=dev
        )
        for mask, bm in (("none", None), ("causal", t_bm)):
            fn = lambda bm=bm: flex(q, k, v, block_mask=bm, enable_gqa=True)
            t_out = fn()
            add("torch flex_attention", mask, time_torch(fn, reps, gpu), rel_err(t_out, ref))

    jq, jk, jv = (tensor_to_jax(x, "input") for x in (q, k, v))
    j_bm = fj.create_block_mask(causal_end, 1, 1, L, S)
    for mask, bm in (("none", None), ("causal", j_bm)):
        runs = [(f"flexjax decode {b}", {"BACKEND": b}) for b in backends]
        if mask == "none":
            runs += [("flexjax regular", {"decode": False})]
            runs += [(f"flexjax decode {json.dumps(o)}", o) for o in variants]
        for impl, options in runs:
            attend = jax.jit(
                lambda q, k, v, bm=bm, options=options: fj.flex_attention(
                    q, k, v, block_mask=bm, enable_gqa=True, kernel_options=options
                )
            )
            out = attend(jq, jk, jv)
            check = rel_err(np.asarray(out.astype(jnp.float32)), ref)
            add(impl, mask, time_jax(lambda attend=attend: attend(jq, jk, jv), reps), check)

    meta = dict(meta_info("decode", gpu), timer=args.timer)
    shape = dict(B=B, Hq=Hq, Hkv=Hkv, Q_LEN=L, KV_LEN=S, D=D, dtype="bfloat16")
    lines = [
        f"# Decoding: {meta['gpu']}, {meta['date']}",
        "",
        f"{meta['gpu']} (driver {meta['driver']}), jax {meta['jax']}, torch {meta['torch']}, "
        f"triton {meta['triton']}. Command: `{meta['command']}`.",
        f"Shape: {shape}. K/V bytes read: {kv_bytes / 1e9:.3f} GB. "
        + (
            "Back-to-back calls, one sync, median of 3 loops (both libraries); "
            if args.timer == "loop"
            else "Median of synchronised runs; "
        )
        + "bandwidth = K/V bytes / time. "
        "check: max error / max magnitude vs torch SDPA.",
        "",
        "| implementation | mask | ms | K/V TB/s | check |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        check = "-" if r["check"] is None else f"{r['check']:.1e}"
        lines.append(
            f"| {r['impl']} | {r['mask']} | {r['ms']:.3f} | {r['tb_per_s']:.2f} | {check} |"
        )
    write_report(args.out, "\n".join(lines) + "\n", dict(meta=meta, shape=shape, rows=rows))


if __name__ == "__main__":
    main()
