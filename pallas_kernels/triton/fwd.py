"""Block-sparse flex_attention forward, Pallas on GPU with the Triton lowering.

One program per (q tile, batch, query head). It walks the BlockMask row of
its q tile twice: first the *partial* kv blocks (`kv_num_blocks`,
`kv_indices`), where it applies score_mod and then mask_mod element by element;
then the *full* blocks, where every element is kept, so mask_mod is skipped
(that is the whole point of separating them). Empty blocks are never listed,
so they cost nothing. The loop over a row's tiles is `walk.walk_tiles` (the
tile start carried through the loop, so K/V loads pipeline fully).

The softmax is `pallas_kernels.softmax`'s, online, in float32 and base 2:
each p is one fused multiply-add and one `ex2` (`exp2_fma`, inline asm on
the GPU); with no score_mod, or one that scales with the score, the scale
folds into the same multiply (`mod_score_units`).

Kernels take plain arrays and a frozen config, never a BlockMask. Nothing is
padded in HBM: the last q tile, the K/V rows past the key length and head
dims that are not powers of 2 are bounded loads and stores (`launch`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import dispatch
from pallas_kernels.score_tile import TileMods
from pallas_kernels.softmax import MASKED_SCORE, finish, mod_score_units, scaled
from pallas_kernels.spec import KernelSpec, Mods, TableView
from pallas_kernels.triton.launch import (
    bound,
    check_config,
    compiler_params,
    div_static,
    kernel_mods,
    kv_rows,
    load,
    mod_inputs,
    padded_dim,
    row_spec,
    split_refs,
    store,
    tile_mask,
    tile_spec,
    whole,
)
from pallas_kernels.triton.tile_ops import tile_ops_for
from pallas_kernels.triton.walk import walk_tiles
from pallas_kernels.vma import out_struct, varying_axes

__all__ = ["FwdConfig", "KvTiles", "flex_fwd", "tile_step"]


class KvTiles:
    """How a program reads K/V tiles: `[start, start + block_n)` rows, bounded to the key length."""

    def __init__(self, spec: KernelSpec, k_ref, v_ref, block_n: int):
        self.k_ref, self.v_ref, self.block_n = k_ref, v_ref, block_n
        self.row_limit = bound(spec.S, kv_rows(spec))
        self.e, self.ev = spec.E, spec.Ev

    def load(self, start):
        rows = pl.ds(start, self.block_n)
        k_cols, v_cols = self.k_ref.shape[-1], self.v_ref.shape[-1]
        k_mask = tile_mask(start, self.block_n, self.row_limit, k_cols, self.e)
        v_mask = tile_mask(start, self.block_n, self.row_limit, v_cols, self.ev)
        return load(self.k_ref, (rows, slice(None)), k_mask), load(
            self.v_ref, (rows, slice(None)), v_mask
        )


def tile_step(
    q, k, v, carry, start_n, q_idx, b, h, spec, mods: TileMods, block_n, masked, q_shift=None
):
    """One kv tile of the online softmax (also the decode kernel's). masked: apply mask_mod.

    m_i is the running row max in score units (see `mod_score_units`); q_shift:
    `TileMods.q_shift` of the q block.
    """
    acc, m_i, l_i = carry
    pre, to_base2 = mod_score_units(spec.scale, mods.score)
    # float32 inputs get float32 products (Triton's default for them is tf32).
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s = scaled(jnp.dot(q, k.T, precision=precision, preferred_element_type=jnp.float32), pre)
    kv_idx = start_n + mods.ops.iota((1, block_n), 1)
    kv_shift = mods.kv_shift(div_static(start_n, spec.kv_block_size))
    s, _, _ = mods.apply(s, b, h, q_idx, kv_idx, masked, q_shift=q_shift, kv_shift=kv_shift)

    m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
    m_base2 = jnp.where(m_new == MASKED_SCORE, 0.0, m_new) * to_base2
    p = mods.ops.exp2_fma(s, to_base2, m_base2[:, None])
    alpha = mods.ops.exp2(m_i * to_base2 - m_base2)
    l_new = alpha * l_i + jnp.sum(p, axis=1)
    pv = jnp.dot(p.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_new


def _fwd_kernel(
    q_ref, k_ref, v_ref, kv_num_ref, kv_idx_ref, full_num_ref, full_idx_ref, *rest,
    spec: KernelSpec, cfg: FwdConfig, programs: tuple, n_consts: tuple[int, int],
):  # fmt: skip
    off_ref, score_refs, mask_refs, (o_ref, lse_ref) = split_refs(
        rest, n_consts, spec.global_offsets
    )
    tile_mods = TileMods(
        spec, programs, score_refs, mask_refs, off_ref, tile_ops_for(spec.interpret)
    )

    tile = pl.program_id(0)
    b = pl.program_id(1)
    h = pl.program_id(2)
    bm = 0 if spec.mask_batch_broadcast else b
    hm = 0 if spec.mask_head_broadcast else h
    row = div_static(tile, spec.q_block_size // cfg.block_m)
    first = tile * cfg.block_m
    q_idx = first + tile_mods.ops.iota((cfg.block_m, 1), 0)
    row_limit = bound(spec.L, pl.cdiv(spec.L, cfg.block_m) * cfg.block_m)
    q_shift = tile_mods.q_shift(row)

    whole_tile = (slice(None), slice(None))
    q = load(q_ref, whole_tile, tile_mask(first, cfg.block_m, row_limit, q_ref.shape[-1], spec.E))
    kv = KvTiles(spec, k_ref, v_ref, cfg.block_n)
    e_v = v_ref.shape[-1]
    carry = (
        jnp.zeros((cfg.block_m, e_v), jnp.float32),
        jnp.full((cfg.block_m,), MASKED_SCORE, jnp.float32),
        jnp.zeros((cfg.block_m,), jnp.float32),
    )

    def walk(num_ref, idx_ref, masked, carry):
        def body(start_n, carry):
            k, v = kv.load(start_n)
            return tile_step(q, k, v, carry, start_n, q_idx, b, h, spec, tile_mods, cfg.block_n, masked, q_shift)  # fmt: skip

        n_tiles = num_ref[bm, hm, row] * (spec.kv_block_size // cfg.block_n)
        lead = (bm, hm, row)
        return walk_tiles(idx_ref, lead, 0, n_tiles, spec.kv_block_size, cfg.block_n, body, carry)

    if spec.has_partial:
        carry = walk(kv_num_ref, kv_idx_ref, True, carry)
    if spec.has_full:
        carry = walk(full_num_ref, full_idx_ref, False, carry)
    out, lse = finish(carry, mod_score_units(spec.scale, programs[0])[1])
    out_mask = tile_mask(first, cfg.block_m, row_limit, e_v, spec.Ev)
    store(o_ref, whole_tile, out.astype(o_ref.dtype), out_mask)
    store(lse_ref, slice(None), lse, tile_mask(first, cfg.block_m, row_limit))


@functools.partial(jax.jit, static_argnames=("spec", "cfg"))
def flex_fwd(q, k, v, tables: TableView, mods: Mods, offsets, *, spec: KernelSpec, cfg: FwdConfig):
    """q [B, Hq, L, E], k [Bkv, Hkv, S, E], v [Bkv, Hkv, S, Ev] (in spec.layout's order).

    tables: the row view of the BlockMask tables; offsets: int32[4] (b0, h0,
    q0, kv0), or None when spec.global_offsets is False. Returns out [B, Hq, L, Ev] in q's dtype and lse [B, Hq, L] f32.
    """
    dispatch.kernel_traced("TRITON", "fwd")
    layout, G = spec.layout, spec.group_size
    Ep, Evp = padded_dim(spec.E), padded_dim(spec.Ev)

    def kv_at(tile, b, h):
        return (0 if spec.kv_batch_broadcast else b, div_static(h, G), 0)

    q_at = lambda tile, b, h: (b, h, tile)
    extra = mod_inputs(mods, offsets)
    axes = varying_axes(q, k, v, tables, extra)
    in_specs = [
        tile_spec(layout, None, cfg.block_m, Ep, q_at),
        tile_spec(layout, None, kv_rows(spec), Ep, kv_at),
        tile_spec(layout, None, kv_rows(spec), Evp, kv_at),
        *[whole(t) for t in tables],
        *[whole(x) for x in extra],
    ]
    out_specs = [
        tile_spec(layout, None, cfg.block_m, Evp, q_at),
        row_spec(layout, None, cfg.block_m, q_at),
    ]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, spec=spec, cfg=cfg, **kernel_mods(mods)),
        grid=(pl.cdiv(spec.L, cfg.block_m), spec.B, spec.Hq),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[
            out_struct(layout.shape(spec.B, spec.Hq, spec.L, spec.Ev), q.dtype, axes),
            out_struct(layout.shape(spec.B, spec.Hq, spec.L, 0)[:3], jnp.float32, axes),
        ],
        compiler_params=compiler_params(spec, cfg),
        interpret=spec.interpret,
        name="flex_fwd",
    )(q, k, v, *tables, *extra)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FwdConfig:
    """Compute tiles and launch parameters (separate from the BlockMask's block size)."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        check_config(self, "", pow2=("block_m", "block_n", "num_warps"), positive=("num_stages",))
