"""Let jnp mods capture torch tensors: find them, and rebuild the mod with jax arrays.

A torch user's mod is still a jnp function, but the arrays it closes over are
often torch tensors (`document_id`, `offsets`, a learnable `alibi_slopes`
parameter). JAX cannot index a torch tensor with a traced index, so before
tracing we rebuild the function: same code, same globals, with every torch
tensor reachable from its closure cells, defaults, `functools.partial`
arguments, or the module globals it names replaced by a jax array (shared
through DLPack). Nested mods (`and_masks(...)`, a wrapper around another mod)
are rebuilt recursively.

`captured_tensors` lists the tensors in a stable order; `rebuild(fn,
replacements)` swaps them for given arrays, which is how the bridge makes a
captured torch parameter differentiable: the arrays become inputs of the
`jax.vjp`, and their gradients go back to the tensors.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable

import torch

from flexjax.mod_utils import mod_name
from torch_bridge.convert import tensor_to_jax

__all__ = ["captured_tensors", "jax_arrays", "rebuild", "with_jax_arrays"]


def _walk(obj, replace, memo):
    """obj with every torch.Tensor t reachable from it replaced by replace(t).

    Returns obj itself (the same object) when nothing in it changed.
    """
    key = id(obj)
    if key in memo:
        return memo[key]
    memo[key] = obj  # cycles resolve to the original
    if isinstance(obj, torch.Tensor):
        out = replace(obj)
    elif isinstance(obj, functools.partial):
        parts = (obj.func, obj.args, obj.keywords)
        new = tuple(_walk(x, replace, memo) for x in parts)
        changed = any(a is not b for a, b in zip(parts, new, strict=True))
        out = functools.partial(new[0], *new[1], **new[2]) if changed else obj
    elif isinstance(obj, types.FunctionType):
        out = _rebuild_function(obj, replace, memo)
    elif isinstance(obj, tuple | list):
        new = [_walk(x, replace, memo) for x in obj]
        changed = any(a is not b for a, b in zip(obj, new, strict=True))
        out = type(obj)(new) if changed else obj
    elif isinstance(obj, dict):
        new = {k: _walk(v, replace, memo) for k, v in obj.items()}
        out = new if any(new[k] is not v for k, v in obj.items()) else obj
    else:
        out = obj
    memo[key] = out
    return out


def _rebuild_function(fn: types.FunctionType, replace, memo):
    """fn, or a copy with new closure cells, defaults and named globals if any of them changed."""
    cells = [c.cell_contents if _bound(c) else _EMPTY for c in fn.__closure__ or ()]
    new_cells = [x if x is _EMPTY else _walk(x, replace, memo) for x in cells]
    defaults = fn.__defaults__ or ()
    new_defaults = tuple(_walk(d, replace, memo) for d in defaults)
    g = fn.__globals__
    names = [n for n in fn.__code__.co_names if n in g and _may_capture(g[n])]
    new_globals = {n: _walk(g[n], replace, memo) for n in names}
    changed = (
        any(a is not b for a, b in zip(cells, new_cells, strict=True))
        or any(a is not b for a, b in zip(defaults, new_defaults, strict=True))
        or any(new_globals[n] is not g[n] for n in names)
    )
    if not changed:
        return fn
    fn_globals = dict(g)
    fn_globals.update(new_globals)
    closure = tuple(types.CellType() if x is _EMPTY else types.CellType(x) for x in new_cells)
    out = types.FunctionType(
        fn.__code__, fn_globals, fn.__name__, new_defaults or None, closure or None
    )
    out.__kwdefaults__ = fn.__kwdefaults__
    out.__qualname__ = fn.__qualname__
    out.__module__ = fn.__module__
    return out


_EMPTY = object()


def _bound(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # a name not bound yet
        return False
    return True


def _may_capture(x) -> bool:
    return isinstance(
        x, torch.Tensor | types.FunctionType | functools.partial | tuple | list | dict
    )


def captured_tensors(fn: Callable | None) -> list[torch.Tensor]:
    """The torch tensors `fn` can reach, each once, in a stable order."""
    found: dict[int, torch.Tensor] = {}
    if fn is not None:
        _walk(fn, lambda t: found.setdefault(id(t), t), {})
    return list(found.values())


def rebuild(fn: Callable | None, replacements: dict[int, object]) -> Callable | None:
    """fn with each captured tensor t replaced by replacements[id(t)]."""
    if fn is None:
        return None
    return _walk(fn, lambda t: replacements[id(t)], {})


def jax_arrays(fn: Callable | None) -> dict[int, object]:
    """{id(tensor): a jax array sharing its memory} for each torch tensor `fn` captures."""
    return {
        id(t): tensor_to_jax(t, f"a tensor captured by {mod_name(fn)}", False)
        for t in captured_tensors(fn)
    }


def with_jax_arrays(fn: Callable | None) -> Callable | None:
    """fn with every torch tensor it captures replaced by a jax array sharing its memory."""
    arrays = jax_arrays(fn)
    return rebuild(fn, arrays) if arrays else fn
