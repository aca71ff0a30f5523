"""flex_attention on Explicit mesh axes (jax.make_mesh + jax.set_mesh): sharding read from the types.

The call shards itself over q's batch and head split: results and gradients
equal one device, outputs keep q's sharding, and the compiled program moves
no q, k, v or output between devices (no all-gather, all-to-all or
collective-permute; the only all-reduce is the gradient of a replicated
captured array).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_qkv
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import flexjax as fj

TOL = dict(atol=2e-5, rtol=2e-5)


def alibi(slopes):
    def learnable_alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx) * 0.05 + 0.3 * b

    return learnable_alibi


def collectives(compiled_text: str) -> dict:
    names = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
    return {n: len(re.findall(rf"\b{n}(-start)?\(", compiled_text)) for n in names}


@pytest.mark.parametrize(
    "shape,names,spec,Hkv,Bkv",
    [((2, 2), ("dp", "tp"), P("dp", "tp"), 2, 2), ((4,), ("tp",), P(None, "tp"), 4, 1)],
)
def test_explicit_mesh_shards_itself(shape, names, spec, Hkv, Bkv):
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(shape))
    B, Hq, L, S = 2, 4, 64, 80
    q0, k0, v0 = random_qkv(0, B, Hq, L, S, 16, Hkv=Hkv, Bkv=Bkv)
    slopes = jnp.linspace(-1.0, 1.0, Hq)
    bm = fj.create_block_mask(lambda b, h, qi, kv: qi + 16 >= kv, 1, 1, L, S, BLOCK_SIZE=32)
    want = fj.flex_attention(q0, k0, v0, alibi(slopes), bm, enable_gqa=True)
    loss = lambda q, k, v, s: jnp.sum(
        jnp.sin(fj.flex_attention(q, k, v, alibi(s), bm, enable_gqa=True))
    )
    want_grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q0, k0, v0, slopes)

    with jax.set_mesh(mesh):
        kv_spec = P(spec[0] if Bkv > 1 else None, *tuple(spec)[1:])
        q = jax.device_put(q0, NamedSharding(mesh, spec))
        k, v = (jax.device_put(x, NamedSharding(mesh, kv_spec)) for x in (k0, v0))
        attend = jax.jit(
            lambda q, k, v, s: fj.flex_attention(q, k, v, alibi(s), bm, enable_gqa=True)
        )
        out = attend(q, k, v, slopes)
        assert jax.typeof(out).sharding.spec[:2] == tuple(spec)[:2] + (None,) * (2 - len(spec))
        np.testing.assert_allclose(out, want, **TOL)
        counts = collectives(attend.lower(q, k, v, slopes).compile().as_text())
        assert counts == dict.fromkeys(counts, 0), counts
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        for g, w in zip(grad(q, k, v, slopes), want_grads, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
        counts = collectives(grad.lower(q, k, v, slopes).compile().as_text())
        # The one allowed: summing the captured slopes' per-shard gradients (and k/v's
        # when they are broadcast over a sharded batch).
        assert counts["all-gather"] == counts["all-to-all"] == counts["collective-permute"] == 0


def test_explicit_mesh_jax_layout():
    """dot_product_attention on [B, T, N, H] arrays split P("dp", None, "tp") over Explicit axes."""
    mesh = jax.make_mesh((2, 2), ("dp", "tp"), axis_types=(AxisType.Explicit,) * 2)
    B, Hq, Hkv, L, S = 2, 4, 2, 64, 80
    q0, k0, v0 = (jnp.swapaxes(x, 1, 2) for x in random_qkv(2, B, Hq, L, S, 16, Hkv=Hkv))
    slopes = jnp.linspace(-1.0, 1.0, Hq)
    bm = fj.create_block_mask(lambda b, h, qi, kv: qi + 16 >= kv, 1, 1, L, S, BLOCK_SIZE=32)
    call = lambda q, k, v, s: fj.dot_product_attention(q, k, v, alibi(s), bm)
    loss = lambda q, k, v, s: jnp.sum(jnp.sin(call(q, k, v, s)))
    want = call(q0, k0, v0, slopes)
    want_grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q0, k0, v0, slopes)
    spec = P("dp", None, "tp")
    with jax.set_mesh(mesh):
        q, k, v = (jax.device_put(x, NamedSharding(mesh, spec)) for x in (q0, k0, v0))
        attend = jax.jit(call)
        out = attend(q, k, v, slopes)
        assert tuple(jax.typeof(out).sharding.spec)[:3] == ("dp", None, "tp")
        np.testing.assert_allclose(out, want, **TOL)
        counts = collectives(attend.lower(q, k, v, slopes).compile().as_text())
        assert counts == dict.fromkeys(counts, 0), counts
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        for g, w in zip(grad(q, k, v, slopes), want_grads, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
