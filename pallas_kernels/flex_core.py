"""flex_attention on padded arrays, as a `jax.custom_vjp` over the Pallas kernels.

Forward: `flex_fwd` (out, lse). Residuals: q, k, v, the tables, the captured
arrays, out and lse; nothing of size L x S. Backward: `preprocess` (delta,
with the lse cotangent folded in), then the dq and dk/dv kernels of
`flex_bwd_triton`.

`symbolic_zeros=True` tells the forward which captured score_mod arrays are
being differentiated (`perturbed`): only those get a gradient (and the
scatter-adds it costs); constants such as the seed's ALiBi table cost nothing.
One custom_vjp function is built per static configuration and cached, so jit
caches stay warm.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from pallas_kernels.flex_bwd_triton import BwdConfig, flex_bwd, preprocess
from pallas_kernels.flex_decode_triton import DecodeConfig, flex_decode
from pallas_kernels.flex_fwd_triton import FwdConfig, FwdStatic, flex_fwd

__all__ = ["attention_fn"]


def _pad_rows(x, rows: int):
    """Zero rows appended along axis 2 (the query axis of [B, H, L, ...])."""
    pad = [(0, 0)] * x.ndim
    pad[2] = (0, rows - x.shape[2])
    return jnp.pad(x, pad)


@functools.lru_cache(maxsize=256)
def attention_fn(
    st: FwdStatic, fwd_cfg: FwdConfig, bwd_cfg: BwdConfig, decode_cfg: DecodeConfig | None = None
):
    """The differentiable f(q, k, v, tables, score_consts, mask_consts) -> (out, lse).

    tables: the eight BlockMask tables (kv rows, full kv rows, q columns, full
    q columns), int32. Shapes as in `flex_fwd`. With decode_cfg, a call that
    is not differentiated runs the split-KV decode kernel; under
    differentiation the forward is always `flex_fwd` (its residuals feed the
    backward).
    """

    def regular(q, k, v, tables, score_consts, mask_consts):
        return flex_fwd(q, k, v, tables[:4], score_consts, mask_consts, st=st, cfg=fwd_cfg)

    def forward(q, k, v, tables, score_consts, mask_consts):
        if decode_cfg is None:
            return regular(q, k, v, tables, score_consts, mask_consts)
        out, lse = flex_decode(
            q, k, v, tables[:4], score_consts, mask_consts, st=st, cfg=decode_cfg
        )
        return _pad_rows(out, q.shape[2]), _pad_rows(lse, q.shape[2])

    attention = jax.custom_vjp(forward)

    def fwd(q, k, v, tables, score_consts, mask_consts):
        args = (q, k, v, tables, score_consts, mask_consts)
        values = jax.tree.map(
            lambda a: a.value, args, is_leaf=lambda a: isinstance(a, CustomVJPPrimal)
        )
        float_consts = [jnp.issubdtype(c.value.dtype, jnp.floating) for c in score_consts]
        grad_slots = tuple(i for i, c in enumerate(score_consts) if c.perturbed and float_consts[i])
        out, lse = regular(*values)
        return (out, lse), (values, out, lse, grad_slots)

    def bwd(res, cts):
        (q, k, v, tables, score_consts, mask_consts), out, lse, grad_slots = res
        dout, dlse = cts
        if isinstance(dout, SymbolicZero):
            dout = jnp.zeros(out.shape, out.dtype)
        if isinstance(dlse, SymbolicZero):
            dlse = None
        rows = tables[0].shape[2] * st.q_block_size  # whole q blocks
        delta, lse_b = preprocess(out, dout, lse, dlse, st.L, rows)
        dq, dk, dv, const_grads = flex_bwd(
            _pad_rows(q, rows), k, v, _pad_rows(dout.astype(q.dtype), rows), lse_b, delta,
            tables, score_consts, mask_consts, st=st, cfg=bwd_cfg, grad_slots=grad_slots,
        )  # fmt: skip
        score_grads = [None] * len(score_consts)
        for slot, g in zip(grad_slots, const_grads, strict=True):
            score_grads[slot] = g.astype(score_consts[slot].dtype)
        return (
            dq[:, :, : q.shape[2]],
            dk,
            dv,
            (None,) * len(tables),
            score_grads,
            [None] * len(mask_consts),
        )

    attention.defvjp(fwd, bwd, symbolic_zeros=True)
    return attention
