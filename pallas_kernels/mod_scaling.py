"""Does a score_mod commute with scaling the score? Then kernels need not scale scores first.

Attention is softmax(score_mod(scale * q k^T)). Without a score_mod the
kernels fold `scale` into exp2's argument: one fused multiply-add per score
(`softmax.score_units`). With one, every score is first multiplied by
`scale` so that the mod sees the natural score: one more multiply per score,
and a forward's per-score arithmetic is what bounds it on a Hopper GPU (the
seed's `noop` example, written as an explicit identity score_mod, ran its
bf16 D=128 forward at 527 TFLOP/s where the causal mask without a score_mod
ran at 580, H200, bench/results/seed_table_bf16_d128_h200_2026-11-29_fused.md).

Many score_mods are positively homogeneous of degree one in the score,
f(c s) = c f(s) for every c > 0: the identity, a mask written as a score_mod
(`causal_bias`: where(q >= kv, s, -inf)), `checkerboard`'s
where(..., s * 0.5, s), a learned per-head temperature s * t[h]. For those
f(scale * raw) = scale * f(raw), so a kernel may apply the mod to the raw
score and keep folding `scale` into exp2 (`softmax.mod_score_units`).

`scales_with_score` decides it from the traced program, conservatively. Each
value gets a kind:
    FREE   does not depend on the score (indices, captured arrays, literals);
    FIXED  a FREE value known to be 0 or +-inf everywhere (c * v = v), such
           as causal_bias's -inf literal;
    LINEAR homogeneous of degree one in the score;
    OTHER  anything else.
The score is LINEAR. LINEAR survives negation, abs, conversions to floats at
least as wide, a product or quotient by a FREE value, sums, max and min of LINEAR and FIXED
values, and a select whose predicate is FREE between LINEAR or FIXED cases.
The mod scales with the score when its result is LINEAR or FIXED. A sum with
a bias (alibi), softcapping's tanh and any comparison of the score are
OTHER: those mods keep the natural score.

Backward kernels may too: f' is homogeneous of degree zero, f'(c s) = f'(s),
so ds pulled back through the mod at the raw score is the same (the kernels
multiply dq and dk by scale at the end either way). A captured array's
gradient is not (the temperature's is a sum of ds times the *natural* score):
a kernel that computes those keeps natural scores.
"""

from __future__ import annotations

import enum
import functools

import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from pallas_kernels.mod_trace import ModProgram

__all__ = ["scales_with_score"]


class _Kind(enum.Enum):
    FREE = "free"
    FIXED = "fixed"
    LINEAR = "linear"
    OTHER = "other"


_FREE_LIKE = (_Kind.FREE, _Kind.FIXED)
_LINEAR_LIKE = (_Kind.LINEAR, _Kind.FIXED)
# Ops that carry a LINEAR value to a LINEAR value, and a FIXED one to a FIXED one
# (convert_element_type only where `_keeps_scaling` says so).
_UNARY = {"neg", "abs", "copy", "convert_element_type", "broadcast_in_dim", "reshape",
          "squeeze", "expand_dims"}  # fmt: skip
# Calls whose value is their jaxpr's, and the parameter holding it (custom_jvp / custom_vjp
# calls are not walked: their derivative rule, which a backward uses, need not scale as
# their value does).
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "remat2": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr"}  # fmt: skip


def _is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def _literal_kind(value) -> _Kind:
    v = np.asarray(value)
    if _is_float(v.dtype) and v.size and np.all((v == 0) | np.isinf(v)):
        return _Kind.FIXED
    return _Kind.FREE


def _keeps_scaling(eqn) -> bool:
    """A unary op keeps c * x as c * (its x): not a conversion to an integer or bool (0 or inf
    would become anything), nor to a narrower float (a raw score, 1/scale times the natural
    one, can overflow float16 where the natural one does not)."""
    if eqn.primitive.name != "convert_element_type":
        return True
    src, dst = eqn.invars[0].aval.dtype, eqn.params["new_dtype"]
    return _is_float(src) and _is_float(dst) and jnp.finfo(dst).bits >= jnp.finfo(src).bits


def _eqn_kinds(eqn, kinds: list[_Kind]) -> list[_Kind]:
    """The kinds of eqn's outputs given its inputs' kinds."""
    name, n_out = eqn.primitive.name, len(eqn.outvars)
    sub = eqn.params.get(_CALLS[name]) if name in _CALLS else None
    if sub is not None:
        jaxpr = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr or a Jaxpr
        return _walk(jaxpr, [_literal_kind(c) for c in getattr(sub, "consts", ())], kinds)
    if _Kind.OTHER in kinds:
        return [_Kind.OTHER] * n_out
    if all(k in _FREE_LIKE for k in kinds):
        if name in _UNARY and kinds == [_Kind.FIXED] and _keeps_scaling(eqn):
            return [_Kind.FIXED] * n_out
        return [_Kind.FREE] * n_out
    # At least one input is LINEAR from here on.
    out = _Kind.OTHER
    if name in _UNARY and len(kinds) == 1:
        out = _Kind.LINEAR if _keeps_scaling(eqn) else _Kind.OTHER
    elif name == "mul" and sorted(k is _Kind.LINEAR for k in kinds) == [False, True]:
        other = kinds[0] if kinds[1] is _Kind.LINEAR else kinds[1]
        out = _Kind.LINEAR if other in _FREE_LIKE else _Kind.OTHER
    elif name == "div" and kinds[0] is _Kind.LINEAR and kinds[1] in _FREE_LIKE:
        out = _Kind.LINEAR
    elif name in ("add", "sub", "max", "min") and all(k in _LINEAR_LIKE for k in kinds):
        out = _Kind.LINEAR
    elif (
        name == "select_n" and kinds[0] in _FREE_LIKE and all(k in _LINEAR_LIKE for k in kinds[1:])
    ):
        out = _Kind.LINEAR
    return [out] * n_out


def _walk(jaxpr: jex_core.Jaxpr, const_kinds: list[_Kind], in_kinds: list[_Kind]) -> list[_Kind]:
    env = dict(zip(jaxpr.constvars, const_kinds, strict=True))
    env.update(zip(jaxpr.invars, in_kinds, strict=True))

    def read(v):
        return _literal_kind(v.val) if isinstance(v, jex_core.Literal) else env[v]

    for eqn in jaxpr.eqns:
        env.update(zip(eqn.outvars, _eqn_kinds(eqn, [read(v) for v in eqn.invars]), strict=True))
    return [read(v) for v in jaxpr.outvars]


@functools.lru_cache(maxsize=256)
def scales_with_score(program: ModProgram) -> bool:
    """True when the score_mod `program` is positively homogeneous of degree one in the score
    (f(c s) = c f(s), c > 0) by the rules above; False when that is not shown."""
    if not program.is_score_mod:
        raise ValueError(f"{program.name} is a mask_mod; scales_with_score takes a score_mod")
    consts = [
        _literal_kind(val) if kind == "literal" else _Kind.FREE for kind, val in program.const_slots
    ]
    inputs = [_Kind.LINEAR] + [_Kind.FREE] * (len(program.jaxpr.invars) - 1)
    (out,) = _walk(program.jaxpr, consts, inputs)
    return out in _LINEAR_LIKE
