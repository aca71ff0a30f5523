"""The kernel side of staged captured-array reads: slices copied to shared memory, read as vectors.

`staging.read_kinds` says which loads of a mod read `array[q_idx + c]` (Q) or
`array[kv_idx + c]` (KV). A kernel stages each such read as a slice of the
array's flattened elements: the slice for a run of q rows rides the TMA copy
that brings those rows' Q (or Q and dO) tile, the slice for a run of kv rows
the copy of their K tile. `StagedReads` holds a call's reads, their dtypes
and where each slice starts (the mod evaluated on the run's first scalar
indices), and hands the mods the staged vectors broadcast to the score tile,
in the evaluator's load order (`MosaicTileOps.staged`). Forward and backward
kernels share it; their tiles may be [q, kv] or transposed [kv, q].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mod_eval import eval_mod, kernel_dtype
from pallas_kernels.mosaic_gpu import compat
from pallas_kernels.mosaic_gpu.staging import KV, SCALAR, Q, read_kinds
from pallas_kernels.spec import Mods
from pallas_kernels.tile_ops import TileOps

__all__ = ["StagedReads"]


class StagedReads:
    """A call's staged reads: `q` and `kv` list them as (program index, load number)."""

    def __init__(self, mods: Mods, what: str):
        self.programs = mods.programs
        self.kinds = [read_kinds(p) for p in self.programs]
        for why in self.kinds:
            if isinstance(why, str):
                raise ValueError(f"the Mosaic GPU {what} cannot run this mod: {why}")
        loads = [(i, n, kind) for i, k in enumerate(self.kinds) for n, kind in enumerate(k)]
        self.q = [(i, n) for i, n, kind in loads if kind == Q]
        self.kv = [(i, n) for i, n, kind in loads if kind == KV]
        self.dtypes = {read: _read_dtype(mods, read) for read in self.q + self.kv}

    def scratch(self, reads, lead: int, length: int) -> tuple:
        """One shared-memory buffer [lead, length] per read (lead: ring slots or consumers)."""
        return tuple(plgpu.SMEM((lead, length), self.dtypes[read]) for read in reads)

    def starts(self, refs, b, h, q0, kv0) -> dict:
        """{(program, load): (ref, flat index of its first element)} for the runs of rows that
        start at q0 / kv0 (scalars); refs: the score_mod's and the mask_mod's captured refs."""
        found = {}
        for i, program in enumerate(self.programs):
            if program is None or not self.kinds[i]:
                continue
            probe = _StartProbe(self.kinds[i])
            args = (b, h, q0, kv0) if i else (jnp.float32(0), b, h, q0, kv0)
            eval_mod(program, refs[i], args, (), probe)
            found.update({(i, n): rf for n, rf in enumerate(probe.found) if rf is not None})
        return found

    def copy(self, reads, found, length: int, buffers, slot, barrier) -> None:
        """TMA-copy each read's slice of `length` elements into its buffer's `slot`."""
        for read, buffer in zip(reads, buffers, strict=True):
            src, start = found[read]
            plgpu.copy_gmem_to_smem(src.at[pl.ds(start, length)], buffer.at[slot], barrier)

    def tiles(self, reads, buffers, slot, tile, dim: int, interpret: bool, needed=None) -> dict:
        """{read: its staged vector broadcast to `tile`}: dim 0 when the vector runs along the
        tile's rows, 1 along its columns. needed(read) -> bool skips the others."""
        layout = compat.ROW if dim == 0 else compat.COL
        out = {}
        for read, buffer in zip(reads, buffers, strict=True):
            if needed is None or needed(read):
                vec = compat.load_vector(buffer.at[slot], layout, interpret)
                out[read] = lax.broadcast_in_dim(vec, tile, [dim])
        return out

    def order(self, staged: dict, masked: bool):
        """The staged tiles of one evaluation in load order: the score_mod's reads, then the
        mask_mod's in partial blocks (`masked`), where the mask_mod runs."""
        reads = sorted(read for read in staged if read[0] == 0 or masked)
        return iter(staged[read] for read in reads)


class _StartProbe(TileOps):
    """Evaluates a mod on scalar indices to find where each staged read's slice starts.

    Scalar reads load (their values may feed later indices); staged ones record
    (ref, flat index) and return a stand-in 0 (the staging pass proved no index
    depends on them).
    """

    def __init__(self, kinds):
        self.kinds, self.found = iter(kinds), []

    def gather(self, ref, flat):
        if next(self.kinds) == SCALAR:
            self.found.append(None)
            return ref[flat]
        self.found.append((ref, flat))
        return jnp.zeros((), ref.dtype)


def _read_dtype(mods: Mods, read) -> jnp.dtype:
    """The kernel dtype of the captured array that staged read (program, load number) reads."""
    program_index, load = read
    program = mods.programs[program_index]
    refs = [_DtypeRef(kernel_dtype(d)) for d in program.const_dtypes]
    probe = _StartProbe(read_kinds(program))
    args = (jnp.int32(0),) * 4 if program_index else (jnp.float32(0),) + (jnp.int32(0),) * 4
    jax.eval_shape(lambda: eval_mod(program, refs, args, (), probe))
    return probe.found[load][0].dtype


class _DtypeRef:
    """Stands in for a captured array's ref outside a kernel: its dtype, and zeros when read."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __getitem__(self, flat):
        return jnp.zeros((), self.dtype)
