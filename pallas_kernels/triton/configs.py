"""The Triton kernels' configs: defaults, kernel_options, shared-memory fit and the autotune space.

One heuristic function per kernel picks the compute tiles; the BlockMask's
sparse block size is a separate idea (a compute tile must divide it). The GPU
defaults are per (dtype, head dim) and come from `bench/sweep_configs.py` on
an H100 (bench/results/sweep_*): the fastest config there, preferring fewer
resources on near ties. `pallas_kernels.autotune` can time `AUTOTUNE_SPACE`
for a particular call instead.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.mod_eval import NO_LOADS, ModLoads
from pallas_kernels.triton.bwd import BwdConfig
from pallas_kernels.triton.decode import DecodeConfig
from pallas_kernels.triton.fwd import FwdConfig
from pallas_kernels.triton.launch import padded_dim

__all__ = [
    "AUTOTUNE_SPACE",
    "OPTION_KEYS",
    "bwd_config",
    "decode_config",
    "fwd_config",
    "smem_limit",
    "tiles_divide",
]

FWD_OPTION_KEYS = ("block_m", "block_n", "num_warps", "num_stages")
BWD_OPTION_KEYS = ("bwd_block_m", "bwd_block_n", "bwd_num_warps", "bwd_num_stages")
DECODE_OPTION_KEYS = ("decode_block_n", "decode_splits", "decode_num_warps", "decode_num_stages")
# The kernel_options keys the Triton backend reads (beside the generic ones of `dispatch`).
OPTION_KEYS = (*FWD_OPTION_KEYS, *BWD_OPTION_KEYS, *DECODE_OPTION_KEYS)

# Searched values per kernel (`pallas_kernels.autotune`, `bench/sweep_configs.py`);
# explicitly given kernel_options are held fixed.
AUTOTUNE_SPACE = {
    "gpu": {
        "fwd": dict(
            block_m=(64, 128), block_n=(32, 64, 128), num_warps=(4, 8), num_stages=(1, 2, 3)
        ),
        "bwd": dict(block_m=(32, 64, 128), block_n=(64, 128), num_warps=(4, 8), num_stages=(1, 2)),
    },
    # Interpret mode: a tiny space, so CPU tests exercise the mechanism.
    "interpret": {
        "fwd": dict(block_m=(32, 64), block_n=(32,), num_warps=(4,), num_stages=(1,)),
        "bwd": dict(block_m=(32,), block_n=(32, 64), num_warps=(4,), num_stages=(1,)),
    },
}

# (block_m, block_n, num_warps, num_stages) by (float32?, head dim bound); measured
# choices cite bench/results/sweep_h100_2026-11-25.md, the others are untested guesses.
_FWD_GPU = {
    # With the carried-start walk (the sweep's last section): noop fp16 11.95 ms (best
    # 128 x 64 s4: 11.83), causal fp16 6.25 (best 6.19); torch's own choice too.
    (False, 64): (128, 128, 4, 3),
    (False, 128): (128, 64, 4, 2),  # causal bf16: 2.80 ms vs 3.20 at 3 stages
    (False, 256): (64, 32, 4, 2),
    # float32 (IEEE products): 128 x 64 with 4 warps spills, 12x slower than 64 x 64.
    (True, 64): (64, 64, 4, 2),
    (True, 128): (64, 32, 4, 2),
    (True, 256): (32, 32, 4, 1),
}
_BWD_GPU = {
    (False, 64): (64, 64, 4, 2),  # causal fp16: 18.8 ms, 128 x 64 s2 17.9 in one run
    (False, 128): (64, 64, 4, 2),  # causal bf16: 7.8 ms; 9.4 with 3 stages, 20.3 with 8 warps
    (False, 256): (32, 32, 4, 1),
    (True, 64): (64, 64, 4, 2),
    (True, 128): (32, 64, 4, 2),
    (True, 256): (32, 32, 4, 1),
}
# A mod that gathers from captured arrays at least this often per element (or gathers
# a whole [BM, BN] tile) takes 64 x 64 forward tiles at head dims 65..128: jagged
# (4 gathers) bf16 D=128 B=4 H=16 ran 2.31 ms at 128 x 64 s2 and 1.21 at 64 x 64 s2
# (sweep_h100_2026-11-26.md); document (2 gathers) is fastest at 128 x 64.
_GATHER_HEAVY = 4
_FWD_GPU_GATHER_HEAVY_128 = (64, 64, 4, 2)
# Decode kernel: block_n, num_warps, num_stages.
_DECODE_GPU = (64, 4, 3)


# Shared memory one program may use, by compute capability (Triton's limit: the
# opt-in maximum per block); other GPUs get the smallest of these.
_SMEM_BYTES = {(8, 0): 166912, (8, 7): 166912, (9, 0): 232448, (10, 0): 232448}
_SMEM_FALLBACK = 101376


def smem_limit() -> int:
    """Bytes of shared memory a kernel program may use on this process's first GPU."""
    try:
        major, minor = (int(x) for x in str(jax.devices()[0].compute_capability).split("."))
    except (AttributeError, RuntimeError, ValueError):
        return _SMEM_FALLBACK
    return _SMEM_BYTES.get((major, minor), _SMEM_FALLBACK)


