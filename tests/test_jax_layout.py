"""`flexjax.dot_product_attention`: jax.nn's [B, T, N, H] layout through the same kernels, no copies.

Equal to flex_attention on the transposed arrays for out, lse and every
gradient (GQA, k/v broadcast over the batch, ragged lengths, head dims that
are not powers of 2, a learnable captured array), equal to
`jax.nn.dot_product_attention` with the dense mask, and the jaxpr of a
forward+backward holds no transpose, pad or copy of a q/k/v/out-sized array.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_no_hidden_work import copies_of_big_arrays, equations

import flexjax as fj
from flexjax import masks

TOL = dict(atol=2e-5, rtol=2e-5)


def bshd(seed, B, Bkv, T, S, N, K, E, Ev):
    rng = np.random.default_rng(seed)
    shapes = ((B, T, N, E), (Bkv, S, K, E), (Bkv, S, K, Ev))
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)


def to_bhsd(x):
    return jnp.swapaxes(x, 1, 2)


CASES = {
    # name: (B, Bkv, T, S, N, K, E, Ev)
    "gqa_ragged": (2, 2, 77, 130, 4, 2, 80, 40),
    "mha_decode_length": (1, 1, 1, 300, 2, 2, 16, 16),
    "kv_batch_broadcast": (3, 1, 64, 64, 4, 1, 32, 32),
}


@pytest.mark.parametrize("name", list(CASES))
def test_equals_flex_attention_on_transposed_arrays(name):
    B, Bkv, T, S, N, K, E, Ev = CASES[name]
    q, k, v = bshd(0, B, Bkv, T, S, N, K, E, Ev)
    bm = fj.create_block_mask(lambda b, h, qi, ki: ki <= qi + S - T, 1, 1, T, S, BLOCK_SIZE=32)
    slopes = jnp.linspace(0.1, 1.0, N)
    rng = np.random.default_rng(1)
    w_out = jnp.asarray(rng.standard_normal((B, T, N, Ev)), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal((B, T, N)), jnp.float32)

    def alibi(s):
        return lambda score, b, h, qi, ki: score + s[h] * (ki - qi) * 0.01

    def ours(q, k, v, s):
        return fj.dot_product_attention(q, k, v, alibi(s), bm, return_lse=True)

    def theirs(q, k, v, s):
        out, lse = fj.flex_attention(
            *map(to_bhsd, (q, k, v)), alibi(s), bm, enable_gqa=N != K, return_lse=True
        )
        return to_bhsd(out), to_bhsd(lse)

    for got, want in zip(ours(q, k, v, slopes), theirs(q, k, v, slopes), strict=True):
        np.testing.assert_allclose(got, want, **TOL)

    def loss(attend):
        def f(q, k, v, s):
            out, lse = attend(q, k, v, s)
            return jnp.sum(out * w_out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse)

        return jax.grad(f, argnums=(0, 1, 2, 3))

    got, want = loss(ours)(q, k, v, slopes), loss(theirs)(q, k, v, slopes)
    for g, w, what in zip(got, want, ("dq", "dk", "dv", "dslopes"), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=what)


def test_equals_jax_nn_dot_product_attention():
    q, k, v = bshd(2, 2, 2, 96, 96, 8, 2, 32, 32)
    bm = fj.create_block_mask(masks.causal_mask, 1, 1, 96, 96, BLOCK_SIZE=32)
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(fj.dot_product_attention(q, k, v, block_mask=bm), want, **TOL)


def test_no_transpose_or_copy_in_forward_and_backward():
    q, k, v = bshd(3, 1, 1, 77, 301, 8, 4, 80, 40)
    bm = fj.create_block_mask(masks.causal_mask, 1, 1, 77, 301, BLOCK_SIZE=64)

    def loss(q, k, v):
        out, lse = fj.dot_product_attention(q, k, v, block_mask=bm, return_lse=True)
        return jnp.sum(out * out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    for fn in (lambda q, k, v: fj.dot_product_attention(q, k, v, block_mask=bm), loss):
        jaxpr = jax.make_jaxpr(jax.jit(jax.grad(fn, argnums=(0, 1, 2)) if fn is loss else fn))(
            q, k, v
        )
        assert copies_of_big_arrays(jaxpr.jaxpr, min(q.size, k.size) // 2) == []
        assert any(e.primitive.name == "pallas_call" for e in equations(jaxpr.jaxpr))


def test_bad_shapes_are_refused_in_its_own_terms():
    q, k, v = bshd(4, 1, 1, 32, 32, 2, 2, 16, 16)
    with pytest.raises(ValueError, match=r"query must have 4 dimensions \[B, T, N, H\]"):
        fj.dot_product_attention(q[0], k, v)
    with pytest.raises(ValueError, match="multiple"):
        fj.dot_product_attention(q[:, :, :1].repeat(3, axis=2), k, v)  # 3 heads over 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_bshd_equals_bhsd_on_gpu(dtype):
    """The BSHD BlockSpecs compiled by Triton: the same numbers as BHSD, forward and backward.

    bfloat16 agrees bit for bit. float32 does not (H200, 2026-11-29: a quarter of the outputs
    differ, by at most 4.8e-7 on values near 0.1), as when Triton's float32 dot sums in another
    order for the other layout's strides; it agrees to float32 rounding, which a wrong row or
    head would not.
    """

    def same(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if dtype == jnp.bfloat16:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())

    q, k, v = (x.astype(dtype) for x in bshd(5, 2, 2, 1000, 1100, 8, 2, 128, 128))
    bm = fj.create_block_mask(lambda b, h, qi, ki: ki <= qi + 100, 1, 1, 1000, 1100)
    out = fj.dot_product_attention(q, k, v, block_mask=bm)
    want = fj.flex_attention(*map(to_bhsd, (q, k, v)), block_mask=bm, enable_gqa=True)
    same(out, to_bhsd(want))
    loss = lambda f: jax.grad(
        lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2), (0, 1, 2)
    )
    ours = loss(lambda q, k, v: fj.dot_product_attention(q, k, v, block_mask=bm))(q, k, v)
    theirs = loss(
        lambda q, k, v: to_bhsd(
            fj.flex_attention(*map(to_bhsd, (q, k, v)), block_mask=bm, enable_gqa=True)
        )
    )(q, k, v)
    for g, w in zip(ours, theirs, strict=True):
        same(g, w)
