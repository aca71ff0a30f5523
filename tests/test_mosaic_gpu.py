"""The Mosaic GPU backend (issue 18): its forward kernel, what it refuses, and how it falls back.

On the CPU the kernel runs in Mosaic GPU's interpret mode (warpgroups as
threads, TMA and barriers simulated; about 6 s a call at these sizes), P
staged through shared memory as the interpreter needs, and is lowered for
cuda (the Mosaic GPU MLIR is built on the CPU, which catches layout and
lowering errors of the GPU path: register P, in-place accumulation, layout
typed index tiles). The GPU suite (`-m gpu`) runs the compiled kernel
against the reference, and the kernel suites add MOSAIC_GPU to their backend
axis there (conftest.KERNEL_BACKENDS).

A limit of the interpreter, not of the kernels: each warpgroup's host
callbacks run on XLA's CPU thread pool (one thread per core), and a barrier
wait holds its pool thread, so with fewer cores than blocked warpgroups a
kernel can deadlock in interpret mode. Seen on 2 cores: a forward with one
q_idx and two kv_idx staged reads at kv blocks of 128 (1 core: one read of
each). The cases here avoid that; the GPU cases run the combinations
(`documents kv bias staged`, forward and backward).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_qkv

import flexjax as fj
from flexjax import masks
from flexjax.api import prepare
from flexjax.reference import flex_attention_reference
from pallas_kernels import dispatch
from pallas_kernels.mosaic_gpu import MOSAIC_GPU, compat
from pallas_kernels.mosaic_gpu.bwd import BwdConfig, _aliased, flex_bwd, fused_dq
from pallas_kernels.mosaic_gpu.bwd import default_config as default_bwd_config
from pallas_kernels.mosaic_gpu.fwd import SMEM_BYTES, FwdConfig, flex_fwd
from pallas_kernels.spec import KernelSpec, Layout

MOSAIC = {"BACKEND": "MOSAIC_GPU"}
TOL = {jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


def _causal(b, h, q, kv):
    return q >= kv


def _window(b, h, q, kv):
    return jnp.abs(q - kv) <= 40


def _alibi(score, b, h, q, kv):
    return score - (h + 1) * 0.05 * jnp.abs(q - kv)


def _halved_odd(score, b, h, q, kv):
    """Scales with the score (f(c s) = c f(s)): forwards apply it to raw scores (mod_scaling)."""
    return jnp.where((q - kv) % 2 == 1, score * 0.5, score)


def _softcap(score, b, h, q, kv):
    return 20.0 * jnp.tanh(score / 20.0)


def _late_start(b, h, q, kv):  # rows below 100 keep nothing: out 0, lse -inf
    return (q >= 100) & (kv <= q)


def _documents(S):
    """A document mask (causal within documents) over ids captured as an array: doc[q], doc[kv]."""
    cuts = np.sort(np.random.default_rng(S).choice(np.arange(1, S), 4, replace=False))
    doc = jnp.asarray(np.searchsorted(cuts, np.arange(S), side="right").astype(np.int32))
    return lambda b, h, q, kv: (q >= kv) & (doc[q] == doc[kv])


def _kv_bias(S, H):
    """A score_mod reading bias[h, kv_idx] (float) and a 0-d capture."""
    bias = jax.random.normal(jax.random.key(S), (H, S), jnp.float32)
    temp = jnp.float32(0.9)
    return lambda score, b, h, q, kv: score * temp + bias[h, kv]


_natten = masks.generate_natten(16, 16, 5, 5)  # 2-D neighbourhoods: q // 16, q % 16, ...


def _index_math(score, b, h, q, kv):  # integer math on each index (index vectors), then mixed
    return score + 0.1 * ((q % 7) - (kv // 5) % 3).astype(jnp.float32)


def _check(out, lse, ref, ref_lse, tol):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    assert np.array_equal(np.isinf(lse), np.isinf(ref_lse))
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], atol=1e-3, rtol=1e-3)


CASES = {
    # name: (sizes B, Hq, Hkv, S, D), dtype, score_mod, mask_mod, BLOCK_SIZE
    "dense f16 D64": ((1, 2, 2, 256, 64), jnp.float16, None, None, 128),
    "causal bf16 kv64": ((1, 1, 1, 256, 64), jnp.bfloat16, None, _causal, (128, 64)),
    "alibi causal gqa": ((2, 4, 2, 256, 64), jnp.bfloat16, _alibi, _causal, 128),
    "softcap window D128": ((1, 1, 1, 384, 128), jnp.float16, _softcap, _window, (128, 64)),
    "empty rows, halved odd": ((1, 1, 1, 256, 64), jnp.float16, _halved_odd, _late_start, 128),
    "natten + index math": ((1, 1, 1, 256, 64), jnp.float16, _index_math, _natten, 128),
    "documents + kv bias (staged)": (
        (1, 2, 2, 256, 64),
        jnp.bfloat16,
        _kv_bias(256, 2),
        _documents(256),
        (128, 64),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_reference_in_interpret_mode(name):
    (B, Hq, Hkv, S, D), dtype, score_mod, mask_mod, block = CASES[name]
    q, k, v = random_qkv(hash(name) % 1000, B, Hq, S, S, D, Hkv=Hkv, dtype=dtype)
    bm = None if mask_mod is None else fj.create_block_mask(mask_mod, 1, 1, S, S, BLOCK_SIZE=block)
    gqa = Hq != Hkv
    before = dispatch.trace_count("fwd", "MOSAIC_GPU")
    out, lse = fj.flex_attention(
        q, k, v, score_mod, bm, enable_gqa=gqa, return_lse=True, kernel_options=MOSAIC
    )
    assert dispatch.trace_count("fwd", "MOSAIC_GPU") == before + 1  # this backend's kernel ran
    qr, kr, vr = (x.astype(jnp.float32) for x in (q, k, v))
    ref, ref_lse = flex_attention_reference(
        qr, kr, vr, score_mod, bm, enable_gqa=gqa, return_lse=True
    )
    _check(out, lse, ref, ref_lse, TOL[dtype])


def test_jax_layout_bshd_matches_bhsd():
    """dot_product_attention's [B, T, N, H] arrays: TMA tiles strided over heads, lse [B, T, N]."""
    S = 256
    q, k, v = random_qkv(9, 1, 2, S, S, 64, dtype=jnp.bfloat16)
    bm = fj.create_block_mask(_causal, 1, 1, S, S)
    out, lse = fj.flex_attention(q, k, v, _alibi, bm, return_lse=True, kernel_options=MOSAIC)
    t = lambda x: jnp.swapaxes(x, 1, 2)
    out2, lse2 = fj.dot_product_attention(
        t(q), t(k), t(v), _alibi, bm, return_lse=True, kernel_options=MOSAIC
    )
    np.testing.assert_array_equal(np.asarray(t(out2)), np.asarray(out))
    np.testing.assert_array_equal(np.asarray(t(lse2)), np.asarray(lse))


