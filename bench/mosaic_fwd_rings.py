"""The Mosaic GPU forward's K/V ring depth and step order at fp16 D=64 (issue 18): loop timer.

fp16 D=64 B=16 H=16 S=8192, causal (BlockMask) and noop (no mask), forward
only, flexjax MOSAIC_GPU with MOSAIC_STAGES x MOSAIC_PIPELINED as given
("stages,pipelined" arguments, pipelined 0 or 1; default: 2,1 3,1 4,1 4,0);
each row `time_loop_jax` (20 back-to-back calls, one sync, median of three
loops) and TFLOP/s (4 B H S^2 D, halved under the causal mask). The data of
`fwd.default_config`'s choice at D=64.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 bench/mosaic_fwd_rings.py 2,0 4,0 2,1
"""

import sys

import jax
import jax.numpy as jnp
from timing import time_loop_jax

import flexjax as fj
from flexjax.masks import causal_mask
from pallas_kernels.runtime import has_gpu


def main(argv):
    if not has_gpu():
        raise SystemExit("mosaic_fwd_rings.py times the Mosaic GPU kernels: it needs an sm90 GPU")
    B, H, S, D = 16, 16, 8192, 64
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (B, H, S, D), jnp.float16) for kk in ks)
    causal = fj.create_block_mask(causal_mask, None, None, S, S)
    runs = [tuple(int(x) for x in a.split(",")) for a in argv] or [(2, 1), (3, 1), (4, 1), (4, 0)]
    print("| mask | config | ms | TFLOP/s |\n|---|---|---|---|")
    for mask_name, bm in (("causal", causal), ("noop", None)):
        flops = 4 * B * H * S * S * D * (0.5 if bm is not None else 1.0)
        for stages, pipe in runs:
            opts = {
                "BACKEND": "MOSAIC_GPU",
                "MOSAIC_STAGES": stages,
                "MOSAIC_PIPELINED": bool(pipe),
            }
            f = jax.jit(lambda q, k, v, o=opts, bm=bm: fj.flex_attention(q, k, v, block_mask=bm, kernel_options=o))  # fmt: skip
            ms = time_loop_jax(lambda f=f: f(q, k, v), 20)
            print(f"| {mask_name} | stages={stages} pipelined={bool(pipe)} | {ms:.3f} | {flops / ms / 1e9:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
