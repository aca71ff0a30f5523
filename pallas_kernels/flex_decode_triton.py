"""Split-KV forward for short queries (decoding): Pallas on GPU with the Triton lowering.

With a query of a few rows (Q_LEN = 1 when generating a token), the regular
forward has one q tile per (batch, head): B * Hq programs, each walking the
whole key sequence alone. That is far too few programs to keep an H100's 132
SMs reading K and V, and a q tile of 64 or 128 rows is mostly padding. This
kernel fixes both, as FlashDecoding does:

  * GQA packing: the G query heads that share one kv head are stacked into
    the rows of one tile (G * Q_LEN rows), so K and V are read once per
    group, not once per query head, and the tensor cores see real rows.
    Mods then get h as a per-row tile. When the BlockMask differs per head
    the heads cannot share one walk, and each program takes one query head.
  * Split KV: the blocks a row visits (partial, then full, as the forward
    walks them) are cut into `splits` contiguous runs, one program each; the
    grid is (splits, batch, head groups). Each program writes its normalised
    partial output and its log-sum-exp; `combine` merges them in float32:
    lse = logsumexp_i(lse_i), out = sum_i exp(lse_i - lse) out_i.

Every q row must lie in the BlockMask's first q block (Q_LEN <= its q block
size), so all rows share one table row. The per-tile math is the forward's
(`tile_step`, `finish`), so results match the regular kernel's.
Forward only: under differentiation flex_attention uses the regular forward,
whose residuals the backward needs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.block_walk import walk_tiles
from pallas_kernels.flex_fwd_triton import (
    TRACE_COUNT,
    FwdStatic,
    check_config,
    compiler_params,
    finish,
    tile_step,
)
from pallas_kernels.score_tile import MASKED_SCORE, div_static, rem_static

__all__ = ["DecodeConfig", "combine", "flex_decode"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """Tiles and launch parameters of the decode kernel."""

    rows: int  # rows per program tile: heads_per_program * Q_LEN, padded to a power of 2
    block_n: int  # kv rows per step
    splits: int  # kv runs per (batch, head group)
    heads_per_program: int  # G (GQA packing) or 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        check_config(
            self, "decode_", pow2=("rows", "block_n", "num_warps"),
            positive=("splits", "heads_per_program", "num_stages"),
        )  # fmt: skip


def _decode_kernel(
    q_ref, k_ref, v_ref, kv_num_ref, kv_idx_ref, full_num_ref, full_idx_ref,
    *rest, st: FwdStatic, cfg: DecodeConfig, n_score: int, n_mask: int,
):  # fmt: skip
    TRACE_COUNT["decode"] += 1
    score_refs = rest[:n_score]
    mask_refs = rest[n_score : n_score + n_mask]
    o_ref, lse_ref = rest[n_score + n_mask :]
    split, b, hp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    P = cfg.heads_per_program
    r = lax.broadcasted_iota(jnp.int32, (cfg.rows, 1), 0)
    q_idx = rem_static(r, st.L)  # padding rows repeat real rows; they are dropped
    if P == 1:
        h = hp
    else:
        h = hp * P + jnp.minimum(div_static(r, st.L), P - 1)
    bm = 0 if st.mask_batch_broadcast else b
    hm = 0 if st.mask_head_broadcast else hp  # P > 1 only with a head-broadcast mask
    tiles_per_block = st.kv_block_size // cfg.block_n
    zero = jnp.int32(0)
    n_part = kv_num_ref[bm, hm, 0] * tiles_per_block if st.has_partial else zero
    n_full = full_num_ref[bm, hm, 0] * tiles_per_block if st.has_full else zero
    per = div_static(n_part + n_full + (cfg.splits - 1), cfg.splits)
    lo = split * per
    hi = jnp.minimum(lo + per, n_part + n_full)

    q = q_ref[...]
    carry = (
        jnp.zeros((cfg.rows, v_ref.shape[-1]), jnp.float32),
        jnp.full((cfg.rows,), MASKED_SCORE, jnp.float32),
        jnp.zeros((cfg.rows,), jnp.float32),
    )

    def walk(idx_ref, first, last, masked, carry):
        def body(start_n, carry):
            k = k_ref[pl.ds(start_n, cfg.block_n), :]
            v = v_ref[pl.ds(start_n, cfg.block_n), :]
            return tile_step(
                q, k, v, carry, start_n, q_idx, b, h, st, cfg, score_refs, mask_refs, masked
            )

        lead = (bm, hm, 0)
        return walk_tiles(idx_ref, lead, first, last, st.kv_block_size, cfg.block_n, body, carry)

    if st.has_partial:
        carry = walk(kv_idx_ref, lo, jnp.minimum(hi, n_part), True, carry)
    if st.has_full:
        carry = walk(full_idx_ref, jnp.maximum(lo, n_part) - n_part, hi - n_part, False, carry)
    out, lse = finish(carry, st)
    o_ref[...] = out
    lse_ref[...] = lse


def combine(o_part, lse_part):
    """Merge split results: o_part [..., splits, rows, Ev], lse_part [..., splits, rows] (f32)."""
    m = jnp.max(lse_part, axis=-2)
    m_safe = jnp.where(m == MASKED_SCORE, 0.0, m)
    w = jnp.exp(lse_part - m_safe[..., None, :])  # empty splits (lse -inf) weigh 0
    denom = jnp.sum(w, axis=-2)
    out = jnp.sum(w[..., None] * o_part, axis=-3) / jnp.where(denom == 0, 1.0, denom)[..., None]
    lse = jnp.where(denom == 0, MASKED_SCORE, m_safe + jnp.log(denom))
    return out, lse


@functools.partial(jax.jit, static_argnames=("st", "cfg"))
def flex_decode(q, k, v, tables, score_consts, mask_consts, *, st: FwdStatic, cfg: DecodeConfig):
    """q [B, Hq, >= L, E] (rows past L ignored), k/v [Bkv, Hkv, Sp, E/Ev], tables as in flex_fwd.

    Returns out [B, Hq, L, Ev] in q's dtype and lse [B, Hq, L] float32.
    """
    B, Hq, _, E = q.shape
    Sp, Ev = v.shape[2], v.shape[3]
    L, P, G = st.L, cfg.heads_per_program, st.group_size
    HP = Hq // P
    qp = q[:, :, :L].reshape(B, HP, P * L, E)
    qp = jnp.pad(qp, ((0, 0), (0, 0), (0, cfg.rows - P * L), (0, 0)))

    def kv_map(split, b, hp):
        return (0 if st.kv_batch_broadcast else b, div_static(hp * P, G), 0, 0)

    whole = lambda x: pl.BlockSpec(x.shape, lambda s, b, h, n=x.ndim: (0,) * n)
    kernel = functools.partial(
        _decode_kernel, st=st, cfg=cfg, n_score=len(score_consts), n_mask=len(mask_consts)
    )
    o_part, lse_part = pl.pallas_call(
        kernel,
        grid=(cfg.splits, B, HP),
        in_specs=[
            pl.BlockSpec((None, None, cfg.rows, E), lambda s, b, h: (b, h, 0, 0)),
            pl.BlockSpec((None, None, Sp, E), kv_map),
            pl.BlockSpec((None, None, Sp, Ev), kv_map),
            *[whole(t) for t in tables],
            *[whole(c) for c in score_consts],
            *[whole(c) for c in mask_consts],
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, cfg.rows, Ev), lambda s, b, h: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, cfg.rows), lambda s, b, h: (b, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, HP, cfg.splits, cfg.rows, Ev), jnp.float32),
            jax.ShapeDtypeStruct((B, HP, cfg.splits, cfg.rows), jnp.float32),
        ],
        compiler_params=compiler_params(st, cfg),
        interpret=st.interpret,
        name="flex_decode",
    )(qp, k, v, *tables, *score_consts, *mask_consts)
    out, lse = combine(o_part, lse_part)
    out = out[:, :, : P * L].reshape(B, Hq, L, Ev).astype(q.dtype)
    return out, lse[:, :, : P * L].reshape(B, Hq, L)
