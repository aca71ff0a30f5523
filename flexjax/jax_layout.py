"""flex_attention in JAX's own layout: `dot_product_attention` on [B, T, N, H] arrays.

`jax.nn.dot_product_attention` and Flax's attention modules hold q, k and v
as [batch, sequence, heads, head dim]; flex_attention takes PyTorch's
[batch, heads, sequence, head dim]. Transposing costs two copies of each
array per call, forward and backward. Here the same kernels read the arrays
where they are: the launchers build their BlockSpecs from the call's layout
(`pallas_kernels.spec.Layout.BSHD`), so nothing is transposed, padded or
copied. Mods keep PyTorch's arguments (score, b, h, q_idx, kv_idx) and the
BlockMask is the same as for flex_attention.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from flexjax.api import _checked_call
from flexjax.block_mask import BlockMask
from pallas_kernels.spec import Layout

__all__ = ["dot_product_attention"]


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    score_mod: Callable | None = None,
    block_mask: BlockMask | None = None,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    kernel_options: dict | None = None,
    q_sharding=None,
):
    """Block-sparse attention with mods on [B, T, N, H] arrays (jax.nn's layout).

    query [B, T, N, H]; key [B or 1, S, K, H]; value [B or 1, S, K, Hv]. GQA
    when N is a multiple of K (as jax.nn does: query head n reads kv head
    n // (N // K)). score_mod(score, b, h, q_idx, kv_idx) and block_mask (for
    (T, S)) as in `flex_attention`. Returns out [B, T, N, Hv] in query's dtype
    and, with return_lse, lse [B, T, N] float32. Differentiable; under jit
    the program holds no transpose or copy of q, k, v, out or their
    gradients. On a mesh it runs like flex_attention, on shards of batch and
    heads: under jit on arrays placed by a NamedSharding (Auto axes), on
    Explicit axes (read from query's type), and inside a `jax.shard_map` with
    q_sharding = query's PartitionSpec there, over [B, T, N, H].
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(
                f"{name} must have 4 dimensions [B, T, N, H] (jax.nn's layout), got shape "
                f"{getattr(x, 'shape', type(x).__name__)}"
            )
    enable_gqa = query.shape[2] != key.shape[2]
    return _checked_call(
        query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options,
        q_sharding, Layout.BSHD,
    )  # fmt: skip
