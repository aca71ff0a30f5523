"""Document masking: tokens attend only within their own document (packed batches).

`document_id[i]` is the document of token i; a captured array, so changing its
values needs a new BlockMask but never a new kernel.

    documents [0 0 1 1], causal inside:  q\\kv 0 1 2 3
                                           0   x . . .
                                           1   x x . .
                                           2   . . x .
                                           3   . . x x
"""

import jax.numpy as jnp

from flexjax.masks.causal import causal_mask


def document_id_from_lengths(lengths) -> jnp.ndarray:
    """[sum(lengths)] int32 document ids from a list of document lengths."""
    lengths = [int(n) for n in lengths]
    if any(n <= 0 for n in lengths):
        raise ValueError(f"document lengths must be positive, got {lengths}")
    return jnp.repeat(jnp.arange(len(lengths), dtype=jnp.int32), jnp.asarray(lengths))


def seed_document_lengths(seq_len: int) -> list[int]:
    """The seed's documents: 4096 and 4096 tokens, then 8192-token documents up to seq_len."""
    lengths, total = [], 0
    for n in [4096, 4096] + [8192] * (seq_len // 8192 + 1):
        if total >= seq_len:
            break
        n = min(n, seq_len - total)
        lengths.append(n)
        total += n
    return lengths


def generate_doc_mask_mod(document_id, mask_mod=causal_mask):
    """mask_mod(b, h, q, kv) & same document. `document_id`: [S] int array."""
    document_id = jnp.asarray(document_id)
    if document_id.ndim != 1:
        raise ValueError(f"document_id must be 1-D [S], got shape {document_id.shape}")

    def document_masked(b, h, q_idx, kv_idx):
        same_doc = document_id[q_idx] == document_id[kv_idx]
        return mask_mod(b, h, q_idx, kv_idx) & same_doc

    document_masked.__qualname__ = f"document_{getattr(mask_mod, '__qualname__', 'mask')}"
    return document_masked
