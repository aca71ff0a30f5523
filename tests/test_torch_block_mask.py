"""torch BlockMask -> flexjax BlockMask: same tables, shared memory, same attention."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch_twins
from helpers import assert_same_tables, random_qkv
from torch.nn.attention import flex_attention as tfa

import flexjax as fj
from flexjax import masks
from flexjax.reference import flex_attention_reference
from torch_bridge import from_torch_block_mask


def test_converted_mask_has_torch_tables_and_shares_memory():
    theirs = tfa.create_block_mask(
        torch_twins.causal_mask, 2, 1, 500, 500, device="cpu", BLOCK_SIZE=64
    )
    ours = from_torch_block_mask(theirs, mask_mod=masks.causal_mask)
    assert_same_tables(ours, theirs)
    assert ours.kv_indices.unsafe_buffer_pointer() == theirs.kv_indices.data_ptr()
    native = fj.create_block_mask(masks.causal_mask, 2, 1, 500, 500, BLOCK_SIZE=64)
    q, k, v = random_qkv(0, 2, 1, 500, 500, 16)
    np.testing.assert_allclose(
        np.asarray(flex_attention_reference(q, k, v, block_mask=ours)),
        np.asarray(flex_attention_reference(q, k, v, block_mask=native)),
        rtol=1e-6,
        atol=1e-6,
    )


def test_partial_blocks_need_a_jnp_mask_mod():
    theirs = tfa.create_block_mask(torch_twins.causal_mask, 1, 1, 256, 256, device="cpu")
    with pytest.raises(ValueError, match="mask_mod="):
        from_torch_block_mask(theirs)
    with pytest.raises(TypeError, match="BlockMask"):
        from_torch_block_mask(jnp.zeros(3))
