"""Block-sparse flex_attention backward: a dq kernel and a dk/dv kernel (Pallas, Triton lowering).

With p = exp(s - lse) recomputed from the forward's lse (s = masked, modded
scores, natural log), the gradients are
    dv_j  = sum_i p_ij do_i
    dp_ij = do_i . v_j
    ds_ij = p_ij (dp_ij - delta_i),   delta_i = do_i . out_i - dlse_i
    dq_i  = scale sum_j ds'_ij k_j,   dk_j = scale sum_i ds'_ij q_i
where ds' = ds * d score_mod / d score is the score_mod's vector-Jacobian
product, taken inside the kernel from the traced mod (`mod_tracer`). The lse
cotangent enters through delta (d lse / d s = p), so `preprocess` folds it in.

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

Rows: q, do, lse, delta are padded to whole q blocks; padded rows, and rows
that keep nothing, get lse = +inf, so their p is exactly 0.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.block_walk import walk_tiles
from pallas_kernels.flex_fwd_triton import TRACE_COUNT, FwdStatic, check_config, compiler_params
from pallas_kernels.score_tile import (
    LOG2E,
    MASKED_SCORE,
    div_static,
    exp2_fma,
    mods_on_tile,
    scaled,
    score_units,
)

__all__ = ["BwdConfig", "flex_bwd", "preprocess"]


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


def preprocess(out, dout, lse, dlse, L: int, rows: int):
    """delta = rowsum(out * dout) - dlse, and lse with +inf for rows that must give p = 0.

    out, dout [B, Hq, Lp, Ev]; lse (and dlse, or None) [B, Hq, Lp]. Returns
    delta and lse as [B, Hq, rows] float32 (rows >= Lp: whole q blocks).
    """
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    row = lax.broadcasted_iota(jnp.int32, lse.shape, 2)
    lse = jnp.where((row < L) & (lse != MASKED_SCORE), lse, jnp.inf)
    pad = ((0, 0), (0, 0), (0, rows - lse.shape[2]))
    return jnp.pad(delta, pad), jnp.pad(lse, pad, constant_values=jnp.inf)


def _precision(dtype):
    # float32 inputs get float32 products (Triton's default for them is tf32).
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dot(a, b, precision):
    return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------
# dq (and captured-array gradients)
# ----------------------------------------------------------------------------


def _scatter_add(ref, flat, value, interpret: bool):
    """ref[flat] += value, with repeated indices summed."""
    if interpret:
        # Programs run one after another: a read-modify-write is exact and deterministic.
        ref[...] = ref[...].at[flat].add(value.astype(ref.dtype))
        return
    from jax.experimental.pallas import triton as plgpu

    plgpu.atomic_add(ref, flat, value.astype(ref.dtype))


def _dq_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
    kv_num_ref, kv_idx_ref, full_num_ref, full_idx_ref,
    *rest, st: FwdStatic, cfg: BwdConfig, n_score: int, n_mask: int, grad_slots: tuple,
):  # fmt: skip
    TRACE_COUNT["dq"] += 1
    score_refs = rest[:n_score]
    mask_refs = rest[n_score : n_score + n_mask]
    outs = rest[n_score + n_mask + len(grad_slots) :]  # skip the aliased zero inputs
    dq_ref, grad_refs = outs[0], dict(zip(grad_slots, outs[1:], strict=True))

    tile, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bm = 0 if st.mask_batch_broadcast else b
    hm = 0 if st.mask_head_broadcast else h
    row = div_static(tile, st.q_block_size // cfg.block_m)
    q_idx = tile * cfg.block_m + lax.broadcasted_iota(jnp.int32, (cfg.block_m, 1), 0)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    lse_base2 = lse * LOG2E
    pre, to_base2 = score_units(st)
    prec = _precision(q.dtype)
    tiles_per_block = st.kv_block_size // cfg.block_n

    def step(start_n, dq, masked):
        k = k_ref[pl.ds(start_n, cfg.block_n), :]
        v = v_ref[pl.ds(start_n, cfg.block_n), :]
        kv_idx = start_n + lax.broadcasted_iota(jnp.int32, (1, cfg.block_n), 1)
        s = scaled(_dot(q, k.T, prec), pre)
        s, _, pullback = mods_on_tile(
            s, b, h, q_idx, kv_idx, st, score_refs, mask_refs, masked, grad_slots
        )
        p = exp2_fma(s, to_base2, lse_base2[:, None], not st.interpret)
        dp = _dot(do, v.T, prec)
        ds, grads = pullback(p * (dp - delta[:, None]))
        # d_value has the shape of its index, already summed over the dims the
        # index does not vary in (one add per tile for `slopes[h]`).
        for slot, flat, d_value in grads:
            _scatter_add(grad_refs[slot], flat, d_value, st.interpret)
        return dq + _dot(ds.astype(k.dtype), k, prec)

    def walk(num_ref, idx_ref, masked, dq):
        body = lambda start_n, dq: step(start_n, dq, masked)
        n_tiles = num_ref[bm, hm, row] * tiles_per_block
        return walk_tiles(
            idx_ref, (bm, hm, row), 0, n_tiles, st.kv_block_size, cfg.block_n, body, dq
        )

    dq = jnp.zeros(q.shape, jnp.float32)
    if st.has_partial:
        dq = walk(kv_num_ref, kv_idx_ref, True, dq)
    if st.has_full:
        dq = walk(full_num_ref, full_idx_ref, False, dq)
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------
# dk / dv
# ----------------------------------------------------------------------------


def _dkdv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
    q_num_ref, q_idx_ref, full_num_ref, full_idx_ref,
    *rest, st: FwdStatic, cfg: BwdConfig, n_score: int, n_mask: int,
):  # fmt: skip
    TRACE_COUNT["dkdv"] += 1
    score_refs = rest[:n_score]
    mask_refs = rest[n_score : n_score + n_mask]
    dk_ref, dv_ref = rest[n_score + n_mask :]

    tile, b, hkv = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bm = 0 if st.mask_batch_broadcast else b
    col = div_static(tile, st.kv_block_size // cfg.block_n)
    start_n = tile * cfg.block_n
    kv_idx = start_n + lax.broadcasted_iota(jnp.int32, (cfg.block_n, 1), 0)
    k, v = k_ref[...], v_ref[...]
    pre, to_base2 = score_units(st)
    prec = _precision(k.dtype)
    tiles_per_block = st.q_block_size // cfg.block_m

    def step(g, h, start_m, carry, masked):
        dk, dv = carry
        rows = pl.ds(start_m, cfg.block_m)
        q = q_ref[g, rows, :]
        do = do_ref[g, rows, :]
        lse_base2, delta = lse_ref[g, rows] * LOG2E, delta_ref[g, rows]
        q_idx = start_m + lax.broadcasted_iota(jnp.int32, (1, cfg.block_m), 1)
        s = scaled(_dot(k, q.T, prec), pre)  # [BN, BM]
        s, _, pullback = mods_on_tile(
            s, b, h, q_idx, kv_idx, st, score_refs, mask_refs, masked, grad_slots=()
        )
        p = exp2_fma(s, to_base2, lse_base2[None, :], not st.interpret)
        dv = dv + _dot(p.astype(do.dtype), do, prec)
        dp = _dot(v, do.T, prec)
        ds, _ = pullback(p * (dp - delta[None, :]))
        dk = dk + _dot(ds.astype(q.dtype), q, prec)
        return dk, dv

    def walk(g, h, num_ref, idx_ref, masked, carry):
        hm = 0 if st.mask_head_broadcast else h

        body = lambda start_m, carry: step(g, h, start_m, carry, masked)
        n_tiles = num_ref[bm, hm, col] * tiles_per_block
        lead = (bm, hm, col)
        return walk_tiles(idx_ref, lead, 0, n_tiles, st.q_block_size, cfg.block_m, body, carry)

    def head(g, carry):
        h = hkv * st.group_size + g
        if st.has_partial:
            carry = walk(g, h, q_num_ref, q_idx_ref, True, carry)
        if st.has_full:
            carry = walk(g, h, full_num_ref, full_idx_ref, False, carry)
        return carry

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    if st.group_size == 1:
        dk, dv = head(0, carry)
    else:
        dk, dv = lax.fori_loop(0, st.group_size, head, carry)
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------
# The launcher
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("st", "cfg", "grad_slots"))
def flex_bwd(
    q, k, v, do, lse, delta, tables, score_consts, mask_consts, *,
    st: FwdStatic, cfg: BwdConfig, grad_slots: tuple,
):  # fmt: skip
    """Gradients of flex_attention.

    q, do [B, Hq, Lb, E/Ev] with Lb whole q blocks; k, v [Bkv, Hkv, Sp, E/Ev]
    with Sp whole kv blocks; lse, delta [B, Hq, Lb] from `preprocess`; tables
    the eight BlockMask tables (kv rows, then q columns), int32. grad_slots:
    the score_consts that need a gradient (float32 results, flat).
    Returns dq, dk, dv (dk/dv [B or 1, Hkv, ...]) and the list of const grads.
    """
    B, Hq, Lb, E = q.shape
    Bkv, Hkv, Sp, Ev = v.shape
    G = st.group_size
    whole = lambda x: pl.BlockSpec(x.shape, lambda i, b, h, n=x.ndim: (0,) * n)
    consts = [*score_consts, *mask_consts]
    n_score, n_mask = len(score_consts), len(mask_consts)
    kv_b = (lambda b: 0) if st.kv_batch_broadcast else (lambda b: b)

    # dq: grid (q tile, batch, query head), the tiles transposed (see BwdConfig).
    dq_cfg = dataclasses.replace(cfg, block_m=cfg.block_n, block_n=cfg.block_m)
    zeros = [jnp.zeros(score_consts[i].shape, jnp.float32) for i in grad_slots]
    dq_kernel = functools.partial(
        _dq_kernel, st=st, cfg=dq_cfg, n_score=n_score, n_mask=n_mask, grad_slots=grad_slots
    )
    q_tile = lambda d: pl.BlockSpec((None, None, dq_cfg.block_m, d), lambda t, b, h: (b, h, t, 0))
    row_tile = pl.BlockSpec((None, None, dq_cfg.block_m), lambda t, b, h: (b, h, t))
    kv_all = lambda d: pl.BlockSpec(
        (None, None, Sp, d), lambda t, b, h: (kv_b(b), div_static(h, G), 0, 0)
    )
    n_in = 10 + len(consts)
    dq, *const_grads = pl.pallas_call(
        dq_kernel,
        grid=(Lb // dq_cfg.block_m, B, Hq),
        in_specs=[
            q_tile(E),
            kv_all(E),
            kv_all(Ev),
            q_tile(Ev),
            row_tile,
            row_tile,
            *[whole(t) for t in tables[:4]],
            *[whole(c) for c in consts],
            *[whole(z) for z in zeros],
        ],  # fmt: skip
        out_specs=[q_tile(E), *[whole(z) for z in zeros]],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), *zeros],
        input_output_aliases={n_in + i: 1 + i for i in range(len(zeros))},
        compiler_params=compiler_params(st, cfg),
        interpret=st.interpret,
        name="flex_bwd_dq",
    )(q, k, v, do, lse, delta, *tables[:4], *consts, *zeros)

    # dk, dv: grid (kv tile, batch, kv head); each program loops over its group's q heads.
    dkdv_kernel = functools.partial(_dkdv_kernel, st=st, cfg=cfg, n_score=n_score, n_mask=n_mask)
    group = lambda d: pl.BlockSpec((None, G, Lb, d), lambda t, b, h: (b, h, 0, 0))
    group_rows = pl.BlockSpec((None, G, Lb), lambda t, b, h: (b, h, 0))
    kv_tile = lambda d: pl.BlockSpec(
        (None, None, cfg.block_n, d), lambda t, b, h: (kv_b(b), h, t, 0)
    )
    out_tile = lambda d: pl.BlockSpec((None, None, cfg.block_n, d), lambda t, b, h: (b, h, t, 0))
    dk, dv = pl.pallas_call(
        dkdv_kernel,
        grid=(Sp // cfg.block_n, B, Hkv),
        in_specs=[
            group(E),
            kv_tile(E),
            kv_tile(Ev),
            group(Ev),
            group_rows,
            group_rows,
            *[whole(t) for t in tables[4:]],
            *[whole(c) for c in consts],
        ],  # fmt: skip
        out_specs=[out_tile(E), out_tile(Ev)],
        out_shape=[
            jax.ShapeDtypeStruct((B, Hkv, Sp, E), jnp.float32 if Bkv < B else k.dtype),
            jax.ShapeDtypeStruct((B, Hkv, Sp, Ev), jnp.float32 if Bkv < B else v.dtype),
        ],
        compiler_params=compiler_params(st, cfg),
        interpret=st.interpret,
        name="flex_bwd_dkdv",
    )(q, k, v, do, lse, delta, *tables[4:], *consts)
    if Bkv < B:  # k/v broadcast over the batch: their gradient is the batch sum
        dk = jnp.sum(dk, axis=0, keepdims=True).astype(k.dtype)
        dv = jnp.sum(dv, axis=0, keepdims=True).astype(v.dtype)
    return dq, dk, dv, const_grads
