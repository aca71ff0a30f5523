"""Relative-position biases: the score plus a function of q_idx - kv_idx."""

import jax.numpy as jnp


def relative_positional(score, b, h, q_idx, kv_idx):
    """score + (q_idx - kv_idx): the simplest relative bias (attention-gym's)."""
    return score + (q_idx - kv_idx)


def generate_relative_bias_table(table, max_distance: int):
    """score + table[clip(q_idx - kv_idx, -max_distance, max_distance) + max_distance].

    `table` ([2 * max_distance + 1] floats) is a captured array: a learnable bias
    (T5-style, unbucketed) once gradients to captured arrays exist.
    """
    table = jnp.asarray(table)
    if table.shape != (2 * max_distance + 1,):
        raise ValueError(
            f"table must have shape ({2 * max_distance + 1},) for max_distance={max_distance}, "
            f"got {table.shape}"
        )

    def relative_bias(score, b, h, q_idx, kv_idx):
        distance = jnp.clip(q_idx - kv_idx, -max_distance, max_distance) + max_distance
        return score + table[distance]

    return relative_bias
