"""flex_attention inside the user's jax.shard_map: shards equal one device, mods see global indices.

Batch and head sharding on 4 (forced CPU) devices, against the same call on
one device: out, lse, dq, dk, dv and the gradient of a learnable captured
array. Numbers with check_vma=False (Pallas' CPU interpreter cannot run
kernels under check_vma=True); with check_vma=True the forward and backward
are traced and type-checked (`jax.jit(...).trace`), which is what fails
without vma-typed kernel outputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_qkv
from jax.sharding import PartitionSpec as P

import flexjax as fj
from flexjax import masks

TOL = dict(atol=2e-5, rtol=2e-5)
GRAD_TOL = dict(atol=1e-4, rtol=1e-4)


def mesh_of(shape, names):
    return jax.sharding.Mesh(np.array(jax.devices()[: np.prod(shape)]).reshape(shape), names)


def alibi(slopes):
    def learnable_alibi(score, b, h, q_idx, kv_idx):  # reads b and h: local ones would show
        return score + slopes[h] * (kv_idx - q_idx) * 0.05 + 0.3 * b

    return learnable_alibi


def head_window(b, h, q_idx, kv_idx):  # a different window per head
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= 16 * (h + 1))


def loss_of(attend, w_out, w_lse):
    def loss(q, k, v, slopes):
        out, lse = attend(q, k, v, slopes)
        lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out * w_out) + jnp.sum(lse * w_lse)

    return loss


def sharded(body, mesh, q_spec, kv_spec, check_vma=False):
    """body(q, k, v, slopes) -> (out, lse) under shard_map: slopes replicated, outputs like q."""
    lse_spec = P(*tuple(q_spec)[:3])
    return jax.shard_map(
        body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P()),
        out_specs=(q_spec, lse_spec), check_vma=check_vma,
    )  # fmt: skip


CASES = {
    # name: (mesh shape, axis names, q spec, kv spec, B, Hq, Hkv, Bkv)
    "heads": ((4,), ("tp",), P(None, "tp"), P(None, "tp"), 2, 8, 4, 2),
    "batch": ((4,), ("dp",), P("dp"), P("dp"), 4, 2, 2, 4),
    "batch_and_heads": ((2, 2), ("dp", "tp"), P("dp", "tp"), P("dp", "tp"), 2, 4, 2, 2),
    "batch_kv_broadcast": ((4,), ("dp",), P("dp"), P(), 4, 2, 1, 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_shards_equal_one_device(name):
    shape, names, q_spec, kv_spec, B, Hq, Hkv, Bkv = CASES[name]
    mesh = mesh_of(shape, names)
    L, S = 70, 90
    q, k, v = random_qkv(0, B, Hq, L, S, 16, Hkv=Hkv, Bkv=Bkv)
    slopes = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, Hq), jnp.float32)
    bm = fj.create_block_mask(head_window, 1, Hq, L, S, BLOCK_SIZE=32)  # whole, per head
    rng = np.random.default_rng(2)
    w_out = jnp.asarray(rng.standard_normal((B, Hq, L, 16)), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal((B, Hq, L)), jnp.float32)

    def one_device(q, k, v, slopes):
        return fj.flex_attention(q, k, v, alibi(slopes), bm, enable_gqa=True, return_lse=True)

    def local(q, k, v, slopes):
        return fj.flex_attention(
            q, k, v, alibi(slopes), bm, enable_gqa=True, return_lse=True, q_sharding=q_spec
        )

    on_mesh = jax.jit(sharded(local, mesh, q_spec, kv_spec))
    want_out, want_lse = one_device(q, k, v, slopes)
    got_out, got_lse = on_mesh(q, k, v, slopes)
    np.testing.assert_allclose(got_out, want_out, **TOL)
    np.testing.assert_allclose(got_lse, want_lse, **TOL)

    grad = lambda f: jax.jit(jax.grad(loss_of(f, w_out, w_lse), argnums=(0, 1, 2, 3)))
    for g, w in zip(grad(on_mesh)(q, k, v, slopes), grad(one_device)(q, k, v, slopes), strict=True):
        np.testing.assert_allclose(g, w, **GRAD_TOL)


@pytest.mark.parametrize("name", ["heads", "batch_kv_broadcast"])
def test_check_vma_true_types_forward_and_backward(name):
    """With check_vma=True the kernels' outputs and every gradient must be typed: trace both.

    On a GPU (4 of them) the numbers too: Pallas' CPU interpreter cannot run this.
    """
    shape, names, q_spec, kv_spec, B, Hq, Hkv, Bkv = CASES[name]
    mesh = mesh_of(shape, names)
    q, k, v = random_qkv(3, B, Hq, 64, 64, 16, Hkv=Hkv, Bkv=Bkv)
    slopes = jnp.linspace(0.1, 1.0, Hq)
    bm = fj.create_block_mask(head_window, 1, Hq, 64, 64, BLOCK_SIZE=32)

    def local(q, k, v, slopes):
        return fj.flex_attention(
            q, k, v, alibi(slopes), bm, enable_gqa=True, return_lse=True, q_sharding=q_spec
        )

    f = sharded(local, mesh, q_spec, kv_spec, check_vma=True)
    out_type = jax.jit(f).trace(q, k, v, slopes).out_info
    assert [o.shape for o in out_type] == [q.shape, q.shape[:3]]
    loss = lambda *a: jnp.sum(f(*a)[0])
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    grads = grad.trace(q, k, v, slopes).out_info
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape, slopes.shape]
    if jax.devices()[0].platform == "gpu":  # the numbers, where the kernels can run so
        one = lambda q, k, v, s: fj.flex_attention(
            q, k, v, alibi(s), bm, enable_gqa=True, return_lse=True
        )
        for got, want in zip(jax.jit(f)(q, k, v, slopes), one(q, k, v, slopes), strict=True):
            np.testing.assert_allclose(got, want, atol=2e-3, rtol=2e-3)
        want = jax.grad(lambda *a: jnp.sum(one(*a)[0]), argnums=(0, 1, 2, 3))(q, k, v, slopes)
        for got, w in zip(grad(q, k, v, slopes), want, strict=True):
            np.testing.assert_allclose(got, w, atol=2e-3, rtol=2e-3)


def test_eager_shard_map_and_vmap_of_a_sharded_call():
    mesh = mesh_of((4,), ("tp",))
    q, k, v = random_qkv(4, 3, 4, 64, 64, 16)
    bm = fj.create_block_mask(masks.causal_mask, 1, 1, 64, 64, BLOCK_SIZE=32)
    slopes = jnp.linspace(-1.0, 1.0, 4)

    def local(q, k, v):
        return fj.flex_attention(q, k, v, alibi(slopes), bm, q_sharding=P(None, "tp"))

    f = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "tp"),) * 3, out_specs=P(None, "tp"),
                      check_vma=False)  # fmt: skip
    want = fj.flex_attention(q, k, v, alibi(slopes), bm)
    np.testing.assert_allclose(f(q, k, v), want, **TOL)  # eager shard_map
    per_example = jax.vmap(jax.jit(f))(q[:, None], k[:, None], v[:, None])
    np.testing.assert_allclose(per_example[:, 0], want, **TOL)


def test_mods_reading_b_or_h_in_shard_map_need_q_sharding():
    mesh = mesh_of((4,), ("tp",))
    q, k, v = random_qkv(5, 1, 4, 32, 32, 16)
    slopes = jnp.linspace(0.1, 1.0, 4)

    def on_head_shards(body, check_vma):
        spec = P(None, "tp")
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                                     check_vma=check_vma))  # fmt: skip

    reads_h = lambda q, k, v: fj.flex_attention(q, k, v, alibi(slopes))
    for check_vma in (False, True):
        with pytest.raises(ValueError, match="read b and h.*q_sharding"):
            on_head_shards(reads_h, check_vma).trace(q, k, v)
    # A mod of q and kv only is the same on every head shard: no q_sharding needed.
    causal = fj.create_block_mask(masks.causal_mask, 1, 1, 32, 32, BLOCK_SIZE=16)
    out = on_head_shards(lambda q, k, v: fj.flex_attention(q, k, v, block_mask=causal), False)
    np.testing.assert_allclose(out(q, k, v), fj.flex_attention(q, k, v, block_mask=causal), **TOL)


def test_bad_q_sharding_is_refused():
    q, k, v = random_qkv(6, 1, 2, 32, 32, 16)
    with pytest.raises(NotImplementedError, match="sequence or head dim"):
        fj.flex_attention(q, k, v, q_sharding=P(None, None, "cp"))
    with pytest.raises(TypeError, match="q_sharding must be a jax.sharding.PartitionSpec"):
        fj.flex_attention(q, k, v, q_sharding=("dp",))


@pytest.mark.parametrize(
    "q_spec,kv_spec", [(P("dp", None, "tp"), P("dp", None, "tp")), (P(None, None, "tp"), None)]
)
def test_jax_layout_inside_shard_map(q_spec, kv_spec):
    """dot_product_attention's [B, T, N, H] shards (batch dim 0, heads dim 2) equal one device."""
    mesh = mesh_of((2, 2), ("dp", "tp")) if kv_spec is not None else mesh_of((4,), ("tp",))
    kv_spec = kv_spec or P(None, None, "tp")
    B, Hq, Hkv, L, S = 2, 8, 4, 64, 80
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in random_qkv(6, B, Hq, L, S, 16, Hkv=Hkv))
    slopes = jnp.linspace(-1.0, 1.0, Hq)
    bm = fj.create_block_mask(head_window, 1, Hq, L, S, BLOCK_SIZE=32)
    one = lambda q, k, v, s: fj.dot_product_attention(q, k, v, alibi(s), bm, return_lse=True)
    lse_spec = P(*tuple(q_spec)[:3])
    on_shards = jax.shard_map(
        lambda q, k, v, s: fj.dot_product_attention(
            q, k, v, alibi(s), bm, return_lse=True, q_sharding=q_spec
        ),
        mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P()), out_specs=(q_spec, lse_spec),
        check_vma=False,
    )  # fmt: skip
    for got, want in zip(jax.jit(on_shards)(q, k, v, slopes), one(q, k, v, slopes), strict=True):
        np.testing.assert_allclose(got, want, **TOL)
    rng = np.random.default_rng(1)
    w_out, w_lse = rng.standard_normal(q.shape), rng.standard_normal(q.shape[:3])
    grads = jax.jit(jax.grad(loss_of(on_shards, w_out, w_lse), argnums=(0, 1, 2, 3)))
    want = jax.grad(loss_of(one, w_out, w_lse), argnums=(0, 1, 2, 3))(q, k, v, slopes)
    for g, w in zip(grads(q, k, v, slopes), want, strict=True):
        np.testing.assert_allclose(g, w, **GRAD_TOL)
