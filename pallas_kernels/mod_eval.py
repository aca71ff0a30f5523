"""Evaluate a traced mod (`mod_trace.ModProgram`) on tiles, inside any backend's kernel.

The program is a jaxpr traced on *scalar* indices; here every scalar stands
for a whole tile: b and h are scalars, q_idx is [BM, 1] (or [1, BM]), kv_idx
[1, BN] (or [BN, 1]), the score [BM, BN] (or its transpose). Elementwise ops
broadcast tiles; a small non-scalar value (a gather index vector, a row such
as `intervals[i]`) is a numpy object array of tiles, handled by static
structural ops; indexing a hoisted captured array becomes a gather from its
(flattened) ref. This walk is shared; what differs per backend -- gathers,
scatter-adds, approximate math -- comes from its `TileOps`.

`eval_score_mod_vjp` is the backward's version: it evaluates the score_mod
once to record every gather from a hoisted array, then re-evaluates it as a
function of (score tile, gathered values) under `jax.vjp`. That gives the
derivative with respect to the score, and the cotangent of each gathered
value together with the flat indices it came from: the kernel scatter-adds
those into the captured array's gradient (a learnable bias).

`mod_loads` evaluates a program abstractly to classify its gathers, which
backends use to pick tiles (a gather of a whole [BM, BN] tile costs shared
memory).

Only what a mod can express per score element is supported; anything else
raises `ModTraceError` naming the mod and the operation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from pallas_kernels.approx_math import tanh_approx_p
from pallas_kernels.mod_trace import ModProgram, ModTraceError
from pallas_kernels.object_arrays import as_obj, shape_op
from pallas_kernels.tile_ops import IndexVector, TileOps, as_tile

__all__ = [
    "NO_LOADS",
    "ModLoads",
    "eval_mod",
    "eval_score_mod_vjp",
    "kernel_dtype",
    "mod_loads",
]

# Captured arrays of these dtypes reach kernels widened to int32: gathers of
# 1- and 2-byte integers (bool above all) take a slow path in Triton.
_WIDENED = {jnp.dtype(d) for d in (jnp.bool_, jnp.int8, jnp.uint8, jnp.int16, jnp.uint16)}


def kernel_dtype(dtype) -> jnp.dtype:
    """The dtype a captured array of `dtype` has inside a kernel (the evaluator casts back)."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.int32) if dtype in _WIDENED else dtype


# --------------------------------------------------------------------------
# Evaluation inside a kernel.
# --------------------------------------------------------------------------

