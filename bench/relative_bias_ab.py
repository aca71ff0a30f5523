"""Relative-position biases (ALiBi) with `q_idx - kv_idx` converted as two vectors or as a tile.

A score_mod such as ALiBi's `score + slope * (q_idx - kv_idx)` converts an
integer tile to float32 per score; the evaluator now converts the row and
column index vectors instead and subtracts in float32 (`mod_eval._OuterSum`,
exact). This times both forms side by side: the Mosaic GPU kernels (the
backend whose index tiles are vectors; AUTO's choice on sm90) forward and
forward + backward (`jax.vjp` with out's cotangent), for causal (no
score_mod: the control), alibi_closure and alibi_functional, under a causal
BlockMask, with the loop timer (`timing.py`). Each form runs in its own process (kernels are cached per
program), the "tile" form with `mod_eval._F32_EXACT = -1`; outputs of the two
forms are compared bitwise.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 bench/relative_bias_ab.py \\
        --shape "bf16 D128" --out bench/results/<name>
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import flexjax as fj
from bench.bench_mosaic_bwd import SHAPES, causal_inputs
from bench.report import meta_info, write_report
from bench.timing import time_loop_jax
from flexjax import mods

FORMS = ("vectors", "tile")


def _mods(H: int):
    return {
        "causal": None,
        "alibi_closure": mods.generate_alibi_bias(H),
        "alibi_functional": mods.generate_alibi_functional(H),
    }


def run_form(shape: str, form: str, reps: int) -> dict:
    """{example: {fwd_ms, fwd_bwd_ms, out (a float32 digest list)}} for one form."""
    if form == "tile":
        from pallas_kernels import mod_eval

        mod_eval._F32_EXACT = -1  # no `_OuterSum`: the integer tile is converted
    q, k, v, do, bm = causal_inputs(shape)
    rows = {}
    for name, score_mod in _mods(q.shape[1]).items():
        attend = lambda q, k, v, m=score_mod: fj.flex_attention(
            q, k, v, m, block_mask=bm, kernel_options={"BACKEND": "MOSAIC_GPU"}
        )
        fwd = jax.jit(attend)

        def fwd_bwd(q, k, v, attend=attend):
            out, pull = jax.vjp(attend, q, k, v)
            return out, pull(do)

        fwd_bwd = jax.jit(fwd_bwd)
        out, grads = fwd_bwd(q, k, v)
        digest = [np.asarray(x.astype(jnp.float32)).ravel()[:: max(1, x.size // 4096)].tolist()
                  for x in (out, *grads)]  # fmt: skip
        rows[name] = dict(
            fwd_ms=time_loop_jax(lambda f=fwd: f(q, k, v), reps),
            fwd_bwd_ms=time_loop_jax(lambda f=fwd_bwd: f(q, k, v), reps),
            digest=digest,
        )
        print(form, name, rows[name]["fwd_ms"], rows[name]["fwd_bwd_ms"], file=sys.stderr)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="bf16 D128", choices=["bf16 D128", "fp16 D64", "small"])
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--form", choices=FORMS, default=None, help="(internal: one form's process)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    gpu = any(d.platform == "gpu" for d in jax.devices())
    reps = args.reps or (20 if gpu else 1)
    if args.form:  # a child: one form, its rows as JSON on the last line
        print(json.dumps(run_form(args.shape, args.form, reps)))
        return None
    results = {}
    for form in FORMS:
        cmd = [sys.executable, os.path.abspath(__file__), "--shape", args.shape, "--form", form,
               "--reps", str(reps)]  # fmt: skip
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        results[form] = json.loads(done.stdout.strip().splitlines()[-1])
    meta = meta_info(args.shape, gpu)
    B, H, S, D, dt = SHAPES[args.shape]
    text = (
        f"# ALiBi's relative positions: vectors against a tile, {meta['gpu']}, {meta['date']}\n\n"
    )
    text += f"{meta}\n\nB={B} H={H} S={S} D={D} {dt}, causal BlockMask; loop timer, ms a call; "
    text += "'same': the two forms' outputs and gradients bitwise equal (a sample)\n\n"
    text += "| example | fwd: vectors | fwd: tile | fwd+bwd: vectors | fwd+bwd: tile | same |\n"
    text += "|---|---|---|---|---|---|\n"
    for name in results["vectors"]:
        a, b = results["vectors"][name], results["tile"][name]
        a["same"] = b["same"] = a.pop("digest") == b.pop("digest")  # (kept out of the JSON)
        text += (f"| {name} | {a['fwd_ms']:.3f} | {b['fwd_ms']:.3f} | {a['fwd_bwd_ms']:.3f} | "
                 f"{b['fwd_bwd_ms']:.3f} | {'yes' if a['same'] else 'NO'} |\n")  # fmt: skip
    write_report(args.out, text, dict(meta=meta, rows=results))
    return results


if __name__ == "__main__":
    main()
