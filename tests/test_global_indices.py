"""Global indices: a kernel run on a shard or a chunk, given its index offsets, gives the mods the user's indices.

Each test cuts one problem by hand -- heads, batch, query chunks, a decoding
step, key chunks -- runs every piece through the dispatch layer with its
offsets (b0, h0, q0, kv0) and local block tables, and puts the pieces back
together: out, lse and every gradient must equal the whole call's. The mods
read b, h, q_idx and kv_idx through captured arrays (ALiBi slopes[h],
documents[b, q]), so a local index would be caught.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_qkv

import flexjax as fj
from flexjax.api import prepare
from pallas_kernels import dispatch
from pallas_kernels.softmax import combine
from pallas_kernels.spec import index_offsets

TOL = dict(atol=2e-5, rtol=2e-5)


def local_attention(q, k, v, offsets, score_mod=None, block_mask=None, **kw):
    """flex_attention on a local piece: (out, lse) with the mods seeing offset indices."""
    call = prepare(q, k, v, score_mod, block_mask, **kw)
    return dispatch.attention(q, k, v, call.tables, call.mods, call.spec, call.options, offsets)


def rows_of(bm, b=slice(None), h=slice(None), rows=slice(None), q_len=None):
    """A BlockMask of some batches, heads and q-block rows of `bm`, with bm's own mask_mod.

    Unlike `bm[...]` (which remaps the mask_mod's indices), the mask_mod is
    unchanged: the kernel's offsets supply the global indices.
    """
    sl = (b, h, rows)
    full = bm.full_kv_num_blocks
    return fj.BlockMask.from_kv_blocks(
        bm.kv_num_blocks[sl], bm.kv_indices[sl],
        None if full is None else full[sl], None if full is None else bm.full_kv_indices[sl],
        BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=bm.mask_mod,
        seq_lengths=(q_len or bm.seq_lengths[0], bm.seq_lengths[1]),
    )  # fmt: skip


def alibi(slopes):
    def alibi_bias(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx) * 0.1

    return alibi_bias


def weights(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_head_shards_see_global_heads_forward_and_backward():
    B, Hq, Hkv, L, S = 2, 4, 2, 70, 90
    q, k, v = random_qkv(0, B, Hq, L, S, 16, Hkv=Hkv)
    slopes = jnp.asarray([0.3, -0.5, 0.9, 0.1], jnp.float32)

    def head_window(b, h, qi, kv):  # a different window per head
        return (qi + 20 >= kv) & (qi - kv <= 8 * (h + 1))

    bm = fj.create_block_mask(head_window, 1, Hq, L, S, BLOCK_SIZE=16)
    w_out, w_lse = weights((B, Hq, L, 16), 1), weights((B, Hq, L), 2)

    def loss(out, lse, sl=slice(None)):
        return jnp.sum(out * w_out[:, sl]) + jnp.sum(
            jnp.where(jnp.isfinite(lse), lse, 0) * w_lse[:, sl]
        )

    def whole(q, k, v, slopes):
        out, lse = fj.flex_attention(q, k, v, alibi(slopes), bm, enable_gqa=True, return_lse=True)
        return loss(out, lse)

    def sharded(q, k, v, slopes):
        total = 0.0
        for h0 in (0, 2):  # two shards of 2 query heads and 1 kv head each
            hq, hk = slice(h0, h0 + 2), slice(h0 // 2, h0 // 2 + 1)
            out, lse = local_attention(
                q[:, hq], k[:, hk], v[:, hk], index_offsets(h=h0), alibi(slopes),
                rows_of(bm, h=hq), enable_gqa=True,
            )  # fmt: skip
            total = total + loss(out, lse, hq)
        return total

    want = jax.value_and_grad(whole, argnums=(0, 1, 2, 3))(q, k, v, slopes)
    got = jax.value_and_grad(sharded, argnums=(0, 1, 2, 3))(q, k, v, slopes)
    np.testing.assert_allclose(got[0], want[0], **TOL)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_batch_shards_see_global_batch_indices():
    B, H, L = 4, 2, 64
    q, k, v = random_qkv(3, B, H, L, L, 16)
    docs = jnp.asarray(np.random.default_rng(4).integers(0, 3, (B, L)), jnp.int32)

    def same_doc(b, h, qi, kv):
        return docs[b, qi] == docs[b, kv]

    def by_batch(score, b, h, q_idx, kv_idx):
        return score * (1.0 + 0.25 * b)

    bm = fj.create_block_mask(same_doc, B, 1, L, L, BLOCK_SIZE=16)
    want_out, want_lse = fj.flex_attention(q, k, v, by_batch, bm, return_lse=True)
    for b0 in (0, 2):
        bs = slice(b0, b0 + 2)
        out, lse = local_attention(
            q[bs], k[bs], v[bs], index_offsets(b=b0), by_batch, rows_of(bm, b=bs)
        )
        np.testing.assert_allclose(out, want_out[bs], **TOL)
        np.testing.assert_allclose(lse, want_lse[bs], **TOL)


@pytest.mark.parametrize("chunk", [32, 48])
def test_prompt_chunks_see_global_query_positions(chunk):
    """Query chunks (the last one ragged) against the whole keys: rows of out and lse, dq, and dk/dv summed."""
    L, S, q_bs = 70, 70, 16
    chunk = chunk // q_bs * q_bs  # chunks start on a q block
    q, k, v = random_qkv(5, 1, 2, L, S, 16)
    slopes = jnp.asarray([0.4, 0.8], jnp.float32)
    bm = fj.create_block_mask(lambda b, h, qi, kv: qi >= kv, 1, 1, L, S, BLOCK_SIZE=q_bs)
    w_out = weights((1, 2, L, 16), 6)

    def whole(q, k, v):
        return jnp.sum(fj.flex_attention(q, k, v, alibi(slopes), bm) * w_out)

    def chunked(q, k, v):
        total = 0.0
        for q0 in range(0, L, chunk):
            q1 = min(q0 + chunk, L)
            local_bm = rows_of(bm, rows=slice(q0 // q_bs, -(-q1 // q_bs)), q_len=q1 - q0)
            out, _ = local_attention(
                q[:, :, q0:q1], k, v, index_offsets(q=q0), alibi(slopes), local_bm,
                kernel_options={"decode": False},
            )  # fmt: skip
            total = total + jnp.sum(out * w_out[:, :, q0:q1])
        return total

    want = jax.value_and_grad(whole, argnums=(0, 1, 2))(q, k, v)
    got = jax.value_and_grad(chunked, argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(got[0], want[0], **TOL)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_a_decoding_step_at_position_p_sees_position_p():
    """One query row at position p against the cache: the decode kernel, the table row of p."""
    L, S, q_bs = 100, 100, 32
    q, k, v = random_qkv(7, 2, 4, L, S, 16, Hkv=2)
    slopes = jnp.asarray([0.2, 0.4, 0.6, 0.8], jnp.float32)
    bm = fj.create_block_mask(lambda b, h, qi, kv: qi >= kv, 1, 1, L, S, BLOCK_SIZE=q_bs)
    want, want_lse = fj.flex_attention(q, k, v, alibi(slopes), bm, enable_gqa=True, return_lse=True)
    before = dispatch.trace_count("decode")
    for p in (0, 37, 99):
        out, lse = local_attention(
            q[:, :, p : p + 1], k, v, index_offsets(q=p), alibi(slopes),
            rows_of(bm, rows=slice(p // q_bs, p // q_bs + 1), q_len=1), enable_gqa=True,
        )  # fmt: skip
        np.testing.assert_allclose(out, want[:, :, p : p + 1], **TOL)
        np.testing.assert_allclose(lse, want_lse[:, :, p : p + 1], **TOL)
    assert dispatch.trace_count("decode") == before + 1  # one kernel for every position


def test_key_chunks_see_global_key_positions():
    """Keys in chunks (as a ring would hand them round), merged by their lse."""
    L, S = 48, 100
    q, k, v = random_qkv(8, 1, 2, L, S, 16)
    slopes = jnp.asarray([0.5, -0.7], jnp.float32)
    want, want_lse = fj.flex_attention(q, k, v, alibi(slopes), return_lse=True)
    parts = []
    for kv0 in (0, 40, 80):
        kv1 = min(kv0 + 40, S)
        parts.append(
            local_attention(
                q, k[:, :, kv0:kv1], v[:, :, kv0:kv1], index_offsets(kv=kv0), alibi(slopes)
            )
        )
    out, lse = combine(
        jnp.stack([o.astype(jnp.float32) for o, _ in parts], axis=2),
        jnp.stack([lse for _, lse in parts], axis=2),
    )
    np.testing.assert_allclose(out, want, **TOL)
    np.testing.assert_allclose(lse, want_lse, **TOL)
