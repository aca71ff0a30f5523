"""Can a mod index outside a captured array? Interval arithmetic over its traced program.

Inside a kernel a gather from a captured array is clamped to the array (and
on a GPU nothing would stop a read past it), so `document_id[q_idx]` with a
document_id shorter than the queries silently returns the last id. Before
anything runs, `check_index_ranges` walks the mod's jaxpr with an integer
interval for every value, starting from b in [0, B), h in [0, H),
q_idx in [0, L), kv_idx in [0, S) (the score is unknown), and checks every
gather and dynamic_slice from a captured array: an index whose interval can
leave the array raises `ModIndexError`, naming the mod, the array's shape and
the index's range.

The walk is path-sensitive where it matters: a comparison whose outcome the
intervals decide is a constant, so `select_n` takes that branch -- which is
what keeps jnp's negative-index normalisation (`where(i < 0, i + n, i)`)
from widening every index. What it cannot bound it leaves alone: an index
read from another captured array (`offsets[doc[q_idx]]`) depends on data and
is not checked here; such a read is clamped to the array, in the kernels and
in `create_block_mask` alike, and `kernel_options={"check_indices": True}`
finds it by evaluation (`flexjax.checks`). A guarded read such as
`jnp.where(q_idx < n, table[q_idx], 0)` is refused (the read itself can leave
the table); clamp its index instead: `table[jnp.minimum(q_idx, n - 1)]`.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from jax.extend import core as jex_core

from pallas_kernels.mod_trace import ModProgram
from pallas_kernels.object_arrays import as_obj, shape_op

__all__ = ["ModIndexError", "check_index_ranges"]


class ModIndexError(IndexError):
    """A mod can index a captured array out of its range."""


@dataclasses.dataclass(frozen=True)
class _Array:
    """A captured array in the walk: its shape and its position among the program's arrays."""

    shape: tuple[int, ...]
    slot: int


def _iv(lo, hi):
    return (int(lo), int(hi))


def _scalar(v):
    """An interval of a literal: integer and bool scalars are exact, anything else unknown."""
    v = np.asarray(v)
    if v.shape == () and (np.issubdtype(v.dtype, np.integer) or v.dtype == np.bool_):
        return _iv(v, v)
    if v.shape and (np.issubdtype(v.dtype, np.integer) or v.dtype == np.bool_):
        out = np.empty(v.shape, dtype=object)
        for pos in np.ndindex(*v.shape):
            out[pos] = _iv(v[pos], v[pos])
        return out
    return None


def _mul(a, b):
    products = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
    return _iv(min(products), max(products))


def _trunc_div(a, b):
    if b[0] <= 0 <= b[1]:
        return None
    q = [int(x / y) for x in a for y in b]
    return _iv(min(q), max(q))


def _rem(a, b):
    if b[0] != b[1] or b[0] == 0:
        return None
    d = abs(b[0])
    if a[0] >= 0:
        return _iv(0, min(a[1], d - 1)) if a[1] >= d else a
    if a[1] <= 0:
        return _iv(max(a[0], -(d - 1)), 0) if a[0] <= -d else a
    return _iv(-(d - 1), d - 1)


def _compare(name, a, b):
    table = {
        "lt": (a[1] < b[0], a[0] >= b[1]),
        "le": (a[1] <= b[0], a[0] > b[1]),
        "gt": (a[0] > b[1], a[1] <= b[0]),
        "ge": (a[0] >= b[1], a[1] < b[0]),
        "eq": (a[0] == a[1] == b[0] == b[1], a[1] < b[0] or b[1] < a[0]),
        "ne": (a[1] < b[0] or b[1] < a[0], a[0] == a[1] == b[0] == b[1]),
    }
    always, never = table[name]
    return _iv(1, 1) if always else _iv(0, 0) if never else _iv(0, 1)