def test_barrier_protocol_has_no_races(monkeypatch):
    """The interpreter's vector clocks check producer/consumer/schedule barriers and TMA."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    monkeypatch.setattr(compat, "interpret_params", lambda _: InterpretGPUParams(detect_races=True))
    S = 384  # 3 q rows, up to 6 kv tiles: the ring wraps (stages=2) and slots are refilled
    q, k, v = random_qkv(11, 1, 1, S, S, 64, dtype=jnp.bfloat16)
    # Staged reads too: the kv_idx slices ride the K ring and are refilled with it.
    score_mod, mask_mod = _kv_bias(S, 1), _documents(S)
    bm = fj.create_block_mask(mask_mod, 1, 1, S, S, BLOCK_SIZE=(128, 64))
    options = {**MOSAIC, "MOSAIC_STAGES": 2, "MOSAIC_SCHEDULE_BARRIER": True}  # (turns too)
    out = fj.flex_attention(q, k, v, score_mod, bm, kernel_options=options)
    assert not ipc.get_races().races_found
    qkv = (x.astype(jnp.float32) for x in (q, k, v))
    ref = flex_attention_reference(*qkv, score_mod, block_mask=bm)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2, rtol=2e-2)


def _grads(q, k, v, score_mod, bm, options, gqa=False, reference=False):
    """d/d(q, k, v) of a weighted sum of out and lse (so the lse cotangent is checked too)."""
    w = jnp.cos(jnp.arange(q.shape[-1], dtype=jnp.float32))

    def loss(q, k, v):
        if reference:
            out, lse = flex_attention_reference(
                q, k, v, score_mod, bm, enable_gqa=gqa, return_lse=True
            )
        else:
            out, lse = fj.flex_attention(
                q, k, v, score_mod, bm, enable_gqa=gqa, return_lse=True, kernel_options=options
            )
        lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * w) + 0.3 * jnp.sum(jnp.sin(lse))

    if reference:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _check_grads(got, want, tol):
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert g.shape == w.shape and np.isfinite(g).all(), name
        np.testing.assert_allclose(g, w, atol=tol * max(1.0, np.abs(w).max()), err_msg=name)


BWD_CASES = {
    # name: (sizes B, Hq, Hkv, S, D), dtype, score_mod, mask_mod
    "alibi causal gqa": ((1, 2, 1, 256, 64), jnp.float16, _alibi, _causal),
    "softcap dense D128": ((1, 1, 1, 256, 128), jnp.bfloat16, _softcap, None),
    "empty rows, halved odd": ((1, 1, 1, 256, 64), jnp.float16, _halved_odd, _late_start),
    "natten + index math": ((1, 1, 1, 256, 64), jnp.float16, _index_math, _natten),
    "documents (staged), alibi": ((1, 2, 2, 256, 64), jnp.bfloat16, _alibi, _documents(256)),
}


@pytest.mark.parametrize("name", list(BWD_CASES))
def test_backward_matches_reference_in_interpret_mode(name):
    (B, Hq, Hkv, S, D), dtype, score_mod, mask_mod = BWD_CASES[name]
    q, k, v = random_qkv(hash(name) % 1000, B, Hq, S, S, D, Hkv=Hkv, dtype=dtype)
    bm = None if mask_mod is None else fj.create_block_mask(mask_mod, 1, 1, S, S)
    gqa = Hq != Hkv
    before = dispatch.trace_count("dkdv", "MOSAIC_GPU"), dispatch.trace_count("dq", "TRITON")
    got = _grads(q, k, v, score_mod, bm, MOSAIC, gqa)
    after = dispatch.trace_count("dkdv", "MOSAIC_GPU"), dispatch.trace_count("dq", "TRITON")
    assert after == (before[0] + 1, before[1])  # this backend's backward, not Triton's
    call = prepare(q, k, v, score_mod, bm, enable_gqa=gqa, kernel_options=MOSAIC)
    assert not fused_dq(call.spec, BwdConfig(fused_dq=True))  # interpret mode: the dq kernel
    _check_grads(got, _grads(q, k, v, score_mod, bm, None, gqa, reference=True), TOL[dtype])


def test_triton_forward_with_this_backends_backward():
    """MOSAIC_TRITON_FWD (what AUTO sets for masks dividing their indices): Triton's forward,
    its lse and out the residuals of this backend's backward; gradients as the reference's."""
    (_, Hq, Hkv, S, D), dtype, score_mod, mask_mod = BWD_CASES["natten + index math"]
    q, k, v = random_qkv(17, 2, Hq, S, S, D, Hkv=Hkv, dtype=dtype)  # (B=2: traced anew)
    bm = fj.create_block_mask(mask_mod, 1, 1, S, S)
    options = {**MOSAIC, "MOSAIC_TRITON_FWD": True}
    kernels = (("fwd", "TRITON"), ("fwd", "MOSAIC_GPU"), ("dkdv", "MOSAIC_GPU"))
    before = [dispatch.trace_count(*kb) for kb in kernels]
    got = _grads(q, k, v, score_mod, bm, options)
    traced = [dispatch.trace_count(*kb) - n for kb, n in zip(kernels, before, strict=True)]
    assert traced[0] > 0 and traced[1:] == [0, 1]  # (the forward traces for out and the vjp)
    _check_grads(got, _grads(q, k, v, score_mod, bm, None, reference=True), TOL[dtype])
    call = prepare(q, k, v, score_mod, bm, kernel_options=options)
    cfg = MOSAIC_GPU.configs(call.spec, call.mods, {"MOSAIC_TRITON_FWD": True}, False).fwd
    assert cfg.triton_fwd and cfg.triton is not None
    fixed = {"MOSAIC_TRITON_FWD": True}  # the autotuner tries Triton's forward configs
    space = list(MOSAIC_GPU.candidates("fwd", call.spec, call.mods, fixed))
    assert space
    for values, cfg in space:
        assert cfg.triton_fwd and MOSAIC_GPU.config_from("fwd", values) == cfg
    with pytest.raises(ValueError, match="triton_fwd=True needs triton"):
        FwdConfig(triton_fwd=True)


def test_triton_forward_with_this_backends_backward_bshd_gqa():
    """The same in jax's [B, T, N, H] layout (`flexjax.jax_layout`, lse [B, T, N]) with two
    query heads a kv head: Triton's out and lse feed this backend's backward as they are."""
    from flexjax.jax_layout import dot_product_attention

    S, D, dtype = 256, 64, jnp.bfloat16
    q, k, v = random_qkv(19, 1, 2, S, S, D, Hkv=1, dtype=dtype)
    bm = fj.create_block_mask(_natten, 1, 1, S, S)
    w = jnp.cos(jnp.arange(D, dtype=jnp.float32))
    t = lambda x: jnp.swapaxes(x, 1, 2)  # [B, H, S, D] <-> [B, S, H, D]

    def loss(q, k, v):
        options = {**MOSAIC, "MOSAIC_TRITON_FWD": True}
        out, lse = dot_product_attention(t(q), t(k), t(v), _alibi, bm, return_lse=True, kernel_options=options)  # fmt: skip
        return jnp.sum(t(out).astype(jnp.float32) * w) + 0.3 * jnp.sum(jnp.sin(t(lse)))

    before = dispatch.trace_count("dkdv", "MOSAIC_GPU"), dispatch.trace_count("fwd", "MOSAIC_GPU")
    got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    after = dispatch.trace_count("dkdv", "MOSAIC_GPU"), dispatch.trace_count("fwd", "MOSAIC_GPU")
    assert after == (before[0] + 1, before[1])
    _check_grads(got, _grads(q, k, v, _alibi, bm, None, True, reference=True), TOL[dtype])


BWD_ORDERS = {  # kernel_options of the backward's other matmul orders and schedules
    "paired, turns, rows first to last": {"MOSAIC_BWD_PAIRED": True,
                                          "MOSAIC_BWD_SCHEDULE_BARRIER": True,
                                          "MOSAIC_BWD_LONGEST_FIRST": False},
    "unpaired, turns, 3 stages": {"MOSAIC_BWD_PAIRED": False, "MOSAIC_BWD_SCHEDULE_BARRIER": True,
                                  "MOSAIC_BWD_STAGES": 3},
    "paired, no turns, dk/dv ring of 4": {"MOSAIC_BWD_PAIRED": True,
                                          "MOSAIC_BWD_SCHEDULE_BARRIER": False,
                                          "MOSAIC_BWD_DKDV_STAGES": 4},
    "unpaired, dk/dv steps of 128 q rows": {"MOSAIC_BWD_PAIRED": False,
                                            "MOSAIC_BWD_DKDV_Q_ROWS": 128},
}  # fmt: skip


_SLOW_ORDERS = ("unpaired, turns, 3 stages", "unpaired, dk/dv steps of 128 q rows")  # not defaults


@pytest.mark.parametrize(
    "order",
    [pytest.param(o, marks=pytest.mark.slow) if o in _SLOW_ORDERS else o for o in BWD_ORDERS],
)
def test_backward_matmul_orders_match_reference_in_interpret_mode(order):
    """The dk/dv kernel's paired matmul groups and the consumers' turns (ping-pong) in both
    kernels, and rings of other depths: the same gradients, the rings wrapping (S = 384)."""
    S = 384
    q, k, v = random_qkv(21, 1, 2, S, S, 64, Hkv=1, dtype=jnp.float16)
    bm = fj.create_block_mask(_causal, 1, 1, S, S)
    got = _grads(q, k, v, _alibi, bm, {**MOSAIC, **BWD_ORDERS[order]}, True)
    _check_grads(got, _grads(q, k, v, _alibi, bm, None, True, reference=True), TOL[jnp.float16])


@pytest.mark.parametrize("q_rows", [64, 128])
def test_backward_in_jax_layout_and_its_races(monkeypatch, q_rows):
    """[B, T, N, H] tiles (lse/delta transposed for the TMA rows) and staged reads, with the
    race detector on: S = 384 makes the rings wrap (stages=2) in both kernels, and the staged
    slices are refilled with their slots; dk/dv steps of 64 q rows and of 128."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    monkeypatch.setattr(compat, "interpret_params", lambda _: InterpretGPUParams(detect_races=True))
    S = 384
    q, k, v = random_qkv(12, 1, 1, S, S, 64, dtype=jnp.bfloat16)
    score_mod, mask_mod = _alibi, _documents(S)
    bm = fj.create_block_mask(mask_mod, 1, 1, S, S)
    t = lambda x: jnp.swapaxes(x, 1, 2)

    def loss(q, k, v):
        options = {**MOSAIC, "MOSAIC_BWD_DKDV_Q_ROWS": q_rows}
        out = fj.dot_product_attention(q, k, v, score_mod, bm, kernel_options=options)
        return jnp.sum(out.astype(jnp.float32) * jnp.sin(jnp.arange(64.0)))

    got = [t(g) for g in jax.grad(loss, argnums=(0, 1, 2))(t(q), t(k), t(v))]
    assert not ipc.get_races().races_found
    w = jnp.sin(jnp.arange(64.0))
    ref = lambda q, k, v: jnp.sum(flex_attention_reference(q, k, v, score_mod, bm) * w)
    want = jax.grad(ref, argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, k, v)))
    _check_grads(got, want, TOL[jnp.bfloat16])


