"""The part of every attention kernel that turns q k^T into masked, modded scores.

Forward, dq and dk/dv kernels all do the same thing to a tile of raw scores:
apply score_mod (with the *in-range* indices: padding rows and columns are
clamped, then dropped), evaluate mask_mod in partial blocks, and bound the kv
columns past the true key length. Keeping that in one function is what makes
the backward recompute exactly the scores the forward used.

The tile may be in either orientation: the forward and the dq kernel use
[BM, BN] (q_idx [BM, 1], kv_idx [1, BN]); the dk/dv kernel uses the transpose
[BN, BM] (q_idx [1, BM], kv_idx [BN, 1]). Mods are elementwise, so they do not
care.
"""

from __future__ import annotations

import math
import struct

import jax
import jax.numpy as jnp

from pallas_kernels.mod_tracer import eval_mod, eval_score_mod_vjp

__all__ = [
    "LOG2E",
    "MASKED_SCORE",
    "div_static",
    "exp2",
    "exp2_fma",
    "mods_on_tile",
    "rem_static",
    "scaled",
    "score_units",
]

LOG2E = math.log2(math.e)

# The score of a masked element. -inf (not a large negative number) so that a
# masked element contributes exactly 0 and a fully masked row is detectable.
MASKED_SCORE = float("-inf")


def div_static(x, n: int):
    """x // n for a traced int32 and a static n (Triton's lowering mistypes a literal 1)."""
    return x if n == 1 else x // jnp.int32(n)


def rem_static(x, n: int):
    return jnp.zeros_like(x) if n == 1 else x % jnp.int32(n)


def score_units(st) -> tuple[float, float]:
    """(pre, to_base2): the kernels compute s = (q k^T) * pre, mod it, then exponentiate s * to_base2.

    Softmax runs in base 2 (exp2). With a score_mod the mod must see the
    natural score, so pre = scale and to_base2 = log2(e). Without one (and a
    positive scale, so the row max commutes with scaling), both constants fold
    into one multiply applied inside exp2's argument: pre = 1 and to_base2 =
    scale * log2(e). Then `exp2(s * to_base2 - m * to_base2)` is one fused
    multiply-add per score, and the raw scores need no separate scaling pass.
    Natural units of a value x in score units: x * to_base2 / log2(e).
    """
    if st.score_mod is None and st.scale > 0:
        return 1.0, st.scale * LOG2E
    return st.scale, LOG2E


def scaled(s, pre: float):
    """Raw scores q k^T into score units: a multiply only when a score_mod needs one."""
    return s if pre == 1.0 else s * pre


def exp2(x, on_gpu: bool):
    """2^x; on the GPU the one-instruction `ex2.approx.ftz.f32` (rel. error ~2^-22, -inf -> 0).

    Pallas lowers jnp.exp2 to libdevice's __nv_exp2f; the instruction made
    the noop forward 4% faster on an H100 (12.90 vs 13.39 ms, 2026-11-25).
    """
    if not on_gpu:
        return jnp.exp2(x)
    return _inline_asm("ex2.approx.ftz.f32 $0, $1;", "=f,f", x)


def exp2_fma(s, c: float, sub, on_gpu: bool):
    """2^(s * c - sub) for a score tile s, a static c and sub broadcast over s's rows or columns.

    On the GPU this is written as one `fma.rn.f32` and one `ex2.approx.ftz.f32`
    in inline asm: the Triton pipeline behind Pallas keeps `s * c - sub` as a
    separate multiply and add (ncu on an H100 showed FMUL + FADD and no FFMA
    per score, where torch's kernel has one FFMA), and this is the softmax's
    innermost expression.
    """
    if not on_gpu:
        return jnp.exp2(s * c - sub)
    c_bits = struct.unpack("<I", struct.pack("<f", c))[0]
    asm = f"{{ .reg .f32 t; fma.rn.f32 t, $1, 0f{c_bits:08X}, $2; ex2.approx.ftz.f32 $0, t; }}"
    return _inline_asm(asm, "=f,f,f", s, jnp.broadcast_to(-sub, s.shape))


def _inline_asm(asm: str, constraints: str, *args):
    from jax.experimental.pallas import triton as plgpu

    [y] = plgpu.elementwise_inline_asm(
        asm,
        args=list(args),
        constraints=constraints,
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, args[0].dtype)],
    )
    return y


def mods_on_tile(s, b, h, q_idx, kv_idx, st, score_refs, mask_refs, masked, grad_slots=None):
    """Apply score_mod, mask_mod (if `masked`) and the kv bound to a raw score tile.

    Returns (s, keep, pullback): s is the modded score with MASKED_SCORE where
    not kept; keep is the bool tile (None when every element is kept).
    pullback is None unless grad_slots is given (the backward): then
    pullback(ds) -> (d raw score, [(slot, flat index, d gathered value)]), the
    score_mod's vector-Jacobian product, with zeros where nothing is kept.
    """
    q_in = jnp.minimum(q_idx, st.L - 1)
    kv_in = jnp.minimum(kv_idx, st.S - 1)
    on_gpu = not st.interpret
    pullback = None
    if st.score_mod is not None and grad_slots is not None:
        s, mod_pullback = eval_score_mod_vjp(
            st.score_mod, score_refs, (s, b, h, q_in, kv_in), s.shape, on_gpu, grad_slots
        )
    elif st.score_mod is not None:
        s = eval_mod(st.score_mod, score_refs, (s, b, h, q_in, kv_in), s.shape, on_gpu)
        s = s.astype(jnp.float32)
    keep = None
    if masked and st.mask_mod is not None:
        keep = eval_mod(st.mask_mod, mask_refs, (b, h, q_in, kv_in), s.shape, on_gpu)
    if masked or st.S % st.kv_block_size != 0:
        in_range = jnp.broadcast_to(kv_idx < st.S, s.shape)
        keep = in_range if keep is None else keep & in_range
    if keep is not None:
        s = jnp.where(keep, s, MASKED_SCORE)
    if grad_slots is not None:

        def pullback(ds):
            if keep is not None:
                ds = jnp.where(keep, ds, 0.0)
            if st.score_mod is None:
                return ds, []
            ds_raw, grads = mod_pullback(ds)
            if keep is not None:
                ds_raw = jnp.where(keep, ds_raw, 0.0)
            return ds_raw, grads

    return s, keep, pullback