def _shrink_to_fit(tiles: tuple, smem_bytes, limit: int, given: tuple) -> tuple:
    """Lower what the caller did not give -- stages first (one at a time), then
    block_n, then block_m (halved) -- until smem_bytes(block_m, block_n, stages)
    fits `limit`; the tiles unchanged if no such config exists.

    tiles and given: (block_m, block_n, num_stages) and which of them came
    from kernel_options. The estimates count each streamed tile num_stages
    deep (K and V, or Q and dO, plus the mods' [BM, BN] gathers) and the
    stationary tiles once: exact for plain tiles (the 128 x 128 backward at 3
    stages, D=128: 262144 B, as Triton reports) and high for gathers (Triton
    buffers some of those fewer times), so it errs towards a config that compiles.
    """
    bm, bn, stages = tiles
    while smem_bytes(bm, bn, stages) > limit:
        if stages > 1 and not given[2]:
            stages -= 1
        elif bn > 16 and not given[1]:
            bn //= 2
        elif bm > 16 and not given[0]:
            bm //= 2
        else:  # the caller's own tiles cannot fit: Triton will say so about them
            return tiles
    return bm, bn, stages


def _row_bytes(head_dim: int, dtype) -> int:
    return padded_dim(head_dim) * jnp.dtype(dtype).itemsize  # one q/k/v tile row


def _forward_smem(head_dim: int, dtype, loads: ModLoads):
    """Shared-memory estimate of the forward and decode kernels: K and V streamed
    (block_n rows) beside the mods' tile gathers, the q rows (block_m) resident."""
    row = _row_bytes(head_dim, dtype)
    return lambda bm, bn, st: st * (2 * bn * row + bm * bn * loads.tile_bytes) + bm * row


def _backward_smem(head_dim: int, dtype, loads: ModLoads):
    """Both backward kernels stream two block_m-row tiles past two resident block_n-row ones."""
    row = _row_bytes(head_dim, dtype)
    return lambda bm, bn, st: st * (2 * bm * row + bm * bn * loads.tile_bytes) + 2 * bn * row


def tiles_divide(block_m: int, block_n: int, q_bs: int, kv_bs: int, both_ways: bool) -> bool:
    """block_m | q_bs and block_n | kv_bs, and with both_ways also transposed."""
    ok = q_bs % block_m == 0 and kv_bs % block_n == 0
    return ok and (not both_ways or (q_bs % block_n == 0 and kv_bs % block_m == 0))


def _largest_pow2_divisor(n: int, cap: int) -> int:
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _gpu_default(table: dict, head_dim: int, dtype) -> tuple:
    is_f32 = jnp.dtype(dtype) == jnp.float32
    for bound in (64, 128, 256):
        if head_dim <= bound:
            return table[(is_f32, bound)]
    return table[(is_f32, 256)]


def fwd_config(
    *,
    head_dim: int,
    dtype,
    q_len: int,
    q_block_size: int,
    kv_block_size: int,
    interpret: bool,
    options: dict | None,
    loads: ModLoads = NO_LOADS,
) -> FwdConfig:
    """The forward kernel's config; loads: what the call's mods gather (mod_loads)."""
    options = dict(options or {})
    if interpret:
        # Few, large tiles keep interpret mode fast; nothing constrains the shapes.
        want_m, want_n, warps, stages = 64, 64, 4, 1
    else:
        want_m, want_n, warps, stages = _gpu_default(_FWD_GPU, head_dim, dtype)
        heavy = loads.tile_bytes > 0 or loads.vector_loads >= _GATHER_HEAVY
        if heavy and 64 < head_dim <= 128 and jnp.dtype(dtype) != jnp.float32:
            want_m, want_n, warps, stages = _FWD_GPU_GATHER_HEAVY_128
    # A q tile never needs to be longer than the (padded) query.
    want_m = min(want_m, max(16, _pow2_at_least(q_len)))
    tiles = (
        options.get("block_m", _largest_pow2_divisor(q_block_size, want_m)),
        options.get("block_n", _largest_pow2_divisor(kv_block_size, want_n)),
        options.get("num_stages", stages),
    )
    if not interpret:
        given = tuple(k in options for k in ("block_m", "block_n", "num_stages"))
        smem = _forward_smem(head_dim, dtype, loads)
        tiles = _shrink_to_fit(tiles, smem, smem_limit(), given)
    block_m, block_n, stages = tiles
    cfg = FwdConfig(
        block_m=block_m,
        block_n=block_n,
        num_warps=options.get("num_warps", warps),
        num_stages=stages,
    )
    _check_tiles(cfg, "", q_block_size, kv_block_size, interpret)
    return cfg


