"""flexjax as the attention of Flax NNX models (`nnx.MultiHeadAttention(attention_fn=...)`).

`nnx.MultiHeadAttention` projects q, k and v into [batch..., T, N, H] arrays
and hands them to its `attention_fn` with `nnx.dot_product_attention`'s
signature (query, key, value, bias, mask, dropout arguments, dtype,
precision, module, is_causal). The functions here take that signature and
run `flexjax.dot_product_attention` on the arrays where they lie (jax.nn's
layout: no transposes), so a model changes one constructor argument:

    import flexjax as fj
    from flexjax import flax_nnx

    attn = nnx.MultiHeadAttention(
        num_heads=12, in_features=768, decode=False, rngs=rngs,
        attention_fn=flax_nnx.attention_fn(score_mod=softcap),  # static mods
    )
    # inside the jitted step, from this batch's document ids:
    bm = fj.create_block_mask(doc_causal_mask_mod, B, None, T, T)
    y = attn(x, mask=bm)  # the BlockMask rides on MHA's `mask=` argument

How a block mask and mods get in:

- `attention_fn(score_mod=..., block_mask=..., scale=..., kernel_options=...)`
  fixes them when the module is built (a static causal or window mask, a
  soft-cap, ALiBi slopes captured as an array).
- A per-call `flexjax.BlockMask` goes through MHA's `mask=` argument, which
  MHA passes to `attention_fn` unchanged outside decode mode. Build it inside
  the jitted step from that batch's data: `create_block_mask` traces under
  jit, its mask_mod may close over traced document ids, and new ids never
  recompile (the BlockMask is a pytree whose mask program is static).
  `nnx.jit`, `nnx.grad` and `nnx.scan` (the mask broadcast to every layer,
  `in_axes=None`) carry it like any pytree.
- `is_causal=True` (MHA's call argument) is honoured: without a block mask it
  builds the causal one (`q_idx >= kv_idx`, jax.nn's top-left alignment).

Why some arguments raise instead of being passed on: flexjax never forms the
[T, S] score matrix, so anything defined on that matrix cannot be honoured,
and dropping it silently would train a different model than the one written.
A dense `bias` or `mask` array (write it as a score_mod / mask_mod), attention
dropout while not deterministic, `sow_weights=True` (MHA's `module=`; the
weights are never formed), MHA's decode mode (its KV-cache mask is a dense
array; call `flexjax.dot_product_attention` on the cache directly), a matmul
`precision` other than the kernels' own, `is_causal=True` together with a
block mask (say it in the mask_mod: `and_masks(mask_mod, causal)`), and two
block masks at once each raise with the argument's name and what to do.
Keyword arguments that a later Flax may add are accepted only while they are
None or False (they ask for nothing); any other value raises.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from flexjax.block_mask import BlockMask
from flexjax.jax_layout import dot_product_attention as _flex_dpa
from flexjax.mask_builders import create_block_mask
from flexjax.masks import causal_mask

__all__ = ["attention_fn", "dot_product_attention"]


def _is_highest(precision) -> bool:
    if isinstance(precision, tuple | list):
        return len(precision) > 0 and all(_is_highest(p) for p in precision)
    try:
        return lax.Precision(precision) == lax.Precision.HIGHEST
    except (ValueError, TypeError):
        return False


def _describe(x) -> str:
    shape = getattr(x, "shape", None)
    if shape is not None:
        return f"a {type(x).__name__} of shape {tuple(shape)} and dtype {getattr(x, 'dtype', '?')}"
    return f"{type(x).__name__} {x!r}"


def _check_mask(mask, query, block_mask):
    """The BlockMask to use: MHA's per-call `mask` or the factory's `block_mask`."""
    if mask is None:
        return block_mask
    if isinstance(mask, BlockMask):
        if block_mask is not None:
            raise ValueError(
                "mask: got a BlockMask per call, but this attention_fn was built with "
                "block_mask= as well; pass one of them (build the attention_fn without "
                "block_mask to take masks per call)"
            )
        return mask
    shape = getattr(mask, "shape", None)
    if shape is not None and len(shape) >= 2 and query.shape[-3] == 1 and shape[-2] == 1:
        raise NotImplementedError(
            f"mask: got {_describe(mask)} for a single query position, the KV-cache mask "
            "MultiHeadAttention builds in decode mode; the flexjax adapter does not run "
            "MultiHeadAttention(decode=True). Decode with flexjax.dot_product_attention on "
            "your cache (its split-KV decode kernel) and a BlockMask, or use "
            "nnx.dot_product_attention for decoding"
        )
    raise TypeError(
        f"mask: expected a flexjax.BlockMask or None, got {_describe(mask)}. flexjax never "
        "forms the dense [T, S] mask: write the pattern as a mask_mod(b, h, q_idx, kv_idx) "
        "and pass flexjax.create_block_mask(mask_mod, B, H, T, S) as mask= (build it inside "
        "the jitted step when it depends on the batch, e.g. document ids)"
    )


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: BlockMask | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype=None,
    precision=None,
    module=None,
    promote_dtype: Callable | None = None,
    is_causal: bool = False,
    *,
    score_mod: Callable | None = None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    kernel_options: dict | None = None,
    **future_kwargs,
) -> jax.Array:
    """`nnx.dot_product_attention`'s signature on flexjax's kernels.

    query [batch..., T, N, H]; key [batch..., S, K, H]; value [batch..., S, K, Hv]
    (GQA when N is a multiple of K; no batch dimension, one, or several, which
    are flattened into one batch index `b` for the mods and the block mask).
    mask: a `flexjax.BlockMask` for (T, S) or None; bias must be None (use a
    score_mod). `score_mod(score, b, h, q_idx, kv_idx)`, `block_mask`, `scale`
    (default 1/sqrt(H), as Flax) and `kernel_options` are flexjax's; the
    factory `attention_fn` fixes them for a module. dtype: q, k and v are cast
    to it (default: their promoted dtype), or `promote_dtype((q, k, v),
    dtype=dtype)` when given. Returns [batch..., T, N, Hv] in that dtype.
    Raises for what it cannot honour (see the module docstring).
    """
    for name, value_given in future_kwargs.items():
        if value_given is not None and value_given is not False:
            raise TypeError(
                f"{name}: flexjax.flax_nnx.dot_product_attention does not know this argument "
                f"(got {_describe(value_given)}); it accepts unknown arguments only while they "
                "are None or False. Leave it unset, or call nnx.dot_product_attention"
            )
    if bias is not None:
        raise TypeError(
            f"bias: flexjax takes no dense bias array, got {_describe(bias)}; write the bias "
            "as a score_mod(score, b, h, q_idx, kv_idx) returning score + bias (captured "
            "arrays such as per-head slopes or a distance table are fine) and pass it to "
            "flexjax.flax_nnx.attention_fn(score_mod=...)"
        )
    if dropout_rate > 0.0 and not deterministic:
        raise NotImplementedError(
            f"dropout_rate: attention dropout is not implemented by flexjax's kernels "
            f"(got dropout_rate={dropout_rate} with deterministic={deterministic}); build "
            "MultiHeadAttention with dropout_rate=0.0, or call it with deterministic=True"
        )
    if module is not None:
        raise NotImplementedError(
            "module: got a module to sow the attention weights into (MultiHeadAttention's "
            "sow_weights=True); flexjax never forms the [T, S] weights. Call with "
            "sow_weights=False, or use nnx.dot_product_attention to inspect weights"
        )
    if precision is not None and not _is_highest(precision):
        raise ValueError(
            f"precision: got {precision!r}; flexjax's kernels fix their own matmul precision "
            "(full float32 for float32 inputs, the native tensor-core path for 16-bit "
            "inputs, accumulating in float32). Pass precision=None (or HIGHEST), and "
            "choose the speed/accuracy trade-off with the dtype"
        )
    if query.ndim < 3:
        raise ValueError(
            f"query must be [batch..., T, N, H] with at least 3 dimensions, got shape {query.shape}"
        )
    block_mask = _check_mask(mask, query, block_mask)

    if promote_dtype is not None:
        query, key, value = promote_dtype((query, key, value), dtype=dtype)
    else:
        target = jnp.dtype(dtype) if dtype is not None else jnp.result_type(query, key, value)
        query, key, value = (x.astype(target) for x in (query, key, value))

    batch_shape = query.shape[:-3]
    if len(batch_shape) != 1:
        # flexjax takes one batch axis: none becomes 1, several are flattened (as Flax does
        # before calling jax.nn). The mods' `b` is then the flattened batch index.
        flat = math.prod(batch_shape)
        query, key, value = (
            x.reshape((flat if x.ndim > 3 else 1, *x.shape[-3:])) for x in (query, key, value)
        )

    T, S = query.shape[1], key.shape[1]
    if is_causal:
        if block_mask is not None:
            raise ValueError(
                "is_causal: got is_causal=True together with a BlockMask; flexjax cannot "
                "intersect a built BlockMask with another mask. Put causality into the "
                "mask_mod (flexjax.and_masks(mask_mod, causal)) and call with is_causal=False"
            )
        block_mask = create_block_mask(causal_mask, None, None, T, S)

    out = _flex_dpa(
        query, key, value, score_mod, block_mask, scale=scale, kernel_options=kernel_options
    )
    return out.reshape((*batch_shape, *out.shape[1:]))


def attention_fn(
    score_mod: Callable | None = None,
    block_mask: BlockMask | None = None,
    *,
    scale: float | None = None,
    kernel_options: dict | None = None,
) -> Callable[..., jax.Array]:
    """An `attention_fn` for `nnx.MultiHeadAttention` with these mods fixed.

    score_mod(score, b, h, q_idx, kv_idx): applied in every call (it may
    capture JAX arrays: they are kernel inputs). block_mask: a BlockMask for
    every call, or None to take one per call through MHA's `mask=` argument
    (or none: full attention, or causal with `is_causal=True`). scale,
    kernel_options: as `flexjax.dot_product_attention`. The result takes
    `nnx.dot_product_attention`'s arguments; see `dot_product_attention`.
    """
    if block_mask is not None and not isinstance(block_mask, BlockMask):
        raise TypeError(
            f"block_mask: expected a flexjax.BlockMask or None, got {_describe(block_mask)}; "
            "build one with flexjax.create_block_mask(mask_mod, B, H, T, S)"
        )
    if score_mod is not None and not callable(score_mod):
        raise TypeError(
            f"score_mod: expected a function score_mod(score, b, h, q_idx, kv_idx) or None, "
            f"got {_describe(score_mod)}"
        )
    return functools.partial(
        dot_product_attention,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
        kernel_options=kernel_options,
    )
