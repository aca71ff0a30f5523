"""walk_tiles: the tile order and starts every kernel's block loop uses (interpret mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels.triton.walk import walk_tiles


def visited(row, first, last, block_size, tile):
    """The starts walk_tiles hands its body for tiles first..last-1 of the table row `row`."""
    n_max = 16

    def kernel(idx_ref, out_ref):
        out_ref[...] = jnp.full((n_max,), -1, jnp.int32)

        def body(start, count):
            out_ref[pl.ds(count, 1)] = jnp.full((1,), start, jnp.int32)
            return count + 1

        walk_tiles(idx_ref, (0,), first, last, block_size, tile, body, jnp.int32(0))

    table = jnp.asarray([row], jnp.int32)
    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((n_max,), jnp.int32), interpret=True
    )(table)
    out = np.asarray(out)
    return list(out[out >= 0])


def expected(row, first, last, block_size, tile):
    per = block_size // tile
    return [row[it // per] * block_size + (it % per) * tile for it in range(first, last)]


@pytest.mark.parametrize(
    "row, first, last, block_size, tile",
    [
        ([3, 0, 5, 2], 0, 6, 8, 4),  # 3 listed blocks of 2 tiles, in the table's order
        ([3, 0, 5, 2], 2, 5, 8, 4),  # a middle range (the decode kernel's splits)
        ([3, 0, 5, 2], 0, 8, 8, 4),  # every column listed: the read past the end is clamped
        ([7, 1], 0, 2, 16, 16),  # one tile per block
        ([4, 2, 9], 0, 12, 16, 4),  # four tiles per block
        ([3, 0, 5, 2], 3, 3, 8, 4),  # empty range: the body never runs
    ],
)
def test_walk_visits_the_listed_blocks_tile_by_tile(row, first, last, block_size, tile):
    assert visited(row, first, last, block_size, tile) == expected(
        row, first, last, block_size, tile
    )