def bwd_config(
    *,
    head_dim: int,
    dtype,
    q_block_size: int,
    kv_block_size: int,
    interpret: bool,
    options: dict | None,
    loads: ModLoads = NO_LOADS,
) -> BwdConfig:
    """Tiles for the dq and dk/dv kernels (`bwd_*` kernel_options override them)."""
    options = dict(options or {})
    if interpret:
        want_m, want_n, warps, stages = 64, 64, 4, 2
    else:
        want_m, want_n, warps, stages = _gpu_default(_BWD_GPU, head_dim, dtype)
    both = math.gcd(q_block_size, kv_block_size)  # the tiles serve both ways round
    tiles = (
        options.get("bwd_block_m", _largest_pow2_divisor(both, want_m)),
        options.get("bwd_block_n", _largest_pow2_divisor(both, want_n)),
        options.get("bwd_num_stages", stages),
    )
    if not interpret:
        given = tuple(f"bwd_{k}" in options for k in ("block_m", "block_n", "num_stages"))
        smem = _backward_smem(head_dim, dtype, loads)
        tiles = _shrink_to_fit(tiles, smem, smem_limit(), given)
    block_m, block_n, stages = tiles
    cfg = BwdConfig(
        block_m=block_m,
        block_n=block_n,
        num_warps=options.get("bwd_num_warps", warps),
        num_stages=stages,
    )
    _check_tiles(cfg, "bwd_", q_block_size, kv_block_size, interpret, both_ways=True)
    return cfg


def sm_count() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or 132
    except RuntimeError:
        return 132


def decode_config(
    *,
    batch: int,
    q_heads: int,
    group_size: int,
    q_len: int,
    q_block_size: int,
    kv_block_size: int,
    kv_blocks: int,
    mask_head_broadcast: bool,
    head_dim: int,
    dtype,
    interpret: bool,
    options: dict | None,
    loads: ModLoads = NO_LOADS,
) -> DecodeConfig | None:
    """The split-KV decode kernel's config (the dispatch layer decided the call decodes).

    Needs q_len <= q_block_size: every query row lies in the first q block.
    """
    options = dict(options or {})
    if q_len > q_block_size:
        raise ValueError(
            f"the decode kernel needs Q_LEN={q_len} <= the q BLOCK_SIZE {q_block_size}"
        )
    # GQA packing: one program per kv head, its G query heads stacked as rows.
    packed = (mask_head_broadcast or group_size == 1) and group_size * q_len <= 128
    heads = group_size if packed else 1
    rows = max(16, _pow2_at_least(heads * q_len))
    if interpret:
        block_n, warps, stages = 64, 4, 1
    else:
        block_n, warps, stages = _DECODE_GPU
    block_n = options.get("decode_block_n", _largest_pow2_divisor(kv_block_size, block_n))
    stages = options.get("decode_num_stages", stages)
    if not interpret:  # the packed query rows are the resident tile; they stay
        given = (True, "decode_block_n" in options, "decode_num_stages" in options)
        smem = _forward_smem(head_dim, dtype, loads)
        _, block_n, stages = _shrink_to_fit((rows, block_n, stages), smem, smem_limit(), given)
    if kv_block_size % block_n or (not interpret and block_n < 16):
        raise ValueError(
            f"decode_block_n={block_n} must divide the BlockMask's kv BLOCK_SIZE "
            f"({kv_block_size}) and be at least 16 on the GPU"
        )
    tiles = kv_blocks * (kv_block_size // block_n)
    programs = batch * (q_heads // heads)
    target = 4 if interpret else 2 * sm_count()  # two waves of programs over the SMs
    return DecodeConfig(
        rows=rows,
        block_n=block_n,
        splits=options.get("decode_splits", max(1, min(tiles, -(-target // programs)))),
        heads_per_program=heads,
        num_warps=options.get("decode_num_warps", warps),
        num_stages=stages,
    )


def _check_tiles(
    cfg, prefix: str, q_block_size: int, kv_block_size: int, interpret: bool, both_ways=False
):
    """both_ways: the tiles are also used transposed (the backward's dq kernel)."""
    block_m, block_n = cfg.block_m, cfg.block_n
    names = f"{prefix}block_m={block_m}, {prefix}block_n={block_n}"
    if not tiles_divide(block_m, block_n, q_block_size, kv_block_size, both_ways):
        need = (
            "must each divide both BlockMask BLOCK_SIZEs (the dq kernel uses them transposed)"
            if both_ways
            else "must divide the BlockMask's BLOCK_SIZE (q, kv)"
        )
        raise ValueError(
            f"kernel tiles ({names}) {need}; BLOCK_SIZE = ({q_block_size}, {kv_block_size})"
        )
    if not interpret and min(block_m, block_n) < 16:
        raise ValueError(
            f"on the GPU the kernel tiles must be at least 16 (got {names}); "
            "use a BlockMask BLOCK_SIZE with a power-of-2 factor >= 16"
        )
