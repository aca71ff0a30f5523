"""The online softmax every kernel shares: units, the final (out, lse), and merging partial results.

Softmax runs in float32 and base 2. For each kv tile
    s      = scale * q k^T, then score_mod, then -inf where masked
    m_new  = max(m, rowmax(s))
    p      = 2^(s log2 e - m_new log2 e),  alpha = 2^(m log2 e - m_new log2 e)
    l      = alpha l + rowsum(p),          acc = alpha acc + p v
and at the end out = acc / l, lse = m + ln l. A row that has seen nothing but
-inf keeps m = -inf; kernels subtract 0 instead there so exp gives exact
zeros, and the row ends with out = 0 and lse = -inf, never NaN.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from pallas_kernels.mod_scaling import scales_with_score
from pallas_kernels.mod_trace import ModProgram

__all__ = [
    "LOG2E",
    "MASKED_SCORE",
    "combine",
    "finish",
    "mod_score_units",
    "scaled",
    "score_units",
]

LOG2E = math.log2(math.e)

# The score of a masked element. -inf (not a large negative number) so that a
# masked element contributes exactly 0 and a fully masked row is detectable.
MASKED_SCORE = float("-inf")


def score_units(scale: float, natural: bool) -> tuple[float, float]:
    """(pre, to_base2): kernels compute s = (q k^T) * pre, mod it, then exponentiate s * to_base2.

    natural: a score_mod must see natural scores (kernels ask `mod_score_units`, which
    says False for a mod that scales with the score). Then pre = scale and
    to_base2 = log2(e). Otherwise (and with a positive scale, so the row max
    commutes with scaling), both constants fold into one multiply applied
    inside exp2's argument: pre = 1 and to_base2 = scale * log2(e). Then
    `exp2(s * to_base2 - m * to_base2)` is one fused multiply-add per score,
    and the raw scores need no separate scaling pass. Natural units of a value
    x in score units: x * to_base2 / log2(e).
    """
    if not natural and scale > 0:
        return 1.0, scale * LOG2E
    return scale, LOG2E


def mod_score_units(
    scale: float, score_program: ModProgram | None, captured_grads: bool = False
) -> tuple[float, float]:
    """`score_units` for a kernel running `score_program`: a score_mod that scales with the
    score, f(c s) = c f(s) (`mod_scaling`: noop, causal_bias, checkerboard, ...), is applied to
    the raw score, the scale folded into exp2 as without a score_mod: one multiply per score
    less. Its derivative f' is the same at the raw and the natural score, so a backward may do
    so too -- unless it computes the gradients of the mod's captured arrays (captured_grads):
    a temperature t in s * t gets the sum of ds times the natural s."""
    natural = score_program is not None and (captured_grads or not scales_with_score(score_program))
    return score_units(scale, natural)


def scaled(s, pre: float):
    """Raw scores q k^T into score units: a multiply only when a score_mod needs one."""
    return s if pre == 1.0 else s * pre


def finish(carry, to_base2: float):
    """(out, lse) of the online softmax's final state: 0 and -inf for rows that kept nothing."""
    acc, m_i, l_i = carry
    empty = l_i == 0.0
    l_safe = jnp.where(empty, 1.0, l_i)
    m_natural = jnp.where(m_i == MASKED_SCORE, 0.0, m_i) * (to_base2 / LOG2E)
    return acc / l_safe[:, None], jnp.where(empty, MASKED_SCORE, m_natural + jnp.log(l_safe))


def combine(o_part, lse_part):
    """Merge results over disjoint kv parts: o_part [..., parts, rows, Ev], lse_part [..., parts, rows] (f32).

    lse = logsumexp_i(lse_i), out = sum_i exp(lse_i - lse) out_i; parts that
    kept nothing (lse -inf) weigh 0, and a row no part kept gives 0 and -inf.
    """
    m = jnp.max(lse_part, axis=-2)
    m_safe = jnp.where(m == MASKED_SCORE, 0.0, m)
    w = jnp.exp(lse_part - m_safe[..., None, :])  # empty parts (lse -inf) weigh 0
    denom = jnp.sum(w, axis=-2)
    out = jnp.sum(w[..., None] * o_part, axis=-3) / jnp.where(denom == 0, 1.0, denom)[..., None]
    lse = jnp.where(denom == 0, MASKED_SCORE, m_safe + jnp.log(denom))
    return out, lse
