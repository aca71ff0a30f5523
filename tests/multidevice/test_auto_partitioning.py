"""flex_attention under jax.jit on arrays placed by NamedSharding over Auto mesh axes.

Each kernel stage is a custom_partitioning op (`pallas_kernels.partition`):
batch and head shardings run on the local shards, results and gradients
equal one device, outputs keep the inputs' sharding, and the compiled
program moves no q, k, v, out or gradient between devices. The only
collective allowed is an all-reduce per differentiated captured array (and
for dk/dv of k/v broadcast over a sharded batch).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_qkv
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flexjax as fj

TOL = dict(atol=2e-5, rtol=2e-5)
GRAD_TOL = dict(atol=1e-4, rtol=1e-4)


def collectives(compiled_text: str) -> dict:
    names = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
    return {n: len(re.findall(rf"\b{n}(-start)?\(", compiled_text)) for n in names}


def alibi(slopes):
    def learnable_alibi(score, b, h, q_idx, kv_idx):  # reads b and h
        return score + slopes[h] * (kv_idx - q_idx) * 0.05 + 0.3 * b

    return learnable_alibi


def head_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= 16 * (h + 1))


CASES = {
    # name: (mesh shape, axis names, q spec, B, Hq, Hkv, Bkv)
    "batch": ((4,), ("dp",), P("dp"), 4, 2, 2, 4),
    "heads_gqa": ((4,), ("tp",), P(None, "tp"), 2, 8, 4, 2),
    "batch_and_heads": ((2, 2), ("dp", "tp"), P("dp", "tp"), 2, 4, 2, 2),
    "batch_kv_broadcast": ((4,), ("dp",), P("dp"), 4, 2, 1, 1),
}


def batch_and_heads(spec):
    return (tuple(spec) + (None, None))[:2]


def place(mesh, spec, *arrays):
    return [jax.device_put(x, NamedSharding(mesh, spec)) for x in arrays]


@pytest.mark.parametrize("name", list(CASES))
def test_auto_sharded_calls_equal_one_device_with_no_copies(name):
    shape, names, q_spec, B, Hq, Hkv, Bkv = CASES[name]
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), names)
    L, S = 64, 96
    q0, k0, v0 = random_qkv(0, B, Hq, L, S, 16, Hkv=Hkv, Bkv=Bkv)
    slopes = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, Hq), jnp.float32)
    bm = fj.create_block_mask(head_window, 1, Hq, L, S, BLOCK_SIZE=32)

    def attend(q, k, v, s):
        return fj.flex_attention(q, k, v, alibi(s), bm, enable_gqa=True, return_lse=True)

    def loss(q, k, v, s):
        out, lse = attend(q, k, v, s)
        return jnp.sum(jnp.sin(out)) + 0.1 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    want_out, want_lse = attend(q0, k0, v0, slopes)
    want_grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q0, k0, v0, slopes)

    kv_spec = q_spec if Bkv == B else P(None, *tuple(q_spec)[1:])
    (q,) = place(mesh, q_spec, q0)
    k, v = place(mesh, kv_spec, k0, v0)
    forward = jax.jit(attend)
    out, lse = forward(q, k, v, slopes)
    np.testing.assert_allclose(out, want_out, **TOL)
    np.testing.assert_allclose(lse, want_lse, **TOL)
    assert batch_and_heads(out.sharding.spec) == batch_and_heads(q_spec)
    counts = collectives(forward.lower(q, k, v, slopes).compile().as_text())
    assert counts == dict.fromkeys(counts, 0), counts

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    grads = grad(q, k, v, slopes)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, **GRAD_TOL)
    assert batch_and_heads(grads[0].sharding.spec) == batch_and_heads(q_spec)
    counts = collectives(grad.lower(q, k, v, slopes).compile().as_text())
    assert counts["all-gather"] == counts["all-to-all"] == counts["collective-permute"] == 0, counts
    # One all-reduce for the slopes' gradient (two more for dk, dv when k/v are broadcast).
    assert 1 <= counts["all-reduce"] <= (1 if Bkv == B else 3), counts


def test_decode_on_an_auto_sharded_batch():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("dp",))
    q0, k0, v0 = random_qkv(2, 4, 8, 3, 200, 16, Hkv=2)
    slopes = jnp.linspace(0.1, 1.0, 8)
    bm = fj.create_block_mask(lambda b, h, qi, kv: qi + 197 >= kv, 1, 1, 3, 200, BLOCK_SIZE=32)
    attend = jax.jit(lambda q, k, v: fj.flex_attention(q, k, v, alibi(slopes), bm, enable_gqa=True))
    want = attend(q0, k0, v0)
    q, k, v = place(mesh, P("dp"), q0, k0, v0)
    np.testing.assert_allclose(attend(q, k, v), want, **TOL)
    counts = collectives(attend.lower(q, k, v).compile().as_text())
    assert counts == dict.fromkeys(counts, 0), counts


def test_vmap_of_an_auto_sharded_call():
    """vmap over a leading dim of sharded arrays: the stages carry it (custom_vmap)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2), ("dp", "tp"))
    N, B, H, L = 3, 2, 4, 64
    qkv = [random_qkv(10 + i, B, H, L, L, 16) for i in range(N)]
    q0, k0, v0 = (jnp.stack(xs) for xs in zip(*qkv, strict=True))
    slopes = jnp.linspace(-1.0, 1.0, H)
    bm = fj.create_block_mask(lambda b, h, qi, kv: qi >= kv, 1, 1, L, L, BLOCK_SIZE=32)

    def attend(q, k, v, s):
        return fj.flex_attention(q, k, v, alibi(s), bm)

    loss = lambda q, k, v, s: jnp.sum(jnp.sin(jax.vmap(attend, (0, 0, 0, None))(q, k, v, s)))
    want = jnp.stack([attend(*qkv[i], slopes) for i in range(N)])
    want_grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q0, k0, v0, slopes)
    q, k, v = place(mesh, P(None, "dp", "tp"), q0, k0, v0)
    batched = jax.jit(jax.vmap(attend, (0, 0, 0, None)))
    out = batched(q, k, v, slopes)
    np.testing.assert_allclose(out, want, **TOL)
    counts = collectives(batched.lower(q, k, v, slopes).compile().as_text())
    assert counts == dict.fromkeys(counts, 0), counts
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, slopes)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, **GRAD_TOL)


@pytest.mark.parametrize(
    "spec", [P("dp"), P(None, None, "dp"), P("dp", None, "tp")], ids=["batch", "heads", "both"]
)
def test_jax_layout_shards_like_flex_attention(spec):
    """dot_product_attention's [B, T, N, H] arrays split on batch and/or heads (dims 0 and 2)."""
    names = ("dp", "tp") if "tp" in spec else ("dp",)
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()).reshape((2, 2) if len(names) == 2 else (4,)), names
    )
    q0, k0, v0 = (jnp.swapaxes(x, 1, 2) for x in random_qkv(3, 4, 8, 64, 96, 16, Hkv=4))
    slopes = jnp.linspace(0.1, 1.0, 8)
    bm = fj.create_block_mask(head_window, 1, 8, 64, 96, BLOCK_SIZE=32)

    def loss(q, k, v, s):
        out, lse = fj.dot_product_attention(q, k, v, alibi(s), bm, return_lse=True)
        return jnp.sum(jnp.sin(out)) + 0.1 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    attend = jax.jit(lambda q, k, v, s: fj.dot_product_attention(q, k, v, alibi(s), bm))
    want = attend(q0, k0, v0, slopes)
    want_grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q0, k0, v0, slopes)
    q, k, v = place(mesh, spec, q0, k0, v0)
    out = attend(q, k, v, slopes)
    np.testing.assert_allclose(out, want, **TOL)
    padded = lambda p: (tuple(p) + (None,) * 3)[:3]
    assert padded(out.sharding.spec) == padded(spec)
    counts = collectives(attend.lower(q, k, v, slopes).compile().as_text())
    assert counts == dict.fromkeys(counts, 0), counts
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    for g, w in zip(grad(q, k, v, slopes), want_grads, strict=True):
        np.testing.assert_allclose(g, w, **GRAD_TOL)
    counts = collectives(grad.lower(q, k, v, slopes).compile().as_text())
    assert counts["all-gather"] == 0 and counts["all-reduce"] == 1, counts  # the slopes' grad