@pytest.mark.slow  # (66 s each; the group loop is off by default)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_backward_group_loop_matches_reference_and_its_races(monkeypatch, layout):
    """MOSAIC_BWD_GROUP_LOOP: a dk/dv CTA per kv head streaming its query heads' q blocks in
    turn, with the race detector on: block lists that differ by head within a group (copied
    [heads, len]; one head's list empty in a column),
    a kv_idx read that depends on h (its slices copied anew per head), rings wrapping across
    heads (S = 384); dk, dv written once, in the inputs' dtype."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    from pallas_kernels.mosaic_gpu import bwd

    monkeypatch.setattr(compat, "interpret_params", lambda _: InterpretGPUParams(detect_races=True))
    looped = []  # the group loop's per-head picks (only its kernel body makes them)
    real = bwd._pick
    monkeypatch.setattr(bwd, "_pick", lambda *a: looped.append(len(a[0])) or real(*a))
    S, D = 384, 64
    q, k, v = random_qkv(23, 1, 4, S, S, D, Hkv=2, dtype=jnp.float16)
    bias = jax.random.normal(jax.random.key(2), (4, S), jnp.float32)
    score_mod = lambda s, b, h, qi, kv: s + bias[h, kv]
    # heads of one group differ (odd heads drop kv <= 40); head 3 has kv block 0's column empty
    mask_mod = lambda b, h, qi, kv: (qi >= kv) & ((h % 2 == 0) | (kv > 40)) & ((h != 3) | (kv >= 128))  # fmt: skip
    bm = fj.create_block_mask(mask_mod, 1, 4, S, S)
    options = {**MOSAIC, "MOSAIC_BWD_GROUP_LOOP": True}
    w = jnp.cos(jnp.arange(D, dtype=jnp.float32))
    t = lambda x: jnp.swapaxes(x, 1, 2)

    def loss(q, k, v):
        if layout == "bshd":
            out = t(fj.dot_product_attention(t(q), t(k), t(v), score_mod, bm, kernel_options=options))  # fmt: skip
        else:
            out = fj.flex_attention(q, k, v, score_mod, bm, enable_gqa=True, kernel_options=options)
        return jnp.sum(out.astype(jnp.float32) * w)

    got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert looped and not ipc.get_races().races_found
    ref = lambda q, k, v: jnp.sum(flex_attention_reference(q, k, v, score_mod, bm, enable_gqa=True) * w)  # fmt: skip
    want = jax.grad(ref, argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, k, v)))
    _check_grads(got, want, TOL[jnp.float16])


def test_backward_falls_back_to_triton_where_it_cannot_run():
    """kv blocks of 64 and captured-array gradients: Triton's backward runs them (kernels()
    says so and why), with the same gradients."""
    S = 256
    q, k, v = random_qkv(5, 1, 2, S, S, 64, dtype=jnp.float16)
    kv64 = fj.create_block_mask(_causal, 1, 1, S, S, BLOCK_SIZE=(128, 64))
    cases = {"kv blocks of 128": (_alibi, kv64)}
    for words, (score_mod, bm) in cases.items():
        call = prepare(q, k, v, score_mod, bm)
        assert words in MOSAIC_GPU.kernels(call.spec, call.mods)["bwd"]
        before = dispatch.trace_count("dq", "TRITON")
        got = _grads(q, k, v, score_mod, bm, MOSAIC)
        assert dispatch.trace_count("dq", "TRITON") == before + 1
        _check_grads(got, _grads(q, k, v, score_mod, bm, {"BACKEND": "TRITON"}), 2e-3)
    for score_mod, mask_mod in ((_alibi, _causal), (_kv_bias(S, 2), _documents(S))):
        call = prepare(q, k, v, score_mod, fj.create_block_mask(mask_mod, 1, 1, S, S))
        said = MOSAIC_GPU.kernels(call.spec, call.mods)
        assert said["fwd"] == said["bwd"] == "MOSAIC_GPU"
    bias = jnp.linspace(-1.0, 1.0, S)
    learnable = lambda bias: lambda s, b, h, q, kv: s + bias[kv]
    assert "gradients of captured arrays" in MOSAIC_GPU.kernels(call.spec, call.mods, (0,))["bwd"]

    def loss(bias, backend):
        out = fj.flex_attention(q, k, v, learnable(bias), kernel_options={"BACKEND": backend})
        return jnp.sum(out.astype(jnp.float32) ** 2)

    np.testing.assert_allclose(
        jax.grad(loss)(bias, "MOSAIC_GPU"), jax.grad(loss)(bias, "TRITON"), atol=1e-3
    )


def _window_end(S, L, width):
    """The last L positions of a length-S sequence attend to the `width` keys before them."""
    return lambda b, h, q, kv: (q + (S - L) >= kv) & (q + (S - L) - kv < width)


def _head_prefix(b, h, q, kv):  # head 0 keeps kv < 100, head 1 nothing: out 0, lse -inf
    return (kv < 100) & (h == 0)


DECODE_CASES = {
    # name: (B, Hq, Hkv, L, S, D), dtype, score_mod, mask_mod (and its heads), options
    "gqa packed, alibi, window": (
        (2, 4, 1, 2, 512, 64), jnp.float16, _alibi, (_window_end(512, 2, 300), 1),
        {"MOSAIC_DECODE_SPLITS": 3},
    ),
    "kv bias staged, per-head mask, empty head": (
        (1, 2, 2, 1, 512, 64), jnp.bfloat16, _kv_bias(512, 2), (_head_prefix, 2),
        {"MOSAIC_DECODE_SPLITS": 2, "MOSAIC_DECODE_BLOCK_N": 128, "MOSAIC_DECODE_STAGES": 2},
    ),
    "dense D128, one split": (
        (1, 2, 1, 1, 384, 128), jnp.bfloat16, None, (None, 1), {"MOSAIC_DECODE_SPLITS": 1},
    ),
    "halved odd, causal end": (
        (1, 2, 2, 1, 256, 64), jnp.float16, _halved_odd, (_window_end(256, 1, 200), 1),
        {"MOSAIC_DECODE_SPLITS": 2},
    ),
}  # fmt: skip


def _decode_call(name):
    (B, Hq, Hkv, L, S, D), dtype, score_mod, (mask_mod, Hm), options = DECODE_CASES[name]
    q, k, v = random_qkv(hash(name) % 1000, B, Hq, L, S, D, Hkv=Hkv, dtype=dtype)
    bm = None if mask_mod is None else fj.create_block_mask(mask_mod, 1, Hm, L, S)
    return (q, k, v, score_mod, bm, Hq != Hkv), {**MOSAIC, **options}, dtype


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_matches_reference_in_interpret_mode(name):
    (q, k, v, score_mod, bm, gqa), options, dtype = _decode_call(name)
    before = dispatch.trace_count("decode", "MOSAIC_GPU")
    out, lse = fj.flex_attention(
        q, k, v, score_mod, bm, enable_gqa=gqa, return_lse=True, kernel_options=options
    )
    assert dispatch.trace_count("decode", "MOSAIC_GPU") == before + 1
    qkv = (x.astype(jnp.float32) for x in (q, k, v))
    ref, ref_lse = flex_attention_reference(*qkv, score_mod, bm, enable_gqa=gqa, return_lse=True)
    _check(out, lse, ref, ref_lse, TOL[dtype])


def test_decode_ring_has_no_races(monkeypatch):
    """One split walks 8 kv tiles through a ring of 2: every slot is refilled, with staged
    kv slices riding K's barrier."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    monkeypatch.setattr(compat, "interpret_params", lambda _: InterpretGPUParams(detect_races=True))
    S = 512
    q, k, v = random_qkv(13, 1, 1, 1, S, 64, dtype=jnp.bfloat16)
    score_mod = _kv_bias(S, 1)
    options = {**MOSAIC, "MOSAIC_DECODE_SPLITS": 1, "MOSAIC_DECODE_STAGES": 2}
    out = fj.flex_attention(q, k, v, score_mod, kernel_options=options)
    assert not ipc.get_races().races_found
    ref = flex_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), score_mod)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2, rtol=2e-2)