def _elementwise(name, ins, params):
    """The interval of one element of an elementwise op, or None (unknown)."""
    if name == "select_n":
        pred, cases = ins[0], ins[1:]
        if pred is not None and pred[0] == pred[1]:
            return cases[int(pred[0])]
        if any(c is None for c in cases):
            return None
        return _iv(min(c[0] for c in cases), max(c[1] for c in cases))
    if name == "clamp":  # clamp(lo, x, hi)
        lo, x, hi = ins
        if x is None:
            return None if lo is None or hi is None else _iv(lo[0], hi[1])
        return _iv(max(x[0], lo[0]) if lo else x[0], min(x[1], hi[1]) if hi else x[1])
    if any(v is None for v in ins):
        return None
    if name in ("convert_element_type", "copy"):
        return ins[0]
    if name == "neg":
        return _iv(-ins[0][1], -ins[0][0])
    if name == "abs":
        lo, hi = ins[0]
        return _iv(0 if lo <= 0 <= hi else min(abs(lo), abs(hi)), max(abs(lo), abs(hi)))
    if name == "integer_pow":
        lo, hi = ins[0]
        vals = [lo ** params["y"], hi ** params["y"]] + ([0] if lo <= 0 <= hi else [])
        return _iv(min(vals), max(vals))
    if name == "not":
        lo, hi = ins[0]
        return _iv(1 - hi, 1 - lo) if 0 <= lo and hi <= 1 else None
    a, b = ins[0], ins[1] if len(ins) > 1 else None
    if name == "add":
        return _iv(a[0] + b[0], a[1] + b[1])
    if name == "sub":
        return _iv(a[0] - b[1], a[1] - b[0])
    if name == "mul":
        return _mul(a, b)
    if name == "max":
        return _iv(max(a[0], b[0]), max(a[1], b[1]))
    if name == "min":
        return _iv(min(a[0], b[0]), min(a[1], b[1]))
    if name == "div":
        return _trunc_div(a, b)
    if name == "rem":
        return _rem(a, b)
    if name in ("lt", "le", "gt", "ge", "eq", "ne"):
        return _compare(name, a, b)
    if name in ("and", "or") and all(0 <= v[0] and v[1] <= 1 for v in (a, b)):
        if name == "and":
            return _iv(a[0] & b[0], a[1] & b[1])
        return _iv(a[0] | b[0], a[1] | b[1])
    if name in ("shift_right_arithmetic", "shift_right_logical") and a[0] >= 0 and b[0] == b[1]:
        return _iv(a[0] >> b[0], a[1] >> b[0])
    if name == "shift_left" and a[0] >= 0 and b[0] == b[1] >= 0:
        return _iv(a[0] << b[0], a[1] << b[0])
    return None


