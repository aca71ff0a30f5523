"""Small jaxpr values as numpy object arrays: the shape ops both mod walkers share.

A mod is traced on scalars, but its jaxpr may build small non-scalar values
(an index vector for a gather, a row such as `intervals[i]`). The tile
evaluator (`mod_eval`, whose elements are tiles) and the index-range walker
(`index_ranges`, whose elements are intervals) both hold such a value as a
numpy object array of their elements and move them with the same static
shape ops, here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["as_obj", "shape_op"]


def as_obj(x) -> np.ndarray:
    """A value as a numpy object array of elements (a scalar: a 0-d one)."""
    if isinstance(x, np.ndarray) and x.dtype == object:
        return x
    out = np.empty((), dtype=object)
    out[()] = x
    return out


def shape_op(name: str, objs: list, params: dict, element: Callable):
    """The result of shape op `name` on object arrays, or None if `name` is not one.

    element(value, dtype): the walker's element for an iota's integer `value`.
    """
    p = params
    if name == "broadcast_in_dim":
        src = [1] * len(p["shape"])
        for i, d in enumerate(p["broadcast_dimensions"]):
            src[d] = objs[0].shape[i]
        return np.broadcast_to(objs[0].reshape(src), p["shape"]).copy()
    if name == "reshape":
        return objs[0].reshape(p["new_sizes"])
    if name == "squeeze":
        return np.squeeze(objs[0], axis=tuple(p["dimensions"]))
    if name == "expand_dims":
        return np.expand_dims(objs[0], p["dimensions"])
    if name == "concatenate":
        return np.concatenate([o if o.ndim else o.reshape(1) for o in objs], p["dimension"])
    if name == "slice":
        strides = p["strides"] or (1,) * objs[0].ndim
        bounds = zip(p["start_indices"], p["limit_indices"], strides, strict=True)
        return objs[0][tuple(slice(s, e, st) for s, e, st in bounds)]
    if name == "transpose":
        return np.transpose(objs[0], p["permutation"])
    if name == "iota":
        out = np.empty(p["shape"], dtype=object)
        for pos in np.ndindex(*p["shape"]):
            out[pos] = element(pos[p["dimension"]], p["dtype"])
        return out
    return None
