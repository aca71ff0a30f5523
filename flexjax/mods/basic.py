"""The simplest score_mods of the seed: identity, causal-as-a-score_mod, checkerboard."""

import jax.numpy as jnp


def noop(score, b, h, q_idx, kv_idx):
    """Full attention: the score unchanged."""
    return score


def causal_bias(score, b, h, q_idx, kv_idx):
    """Causal attention written as a score_mod (-inf above the diagonal).

    Same result as `masks.causal_mask`, but every block is computed: with no
    BlockMask the kernel cannot skip the upper triangle (about 2x slower).
    """
    return jnp.where(q_idx >= kv_idx, score, -jnp.inf)


def checkerboard(score, b, h, q_idx, kv_idx):
    """The seed's first example: halve every score, then double where |kv - q| is even.

    (`% 1 == 0` always holds, so odd distances end at 0.5x and even ones at 1x.)
    """
    score = jnp.where(abs(kv_idx - q_idx) % 1 == 0, score * 0.5, score)
    score = jnp.where(abs(kv_idx - q_idx) % 2 == 0, score * 2.0, score)
    return score
