"""Dense flex_attention in plain jnp: the oracle every kernel is tested against.

It materialises the [B, Hq, L, S] scores, so it is O(L*S) in memory and meant
for tests, the gym and the benchmarks; optimized code never imports it.
Semantics are the public ones, element by element:

  s = scale * q.k                     (computed in float32, or float64 for f64 inputs)
  s = score_mod(s, b, h, q_idx, kv_idx)          for every element
  kept = block is full, or block is partial and mask_mod(b, h, q_idx, kv_idx)
  out = softmax over kept elements of s, times v;  lse = logsumexp (natural log)

A row with no kept element (or only -inf scores) gives out = 0, lse = -inf and
zero gradients, never NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from flexjax.block_mask import BlockMask, ordered_to_dense
from flexjax.input_checks import check_block_mask, check_qkv, check_scale, check_score_mod
from flexjax.mod_utils import ModKind, vmap_bhqkv

__all__ = ["flex_attention_reference", "head_slice", "kept_elements", "shift_score_mod"]


def kept_elements(block_mask: BlockMask, B: int, Hq: int, L: int, S: int) -> jax.Array:
    """[B, Hq, L, S] bool: which scores a BlockMask keeps (full blocks, or mask_mod in partial ones)."""
    q_bs, kv_bs = block_mask.BLOCK_SIZE
    C = block_mask.kv_indices.shape[-1]
    partial = ordered_to_dense(block_mask.kv_num_blocks, block_mask.kv_indices, C) > 0
    if block_mask.full_kv_num_blocks is not None:
        full = ordered_to_dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, C) > 0
    else:
        full = jnp.zeros_like(partial)

    def expand(blocks):  # [Bm, Hm, R, C] -> [B, Hq, L, S]
        x = jnp.repeat(jnp.repeat(blocks, q_bs, axis=-2), kv_bs, axis=-1)[..., :L, :S]
        return jnp.broadcast_to(x, (B, Hq, L, S))

    mask = vmap_bhqkv(block_mask.mask_mod, ModKind.MASK_MOD)(
        jnp.arange(B, dtype=jnp.int32),
        jnp.arange(Hq, dtype=jnp.int32),
        jnp.arange(L, dtype=jnp.int32),
        jnp.arange(S, dtype=jnp.int32),
    )
    return expand(full) | (expand(partial) & jnp.broadcast_to(mask, (B, Hq, L, S)))


def flex_attention_reference(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    score_mod: Callable | None = None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
):
    """Dense flex_attention. query [B, Hq, L, E], key [B|1, Hkv, S, E], value [B|1, Hkv, S, Ev].

    Returns out [B, Hq, L, Ev] in query's dtype, and with return_lse also
    lse [B, Hq, L] (float32; float64 for float64 inputs). Differentiable.
    """
    shape = check_qkv(query, key, value, enable_gqa)
    scale = check_scale(scale, shape.E)
    check_score_mod(score_mod)
    check_block_mask(block_mask, shape)
    B, Hq, L, S = shape.B, shape.Hq, shape.L, shape.S

    compute_dtype = jnp.promote_types(query.dtype, jnp.float32)
    q = query.astype(compute_dtype)
    # GQA: query head h reads kv head h // group_size.
    k = jnp.repeat(key.astype(compute_dtype), shape.group_size, axis=1)
    v = jnp.repeat(value.astype(compute_dtype), shape.group_size, axis=1)
    k = jnp.broadcast_to(k, (B, Hq, S, shape.E))
    v = jnp.broadcast_to(v, (B, Hq, S, shape.Ev))

    hi = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("bhle,bhse->bhls", q, k, precision=hi) * scale
    if score_mod is not None:
        scores = vmap_bhqkv(score_mod, ModKind.SCORE_MOD)(
            scores,
            jnp.arange(B, dtype=jnp.int32),
            jnp.arange(Hq, dtype=jnp.int32),
            jnp.arange(L, dtype=jnp.int32),
            jnp.arange(S, dtype=jnp.int32),
        ).astype(compute_dtype)
    if block_mask is not None:
        scores = jnp.where(kept_elements(block_mask, B, Hq, L, S), scores, -jnp.inf)

    # Softmax with a safe max: a row whose scores are all -inf has max -inf;
    # subtract 0 there instead, so exp gives exact zeros rather than NaN.
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    p = jnp.exp(scores - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    empty = denom == 0
    safe_denom = jnp.where(empty, 1.0, denom)
    out = jnp.einsum("bhls,bhsv->bhlv", p, v, precision=hi) / safe_denom
    out = out.astype(query.dtype)
    if not return_lse:
        return out
    lse = jnp.where(empty, -jnp.inf, jnp.log(safe_denom) + row_max)[..., 0]
    lse_dtype = jnp.float64 if compute_dtype == jnp.float64 else jnp.float32
    return out, lse.astype(lse_dtype)


def head_slice(x: jax.Array, b0: int, h0: int) -> jax.Array:
    """x[b0, h0] as a float32 [1, 1, ...] array: one (batch, head) problem for a sliced check."""
    return x[b0 : b0 + 1, h0 : h0 + 1].astype(jnp.float32)


def shift_score_mod(score_mod: Callable | None, b0: int, h0: int) -> Callable | None:
    """score_mod for a `head_slice` at (b0, h0): the mod still sees the original b and h.

    Lets the dense reference check one (batch, head) of a problem too large to
    run whole (a block mask broadcast over batch and heads applies unchanged).
    """
    if score_mod is None:
        return None
    return lambda s, b, h, q_idx, kv_idx: score_mod(s, b + b0, h + h0, q_idx, kv_idx)
