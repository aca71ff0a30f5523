"""Causal mask: each query sees itself and the keys before it.

q\\kv 0 1 2 3
  0   x . . .
  1   x x . .
  2   x x x .
  3   x x x x
"""


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx
