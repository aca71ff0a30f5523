"""The dense reference against PyTorch: SDPA with a dense mask and torch's own flex_attention.

torch runs in float64 (the higher-precision oracle), the reference in float32.
torch has no flex_attention backward on CPU, so gradients are checked against
SDPA, where the example is a pure mask.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_twins
from helpers import random_qkv
from torch.nn.attention import flex_attention as tfa

import flexjax as fj
from flexjax import masks
from flexjax.examples import EXAMPLES
from flexjax.reference import flex_attention_reference

F32_RTOL = 2e-5  # relative L2 error budget of a float32 computation at these sizes


def rel_err(ours, theirs) -> float:
    ours = np.asarray(ours, np.float64)
    theirs = theirs.detach().double().numpy() if hasattr(theirs, "detach") else np.asarray(theirs)
    assert not np.isnan(ours).any(), "NaN in flexjax output"
    finite = np.isfinite(theirs)
    np.testing.assert_array_equal(np.isfinite(ours), finite)  # -inf lse rows agree
    if not finite.any():
        return 0.0
    diff = np.linalg.norm(ours[finite] - theirs[finite])
    return diff / max(np.linalg.norm(theirs[finite]), 1e-30)


def to_torch(x, grad=True):
    t = torch.from_numpy(np.asarray(x, np.float64))
    return t.requires_grad_() if grad else t


def run_reference(q, k, v, dout, **kw):
    def loss(q, k, v):
        out, lse = flex_attention_reference(q, k, v, return_lse=True, **kw)
        return jnp.sum(out * dout), (out, lse)

    grads, (out, lse) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, lse, grads


def small_case(name):
    case = EXAMPLES[name].case("small", S=128, H=2, B=2, D=16)
    bm = None
    if case.mask_mod is not None:
        bm = fj.create_block_mask(case.mask_mod, 1, 1, case.Q_LEN, case.KV_LEN, BLOCK_SIZE=32)
    return case, bm


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_reference_matches_torch_flex_attention(name):
    case, bm = small_case(name)
    score_twin, mask_twin = torch_twins.twin(name, case.H, 128)
    q, k, v = random_qkv(hash(name) % 1000, case.B, case.H, case.Q_LEN, case.KV_LEN, case.D)
    out, lse = flex_attention_reference(
        q, k, v, score_mod=case.score_mod, block_mask=bm, return_lse=True
    )
    torch_bm = None
    if mask_twin is not None:
        torch_bm = tfa.create_block_mask(
            mask_twin, 1, 1, case.Q_LEN, case.KV_LEN, device="cpu", BLOCK_SIZE=32
        )
    t_out, t_lse = tfa.flex_attention(
        *(to_torch(x, grad=False) for x in (q, k, v)),
        score_mod=score_twin,
        block_mask=torch_bm,
        return_lse=True,
    )
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
    assert out.shape == (case.B, case.H, case.Q_LEN, case.D) and lse.shape == out.shape[:3]
    assert rel_err(out, t_out) < F32_RTOL
    assert rel_err(lse, t_lse) < F32_RTOL


SDPA_EXAMPLES = [n for n, ex in EXAMPLES.items() if ex.case("small").sdpa_comparable]


@pytest.mark.parametrize("name", SDPA_EXAMPLES)
def test_reference_matches_sdpa_forward_and_backward(name):
    case, bm = small_case(name)
    q, k, v = random_qkv(7, case.B, case.H, case.Q_LEN, case.KV_LEN, case.D)
    dout = jnp.asarray(
        np.random.default_rng(8).standard_normal((case.B, case.H, case.Q_LEN, case.D)), jnp.float32
    )
    out, _, grads = run_reference(q, k, v, dout, score_mod=case.score_mod, block_mask=bm)
    dense = np.array(fj.create_mask(case.mask_mod or case.score_mod, 1, 1, case.Q_LEN, case.KV_LEN))
    tq, tk, tv = (to_torch(x) for x in (q, k, v))
    t_out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.from_numpy(dense))
    t_out.backward(torch.from_numpy(np.asarray(dout, np.float64)))
    assert rel_err(out, t_out) < F32_RTOL
    for g, t in zip(grads, (tq.grad, tk.grad, tv.grad), strict=True):
        assert rel_err(g, t) < F32_RTOL


def test_gqa_value_dim_scale_and_kv_broadcast_match_sdpa():
    B, Hq, Hkv, L, S, E, Ev = 2, 4, 2, 48, 80, 16, 24
    q, k, v = random_qkv(3, B, Hq, L, S, E, Ev=Ev, Hkv=Hkv, Bkv=1)
    dout = jnp.asarray(np.random.default_rng(4).standard_normal((B, Hq, L, Ev)), jnp.float32)
    bm = fj.create_block_mask(masks.generate_sliding_window(20), None, Hq, L, S, BLOCK_SIZE=16)
    out, _, grads = run_reference(q, k, v, dout, block_mask=bm, scale=0.3, enable_gqa=True)
    assert out.shape == (B, Hq, L, Ev)
    dense = torch.from_numpy(np.array(fj.create_mask(bm.mask_mod, 1, 1, L, S)))
    tq, tk, tv = (to_torch(x) for x in (q, k, v))
    t_out = F.scaled_dot_product_attention(
        tq,
        tk.expand(B, -1, -1, -1),
        tv.expand(B, -1, -1, -1),
        attn_mask=dense,
        scale=0.3,
        enable_gqa=True,
    )
    t_out.backward(torch.from_numpy(np.asarray(dout, np.float64)))
    assert rel_err(out, t_out) < F32_RTOL
    for g, t in zip(grads, (tq.grad, tk.grad, tv.grad), strict=True):
        assert g.shape == tuple(t.shape)
        assert rel_err(g, t) < F32_RTOL


def test_fully_masked_rows_give_zero_output_minus_inf_lse_and_zero_grads():
    def holes(b, h, q, kv):
        return (q >= kv) & (q % 7 != 3)  # rows 3, 10, 17, ... keep nothing

    bm = fj.create_block_mask(holes, 1, 1, 64, 64, BLOCK_SIZE=16)
    q, k, v = random_qkv(5, 1, 2, 64, 64, 16)
    dout = jnp.ones((1, 2, 64, 16), jnp.float32)

    def loss(q, k, v):
        out, lse = flex_attention_reference(q, k, v, block_mask=bm, return_lse=True)
        return jnp.sum(out * dout) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)

    (dq, dk, dv), (out, lse) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    empty = np.arange(64) % 7 == 3
    assert (np.asarray(out)[:, :, empty] == 0).all()
    assert np.isneginf(np.asarray(lse)[:, :, empty]).all()
    assert np.isfinite(np.asarray(lse)[:, :, ~empty]).all()
    for g in (dq, dk, dv):
        assert np.isfinite(np.asarray(g)).all()
    assert (np.asarray(dq)[:, :, empty] == 0).all()
    t_out, t_lse = tfa.flex_attention(
        *(to_torch(x, grad=False) for x in (q, k, v)),
        block_mask=tfa.create_block_mask(torch_holes, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=16),
        return_lse=True,
    )
    assert rel_err(out, t_out) < F32_RTOL and rel_err(lse, t_lse) < F32_RTOL


def torch_holes(b, h, q, kv):
    return (q >= kv) & (q % 7 != 3)


def test_lse_is_differentiable():
    q, k, v = random_qkv(9, 1, 1, 32, 40, 8)
    g_lse = jax.grad(lambda q: flex_attention_reference(q, k, v, return_lse=True)[1].sum())(q)
    # d lse / d q = scale * softmax @ k
    p = jax.nn.softmax(jnp.einsum("bhle,bhse->bhls", q, k) / np.sqrt(8), axis=-1)
    expected = jnp.einsum("bhls,bhse->bhle", p, k) / np.sqrt(8)
    np.testing.assert_allclose(np.asarray(g_lse), np.asarray(expected), rtol=1e-4, atol=1e-6)


def test_low_precision_inputs_keep_their_dtype():
    q, k, v = random_qkv(11, 1, 2, 64, 64, 32, dtype=jnp.bfloat16)
    out, lse = flex_attention_reference(
        q, k, v, score_mod=EXAMPLES["softcap"].case().score_mod, return_lse=True
    )
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    ref = flex_attention_reference(
        *(x.astype(jnp.float32) for x in (q, k, v)), score_mod=EXAMPLES["softcap"].case().score_mod
    )
    assert rel_err(out.astype(jnp.float32), ref) < 1e-2


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(query=jnp.ones((2, 8, 4))), ValueError, "query must have 4 dimensions"),
        (
            dict(key=jnp.ones((1, 1, 16, 8)), value=jnp.ones((1, 1, 16, 8))),
            ValueError,
            "enable_gqa",
        ),
        (dict(value=jnp.ones((1, 2, 15, 8))), ValueError, "value must have key's"),
        (dict(key=jnp.ones((1, 2, 16, 4))), ValueError, "head dim"),
        (dict(query=jnp.ones((1, 2, 16, 8), jnp.int32)), TypeError, "float16"),
        (dict(score_mod=lambda s, b, h, q: s), TypeError, "score_mod"),
        (
            dict(block_mask=fj.create_block_mask(masks.causal_mask, 1, 1, 32, 16, BLOCK_SIZE=8)),
            ValueError,
            "block_mask was created for",
        ),
    ],
)
def test_bad_inputs_get_clear_errors(kwargs, exc, words):
    args = dict(
        query=jnp.ones((1, 2, 16, 8)), key=jnp.ones((1, 2, 16, 8)), value=jnp.ones((1, 2, 16, 8))
    )
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        flex_attention_reference(**args)
