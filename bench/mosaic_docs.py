"""A document mask (16 documents, causal within each) on both kernel backends: time and agreement.

B=4 H=16 S=8192 D=128 bf16, forward, loop timer. The mask reads its
document ids at q_idx and kv_idx, which the Mosaic GPU kernel stages
through shared memory (`pallas_kernels/mosaic_gpu/staging.py`); the Triton
kernel gathers them. Prints each backend's ms and the largest difference.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 bench/mosaic_docs.py
"""

import jax
import jax.numpy as jnp
import numpy as np

import flexjax as fj
from bench.timing import time_loop_jax


def main():
    B, H, S, D = 4, 16, 8192, 128
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (B, H, S, D), jnp.float32).astype(jnp.bfloat16) for kk in keys)
    cuts = np.sort(np.random.default_rng(0).choice(np.arange(1, S), 15, replace=False))
    doc = jnp.asarray(np.searchsorted(cuts, np.arange(S), side="right").astype(np.int32))
    bm = fj.create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (doc[qi] == doc[ki]), 1, 1, S, S)
    outs = {}
    for backend in ("TRITON", "MOSAIC_GPU"):
        options = {"BACKEND": backend}
        f = jax.jit(
            lambda q, k, v, o=options: fj.flex_attention(q, k, v, block_mask=bm, kernel_options=o)
        )
        outs[backend] = f(q, k, v)
        print(backend, f"{time_loop_jax(lambda: f(q, k, v), 20):.3f} ms", flush=True)
    diff = jnp.abs(outs["TRITON"].astype(jnp.float32) - outs["MOSAIC_GPU"].astype(jnp.float32))
    print("max |mosaic - triton|", float(diff.max()))


if __name__ == "__main__":
    main()