_ELEMENTWISE = {
    "abs", "add", "and", "atan2", "ceil", "clamp", "convert_element_type", "copy",
    "cos", "div", "eq", "erf", "exp", "exp2", "floor", "ge", "gt", "integer_pow", "is_finite",
    "le", "log", "log1p", "logistic", "lt", "max", "min", "mul", "ne", "neg", "nextafter",
    "not", "or", "pow", "rem", "round", "rsqrt", "select_n", "shift_left",
    "shift_right_arithmetic", "shift_right_logical", "sign", "sin", "sqrt", "square", "sub",
    "tan", "tanh", "xor",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Hoisted:
    """A hoisted captured array: its flat ref, original shape and dtype, and its input slot."""

    ref: object
    shape: tuple[int, ...]
    slot: int
    dtype: jnp.dtype


def _broadcast_tiles(vals):
    shapes = [jnp.shape(v) for v in vals]
    target = np.broadcast_shapes(*shapes)
    return [v if jnp.shape(v) == target else jnp.broadcast_to(v, target) for v in vals]


_F32_EXACT = 2**24  # every integer of at most this magnitude is a float32 value


@dataclasses.dataclass(frozen=True)
class _OuterSum:
    """a + b of an int32 row vector and column vector (`IndexVector`s of bounded
    magnitude), not yet a tile: `q_idx - kv_idx` as the mods write it for relative positions.

    Converted to float32 it becomes float(a) + float(b), a float add per element where the
    tile would take an integer add and an integer-to-float conversion: conversions issue at a
    quarter of the float add's rate on sm80/sm90 (as exp2 does), so ALiBi-like biases cost
    the softmax one MUFU-rate op per score less. Bitwise the same: while |a| and |b| stay
    within 2^24 (`_F32_EXACT`) both are float32 values, so the float add rounds the exact sum
    once, as converting the integer sum does (which cannot wrap: |a + b| <= 2^25). Negation
    and literal integer factors keep it (on the vectors) while that holds; any other use
    expands it to the integer tile."""

    a: IndexVector
    b: IndexVector

    @staticmethod
    def of(prim_name: str, x, y):
        """x + y or x - y as an `_OuterSum`, or None where it does not apply."""
        vectors = isinstance(x, IndexVector) and isinstance(y, IndexVector)
        if not vectors or x.dim == y.dim or x.bound is None or y.bound is None:
            return None
        if not all(v.value.dtype == jnp.int32 for v in (x, y)):  # (narrower ints wrap)
            return None
        if max(x.bound, y.bound) > _F32_EXACT:
            return None
        if prim_name == "sub":
            y = y.map(lambda v: -v, y.bound)
        return _OuterSum(x, y)

    def scaled(self, c: int):
        """c * (a + b) as c * a + c * b (integers: exact), or None past float32's integers."""
        if abs(c) * max(self.a.bound, self.b.bound) > _F32_EXACT:
            return None
        return _OuterSum(*(v.map(lambda x: x * c, abs(c) * v.bound) for v in (self.a, self.b)))

    def to_float32(self):
        a, b = (v.map(lambda x: x.astype(jnp.float32)).expand() for v in (self.a, self.b))
        return a + b

    def expand(self):
        return self.a.expand() + self.b.expand()


def _static_int(x) -> int | None:
    """x as a Python int where it is a static integer scalar (a literal), else None."""
    if isinstance(x, _OuterSum | IndexVector) or jnp.ndim(x) != 0:
        return None
    dtype = jnp.result_type(x)
    if dtype == jnp.bool_ or not jnp.issubdtype(dtype, jnp.integer):
        return None
    try:
        return int(x)
    except (jax.errors.ConcretizationTypeError, TypeError):  # a traced value
        return None


def _outer_sum_op(prim, tiles, params):
    """prim as an `_OuterSum`: the sum of a row and a column vector, or one kept as one
    (negated, scaled by a literal, converted to float32); None where it does not apply (an
    `_OuterSum` among tiles is then expanded). tiles as the jaxpr gave them (literals not
    yet arrays)."""
    name = prim.name
    if name in ("add", "sub") and len(tiles) == 2:
        outer = _OuterSum.of(name, *tiles)
        if outer is not None:
            return outer
    if not any(isinstance(t, _OuterSum) for t in tiles):
        return None
    if name == "neg" and len(tiles) == 1:
        return tiles[0].scaled(-1)
    if name == "mul" and len(tiles) == 2:
        outer, c = tiles if isinstance(tiles[0], _OuterSum) else tiles[::-1]
        c = _static_int(c)
        return None if c is None else outer.scaled(c)
    if name == "convert_element_type" and jnp.dtype(params["new_dtype"]) == jnp.float32:
        return tiles[0].to_float32()
    return None


def _expanded(x):
    """x, with an `IndexVector` (or an `_OuterSum`) broadcast to its tile."""
    return x.expand() if isinstance(x, IndexVector | _OuterSum) else x


def _bind(prim, tiles, params):
    """prim on tiles; on `IndexVector`s of one dim (and scalars) it stays on the vectors (an
    `_OuterSum` is expanded: `_outer_sum_op` first keeps the ones it can)."""
    tiles = [_expanded(t) if isinstance(t, _OuterSum) else t for t in tiles]
    vecs = [t for t in tiles if isinstance(t, IndexVector)]
    if vecs:
        on_vector = len({v.dim for v in vecs}) == 1 and all(
            isinstance(t, IndexVector) or jnp.ndim(t) == 0 for t in tiles
        )
        if not on_vector:
            return prim.bind(*_broadcast_tiles([_expanded(t) for t in tiles]), **params)
        vals = [t.value if isinstance(t, IndexVector) else t for t in tiles]
        return vecs[0].map(lambda _: prim.bind(*_broadcast_tiles(vals), **params))
    return prim.bind(*_broadcast_tiles(tiles), **params)


class _Evaluator:
    """Walks a mod's jaxpr on tiles.

    record: a list that receives (slot, flat index, value) for every gather
    from a hoisted array. replay: an iterator of values that stand in for
    those gathers, in the same order (no loads happen then).
    """

    def __init__(self, program: ModProgram, ops: TileOps, record=None, replay=None):
        self.program = program
        self.ops = ops
        self.record = record
        self.replay = replay

    def fail(self, what: str):
        kind = "score_mod" if self.program.is_score_mod else "mask_mod"
        raise ModTraceError(
            f"{kind} {self.program.name}: {what} cannot be evaluated inside the kernel. "
            "Mods may index captured arrays with index expressions and use elementwise math."
        )

    # -- elementwise -------------------------------------------------------
    def bind_elementwise(self, prim, invals, params):
        objs = [as_obj(v) for v in invals]
        shape = np.broadcast_shapes(*[o.shape for o in objs])
        objs = [np.broadcast_to(o, shape) for o in objs]
        out = np.empty(shape, dtype=object)
        for pos in np.ndindex(*shape):
            tiles = [o[pos] for o in objs]
            outer = _outer_sum_op(prim, tiles, params)  # (before literals become arrays)
            if outer is not None:
                out[pos] = outer
                continue
            tiles = [
                t if not isinstance(t, int | float | bool | np.generic) else jnp.asarray(t)
                for t in tiles
            ]
            if prim is tanh_approx_p:
                x = _expanded(tiles[0])
                out[pos] = self.ops.tanh_approx(x.astype(jnp.float32)).astype(x.dtype)
                continue
            out[pos] = _bind(prim, tiles, params)
        return out if shape else out[()]

    # -- loads from hoisted arrays -----------------------------------------
    def load(self, hoisted: _Hoisted, index_per_dim):
        """Gather hoisted[index...] for one element; indices are tiles or ints (clamped)."""
        flat = 0
        stride = 1
        for d in reversed(range(len(hoisted.shape))):
            idx = _expanded(index_per_dim[d])
            n = hoisted.shape[d]
            if isinstance(idx, int | np.integer):
                idx = min(max(int(idx), 0), n - 1)
            else:
                idx = jnp.clip(idx.astype(jnp.int32), 0, n - 1)
            flat = flat + idx * stride
            stride *= n
        if isinstance(flat, int):
            flat = jnp.int32(flat)
        if self.replay is not None:
            return next(self.replay)
        value = self.ops.gather(hoisted.ref, flat)
        if value.dtype != hoisted.dtype:  # widened for the kernel (`kernel_dtype`)
            value = value != 0 if hoisted.dtype == jnp.bool_ else value.astype(hoisted.dtype)
        if self.record is not None:
            self.record.append((hoisted.slot, flat, value))
        return value

    # -- structural ops on (small) object arrays ---------------------------
    def structural(self, eqn, invals):
        name = eqn.primitive.name
        p = eqn.params
        invals = [_expanded(v) for v in invals]
        if name in ("gather", "dynamic_slice") and isinstance(invals[0], _Hoisted):
            return self.gather_hoisted(eqn, invals)
        if any(isinstance(v, _Hoisted) for v in invals):
            self.fail(f"using a captured array whole in `{name}`")
        objs = [as_obj(v) for v in invals]
        out = shape_op(name, objs, p, lambda value, dtype: jnp.asarray(value, dtype))
        if out is not None:
            return out
        self.fail(f"the operation `{name}` on non-scalar values")

    def gather_hoisted(self, eqn, invals):
        hoisted = invals[0]
        out_shape = eqn.outvars[0].aval.shape
        out = np.empty(out_shape, dtype=object)
        n_dims = len(hoisted.shape)
        if eqn.primitive.name == "dynamic_slice":
            starts = [as_obj(v)[()] for v in invals[1:]]
            sizes = eqn.params["slice_sizes"]
            for pos in np.ndindex(*out_shape):
                idx = []
                for d in range(n_dims):
                    start = self.clamp_start(starts[d], hoisted.shape[d] - sizes[d])
                    idx.append(start + pos[d] if pos[d] else start)
                out[pos] = self.load(hoisted, idx)
            return out if out_shape else out[()]
        dn = eqn.params["dimension_numbers"]
        if dn.operand_batching_dims:
            self.fail("a batched gather")
        sizes = eqn.params["slice_sizes"]
        indices = as_obj(invals[1])
        offset_dims = tuple(dn.offset_dims)
        batch_out_dims = [d for d in range(len(out_shape)) if d not in offset_dims]
        window_operand_dims = [d for d in range(n_dims) if d not in dn.collapsed_slice_dims]
        for pos in np.ndindex(*out_shape):
            batch_pos = tuple(pos[d] for d in batch_out_dims)
            start_vec = indices[batch_pos] if indices.ndim else indices[()]
            start_vec = as_obj(start_vec)
            starts = [0] * n_dims
            for k, od in enumerate(dn.start_index_map):
                starts[od] = self.clamp_start(
                    start_vec.reshape(-1)[k], hoisted.shape[od] - sizes[od]
                )
            offsets = [0] * n_dims
            for k, od in enumerate(window_operand_dims):
                offsets[od] = pos[offset_dims[k]]
            idx = [s + o if o else s for s, o in zip(starts, offsets, strict=True)]
            out[pos] = self.load(hoisted, idx)
        return out if out_shape else out[()]

    @staticmethod
    def clamp_start(start, hi):
        start = _expanded(start)
        if isinstance(start, int | np.integer):
            return min(max(int(start), 0), hi)
        return jnp.clip(start.astype(jnp.int32), 0, hi)

    # -- the walk ------------------------------------------------------------
    def run(self, jaxpr, consts, args):
        env = {}

        def read(v):
            if isinstance(v, jex_core.Literal):
                return v.val
            return env[v]

        for var, val in zip(jaxpr.constvars, consts, strict=True):
            # A captured 0-d array is one scalar load (it is an input, not a literal).
            env[var] = self.load(val, []) if isinstance(val, _Hoisted) and not val.shape else val
        for var, val in zip(jaxpr.invars, args, strict=True):
            env[var] = val
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            outs = self.eqn(eqn, invals)
            for var, val in zip(eqn.outvars, outs, strict=True):
                env[var] = val
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn, invals):
        prim = eqn.primitive
        name = prim.name
        if name in ("pjit", "jit", "closed_call", "core_call", "remat", "checkpoint"):
            inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
            if hasattr(inner, "jaxpr"):
                return self.run(inner.jaxpr, inner.consts, invals)
            return self.run(inner, [], invals)
        if name in ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
            inner = eqn.params.get("call_jaxpr") or eqn.params.get("fun_jaxpr")
            n = len(inner.jaxpr.invars)
            return self.run(inner.jaxpr, inner.consts, invals[-n:])
        if any(isinstance(v, _Hoisted) for v in invals):
            return [self.structural(eqn, invals)]
        # Elementwise ops, and any single-result op on scalars, act on tiles directly.
        all_scalar = all(v.aval.shape == () for v in (*eqn.invars, *eqn.outvars))
        if (
            name in _ELEMENTWISE
            or prim is tanh_approx_p
            or (all_scalar and not prim.multiple_results)
        ):
            return [self.bind_elementwise(prim, invals, eqn.params)]
        return [self.structural(eqn, invals)]


