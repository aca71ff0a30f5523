"""Default kernel configs, and kernel_options parsing.

One heuristic function picks the compute tiles; the BlockMask's sparse block
size is a separate idea (a compute tile must divide it). Numbers for the GPU
follow the tile sizes PyTorch's FlexAttention uses on Hopper for the same head
dims (128 x 64 tiles, 4 warps, 3 stages at D <= 64); they are starting points
for the tuning of issue 7, not measurements of flexjax's own kernels yet.
"""

from __future__ import annotations

import jax

from pallas_kernels.flex_bwd_triton import BwdConfig
from pallas_kernels.flex_fwd_triton import FwdConfig

__all__ = ["KERNEL_OPTION_KEYS", "bwd_config", "default_interpret", "fwd_config"]

FWD_OPTION_KEYS = ("block_m", "block_n", "num_warps", "num_stages")
BWD_OPTION_KEYS = ("bwd_block_m", "bwd_block_n", "bwd_num_warps", "bwd_num_stages")
KERNEL_OPTION_KEYS = (*FWD_OPTION_KEYS, *BWD_OPTION_KEYS, "interpret")


def default_interpret() -> bool:
    """Interpret mode whenever JAX has no GPU, so CPU tests run the real kernel code."""
    try:
        return not any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return True


def _largest_pow2_divisor(n: int, cap: int) -> int:
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fwd_config(
    *,
    head_dim: int,
    q_len: int,
    q_block_size: int,
    kv_block_size: int,
    interpret: bool,
    options: dict | None,
) -> FwdConfig:
    options = dict(options or {})
    _check_keys(options)
    if interpret:
        # Few, large tiles keep interpret mode fast; nothing constrains the shapes.
        want_m, want_n, warps, stages = 64, 64, 4, 1
    elif head_dim <= 64:
        want_m, want_n, warps, stages = 128, 64, 4, 3
    elif head_dim <= 128:
        want_m, want_n, warps, stages = 128, 32, 8, 2
    else:
        want_m, want_n, warps, stages = 64, 32, 4, 2
    # A q tile never needs to be longer than the (padded) query.
    want_m = min(want_m, max(16, _pow2_at_least(q_len)))
    cfg = FwdConfig(
        block_m=options.get("block_m", _largest_pow2_divisor(q_block_size, want_m)),
        block_n=options.get("block_n", _largest_pow2_divisor(kv_block_size, want_n)),
        num_warps=options.get("num_warps", warps),
        num_stages=options.get("num_stages", stages),
    )
    _check_tiles(cfg, "", q_block_size, kv_block_size, interpret)
    return cfg


def bwd_config(
    *, head_dim: int, q_block_size: int, kv_block_size: int, interpret: bool, options: dict | None
) -> BwdConfig:
    """Tiles for the dq and dk/dv kernels (`bwd_*` kernel_options override them)."""
    options = dict(options or {})
    _check_keys(options)
    if interpret or head_dim <= 64:
        want_m, want_n, warps, stages = 64, 64, 4, 2
    elif head_dim <= 128:
        want_m, want_n, warps, stages = 64, 64, 8, 2
    else:
        want_m, want_n, warps, stages = 32, 32, 4, 1
    cfg = BwdConfig(
        block_m=options.get("bwd_block_m", _largest_pow2_divisor(q_block_size, want_m)),
        block_n=options.get("bwd_block_n", _largest_pow2_divisor(kv_block_size, want_n)),
        num_warps=options.get("bwd_num_warps", warps),
        num_stages=options.get("bwd_num_stages", stages),
    )
    _check_tiles(cfg, "bwd_", q_block_size, kv_block_size, interpret)
    return cfg


def _check_keys(options: dict) -> None:
    unknown = set(options) - set(KERNEL_OPTION_KEYS)
    if unknown:
        raise ValueError(
            f"kernel_options has unknown keys {sorted(unknown)}; known: {list(KERNEL_OPTION_KEYS)}"
        )


def _check_tiles(cfg, prefix: str, q_block_size: int, kv_block_size: int, interpret: bool):
    block_m, block_n = cfg.block_m, cfg.block_n
    names = f"{prefix}block_m={block_m}, {prefix}block_n={block_n}"
    if q_block_size % block_m or kv_block_size % block_n:
        raise ValueError(
            f"kernel tiles ({names}) must divide the BlockMask's "
            f"BLOCK_SIZE ({q_block_size}, {kv_block_size})"
        )
    if not interpret and min(block_m, block_n) < 16:
        raise ValueError(
            f"on the GPU the kernel tiles must be at least 16 (got {names}); "
            "use a BlockMask BLOCK_SIZE with a power-of-2 factor >= 16"
        )
