"""The part of every attention kernel that turns q k^T into masked, modded scores.

Forward, dq and dk/dv kernels all do the same thing to a tile of raw scores:
apply score_mod, evaluate mask_mod in partial blocks, and bound the kv
columns past the true key length. Keeping that in one place is what makes the
backward recompute exactly the scores the forward used.

Indices: the kernel passes its *local* tile indices (program ids, rows of its
shard or chunk). Rows and columns past the local lengths are clamped (their
scores are dropped afterwards: mods only ever see in-range indices), then
the call's index offsets (b0, h0, q0, kv0) are added, so the mods see global
indices. The kv bound uses the local column. Under context parallelism with
a load-balancing order (`KernelSpec.q_map_len`) each local q block has its
own global start: the kernel asks `q_shift(block)` once per q block and
passes it to `apply`; likewise `kv_shift(block)` for a ring's kv chunks
(`KernelSpec.kv_map_len`), which also bounds the global key length.

The tile may be in either orientation: the forward and the dq kernel use
[BM, BN] (q_idx [BM, 1], kv_idx [1, BN]); the dk/dv kernel uses the transpose
[BN, BM] (q_idx [1, BM], kv_idx [BN, 1]). Mods are elementwise, so they do not
care. A backend may pass `tile_ops.IndexVector`s instead (Mosaic GPU: a row
or column vector of a register tile); the index math stays on them.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels.mod_eval import eval_mod, eval_score_mod_vjp
from pallas_kernels.mod_trace import ModProgram, indices_read
from pallas_kernels.softmax import MASKED_SCORE
from pallas_kernels.spec import KernelSpec
from pallas_kernels.tile_ops import IndexVector, as_tile

__all__ = ["TileMods"]


class TileMods:
    """A kernel program's mods: their programs, captured-array refs, index offsets and tile ops.

    Built once per kernel program. offsets_ref: the int32[4] (b0, h0, q0, kv0)
    operand, or None when they are all zero; only the offsets of indices a mod
    reads are loaded (each is a register live through the kernel's loops).
    """

    def __init__(
        self,
        spec: KernelSpec,
        programs: tuple[ModProgram | None, ModProgram | None],
        score_refs,
        mask_refs,
        offsets_ref,
        ops,
    ):
        self.spec, self.ops = spec, ops
        self.score, self.mask = programs
        self.score_refs, self.mask_refs = score_refs, mask_refs
        used = indices_read(self.score) | indices_read(self.mask)
        self.offsets_ref = offsets_ref
        # A mapped kv whose global length ends inside a block needs the global
        # column for its bound even when no mod reads kv_idx.
        self.kv_bounded = spec.kv_map_len % spec.kv_block_size != 0
        self.q_mapped = spec.q_map_len > 0 and 2 in used
        self.kv_mapped = spec.kv_map_len > 0 and (3 in used or self.kv_bounded)
        mapped = {2: spec.q_map_len > 0, 3: spec.kv_map_len > 0}
        self.offsets = tuple(
            offsets_ref[i] if offsets_ref is not None and i in used and not mapped.get(i) else 0
            for i in range(4)
        )

    def q_shift(self, block):
        """What to add to the local q indices of local q block `block` (a scalar)."""
        if not self.q_mapped:
            return self.offsets[2]
        return self.offsets_ref[4 + block] - block * self.spec.q_block_size

    def kv_shift(self, block):
        """What to add to the local kv indices of local kv block `block` (a scalar)."""
        if not self.kv_mapped:
            return self.offsets[3]
        first = 4 + (self.spec.R if self.spec.q_map_len else 0)
        return self.offsets_ref[first + block] - block * self.spec.kv_block_size

    def apply(
        self, s, b, h, q_idx, kv_idx, masked: bool, grad_slots=None, q_shift=None, kv_shift=None
    ):
        """Apply score_mod, mask_mod (if `masked`) and the kv bound to a raw score tile.

        b, h: local batch and query head (scalars or tiles); q_idx, kv_idx:
        local index tiles. Returns (s, keep, pullback): s is the modded score
        with MASKED_SCORE where not kept; keep is the bool tile (None when
        every element is kept). pullback is None unless grad_slots is given
        (the backward): then pullback(ds) -> (d raw score, [(slot, flat index,
        d gathered value)]), the score_mod's vector-Jacobian product, with
        zeros where nothing is kept. q_shift, kv_shift: `q_shift(block)` of
        the tile's q block and `kv_shift(block)` of its kv block (needed when
        spec.q_map_len / kv_map_len; else the offsets are used).
        """
        spec, ops = self.spec, self.ops
        b0, h0, q0, kv0 = self.offsets
        b, h = _shifted(b, b0), _shifted(h, h0)
        if (self.q_mapped and q_shift is None) or (self.kv_mapped and kv_shift is None):
            raise ValueError("TileMods.apply: a mapped q or kv needs q_shift / kv_shift")
        q0 = q_shift if self.q_mapped else q0
        kv0 = kv_shift if self.kv_mapped else kv0
        q_in = _index(lambda x: _shifted(jnp.minimum(x, spec.L - 1), q0), q_idx)
        if spec.q_map_len:
            q_in = _index(lambda x: jnp.minimum(x, spec.q_map_len - 1), q_in)  # padding rows
        kv_in = _index(lambda x: _shifted(jnp.minimum(x, spec.S - 1), kv0), kv_idx)
        if spec.kv_map_len:
            kv_in = _index(lambda x: jnp.minimum(x, spec.kv_map_len - 1), kv_in)
        q_in, kv_in = _bounded(q_in, q0, spec.L - 1), _bounded(kv_in, kv0, spec.S - 1)
        pullback = None
        if self.score is not None and grad_slots is not None:
            s, mod_pullback = eval_score_mod_vjp(
                self.score, self.score_refs, (s, b, h, q_in, kv_in), s.shape, ops, grad_slots
            )
        elif self.score is not None:
            s = eval_mod(self.score, self.score_refs, (s, b, h, q_in, kv_in), s.shape, ops)
            s = s.astype(jnp.float32)
        keep = None
        if masked and self.mask is not None:
            keep = eval_mod(self.mask, self.mask_refs, (b, h, q_in, kv_in), s.shape, ops)
        if masked or spec.C * spec.kv_block_size != spec.S or self.kv_bounded:
            # Columns past the key length exist in the last block (or in whole
            # blocks a BlockMask lists past it): their K/V read as 0, drop them.
            in_range = _index(lambda x: x < spec.S, kv_idx)
            if self.kv_bounded:  # and past the global length, in a mapped kv
                in_range = _index(lambda x: (x < spec.S) & (x + kv0 < spec.kv_map_len), kv_idx)
            in_range = as_tile(in_range, s.shape)
            keep = in_range if keep is None else keep & in_range
        if keep is not None:
            s = jnp.where(keep, s, MASKED_SCORE)
        if grad_slots is not None:

            def pullback(ds):
                if keep is not None:
                    ds = jnp.where(keep, ds, 0.0)
                if self.score is None:
                    return ds, []
                ds_raw, grads = mod_pullback(ds)
                if keep is not None:
                    ds_raw = jnp.where(keep, ds_raw, 0.0)
                return ds_raw, grads

        return s, keep, pullback


def _index(fn, index):
    """fn of an index tile, or of an `IndexVector`'s vector (kept a vector)."""
    return index.map(fn) if isinstance(index, IndexVector) else fn(index)


def _bounded(index, offset, top: int):
    """An `IndexVector` of indices in [0, top] (no offset: start + row numbers, clamped to
    top) marked so: the evaluator may then convert `q_idx - kv_idx` exactly as two vectors
    (`mod_eval._OuterSum`). Anything else as it is."""
    if isinstance(index, IndexVector) and isinstance(offset, int) and offset == 0:
        return dataclasses.replace(index, bound=top)
    return index


def _shifted(index, offset):
    """index + offset, with nothing emitted for a static zero."""
    return index if isinstance(offset, int) and offset == 0 else index + offset
