"""Sweep kernel configs (tiles, warps, stages) for one example: the data for tuned defaults.

For each forward config (block_m, block_n, num_warps, num_stages) and each
backward config (bwd_*), it times flexjax on the example through
`kernel_options`, checks the result against the default config's (max error /
max magnitude, so a config that compiles but computes garbage shows), and
records configs that fail to compile instead of stopping. Prints the configs
sorted by time and writes JSON.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 bench/sweep_configs.py \\
        --example checkerboard --out bench/results/sweep_checkerboard_h100
    ... --example causal --dtype bfloat16 --D 128 --B 4

With no GPU it runs a tiny space in interpret mode (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from timing import time_jax

import flexjax as fj
from flexjax.examples import EXAMPLES
from pallas_kernels.runtime import has_gpu
from pallas_kernels.triton.configs import AUTOTUNE_SPACE

# The Triton backend's autotune space: one definition (`pallas_kernels.triton.configs`),
# a forward and a backward space (the latter swept as the bwd_ kernel_options).
SPACE_KEYS = tuple(AUTOTUNE_SPACE["gpu"]["fwd"])


def configs(space, prefix=""):
    keys = list(space)
    for values in itertools.product(*(space[k] for k in keys)):
        yield {prefix + k: v for k, v in zip(keys, values, strict=True)}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.abs(a - b).max()) / max(float(np.abs(b).max()), 1e-6)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--example", default="causal", choices=list(EXAMPLES))
    for dim in ("B", "H", "S", "D"):
        p.add_argument(f"--{dim}", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--only", choices=["fwd", "bwd"], default=None)
    p.add_argument("--out", default=None, help="path prefix for .json")
    for key in SPACE_KEYS:
        p.add_argument(
            "--" + key.replace("_", "-"), type=int, nargs="+", default=None,
            help=f"restrict both spaces' {key} to these values",
        )  # fmt: skip
    args = p.parse_args(argv)
    gpu = has_gpu()
    overrides = {d: getattr(args, d) for d in ("B", "H", "S", "D") if getattr(args, d)}
    if args.dtype:
        overrides["dtype"] = jnp.dtype(args.dtype)
    case = EXAMPLES[args.example].case("seed" if gpu else "small", **overrides)
    spaces = {kind: dict(s) for kind, s in AUTOTUNE_SPACE["gpu" if gpu else "interpret"].items()}
    for key in SPACE_KEYS:
        if getattr(args, key) is not None:
            for space in spaces.values():
                space[key] = tuple(getattr(args, key))
    reps = args.reps or (20 if gpu else 1)

    ks = jax.random.split(jax.random.key(0), 4)
    shape_q = (case.B, case.H, case.Q_LEN, case.D)
    shape_kv = (case.B, case.H, case.KV_LEN, case.D)
    q, k, v = (
        jax.random.normal(kk, s, case.dtype)
        for kk, s in zip(ks[:3], (shape_q, shape_kv, shape_kv), strict=True)
    )
    dout = jax.random.normal(ks[3], shape_q, case.dtype)
    bm = None
    if case.mask_mod is not None:
        bm = fj.create_block_mask(case.mask_mod, 1, 1, case.Q_LEN, case.KV_LEN)

    def attend(options):
        return lambda q, k, v: fj.flex_attention(
            q, k, v, case.score_mod, bm, kernel_options=options
        )

    base_out, base_pull = jax.vjp(attend({}), q, k, v)
    base_grads = base_pull(dout)
    rows = []
    phases = [("fwd", configs(spaces["fwd"])), ("bwd", configs(spaces["bwd"], "bwd_"))]
    for phase, space_iter in phases:
        if args.only and phase != args.only:
            continue
        for options in space_iter:
            t0 = time.perf_counter()
            row = dict(phase=phase, options=options)
            try:
                if phase == "fwd":
                    kern = jax.jit(attend(options))
                    row["ms"] = time_jax(lambda kern=kern: kern(q, k, v), reps)
                    row["err"] = rel_err(kern(q, k, v), base_out)
                else:
                    _, pull = jax.vjp(attend(options), q, k, v)
                    bwd = jax.jit(lambda pull, dout: pull(dout))
                    row["ms"] = time_jax(lambda pull=pull, bwd=bwd: bwd(pull, dout), reps)
                    grads = bwd(pull, dout)
                    row["err"] = max(rel_err(g, b) for g, b in zip(grads, base_grads, strict=True))
            except Exception as e:  # a config that does not compile is a result, not a crash
                row["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                meta = dict(
                    example=args.example, shape=dict(B=case.B, H=case.H, L=case.Q_LEN, S=case.KV_LEN, D=case.D),
                    dtype=jnp.dtype(case.dtype).name, device=str(jax.devices()[0].device_kind),
                    jax=jax.__version__, date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv),
                )  # fmt: skip
                with open(args.out + ".json", "w") as fh:
                    json.dump(dict(meta=meta, rows=rows), fh, indent=2)
    for phase in ("fwd", "bwd"):
        done = sorted((r for r in rows if r["phase"] == phase and "ms" in r), key=lambda r: r["ms"])
        if not done:
            continue
        print(f"\n{phase}: fastest first")
        for r in done[:10]:
            print(f"  {r['ms']:9.3f} ms  err {r['err']:.1e}  {r['options']}")
        failed = [r for r in rows if r["phase"] == phase and "failed" in r]
        if failed:
            print(
                f"  {len(failed)} configs failed, e.g. {failed[0]['options']}: {failed[0]['failed']}"
            )


if __name__ == "__main__":
    main()
