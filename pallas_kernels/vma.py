"""Varying manual axes: typing what the kernels take and return inside `jax.shard_map`.

Inside a shard_map with `check_vma=True` every value carries the set of mesh
axes it varies over, and a `pallas_call` must say it for its outputs
(`ShapeDtypeStruct(..., manual_axis_type=...)`). The kernels' outputs vary
over the union of their operands' axes. At the custom_vjp boundary
(`dispatch.attention`) every operand is cast to that union, so each
cotangent comes back with its primal's type: the cast's transpose is the
`psum` that a replicated k/v (batch broadcast) or a captured array (a
learnable bias) needs across the shards. Outside shard_map all sets are
empty and all of this is a no-op.
"""

from __future__ import annotations

import jax

__all__ = ["cast_varying", "out_struct", "varying_axes"]


def varying_axes(*trees) -> frozenset:
    """The union of the manual axes the arrays in `trees` vary over (empty outside shard_map)."""
    axes = frozenset()
    for leaf in jax.tree.leaves(trees):
        mat = getattr(jax.typeof(leaf), "manual_axis_type", None)
        if mat is not None:
            axes |= mat.varying
    return axes


def cast_varying(tree, axes: frozenset):
    """Every array of `tree` made varying over `axes` (a no-op for those that already are)."""
    if not axes:
        return tree

    def cast(x):
        missing = axes - varying_axes(x)
        return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x

    return jax.tree.map(cast, tree)


def out_struct(shape, dtype, axes: frozenset) -> jax.ShapeDtypeStruct:
    """A kernel output's type: varying over `axes` (the operands' union)."""
    if not axes:
        return jax.ShapeDtypeStruct(shape, dtype)
    mat = jax.sharding.ManualAxisType(varying=frozenset(axes))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
