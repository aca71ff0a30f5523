"""Pallas Mosaic GPU across the JAX versions flexjax supports (0.10.2 on CPUs, 0.11.x on GPUs).

Every difference the kernels meet is here, nowhere else
(research/mosaic_gpu/README.md has the table):
  * lowering semantics: 0.10 defaults to Lane, 0.11 to Warpgroup; the
    kernels are written for Lane (explicit register layouts) and say so;
  * `plgpu.load(ref, idx, layout=)`: idx is required in 0.10;
  * autodiff's `add_any` (a score_mod's pullback sums the cotangents of a
    value used twice) has no Mosaic GPU lowering in either version:
    `without_add_any` evaluates a function with it replaced by `add`;
  * interpret mode (`InterpretGPUParams`): public in 0.11 only; 0.10's
    interpreter has no rule for `layout_cast` or a layout-typed iota, and
    cannot read a transposed shared-memory operand of wgmma; neither version
    interprets an in-place accumulator (`run_state(ACC.init)`) or a register
    left operand of wgmma, so interpret mode stages P through shared memory and
    adds a fresh accumulator instead (the GPU path keeps P in registers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax._src import core as jax_core
from jax._src.ad_util import add_jaxvals_p as _ADD_ANY  # autodiff's add_any
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

__all__ = [
    "JAX_VERSION",
    "compiler_params",
    "interpret_params",
    "iota",
    "iota_vector",
    "kernel",
    "layout_cast",
    "load_vector",
    "matmul_acc",
    "matmul_nt",
    "padded_tables",
    "without_add_any",
]

JAX_VERSION = tuple(int(x) for x in jax.__version__.split(".")[:2])
WGMMA = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a WGMMA tile
COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column


def compiler_params(interpret: bool):
    return plgpu.CompilerParams(
        approx_math=not interpret, lowering_semantics=plgpu.LoweringSemantics.Lane
    )


def interpret_params(interpret: bool):
    """The `interpret=` argument of plgpu.kernel: None on the GPU."""
    return InterpretGPUParams() if interpret else None


def kernel(body, out_type, scratch, grid, grid_names, threads: int, interpret: bool):
    """A warp-specialised `plgpu.kernel`: `threads` warpgroups, indexed by the axis "wg"."""
    return plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=[scratch],
        grid=grid,
        grid_names=grid_names,
        num_threads=threads,
        thread_name="wg",
        compiler_params=compiler_params(interpret),
        **({"interpret": interpret_params(True)} if interpret else {}),
    )


def layout_cast(x, layout, interpret: bool):
    return x if interpret else plgpu.layout_cast(x, layout)


def iota(shape, dim: int, interpret: bool):
    """An int32 index tile in the WGMMA accumulator's layout (no relayout next to the scores)."""
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=WGMMA)


def iota_vector(n: int, dim: int, interpret: bool):
    """int32 0..n-1 as the row (dim 0) or column (dim 1) vector of a WGMMA tile."""
    if interpret:
        return lax.iota(jnp.int32, n)
    return plgpu.broadcasted_iota(jnp.int32, (n,), 0, layout=ROW if dim == 0 else COL)


def load_vector(ref, layout, interpret: bool):
    """A shared-memory vector into registers in `layout` (a row or column of a tile)."""
    if interpret:
        return ref[...]
    if JAX_VERSION < (0, 11):
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


def matmul_nt(q_smem, k_smem, shape, interpret: bool, after=None):
    """q_smem @ k_smem.T into a fresh float32 accumulator (wgmma); `after()` runs once it is issued."""

    def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_smem.transpose((1, 0)))
        if after is not None:
            after()
        return acc_ref[...]

    if interpret and JAX_VERSION < (0, 11):
        s = lax.dot_general(
            q_smem[...], k_smem[...], (((1,), (1,)), ((), ())),
            precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
        )  # fmt: skip
        if after is not None:
            after()
        return s
    return pl.run_scoped(qk, plgpu.ACC(shape, jnp.float32))


