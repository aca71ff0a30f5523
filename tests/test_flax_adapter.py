"""`flexjax.flax_nnx`: flexjax as `nnx.MultiHeadAttention`'s attention_fn.

Every comparison builds two MultiHeadAttention modules from the same seed
(identical parameters): one with the adapter and a BlockMask, one with
Flax's own attention (jax.nn's path) and the equivalent dense mask, or a
hand-written dense attention for a score_mod that jax.nn cannot express.
Outputs and gradients (parameters and inputs) are compared in float32, under
nnx.jit, nnx.grad / nnx.value_and_grad and nnx.scan over two layers; per-batch
document masks built inside the jitted step do not retrace it. Arguments the
adapter cannot honour raise, naming the argument.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

import flexjax as fj  # noqa: E402
from flexjax import flax_nnx, masks  # noqa: E402

B, T, D, N = 2, 64, 32, 2  # batch, length, features, heads (head dim 16)
BLOCK = 32
OUT_TOL = dict(atol=3e-5, rtol=3e-5)
GRAD_TOL = dict(atol=2e-4, rtol=2e-4)


def inputs(seed, shape=(B, T, D)):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def document_ids(seed, batch=B, length=T):
    """[batch, length] int32: each row cut into 2-4 documents at random points."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), size=rng.integers(1, 4), replace=False))
        rows.append(np.searchsorted(cuts, np.arange(length), side="right"))
    return jnp.asarray(np.stack(rows), jnp.int32)


def document_causal(doc):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    return mask_mod


def mha(attention_fn=None, seed=0, **kwargs):
    kwargs = {"decode": False, **kwargs}
    if attention_fn is not None:
        kwargs["attention_fn"] = attention_fn
    return nnx.MultiHeadAttention(num_heads=N, in_features=D, rngs=nnx.Rngs(seed), **kwargs)


def broadcast_indices(batch, heads, q_len, kv_len):
    return (
        jnp.arange(batch)[:, None, None, None],
        jnp.arange(heads)[None, :, None, None],
        jnp.arange(q_len)[None, None, :, None],
        jnp.arange(kv_len)[None, None, None, :],
    )


def dense_attention(score_mod, mask_mod):
    """An nnx attention_fn written out: einsum, score_mod, mask, softmax (the oracle)."""

    def attend(query, key, value, **unused):
        Bq, L, H, E = query.shape
        S = key.shape[1]
        scores = jnp.einsum("blhe,bshe->bhls", query, key, precision="highest") / np.sqrt(E)
        b, h, q_idx, kv_idx = broadcast_indices(Bq, H, L, S)
        scores = score_mod(scores, b, h, q_idx, kv_idx)
        scores = jnp.where(mask_mod(b, h, q_idx, kv_idx), scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum("bhls,bshv->blhv", probs, value, precision="highest")

    return attend


def loss_and_grads(model, x, mask):
    """nnx.value_and_grad of a weighted sum of the output, w.r.t. parameters and input."""
    w = inputs(99, (x.shape[0], x.shape[1], D))

    @nnx.jit
    def step(model, x, mask):
        def loss(model, x):
            return jnp.sum(model(x, mask=mask) * w)

        return nnx.value_and_grad(loss, argnums=(0, 1))(model, x)

    value, (grad_params, grad_x) = step(model, x, mask)
    return value, jax.tree.leaves(grad_params), grad_x


def assert_same_grads(got, want):
    value_g, params_g, x_g = got
    value_w, params_w, x_w = want
    np.testing.assert_allclose(value_g, value_w, **GRAD_TOL)
    assert len(params_g) == len(params_w) > 0
    for g, w in zip(params_g, params_w, strict=True):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, **GRAD_TOL)
    np.testing.assert_allclose(x_g, x_w, **GRAD_TOL)


def test_document_block_mask_equals_flax_with_dense_mask():
    x, doc = inputs(0), document_ids(1)
    mask_mod = document_causal(doc)
    bm = fj.create_block_mask(mask_mod, B, None, T, T, BLOCK_SIZE=BLOCK)
    dense = fj.create_mask(mask_mod, B, 1, T, T)
    ours, theirs = mha(flax_nnx.attention_fn()), mha()

    out = nnx.jit(lambda m, x, bm: m(x, mask=bm))(ours, x, bm)
    want = theirs(x, mask=dense)
    assert not np.allclose(want, theirs(x, mask=jnp.ones_like(dense)))  # the mask matters
    np.testing.assert_allclose(out, want, **OUT_TOL)
    assert_same_grads(loss_and_grads(ours, x, bm), loss_and_grads(theirs, x, dense))


