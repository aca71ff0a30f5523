"""One GPU: the B=8, H=16 problem of bench_mesh.py's shard part beside its quarters and halves.

How much faster one GPU runs a quarter (or half) of the work bounds what 4 (or 2) GPUs can
gain by batch/head sharding, whatever the mesh does (issue 15). Causal, bf16, S=8192, D=128,
loop timer. Usage on a GPU:

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 bench/mesh_quarter.py out.json
"""

import json
import sys

import jax
import jax.numpy as jnp
from timing import time_loop_jax

import flexjax as fj

rows = []
for B, H in ((8, 16), (2, 16), (8, 4), (4, 16), (8, 8)):
    S, D = 8192, 128
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(x, (B, H, S, D), jnp.bfloat16) for x in ks)
    bm = fj.create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S)
    fwd = jax.jit(lambda q, k, v: fj.flex_attention(q, k, v, block_mask=bm))
    fb = jax.jit(
        lambda q, k, v, do: jax.vjp(
            lambda q, k, v: fj.flex_attention(q, k, v, block_mask=bm), q, k, v
        )[1](do)
    )
    r = dict(
        B=B,
        H=H,
        fwd_ms=time_loop_jax(lambda: fwd(q, k, v), 20),
        fwd_bwd_ms=time_loop_jax(lambda: fb(q, k, v, do), 10),
    )
    rows.append(r)
    print(r, flush=True)
base = rows[0]
for r in rows[1:]:
    n = (8 * 16) // (r["B"] * r["H"])
    print(
        f"B={r['B']} H={r['H']}: whole/part fwd {base['fwd_ms'] / r['fwd_ms']:.2f}x (ideal {n}), fwd+bwd {base['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x"
    )
json.dump(rows, open(sys.argv[1], "w"), indent=1)
