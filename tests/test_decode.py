"""The split-KV decode kernel (short queries) against the float32 reference and the regular forward.

CPU: interpret mode. GPU (-m gpu): the issue's decoding shape (B=8, 32 query
heads over 8 kv heads, Q_LEN=1, KV_LEN=32768, D=128, bf16) and GQA + masks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_qkv

import flexjax as fj
from flexjax.reference import flex_attention_reference
from pallas_kernels import dispatch
from pallas_kernels.softmax import combine
from pallas_kernels.triton.configs import decode_config


def check(flex, q, k, v, score_mod=None, block_mask=None, options=None, atol=2e-5):
    out, lse = flex(
        q, k, v, score_mod, block_mask, enable_gqa=True, return_lse=True,
        kernel_options=options,
    )  # fmt: skip
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_out, ref_lse = flex_attention_reference(
        *f32, score_mod=score_mod, block_mask=block_mask, enable_gqa=True, return_lse=True
    )
    out, lse = np.asarray(out, np.float32), np.asarray(lse)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(np.asarray(ref_lse)))
    np.testing.assert_allclose(out, np.asarray(ref_out), atol=atol, rtol=atol)
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_allclose(lse[finite], np.asarray(ref_lse)[finite], atol=1e-4, rtol=1e-4)
    return out, lse


def decode_traces(fn):
    before = dispatch.trace_count("decode")
    fn()
    return dispatch.trace_count("decode") - before


@pytest.mark.parametrize("L", [1, 3, 17])
@pytest.mark.parametrize("splits", [1, 3, 50])
def test_decode_matches_reference_with_gqa_packing(flex, L, splits):
    """4 query heads per kv head packed into one tile; splits beyond the tile count are empty."""
    S = 300  # not a multiple of the block size: the last block is partial
    q, k, v = random_qkv(L * 10 + splits, 2, 8, L, S, 32, Hkv=2)
    slopes = jnp.linspace(0.1, 1.0, 8)

    def alibi(score, b, h, q_idx, kv_idx):  # h differs between rows of a packed tile
        return score - slopes[h] * jnp.abs(q_idx + S - L - kv_idx)

    def causal_end(b, h, q_idx, kv_idx):  # queries are the last L positions
        return q_idx + S - L >= kv_idx

    bm = fj.create_block_mask(causal_end, 1, 1, L, S, BLOCK_SIZE=32)
    options = {"decode": True, "decode_splits": splits}
    assert decode_traces(lambda: check(flex, q, k, v, alibi, bm, options)) == 1


def test_decode_per_head_mask_takes_one_head_per_program(flex):
    """A mask that differs per head cannot share a walk across the GQA group."""
    L, S = 2, 256
    q, k, v = random_qkv(3, 2, 4, L, S, 16, Hkv=2)
    windows = jnp.array([16, 64, 200, 256])

    def per_head_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + S - L) & (q_idx + S - L - kv_idx < windows[h])

    bm = fj.create_block_mask(per_head_window, 1, 4, L, S, BLOCK_SIZE=32)
    cfg = decode_config(
        batch=2, q_heads=4, group_size=2, q_len=L, q_block_size=32, kv_block_size=32,
        kv_blocks=8, mask_head_broadcast=False, head_dim=16, dtype=jnp.float32,
        interpret=True, options=None,
    )  # fmt: skip
    assert cfg.heads_per_program == 1
    check(flex, q, k, v, None, bm, {"decode": True, "decode_splits": 3})


def test_decode_fully_masked_rows_give_zero_and_neg_inf(flex):
    """Rows and whole batches that keep nothing: out 0, lse -inf, never NaN, in every split."""
    L, S = 4, 200
    q, k, v = random_qkv(5, 2, 2, L, S, 16)

    def odd_rows_in_batch_0(b, h, q_idx, kv_idx):
        return (b == 1) | (q_idx % 2 == 0) & (kv_idx < 50)

    bm = fj.create_block_mask(odd_rows_in_batch_0, 2, 1, L, S, BLOCK_SIZE=32)
    out, lse = check(flex, q, k, v, None, bm, {"decode": True, "decode_splits": 4})
    assert (out[0, :, 1::2] == 0).all() and np.isneginf(lse[0, :, 1::2]).all()


def test_decode_no_mask_batch_broadcast_and_value_dim(flex):
    q, k, v = random_qkv(6, 3, 4, 5, 130, 16, Ev=8, Hkv=1, Bkv=1)
    check(flex, q, k, v, None, None, {"decode": True, "decode_splits": 2})


def test_decode_is_automatic_for_short_queries_and_not_under_grad(flex):
    q, k, v = random_qkv(7, 1, 2, 4, 128, 16)
    assert decode_traces(lambda: check(flex, q, k, v)) == 1
    # Not for a query that fills a q block, nor when switched off.
    q_long, _, _ = random_qkv(8, 1, 2, 130, 128, 16)
    assert decode_traces(lambda: check(flex, q_long, k, v)) == 0
    assert decode_traces(lambda: check(flex, q, k, v, options={"decode": False})) == 0

    # Under differentiation the regular forward runs (its residuals feed the backward).
    def loss(q, k, v):
        return jnp.sum(flex(q, k, v) ** 2)

    def ref_loss(q, k, v):
        return jnp.sum(flex_attention_reference(q, k, v) ** 2)

    grads = {}
    assert decode_traces(lambda: grads.update(got=jax.grad(loss, (0, 1, 2))(q, k, v))) == 0
    want = jax.grad(ref_loss, (0, 1, 2))(q, k, v)
    for g, w in zip(grads["got"], want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4)


def test_decode_option_errors(flex):
    q, k, v = random_qkv(9, 1, 1, 130, 64, 16)
    with pytest.raises(ValueError, match="decode'\\]=True needs a query shorter than 128"):
        flex(q, k, v, kernel_options={"decode": True})
    with pytest.raises(ValueError, match="must be True, False or None"):
        flex(q, k, v, kernel_options={"decode": "yes"})
    q1 = q[:, :, :1]
    with pytest.raises(ValueError, match="decode_block_n=48 must divide"):
        flex(q1, k, v, kernel_options={"decode_block_n": 48})


def test_combine_weights_splits_by_their_lse():
    """Two splits of one row merged = softmax over the union; empty splits weigh nothing."""
    rng = np.random.default_rng(0)
    s = rng.standard_normal(10).astype(np.float32)
    vals = rng.standard_normal((10, 3)).astype(np.float32)

    def part(idx):
        w = np.exp(s[idx] - s[idx].max())
        return (w[:, None] * vals[idx]).sum(0) / w.sum(), s[idx].max() + np.log(w.sum())

    (o1, l1), (o2, l2) = part(np.arange(4)), part(np.arange(4, 10))
    o_part = jnp.asarray(np.stack([o1, np.zeros(3, np.float32), o2])[:, None, :])
    lse_part = jnp.asarray(np.array([[l1], [-np.inf], [l2]], np.float32))
    out, lse = combine(o_part, lse_part)
    p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    np.testing.assert_allclose(np.asarray(out)[0], p @ vals, atol=1e-6)
    np.testing.assert_allclose(float(lse[0]), np.log(np.exp(s).sum()), atol=1e-6)
    out, lse = combine(jnp.zeros((2, 1, 3)), jnp.full((2, 1), -jnp.inf))
    assert float(lse[0]) == -np.inf and (np.asarray(out) == 0).all()


@pytest.mark.gpu
def test_gpu_decode_issue_shape(flex):
    """B=8, 32 query heads over 8 kv heads, Q_LEN=1, KV_LEN=32768, D=128, bf16."""
    q, k, v = random_qkv(10, 8, 32, 1, 32768, 128, Hkv=8, dtype=jnp.bfloat16)
    assert decode_traces(lambda: check(flex, q, k, v, atol=2e-2)) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("L", [1, 16, 100])
def test_gpu_decode_masks_and_score_mod(flex, L):
    S = 8192 + 77
    q, k, v = random_qkv(11 + L, 2, 16, L, S, 64, Hkv=4, dtype=jnp.float16)
    slopes = jnp.linspace(0.05, 1.0, 16)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * jnp.abs(q_idx + S - L - kv_idx)

    def window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + S - L) & (q_idx + S - L - kv_idx < 2000)

    bm = fj.create_block_mask(window, 1, 1, L, S)
    check(flex, q, k, v, alibi, bm, {"decode": True}, atol=2e-2)
    check(flex, q, k, v, None, None, {"decode": True}, atol=2e-2)