def matmul_acc(acc, lhs, rhs_smem, staging, interpret: bool):
    """acc + lhs @ rhs_smem (wgmma): lhs in registers on the GPU; interpret mode has no
    register left operand, so it stages lhs through `staging` (shared memory, lhs's shape)
    and adds a fresh accumulator."""
    if interpret:
        staging[...] = lhs
        plgpu.commit_smem()

        def mm(acc_ref):
            plgpu.wgmma(acc_ref, staging, rhs_smem)
            return acc_ref[...]

        return acc + pl.run_scoped(mm, plgpu.ACC(acc.shape, jnp.float32))

    def mm(acc_ref):
        plgpu.wgmma(acc_ref, lhs, rhs_smem)

    return pl.run_state(mm)(plgpu.ACC.init(acc))


TABLE_ALIGN = 32  # int32 entries: TMA copies of a table row move whole 128-byte lines
LIST_CHUNK = 256  # a TMA copy moves at most 256 elements along each dimension


def list_copies(length: int) -> int:
    """TMA copies `copy_list` issues for a block list of `length` entries (the arrivals
    its barrier counts): one per LIST_CHUNK entries."""
    return -(-length // LIST_CHUNK)


def list_arrivals(partial: bool, idx, full: bool, full_idx) -> int:
    """The block lists' barrier arrivals: `copy_list`'s copies of the lists a call has."""
    return partial * list_copies(idx.shape[-1]) + full * list_copies(full_idx.shape[-1])


def copy_list(src, dst, barrier) -> None:
    """TMA-copy a BlockMask row's (column's) block list -- src a [len] or [heads, len] view
    of a padded table, dst its shared memory -- in pieces of at most LIST_CHUNK entries along
    len (longer lists: sequences past 256 blocks, S > 32768 with blocks of 128), each an
    arrival on `barrier` (`list_copies`)."""
    length = dst.shape[-1]
    for start in range(0, length, LIST_CHUNK):
        piece = pl.ds(start, min(LIST_CHUNK, length - start))
        if len(dst.shape) == 1:
            plgpu.copy_gmem_to_smem(src.at[piece], dst.at[piece], barrier)
        else:
            plgpu.copy_gmem_to_smem(src.at[:, piece], dst.at[:, piece], barrier)


def padded_tables(view):
    """(num, idx, full num, full idx) with the index lists padded for whole-line TMA copies."""
    num, idx, full_num, full_idx = view
    pad = lambda t: jnp.pad(t, ((0, 0),) * 3 + ((0, -t.shape[-1] % TABLE_ALIGN),))
    return num, pad(idx), full_num, pad(full_idx)


def without_add_any(fn):
    """fn, evaluated from its jaxpr with autodiff's `add_any` bound as `lax.add`.

    Mosaic GPU lowers `add` but not `add_any`, which `jax.vjp` emits where a
    value's cotangents are summed. Nested jaxprs (jnp functions are `pjit`
    calls) are inlined so their sums are rewritten too.
    """

    def wrapped(*args):
        closed = jax.make_jaxpr(fn)(*args)
        out = _eval(closed.jaxpr, closed.consts, args)
        return jax.tree.unflatten(jax.tree.structure(jax.eval_shape(fn, *args)), out)

    return wrapped


def _eval(jaxpr, consts, args):
    env = {}
    read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]
    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, jax.tree.leaves(args), strict=True):
        env[var] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if eqn.primitive is _ADD_ANY:
            outvals = [lax.add(*invals)]
        elif "jaxpr" in eqn.params and eqn.primitive.name in ("pjit", "jit", "closed_call"):
            inner = eqn.params["jaxpr"]
            outvals = _eval(inner.jaxpr, inner.consts, invals)
        else:
            outvals = eqn.primitive.bind(*invals, **eqn.params)
            outvals = outvals if eqn.primitive.multiple_results else [outvals]
        for var, val in zip(eqn.outvars, outvals, strict=True):
            env[var] = val
    return [read(v) for v in jaxpr.outvars]
