"""Packed (jagged / nested) sequences: a per-sequence mask_mod over one packed stream.

The seed's nested-jagged-tensor example: sequences of lengths l_0, l_1, ... are
packed end to end; `offsets` are their starts (and the total at the end). Each
index is made relative to its own sequence before the inner mask_mod sees it,
and tokens of different sequences never attend to each other. No
multiple-of-128 rule on the total length: block masks handle any length.
"""

import jax.numpy as jnp

from flexjax.masks.causal import causal_mask


def offsets_from_lengths(lengths) -> jnp.ndarray:
    """[n + 1] int32: 0, l_0, l_0 + l_1, ..., sum(lengths)."""
    lengths = [int(n) for n in lengths]
    if any(n <= 0 for n in lengths):
        raise ValueError(f"sequence lengths must be positive, got {lengths}")
    return jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(jnp.asarray(lengths, jnp.int32))])


def generate_jagged_mask_mod(offsets, mask_mod=causal_mask):
    """Wrap a dense mask_mod for packed sequences with these `offsets` ([n + 1] ints)."""
    offsets = jnp.asarray(offsets, jnp.int32)
    if offsets.ndim != 1 or offsets.shape[0] < 2:
        raise ValueError(f"offsets must be 1-D with at least 2 entries, got shape {offsets.shape}")
    total = int(offsets[-1])
    # seq_idx[i]: the sequence token i belongs to (the seed's build_seq_idx).
    seq_idx = jnp.searchsorted(offsets, jnp.arange(total, dtype=jnp.int32), side="right") - 1
    seq_idx = seq_idx.astype(jnp.int32)

    def jagged(b, h, q_idx, kv_idx):
        q_seq, kv_seq = seq_idx[q_idx], seq_idx[kv_idx]
        q_local = q_idx - offsets[q_seq]
        kv_local = kv_idx - offsets[kv_seq]
        return mask_mod(b, h, q_local, kv_local) & (q_seq == kv_seq)

    jagged.__qualname__ = f"jagged_{getattr(mask_mod, '__qualname__', 'mask')}"
    return jagged