def test_gqa_and_is_causal_equal_flax():
    x = inputs(2)
    kwargs = dict(num_heads=4, num_kv_heads=2, in_features=D, qkv_features=64, decode=False)
    ours = nnx.MultiHeadAttention(**kwargs, attention_fn=flax_nnx.attention_fn(), rngs=nnx.Rngs(3))
    theirs = nnx.MultiHeadAttention(**kwargs, rngs=nnx.Rngs(3))
    np.testing.assert_allclose(ours(x, is_causal=True), theirs(x, is_causal=True), **OUT_TOL)


def test_alibi_score_mod_equals_flax_with_bias():
    """ALiBi as a score_mod (captured slopes) against Flax's attention with the dense bias."""
    x = inputs(4)
    slopes = jnp.asarray([0.5, 0.125], jnp.float32)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    window = fj.and_masks(masks.causal_mask, lambda b, h, q, kv: q - kv < 24)
    bm = fj.create_block_mask(window, None, None, T, T, BLOCK_SIZE=BLOCK)
    _, h, q_idx, kv_idx = broadcast_indices(1, N, T, T)
    bias = slopes[h] * (kv_idx - q_idx)
    ours = mha(flax_nnx.attention_fn(score_mod=alibi, block_mask=bm), seed=5)
    theirs = mha(functools.partial(nnx.dot_product_attention, bias=bias), seed=5)
    dense = fj.create_mask(window, 1, 1, T, T)
    np.testing.assert_allclose(ours(x), theirs(x, mask=dense), **OUT_TOL)
    assert_same_grads(loss_and_grads(ours, x, None), loss_and_grads(theirs, x, dense))


def test_softcap_and_per_call_document_mask_equal_written_out_attention():
    x, doc = inputs(6), document_ids(7)
    cap = 0.5  # small enough to change the result visibly

    def softcap(score, b, h, q_idx, kv_idx):
        return cap * jnp.tanh(score / cap)

    mask_mod = document_causal(doc)
    bm = fj.create_block_mask(mask_mod, B, None, T, T, BLOCK_SIZE=BLOCK)
    ours = mha(flax_nnx.attention_fn(score_mod=softcap), seed=8)
    theirs = mha(dense_attention(softcap, mask_mod), seed=8)
    uncapped = mha(dense_attention(lambda s, *_: s, mask_mod), seed=8)
    np.testing.assert_allclose(ours(x, mask=bm), theirs(x), **OUT_TOL)
    assert not np.allclose(theirs(x), uncapped(x), atol=1e-3)
    assert_same_grads(loss_and_grads(ours, x, bm), loss_and_grads(theirs, x, None))


def test_document_mask_built_inside_nnx_jit_does_not_retrace():
    """The step takes doc ids, builds the BlockMask itself; new ids reuse the compiled step."""
    ours, theirs = mha(flax_nnx.attention_fn(), seed=9), mha(seed=9)
    traces = []

    @nnx.jit
    def step(model, x, doc):
        traces.append(1)
        bm = fj.create_block_mask(document_causal(doc), B, None, T, T, BLOCK_SIZE=BLOCK)
        return model(x, mask=bm)

    for seed in (10, 11):
        x, doc = inputs(seed), document_ids(seed)
        dense = fj.create_mask(document_causal(doc), B, 1, T, T)
        np.testing.assert_allclose(step(ours, x, doc), theirs(x, mask=dense), **OUT_TOL)
    assert len(traces) == 1


def test_nnx_scan_over_two_layers_with_block_mask():
    x, doc = inputs(12), document_ids(13)
    mask_mod = document_causal(doc)
    bm = fj.create_block_mask(mask_mod, B, None, T, T, BLOCK_SIZE=BLOCK)
    dense = fj.create_mask(mask_mod, B, 1, T, T)

    def stack(attention_fn):
        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            kw = {} if attention_fn is None else dict(attention_fn=attention_fn)
            return nnx.MultiHeadAttention(num_heads=N, in_features=D, decode=False, rngs=rngs, **kw)

        return make(nnx.Rngs(14))

    def run(layers, x, mask):
        @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry)
        def body(layer, h, mask):
            return h + layer(h, mask=mask)

        return body(layers, x, mask)

    ours, theirs = stack(flax_nnx.attention_fn()), stack(None)
    one_layer = run(theirs, x, dense) - x
    assert not np.allclose(run(theirs, x, dense), x + one_layer / 2)  # two layers ran
    np.testing.assert_allclose(nnx.jit(run)(ours, x, bm), run(theirs, x, dense), **OUT_TOL)

    w = inputs(15)

    @nnx.jit
    def grads(layers, x, mask):
        return nnx.grad(lambda layers: jnp.sum(run(layers, x, mask) * w))(layers)

    got, want = jax.tree.leaves(grads(ours, x, bm)), jax.tree.leaves(grads(theirs, x, dense))
    assert len(got) == len(want) > 0
    for g, w_ in zip(got, want, strict=True):
        assert g.shape[0] == 2  # stacked per layer
        np.testing.assert_allclose(g, w_, **GRAD_TOL)


