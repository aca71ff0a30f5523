"""A mod's signature: what decides its traced program, read without tracing it.

Tracing a mod (`mod_trace.trace_mod`) costs milliseconds, mostly in jnp's
indexing, and an everyday loop traces a new closure every step
(`lambda b, h, q, kv: doc[q] == doc[kv]` over this batch's `doc`). The
program depends only on the mod's code and on what the code can see: its
closure cells, defaults and the globals it names. Arrays there only matter
by shape and dtype (they become kernel inputs); Python and numpy scalars,
strings and tuples by value (they are baked in as literals); a user's
module, global or captured, by the attributes the code may read from it
(`settings.window`, `cfg.model.window`), keyed like any value; library
modules (jax, numpy, ...) by name; classes, builtins and jitted functions
by identity; plain functions by their own signature, recursively. A
captured array the trace does not take as an input (the mod read its
value, `int(n[0])`) keeps the mod from being cached, and the trace's
context (the abstract mesh, which a shard_map makes manual) is part of the
cache key. Anything else (an object whose attributes the mod might read)
makes the mod unkeyable, and it is traced every time, as before: a
signature is a guard, never a guess.

`signature(fn)` returns (key, arrays): a hashable key and the arrays the key
stands for, in a fixed walk order, so a cached program's captured arrays can
be picked from a new closure's arrays by position.
"""

from __future__ import annotations

import functools
import types

import jax
import numpy as np

__all__ = ["signature"]

_MAX_DEPTH = 6  # nested functions deeper than this are traced, not keyed


class _Unkeyable(Exception):
    pass


def signature(fn) -> tuple[tuple, list] | None:
    """(key, arrays) deciding fn's traced program, or None where it cannot be read safely."""
    arrays: list = []
    try:
        key = _sig(fn, arrays, 0)
    except (_Unkeyable, RecursionError, TypeError, ValueError):  # ValueError: an empty cell
        return None
    try:
        hash(key)
    except TypeError:
        return None
    return key, arrays


def _sig(v, arrays: list, depth: int, names: frozenset = frozenset()):
    """v's part of the key; names: what the code reading v may look up on it (`v.window`)."""
    if depth > _MAX_DEPTH:
        raise _Unkeyable
    if isinstance(v, jax.Array | jax.core.Tracer):
        arrays.append(v)
        aval = jax.typeof(v)  # weak type and, inside a shard_map, the axes it varies over
        return ("array", tuple(v.shape), str(v.dtype), getattr(aval, "weak_type", False),
                str(getattr(aval, "vma", "")))  # fmt: skip
    if isinstance(v, np.ndarray):
        if v.ndim == 0:  # a literal of the program
            return ("np0", str(v.dtype), v.item())
        arrays.append(v)
        return ("ndarray", v.shape, str(v.dtype))
    if isinstance(v, np.generic):
        return ("npscalar", str(v.dtype), v.item())
    if v is None or isinstance(v, bool | int | float | complex | str | bytes):
        return (type(v).__name__, v)
    if isinstance(v, tuple | list):
        return (type(v).__name__, tuple(_sig(x, arrays, depth + 1, names) for x in v))
    if isinstance(v, types.ModuleType):
        if _in_library(v.__name__):
            return ("module", v.__name__)
        # A user's module: the attributes the code may read (`settings.window`) are keyed.
        read = sorted(n for n in names if n in v.__dict__)
        return ("module", v.__name__,
                tuple((n, _sig(v.__dict__[n], arrays, depth + 1, names)) for n in read))  # fmt: skip
    if isinstance(v, types.FunctionType):
        if _in_library(getattr(v, "__module__", None) or ""):
            return ("identity", v)
        return _function_sig(v, arrays, depth)
    if isinstance(v, functools.partial):
        kw = tuple(sorted(v.keywords.items()))
        return ("partial", _sig(v.func, arrays, depth + 1), _sig(v.args, arrays, depth + 1),
                tuple((k, _sig(x, arrays, depth + 1)) for k, x in kw))  # fmt: skip
    if isinstance(v, type | types.BuiltinFunctionType | np.ufunc) or _stateless_callable(v):
        return ("identity", v)
    raise _Unkeyable


# Modules and functions of these packages are read by name or identity, not walked (jnp.where's
# own globals are JAX's internals): their behaviour is fixed by the installed version.
_LIBRARIES = frozenset({"jax", "jaxlib", "numpy", "math", "operator", "functools"})


def _in_library(module_name: str) -> bool:
    return module_name.partition(".")[0] in _LIBRARIES


def _stateless_callable(v) -> bool:
    """jax's wrapped functions (jit, custom_jvp/vjp): behaviour fixed at definition."""
    return type(v).__name__ in ("PjitFunction", "custom_jvp", "custom_vjp")


def _function_sig(fn: types.FunctionType, arrays: list, depth: int):
    names = _global_names(fn.__code__)
    sig = lambda v: _sig(v, arrays, depth + 1, names)
    cells = tuple(sig(c.cell_contents) for c in fn.__closure__ or ())
    defaults = sig(fn.__defaults__ or ())
    kwdefaults = tuple((k, sig(x)) for k, x in sorted((fn.__kwdefaults__ or {}).items()))
    globals_ = tuple((n, sig(fn.__globals__[n])) for n in sorted(names) if n in fn.__globals__)
    return ("function", fn.__code__, cells, defaults, kwdefaults, globals_)


@functools.lru_cache(maxsize=1024)
def _global_names(code: types.CodeType) -> frozenset:
    """The names code (and code nested in it: lambdas, comprehensions) may look up: globals
    and attributes (`co_names` holds both)."""
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return frozenset(names)