def eval_mod(
    program: ModProgram,
    hoisted_refs: Sequence,
    args: Sequence,
    out_shape: tuple[int, int],
    ops: TileOps,
):
    """Evaluate `program` in a kernel; args are (score?, b, h, q_idx, kv_idx) tiles.

    Returns one [BM, BN] tile (bool for a mask_mod, float32 for a score_mod).
    """
    consts = _consts(program, hoisted_refs)
    (out,) = _Evaluator(program, ops).run(program.jaxpr, consts, list(args))
    return _as_tile(out, out_shape)


def eval_score_mod_vjp(
    program: ModProgram,
    hoisted_refs: Sequence,
    args: Sequence,
    out_shape: tuple[int, int],
    ops: TileOps,
    grad_slots: Sequence[int],
):
    """A score_mod's value and pullback on one tile, for the backward kernels.

    args are (score, b, h, q_idx, kv_idx) tiles; grad_slots are the hoisted
    inputs that need a gradient. Returns (score [float32 tile], pullback) with
    pullback(d_score) -> (d_score_in, [(slot, flat_index, d_value), ...]): one
    entry per gather from a grad slot, d_value shaped like flat_index.
    """
    consts = _consts(program, hoisted_refs)
    loads = []
    _Evaluator(program, ops, record=loads).run(program.jaxpr, consts, list(args))
    diff = [i for i, (slot, _, _) in enumerate(loads) if slot in grad_slots]

    def score_of(score, *diff_values):
        values = [value for _, _, value in loads]
        for i, value in zip(diff, diff_values, strict=True):
            values[i] = value
        evaluator = _Evaluator(program, ops, replay=iter(values))
        (out,) = evaluator.run(program.jaxpr, consts, [score, *args[1:]])
        return _as_tile(out, out_shape).astype(jnp.float32)

    score, vjp = jax.vjp(score_of, args[0], *[loads[i][2] for i in diff])

    def pullback(d_score):
        d_in, *d_values = vjp(d_score)
        return d_in, [(loads[i][0], loads[i][1], dv) for i, dv in zip(diff, d_values, strict=True)]

    return score, pullback


