"""Mods as data: a user's score_mod / mask_mod traced once into a hashable program.

Pallas refuses kernels that close over arrays, and a mod usually does
(`document_id[q_idx]`, `alibi[h]`, `intervals[image_idx][0]`). `trace_mod`
traces the mod once on *scalar* int32 indices (its PyTorch semantics) into a
jaxpr. Every captured JAX array -- of any rank, 0-d included (a `temperature`
that changes each step) -- and every captured numpy array of rank >= 1 is
*hoisted*: kept aside as data. Python and numpy scalars are constants the
user wrote down and are baked in as literals. The
jaxpr without its hoisted consts is a `ModProgram`, hashed by its printed
jaxpr and the consts' shapes and dtypes, so

* two mods with the same code and const shapes share one compiled kernel,
  whatever the captured values (the hoisted arrays are kernel inputs);
* a BlockMask is its tables and captured arrays (pytree leaves) plus its
  program (static aux data): rebuilt each step from a new closure over new
  values of the same shapes, it is the same pytree structure, and a user's
  `jax.jit` does not retrace;
* `ModProgram.bind(consts)` turns a program and its arrays back into an
  ordinary scalar mod (for the dense reference and `create_mask`).

Evaluating a program on tiles inside a kernel is `mod_eval`'s job.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from pallas_kernels.mod_signature import signature

__all__ = ["ModProgram", "ModTraceError", "indices_read", "mod_name", "trace_mod"]


class ModTraceError(TypeError):
    """A mod uses something the kernels cannot evaluate per tile."""


def mod_name(fn) -> str:
    """A mod's name for messages: its qualified name, else its repr."""
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


@dataclasses.dataclass(frozen=True, eq=False)
class ModProgram:
    """A mod's jaxpr with its captured arrays removed (they are kernel inputs).

    Equality and hashing use the printed jaxpr and the const avals, so it can
    be a static argument of jax.jit: same code, new captured values -> cache hit.
    """

    name: str
    is_score_mod: bool
    jaxpr: jex_core.Jaxpr
    # One per constvar: ("literal", value) baked in, or ("hoisted", k): captured array k.
    const_slots: tuple
    const_shapes: tuple[tuple[int, ...], ...]
    const_dtypes: tuple[str, ...]
    key: str

    def __eq__(self, other):
        return isinstance(other, ModProgram) and self.key == other.key

    def __hash__(self):
        return hash(self.key)

    def const_values(self, hoisted: Sequence) -> list:
        """The jaxpr's const values: literals from the program, hoisted ones from `hoisted`."""
        return [val[()] if kind == "literal" else hoisted[val] for kind, val in self.const_slots]

    def bind(self, consts: Sequence) -> Callable:
        """The scalar mod this program computes with captured arrays `consts` (original shapes)."""
        if len(consts) != len(self.const_shapes):
            raise ValueError(
                f"{self.name}: the program captures {len(self.const_shapes)} arrays, "
                f"got {len(consts)}"
            )
        closed = jex_core.ClosedJaxpr(self.jaxpr, self.const_values(consts))
        run = jex_core.jaxpr_as_fun(closed)

        if self.is_score_mod:

            def mod(score, b, h, q_idx, kv_idx):
                return run(score, b, h, q_idx, kv_idx)[0]

        else:

            def mod(b, h, q_idx, kv_idx):
                return run(b, h, q_idx, kv_idx)[0]

        mod.__qualname__ = mod.__name__ = self.name
        return mod


# Programs by mod signature (`mod_signature`): a new closure of known code and
# known captured shapes skips tracing. Bounded, least recently used out first.
_BY_SIGNATURE: collections.OrderedDict = collections.OrderedDict()
_BY_SIGNATURE_SIZE = 512


def trace_mod(fn: Callable, is_score_mod: bool) -> tuple[ModProgram, list[jax.Array]]:
    """Trace `fn` on scalars; return its program and its hoisted arrays (original shapes).

    A mod whose signature was traced before is not traced again: its program
    comes from the cache and its arrays from the new closure.
    """
    sig = signature(fn)
    if sig is not None:
        # The context mesh is part of what a trace sees (inside a shard_map, avals carry it).
        key, arrays = (is_score_mod, jax.sharding.get_abstract_mesh(), sig[0]), sig[1]
        hit = _BY_SIGNATURE.get(key)
        if hit is not None:
            _BY_SIGNATURE.move_to_end(key)
            program, places = hit
            return program, [_as_jax(arrays[i]) for i in places]
    program, raw = _trace(fn, is_score_mod)
    if sig is not None:
        places = [next((i for i, a in enumerate(arrays) if a is r), None) for r in raw]
        # Every hoisted array is one the signature found, and every array it found is an
        # input (one the trace read a value from would be baked into the program).
        if None not in places and len(set(places)) == len(arrays):
            _BY_SIGNATURE[key] = (program, places)
            if len(_BY_SIGNATURE) > _BY_SIGNATURE_SIZE:
                _BY_SIGNATURE.popitem(last=False)
    return program, [_as_jax(r) for r in raw]


def _as_jax(x):
    """x as a jax array (numpy arrays converted; jax arrays and tracers as they are: cheaper)."""
    return x if isinstance(x, jax.Array | jax.core.Tracer) else jnp.asarray(x)


def _trace(fn: Callable, is_score_mod: bool) -> tuple[ModProgram, list]:
    """The program of fn and its hoisted consts as the trace found them (not yet jax arrays)."""
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    args = (i32,) * 4
    if is_score_mod:
        args = (jax.ShapeDtypeStruct((), jnp.float32),) + args
    closed = jax.make_jaxpr(fn)(*args)
    hoisted, slots = [], []
    for val in closed.consts:
        if np.ndim(val) == 0 and not isinstance(val, jax.Array):
            slots.append(("literal", np.asarray(val)))  # Python / numpy scalars are baked in
        else:
            slots.append(("hoisted", len(hoisted)))
            hoisted.append(val)
    shapes = tuple(tuple(np.shape(c)) for c in hoisted)
    dtypes = tuple(str(_as_jax(c).dtype) for c in hoisted)
    literals = ";".join(f"{v.dtype}:{v.tolist()}" for kind, v in slots if kind == "literal")
    key = f"{is_score_mod}|{shapes}|{dtypes}|{literals}|{closed.jaxpr}"
    program = ModProgram(
        mod_name(fn), is_score_mod, closed.jaxpr, tuple(slots), shapes, dtypes, key
    )
    return program, hoisted


def indices_read(program: ModProgram | None) -> set[int]:
    """Which of (b, h, q_idx, kv_idx) -- 0 to 3 -- a program reads (conservatively: any use)."""
    if program is None:
        return set()
    index_vars = program.jaxpr.invars[-4:]
    read = {id(v) for eqn in program.jaxpr.eqns for v in eqn.invars}
    read |= {id(v) for v in program.jaxpr.outvars}
    return {i for i, v in enumerate(index_vars) if id(v) in read}
