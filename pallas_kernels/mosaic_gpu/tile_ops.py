"""The Mosaic GPU backend's tile operations: mods on WGMMA register tiles.

Score tiles live in the wgmma accumulator's register layout, and so do the
index tiles the kernel hands the mods (`compat.iota`), so a mod's elementwise
jnp math needs no relayout. Mosaic GPU has no gather from registers or shared
memory with an array index ("Arrays are not supported as indices"): a
captured array can be read here only at a scalar index (`slopes[h]`, a 0-d
capture), which is one load from global memory; a read at `q_idx + c` or
`kv_idx + c` is a slice the kernel staged through shared memory
(`staging`), handed to `gather` in load order as a broadcast row or column
vector. Other reads are refused by `supports` before a kernel is built.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.mod_trace import ModTraceError
from pallas_kernels.mosaic_gpu import compat
from pallas_kernels.tile_ops import IndexVector, TileOps

__all__ = ["MosaicTileOps"]


class MosaicTileOps(TileOps):
    """Tile operations for the Mosaic GPU kernels (interpret mode: plain jnp layouts)."""

    def __init__(self, interpret: bool, tile_shape: tuple[int, int]):
        self.interpret, self.tile_shape = interpret, tile_shape
        self.staged = iter(())  # the staged reads' tiles of this evaluation, in load order

    def iota(self, shape, dim):
        if tuple(shape) != self.tile_shape:
            raise ValueError(f"Mosaic GPU index tiles are {self.tile_shape}, asked for {shape}")
        return compat.iota(self.tile_shape, dim, self.interpret)

    def index(self, start, dim: int) -> IndexVector:
        """start + the tile's row (dim 0) or column (dim 1) numbers, as an `IndexVector`
        in the WGMMA tile's row or column layout: the mods' index math runs on the vector."""
        n = self.tile_shape[dim]
        return IndexVector(start + compat.iota_vector(n, dim, self.interpret), dim, self.tile_shape)

    def gather(self, ref, flat):
        """A scalar index: one load. An index tile: the next staged slice, broadcast (the
        kernel loaded it from shared memory; `staging` proved it is this read's)."""
        if not jnp.ndim(flat):
            return ref[flat]
        tile = next(self.staged, None)
        if tile is None:
            raise ModTraceError(
                "the Mosaic GPU kernel has no staged slice for a captured-array read at an "
                f"index tile of shape {jnp.shape(flat)} (a bug: supports() should refuse it)"
            )
        return tile

    def scatter_add(self, ref, flat, value) -> None:
        raise ModTraceError("the Mosaic GPU backend has no backward kernels of its own")
