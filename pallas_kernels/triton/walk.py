"""The loop every kernel runs over the blocks of one BlockMask row (or column).

A row of a BlockMask lists its blocks in an index table; each block is split
into compute tiles. The obvious loop reads the table at the top of each
iteration and loads K/V (or Q/dO) from the address it gives. On Hopper that
costs a pipeline stage: Triton's software pipeliner sees a load whose address
comes from another load in the same iteration and gives the table read a
stage of its own, so with num_stages=3 the tile loads are only one iteration
ahead (measured with ncu on the noop forward: two shared-memory buffers
instead of three, and a wait for *all* outstanding copies at the top of every
iteration, `DEPBAR.LE SB0, 0x0`).

So, as torch's FlexAttention template does, the tile start is a loop-carried
value: each iteration reads the table entry of the *next* tile and hands its
start to the following iteration. The tile loads then depend only on the loop
carry, and the pipeliner keeps num_stages - 1 of them in flight.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.triton.launch import div_static, rem_static

__all__ = ["walk_tiles"]


def walk_tiles(idx_ref, lead: tuple, first, last, block_size: int, tile: int, body, carry):
    """carry = body(start, carry) for the tiles first..last-1 of the blocks idx_ref[*lead, :] lists.

    Tile `it` is tile `it % (block_size // tile)` of the block
    idx_ref[*lead, it // (block_size // tile)]; `start` is its first row
    (block * block_size + sub * tile). The entry after the last listed one is
    read clamped to the table (its start is computed, never used).
    """
    tiles_per_block = block_size // tile
    last_col = idx_ref.shape[-1] - 1

    def start_of(it):
        j = jnp.minimum(div_static(it, tiles_per_block), last_col)
        return idx_ref[(*lead, j)] * block_size + rem_static(it, tiles_per_block) * tile

    def step(it, state):
        start, carry = state
        return start_of(it + 1), body(start, carry)

    _, carry = lax.fori_loop(first, last, step, (start_of(first), carry))
    return carry
