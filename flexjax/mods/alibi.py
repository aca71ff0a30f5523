"""ALiBi (Press et al.): a per-head linear bias on the query-key distance.

Slope of head h: 2^(-(h + 1) * 8 / H). Two versions, as in the seed: the slopes
as a captured array (closure), and the same computed inside the mod. Both use
the seed's sign, `score + slope[h] * (q_idx - kv_idx)`; the paper's ALiBi
penalises distance, which is `sign=-1`. Pair with a causal mask.
"""

import jax.numpy as jnp


def alibi_slopes(num_heads: int) -> jnp.ndarray:
    """[num_heads] float32: 2^(-(h + 1) * 8 / num_heads)."""
    return jnp.exp2(-(jnp.arange(num_heads, dtype=jnp.float32) + 1) * 8.0 / num_heads)


def generate_alibi_bias(num_heads: int, sign: int = 1, slopes=None):
    """Closure version: `slopes` ([num_heads], default `alibi_slopes`) is a captured array."""
    slopes = alibi_slopes(num_heads) if slopes is None else jnp.asarray(slopes)

    def alibi_closure(score, b, h, q_idx, kv_idx):
        return score + sign * slopes[h] * (q_idx - kv_idx)

    return alibi_closure


def generate_alibi_functional(num_heads: int, sign: int = 1):
    """Functional version: the slope is computed from h inside the mod, nothing captured."""

    def alibi_functional(score, b, h, q_idx, kv_idx):
        slope = jnp.exp2(-((h + 1) * 8.0 / num_heads))
        return score + sign * (q_idx - kv_idx) * slope

    return alibi_functional
