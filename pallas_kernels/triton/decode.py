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
    partial output and its log-sum-exp; `softmax.combine` merges them in
    float32: lse = logsumexp_i(lse_i), out = sum_i exp(lse_i - lse) out_i.

Every q row must lie in the BlockMask's first q block (Q_LEN <= its q block
size), so all rows share one table row. The per-tile math is the forward's
(`tile_step`, `finish`), so results match the regular kernel's.
Forward only: under differentiation flex_attention uses the regular forward,
whose residuals the backward needs.

The stacked rows are a free reshape of q ([B, Hq, L, E] -> [B, Hq / P, P * L,
E]); the tile's rows past P * L, K/V rows past the key length and head dims
that are not powers of 2 are bounded loads, as in the forward.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import dispatch
from pallas_kernels.score_tile import TileMods
from pallas_kernels.softmax import MASKED_SCORE, combine, finish, mod_score_units
from pallas_kernels.spec import KernelSpec, Layout, Mods, TableView
from pallas_kernels.triton.fwd import KvTiles, tile_step
from pallas_kernels.triton.launch import (
    check_config,
    compiler_params,
    div_static,
    kernel_mods,
    kv_rows,
    load,
    mod_inputs,
    padded_dim,
    rem_static,
    split_refs,
    store,
    tile_mask,
    whole,
)
from pallas_kernels.triton.tile_ops import tile_ops_for
from pallas_kernels.triton.walk import walk_tiles
from pallas_kernels.vma import out_struct, varying_axes

__all__ = ["DecodeConfig", "flex_decode"]


def _decode_kernel(
    q_ref, k_ref, v_ref, kv_num_ref, kv_idx_ref, full_num_ref, full_idx_ref,
    *rest, spec: KernelSpec, cfg: DecodeConfig, programs: tuple, n_consts: tuple,
):  # fmt: skip
    off_ref, score_refs, mask_refs, (o_ref, lse_ref) = split_refs(
        rest, n_consts, spec.global_offsets
    )
    ops = tile_ops_for(spec.interpret)
    mods = TileMods(spec, programs, score_refs, mask_refs, off_ref, ops)
    split, b, hp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    P, L = cfg.heads_per_program, spec.L
    r = ops.iota((cfg.rows, 1), 0)
    q_idx = rem_static(r, L)  # rows past P * L repeat real rows; they are dropped
    if P == 1:
        h = hp
    else:
        h = hp * P + jnp.minimum(div_static(r, L), P - 1)
    bm = 0 if spec.mask_batch_broadcast else b
    hm = 0 if spec.mask_head_broadcast else hp  # P > 1 only with a head-broadcast mask
    tiles_per_block = spec.kv_block_size // cfg.block_n
    zero = jnp.int32(0)
    n_part = kv_num_ref[bm, hm, 0] * tiles_per_block if spec.has_partial else zero
    n_full = full_num_ref[bm, hm, 0] * tiles_per_block if spec.has_full else zero
    per = div_static(n_part + n_full + (cfg.splits - 1), cfg.splits)
    lo = split * per
    hi = jnp.minimum(lo + per, n_part + n_full)

    row_limit = P * L if cfg.rows != P * L else None
    tile_2d = (slice(None), slice(None))
    q = load(q_ref, tile_2d, tile_mask(0, cfg.rows, row_limit, q_ref.shape[-1], spec.E))
    kv = KvTiles(spec, k_ref, v_ref, cfg.block_n)
    e_v = v_ref.shape[-1]
    carry = (
        jnp.zeros((cfg.rows, e_v), jnp.float32),
        jnp.full((cfg.rows,), MASKED_SCORE, jnp.float32),
        jnp.zeros((cfg.rows,), jnp.float32),
    )

    def walk(idx_ref, first, last, masked, carry):
        def body(start_n, carry):
            k, v = kv.load(start_n)
            return tile_step(q, k, v, carry, start_n, q_idx, b, h, spec, mods, cfg.block_n, masked)  # fmt: skip

        lead = (bm, hm, 0)
        return walk_tiles(idx_ref, lead, first, last, spec.kv_block_size, cfg.block_n, body, carry)

    if spec.has_partial:
        carry = walk(kv_idx_ref, lo, jnp.minimum(hi, n_part), True, carry)
    if spec.has_full:
        carry = walk(full_idx_ref, jnp.maximum(lo, n_part) - n_part, hi - n_part, False, carry)
    out, lse = finish(carry, mod_score_units(spec.scale, programs[0])[1])
    store(o_ref, tile_2d, out, tile_mask(0, cfg.rows, row_limit, e_v, spec.Ev))
    store(lse_ref, slice(None), lse, tile_mask(0, cfg.rows, row_limit))


@functools.partial(jax.jit, static_argnames=("spec", "cfg"))
def flex_decode(
    q, k, v, tables: TableView, mods: Mods, offsets, *, spec: KernelSpec, cfg: DecodeConfig
):
    """q [B, Hq, L, E], k/v [Bkv, Hkv, S, E/Ev], tables and offsets as in `flex_fwd`.

    Returns out [B, Hq, L, Ev] in q's dtype and lse [B, Hq, L] float32.
    """
    if spec.layout is not Layout.BHSD:
        raise NotImplementedError(
            f"flex_decode stacks the heads of a BHSD query, got {spec.layout}"
        )
    dispatch.kernel_traced("TRITON", "decode")
    B, Hq, L = spec.B, spec.Hq, spec.L
    P, G = cfg.heads_per_program, spec.group_size
    HP, rows = Hq // P, P * L
    Ep, Evp = padded_dim(spec.E), padded_dim(spec.Ev)
    qp = q.reshape(B, HP, rows, spec.E)  # P heads' rows stacked: a free reshape

    def kv_map(split, b, hp):
        return (0 if spec.kv_batch_broadcast else b, div_static(hp * P, G), 0, 0)

    extra = mod_inputs(mods, offsets)
    axes = varying_axes(q, k, v, tables, extra)
    o_part, lse_part = pl.pallas_call(
        functools.partial(_decode_kernel, spec=spec, cfg=cfg, **kernel_mods(mods)),
        grid=(cfg.splits, B, HP),
        in_specs=[
            pl.BlockSpec((None, None, cfg.rows, Ep), lambda s, b, h: (b, h, 0, 0)),
            pl.BlockSpec((None, None, kv_rows(spec), Ep), kv_map),
            pl.BlockSpec((None, None, kv_rows(spec), Evp), kv_map),
            *[whole(t) for t in tables],
            *[whole(x) for x in extra],
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, cfg.rows, Evp), lambda s, b, h: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, cfg.rows), lambda s, b, h: (b, h, s, 0)),
        ],
        out_shape=[
            out_struct((B, HP, cfg.splits, rows, spec.Ev), jnp.float32, axes),
            out_struct((B, HP, cfg.splits, rows), jnp.float32, axes),
        ],
        compiler_params=compiler_params(spec, cfg),
        interpret=spec.interpret,
        name="flex_decode",
    )(qp, k, v, *tables, *extra)
    out, lse = combine(o_part, lse_part)
    return out.reshape(B, Hq, L, spec.Ev).astype(q.dtype), lse.reshape(B, Hq, L)


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
