"""Autotuning: picks a config from the space, caches it in memory and on disk, respects fixed options.

CPU: interpret mode with the tiny interpret space (the mechanism, not the
speed). GPU (-m gpu): one tuned call at a seed-like shape, checked against
the reference.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_qkv

import flexjax as fj
from flexjax.reference import flex_attention_reference
from pallas_kernels import autotune


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXJAX_CACHE_DIR", str(tmp_path))
    autotune.clear_memory_cache()
    jax.clear_caches()  # a new process has no compiled calls either
    yield tmp_path
    autotune.clear_memory_cache()
    jax.clear_caches()  # a new process has no compiled calls either


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def tuned_call(q, k, v, bm, **extra):
    options = {"autotune": True, "decode": False, **extra}
    return fj.flex_attention(q, k, v, block_mask=bm, kernel_options=options)


def test_autotune_times_the_space_once_then_reads_the_file(cache_dir):
    q, k, v = random_qkv(0, 1, 2, 100, 100, 16)
    bm = fj.create_block_mask(causal, 1, 1, 100, 100, BLOCK_SIZE=64)
    before = dict(autotune.stats)
    out = tuned_call(q, k, v, bm)
    ref = flex_attention_reference(q, k, v, block_mask=bm)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)
    # Forward space: block_m 32 / 64; backward: block_n 32 / 64.
    assert autotune.stats["timed"] - before["timed"] == 4
    saved = json.loads((cache_dir / "autotune.json").read_text())
    assert len(saved) == 2
    for entry in saved.values():
        assert entry["config"] in [t["config"] for t in entry["tried"]]
        assert entry["ms"] == min(t["ms"] for t in entry["tried"])

    # Same call again: memory; a new process (memory cleared): the file. No timing either way.
    tuned_call(q, k, v, bm)
    autotune.clear_memory_cache()
    jax.clear_caches()  # a new process has no compiled calls either
    grads = jax.grad(lambda q: jnp.sum(tuned_call(q, k, v, bm)))(q)
    assert autotune.stats["timed"] - before["timed"] == 4
    assert autotune.stats["from_file"] - before["from_file"] == 2
    want = jax.grad(lambda q: jnp.sum(flex_attention_reference(q, k, v, block_mask=bm)))(q)
    np.testing.assert_allclose(np.asarray(grads), np.asarray(want), atol=1e-4, rtol=1e-4)


def test_autotune_under_jit_with_traced_block_mask(cache_dir, monkeypatch):
    """Traced tables: the search walks every block of the same shapes, running kernels (not
    tracing them into the user's jit); the result is still exact."""
    q, k, v = random_qkv(1, 1, 2, 64, 96, 16)
    bm = fj.create_block_mask(causal, 1, 1, 64, 96, BLOCK_SIZE=32)
    timed = []

    def spy(fn, reps):
        timed.append(jax.tree.leaves(fn()))
        return 1.0

    monkeypatch.setattr(autotune, "median_ms", spy)
    out = jax.jit(tuned_call)(q, k, v, bm)
    assert timed and all(not isinstance(x, jax.core.Tracer) for leaves in timed for x in leaves)
    ref = flex_attention_reference(q, k, v, block_mask=bm)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)
    assert len(json.loads((cache_dir / "autotune.json").read_text())) == 2


def test_autotune_holds_explicit_options_fixed(cache_dir):
    q, k, v = random_qkv(2, 1, 1, 64, 64, 16)
    before = autotune.stats["timed"]
    tuned_call(q, k, v, None, block_m=32, bwd_block_n=32)
    assert autotune.stats["timed"] - before == 2  # one forward, one backward candidate
    configs = [e["config"] for e in json.loads((cache_dir / "autotune.json").read_text()).values()]
    assert {"block_m": 32, "block_n": 32, "num_warps": 4, "num_stages": 1} in configs


def test_autotune_survives_a_corrupt_cache_file(cache_dir):
    (cache_dir / "autotune.json").write_text("{not json")
    q, k, v = random_qkv(3, 1, 1, 32, 32, 16)
    with pytest.warns(UserWarning, match="unreadable"):
        out = tuned_call(q, k, v, None)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(flex_attention_reference(q, k, v)), atol=2e-5, rtol=2e-5
    )
    assert len(json.loads((cache_dir / "autotune.json").read_text())) == 2


def test_autotune_option_must_be_bool():
    q, k, v = random_qkv(4, 1, 1, 32, 32, 16)
    with pytest.raises(ValueError, match="kernel_options\\['autotune'\\] must be True or False"):
        fj.flex_attention(q, k, v, kernel_options={"autotune": "max"})


@pytest.mark.gpu
def test_gpu_autotune_causal(cache_dir):
    q, k, v = random_qkv(5, 2, 8, 4096, 4096, 64, dtype=jnp.float16)
    bm = fj.create_block_mask(causal, 1, 1, 4096, 4096)
    out = tuned_call(q, k, v, bm)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = flex_attention_reference(*f32, block_mask=bm)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=2e-2, rtol=2e-2)
    entries = json.loads((cache_dir / "autotune.json").read_text()).values()
    assert all(len(e["tried"]) >= 8 for e in entries)


def test_dense_walk_visits_every_block_of_the_tables_it_stands_for():
    """With traced tables the search walks every block: partial ones, or full ones without a mask."""
    from flexjax.api import _full_tables
    from pallas_kernels.spec import KernelSpec

    def spec(has_partial):
        return KernelSpec(
            B=1, Hq=1, Hkv=1, L=300, S=200, E=16, Ev=16, Bkv=1, mask_batch_broadcast=True,
            mask_head_broadcast=True, q_block_size=128, kv_block_size=128, R=3, C=2, scale=1.0,
            dtype="float32", has_partial=has_partial, has_full=True, interpret=True,
        )  # fmt: skip

    tables = _full_tables(300, 200, 128, 128)  # R = 3 rows, C = 2 columns
    walk = autotune._dense_walk_tables(spec(False), tables)
    assert [t.shape for t in walk] == [t.shape for t in tables]
    assert (np.asarray(walk.kv_num_blocks) == 0).all()
    assert (np.asarray(walk.full_kv_num_blocks) == 2).all()
    assert (np.asarray(walk.q_num_blocks) == 0).all()
    assert (np.asarray(walk.full_q_num_blocks) == 3).all()
    np.testing.assert_array_equal(np.asarray(walk.full_kv_indices)[0, 0, 0], np.arange(2))

    bm = fj.create_block_mask(causal, 1, 1, 300, 200, BLOCK_SIZE=128)
    walk = autotune._dense_walk_tables(spec(True), bm.kernel_tables())
    assert (np.asarray(walk.kv_num_blocks) == 2).all()
    assert (np.asarray(walk.full_kv_num_blocks) == 0).all()
    assert (np.asarray(walk.q_num_blocks) == 3).all()
    assert (np.asarray(walk.full_q_num_blocks) == 0).all()
