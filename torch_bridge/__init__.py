"""torch_bridge: PyTorch tensors through flexjax's kernels, with autograd (imports torch; flexjax does not).

    from torch_bridge import flex_attention, create_block_mask
    out = flex_attention(q, k, v, score_mod=jnp_score_mod, block_mask=bm)  # torch in, torch out
    out.sum().backward()                                                    # q.grad, k.grad, v.grad

Tensors cross to JAX and back through DLPack without copies; mods stay jnp
functions and may capture torch tensors.
"""

from flexjax.mod_utils import register_mod_converter
from torch_bridge.attention import create_block_mask, flex_attention
from torch_bridge.block_mask import from_torch_block_mask
from torch_bridge.convert import array_to_torch, tensor_to_jax
from torch_bridge.mods import with_jax_arrays

# flexjax traces mods; ones capturing torch tensors get jax arrays (DLPack, shared) first.
register_mod_converter(with_jax_arrays)

__all__ = [
    "array_to_torch",
    "create_block_mask",
    "flex_attention",
    "from_torch_block_mask",
    "tensor_to_jax",
]