def test_short_queries_fall_back_where_the_mosaic_kernels_cannot_run():
    """A short query's regular forward and backward (under grad) and a decode with q_idx
    reads are Triton's; kernels() says so, and the results match Triton's."""
    S, L = 256, 4
    q, k, v = random_qkv(6, 1, 2, L, S, 64, dtype=jnp.float16)
    bm = fj.create_block_mask(_window_end(S, L, 100), 1, 1, L, S)
    call = prepare(q, k, v, _alibi, bm, kernel_options=MOSAIC)
    said = MOSAIC_GPU.kernels(call.spec, call.mods)
    assert said["decode"] == "MOSAIC_GPU" and "multiple of the q block" in said["fwd"]
    assert "multiple of the q block" in said["bwd"]
    for asked in ({}, {"MOSAIC_TRITON_FWD": False}):  # a refused forward is Triton's regardless
        cfg = MOSAIC_GPU.configs(call.spec, call.mods, asked, False).fwd
        assert cfg.triton_fwd and cfg.triton is not None
    before = dispatch.trace_count("fwd", "TRITON"), dispatch.trace_count("dq", "TRITON")
    got = _grads(q, k, v, _alibi, bm, MOSAIC)
    assert (dispatch.trace_count("fwd", "TRITON"), dispatch.trace_count("dq", "TRITON")) == (
        before[0] + 1, before[1] + 1,
    )  # fmt: skip
    _check_grads(got, _grads(q, k, v, _alibi, bm, {"BACKEND": "TRITON"}), 2e-3)
    bias = jnp.linspace(-1.0, 1.0, L)
    q_bias = lambda s, b, h, q, kv: s + bias[q]
    call = prepare(q, k, v, q_bias, bm, kernel_options=MOSAIC)
    assert "q_idx" in MOSAIC_GPU.kernels(call.spec, call.mods)["decode"]
    before = dispatch.trace_count("decode", "TRITON")
    out = fj.flex_attention(q, k, v, q_bias, bm, kernel_options=MOSAIC)
    assert dispatch.trace_count("decode", "TRITON") == before + 1
    want = fj.flex_attention(q, k, v, q_bias, bm, kernel_options={"BACKEND": "TRITON"})
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


LOWER_CASES = {
    "dense D64": (64, None, None, 128),
    "dense D128": (128, None, None, 128),
    "causal D128": (128, None, _causal, 128),
    "alibi causal": (128, _alibi, _causal, 128),
    "softcap": (64, _softcap, None, 128),
    "window kv64": (64, None, _window, (128, 64)),
    "documents + kv bias (staged)": (128, _kv_bias(512, 2), _documents(512), 128),
}


BWD_LOWER_CONFIGS = (
    BwdConfig(),
    BwdConfig(fused_dq=True),  # dq by TMA reduce-add (jax 0.11+; else the same as the default)
    BwdConfig(paired=not BwdConfig.paired, schedule_barrier=not BwdConfig.schedule_barrier),
    BwdConfig(fused_dq=True, registers=240),  # FlashAttention-3's register split
    BwdConfig(dkdv_stages=4),  # the dk/dv kernel's own ring depth
)
BWD_LOWER_CONFIGS_D64 = (  # dk/dv steps of a whole q block, both orders
    BwdConfig(dkdv_q_rows=128),
    BwdConfig(dkdv_q_rows=128, paired=True),
)


@pytest.mark.parametrize("name", list(LOWER_CASES))
def test_gpu_kernel_lowers_for_cuda(name):
    """The compiled path (register P, in-place accumulator, layout-typed index tiles) lowers,
    forward and backward (register dS and P^T, autodiff sums as adds), in both layouts."""
    D, score_mod, mask_mod, block = LOWER_CASES[name]
    S = 512
    q = k = v = jnp.zeros((1, 2, S, D), jnp.bfloat16)
    bm = None if mask_mod is None else fj.create_block_mask(mask_mod, 1, 1, S, S, BLOCK_SIZE=block)
    call = prepare(q, k, v, score_mod, bm, kernel_options={"interpret": False})
    alt = FwdConfig(stages=4 if D == 64 else 2, schedule_barrier=False, longest_first=False)
    bshd = dataclasses.replace(call.spec, layout=Layout.BSHD)  # [B, S, H, D] tiles
    # pipelined (the default: QK^T with the previous step's PV) with and without turns, and not
    unpiped = FwdConfig(pipelined=False)
    for cfg, spec in (
        (FwdConfig(), call.spec),
        (alt, call.spec),
        (unpiped, call.spec),
        (FwdConfig(), bshd),
        (dataclasses.replace(unpiped, schedule_barrier=False), bshd),
    ):
        f = jax.jit(
            lambda q, k, v, t, m, cfg=cfg, spec=spec: flex_fwd(
                q, k, v, t, m, None, spec=spec, cfg=cfg
            )
        )
        x = q if spec.layout is Layout.BHSD else jnp.swapaxes(q, 1, 2)
        lowered = f.trace(x, x, x, call.tables.rows, call.mods).lower(lowering_platforms=("cuda",))
        assert "mosaic_gpu" in lowered.as_text()
        if block != 128:
            continue  # the Mosaic backward refuses kv blocks of 64
        lse = jnp.zeros(spec.layout.shape(1, 2, S, 1)[:3], jnp.float32)
        own = (default_bwd_config(spec),)  # the defaults as they resolve for this call
        for cfg in own + BWD_LOWER_CONFIGS + (BWD_LOWER_CONFIGS_D64 if D == 64 else ()):
            g = jax.jit(lambda *a, spec=spec, cfg=cfg: flex_bwd(*a, spec=spec, cfg=cfg))
            lowered = g.trace(x, x, x, x, lse, lse, call.tables, call.mods)
            assert "mosaic_gpu" in lowered.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("group_loop", [False, True], ids=["per-head", "group-loop"])
@pytest.mark.parametrize("D", [64, 128])
def test_fused_backward_with_grouped_heads_lowers_for_cuda(D, group_loop):
    """The fused dq with grouped-query heads: float32 dk, dv per query head beside the dS^T
    and dq buffers; at D=128 they share shared memory (`bwd._aliased`, a RefUnion), which is
    what fits; with the group loop (`bwd.group_loop`) no per-head copies, so no sharing. The
    fused form is compiled on jax 0.11+ only (else the dq kernel lowers)."""
    from pallas_kernels.mosaic_gpu.bwd import smem_by_kernel

    S = 512
    q, kv = jnp.zeros((1, 4, S, D), jnp.bfloat16), jnp.zeros((1, 2, S, D), jnp.bfloat16)
    per_head = lambda b, h, qi, kv: (qi >= kv) & ((h % 2 == 0) | (kv > 40))  # lists by head
    bm = fj.create_block_mask(per_head, 1, 4, S, S)
    score_mod = _kv_bias(S, 4)  # a staged kv_idx read of bias[h, kv]: anew per head
    call = prepare(q, kv, kv, score_mod, bm, enable_gqa=True, kernel_options={"interpret": False})
    cfg = BwdConfig(fused_dq=True, paired=True, registers=240, group_loop=group_loop)
    assert _aliased(call.spec, cfg) == (D == 128 and not group_loop)
    assert smem_by_kernel(call.spec, cfg, fused=True)["dkdv"] <= SMEM_BYTES
    assert fused_dq(call.spec, cfg) == (compat.JAX_VERSION >= (0, 11))
    lse = jnp.zeros((1, 4, S), jnp.float32)
    g = jax.jit(lambda *a: flex_bwd(*a, spec=call.spec, cfg=cfg))
    lowered = g.trace(q, kv, kv, q, lse, lse, call.tables, call.mods)
    assert "mosaic_gpu" in lowered.lower(lowering_platforms=("cuda",)).as_text()