def _consts(program: ModProgram, hoisted_refs: Sequence) -> list:
    shapes = zip(hoisted_refs, program.const_shapes, program.const_dtypes, strict=True)
    hoisted = [
        _Hoisted(ref, shape, slot, jnp.dtype(dtype))
        for slot, (ref, shape, dtype) in enumerate(shapes)
    ]
    return program.const_values(hoisted)


def _as_tile(out, out_shape):
    if isinstance(out, np.ndarray):
        out = out[()]
    return as_tile(_expanded(out), out_shape)


# --------------------------------------------------------------------------
# What a program loads, for choosing kernel tiles.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModLoads:
    """The gathers one evaluation of a mod makes from its captured arrays, on a tile.

    tile_bytes: bytes per score element of the gathers whose index varies with
    both q_idx and kv_idx (`table[q_idx - kv_idx]`): each is a [BM, BN] load
    per tile, and Triton's pipeliner buffers it in shared memory next to K
    and V, num_stages deep. vector_loads: gathers indexed by q_idx or kv_idx
    alone (`document_id[q_idx]`), [BM, 1] or [1, BN] per tile.
    """

    tile_bytes: int = 0
    vector_loads: int = 0

    def __add__(self, other: ModLoads) -> ModLoads:
        return ModLoads(self.tile_bytes + other.tile_bytes, self.vector_loads + other.vector_loads)


