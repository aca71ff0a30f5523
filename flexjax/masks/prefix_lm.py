"""Prefix LM (T5): the prefix is seen by everyone (bidirectional), the rest is causal.

prefix_length=1:  q\\kv 0 1 2 3
                    0   x x . .
                    1   x x . .
                    2   x x x .
                    3   x x x x
"""


def generate_prefix_lm_mask(prefix_length: int):
    """mask_mod keeping kv_idx <= prefix_length, or causal (the seed uses 2048)."""

    def prefix_lm_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= prefix_length) | (q_idx >= kv_idx)

    prefix_lm_causal.__qualname__ = f"prefix_lm_causal_{prefix_length}"
    return prefix_lm_causal
