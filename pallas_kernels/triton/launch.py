"""What the Triton launchers share: BlockSpecs from the layout, bounded loads and stores, launch parameters.

Nothing is padded in HBM. A kernel's blocks may overhang its arrays: the q
tile past the query's last row, whole K/V blocks past the key's last row
(the BlockMask's kv extent C * kv_block_size), a head dim rounded up to a
power of 2 (Triton's tiles are powers of 2; at least 16 for the tensor
cores). Those loads and stores are masked, statically decided: an aligned
call (lengths multiples of the tiles, head dims powers of 2) runs exactly
the unmasked code. Masked elements read as 0 (or a value that makes their
softmax weight 0), and the score pipeline drops columns past the key length
(`score_tile`). In interpret mode Pallas pads overhanging blocks with NaN,
so a missing mask shows up in the CPU tests.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.mod_eval import kernel_dtype
from pallas_kernels.spec import KernelSpec, Layout, Mods

__all__ = [
    "bound",
    "check_config",
    "compiler_params",
    "div_static",
    "kernel_mods",
    "kv_rows",
    "load",
    "mod_inputs",
    "padded_dim",
    "rem_static",
    "row_spec",
    "split_refs",
    "store",
    "tile_mask",
    "tile_spec",
    "whole",
]


def compiler_params(spec: KernelSpec, cfg):
    """Triton launch parameters of a kernel config (None in interpret mode)."""
    if spec.interpret:
        return None
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def check_config(cfg, prefix: str, pow2: tuple, positive: tuple) -> None:
    """Validate a kernel config's fields, naming them as kernel_options does (prefix + name)."""
    for name in pow2:
        v = getattr(cfg, name)
        if v <= 0 or v & (v - 1):
            raise ValueError(f"{prefix}{name}={v} must be a power of 2")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{prefix}{name}={getattr(cfg, name)} must be >= 1")


def div_static(x, n: int):
    """x // n for a traced int32 and a static n (Triton's lowering mistypes a literal 1)."""
    return x if n == 1 else x // jnp.int32(n)


def rem_static(x, n: int):
    return jnp.zeros_like(x) if n == 1 else x % jnp.int32(n)


def padded_dim(d: int) -> int:
    """A head dim as a tile width: the next power of 2, at least 16 (tensor-core tiles)."""
    return max(16, 1 << (d - 1).bit_length())


def kv_rows(spec: KernelSpec) -> int:
    """Rows of the whole-K/V block each program sees: the BlockMask's kv extent."""
    return spec.C * spec.kv_block_size


def bound(length: int, extent: int) -> int | None:
    """`length` as a load/store bound when a block of `extent` overhangs it, else None (no mask)."""
    return length if extent != length else None


def kernel_mods(mods: Mods) -> dict:
    """What a kernel body is told about the mods: the (static) programs and how many arrays each captures.

    The captured arrays themselves reach it as refs, flattened to 1-D, after
    the fixed inputs: a kernel must never close over an array.
    """
    return dict(programs=mods.programs, n_consts=(len(mods.score_consts), len(mods.mask_consts)))


def mod_inputs(mods: Mods, offsets) -> list:
    """A kernel's inputs after the tables: the offsets (if any), then the captured arrays.

    offsets: the int32[4] operand, or None when they are all zero (statically:
    `KernelSpec.global_offsets` is False and the kernels neither read nor add
    them). The captured arrays are score_mod's then mask_mod's, flattened to 1-D
    (0-d ones too) and widened where narrow integers are slow (`kernel_dtype`).
    """
    consts = [
        c.reshape(-1).astype(kernel_dtype(c.dtype)) for c in (*mods.score_consts, *mods.mask_consts)
    ]
    return ([] if offsets is None else [offsets]) + consts


def split_refs(rest, n_consts: tuple[int, int], has_offsets: bool):
    """(offsets ref or None, score_mod refs, mask_mod refs, the remaining refs) of a kernel's refs."""
    off_ref, rest = (rest[0], rest[1:]) if has_offsets else (None, rest)
    n_score, n_mask = n_consts
    return off_ref, rest[:n_score], rest[n_score : n_score + n_mask], rest[n_score + n_mask :]


# ---------------------------------------------------------------------------- BlockSpecs


def whole(x) -> pl.BlockSpec:
    """The whole array for every program (tables, captured arrays, offsets)."""
    return pl.BlockSpec(x.shape, lambda *grid, n=x.ndim: (0,) * n)


def tile_spec(layout: Layout, heads, rows: int, dim: int, where) -> pl.BlockSpec:
    """A [heads?, rows, dim] block of a [B, H, seq, dim] array laid out as `layout`.

    heads: None (one head, squeezed) or a count (a group of heads);
    where(*grid) -> (batch, head block, row block) indices.
    """
    return pl.BlockSpec(
        layout.shape(None, heads, rows, dim), lambda *grid: layout.shape(*where(*grid), 0)
    )


def row_spec(layout: Layout, heads, rows: int, where) -> pl.BlockSpec:
    """The same for a per-row array (lse, delta) of shape [B, H, seq] in `layout`'s order."""
    return pl.BlockSpec(
        layout.shape(None, heads, rows, 0)[:3], lambda *grid: layout.shape(*where(*grid), 0)[:3]
    )


# ---------------------------------------------------------------------------- bounded access


def tile_mask(first_row, n_rows: int, row_limit, n_cols: int | None = None, col_limit=None):
    """Which elements of a [n_rows, n_cols] tile (or an [n_rows] vector) lie inside the array.

    Row i is array row first_row + i, valid below row_limit; column j is
    valid below col_limit. A None limit is no bound; None when nothing is bounded.
    """
    mask = None
    if row_limit is not None:
        shape = (n_rows,) if n_cols is None else (n_rows, 1)
        mask = first_row + lax.broadcasted_iota(jnp.int32, shape, 0) < row_limit
    if col_limit is not None and n_cols is not None and col_limit < n_cols:
        cols = lax.broadcasted_iota(jnp.int32, (1, n_cols), 1) < col_limit
        mask = cols if mask is None else mask & cols
    if mask is not None and n_cols is not None:
        mask = jnp.broadcast_to(mask, (n_rows, n_cols))
    return mask


def load(ref, idx, mask=None, other=0.0):
    """ref[idx], with the elements outside `mask` read as `other` (a plain load when mask is None)."""
    if mask is None:
        return ref[idx]
    return plgpu.load(ref.at[idx], mask=mask, other=other)


def store(ref, idx, value, mask=None) -> None:
    """ref[idx] = value, only inside `mask` (everywhere when mask is None)."""
    if mask is None:
        ref[idx] = value
    else:
        plgpu.store(ref.at[idx], value, mask=mask)
