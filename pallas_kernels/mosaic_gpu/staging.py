"""Which captured-array reads of a mod the Mosaic GPU kernels can stage through shared memory.

Mosaic GPU cannot gather from registers or shared memory with an index tile.
A read whose index is `q_idx + c` or `kv_idx + c`, with c depending on b, h
and constants only (`doc[q_idx]`, `bias[h, kv_idx]`, `doc[kv_idx - 1]`), is
a contiguous slice for a tile: the kernel copies that slice into shared
memory with TMA (with Q for q_idx, with each K tile for kv_idx) and reads it
as a row or column vector. A read at an index of b, h and constants only is
one scalar load. Anything else (`table[q_idx - kv_idx]`, `doc[q_idx // 2]`,
`offsets[doc[q_idx]]`) cannot be staged: the backend refuses it.

`read_kinds(program)` walks the traced mod's jaxpr with a small abstract
domain -- per scalar value: constant (C), q_idx + constant (Q),
kv_idx + constant (KV), or anything else (X) -- in the order the tile
evaluator (`mod_eval`) makes its loads, and returns each load's kind. JAX's
negative-index wrap of `x[i]`, `select_n(i < 0, i, i + n)`, keeps i's kind:
the index-range check (`index_ranges`) has already proved such indices are
never negative for in-range q_idx / kv_idx, and the kernel's tiles hold only
in-range rows and columns (it runs lengths that are multiples of its blocks).
"""

from __future__ import annotations

import functools

from jax.extend import core as jex_core

from pallas_kernels.mod_trace import ModProgram

__all__ = ["KV", "Q", "SCALAR", "read_kinds"]

SCALAR, Q, KV = "scalar", "q", "kv"
_C, _X = "c", "x"  # a constant (b, h, literals, scalar reads), anything else
_SAME = {"convert_element_type", "copy", "squeeze", "reshape", "broadcast_in_dim", "copy_p"}
_CALLS = ("pjit", "jit", "closed_call", "core_call", "remat", "checkpoint")
_CUSTOM = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")


class _Refuse(Exception):
    pass


@functools.lru_cache(maxsize=256)
def read_kinds(program: ModProgram | None) -> tuple[str, ...] | str:
    """Each load's kind (SCALAR, Q, KV) in the evaluator's order, or why one cannot be staged."""
    if program is None:
        return ()
    kinds: list[str] = []
    hoisted = {}
    for var, (kind, val) in zip(program.jaxpr.constvars, program.const_slots, strict=True):
        if kind == "hoisted":
            shape = program.const_shapes[val]
            if shape:
                hoisted[var] = shape
            else:
                kinds.append(SCALAR)  # a captured 0-d array: one load up front, a constant
    env = {v: _C for v in program.jaxpr.constvars}
    invars = program.jaxpr.invars
    index_kinds = [_C, _C, Q, KV]  # b, h, q_idx, kv_idx
    if program.is_score_mod:
        index_kinds = [_X, *index_kinds]
    env.update(zip(invars, index_kinds, strict=True))
    try:
        _walk(program.jaxpr, env, hoisted, kinds, {})
    except _Refuse as e:
        kind = "score_mod" if program.is_score_mod else "mask_mod"
        return f"{kind} {program.name}: {e}"
    return tuple(kinds)


def _walk(jaxpr, env, hoisted, kinds, wraps):
    def read(v):
        return _C if isinstance(v, jex_core.Literal) else env[v]

    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        ins = [read(v) for v in eqn.invars]
        if name in _CALLS or name in _CUSTOM:
            inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
            inner = eqn.params.get("fun_jaxpr") if inner is None else inner
            inner = getattr(inner, "jaxpr", inner)
            n = len(inner.invars)
            inner_env = dict(zip(inner.invars, ins[-n:], strict=True))
            inner_env.update({v: _C for v in inner.constvars})
            inner_hoisted = {
                iv: hoisted[ov]
                for iv, ov in zip(inner.invars, eqn.invars[-n:], strict=True)
                if not isinstance(ov, jex_core.Literal) and ov in hoisted
            }
            _walk(inner, inner_env, inner_hoisted, kinds, {})
            outs = [inner_env.get(v, _C) if not isinstance(v, jex_core.Literal) else _C
                    for v in inner.outvars]  # fmt: skip
            for var, kind in zip(eqn.outvars, outs, strict=True):
                env[var] = kind
            continue
        if (
            eqn.invars
            and not isinstance(eqn.invars[0], jex_core.Literal)
            and eqn.invars[0] in hoisted
        ):
            env[eqn.outvars[0]] = _read(eqn, ins, hoisted[eqn.invars[0]], kinds)
            continue
        if any(not isinstance(v, jex_core.Literal) and v in hoisted for v in eqn.invars):
            raise _Refuse(f"it uses a captured array whole in `{name}`")
        out = _X
        if all(k == _C for k in ins):
            out = _C
        elif name in _SAME and len(ins) == 1:
            out = ins[0]
        elif name in ("add", "sub"):
            a, b = ins
            if a in (Q, KV) and b == _C:
                out = a
            elif name == "add" and b in (Q, KV) and a == _C:
                out = b
        elif name == "lt" and ins[1] == _C and isinstance(eqn.invars[1], jex_core.Literal):
            if eqn.invars[1].val == 0 and ins[0] in (Q, KV):
                wraps[eqn.outvars[0]] = eqn.invars[0]  # the wrap test `i < 0` of x[i]
        elif name == "select_n" and len(ins) == 3 and ins[1] == ins[2] and ins[1] in (Q, KV):
            pred = eqn.invars[0]
            if not isinstance(pred, jex_core.Literal) and wraps.get(pred) in eqn.invars[1:]:
                out = ins[1]  # i or i + n: the same index inside the proven range
        for var in eqn.outvars:
            env[var] = out


def _read(eqn, ins, shape, kinds) -> str:
    """The kind of one read of a captured array (appended to kinds); the value's kind."""
    name = eqn.primitive.name
    if name != "dynamic_slice" or any(s != 1 for s in eqn.params["slice_sizes"]):
        raise _Refuse(
            f"its read `{name}` of a captured array is not one element at an index expression"
        )
    dims = ins[1:]
    moving = [d for d, k in enumerate(dims) if k != _C]
    if not moving:
        kinds.append(SCALAR)
        return _C  # a value that depends on b, h and constants only
    if len(moving) == 1 and moving[0] == len(shape) - 1 and dims[moving[0]] in (Q, KV):
        kinds.append(dims[moving[0]])
        return _X
    raise _Refuse(
        "it reads a captured array at an index that is not q_idx or kv_idx plus a "
        "constant along the array's last axis (Mosaic GPU stages only contiguous slices)"
    )