def _floor_divide(a, b):
    if b[0] != b[1] or b[0] <= 0:
        return None
    return _iv(a[0] // b[0], a[1] // b[0])


def _remainder(a, b):
    if b[0] != b[1] or b[0] <= 0:
        return None
    return a if 0 <= a[0] and a[1] < b[0] else _iv(0, b[0] - 1)


# jnp's `//` and `%` on integers (named jits): Python's semantics, taken whole, since
# their sign fix-ups correlate values that separate intervals cannot.
_PYTHON_DIVISION = {"floor_divide": _floor_divide, "remainder": _remainder}


def _is_interval(v) -> bool:
    return isinstance(v, tuple) and len(v) == 2


class _Walk:
    def __init__(self, program: ModProgram, array_names):
        self.program, self.names = program, array_names

    def fail(self, array: _Array, dim: int, index, size: int):
        kind = "score_mod" if self.program.is_score_mod else "mask_mod"
        where = f" (dimension {dim})" if len(array.shape) > 1 else ""
        raise ModIndexError(
            f"{kind} {self.program.name} indexes a captured array of shape {array.shape}"
            f"{where} with an index in [{index[0]}, {index[1]}] (for {self.names}), which can "
            f"leave [0, {size - 1}]. Give the array the right length, or clamp the index "
            "(jnp.clip / jnp.minimum) if those positions are masked elsewhere."
        )

    def check(self, array: _Array, dim: int, start, size: int):
        if start is None:
            return  # data-dependent: not bounded here
        if start[0] < 0 or start[1] + size > array.shape[dim]:
            self.fail(array, dim, start, array.shape[dim] - size + 1)

    def run(self, jaxpr, consts, args):
        env = {}

        def read(v):
            return _scalar(v.val) if isinstance(v, jex_core.Literal) else env[v]

        for var, val in zip(jaxpr.constvars, consts, strict=True):
            env[var] = val
        for var, val in zip(jaxpr.invars, args, strict=True):
            env[var] = val
        for eqn in jaxpr.eqns:
            outs = self.eqn(eqn, [read(v) for v in eqn.invars])
            for var, val in zip(eqn.outvars, outs, strict=True):
                env[var] = val
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn, ins):
        name, p = eqn.primitive.name, eqn.params
        if p.get("name") in _PYTHON_DIVISION and all(_is_interval(v) for v in ins):
            return [_PYTHON_DIVISION[p["name"]](*ins)]
        inner = p.get("jaxpr") or p.get("call_jaxpr") or p.get("fun_jaxpr")
        if inner is not None and name not in ("cond", "while", "scan"):
            closed = inner if hasattr(inner, "jaxpr") else None
            jaxpr = closed.jaxpr if closed else inner
            consts = (
                [_scalar(c) if np.ndim(c) == 0 else None for c in closed.consts] if closed else []
            )
            return self.run(jaxpr, consts, ins[-len(jaxpr.invars) :])
        unknown = [None] * len(eqn.outvars)
        if name in ("gather", "dynamic_slice") and isinstance(ins[0], _Array):
            self.gather(eqn, ins)
            return unknown
        if any(isinstance(v, _Array) for v in ins):
            return unknown
        shapes = [v.aval.shape for v in eqn.outvars]
        if len(eqn.outvars) != 1:
            return unknown
        try:
            return [self.apply(name, ins, p, shapes[0])]
        except (ValueError, IndexError, KeyError, TypeError):
            return unknown  # a structure this walk does not follow: unknown, never wrong

    def apply(self, name, ins, p, out_shape):
        objs = [as_obj(v) for v in ins]
        out = shape_op(name, objs, p, lambda value, dtype: _iv(value, value))
        if out is not None:
            return out
        shape = np.broadcast_shapes(*[o.shape for o in objs])
        objs = [np.broadcast_to(o, shape) for o in objs]
        out = np.empty(shape, dtype=object)
        for pos in np.ndindex(*shape):
            out[pos] = _elementwise(name, [o[pos] for o in objs], p)
        return out if shape else out[()]

    def gather(self, eqn, ins):
        array = ins[0]
        if eqn.primitive.name == "dynamic_slice":
            for d, start in enumerate(ins[1:]):
                self.check(array, d, as_obj(start)[()], eqn.params["slice_sizes"][d])
            return
        dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
        indices = as_obj(ins[1])
        if indices.ndim == 0:
            return
        for pos in np.ndindex(*indices.shape[:-1]):
            vec = indices[pos]
            for k, d in enumerate(dn.start_index_map):
                self.check(array, d, vec[k], sizes[d])


@functools.lru_cache(maxsize=512)
def check_index_ranges(program: ModProgram | None, B: int, H: int, L: int, S: int) -> None:
    """Raise ModIndexError if a gather of `program` can leave its captured array.

    B, H, L, S: the global ranges of b, h, q_idx and kv_idx the mod will see.
    """
    if program is None or not program.const_shapes:
        return
    arrays = [_Array(tuple(shape), i) for i, shape in enumerate(program.const_shapes)]
    consts = [
        (_scalar(val) if kind == "literal" else arrays[val] if arrays[val].shape else None)
        for kind, val in program.const_slots
    ]
    ranges = [_iv(0, B - 1), _iv(0, H - 1), _iv(0, L - 1), _iv(0, S - 1)]
    names = f"b < {B}, h < {H}, q_idx < {L}, kv_idx < {S}"
    args = ([None] if program.is_score_mod else []) + ranges
    _Walk(program, names).run(program.jaxpr, consts, args)
