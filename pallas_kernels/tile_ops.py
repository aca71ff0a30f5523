"""Tile operations: the part of the shared kernel code that each backend supplies.

The mod evaluator (`mod_eval`), the score pipeline (`score_tile`) and the
online softmax (`softmax`) are written once, over tiles. Where a backend has
its own way to do something -- build an index tile, gather from a captured
array, scatter-add a gradient, an approximate exp2 or tanh -- they call a
`TileOps`. This base class is plain jnp: exact math, sequential
read-modify-writes. It is what every kernel runs in Pallas' interpret mode,
and what a backend's GPU ops must agree with (to rounding).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax

__all__ = ["IndexVector", "TileOps", "as_tile"]


@dataclasses.dataclass(frozen=True)
class IndexVector:
    """An index tile that varies along one dim only, held as that dim's vector.

    A kernel whose index tiles would be whole register tiles (Mosaic GPU's
    WGMMA layout has no [BM, 1] shape) hands q_idx / kv_idx to the mods this
    way: the evaluator (`mod_eval`) keeps elementwise math on one kind of
    vector (and scalars) on the vector -- `q_idx // W`, `q_idx % W` cost a
    row's worth of work, not a tile's -- and `expand`s a value to the tile
    where it meets the other index or anything else.
    """

    value: Any  # 1-D: the tile's shape[dim] indices
    dim: int  # the tile dim it runs along
    shape: tuple[int, int]  # the tile's
    bound: int | None = None  # a static bound on |value| (None: unknown), for exact rewrites

    def map(self, fn, bound: int | None = None) -> IndexVector:
        """fn of the vector; `bound` bounds the result's magnitude (None: unknown)."""
        return dataclasses.replace(self, value=fn(self.value), bound=bound)

    def expand(self):
        return lax.broadcast_in_dim(self.value, self.shape, [self.dim])


def as_tile(x, shape):
    """x (an `IndexVector`, a scalar or a broadcastable array) as a tile of `shape`."""
    if isinstance(x, IndexVector):
        return x.expand()
    x = jnp.asarray(x)
    return x if x.shape == tuple(shape) else jnp.broadcast_to(x, shape)


class TileOps:
    """Plain-jnp tile operations (interpret mode, and the semantics every backend keeps)."""

    def iota(self, shape: tuple[int, ...], dim: int):
        """int32 tile of `shape` counting along `dim` (an index tile: q_idx, kv_idx)."""
        return lax.broadcasted_iota(jnp.int32, shape, dim)

    def gather(self, ref, flat):
        """ref[flat]: a captured array's elements at flat indices (a tile or a scalar)."""
        return ref[flat]

    def scatter_add(self, ref, flat, value) -> None:
        """ref[flat] += value with repeated indices summed (captured-array gradients).

        In interpret mode programs run one after another, so a read-modify-write
        is exact and deterministic.
        """
        ref[...] = ref[...].at[flat].add(value.astype(ref.dtype))

    def tanh_approx(self, x):
        """tanh for `flexjax.mods.tanh_approx` (a backend may use a faster approximation)."""
        return jnp.tanh(x)

    def exp2(self, x):
        return jnp.exp2(x)

    def exp2_fma(self, s, c: float, sub):
        """2^(s * c - sub): a score tile s, a static c, sub broadcast over s's rows or columns."""
        return jnp.exp2(s * c - sub)