def test_function_form_with_several_batch_dims():
    """Called like nnx.dot_product_attention on [b1, b2, T, N, H]: b is the flattened batch."""
    rng = np.random.default_rng(16)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 3, 32, 2, 16)), jnp.float32) for _ in range(3))
    got = flax_nnx.dot_product_attention(q, k, v, is_causal=True)
    want = nnx.dot_product_attention(q, k, v, is_causal=True)
    assert got.shape == want.shape == (2, 3, 32, 2, 16)
    np.testing.assert_allclose(got, want, **OUT_TOL)
    got3 = flax_nnx.dot_product_attention(q[0, 0], k[0, 0], v[0, 0])  # no batch dimension
    np.testing.assert_allclose(
        got3, nnx.dot_product_attention(q[0, 0], k[0, 0], v[0, 0]), **OUT_TOL
    )


def test_dropout_when_deterministic_is_honoured_not_refused():
    x = inputs(17)
    ours = mha(flax_nnx.attention_fn(), seed=18, dropout_rate=0.1)
    theirs = mha(seed=18, dropout_rate=0.1)
    np.testing.assert_allclose(
        ours(x, deterministic=True, is_causal=True),
        theirs(x, deterministic=True, is_causal=True),
        **OUT_TOL,
    )


def test_what_it_cannot_honour_raises_naming_the_argument():
    x, doc = inputs(19), document_ids(20)
    bm = fj.create_block_mask(document_causal(doc), B, None, T, T, BLOCK_SIZE=BLOCK)
    adapter = flax_nnx.attention_fn()

    with pytest.raises(TypeError, match=r"mask: expected a flexjax.BlockMask.*mask_mod"):
        mha(adapter)(x, mask=fj.create_mask(document_causal(doc), B, 1, T, T))
    with pytest.raises(NotImplementedError, match=r"dropout_rate: .*deterministic=False"):
        mha(adapter, dropout_rate=0.1)(x, mask=bm, deterministic=False, rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match=r"module: .*sow_weights"):
        mha(adapter)(x, mask=bm, sow_weights=True)
    with pytest.raises(ValueError, match=r"is_causal: .*and_masks"):
        mha(adapter)(x, mask=bm, is_causal=True)
    with pytest.raises(ValueError, match=r"mask: got a BlockMask per call.*block_mask="):
        mha(flax_nnx.attention_fn(block_mask=bm))(x, mask=bm)
    with pytest.raises(ValueError, match=r"precision: got .*DEFAULT"):
        mha(adapter, precision=jax.lax.Precision.DEFAULT)(x, mask=bm)
    with pytest.raises(TypeError, match=r"block_mask: expected a flexjax.BlockMask"):
        flax_nnx.attention_fn(block_mask=np.ones((T, T), bool))

    decoder = mha(adapter, decode=True)
    decoder.init_cache((B, T, D))
    with pytest.raises(NotImplementedError, match=r"mask: .*decode=True"):
        decoder(x[:, :1], decode=True)

    q = x.reshape(B, T, N, D // N)
    with pytest.raises(TypeError, match=r"bias: flexjax takes no dense bias.*score_mod"):
        flax_nnx.dot_product_attention(q, q, q, bias=jnp.zeros((1, N, T, T)))
    with pytest.raises(TypeError, match=r"out_sharding: .*None or False"):
        flax_nnx.dot_product_attention(q, q, q, out_sharding="dp")
    # an argument a later Flax may add, asking for nothing, is accepted
    np.testing.assert_allclose(
        flax_nnx.dot_product_attention(q, q, q, out_sharding=None, is_causal=True),
        nnx.dot_product_attention(q, q, q, is_causal=True),
        **OUT_TOL,
    )
