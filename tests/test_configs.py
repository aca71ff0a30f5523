"""Kernel config choice: the GPU defaults, what mods gather, and fitting shared memory.

Pure config arithmetic (interpret=False only picks the GPU tables here; no
kernel runs), so these run on any machine.
"""

import jax.numpy as jnp
import pytest
from helpers import learnable_biases

from flexjax.examples import EXAMPLES
from pallas_kernels.mod_eval import NO_LOADS, ModLoads, mod_loads
from pallas_kernels.mod_trace import trace_mod
from pallas_kernels.triton import configs
from pallas_kernels.triton.bwd import BwdConfig
from pallas_kernels.triton.configs import bwd_config, decode_config, fwd_config
from pallas_kernels.triton.fwd import FwdConfig

H100_SMEM = 232448


@pytest.fixture
def h100(monkeypatch):
    monkeypatch.setattr(configs, "smem_limit", lambda: H100_SMEM)


def fwd(head_dim, dtype, loads=NO_LOADS, options=None, q_len=8192):
    return fwd_config(
        head_dim=head_dim, dtype=dtype, q_len=q_len, q_block_size=128, kv_block_size=128,
        interpret=False, options=options, loads=loads,
    )  # fmt: skip


def bwd(head_dim, dtype, loads=NO_LOADS, options=None):
    return bwd_config(
        head_dim=head_dim, dtype=dtype, q_block_size=128, kv_block_size=128,
        interpret=False, options=options, loads=loads,
    )  # fmt: skip


def loads_of(name):
    case = EXAMPLES[name].case("small")
    total = ModLoads()
    for fn, is_score_mod in ((case.score_mod, True), (case.mask_mod, False)):
        if fn is not None:
            total = total + mod_loads(trace_mod(fn, is_score_mod)[0])
    return total


def test_mod_loads_classifies_gathers():
    assert loads_of("causal") == ModLoads(0, 0)
    assert loads_of("alibi_functional") == ModLoads(0, 0)  # slopes[h]: a scalar per tile
    assert loads_of("document") == ModLoads(0, 2)  # doc[q_idx], doc[kv_idx]
    assert loads_of("jagged") == ModLoads(0, 4)  # and offsets[] of both
    # slopes[h] (scalar), table[q - kv] (f32 tile), graph[h, dist[b, q, kv]] (i32 + f32 tiles)
    extra, make_kw = learnable_biases(2, 4, 64, 64, alibi_scale=0.01)
    program, _ = trace_mod(make_kw(*extra)["score_mod"], is_score_mod=True)
    assert mod_loads(program) == ModLoads(tile_bytes=12, vector_loads=0)
    assert mod_loads(None) == ModLoads()


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gpu_defaults_are_the_tables_when_nothing_is_gathered(h100, head_dim, dtype):
    is_f32 = dtype == jnp.float32
    m, n, w, s = configs._FWD_GPU[(is_f32, head_dim)]
    assert fwd(head_dim, dtype) == FwdConfig(block_m=m, block_n=n, num_warps=w, num_stages=s)
    m, n, w, s = configs._BWD_GPU[(is_f32, head_dim)]
    assert bwd(head_dim, dtype) == BwdConfig(block_m=m, block_n=n, num_warps=w, num_stages=s)


def test_gather_heavy_mods_take_smaller_forward_tiles_at_head_dim_128(h100):
    assert fwd(128, jnp.bfloat16, loads_of("jagged")).block_m == 64
    assert fwd(128, jnp.bfloat16).block_m == 128
    assert fwd(128, jnp.bfloat16, loads_of("document")).block_m == 128
    assert fwd(64, jnp.float16, loads_of("jagged")).block_m == 128  # D=64 keeps its tiles


def test_tile_gathers_lower_stages_then_tiles_to_fit_shared_memory(h100):
    loads = ModLoads(tile_bytes=12)
    cfg = fwd(64, jnp.float16, loads)
    row = 64 * 2
    need = cfg.num_stages * (2 * cfg.block_n * row + cfg.block_m * cfg.block_n * 12)
    assert need + cfg.block_m * row <= H100_SMEM
    assert (cfg.block_m, cfg.block_n, cfg.num_stages) == (128, 64, 1)
    # Given options stay; only the others move.
    cfg = fwd(64, jnp.float16, loads, options={"num_stages": 2})
    assert cfg.num_stages == 2 and cfg.block_n < 128
    # Nothing left to lower: the caller's tiles as given (Triton reports the shortfall).
    given = {"block_m": 128, "block_n": 128, "num_stages": 3}
    cfg = fwd(64, jnp.float16, loads, options=given)
    assert (cfg.block_m, cfg.block_n, cfg.num_stages) == (128, 128, 3)
    b = bwd(128, jnp.bfloat16, loads)
    need = b.num_stages * (2 * b.block_m * 256 + b.block_m * b.block_n * 12)
    assert need + 2 * b.block_n * 256 <= H100_SMEM


def test_smaller_shared_memory_lowers_the_default_stages(monkeypatch):
    monkeypatch.setattr(configs, "smem_limit", lambda: 101376)  # e.g. sm_86 / sm_89
    cfg = fwd(64, jnp.float16)  # 128 x 128 at 3 stages needs 114688 B
    assert (cfg.block_m, cfg.block_n, cfg.num_stages) == (128, 128, 2)


def test_decode_lowers_stages_for_tile_gathers(h100):
    kw = dict(
        batch=8, q_heads=32, group_size=4, q_len=32, q_block_size=128, kv_block_size=128,
        kv_blocks=256, mask_head_broadcast=True, head_dim=128, dtype=jnp.bfloat16,
        interpret=False, options=None,
    )  # fmt: skip
    plain = decode_config(**kw)
    gathered = decode_config(**kw, loads=ModLoads(tile_bytes=12))  # 128 packed rows
    assert plain.num_stages == configs._DECODE_GPU[2]
    assert gathered.num_stages < plain.num_stages


def test_interpret_mode_ignores_shared_memory():
    cfg = fwd_config(
        head_dim=64, dtype=jnp.float16, q_len=256, q_block_size=128, kv_block_size=128,
        interpret=True, options=None, loads=ModLoads(tile_bytes=1 << 20),
    )  # fmt: skip
    assert (cfg.block_m, cfg.block_n) == (64, 64)