NO_LOADS = ModLoads()


class _ShapeRef:
    """Stands in for a hoisted ref outside a kernel: records each gather's shape."""

    def __init__(self, dtype, sink: list):
        self.dtype, self.sink = jnp.dtype(dtype), sink

    def __getitem__(self, flat):
        shape = jnp.shape(flat)
        self.sink.append((shape, self.dtype.itemsize))
        return jnp.zeros(shape, self.dtype)


@functools.lru_cache(maxsize=256)
def mod_loads(program: ModProgram | None) -> ModLoads:
    """Evaluate `program` abstractly on a [2, 3] tile and classify its gathers."""
    if program is None:
        return NO_LOADS
    sink: list = []
    refs = [_ShapeRef(kernel_dtype(dtype), sink) for dtype in program.const_dtypes]
    i32 = jnp.int32
    args = (i32(0), i32(0), jnp.zeros((2, 1), i32), jnp.zeros((1, 3), i32))
    if program.is_score_mod:
        args = (jnp.zeros((2, 3), jnp.float32), *args)
    jax.eval_shape(lambda: eval_mod(program, refs, args, (2, 3), TileOps()))
    tile = sum(size for shape, size in sink if shape == (2, 3))
    vectors = sum(1 for shape, _ in sink if shape in ((2, 1), (1, 3)))
    return ModLoads(tile, vectors)
