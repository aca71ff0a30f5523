"""Tanh soft-capping (Gemma 2): `cap * tanh(score / cap)` keeps logits in (-cap, cap).

With `approx=True` the tanh is `pallas_kernels.tanh_approx`, which the GPU
kernels lower to the one-instruction `tanh.approx.f32` (the seed's example,
whose inline asm did not assemble). The seed uses cap = 2.
"""

import jax.numpy as jnp

from pallas_kernels.approx_math import tanh_approx


def generate_tanh_softcap(soft_cap: float, approx: bool = False):
    if soft_cap <= 0:
        raise ValueError(f"soft_cap must be positive, got {soft_cap}")
    tanh = tanh_approx if approx else jnp.tanh

    def tanh_softcap(score, b, h, q_idx, kv_idx):
        return soft_cap * tanh(score / soft_cap)

    tanh_softcap.__qualname__ = f"tanh_softcap{'_approx' if approx else ''}_{soft_cap:g}"
    return tanh_softcap
