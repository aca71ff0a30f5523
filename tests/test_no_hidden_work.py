"""No hidden copies of q/k/v, and no hidden retraces: structural checks on what a call builds.

* Ragged lengths and head dims that are not powers of 2 are bounded loads in
  the launchers, not `jnp.pad` copies: the jaxpr of a call has no pad, copy,
  concatenate, transpose or slice of an array the size of q, k, v or out.
* A BlockMask rebuilt every step from a new closure over new values of the
  same shapes is the same pytree structure: the user's jit traces once, and
  create_block_mask reuses its compiled builder.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_qkv

import flexjax as fj
from flexjax import mask_builders, masks
from flexjax.reference import flex_attention_reference

# Primitives that copy or rearrange an array; none may touch q/k/v/out-sized arrays.
_COPIES = {
    "pad", "copy", "copy_p", "concatenate", "transpose", "dynamic_update_slice",
    "slice", "dynamic_slice", "gather", "scatter", "scatter-add", "rev",
}  # fmt: skip


def equations(jaxpr):
    """Every equation of a jaxpr and its sub-jaxprs, except inside kernels (there all is tiles)."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name == "pallas_call":
            continue
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from equations(inner)


def copies_of_big_arrays(jaxpr, min_size: int):
    """(primitive, shapes) of every copying equation that touches >= min_size elements."""
    found = []
    for eqn in equations(jaxpr):
        if eqn.primitive.name in _COPIES:
            shapes = [v.aval.shape for v in (*eqn.invars, *eqn.outvars) if hasattr(v.aval, "shape")]
            if any(int(np.prod(s)) >= min_size for s in shapes):
                found.append((eqn.primitive.name, shapes))
    return found


@pytest.mark.parametrize("L", [1, 77])  # the decode kernel, and the regular forward
def test_no_copy_of_q_k_v_for_ragged_lengths_and_head_dims(L):
    q, k, v = random_qkv(0, 1, 8, L, 4097, 80)
    bm = fj.create_block_mask(lambda b, h, qi, kv: kv <= qi + 4097 - L, 1, 1, L, 4097)
    jaxpr = jax.make_jaxpr(lambda q, k, v: fj.flex_attention(q, k, v, block_mask=bm))(q, k, v)
    assert copies_of_big_arrays(jaxpr.jaxpr, min(q.size, 8 * 4097)) == []
    assert any(e.primitive.name == "pallas_call" for e in equations(jaxpr.jaxpr))


def test_no_copy_in_the_backward_either():
    q, k, v = random_qkv(1, 1, 4, 77, 301, 80, Ev=40)
    bm = fj.create_block_mask(masks.causal_mask, 1, 1, 77, 301, BLOCK_SIZE=64)

    def loss(q, k, v):
        out, lse = fj.flex_attention(q, k, v, block_mask=bm, return_lse=True)
        return jnp.sum(out * out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert copies_of_big_arrays(jaxpr.jaxpr, q.size // 2) == []
    got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    def ref_loss(q, k, v):
        out, lse = flex_attention_reference(q, k, v, block_mask=bm, return_lse=True)
        return jnp.sum(out * out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    for g, w in zip(got, jax.grad(ref_loss, argnums=(0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_a_block_mask_from_a_new_closure_does_not_retrace_the_users_jit():
    L = 64
    q, k, v = random_qkv(2, 1, 2, L, L, 16)
    traces = []

    @jax.jit
    def step(q, k, v, block_mask):
        traces.append(1)  # runs only while tracing
        return fj.flex_attention(q, k, v, block_mask=block_mask)

    builds = mask_builders._block_tables._cache_size()
    for seed in range(3):
        lengths = np.random.default_rng(seed).multinomial(L - 3, [1 / 3] * 3) + 1
        doc_ids = masks.document_id_from_lengths([int(n) for n in lengths])
        bm = fj.create_block_mask(masks.generate_doc_mask_mod(doc_ids), 1, 1, L, L, BLOCK_SIZE=16)
        out = step(q, k, v, bm)
        want = flex_attention_reference(q, k, v, block_mask=bm)
        np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
    assert len(traces) == 1
    assert mask_builders._block_tables._cache_size() <= builds + 1  # one builder for the three
    assert len(jax.tree.leaves(bm)) == 8 + 1  # the tables and the captured document ids
