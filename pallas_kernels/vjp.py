"""flex_attention as a `jax.custom_vjp` over a backend's kernels.

Forward: the backend's `fwd` (out, lse), or its `decode` for a short query
that is not being differentiated. Residuals: q, k, v, the tables, the
captured arrays, the offsets, out and lse; nothing of size L x S. Backward:
`preprocess` (delta, with the lse cotangent folded in, in XLA), then the
backend's `bwd` (dq, dk/dv, captured-array gradients).

`symbolic_zeros=True` tells the forward which captured score_mod arrays are
being differentiated (`perturbed`): only those get a gradient (and the
scatter-adds it costs); constants such as the seed's ALiBi table cost nothing.
One custom_vjp function is built per (backend, static call, configs) and
cached, so jit caches stay warm.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from pallas_kernels.partition import partitioned_stages
from pallas_kernels.softmax import MASKED_SCORE
from pallas_kernels.spec import BlockTables, KernelSpec, Mods

__all__ = ["attention_fn", "preprocess"]


def preprocess(out, dout, lse, dlse):
    """delta = rowsum(out * dout) - dlse, and lse with +inf for rows that keep nothing (p = 0).

    out, dout [..., Ev]; lse (and dlse, or None) out's shape without Ev.
    Returns (delta, lse) float32.
    """
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    return delta, jnp.where(lse == MASKED_SCORE, jnp.inf, lse)


@functools.lru_cache(maxsize=256)
def attention_fn(backend, spec: KernelSpec, programs: tuple, cfgs, auto_partition=None):
    """The differentiable f(q, k, v, tables, score_consts, mask_consts, offsets) -> (out, lse).

    programs: (score_mod, mask_mod) programs of `Mods`; cfgs: the backend's
    `KernelConfigs`. With cfgs.decode, a call that is not differentiated runs
    the decode kernel; under differentiation the forward is always the
    regular one (its residuals feed the backward). auto_partition: None, or
    the backend's kernel_options as sorted pairs to run every kernel stage
    as a custom_partitioning op (`partition.partitioned_stages`; offsets are
    then None).
    """

    def mods_of(score_consts, mask_consts) -> Mods:
        return Mods(*programs, tuple(score_consts), tuple(mask_consts))

    stages = None
    if auto_partition is not None:
        stages = partitioned_stages(backend, spec, programs, cfgs, auto_partition)

    def regular(q, k, v, tables, score_consts, mask_consts, offsets):
        if stages is not None:
            return stages[0](q, k, v, tables, tuple(score_consts), tuple(mask_consts))
        mods = mods_of(score_consts, mask_consts)
        return backend.fwd(q, k, v, tables.rows, mods, offsets, spec=spec, cfg=cfgs.fwd)

    def forward(q, k, v, tables, score_consts, mask_consts, offsets):
        if cfgs.decode is None:
            return regular(q, k, v, tables, score_consts, mask_consts, offsets)
        if stages is not None:
            return stages[1](q, k, v, tables, tuple(score_consts), tuple(mask_consts))
        mods = mods_of(score_consts, mask_consts)
        return backend.decode(q, k, v, tables.rows, mods, offsets, spec=spec, cfg=cfgs.decode)

    attention = jax.custom_vjp(forward)

    def fwd(q, k, v, tables, score_consts, mask_consts, offsets):
        args = (q, k, v, tables, score_consts, mask_consts, offsets)
        values = jax.tree.map(
            lambda a: a.value, args, is_leaf=lambda a: isinstance(a, CustomVJPPrimal)
        )
        grad_slots = tuple(
            i
            for i, c in enumerate(score_consts)
            if c.perturbed and jnp.issubdtype(c.value.dtype, jnp.floating)
        )
        out, lse = regular(*values)
        return (out, lse), (values, out, lse, grad_slots)

    def bwd(res, cts):
        (q, k, v, tables, score_consts, mask_consts, offsets), out, lse, grad_slots = res
        dout, dlse = cts
        if isinstance(dout, SymbolicZero):
            dout = jnp.zeros(out.shape, out.dtype)
        if isinstance(dlse, SymbolicZero):
            dlse = None
        delta, lse_b = preprocess(out, dout, lse, dlse)
        do = dout.astype(q.dtype)
        if stages is not None:
            dq, dk, dv, const_grads = stages[2](grad_slots)(
                q, k, v, do, lse_b, delta, tables, tuple(score_consts), tuple(mask_consts)
            )
        else:
            mods = mods_of(score_consts, mask_consts)
            dq, dk, dv, const_grads = backend.bwd(
                q, k, v, do, lse_b, delta, tables, mods, offsets,
                spec=spec, cfg=cfgs.bwd, grad_slots=grad_slots,
            )  # fmt: skip
        score_grads = [None] * len(score_consts)
        for slot, g in zip(grad_slots, const_grads, strict=True):
            c = score_consts[slot]
            score_grads[slot] = g.reshape(c.shape).astype(c.dtype)
        no_tables = BlockTables(*(None,) * len(tables))
        return dq, dk, dv, no_tables, tuple(score_grads), (None,) * len(mask_consts), None

    attention.defvjp(fwd, bwd, symbolic_zeros=True)
    # Jitted: a custom_vjp with symbolic zeros cannot run in an eager shard_map, and
    # one cached executable is also the cheapest eager call.
    return jax.jit(attention)
