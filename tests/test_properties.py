"""Property tests: random masks, lengths and block sizes give PyTorch's tables."""

import jax.numpy as jnp
import numpy as np
import torch
from helpers import assert_same_tables
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention import flex_attention as tfa

import flexjax as fj
from flexjax.reference import kept_elements


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    q_len=st.integers(1, 200),
    kv_len=st.integers(1, 200),
    q_bs=st.sampled_from([8, 16, 32, 64, 128]),
    kv_bs=st.sampled_from([8, 16, 32, 64, 128]),
    density=st.floats(0.0, 1.0),
    block_density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_masks_match_torch(q_len, kv_len, q_bs, kv_bs, density, block_density, seed):
    rng = np.random.default_rng(seed)
    # Element noise plus whole blocks switched on, so full blocks occur too.
    dense = rng.random((q_len, kv_len)) < density
    on = rng.random((-(-q_len // q_bs), -(-kv_len // kv_bs))) < block_density
    dense |= np.kron(on, np.ones((q_bs, kv_bs), bool))[:q_len, :kv_len]
    captured_jnp, captured_torch = jnp.asarray(dense), torch.from_numpy(dense.copy())

    def ours_mod(b, h, q, kv):
        return captured_jnp[q, kv]

    def torch_mod(b, h, q, kv):
        return captured_torch[q, kv]

    ours = fj.create_block_mask(ours_mod, 1, 1, q_len, kv_len, BLOCK_SIZE=(q_bs, kv_bs))
    theirs = tfa.create_block_mask(
        torch_mod, 1, 1, q_len, kv_len, device="cpu", BLOCK_SIZE=(q_bs, kv_bs)
    )
    assert_same_tables(ours, theirs)
    np.testing.assert_array_equal(np.asarray(kept_elements(ours, 1, 1, q_len, kv_len))[0, 0], dense)
