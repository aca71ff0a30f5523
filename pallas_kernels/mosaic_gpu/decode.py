"""Split-KV decoding in Pallas Mosaic GPU (sm90): short queries over a long K/V cache.

The work of a decoding step is reading K and V once; the kernel is built to
keep the copy engine busy. As the Triton decode kernel (`triton.decode`,
FlashDecoding's plan), it packs the P query heads of a kv head (P * Q_LEN
rows) into one tile, and cuts each row's walk over its kv blocks (partial,
then full, as the forward walks them) into `splits` contiguous runs, one CTA
each; `softmax.combine` merges the runs' normalised outputs by their lse.
What is its own: a producer warpgroup TMA-copies K/V tiles into a `stages`-deep
ring far ahead of the math, and one consumer warpgroup runs QK^T and PV on
wgmma (P in registers) with the online softmax in float32 between them.
wgmma's tiles have 64 rows, so the packed rows are padded to 64 (the math is
idle most of the time anyway: the kernel is bound by memory), and only the
first `out_rows` rows (P * Q_LEN rounded up to 8) of each run's result go
back to global memory.

Mods run on [64, block_n] register tiles: with heads packed, h is a tile
(row // Q_LEN), q_idx is row % Q_LEN. What it does not run (`decode_refusal`;
the Triton decode kernel runs it, and `kernels()` says so): more than 64
packed rows, a kv length that is not a multiple of the kv block, block_n that
does not divide the kv block, captured-array reads with heads packed (their
index would vary by row) and reads at q_idx tiles.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import dispatch
from pallas_kernels.mosaic_gpu import compat, ring
from pallas_kernels.mosaic_gpu.fwd import SMEM_BYTES, _smem
from pallas_kernels.mosaic_gpu.staged_reads import StagedReads
from pallas_kernels.mosaic_gpu.staging import read_kinds
from pallas_kernels.mosaic_gpu.tile_ops import MosaicTileOps
from pallas_kernels.score_tile import TileMods
from pallas_kernels.softmax import LOG2E, MASKED_SCORE, combine, mod_score_units, scaled
from pallas_kernels.spec import KernelSpec, Layout, Mods, TableView
from pallas_kernels.triton.launch import kernel_mods, mod_inputs

__all__ = ["DecodeConfig", "decode_config", "decode_refusal", "flex_decode", "smem_bytes"]

ROWS = 64  # a wgmma tile's rows: the packed query rows, padded


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """splits: kv runs (CTAs) per (batch, head group); block_n: kv rows per step (divides
    the BlockMask's kv block); stages: the K/V ring's depth; triton: the Triton decode
    kernel's config, for the calls `decode_refusal` names."""

    splits: int
    block_n: int = 64
    stages: int = 4
    triton: Any = None

    def __post_init__(self):
        if self.splits < 1 or self.stages < 2 or self.block_n not in (64, 128):
            raise ValueError(
                f"DecodeConfig: splits >= 1, stages >= 2 and block_n 64 or 128, got {self}"
            )


def heads_per_program(spec: KernelSpec) -> int:
    """P: the query heads one CTA stacks (a kv head's group when the mask allows)."""
    return spec.group_size if spec.mask_head_broadcast or spec.group_size == 1 else 1


def smem_bytes(spec: KernelSpec, cfg: DecodeConfig) -> int:
    item = jnp.dtype(spec.dtype).itemsize
    ring_bytes = 2 * cfg.stages * cfg.block_n * spec.E * item
    tables = 2 * 4 * (spec.C + -spec.C % compat.TABLE_ALIGN)
    return ROWS * spec.E * (item + 4) + ring_bytes + ROWS * 4 + tables + 4 * 1024


def decode_refusal(spec: KernelSpec, mods: Mods, cfg: DecodeConfig) -> str | None:
    """Why this kernel cannot decode the call (the Triton decode kernel then runs it), or None."""
    P = heads_per_program(spec)
    if P * spec.L > ROWS:
        return f"at most {ROWS} packed query rows (heads per kv head x Q_LEN = {P * spec.L})"
    if spec.S % spec.kv_block_size:
        return f"a kv length that is a multiple of the kv block (S={spec.S})"
    if spec.kv_block_size % cfg.block_n:
        return f"decode block_n={cfg.block_n} dividing the kv block {spec.kv_block_size}"
    if smem_bytes(spec, cfg) > SMEM_BYTES:
        return f"shared memory: {smem_bytes(spec, cfg)} bytes > {SMEM_BYTES} (fewer stages)"
    kinds = [read_kinds(p) for p in mods.programs]
    if any(isinstance(k, str) for k in kinds):
        return next(k for k in kinds if isinstance(k, str))
    reads = StagedReads(mods, "decode kernel")
    if reads.q:
        return "captured-array reads at q_idx tiles"
    if P > 1 and any(k for k in kinds):
        return "captured-array reads with query heads packed (the index varies by row)"
    return None


def decode_config(spec: KernelSpec, fields: dict, sm_count: int, triton) -> DecodeConfig:
    """The config with `fields` (DecodeConfig's, from kernel_options) given, the rest default:
    kv tiles of 64 in a ring of 4, the fewest splits that keep the SMs busy in whole waves."""
    block_n = fields.get("block_n", 64)
    stages = fields.get("stages", 4 if block_n == 64 else 2)
    groups = spec.B * (spec.Hq // heads_per_program(spec))
    tiles = spec.C * max(1, spec.kv_block_size // block_n)
    splits = fields.get("splits") or _splits(groups, tiles, sm_count)
    return DecodeConfig(splits=splits, block_n=block_n, stages=stages, triton=triton)


def _splits(groups: int, tiles: int, sm_count: int) -> int:
    """The smallest split count whose CTAs fill at least 90% of their waves over the SMs
    (at least one wave, at most one tile per split)."""
    for s in range(1, tiles + 1):
        ctas = groups * s
        waves = -(-ctas // sm_count)
        if ctas >= sm_count and ctas >= 0.9 * waves * sm_count:
            return s
    return max(1, tiles)


@functools.partial(jax.jit, static_argnames=("spec", "cfg"))
def flex_decode(
    q, k, v, tables: TableView, mods: Mods, offsets, *, spec: KernelSpec, cfg: DecodeConfig
):
    """q [B, Hq, L, E], k/v [Bkv, Hkv, S, E] (BHSD) -> out [B, Hq, L, E] in q's dtype, lse
    [B, Hq, L] float32."""
    dispatch.kernel_traced("MOSAIC_GPU", "decode")
    if offsets is not None or spec.layout is not Layout.BHSD:
        raise ValueError("the Mosaic GPU decode kernel takes BHSD arrays and no index offsets")
    why = decode_refusal(spec, mods, cfg)
    if why is not None:
        raise ValueError(f"the Mosaic GPU decode kernel cannot run this call: {why}")
    interpret, dtype = spec.interpret, q.dtype
    B, L, D, G = spec.B, spec.L, spec.E, spec.group_size
    P = heads_per_program(spec)
    HP, real = spec.Hq // P, P * L
    out_rows = -(-real // 8) * 8
    bn, stages, splits = cfg.block_n, cfg.stages, cfg.splits
    per_block = spec.kv_block_size // bn
    tile = (ROWS, bn)
    pre, to_base2 = mod_score_units(spec.scale, mods.score)
    partial, full = spec.has_partial, spec.has_full
    num, idx, full_num, full_idx = compat.padded_tables(tables)
    consts = mod_inputs(mods, None)
    programs = kernel_mods(mods)["programs"]
    n_score = len(mods.score_consts)
    reads = StagedReads(mods, "decode kernel")
    # The packed rows of a program, padded to a wgmma tile: a small copy of q.
    qp = jnp.pad(q.reshape(B, HP, real, D), ((0, 0), (0, 0), (0, ROWS - real), (0, 0)))

    def body(q_ref, k_ref, v_ref, num_ref, idx_ref, fnum_ref, fidx_ref, *rest):
        const_refs = rest[: len(consts)]
        o_ref, lse_ref, scratch = rest[len(consts) :]
        (q_s, k_s, v_s, o_s, lse_s, p_s, tp_s, tf_s, kv_stage, q_bar, k_bar, v_bar, t_bar,
         c_bar) = scratch  # fmt: skip
        refs = (const_refs[:n_score], const_refs[n_score:])
        split, b, hp = lax.axis_index("s"), lax.axis_index("b"), lax.axis_index("hp")
        bm = 0 if spec.mask_batch_broadcast else b
        hm = 0 if spec.mask_head_broadcast else hp  # P > 1 only with a head-broadcast mask
        kv_b = 0 if spec.kv_batch_broadcast else b
        kv_h = lax.div(hp * P, jnp.int32(G)) if G > 1 else hp
        n_p = num_ref[bm, hm, 0] * per_block if partial else jnp.int32(0)
        n_f = fnum_ref[bm, hm, 0] * per_block if full else jnp.int32(0)
        per = lax.div(n_p + n_f + (splits - 1), jnp.int32(splits))
        lo = jnp.minimum(split * per, n_p + n_f)
        hi = jnp.minimum(lo + per, n_p + n_f)

        def kv_row(t):
            """The first kv row of tile t of the walk: partial blocks' tiles, then full ones."""
            blk, sub = lax.div(t, jnp.int32(per_block)), lax.rem(t, jnp.int32(per_block))
            if partial and full:
                f = lax.div(jnp.maximum(t - n_p, 0), jnp.int32(per_block))
                blk = jnp.where(t < n_p, tp_s[blk], tf_s[f])
                sub = jnp.where(t < n_p, sub, lax.rem(jnp.maximum(t - n_p, 0), per_block))
            else:
                blk = (tp_s if partial else tf_s)[blk]
            return blk * spec.kv_block_size + sub * bn

        def producer():
            if partial:
                compat.copy_list(idx_ref.at[bm, hm, 0], tp_s, t_bar.at[0])
            if full:
                compat.copy_list(fidx_ref.at[bm, hm, 0], tf_s, t_bar.at[0])
            plgpu.barrier_wait(t_bar.at[0])

            def copy(j, slot):
                row0 = kv_row(lo + j)
                rows = pl.ds(row0, bn)
                plgpu.copy_gmem_to_smem(k_ref.at[kv_b, kv_h, rows], k_s.at[slot], k_bar.at[slot])
                if reads.kv:  # the mods' kv_idx slices ride K's barrier
                    found = reads.starts(refs, b, hp, jnp.int32(0), row0)
                    reads.copy(reads.kv, found, bn, kv_stage, slot, k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[kv_b, kv_h, rows], v_s.at[slot], v_bar.at[slot])

            ring.producer_ring(hi - lo, stages, [(copy, c_bar)], interpret)

        def consumer():
            plgpu.copy_gmem_to_smem(q_ref.at[b, hp], q_s, q_bar.at[0])
            plgpu.barrier_wait(t_bar.at[0])
            plgpu.barrier_wait(q_bar.at[0])
            ops = MosaicTileOps(interpret, tile)
            mods_ = TileMods(spec, programs, *refs, None, ops)
            row = ops.iota(tile, 0)
            if P == 1:
                h, q_idx = hp, row  # TileMods clamps q_idx to L - 1: rows past L repeat it
            else:
                h = hp * P + jnp.minimum(lax.div(row, L), P - 1) if L > 1 else hp * P + jnp.minimum(row, P - 1)  # fmt: skip
                q_idx = lax.rem(row, L) if L > 1 else row

            def step(t, carry, masked: bool):
                acc, m_i, l_i = carry
                slot = lax.rem(t - lo, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                needed = lambda read: read[0] == 0 or masked  # mask_mod: partial tiles only
                staged = reads.tiles(reads.kv, kv_stage, slot, tile, 1, interpret, needed)
                s = scaled(compat.matmul_nt(q_s, k_s.at[slot], tile, interpret), pre)
                if masked or mods_.score is not None:
                    kv_idx = ops.index(kv_row(t), 1)
                    ops.staged = reads.order(staged, masked)
                    s, _, _ = mods_.apply(s, b, h, q_idx, kv_idx, masked)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                m_base2 = jnp.where(m_new == MASKED_SCORE, 0.0, m_new) * to_base2
                p = jnp.exp2(s * to_base2 - lax.broadcast_in_dim(m_base2, tile, [0]))
                alpha = jnp.exp2(m_i * to_base2 - m_base2)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha + p.sum(axis=1)
                plgpu.barrier_wait(v_bar.at[slot])
                acc = compat.matmul_acc(acc, p.astype(dtype), v_s.at[slot], p_s, interpret)
                ring.release(c_bar.at[slot], bool(reads.kv))  # K, V (and slices) are read
                return acc, m_new, l_i

            acc = compat.layout_cast(jnp.zeros((ROWS, D), jnp.float32), compat.WGMMA, interpret)
            m_i = compat.layout_cast(jnp.full((ROWS,), MASKED_SCORE, jnp.float32), compat.ROW, interpret)  # fmt: skip
            l_i = compat.layout_cast(jnp.zeros((ROWS,), jnp.float32), compat.ROW, interpret)
            carry = (acc, m_i, l_i)
            if partial:
                carry = lax.fori_loop(lo, jnp.minimum(hi, n_p), functools.partial(step, masked=True), carry)  # fmt: skip
            if full:
                carry = lax.fori_loop(jnp.maximum(lo, n_p), hi, functools.partial(step, masked=False), carry)  # fmt: skip
            acc, m_i, l_i = carry
            empty = l_i == 0.0
            l_safe = jnp.where(empty, 1.0, l_i)
            m_nat = jnp.where(m_i == MASKED_SCORE, 0.0, m_i) * (to_base2 / LOG2E)
            lse_s[...] = jnp.where(empty, MASKED_SCORE, m_nat + jnp.log(l_safe))
            o_s[...] = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s.at[pl.ds(0, out_rows)], o_ref.at[b, hp, split])
            plgpu.copy_smem_to_gmem(lse_s.at[pl.ds(0, out_rows)], lse_ref.at[b, hp, split])
            plgpu.wait_smem_to_gmem(0)

        ring.roles(1, interpret, producer, consumer)

    scratch = (
        _smem((ROWS, D), dtype, interpret),  # the packed query rows
        _smem((stages, bn, D), dtype, interpret),  # K ring
        _smem((stages, bn, D), dtype, interpret),  # V ring
        plgpu.SMEM((ROWS, D), jnp.float32),  # out (its first out_rows rows go back)
        plgpu.SMEM((ROWS,), jnp.float32),  # lse
        plgpu.SMEM((ROWS, bn), dtype) if interpret else None,  # P (interpret mode)
        plgpu.SMEM(idx.shape[-1:], jnp.int32) if partial else None,  # the row's partial blocks
        plgpu.SMEM(full_idx.shape[-1:], jnp.int32) if full else None,  # and its full blocks
        reads.scratch(reads.kv, stages, bn),  # the kv_idx slices
        plgpu.Barrier(num_arrivals=1, num_barriers=1),  # Q
        plgpu.Barrier(num_arrivals=1 + len(reads.kv), num_barriers=stages),  # K (+ kv slices)
        plgpu.Barrier(num_arrivals=1, num_barriers=stages),  # V
        plgpu.Barrier(
            num_arrivals=compat.list_arrivals(partial, idx, full, full_idx), num_barriers=1
        ),  # tables  # fmt: skip
        plgpu.Barrier(num_arrivals=1, num_barriers=stages),  # slot consumed
    )
    out_type = (
        jax.ShapeDtypeStruct((B, HP, splits, out_rows, D), jnp.float32),
        jax.ShapeDtypeStruct((B, HP, splits, out_rows), jnp.float32),
    )
    grid, names = (splits, B, HP), ("s", "b", "hp")
    kernel = compat.kernel(body, out_type, scratch, grid, names, 2, interpret)
    o_part, lse_part = kernel(qp, k, v, num, idx, full_num, full_idx, *consts)
    out, lse = combine(o_part[..., :real, :], lse_part[..., :real])
    return out.reshape(B, spec.Hq, L, D).astype(dtype), lse.reshape(B, spec.Hq, L)
