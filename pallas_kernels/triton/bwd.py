"""Block-sparse flex_attention backward: a dq kernel and a dk/dv kernel (Pallas, Triton lowering).

With p = exp(s - lse) recomputed from the forward's lse (s = masked, modded
scores, natural log), the gradients are
    dv_j  = sum_i p_ij do_i
    dp_ij = do_i . v_j
    ds_ij = p_ij (dp_ij - delta_i),   delta_i = do_i . out_i - dlse_i
    dq_i  = scale sum_j ds'_ij k_j,   dk_j = scale sum_i ds'_ij q_i
where ds' = ds * d score_mod / d score is the score_mod's vector-Jacobian
product, taken inside the kernel from the traced mod (`mod_eval`). The lse
cotangent enters through delta (d lse / d s = p); `pallas_kernels.vjp`
computes delta before these kernels run.

Two kernels, so that every output is written by exactly one program and the
result is deterministic (no atomics for dq, dk, dv):
  * dq: one program per (q tile, batch, query head), walking the BlockMask's
    row tables exactly like the forward (partial blocks with mask_mod, then
    full blocks without).
  * dk/dv: one program per (kv tile, batch, kv head), walking the transposed
    column tables (`q_num_blocks`, `q_indices`, then the full ones) for each
    query head of its GQA group; tiles are transposed ([BN, BM]) so every
    product is a plain `a @ b` or `a @ b.T`. With k/v broadcast over the
    batch, the per-batch results are summed afterwards.

Gradients of captured score_mod arrays (learnable biases) are a scatter-add of
the score cotangent at the gathered indices. The dq kernel does it: on the GPU
with float32 atomic adds (after summing over the tile dimensions an index does
not vary in, e.g. one add per tile for `slopes[h]`), so those gradients are not
bitwise deterministic run to run; in interpret mode with a sequential
read-modify-write, which is.

Rows past the query length read lse = +inf (and rows that keep nothing have
+inf from `vjp.preprocess`), so their p is exactly 0; nothing is padded in HBM.
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
from pallas_kernels.softmax import LOG2E, mod_score_units, scaled
from pallas_kernels.spec import BlockTables, KernelSpec, Mods
from pallas_kernels.triton.fwd import KvTiles
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
from pallas_kernels.vma import cast_varying, out_struct, varying_axes

__all__ = ["BwdConfig", "flex_bwd"]


def _precision(dtype):
    # float32 inputs get float32 products (Triton's default for them is tf32).
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dot(a, b, precision):
    return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------
# dq (and captured-array gradients)
# ----------------------------------------------------------------------------


def _dq_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
    kv_num_ref, kv_idx_ref, full_num_ref, full_idx_ref,
    *rest, spec: KernelSpec, cfg: BwdConfig, programs: tuple, n_consts: tuple, grad_slots: tuple,
):  # fmt: skip
    off_ref, score_refs, mask_refs, outs = split_refs(rest, n_consts, spec.global_offsets)
    outs = outs[len(grad_slots) :]  # skip the aliased zero inputs
    dq_ref, grad_refs = outs[0], dict(zip(grad_slots, outs[1:], strict=True))
    ops = tile_ops_for(spec.interpret)
    mods = TileMods(spec, programs, score_refs, mask_refs, off_ref, ops)

    tile, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bm = 0 if spec.mask_batch_broadcast else b
    hm = 0 if spec.mask_head_broadcast else h
    row = div_static(tile, spec.q_block_size // cfg.block_m)
    first = tile * cfg.block_m
    q_idx = first + ops.iota((cfg.block_m, 1), 0)
    row_limit = bound(spec.L, pl.cdiv(spec.L, cfg.block_m) * cfg.block_m)
    tile_2d = (slice(None), slice(None))
    q = load(q_ref, tile_2d, tile_mask(first, cfg.block_m, row_limit, q_ref.shape[-1], spec.E))
    do = load(do_ref, tile_2d, tile_mask(first, cfg.block_m, row_limit, do_ref.shape[-1], spec.Ev))
    rows_mask = tile_mask(first, cfg.block_m, row_limit)
    lse = load(lse_ref, slice(None), rows_mask, other=jnp.inf)
    delta = load(delta_ref, slice(None), rows_mask)
    lse_base2 = lse * LOG2E
    pre, to_base2 = mod_score_units(spec.scale, programs[0], captured_grads=bool(grad_slots))
    prec = _precision(q.dtype)
    kv = KvTiles(spec, k_ref, v_ref, cfg.block_n)
    q_shift = mods.q_shift(row)

    def step(start_n, dq, masked):
        k, v = kv.load(start_n)
        kv_idx = start_n + ops.iota((1, cfg.block_n), 1)
        s = scaled(_dot(q, k.T, prec), pre)
        kv_shift = mods.kv_shift(div_static(start_n, spec.kv_block_size))
        s, _, pullback = mods.apply(s, b, h, q_idx, kv_idx, masked, grad_slots, q_shift, kv_shift)
        p = ops.exp2_fma(s, to_base2, lse_base2[:, None])
        dp = _dot(do, v.T, prec)
        ds, grads = pullback(p * (dp - delta[:, None]))
        # d_value has the shape of its index, already summed over the dims the
        # index does not vary in (one add per tile for `slopes[h]`).
        for slot, flat, d_value in grads:
            ops.scatter_add(grad_refs[slot], flat, d_value)
        return dq + _dot(ds.astype(k.dtype), k, prec)

    def walk(num_ref, idx_ref, masked, dq):
        body = lambda start_n, dq: step(start_n, dq, masked)
        n_tiles = num_ref[bm, hm, row] * (spec.kv_block_size // cfg.block_n)
        return walk_tiles(
            idx_ref, (bm, hm, row), 0, n_tiles, spec.kv_block_size, cfg.block_n, body, dq
        )

    dq = jnp.zeros(q.shape, jnp.float32)
    if spec.has_partial:
        dq = walk(kv_num_ref, kv_idx_ref, True, dq)
    if spec.has_full:
        dq = walk(full_num_ref, full_idx_ref, False, dq)
    dq_mask = tile_mask(first, cfg.block_m, row_limit, dq_ref.shape[-1], spec.E)
    store(dq_ref, tile_2d, (dq * spec.scale).astype(dq_ref.dtype), dq_mask)


# ----------------------------------------------------------------------------
# dk / dv
# ----------------------------------------------------------------------------


def _dkdv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
    q_num_ref, q_idx_ref, full_num_ref, full_idx_ref,
    *rest, spec: KernelSpec, cfg: BwdConfig, programs: tuple, n_consts: tuple,
):  # fmt: skip
    off_ref, score_refs, mask_refs, (dk_ref, dv_ref) = split_refs(
        rest, n_consts, spec.global_offsets
    )
    ops = tile_ops_for(spec.interpret)
    mods = TileMods(spec, programs, score_refs, mask_refs, off_ref, ops)
    layout = spec.layout

    tile, b, hkv = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bm = 0 if spec.mask_batch_broadcast else b
    col = div_static(tile, spec.kv_block_size // cfg.block_n)
    start_n = tile * cfg.block_n
    kv_idx = start_n + ops.iota((cfg.block_n, 1), 0)
    kv_limit = bound(spec.S, pl.cdiv(spec.S, cfg.block_n) * cfg.block_n)
    tile_2d = (slice(None), slice(None))
    k_mask = tile_mask(start_n, cfg.block_n, kv_limit, k_ref.shape[-1], spec.E)
    v_mask = tile_mask(start_n, cfg.block_n, kv_limit, v_ref.shape[-1], spec.Ev)
    k, v = load(k_ref, tile_2d, k_mask), load(v_ref, tile_2d, v_mask)
    pre, to_base2 = mod_score_units(spec.scale, programs[0])  # (no captured-array gradients)
    prec = _precision(k.dtype)
    q_limit = bound(spec.L, spec.R * spec.q_block_size)
    kv_shift = mods.kv_shift(col)

    def at(g, rows, *cols, bounded):
        """Index of query head g of the group block, rows `rows` (the layout decides the order)."""
        if bounded and isinstance(g, int):
            g = jnp.int32(g)  # masked loads take array indices only
        return layout.shape(None, g, rows, 0)[1:3] + cols

    def step(g, h, start_m, carry, masked):
        dk, dv = carry
        rows = pl.ds(start_m, cfg.block_m)
        q_mask = tile_mask(start_m, cfg.block_m, q_limit, q_ref.shape[-1], spec.E)
        do_mask = tile_mask(start_m, cfg.block_m, q_limit, do_ref.shape[-1], spec.Ev)
        rows_mask = tile_mask(start_m, cfg.block_m, q_limit)
        q = load(q_ref, at(g, rows, slice(None), bounded=q_mask is not None), q_mask)
        do = load(do_ref, at(g, rows, slice(None), bounded=do_mask is not None), do_mask)
        row_at = at(g, rows, bounded=rows_mask is not None)
        lse_base2 = load(lse_ref, row_at, rows_mask, other=jnp.inf) * LOG2E
        delta = load(delta_ref, row_at, rows_mask)
        q_idx = start_m + ops.iota((1, cfg.block_m), 1)
        s = scaled(_dot(k, q.T, prec), pre)  # [BN, BM]
        q_shift = mods.q_shift(div_static(start_m, spec.q_block_size))
        s, _, pullback = mods.apply(s, b, h, q_idx, kv_idx, masked, (), q_shift, kv_shift)
        p = ops.exp2_fma(s, to_base2, lse_base2[None, :])
        dv = dv + _dot(p.astype(do.dtype), do, prec)
        dp = _dot(v, do.T, prec)
        ds, _ = pullback(p * (dp - delta[None, :]))
        dk = dk + _dot(ds.astype(q.dtype), q, prec)
        return dk, dv

    def walk(g, h, num_ref, idx_ref, masked, carry):
        hm = 0 if spec.mask_head_broadcast else h
        body = lambda start_m, carry: step(g, h, start_m, carry, masked)
        n_tiles = num_ref[bm, hm, col] * (spec.q_block_size // cfg.block_m)
        lead = (bm, hm, col)
        return walk_tiles(idx_ref, lead, 0, n_tiles, spec.q_block_size, cfg.block_m, body, carry)

    def head(g, carry):
        h = hkv * spec.group_size + g
        if spec.has_partial:
            carry = walk(g, h, q_num_ref, q_idx_ref, True, carry)
        if spec.has_full:
            carry = walk(g, h, full_num_ref, full_idx_ref, False, carry)
        return carry

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    if spec.group_size == 1:
        dk, dv = head(0, carry)
    else:
        dk, dv = lax.fori_loop(0, spec.group_size, head, carry)
    store(dk_ref, tile_2d, (dk * spec.scale).astype(dk_ref.dtype), k_mask)
    store(dv_ref, tile_2d, dv.astype(dv_ref.dtype), v_mask)


# ----------------------------------------------------------------------------
# The launcher
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("spec", "cfg", "grad_slots"))
def flex_bwd(
    q, k, v, do, lse, delta, tables: BlockTables, mods: Mods, offsets, *,
    spec: KernelSpec, cfg: BwdConfig, grad_slots: tuple,
):  # fmt: skip
    """Gradients of flex_attention.

    q, do [B, Hq, L, E/Ev]; k, v [Bkv, Hkv, S, E/Ev] (spec.layout's order);
    lse, delta [B, Hq, L] float32 from `vjp.preprocess`; tables all eight
    BlockMask tables; offsets int32[4] or None (all zero). grad_slots: the score_mod's captured
    arrays that need a gradient (float32 results, flat). Returns dq, dk, dv
    (dk/dv [Bkv, Hkv, ...]) and the list of captured-array gradients.
    """
    dispatch.kernel_traced("TRITON", "dq")
    dispatch.kernel_traced("TRITON", "dkdv")
    layout, G = spec.layout, spec.group_size
    B, Hq, Hkv = spec.B, spec.Hq, spec.Hkv
    Ep, Evp = padded_dim(spec.E), padded_dim(spec.Ev)
    extra = mod_inputs(mods, offsets)
    info = kernel_mods(mods)
    axes = varying_axes(q, k, v, do, lse, delta, tables, extra)
    kv_b = (lambda b: 0) if spec.kv_batch_broadcast else (lambda b: b)

    # dq: grid (q tile, batch, query head), the tiles transposed (see BwdConfig).
    dq_cfg = dataclasses.replace(cfg, block_m=cfg.block_n, block_n=cfg.block_m)
    # The gradient accumulators are aliased outputs, typed by these inputs: per-shard
    # partial sums inside a shard_map, so varying like the operands.
    zeros = [
        cast_varying(jnp.zeros((mods.score_consts[i].size,), jnp.float32), axes) for i in grad_slots
    ]
    q_at = lambda t, b, h: (b, h, t)
    kv_at = lambda t, b, h: (kv_b(b), div_static(h, G), 0)
    n_in = 10 + len(extra)
    dq, *const_grads = pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec, cfg=dq_cfg, grad_slots=grad_slots, **info),
        grid=(pl.cdiv(spec.L, dq_cfg.block_m), B, Hq),
        in_specs=[
            tile_spec(layout, None, dq_cfg.block_m, Ep, q_at),
            tile_spec(layout, None, kv_rows(spec), Ep, kv_at),
            tile_spec(layout, None, kv_rows(spec), Evp, kv_at),
            tile_spec(layout, None, dq_cfg.block_m, Evp, q_at),
            row_spec(layout, None, dq_cfg.block_m, q_at),
            row_spec(layout, None, dq_cfg.block_m, q_at),
            *[whole(t) for t in tables.rows],
            *[whole(x) for x in extra],
            *[whole(z) for z in zeros],
        ],
        out_specs=[tile_spec(layout, None, dq_cfg.block_m, Ep, q_at), *[whole(z) for z in zeros]],
        out_shape=[out_struct(q.shape, q.dtype, axes), *zeros],
        input_output_aliases={n_in + i: 1 + i for i in range(len(zeros))},
        compiler_params=compiler_params(spec, cfg),
        interpret=spec.interpret,
        name="flex_bwd_dq",
    )(q, k, v, do, lse, delta, *tables.rows, *extra, *zeros)

    # dk, dv: grid (kv tile, batch, kv head); each program loops over its group's q heads.
    q_rows = spec.R * spec.q_block_size
    group_at = lambda t, b, h: (b, h, 0)
    tile_at = lambda t, b, h: (kv_b(b), h, t)
    out_at = lambda t, b, h: (b, h, t)
    summed = spec.kv_batch_broadcast  # k/v broadcast over the batch: per-batch partial grads
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, spec=spec, cfg=cfg, **info),
        grid=(pl.cdiv(spec.S, cfg.block_n), B, Hkv),
        in_specs=[
            tile_spec(layout, G, q_rows, Ep, group_at),
            tile_spec(layout, None, cfg.block_n, Ep, tile_at),
            tile_spec(layout, None, cfg.block_n, Evp, tile_at),
            tile_spec(layout, G, q_rows, Evp, group_at),
            row_spec(layout, G, q_rows, group_at),
            row_spec(layout, G, q_rows, group_at),
            *[whole(t) for t in tables.cols],
            *[whole(x) for x in extra],
        ],
        out_specs=[
            tile_spec(layout, None, cfg.block_n, Ep, out_at),
            tile_spec(layout, None, cfg.block_n, Evp, out_at),
        ],
        out_shape=[
            out_struct(
                layout.shape(B, Hkv, spec.S, spec.E), jnp.float32 if summed else k.dtype, axes
            ),
            out_struct(
                layout.shape(B, Hkv, spec.S, spec.Ev), jnp.float32 if summed else v.dtype, axes
            ),
        ],
        compiler_params=compiler_params(spec, cfg),
        interpret=spec.interpret,
        name="flex_bwd_dkdv",
    )(q, k, v, do, lse, delta, *tables.cols, *extra)
    if summed:
        dk = jnp.sum(dk, axis=0, keepdims=True).astype(k.dtype)
        dv = jnp.sum(dv, axis=0, keepdims=True).astype(v.dtype)
    return dq, dk, dv, const_grads


@dataclasses.dataclass(frozen=True, kw_only=True)
class BwdConfig:
    """Tiles and launch parameters shared by the dq and dk/dv kernels."""

    # As in torch's template (BLOCK_M1 = BLOCK_N2, BLOCK_N1 = BLOCK_M2), the two
    # kernels use the tiles transposed: each keeps a block_n-row tile resident
    # and streams block_m-row tiles past it.
    block_m: int  # dk/dv: q rows streamed;   dq: kv rows streamed
    block_n: int  # dk/dv: kv rows resident;  dq: q rows resident
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        check_config(
            self, "bwd_", pow2=("block_m", "block_n", "num_warps"), positive=("num_stages",)
        )
