"""create_mask and create_block_mask, evaluated in bounded memory.

PyTorch's eager `create_block_mask` materialises the dense B*H*Q_LEN*KV_LEN mask
first (10 GiB at S = 32K, out of memory at 128K on an 80 GB card). Here the
mask_mod is evaluated one (batch, head, q-block row) at a time, a few rows per
step of a `lax.map`, and each row is reduced to per-block counts of kept
elements straight away; only the [B, H, R, C] block classes are ever stored.
Everything is jnp under `jax.jit`, so it also runs inside a user's jit. The
builder is compiled per mask_mod *program* (`pallas_kernels.mod_trace`), with
the captured arrays as arguments: a new closure over new document ids of the
same shape reuses the compiled builder.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from flexjax.block_mask import (
    DEFAULT_SPARSE_BLOCK_SIZE,
    BlockMask,
    dense_to_ordered,
    parse_block_size,
)
from flexjax.mod_utils import (
    ModKind,
    convert_mod,
    get_mod_kind,
    noop_mask,
    traced_mod,
    vmap_bhqkv,
)
from pallas_kernels.index_ranges import check_index_ranges
from pallas_kernels.mod_trace import ModProgram

__all__ = ["create_block_mask", "create_mask"]

# Mask elements evaluated per lax.map step; bounds create_block_mask's working
# memory (a few bytes per element) independently of the sequence length. The
# best step differs by platform (eager document mask, 2026-11-28): on an H100
# 2^26 (S=32768: 0.67 ms, against 1.25 ms at 2^24 and 4.6 ms at 2^28); on a
# 2-core CPU 2^22 (S=8192: 31 ms, against 45 ms at 2^24).
_ELEMENTS_PER_STEP = {"gpu": 1 << 26, "cpu": 1 << 22}


def _elements_per_step() -> int:
    """The lax.map step for the platform this trace compiles for."""
    return _ELEMENTS_PER_STEP.get(jax.default_backend(), 1 << 24)


def _check_dim(value, argname: str, allow_none: bool) -> int:
    if value is None and allow_none:
        return 1
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(
            f"{argname} must be a positive int{' or None' if allow_none else ''}, got {value!r}"
        )
    return value


def create_mask(
    mod_fn: Callable, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int, device=None
) -> jax.Array:
    """The dense [B, H, Q_LEN, KV_LEN] bool mask of a mask_mod or a score_mod.

    For a score_mod, an element is kept unless the mod turns a zero score into
    -inf (PyTorch's rule). This is O(B*H*Q_LEN*KV_LEN): for tests, pictures and
    the dense reference, not for long sequences.
    """
    B = _check_dim(B, "B", True)
    H = _check_dim(H, "H", True)
    Q_LEN = _check_dim(Q_LEN, "Q_LEN", False)
    KV_LEN = _check_dim(KV_LEN, "KV_LEN", False)
    kind = get_mod_kind(mod_fn)
    traced_mod(mod_fn, kind, "mod_fn")
    b, h = jnp.arange(B, dtype=jnp.int32), jnp.arange(H, dtype=jnp.int32)
    q, kv = jnp.arange(Q_LEN, dtype=jnp.int32), jnp.arange(KV_LEN, dtype=jnp.int32)
    lifted = vmap_bhqkv(mod_fn, kind)
    if kind is ModKind.SCORE_MOD:
        scores = jnp.zeros((B, H, Q_LEN, KV_LEN), jnp.float32)
        mask = ~jnp.isneginf(lifted(scores, b, h, q, kv))
    else:
        mask = jnp.broadcast_to(lifted(b, h, q, kv), (B, H, Q_LEN, KV_LEN))
    return _place(mask, device)


def _place(x, device):
    return x if device is None else jax.device_put(x, device)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _block_counts(
    program: ModProgram, B, H, Q_LEN, KV_LEN, q_bs, kv_bs, consts: tuple
) -> jax.Array:
    """[B, H, R, C] int32: how many elements of each block the mask_mod keeps."""
    R, C = -(-Q_LEN // q_bs), -(-KV_LEN // kv_bs)
    lifted = vmap_bhqkv(program.bind(consts), ModKind.MASK_MOD)
    kv = jnp.arange(C * kv_bs, dtype=jnp.int32)
    kv_valid = kv < KV_LEN
    # The mod only ever sees in-range indices: padding positions are clamped
    # for the call and then forced to False (a document_id[kv_idx] lookup must
    # not read past the end).
    kv_in = jnp.minimum(kv, KV_LEN - 1)

    def one_row(bhr):
        b, h, r = bhr
        q = r * q_bs + jnp.arange(q_bs, dtype=jnp.int32)
        q_valid = q < Q_LEN
        keep = lifted(b, h, jnp.minimum(q, Q_LEN - 1), kv_in)
        keep = jnp.broadcast_to(keep, (q_bs, C * kv_bs))
        keep = keep & q_valid[:, None] & kv_valid[None, :]
        return jnp.sum(keep.reshape(q_bs, C, kv_bs), axis=(0, 2), dtype=jnp.int32)

    bb, hh, rr = jnp.meshgrid(
        jnp.arange(B, dtype=jnp.int32),
        jnp.arange(H, dtype=jnp.int32),
        jnp.arange(R, dtype=jnp.int32),
        indexing="ij",
    )
    units = (bb.reshape(-1), hh.reshape(-1), rr.reshape(-1))
    rows_per_step = max(1, min(B * H * R, _elements_per_step() // (q_bs * C * kv_bs)))
    counts = jax.lax.map(one_row, units, batch_size=rows_per_step)
    return counts.reshape(B, H, R, C)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _block_tables(program: ModProgram, B, H, Q_LEN, KV_LEN, q_bs, kv_bs, consts: tuple) -> list:
    """The eight BlockMask tables, in one compiled call (an eager call is one dispatch)."""
    counts = _block_counts(program, B, H, Q_LEN, KV_LEN, q_bs, kv_bs, consts)
    full = counts == q_bs * kv_bs
    partial = (counts > 0) & ~full
    return [
        *dense_to_ordered(partial),
        *dense_to_ordered(full),
        *dense_to_ordered(jnp.swapaxes(partial, -1, -2)),
        *dense_to_ordered(jnp.swapaxes(full, -1, -2)),
    ]


def create_block_mask(
    mask_mod: Callable,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device=None,
    BLOCK_SIZE: int | tuple[int, int] = DEFAULT_SPARSE_BLOCK_SIZE,
    _compile: bool = False,
) -> BlockMask:
    """Build the BlockMask of `mask_mod` for [B, H, Q_LEN, KV_LEN] (PyTorch's signature).

    B and H may be None (meaning 1, broadcast over the batch / query heads).
    BLOCK_SIZE is an int or (Q_BLOCK_SIZE, KV_BLOCK_SIZE). Lengths need not be
    multiples of the block size: the last block row / column is partial.
    Memory is O(B*H*R*C) for the tables plus a bounded working set, never the
    dense mask. `_compile` is accepted for PyTorch compatibility and ignored
    (this always runs under jax.jit). `device`, if given, is where the tables go.
    """
    program, consts = traced_mod(mask_mod, ModKind.MASK_MOD, "mask_mod")
    B = _check_dim(B, "B", True)
    H = _check_dim(H, "H", True)
    Q_LEN = _check_dim(Q_LEN, "Q_LEN", False)
    KV_LEN = _check_dim(KV_LEN, "KV_LEN", False)
    q_bs, kv_bs = parse_block_size(BLOCK_SIZE)
    del _compile
    check_index_ranges(program, B, H, Q_LEN, KV_LEN)

    tables = _block_tables(program, B, H, Q_LEN, KV_LEN, q_bs, kv_bs, tuple(consts))
    tables = [_place(t, device) for t in tables]
    if mask_mod is noop_mask:
        program, consts = None, ()  # nothing to evaluate in the kernels
    return BlockMask._from_program(
        (Q_LEN, KV_LEN), tables, (q_bs, kv_bs), program, consts, mask_mod=convert_mod(mask_mod)
    )
