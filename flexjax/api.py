"""flex_attention: validate, canonicalise (scale, GQA, padding), dispatch to the kernels.

The kernels take plain padded arrays, block tables and a frozen config; this
module turns the public call (PyTorch's signature) into that.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from flexjax.block_mask import BlockMask, transpose_ordered
from flexjax.input_checks import check_block_mask, check_qkv, check_scale, check_score_mod
from flexjax.mod_utils import noop_mask
from pallas_kernels.autotune import tune
from pallas_kernels.configs import bwd_config, decode_config, default_interpret, fwd_config
from pallas_kernels.flex_core import attention_fn
from pallas_kernels.flex_fwd_triton import FwdStatic
from pallas_kernels.mod_tracer import mod_loads, trace_mod

__all__ = ["flex_attention"]

# Sparse block size used when no BlockMask is given (every block is full).
_NO_MASK_BLOCK = 128


def _pad_axis(x, axis: int, size: int):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _head_dim_padded(d: int) -> int:
    """Head dims go to a power of 2 >= 16 (tensor-core tiles); zero padding is exact."""
    return max(16, 1 << (d - 1).bit_length())


def _full_tables(L: int, S: int, q_bs: int, kv_bs: int):
    """The eight tables of a mask where every block is full (block_mask=None)."""
    R, C = -(-L // q_bs), -(-S // kv_bs)

    def rows_of(n_rows, n_cols):
        zeros_num = jnp.zeros((1, 1, n_rows), jnp.int32)
        zeros_idx = jnp.zeros((1, 1, n_rows, 1), jnp.int32)
        full_num = jnp.full((1, 1, n_rows), n_cols, jnp.int32)
        full_idx = jnp.broadcast_to(jnp.arange(n_cols, dtype=jnp.int32), (1, 1, n_rows, n_cols))
        return (zeros_num, zeros_idx, full_num, full_idx)

    return (*rows_of(R, C), *rows_of(C, R)), C


def _block_mask_tables(block_mask: BlockMask):
    """The eight tables as int32 (kv rows, full kv rows, q columns, full q columns).

    Missing full tables become empty ones; missing q tables (a BlockMask built
    with compute_q_blocks=False) are derived here, as the backward needs them.
    """
    kv = (block_mask.kv_num_blocks, block_mask.kv_indices)
    if block_mask.full_kv_num_blocks is not None:
        full_kv = (block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    else:
        full_kv = (jnp.zeros_like(kv[0]), kv[1][..., :1])
    q = (block_mask.q_num_blocks, block_mask.q_indices)
    if q[0] is None:
        q = transpose_ordered(*kv)
    if block_mask.full_kv_num_blocks is None:
        full_q = (jnp.zeros_like(q[0]), q[1][..., :1])
    elif block_mask.full_q_num_blocks is not None:
        full_q = (block_mask.full_q_num_blocks, block_mask.full_q_indices)
    else:
        full_q = transpose_ordered(*full_kv)
    return tuple(t.astype(jnp.int32) for t in (*kv, *full_kv, *q, *full_q))


def flex_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    score_mod: Callable | None = None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: dict | None = None,
):
    """Block-sparse attention with user mods, on Pallas kernels.

    query: [B, Hq, L, E]; key: [B or 1, Hkv, S, E]; value: [B or 1, Hkv, S, Ev].
    score_mod(score, b, h, q_idx, kv_idx) -> score, applied (after `scale`) to
    every kept element; block_mask decides which elements are kept (its
    mask_mod runs only in partial blocks). Returns out [B, Hq, L, Ev] in
    query's dtype, and with return_lse also lse [B, Hq, L] float32 (natural
    log; -inf for a row that keeps nothing, whose out is 0).

    Differentiable (`jax.grad`, `jax.vjp`, under `jax.jit` and `jax.vmap`):
    the backward runs a dq kernel and a dk/dv kernel over the same block
    tables. Captured float arrays of score_mod (learnable biases) get
    gradients too; on the GPU those are accumulated with atomic adds, so they
    are not bitwise reproducible (dq, dk and dv are).

    kernel_options: block_m, block_n (compute tiles, powers of 2 dividing the
    BlockMask's block size), num_warps, num_stages; the same for the backward
    kernels as bwd_block_m, bwd_block_n, bwd_num_warps, bwd_num_stages
    (torch's BLOCK_M1 / BLOCK_N1: q and kv rows of the dk/dv kernel, which the
    dq kernel uses transposed, so each must divide both block sizes);
    decode (None: automatic, True, False): queries shorter than 128 rows
    (within the BlockMask's first q block) run the split-KV decode kernel when
    not differentiated, with decode_block_n, decode_splits, decode_num_warps,
    decode_num_stages; autotune (time a space of forward and backward
    configs for this call on first use and keep the fastest, cached on disk:
    see `pallas_kernels.autotune`); interpret (default: True when there is
    no GPU).
    """
    shape = check_qkv(query, key, value, enable_gqa)
    scale = check_scale(scale, shape.E)
    check_score_mod(score_mod, query.dtype)
    check_block_mask(block_mask, shape)
    options = dict(kernel_options or {})
    interpret = bool(options.pop("interpret", default_interpret()))
    autotune = options.pop("autotune", False)
    if not isinstance(autotune, bool):
        raise ValueError(f"kernel_options['autotune'] must be True or False, got {autotune!r}")
    L, S = shape.L, shape.S

    if block_mask is None:
        q_bs = kv_bs = _NO_MASK_BLOCK
        tables, C = _full_tables(L, S, q_bs, kv_bs)
        has_partial, has_full, mask_mod = False, True, None
        mask_b_bcast = mask_h_bcast = True
    else:
        q_bs, kv_bs = block_mask.BLOCK_SIZE
        C = block_mask.kv_indices.shape[-1]
        has_full = block_mask.full_kv_num_blocks is not None
        tables = _block_mask_tables(block_mask)
        has_partial = True
        mask_mod = None if block_mask.mask_mod is noop_mask else block_mask.mask_mod
        mask_b_bcast = block_mask.kv_num_blocks.shape[0] == 1
        mask_h_bcast = block_mask.kv_num_blocks.shape[1] == 1

    score_prog, score_consts = (None, [])
    if score_mod is not None:
        score_prog, score_consts = trace_mod(score_mod, is_score_mod=True)
    mask_prog, mask_consts = (None, [])
    if mask_mod is not None:
        mask_prog, mask_consts = trace_mod(mask_mod, is_score_mod=False)

    head_dim = max(shape.E, shape.Ev)
    sizes = dict(
        q_block_size=q_bs, kv_block_size=kv_bs, interpret=interpret, options=options,
        head_dim=head_dim, dtype=query.dtype, loads=mod_loads(score_prog) + mod_loads(mask_prog),
    )  # fmt: skip
    cfg = fwd_config(q_len=L, **sizes)
    bwd_cfg = bwd_config(**sizes)
    dec_cfg = decode_config(
        batch=shape.B, q_heads=shape.Hq, group_size=shape.group_size, q_len=L, kv_blocks=C,
        mask_head_broadcast=mask_h_bcast, **sizes,
    )  # fmt: skip

    st = FwdStatic(
        L=L, S=S, Hq=shape.Hq, group_size=shape.group_size,
        kv_batch_broadcast=shape.Bkv == 1 and shape.B > 1,
        mask_batch_broadcast=mask_b_bcast, mask_head_broadcast=mask_h_bcast,
        q_block_size=q_bs, kv_block_size=kv_bs, scale=scale,
        score_mod=score_prog, mask_mod=mask_prog,
        has_partial=has_partial, has_full=has_full, interpret=interpret,
    )  # fmt: skip
    Ep, Evp = _head_dim_padded(shape.E), _head_dim_padded(shape.Ev)
    if autotune:
        # Timed on q padded to whole q blocks, so every candidate q tile fits.
        sds = lambda *dims: jax.ShapeDtypeStruct(dims, query.dtype)
        rows = tables[0].shape[2] * q_bs
        cfg, bwd_cfg = tune(
            st, sds(shape.B, shape.Hq, rows, Ep), sds(shape.Bkv, shape.Hkv, C * kv_bs, Ep),
            sds(shape.Bkv, shape.Hkv, C * kv_bs, Evp), tables, score_consts, mask_consts,
            fixed=options, L=L,
        )  # fmt: skip
    Lp = -(-L // cfg.block_m) * cfg.block_m
    q = _pad_axis(_pad_axis(query, 2, Lp), 3, Ep)
    k = _pad_axis(_pad_axis(key, 2, C * kv_bs), 3, Ep)
    v = _pad_axis(_pad_axis(value, 2, C * kv_bs), 3, Evp)
    attention = attention_fn(st, cfg, bwd_cfg, dec_cfg)
    out, lse = attention(q, k, v, tables, score_consts, mask_consts)
    out = out[:, :, :L, : shape.Ev]
    if return_lse:
        return out, lse[:, :, :L]
    return out
