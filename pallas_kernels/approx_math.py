"""tanh_approx: a primitive that kernels lower to the GPU's `tanh.approx.f32`.

Soft-capping (`cap * tanh(s / cap)`, Gemma 2) spends most of its time in an
exact tanh. PTX has a one-instruction approximation (max relative error about
2^-10.99). The seed's PyTorch version failed in ptxas because its inline asm
was written "tanh.approx.f32 0,1;"; operands must be "$0, $1". Pallas' Triton
backend ships that exact instruction as `approx_tanh`, which the kernels use
when they meet this primitive in a traced mod.

Outside a GPU kernel (the dense reference, create_mask, interpret mode) it
evaluates as `jnp.tanh`. Its derivative is written in terms of the output,
`1 - t^2`, as in the seed, so the backward costs no second tanh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["tanh_approx", "tanh_approx_p"]

tanh_approx_p = Primitive("flexjax_tanh_approx")
tanh_approx_p.def_impl(jnp.tanh)
tanh_approx_p.def_abstract_eval(lambda aval: aval)
mlir.register_lowering(tanh_approx_p, mlir.lower_fun(jnp.tanh, multiple_results=False))
batching.defvectorized(tanh_approx_p)
ad.defjvp2(tanh_approx_p, lambda g, ans, x: g * (1 - ans * ans))


def tanh_approx(x: jax.Array) -> jax.Array:
    """tanh(x), computed with `tanh.approx.f32` inside flexjax's GPU kernels."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"tanh_approx needs a float input, got {x.dtype}")
    return tanh_approx_p.bind(x)
