"""Sliding-window causal mask (Mistral): causal, and at most `window_size` back.

window_size=1:  q\\kv 0 1 2 3
                  0   x . . .
                  1   x x . .
                  2   . x x .
                  3   . . x x
"""


def generate_sliding_window(window_size: int):
    """mask_mod keeping kv_idx in [q_idx - window_size, q_idx] (the seed uses 1024)."""
    if window_size < 0:
        raise ValueError(f"window_size must be >= 0, got {window_size}")

    def sliding_window_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window_size)

    sliding_window_causal.__qualname__ = f"sliding_window_causal_{window_size}"
    return sliding_window_causal
