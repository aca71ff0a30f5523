"""Score_mods that scale with the score: kernels apply them to raw scores (`mod_scaling`).

The classification is checked against the definition, f(c s) = c f(s) for
c > 0, on random scores; a forward and its gradients (captured arrays too)
against the float32 reference, at a non-default scale, through every backend.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_qkv
from jax import lax
from test_flex_attention_grad import assert_grads_close, grads_both

import flexjax as fj
from flexjax import masks, mods
from flexjax.examples import EXAMPLES
from flexjax.reference import flex_attention_reference
from pallas_kernels.mod_scaling import scales_with_score
from pallas_kernels.mod_trace import trace_mod
from pallas_kernels.softmax import LOG2E, mod_score_units

TEMPERATURE = jnp.asarray([0.5, 1.5, 2.0, 3.0], jnp.float32)
INF = jnp.float32(jnp.inf)

SCALING = {  # name: (score_mod, scales with the score)
    "identity": (mods.noop, True),
    "causal_bias": (mods.causal_bias, True),
    "checkerboard": (mods.checkerboard, True),
    "temperature": (lambda s, b, h, q, kv: s * TEMPERATURE[h], True),
    "divided": (lambda s, b, h, q, kv: s / (h + 1.0), True),
    "negated_window": (lambda s, b, h, q, kv: jnp.where(q - kv < 4, -s, 0.0), True),
    "max_with_-inf": (lambda s, b, h, q, kv: jnp.maximum(s, -jnp.inf), True),
    "checkpointed": (lambda s, b, h, q, kv: jax.checkpoint(lambda x: x * 2.0)(s), True),
    "nn_relu": (lambda s, b, h, q, kv: jax.nn.relu(s), False),  # custom_jvp: not walked
    "alibi": (mods.generate_alibi_bias(4), False),
    "alibi_functional": (mods.generate_alibi_functional(4), False),
    "softcap": (mods.generate_tanh_softcap(20.0), False),
    "relative_positional": (mods.relative_positional, False),
    "plus_one": (lambda s, b, h, q, kv: s + 1.0, False),
    "squared": (lambda s, b, h, q, kv: s * s, False),
    "relu": (lambda s, b, h, q, kv: jnp.where(s > 0, s, 0.0), False),
    "floored": (lambda s, b, h, q, kv: s.astype(jnp.int32).astype(jnp.float32), False),
    "constant": (lambda s, b, h, q, kv: jnp.float32(2.0) + 0.0 * q, False),
    # -inf through bool is 1.0, through int32 a large number: no longer 0 or inf.
    "inf_as_bool": (lambda s, b, h, q, kv: s + (-INF).astype(bool).astype(jnp.float32), False),
    "inf_as_int": (lambda s, b, h, q, kv: s + jnp.abs(-INF).astype(jnp.int32) * 1.0, False),
    # A raw score (1/scale times the natural one) can overflow float16 where it does not.
    "through_float16": (lambda s, b, h, q, kv: s.astype(jnp.float16).astype(jnp.float32), False),
    "reduce_precision": (lambda s, b, h, q, kv: lax.reduce_precision(s, 5, 2), False),
}


def _program(score_mod):
    return trace_mod(score_mod, True)[0]


def _homogeneous(score_mod, seed=0) -> bool:
    """f(c s) == c f(s) on random scores, indices and c > 0 (to float32 rounding)."""
    rng = np.random.default_rng(seed)
    n = 256
    s = jnp.asarray(rng.standard_normal(n) * 4, jnp.float32)
    b, h = (jnp.asarray(rng.integers(0, 4, n), jnp.int32) for _ in range(2))
    q, kv = (jnp.asarray(rng.integers(0, 64, n), jnp.int32) for _ in range(2))
    f = jax.vmap(score_mod)
    for c in (0.125, 0.3, 7.0):
        lhs, rhs = np.asarray(f(c * s, b, h, q, kv)), np.asarray(c * f(s, b, h, q, kv))
        same_inf = np.array_equal(np.isinf(lhs), np.isinf(rhs))
        finite = np.isfinite(rhs)
        if not same_inf or not np.allclose(lhs[finite], rhs[finite], rtol=1e-5, atol=1e-6):
            return False
    return True


@pytest.mark.parametrize("name", list(SCALING))
def test_scales_with_score_classifies_mods(name):
    score_mod, expected = SCALING[name]
    assert scales_with_score(_program(score_mod)) is expected
    if expected:
        assert _homogeneous(score_mod)


@pytest.mark.parametrize("name", [n for n in EXAMPLES if EXAMPLES[n].case("small").score_mod])
def test_catalogue_mods_said_to_scale_do_scale(name):
    case = EXAMPLES[name].case("small", H=4)
    if scales_with_score(_program(case.score_mod)):
        assert _homogeneous(case.score_mod)


def test_units_fold_the_scale_only_for_mods_that_scale():
    scale, folded, natural = 0.3, (1.0, 0.3 * LOG2E), (0.3, LOG2E)
    temperature = _program(SCALING["temperature"][0])
    assert mod_score_units(scale, None) == folded
    assert mod_score_units(scale, _program(mods.causal_bias)) == folded
    assert mod_score_units(scale, temperature) == folded
    assert mod_score_units(scale, temperature, captured_grads=True) == natural
    assert mod_score_units(scale, _program(mods.generate_alibi_bias(4))) == natural
    assert mod_score_units(-scale, _program(mods.noop)) == (-scale, LOG2E)  # c > 0 only


def test_mask_mods_are_refused():
    with pytest.raises(ValueError, match="mask_mod"):
        scales_with_score(trace_mod(masks.causal_mask, False)[0])


@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("name", ["causal_bias", "checkerboard", "temperature"])
def test_scaling_mods_forward_and_gradients(flex, name, scale):
    score_mod = SCALING[name][0]
    B, H, L, S, E = 2, 4, 96, 80, 24  # (scale 1/sqrt(24): raw and natural units round apart)
    assert mod_score_units(scale or E**-0.5, _program(score_mod))[0] == 1.0  # the raw path
    q, k, v = random_qkv(4, B, H, L, S, E)
    bm = fj.create_block_mask(masks.causal_mask, 1, 1, L, S, BLOCK_SIZE=32)
    out, lse = flex(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, return_lse=True)
    want, want_lse = flex_attention_reference(
        q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, return_lse=True
    )
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), atol=2e-5, rtol=0)
    if name == "temperature":  # the captured temperature's gradient needs natural scores
        extra = (TEMPERATURE,)
        make_kw = lambda t: dict(score_mod=lambda s, b, h, q, kv: s * t[h])
        ours, ref = grads_both(
            flex, q, k, v, argnums=(0, 1, 2, 3), extra=extra, make_kw=make_kw,
            block_mask=bm, scale=scale,
        )  # fmt: skip
    else:
        ours, ref = grads_both(flex, q, k, v, score_mod=score_mod, block_mask=bm, scale=scale)
    assert_grads_close(ours, ref, jnp.float32, tol=2e-5)
