"""Block-sparse flex_attention forward, Pallas on GPU with the Triton lowering.

One program per (q tile, batch, query head). It walks the BlockMask row of
its q tile twice: first the *partial* kv blocks (`kv_num_blocks`,
`kv_indices`), where it applies score_mod and then mask_mod element by element;
then the *full* blocks, where every element is kept, so mask_mod is skipped
(that is the whole point of separating them). Empty blocks are never listed,
so they cost nothing. The loop over a row's tiles is `block_walk.walk_tiles`
(the tile start carried through the loop, so K/V loads pipeline fully).

Softmax is online, in float32 and base 2: for each kv tile
    s      = scale * q k^T, then score_mod, then -inf where masked
    m_new  = max(m, rowmax(s))
    p      = 2^(s log2 e - m_new log2 e),  alpha = 2^(m log2 e - m_new log2 e)
    l      = alpha l + rowsum(p),          acc = alpha acc + p v
and at the end out = acc / l, lse = m + ln l. Written that way each p is one
fused multiply-add and one `ex2` (`exp2_fma`, inline asm on the GPU); with
no score_mod the scale folds into the same multiply (`score_units`). A row
that has seen nothing but -inf keeps m = -inf; we subtract 0 instead there
so exp gives exact zeros, and the row ends with out = 0 and lse = -inf,
never NaN.

Kernels take plain arrays and a frozen config, never a BlockMask. Padding:
q rows to a multiple of the q tile, k/v rows to the BlockMask's kv extent;
padded kv columns are masked, and mods only ever see in-range indices.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.block_walk import walk_tiles
from pallas_kernels.mod_tracer import ModProgram
from pallas_kernels.score_tile import (
    LOG2E,
    MASKED_SCORE,
    div_static,
    exp2,
    exp2_fma,
    mods_on_tile,
    scaled,
    score_units,
)

__all__ = [
    "FwdConfig",
    "FwdStatic",
    "check_config",
    "compiler_params",
    "finish",
    "flex_fwd",
    "tile_step",
]

# Counts traces of the kernel body: tests use it to show that new captured
# values do not retrace or recompile.
TRACE_COUNT = {"fwd": 0, "dq": 0, "dkdv": 0, "decode": 0}


@dataclasses.dataclass(frozen=True, kw_only=True)
class FwdConfig:
    """Compute tiles and launch parameters (separate from the BlockMask's block size)."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        check_config(self, "", pow2=("block_m", "block_n", "num_warps"), positive=("num_stages",))


def check_config(cfg, prefix: str, pow2: tuple, positive: tuple) -> None:
    """Validate a kernel config's fields, naming them as kernel_options does (prefix + name)."""
    for name in pow2:
        v = getattr(cfg, name)
        if v <= 0 or v & (v - 1):
            raise ValueError(f"{prefix}{name}={v} must be a power of 2")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{prefix}{name}={getattr(cfg, name)} must be >= 1")


def compiler_params(st, cfg):
    """Triton launch parameters of a kernel config (None in interpret mode)."""
    if st.interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FwdStatic:
    """Everything static about one call: sizes, block structure, mods."""

    L: int  # true query length
    S: int  # true key length
    Hq: int
    group_size: int  # Hq // Hkv
    kv_batch_broadcast: bool
    mask_batch_broadcast: bool
    mask_head_broadcast: bool
    q_block_size: int  # the BlockMask's sparse block sizes
    kv_block_size: int
    scale: float
    score_mod: ModProgram | None
    mask_mod: ModProgram | None
    has_partial: bool
    has_full: bool
    interpret: bool


def tile_step(q, k, v, carry, start_n, q_idx, b, h, st, cfg, score_refs, mask_refs, masked):
    """One kv tile of the online softmax (also the decode kernel's). masked: apply mask_mod.

    m_i is the running row max in score units (see `score_units`).
    """
    acc, m_i, l_i = carry
    pre, to_base2 = score_units(st)
    # float32 inputs get float32 products (Triton's default for them is tf32).
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s = scaled(jnp.dot(q, k.T, precision=precision, preferred_element_type=jnp.float32), pre)
    kv_idx = start_n + lax.broadcasted_iota(jnp.int32, (1, cfg.block_n), 1)
    s, _, _ = mods_on_tile(s, b, h, q_idx, kv_idx, st, score_refs, mask_refs, masked)

    m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
    m_base2 = jnp.where(m_new == MASKED_SCORE, 0.0, m_new) * to_base2
    on_gpu = not st.interpret
    p = exp2_fma(s, to_base2, m_base2[:, None], on_gpu)
    alpha = exp2(m_i * to_base2 - m_base2, on_gpu)
    l_new = alpha * l_i + jnp.sum(p, axis=1)
    pv = jnp.dot(p.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_new


def finish(carry, st: FwdStatic):
    """(out, lse) of the online softmax's final state: 0 and -inf for rows that kept nothing."""
    acc, m_i, l_i = carry
    empty = l_i == 0.0
    l_safe = jnp.where(empty, 1.0, l_i)
    m_natural = jnp.where(m_i == MASKED_SCORE, 0.0, m_i) * (score_units(st)[1] / LOG2E)
    return acc / l_safe[:, None], jnp.where(empty, MASKED_SCORE, m_natural + jnp.log(l_safe))


def _fwd_kernel(
    q_ref,
    k_ref,
    v_ref,
    kv_num_ref,
    kv_idx_ref,
    full_num_ref,
    full_idx_ref,
    *rest,
    st: FwdStatic,
    cfg: FwdConfig,
    n_score: int,
    n_mask: int,
):
    TRACE_COUNT["fwd"] += 1
    score_refs = rest[:n_score]
    mask_refs = rest[n_score : n_score + n_mask]
    o_ref, lse_ref = rest[n_score + n_mask :]

    tile = pl.program_id(0)
    b = pl.program_id(1)
    h = pl.program_id(2)
    bm = 0 if st.mask_batch_broadcast else b
    hm = 0 if st.mask_head_broadcast else h
    row = div_static(tile, st.q_block_size // cfg.block_m)
    q_idx = tile * cfg.block_m + lax.broadcasted_iota(jnp.int32, (cfg.block_m, 1), 0)

    q = q_ref[...]
    e_v = v_ref.shape[-1]
    carry = (
        jnp.zeros((cfg.block_m, e_v), jnp.float32),
        jnp.full((cfg.block_m,), MASKED_SCORE, jnp.float32),
        jnp.zeros((cfg.block_m,), jnp.float32),
    )

    def walk(num_ref, idx_ref, masked, carry):
        def body(start_n, carry):
            k = k_ref[pl.ds(start_n, cfg.block_n), :]
            v = v_ref[pl.ds(start_n, cfg.block_n), :]
            return tile_step(
                q, k, v, carry, start_n, q_idx, b, h, st, cfg, score_refs, mask_refs, masked
            )

        n_tiles = num_ref[bm, hm, row] * (st.kv_block_size // cfg.block_n)
        lead = (bm, hm, row)
        return walk_tiles(idx_ref, lead, 0, n_tiles, st.kv_block_size, cfg.block_n, body, carry)

    if st.has_partial:
        carry = walk(kv_num_ref, kv_idx_ref, True, carry)
    if st.has_full:
        carry = walk(full_num_ref, full_idx_ref, False, carry)
    out, lse = finish(carry, st)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


@functools.partial(jax.jit, static_argnames=("st", "cfg"))
def flex_fwd(q, k, v, tables, score_consts, mask_consts, *, st: FwdStatic, cfg: FwdConfig):
    """q [B, Hq, Lp, E], k [Bkv, Hkv, Sp, E], v [Bkv, Hkv, Sp, Ev] (padded as the module says).

    tables: (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices),
    each [Bm, Hm, R(, C)] int32. Returns out [B, Hq, Lp, Ev] and lse [B, Hq, Lp] f32.
    """
    B, Hq, Lp, E = q.shape
    Sp, Ev = v.shape[2], v.shape[3]
    n_tiles = Lp // cfg.block_m
    G = st.group_size

    def kv_map(tile, b, h):
        return (0 if st.kv_batch_broadcast else b, div_static(h, G), 0, 0)

    whole = lambda x: pl.BlockSpec(x.shape, lambda tile, b, h, n=x.ndim: (0,) * n)
    in_specs = [
        pl.BlockSpec((None, None, cfg.block_m, E), lambda tile, b, h: (b, h, tile, 0)),
        pl.BlockSpec((None, None, Sp, E), kv_map),
        pl.BlockSpec((None, None, Sp, Ev), kv_map),
        *[whole(t) for t in tables],
        *[whole(c) for c in score_consts],
        *[whole(c) for c in mask_consts],
    ]
    out_specs = [
        pl.BlockSpec((None, None, cfg.block_m, Ev), lambda tile, b, h: (b, h, tile, 0)),
        pl.BlockSpec((None, None, cfg.block_m), lambda tile, b, h: (b, h, tile)),
    ]
    kernel = functools.partial(
        _fwd_kernel, st=st, cfg=cfg, n_score=len(score_consts), n_mask=len(mask_consts)
    )
    return pl.pallas_call(
        kernel,
        grid=(n_tiles, B, Hq),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[
            jax.ShapeDtypeStruct((B, Hq, Lp, Ev), q.dtype),
            jax.ShapeDtypeStruct((B, Hq, Lp), jnp.float32),
        ],
        compiler_params=compiler_params(st, cfg),
        interpret=st.interpret,
        name="flex_fwd",
    )(q, k, v, *tables, *score_consts, *mask_consts)
