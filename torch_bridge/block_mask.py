"""Convert a PyTorch BlockMask into a flexjax one, sharing memory through DLPack.

torch's mask_mod is a torch function that JAX cannot run; a mask with partial
blocks therefore needs its jnp equivalent (`mask_mod=`). Full and empty blocks
need none. The jnp mask_mod may capture torch tensors: they become jax arrays
(shared through DLPack) before flexjax traces it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import torch

from flexjax import BlockMask, noop_mask
from pallas_kernels.spec import BlockTables
from torch_bridge.mods import with_jax_arrays

__all__ = ["from_torch_block_mask"]

_TABLES = BlockTables._fields


def _to_jax(t: torch.Tensor | None) -> jax.Array | None:
    if t is None:
        return None
    return jax.dlpack.from_dlpack(t.detach().contiguous())


def from_torch_block_mask(block_mask, mask_mod: Callable | None = None) -> BlockMask:
    """flexjax BlockMask with the same tables as torch's `block_mask` (zero-copy where possible).

    mask_mod: the jnp mask_mod equal to torch's one; required when the mask has
    partial blocks, since those are decided element by element.
    """
    if not isinstance(getattr(block_mask, "kv_num_blocks", None), torch.Tensor):
        raise TypeError(
            f"block_mask must be a torch.nn.attention.flex_attention.BlockMask, "
            f"got {type(block_mask).__name__}"
        )
    tables = {name: getattr(block_mask, name) for name in _TABLES}
    if mask_mod is None:
        if bool((tables["kv_num_blocks"] > 0).any()):
            raise ValueError(
                "block_mask has partial blocks, so flexjax needs its mask_mod as a jnp function: "
                "pass mask_mod= (torch's own mask_mod cannot run inside JAX)"
            )
        mask_mod = noop_mask
    converted = {name: _to_jax(t) for name, t in tables.items()}
    return BlockMask(
        tuple(int(n) for n in block_mask.seq_lengths),
        *(converted[name] for name in _TABLES),
        BLOCK_SIZE=tuple(int(n) for n in block_mask.BLOCK_SIZE),
        mask_mod=with_jax_arrays(mask_mod),
    )
