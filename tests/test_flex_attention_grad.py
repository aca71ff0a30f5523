"""flex_attention's backward kernels (dq, dk/dv, captured-array gradients) against jax.grad of the reference.

CPU: interpret mode at small shapes (the real kernel code). GPU (-m gpu): the
seed's sizes, checked on (batch, head) slices against the float32 reference.
Every loss also weights lse, so the lse cotangent path is exercised.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import learnable_biases, random_block_mask, random_qkv

import flexjax as fj
from flexjax import masks, mods
from flexjax.examples import EXAMPLES
from flexjax.reference import flex_attention_reference, head_slice, shift_score_mod


def _loss(attn, q, k, v, seed=0, lse_weight=0.3, **kw):
    """A random linear function of out and lse (fresh weights, never all ones)."""
    out, lse = attn(q, k, v, return_lse=True, **kw)
    rng = np.random.default_rng(seed)
    w_out = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal(lse.shape), jnp.float32) * lse_weight
    finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(finite_lse * w_lse)


def grads_both(flex, q, k, v, argnums=(0, 1, 2), extra=(), make_kw=None, **kw):
    """(flexjax grads, float32 reference grads) of the same loss with respect to argnums.

    extra: more differentiable arguments (captured arrays); make_kw(*extra)
    returns the keyword arguments that use them (e.g. a score_mod closing over them).
    """

    options = kw.pop("kernel_options", None)

    def loss(attn, *args):
        q, k, v, *rest = args
        more = make_kw(*rest) if make_kw else {}
        return _loss(attn, q, k, v, **kw, **more)

    def our_attn(q, k, v, **a):
        return flex(q, k, v, kernel_options=options, **a)

    def ref_attn(q, k, v, **a):
        f32 = (x.astype(jnp.float32) for x in (q, k, v))
        return flex_attention_reference(*f32, **a)

    args = (q, k, v, *extra)
    ours = jax.grad(lambda *a: loss(our_attn, *a), argnums=argnums)(*args)
    ref = jax.grad(lambda *a: loss(ref_attn, *a), argnums=argnums)(*args)
    return ours, ref


def assert_grads_close(ours, ref, dtype, tol=None):
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a.shape == b.shape, (i, a.shape, b.shape)
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.isfinite(a).all(), f"gradient {i} has NaN/inf"
        if tol is None:
            t = 1e-5 if np.dtype(dtype) == np.float32 else 2e-2
        else:
            t = tol
        scale = max(np.abs(b).max(), 1e-6)
        err = np.abs(a - b).max()
        assert err <= t * scale, f"gradient {i}: max error {err:.3g} vs max {scale:.3g}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_every_seed_example_gradients(flex, name, dtype):
    case = EXAMPLES[name].case("small", S=96 if name != "jagged" else 256, H=2, B=2, D=16)
    bm = None
    if case.mask_mod is not None:
        bm = fj.create_block_mask(case.mask_mod, 1, 1, case.Q_LEN, case.KV_LEN, BLOCK_SIZE=32)
    q, k, v = random_qkv(1, case.B, case.H, case.Q_LEN, case.KV_LEN, case.D, dtype=dtype)
    ours, ref = grads_both(flex, q, k, v, score_mod=case.score_mod, block_mask=bm)
    assert [g.dtype for g in ours] == [dtype] * 3
    assert_grads_close(ours, ref, dtype)


@pytest.mark.parametrize("seed", range(3))
def test_random_masks_and_block_sizes(flex, seed):
    bm, L, S = random_block_mask(seed)
    q, k, v = random_qkv(seed, 1, 2, L, S, 16)
    ours, ref = grads_both(flex, q, k, v, block_mask=bm, seed=seed)
    assert_grads_close(ours, ref, jnp.float32)


def test_captured_array_gradients_with_gqa_broadcast_and_odd_lengths(flex):
    # Learnable ALiBi slopes[h], a relative-position table[q - kv + S] and a
    # Graphormer-style table[h, dist[b, q, kv]], all at once; Hq=4 over Hkv=2,
    # Ev != E, k/v batch-broadcast, odd lengths with L < S, a per-head mask.
    B, H, L, S = 2, 4, 77, 101
    q, k, v = random_qkv(2, B, H, L, S, 24, Ev=40, Hkv=2, Bkv=1)

    def head_window(b, h, qi, kv):
        return (qi >= kv) & (qi - kv <= 8 * (h + 1))

    bm = fj.create_block_mask(head_window, None, H, L, S, BLOCK_SIZE=16)
    extra, make_kw = learnable_biases(B, H, L, S, alibi_scale=0.05)
    ours, ref = grads_both(
        flex, q, k, v, argnums=range(6), extra=extra, make_kw=make_kw,
        block_mask=bm, enable_gqa=True,
    )  # fmt: skip
    assert_grads_close(ours, ref, jnp.float32, tol=2e-5)


def test_library_learnable_biases_get_gradients(flex):
    # The library's own mod factories with a learnable captured array.
    q, k, v = random_qkv(3, 1, 2, 64, 64, 16)
    bm = fj.create_block_mask(masks.causal_mask, 1, 1, 64, 64, BLOCK_SIZE=32)
    slopes = jnp.asarray([0.3, 0.7], jnp.float32)
    table = jnp.linspace(-1.0, 1.0, 2 * 16 + 1)
    for extra, make_kw in [
        ((slopes,), lambda s: dict(score_mod=mods.generate_alibi_bias(2, slopes=s))),
        ((table,), lambda t: dict(score_mod=mods.generate_relative_bias_table(t, 16))),
    ]:
        ours, ref = grads_both(
            flex, q, k, v, argnums=(0, 3), extra=extra, make_kw=make_kw, block_mask=bm
        )
        assert_grads_close(ours, ref, jnp.float32)


def test_fully_masked_rows_and_unseen_keys_get_zero_gradients(flex):
    def holes(b, h, qi, kv):
        return (qi >= kv) & (qi % 5 != 2) & (kv % 7 != 3)

    bm = fj.create_block_mask(holes, 1, 1, 64, 64, BLOCK_SIZE=16)
    q, k, v = random_qkv(4, 1, 1, 64, 64, 16)
    (dq, dk, dv), ref = grads_both(flex, q, k, v, block_mask=bm)
    assert_grads_close((dq, dk, dv), ref, jnp.float32)
    rows, cols = np.arange(64) % 5 == 2, np.arange(64) % 7 == 3
    assert (np.asarray(dq)[0, 0, rows] == 0).all()
    assert (np.asarray(dk)[0, 0, cols] == 0).all() and (np.asarray(dv)[0, 0, cols] == 0).all()


def test_lse_alone_out_alone_and_no_mask(flex):
    q, k, v = random_qkv(5, 1, 2, 70, 70, 16)
    # Only lse is used: out's cotangent is a symbolic zero.
    f = lambda attn: lambda q, k, v: jnp.sum(jnp.sin(attn(q, k, v, return_lse=True)[1]))
    ref_attn = flex_attention_reference
    assert_grads_close(
        jax.grad(f(flex), argnums=(0, 1, 2))(q, k, v),
        jax.grad(f(ref_attn), argnums=(0, 1, 2))(q, k, v),
        jnp.float32,
    )
    # Only out is used (no return_lse), no block mask, a score_mod.
    ours, ref = grads_both(flex, q, k, v, lse_weight=0.0, score_mod=mods.causal_bias)
    assert_grads_close(ours, ref, jnp.float32)


def test_grad_composes_with_jit_and_vmap_and_is_deterministic(flex):
    q, k, v = random_qkv(6, 3, 2, 64, 64, 16)
    bm = fj.create_block_mask(masks.causal_mask, 1, 1, 64, 64, BLOCK_SIZE=32)
    alibi = mods.generate_alibi_bias(2)

    def loss(q, k, v):
        return jnp.sum(jnp.tanh(flex(q, k, v, score_mod=alibi, block_mask=bm)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    # vmap over the batch, one [1, H, L, E] problem per element.
    per_example = jax.vmap(grad)(q[:, None], k[:, None], v[:, None])
    whole = grad(q, k, v)
    for a, b in zip(per_example, whole, strict=True):
        np.testing.assert_allclose(np.asarray(a[:, 0]), np.asarray(b), atol=1e-6)
    again = grad(q, k, v)
    for a, b in zip(whole, again, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ref = jax.grad(
        lambda *a: jnp.sum(jnp.tanh(flex_attention_reference(*a, score_mod=alibi, block_mask=bm))),
        argnums=(0, 1, 2),
    )(q, k, v)
    assert_grads_close(whole, ref, jnp.float32)


def test_backward_keeps_memory_linear_in_sequence_length(flex):
    # No intermediate of the gradient computation outside the kernels has L x S elements.
    L = S = 1024
    q, k, v = random_qkv(7, 1, 1, L, S, 16)
    bm = fj.create_block_mask(masks.causal_mask, 1, 1, L, S)
    loss = lambda q, k, v: jnp.sum(flex(q, k, v, block_mask=bm, score_mod=mods.causal_bias))
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                continue  # inside a kernel everything is a tile
            for var in eqn.outvars:
                yield int(np.prod(var.aval.shape))
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", param)  # ClosedJaxpr or Jaxpr
                if hasattr(inner, "eqns"):
                    yield from sizes(inner)

    assert max(sizes(jaxpr.jaxpr)) < L * S // 8


def test_backward_kernel_options(flex):
    q, k, v = random_qkv(8, 1, 1, 64, 64, 32)
    bm = fj.create_block_mask(masks.causal_mask, 1, 1, 64, 64, BLOCK_SIZE=64)
    opts = dict(bwd_block_m=16, bwd_block_n=32)
    ours, ref = grads_both(flex, q, k, v, block_mask=bm, kernel_options=opts)
    assert_grads_close(ours, ref, jnp.float32)
    with pytest.raises(ValueError, match="bwd_block_m=48"):
        flex(q, k, v, block_mask=bm, kernel_options=dict(bwd_block_m=48))
    # The dq kernel uses the tiles transposed: each must divide both block sizes.
    bm_32_64 = fj.create_block_mask(masks.causal_mask, 1, 1, 64, 64, BLOCK_SIZE=(32, 64))
    with pytest.raises(ValueError, match="bwd_block_n=64.*transposed"):
        flex(q, k, v, block_mask=bm_32_64, kernel_options=dict(bwd_block_n=64))
    ours, ref = grads_both(flex, q, k, v, block_mask=bm_32_64)  # default tiles fit both ways
    assert_grads_close(ours, ref, jnp.float32)


# ----------------------------------------------------------------------------- GPU


def _vjp(attn, q, k, v, dout, **kw):
    _, pullback = jax.vjp(lambda q, k, v: attn(q, k, v, **kw), q, k, v)
    return pullback(dout)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_seed_example_gradients_at_seed_sizes_on_gpu(flex, name):
    case = EXAMPLES[name].case("seed")
    bm = None
    if case.mask_mod is not None:
        bm = fj.create_block_mask(case.mask_mod, 1, 1, case.Q_LEN, case.KV_LEN)
    q, k, v = random_qkv(0, case.B, case.H, case.Q_LEN, case.KV_LEN, case.D, dtype=case.dtype)
    dout = random_qkv(1, case.B, case.H, case.Q_LEN, 1, case.D, dtype=case.dtype)[0]
    kw = dict(score_mod=case.score_mod, block_mask=bm)
    grads = jax.jit(lambda *a: _vjp(flex, *a, **kw))(q, k, v, dout)
    again = jax.jit(lambda *a: _vjp(flex, *a, **kw))(q, k, v, dout)
    # deterministic, but MOSAIC_GPU's default dq (TMA reduce-adds, `bwd.default_config`;
    # its dq kernel's bitwise repeat is tests/test_mosaic_gpu.py's)
    exact = ("dk", "dv") if flex.backend == "MOSAIC_GPU" else ("dq", "dk", "dv")
    for name, a, b in zip(("dq", "dk", "dv"), grads, again, strict=True):
        if name in exact:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
        else:  # the same sums in another order: within a rounding of the gradient's scale
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-2 * np.abs(b).max(), err_msg=name)
    for b0, h0 in {(0, 0), (case.B - 1, case.H - 1)}:
        sl = lambda x, b0=b0, h0=h0: head_slice(x, b0, h0)
        score_mod = shift_score_mod(case.score_mod, b0, h0)
        ref = _vjp(
            flex_attention_reference, sl(q), sl(k), sl(v), sl(dout),
            score_mod=score_mod, block_mask=bm,
        )  # fmt: skip
        ours = [g[b0 : b0 + 1, h0 : h0 + 1] for g in grads]
        tol = 1e-4 if case.dtype == jnp.float32 else 2e-2
        assert_grads_close(ours, ref, case.dtype, tol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("head_dim", [16, 64, 128, 256])
def test_gradient_dtypes_and_head_dims_on_gpu(flex, dtype, head_dim):
    q, k, v = random_qkv(1, 2, 4, 1000, 1100, head_dim, Hkv=2, dtype=dtype)
    bm = fj.create_block_mask(masks.causal_mask, 1, 1, 1000, 1100)
    softcap = mods.generate_tanh_softcap(20.0, approx=dtype != jnp.float32)
    ours, ref = grads_both(flex, q, k, v, block_mask=bm, enable_gqa=True, score_mod=softcap)
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    assert_grads_close(ours, ref, dtype, tol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
def test_captured_array_gradients_on_gpu(flex, dtype):
    # Atomic adds on the GPU: compared with the reference, not bit for bit.
    B, H, L, S = 2, 4, 1024, 1024
    q, k, v = random_qkv(2, B, H, L, S, 64, dtype=dtype)
    bm = fj.create_block_mask(masks.causal_mask, 1, 1, L, S)
    extra, make_kw = learnable_biases(B, H, L, S, alibi_scale=0.01)
    ours, ref = grads_both(
        flex, q, k, v, argnums=range(6), extra=extra, make_kw=make_kw,
        block_mask=bm,
    )  # fmt: skip
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    assert_grads_close(ours, ref, dtype, tol=tol)


@pytest.mark.parametrize("scale", [0.7, -0.3, 0.0])
@pytest.mark.parametrize("with_score_mod", [False, True])
def test_any_scale_forward_and_backward(flex, scale, with_score_mod):
    """The kernels fold a positive scale into exp2's argument when there is no score_mod;
    a negative or zero scale (and any scale with a score_mod) takes the unfolded path."""
    L, S = 70, 90
    q, k, v = random_qkv(40, 1, 2, L, S, 16)
    bm = fj.create_block_mask(lambda b, h, qi, ki: qi + 20 >= ki, 1, 1, L, S, BLOCK_SIZE=32)
    score_mod = (lambda s, b, h, qi, ki: s + 0.01 * (qi - ki)) if with_score_mod else None
    kw = dict(score_mod=score_mod, block_mask=bm, scale=scale)

    def loss(attend):
        def f(q, k, v):
            out, lse = attend(q, k, v, return_lse=True, **kw)
            return jnp.sum(out * v[:, :, :L]) + 0.5 * jnp.sum(lse)

        return f

    got = jax.value_and_grad(loss(flex), (0, 1, 2))(q, k, v)
    want = jax.value_and_grad(loss(flex_attention_reference), (0, 1, 2))(q, k, v)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4)
