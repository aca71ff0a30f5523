"""flexjax: FlexAttention for JAX (PyTorch's API, Pallas kernels)."""

from flexjax.api import flex_attention
from flexjax.block_mask import DEFAULT_SPARSE_BLOCK_SIZE, BlockMask
from flexjax.jax_layout import dot_product_attention
from flexjax.mask_builders import create_block_mask, create_mask
from flexjax.mod_utils import and_masks, noop_mask, or_masks

__all__ = [
    "DEFAULT_SPARSE_BLOCK_SIZE",
    "BlockMask",
    "and_masks",
    "create_block_mask",
    "create_mask",
    "dot_product_attention",
    "flex_attention",
    "noop_mask",
    "or_masks",
]