DECODE_LOWER_CASES = {
    # name: (Hq, Hkv, L, D), score_mod, mask_mod, heads of the mask, config fields
    "gqa 4 packed, causal end": ((8, 2, 1, 128), None, _window_end(1024, 1, 1024), 1, {}),
    "gqa packed, two rows each, alibi": ((8, 2, 2, 64), _alibi, _window_end(1024, 2, 300), 1, {}),
    "kv bias staged, tiles of 128": ((2, 2, 1, 128), _kv_bias(1024, 2), None, 1, {"block_n": 128}),
    "per-head mask, gqa unpacked": ((4, 2, 3, 64), None, _head_prefix, 4, {"stages": 3}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(DECODE_LOWER_CASES))
def test_decode_kernel_lowers_for_cuda(name):
    from pallas_kernels.mosaic_gpu.decode import decode_config, decode_refusal, flex_decode

    (Hq, Hkv, L, D), score_mod, mask_mod, Hm, fields = DECODE_LOWER_CASES[name]
    S = 1024
    q = jnp.zeros((2, Hq, L, D), jnp.bfloat16)
    k = jnp.zeros((2, Hkv, S, D), jnp.bfloat16)
    bm = None if mask_mod is None else fj.create_block_mask(mask_mod, 1, Hm, L, S)
    options = {"interpret": False}
    call = prepare(q, k, k, score_mod, bm, enable_gqa=Hq != Hkv, kernel_options=options)
    cfg = decode_config(call.spec, fields, 132, None)
    assert decode_refusal(call.spec, call.mods, cfg) is None
    f = jax.jit(lambda q, k, t, m: flex_decode(q, k, k, t, m, None, spec=call.spec, cfg=cfg))
    lowered = f.trace(q, k, call.tables.rows, call.mods).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def test_block_lists_past_256_blocks_lower_for_cuda():
    """A TMA copy moves at most 256 elements a dimension: the block lists of sequences past
    256 blocks (S > 32768 with blocks of 128) are copied in pieces (`compat.copy_list`),
    forward, backward and decode."""
    from pallas_kernels.mosaic_gpu.bwd import default_config as bwd_config
    from pallas_kernels.mosaic_gpu.decode import decode_config, flex_decode
    from pallas_kernels.mosaic_gpu.fwd import default_config

    S, D = 40960, 64  # 320 blocks
    q = jnp.zeros((1, 1, S, D), jnp.bfloat16)
    bm = fj.create_block_mask(_causal, 1, 1, S, S)
    call = prepare(q, q, q, None, bm, kernel_options={"interpret": False})
    cfg = default_config(call.spec)
    f = jax.jit(lambda q, t, m: flex_fwd(q, q, q, t, m, None, spec=call.spec, cfg=cfg))
    assert "mosaic_gpu" in f.trace(q, call.tables.rows, call.mods).lower(lowering_platforms=("cuda",)).as_text()  # fmt: skip
    lse = jnp.zeros((1, 1, S), jnp.float32)
    g = jax.jit(lambda *a: flex_bwd(*a, spec=call.spec, cfg=bwd_config(call.spec)))
    lowered = g.trace(q, q, q, q, lse, lse, call.tables, call.mods)
    assert "mosaic_gpu" in lowered.lower(lowering_platforms=("cuda",)).as_text()
    q1 = jnp.zeros((1, 4, 1, D), jnp.bfloat16)
    dec = prepare(q1, q, q, None, None, enable_gqa=True, kernel_options={"interpret": False})
    dcfg = decode_config(dec.spec, {}, 132, None)
    d = jax.jit(lambda q1, k, t, m: flex_decode(q1, k, k, t, m, None, spec=dec.spec, cfg=dcfg))
    assert "mosaic_gpu" in d.trace(q1, q, dec.tables.rows, dec.mods).lower(lowering_platforms=("cuda",)).as_text()  # fmt: skip


def test_block_lists_copied_in_pieces_in_interpret_mode(monkeypatch):
    """`compat.copy_list` with pieces of 16 entries (the lists of 32, padded, take two
    copies each, arrivals counted by `list_arrivals`): forward and backward as the
    reference, race detector on."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    monkeypatch.setattr(compat, "interpret_params", lambda _: InterpretGPUParams(detect_races=True))
    monkeypatch.setattr(compat, "LIST_CHUNK", 16)
    S = 640  # (a shape no other test traces: the kernels' jit caches hold the old pieces)
    q, k, v = random_qkv(31, 1, 1, S, S, 64, dtype=jnp.float16)
    bm = fj.create_block_mask(_documents(S), 1, 1, S, S)
    w = jnp.cos(jnp.arange(64.0))
    loss = lambda q, k, v: jnp.sum(fj.flex_attention(q, k, v, _alibi, bm, kernel_options=MOSAIC).astype(jnp.float32) * w)  # fmt: skip
    got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert not ipc.get_races().races_found
    ref = lambda q, k, v: jnp.sum(flex_attention_reference(q, k, v, _alibi, bm) * w)
    want = jax.grad(ref, argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, k, v)))
    _check_grads(got, want, TOL[jnp.float16])


@pytest.mark.parametrize("D, turns", [(64, True), (128, False)])
def test_forward_defaults_by_head_dim(D, turns):
    """The measured defaults (`fwd.default_config`): at D=128 pipelined, a ring of 2; at D=64
    consumer turns, a ring of 4, not pipelined; kernel_options override each; the autotuner
    searches both axes unless one is fixed."""
    q = k = v = jnp.zeros((1, 2, 256, D), jnp.bfloat16)
    call = prepare(q, k, v, None, None, kernel_options={"interpret": False})
    configs = lambda **options: MOSAIC_GPU.configs(call.spec, call.mods, options, False).fwd
    got = configs()
    assert (got.pipelined, got.schedule_barrier, got.stages) == (not turns, turns, 2 + 2 * turns)
    stages = 3 if turns else 2  # (3 at D=128 would not fit)
    forced = configs(MOSAIC_PIPELINED=turns, MOSAIC_SCHEDULE_BARRIER=not turns, MOSAIC_STAGES=stages)  # fmt: skip
    assert (forced.pipelined, forced.schedule_barrier, forced.stages) == (turns, not turns, stages)
    space = [cfg for _, cfg in MOSAIC_GPU.candidates("fwd", call.spec, call.mods, {})]
    assert {(c.pipelined, c.schedule_barrier) for c in space} == {
        (p, b) for p in (True, False) for b in (True, False)
    }
    fixed = MOSAIC_GPU.candidates("fwd", call.spec, call.mods, {"MOSAIC_PIPELINED": False})
    assert {cfg.pipelined for _, cfg in fixed} == {False}


def test_says_what_it_cannot_run_and_where_auto_takes_it(monkeypatch):
    S = 256
    q, k, v = random_qkv(1, 1, 2, S, S, 64, dtype=jnp.float16)
    call = prepare(q, k, v)
    spec, mods = call.spec, call.mods
    assert MOSAIC_GPU.supports(spec, mods) is None
    replace = lambda **kw: KernelSpec(**{**spec.__dict__, **kw})
    reasons = {
        "float32": replace(dtype="float32"),
        "head dims (64, 128)": replace(E=96, Ev=96),
        "BlockMask blocks of 128": replace(q_block_size=64, R=4),
        "multiples of the blocks": replace(L=200),
        "index offsets": replace(global_offsets=True),
    }
    for words, bad in reasons.items():
        assert words in MOSAIC_GPU.supports(bad, mods)
    assert MOSAIC_GPU.supports(replace(layout=Layout.BSHD), mods) is None  # both layouts
    doc = jnp.asarray(np.repeat(np.arange(4), 64).astype(np.int32))
    halves = fj.create_block_mask(lambda b, h, q, kv: doc[q // 2] == doc[kv], 1, 1, S, S)
    why = MOSAIC_GPU.supports(spec, prepare(q, k, v, None, halves).mods)
    assert "not q_idx or kv_idx plus a constant" in why
    with pytest.raises(dispatch.BackendUnavailable, match="MOSAIC_GPU.*only contiguous slices"):
        fj.flex_attention(q, k, v, block_mask=halves, kernel_options=MOSAIC)
    docs = prepare(q, k, v, None, fj.create_block_mask(_documents(S), 1, 1, S, S)).mods
    assert MOSAIC_GPU.supports(spec, docs) is None  # staged through shared memory
    with pytest.raises(dispatch.BackendUnavailable, match="float16, bfloat16"):
        fj.flex_attention(*(x.astype(jnp.float32) for x in (q, k, v)), kernel_options=MOSAIC)
    assert dispatch.select_backend("AUTO", spec, mods).name == "TRITON"  # interpret mode
    import pallas_kernels.mosaic_gpu as mosaic_backend
    import pallas_kernels.triton as triton_backend

    for module in (mosaic_backend, triton_backend):
        monkeypatch.setattr(module, "has_gpu", lambda: True)
    monkeypatch.setattr(mosaic_backend, "_is_sm90", lambda: True)
    compiled = replace(interpret=False)
    assert dispatch.select_backend("AUTO", compiled, mods).name == "MOSAIC_GPU"  # sm90
    assert (
        dispatch.select_backend("AUTO", replace(interpret=False, E=96, Ev=96), mods).name
        == "TRITON"
    )
    assert MOSAIC_GPU.auto(compiled, docs) is None  # staged reads: measured faster
    natten = prepare(q, k, v, None, fj.create_block_mask(_natten, 1, 1, S, S)).mods
    assert MOSAIC_GPU.supports(compiled, natten) is None
    # dividing its indices: AUTO takes Triton's forward (measured faster) and this backward
    assert dispatch.select_backend("AUTO", compiled, natten).name == "MOSAIC_GPU"
    assert MOSAIC_GPU.auto_options(compiled, natten) == {"MOSAIC_TRITON_FWD": True}
    assert MOSAIC_GPU.auto_options(compiled, docs) == {}
    said = MOSAIC_GPU.kernels(compiled, natten, auto=True)
    assert said["fwd"].startswith("TRITON (AUTO's choice") and said["bwd"] == "MOSAIC_GPU"
    assert MOSAIC_GPU.kernels(compiled, natten)["fwd"] == "MOSAIC_GPU"  # named: its own
    monkeypatch.setattr(mosaic_backend, "_is_sm90", lambda: False)  # an A100
    assert dispatch.select_backend("AUTO", compiled, mods).name == "TRITON"
    monkeypatch.undo()
    with pytest.raises(ValueError, match="MOSAIC_STAGES"):
        fj.flex_attention(q, k, v, kernel_options={"BACKEND": "TRITON", "MOSAIC_STAGES": 3})
    with pytest.raises(ValueError, match="stages=1 must be >= 2"):
        fj.flex_attention(q, k, v, kernel_options={**MOSAIC, "MOSAIC_STAGES": 1})
    big = [x.astype(jnp.bfloat16) for x in random_qkv(2, 1, 1, S, S, 128)]
    with pytest.raises(ValueError, match="MOSAIC_STAGES=3: .* use fewer stages"):
        fj.flex_attention(*big, kernel_options={**MOSAIC, "MOSAIC_STAGES": 3})
    for bad in (248, 236):  # the producer would keep 8; not a multiple of 8
        with pytest.raises(ValueError, match=f"MOSAIC_BWD_REGISTERS={bad}: .* from 64 to 240"):
            fj.flex_attention(q, k, v, kernel_options={**MOSAIC, "MOSAIC_BWD_REGISTERS": bad})


def test_backward_ring_depths_per_kernel():
    """MOSAIC_BWD_STAGES sets both backward rings, MOSAIC_BWD_DKDV_STAGES the dk/dv kernel's
    alone (its Q/dO tiles are half the dq kernel's K/V tiles: at D=128 it fits a ring of 4
    where the dq kernel fits 2); a ring that does not fit names its option and kernel."""
    from pallas_kernels.mosaic_gpu.bwd import smem_by_kernel

    S = 256
    q, k, v = (x.astype(jnp.bfloat16) for x in random_qkv(3, 1, 1, S, S, 128))
    call = prepare(q, k, v, None, None, kernel_options={"interpret": False})
    four = BwdConfig(dkdv_stages=4)
    need = smem_by_kernel(call.spec, four)
    assert need["dkdv"] <= SMEM_BYTES and need["dq"] == smem_by_kernel(call.spec, BwdConfig())["dq"]
    assert smem_by_kernel(call.spec, BwdConfig(stages=4))["dkdv"] == need["dkdv"]
    assert set(smem_by_kernel(call.spec, four, fused=True)) == {"dkdv"}
    backend = dispatch.backends()["MOSAIC_GPU"]
    cfg = backend.configs(call.spec, call.mods, {"MOSAIC_BWD_DKDV_STAGES": 4}, False).bwd
    assert (cfg.stages, cfg.dkdv_stages) == (2, 4)
    cases = {
        "MOSAIC_BWD_STAGES": (3, "MOSAIC_BWD_STAGES=3: the backward's dq kernel would need"),
        "MOSAIC_BWD_DKDV_STAGES": (6, "MOSAIC_BWD_DKDV_STAGES=6: the backward's dkdv kernel"),
    }
    for key, (depth, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            backend.configs(call.spec, call.mods, {key: depth}, False)
    fused = {"MOSAIC_FUSED_DQ": True, "MOSAIC_BWD_DKDV_STAGES": 4}  # asked: raises, not dropped
    with pytest.raises(ValueError, match="MOSAIC_FUSED_DQ=True: the dk/dv kernel with dq's buffers and a ring of 4"):  # fmt: skip
        backend.configs(call.spec, call.mods, fused, False)
    quiet = backend.configs(call.spec, call.mods, {"MOSAIC_BWD_DKDV_STAGES": 4}, False).bwd
    assert not fused_dq(call.spec, quiet)  # the default's fused dq gives way to the ring asked
    with pytest.raises(ValueError, match="MOSAIC_BWD_DKDV_STAGES=1: dkdv_stages=1 must be >= 2"):
        backend.configs(call.spec, call.mods, {"MOSAIC_BWD_DKDV_STAGES": 1}, False)
    rows = {"MOSAIC_BWD_DKDV_Q_ROWS": 128}
    with pytest.raises(ValueError, match="Q_ROWS=128: dkdv_q_rows=128 takes heads of at most 64"):
        backend.configs(call.spec, call.mods, rows, False)  # E=128
    with pytest.raises(ValueError, match="dkdv_q_rows=96: expected 64 or 128"):
        backend.configs(call.spec, call.mods, {"MOSAIC_BWD_DKDV_Q_ROWS": 96}, False)
    q64 = q[..., :64]
    call64 = prepare(q64, q64, q64, None, None, kernel_options={"interpret": False})
    assert backend.configs(call64.spec, call64.mods, rows, False).bwd.dkdv_q_rows == 128
    with pytest.raises(ValueError, match="dkdv_q_rows=128 with fused_dq"):
        backend.configs(call64.spec, call64.mods, {**rows, "MOSAIC_FUSED_DQ": True}, False)


def test_backward_defaults_by_head_dim_and_determinism(monkeypatch):
    """The measured defaults (`bwd.default_config`): dq fused into the dk/dv kernel, the
    paired order, 240 consumer registers; the dq kernel (bitwise deterministic) when the caller
    turns the fused dq off, asks for 128-row dk/dv steps, or asks for determinism
    (kernel_options["deterministic"], or XLA_FLAGS); the
    autotuner's candidates carry every field, so a cached config rebuilds the same. Grouped-query
    heads at D=128 fuse too, aliased (`bwd._aliased`)."""
    backend = dispatch.backends()["MOSAIC_GPU"]
    specs = {}
    for D in (64, 128):
        q = jnp.zeros((1, 2, 512, D), jnp.bfloat16)
        specs[D] = prepare(q, q, q, None, None, kernel_options={"interpret": False})
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    got = {D: backend.configs(c.spec, c.mods, {}, False).bwd for D, c in specs.items()}
    for D in (64, 128):  # 240 registers where the fused form runs (jax 0.11+, compiled)
        runs = fused_dq(specs[D].spec, got[D])
        assert runs == (compat.JAX_VERSION >= (0, 11))
        assert (got[D].fused_dq, got[D].paired, got[D].registers) == (True, True, 232 + 8 * runs)
    off = backend.configs(specs[128].spec, specs[128].mods, {"MOSAIC_FUSED_DQ": False}, False)
    assert (off.bwd.fused_dq, off.bwd.registers) == (False, 232)
    rows = backend.configs(specs[64].spec, specs[64].mods, {"MOSAIC_BWD_DKDV_Q_ROWS": 128}, False)
    assert not rows.bwd.fused_dq
    for given, fused in (({"deterministic": True}, False), ({"deterministic": False}, True)):
        options = dispatch.KernelOptions.parse(given).for_backend(backend)
        assert backend.configs(specs[128].spec, specs[128].mods, options, False).bwd.fused_dq == fused  # fmt: skip
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
    options = dispatch.KernelOptions.parse({}).for_backend(backend)
    assert not backend.configs(specs[128].spec, specs[128].mods, options, False).bwd.fused_dq
    q, kv = jnp.zeros((1, 4, 512, 128), jnp.bfloat16), jnp.zeros((1, 2, 512, 128), jnp.bfloat16)
    gqa = prepare(q, kv, kv, None, None, enable_gqa=True, kernel_options={"interpret": False})
    cfg = backend.configs(gqa.spec, gqa.mods, {}, False).bwd  # fused, aliased (it fits)
    runs = fused_dq(gqa.spec, cfg)
    assert runs == (compat.JAX_VERSION >= (0, 11)) and _aliased(gqa.spec, cfg)
    assert (cfg.fused_dq, cfg.group_loop, cfg.registers) == (True, False, 232 + 8 * runs)
    q2 = jnp.zeros((2, 2, 512, 128), jnp.bfloat16)  # k, v broadcast over the batch: not measured
    bcast = prepare(q2, kv[:, :2], kv[:, :2], None, None, kernel_options={"interpret": False})
    assert bcast.spec.kv_batch_broadcast
    assert not backend.configs(bcast.spec, bcast.mods, {}, False).bwd.fused_dq
    asked = backend.configs(bcast.spec, bcast.mods, {"MOSAIC_FUSED_DQ": True}, False).bwd
    assert fused_dq(bcast.spec, asked) == (compat.JAX_VERSION >= (0, 11))  # it fits, aliased
    for D, call in specs.items():
        values, cfg = next(iter(backend.candidates("bwd", call.spec, call.mods, {})))
        assert cfg == dataclasses.replace(got[D], triton=cfg.triton)
        assert backend.config_from("bwd", values) == cfg


def test_register_split_fits_the_launch():
    """Three warpgroups launch with 168 registers per thread each (65536 / 384, a multiple of
    8): 504 in all, not 512. setmaxnreg.inc waits for registers the others freed, so a split
    asking more hangs the kernel (240 + 240 + a producer of 32 did, on an H200); the producer
    gets what is left, as FlashAttention-3's 240/240/24."""
    from pallas_kernels.mosaic_gpu import ring

    for consumers in (1, 2, 3):
        per_thread = 65536 // (128 * (consumers + 1)) // 8 * 8
        for asked in range(64, 257, 8):
            try:
                producer, grown = ring.register_split(consumers, asked)
            except ValueError:
                assert per_thread * (consumers + 1) - consumers * asked < 24
                continue
            assert grown == asked and 24 <= producer <= ring.PRODUCER_REGISTERS
            assert producer + consumers * grown <= per_thread * (consumers + 1)
    assert ring.register_split(2, 240) == (24, 240)
    assert ring.register_split(2, 232) == (40, 232)


GPU_CASES = [
    ("causal", None, _causal, 128, 64, jnp.float16),
    ("causal", None, _causal, 128, 128, jnp.bfloat16),
    ("alibi window", _alibi, _window, (128, 64), 128, jnp.bfloat16),
    ("softcap dense", _softcap, None, 128, 64, jnp.float16),
    ("halved odd causal", _halved_odd, _causal, 128, 128, jnp.bfloat16),
    ("empty rows", None, _late_start, 128, 128, jnp.float16),
    ("documents kv bias staged", _kv_bias(2048, 4), _documents(2048), 128, 128, jnp.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}-D{c[4]}-{jnp.dtype(c[5]).name}")
@pytest.mark.parametrize("pipelined", [False, True], ids=["", "pipelined"])
def test_compiled_forward_matches_reference_on_gpu(case, pipelined):
    """The forward, and its pipelined order (MOSAIC_PIPELINED: QK^T with the previous PV)."""
    name, score_mod, mask_mod, block, D, dtype = case
    B, H, S = 2, 4, 2048
    q, k, v = random_qkv(7, B, H, S, S, D, dtype=dtype)
    bm = None if mask_mod is None else fj.create_block_mask(mask_mod, 1, 1, S, S, BLOCK_SIZE=block)
    options = {**MOSAIC, "MOSAIC_PIPELINED": pipelined}
    out, lse = jax.jit(
        lambda q, k, v: fj.flex_attention(
            q, k, v, score_mod, bm, return_lse=True, kernel_options=options
        )
    )(q, k, v)
    ref, ref_lse = flex_attention_reference(
        *(x.astype(jnp.float32) for x in (q, k, v)), score_mod, bm, return_lse=True
    )
    _check(out, lse, ref, ref_lse, TOL[dtype])
    t = lambda x: jnp.swapaxes(x, 1, 2)  # the same call in jax.nn's [B, T, N, H] layout
    out2, lse2 = jax.jit(
        lambda q, k, v: fj.dot_product_attention(
            q, k, v, score_mod, bm, return_lse=True, kernel_options=options
        )
    )(t(q), t(k), t(v))
    np.testing.assert_array_equal(np.asarray(t(out2)), np.asarray(out))
    np.testing.assert_array_equal(np.asarray(t(lse2)), np.asarray(lse))


@pytest.mark.parametrize(
    "pipelined, D",
    [(False, 64), pytest.param(True, 128, marks=pytest.mark.gpu),
     pytest.param(True, 64, marks=pytest.mark.gpu)],
)  # fmt: skip
def test_forward_ignores_non_finite_keys_it_masks_out(pipelined, D):
    """Keys past a sequence's end may hold garbage (an uninitialised cache: NaN, inf); masked
    out, they change nothing: the scores are masked before the softmax, and the pipelined
    order's extra product at step 0 (P = 0) reads that step's V tile, not its K tile.
    (Interpret mode runs the unpipelined order.)"""
    B, H, S, valid = 1, 2, 512 if pipelined else 256, 100
    q, k, v = random_qkv(17, B, H, S, S, D, dtype=jnp.bfloat16)
    bm = fj.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx < valid, 1, 1, S, S)
    garbage = k.at[:, :, valid:].set(jnp.nan).at[:, :, valid + 10].set(jnp.inf)
    options = {**MOSAIC, "MOSAIC_PIPELINED": pipelined}
    attend = jax.jit(
        lambda q, k, v: fj.flex_attention(q, k, v, None, bm, return_lse=True, kernel_options=options)
    )  # fmt: skip
    out, lse = attend(q, garbage, v)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    ref, ref_lse = flex_attention_reference(
        *(x.astype(jnp.float32) for x in (q, k, v)), None, bm, return_lse=True
    )
    _check(out, lse, ref, ref_lse, TOL[jnp.bfloat16])


GPU_BWD_CASES = [
    ("causal", None, _causal, 1, 64, jnp.float16),
    ("causal gqa", None, _causal, 2, 128, jnp.bfloat16),
    ("alibi causal", _alibi, _causal, 1, 128, jnp.bfloat16),
    ("softcap dense", _softcap, None, 1, 64, jnp.float16),
    ("halved odd causal", _halved_odd, _causal, 1, 128, jnp.bfloat16),
    ("empty rows", None, _late_start, 1, 128, jnp.float16),
    ("documents kv bias staged", _kv_bias(1024, 4), _documents(1024), 1, 128, jnp.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case", GPU_BWD_CASES, ids=lambda c: f"{c[0]}-D{c[4]}-{jnp.dtype(c[5]).name}"
)
@pytest.mark.parametrize("variant", ["fused-dq", "dq-kernel", "other-order", "dkdv-ring", "group-loop"])  # fmt: skip
def test_compiled_backward_matches_reference_on_gpu(case, variant):
    """Both backwards: dq accumulated in the dk/dv kernel by TMA reduce-add (the default;
    compiled on jax 0.11+ only) and the dq kernel (MOSAIC_FUSED_DQ=False: bitwise
    deterministic, checked, through kernel_options["deterministic"]); the fused form's other
    matmul order, consumer schedule, row order and register split (`BwdConfig.paired`,
    `.schedule_barrier`, `.longest_first`, `.registers`); and the dk/dv kernel's own ring
    of 4, with steps of 128 q rows at D=64 (`.dkdv_stages`, `.dkdv_q_rows`)."""
    name, score_mod, mask_mod, group, D, dtype = case
    options = {
        "fused-dq": {**MOSAIC, "MOSAIC_FUSED_DQ": True},  # the default (compiled, jax 0.11+)
        "dq-kernel": {**MOSAIC, "deterministic": True},  # the dq kernel (MOSAIC_FUSED_DQ=False)
        "other-order": {**MOSAIC, "MOSAIC_FUSED_DQ": True,  # (the default pairs, with 240)
                        "MOSAIC_BWD_PAIRED": False,
                        "MOSAIC_BWD_SCHEDULE_BARRIER": not BwdConfig.schedule_barrier,
                        "MOSAIC_BWD_LONGEST_FIRST": not BwdConfig.longest_first,
                        "MOSAIC_BWD_REGISTERS": 232},
        "dkdv-ring": {**MOSAIC, "MOSAIC_FUSED_DQ": False, "MOSAIC_BWD_DKDV_STAGES": 4,
                      "MOSAIC_BWD_DKDV_Q_ROWS": 128 if D == 64 else 64},
        "group-loop": {**MOSAIC, "MOSAIC_FUSED_DQ": True, "MOSAIC_BWD_GROUP_LOOP": True},
    }[variant]  # fmt: skip
    if variant == "group-loop" and group == 1:
        pytest.skip("the group loop is for grouped-query heads")
    B, H, S = 2, 4, 1024
    q, k, v = random_qkv(8, B, H, S, S, D, Hkv=H // group, dtype=dtype)
    bm = None if mask_mod is None else fj.create_block_mask(mask_mod, 1, 1, S, S)
    gqa = group > 1
    grads = jax.jit(lambda q, k, v: _grads(q, k, v, score_mod, bm, options, gqa))
    if variant == "dkdv-ring" and gqa and D == 128:  # + float32 dk, dv staging: over 227 KiB
        with pytest.raises(ValueError, match="MOSAIC_BWD_DKDV_STAGES=4: .* dkdv kernel"):
            grads(q, k, v)
        return
    count = lambda: (dispatch.trace_count("dkdv", "MOSAIC_GPU"), dispatch.trace_count("dq", "MOSAIC_GPU"))  # fmt: skip
    before = count()
    got = grads(q, k, v)
    two_kernels = variant in ("dq-kernel", "dkdv-ring")  # else dq fused into the dk/dv kernel
    assert count() == (before[0] + 1, before[1] + two_kernels)
    want = _grads(q, k, v, score_mod, bm, None, gqa, reference=True)
    _check_grads(got, want, TOL[dtype])
    if variant == "dq-kernel":  # no atomics: bitwise the same, run to run
        for a, b in zip(got, grads(q, k, v), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    t = lambda x: jnp.swapaxes(x, 1, 2)  # [B, T, N, H]: the same gradients

    def loss(q, k, v):
        out = fj.dot_product_attention(q, k, v, score_mod, bm, kernel_options=options)
        return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(D, dtype=jnp.float32)))

    def loss_bhsd(q, k, v):
        out = fj.flex_attention(q, k, v, score_mod, bm, enable_gqa=gqa, kernel_options=options)
        return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(D, dtype=jnp.float32)))

    g_bshd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(t(q), t(k), t(v))
    g_bhsd = jax.jit(jax.grad(loss_bhsd, argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_bshd, g_bhsd, strict=True):
        np.testing.assert_allclose(
            np.asarray(t(a), np.float32), np.asarray(b, np.float32), atol=TOL[dtype]
        )


@pytest.mark.gpu
def test_long_sequence_past_256_blocks_on_gpu():
    """S = 40960 (320 blocks: lists copied in pieces, `compat.copy_list`): forward, the
    gradients and a decode step match the Triton backend's (the dense reference would need
    S^2 memory)."""
    S, D = 40960, 64
    q, k, v = random_qkv(41, 1, 2, S, S, D, dtype=jnp.bfloat16)
    bm = fj.create_block_mask(_documents(S), 1, 1, S, S)

    def run(backend):
        options = {"BACKEND": backend}
        f = lambda q, k, v: fj.flex_attention(q, k, v, _alibi, bm, kernel_options=options)
        out, pull = jax.vjp(f, q, k, v)
        grads = pull(jnp.cos(out.astype(jnp.float32)).astype(out.dtype))
        step = fj.flex_attention(q[:, :, -1:], k, v, kernel_options=options)  # decode
        return (out, *grads, step)

    before = dispatch.trace_count("dkdv", "MOSAIC_GPU"), dispatch.trace_count("decode", "MOSAIC_GPU")  # fmt: skip
    got = jax.jit(lambda q, k, v: run("MOSAIC_GPU"))(q, k, v)
    after = dispatch.trace_count("dkdv", "MOSAIC_GPU"), dispatch.trace_count("decode", "MOSAIC_GPU")  # fmt: skip
    assert after == (before[0] + 1, before[1] + 1)
    want = jax.jit(lambda q, k, v: run("TRITON"))(q, k, v)
    for name, g, w in zip(("out", "dq", "dk", "dv", "decode"), got, want, strict=True):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.isfinite(g).all(), name
        np.testing.assert_allclose(g, w, atol=2e-2 * max(1.0, np.abs(w).max()), err_msg=name)


@pytest.mark.gpu
def test_auto_runs_natten_forward_on_triton_and_backward_here_on_gpu():
    """AUTO on a mask dividing its indices (natten on a 64 x 64 image): Triton's forward, this
    backend's backward (`auto_options`), gradients as the float32 reference's."""
    S, D = 4096, 64
    natten = masks.generate_natten(64, 64, 7, 7)
    q, k, v = random_qkv(43, 1, 2, S, S, D, dtype=jnp.float16)
    bm = fj.create_block_mask(natten, 1, 1, S, S)
    kernels = (("fwd", "TRITON"), ("fwd", "MOSAIC_GPU"), ("dkdv", "MOSAIC_GPU"))
    before = [dispatch.trace_count(*kb) for kb in kernels]
    got = jax.jit(lambda q, k, v: _grads(q, k, v, None, bm, {}))(q, k, v)  # AUTO
    traced = [dispatch.trace_count(*kb) - n for kb, n in zip(kernels, before, strict=True)]
    assert traced[0] > 0 and traced[1:] == [0, 1]
    _check_grads(got, _grads(q, k, v, None, bm, None, reference=True), TOL[jnp.float16])


GPU_DECODE_CASES = {
    # name: (B, Hq, Hkv, L, S, D), dtype, score_mod, mask_mod (and its heads)
    "gqa 4 packed, causal end": ((4, 16, 4, 1, 8192, 128), jnp.bfloat16, None, (_window_end(8192, 1, 8192), 1)),
    "gqa packed, 3 rows, alibi window": ((2, 8, 2, 3, 4096, 64), jnp.float16, _alibi, (_window_end(4096, 3, 1500), 1)),
    "kv bias staged, per-head empty": ((2, 2, 2, 1, 4096, 128), jnp.bfloat16, _kv_bias(4096, 2), (_head_prefix, 2)),
}  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_DECODE_CASES))
def test_compiled_decode_matches_reference_on_gpu(name):
    (B, Hq, Hkv, L, S, D), dtype, score_mod, (mask_mod, Hm) = GPU_DECODE_CASES[name]
    q, k, v = random_qkv(14, B, Hq, L, S, D, Hkv=Hkv, dtype=dtype)
    bm = None if mask_mod is None else fj.create_block_mask(mask_mod, 1, Hm, L, S)
    gqa = Hq != Hkv
    before = dispatch.trace_count("decode", "MOSAIC_GPU")
    out, lse = jax.jit(
        lambda q, k, v: fj.flex_attention(
            q, k, v, score_mod, bm, enable_gqa=gqa, return_lse=True, kernel_options=MOSAIC
        )
    )(q, k, v)
    assert dispatch.trace_count("decode", "MOSAIC_GPU") == before + 1
    qkv = (x.astype(jnp.float32) for x in (q, k, v))
    ref, ref_lse = flex_attention_reference(*qkv, score_mod, bm, enable_gqa=gqa, return_lse=True)
    _check(out, lse, ref, ref_lse, TOL[dtype])


@pytest.mark.parametrize("offsets", [False, True], ids=["own-indices", "offsets"])
def test_kernel_indices_are_bounded_for_relative_positions(offsets):
    """`TileMods` marks the kernels' own q_idx and kv_idx vectors with their bound
    (`score_tile._bounded`), so ALiBi's `q_idx - kv_idx` reaches float32 as two converted
    vectors (`mod_eval._OuterSum`: no integer tile converted); with an offsets operand
    (meshes, decode positions: traced shifts) nothing is marked and the tile is converted."""
    from flexjax import mods
    from pallas_kernels.mosaic_gpu.tile_ops import MosaicTileOps
    from pallas_kernels.score_tile import TileMods
    from pallas_kernels.triton.launch import kernel_mods

    q = jnp.zeros((1, 2, 256, 64), jnp.float16)
    alibi = mods.generate_alibi_functional(2)
    call = prepare(q, q, q, alibi, None, kernel_options={"interpret": True})
    programs, tile = kernel_mods(call.mods)["programs"], (64, 128)

    def scores(s):
        ops = MosaicTileOps(True, tile)
        shifts = jnp.zeros(4, jnp.int32) if offsets else None
        tile_mods = TileMods(call.spec, programs, [], [], shifts, ops)
        q_idx, kv_idx = ops.index(jnp.int32(64), 0), ops.index(jnp.int32(128), 1)
        return tile_mods.apply(s, jnp.int32(0), jnp.int32(1), q_idx, kv_idx, False)[0]

    eqns = jax.make_jaxpr(scores)(jnp.zeros(tile, jnp.float32)).jaxpr.eqns
    converted = [
        e for e in eqns
        if e.primitive.name == "convert_element_type" and e.invars[0].aval.shape == tile
        and jnp.issubdtype(e.invars[0].aval.dtype, jnp.integer)
    ]  # fmt: skip
    assert len(converted) == (1 if offsets else 0), converted
