"""Prototype: flash-attention forward with Pallas Mosaic GPU `plgpu.kernel` (sm90).

One program (CTA) per (q tile, head, batch); one compute warpgroup; a 2-slot
TMA ring for K/V (the next tile's copy is issued before the current tile is
computed); wgmma for QK^T and PV; online softmax in float32 base 2; causal
mask and kv-length bound from layout-typed index iotas; optional block
sparsity from a BlockMask-like row table (kv_num_blocks [B,H,R],
kv_indices [B,H,R,C]) read per program from GMEM into SMEM, then as scalars.

Runs:
  * on CPU in Mosaic GPU interpret mode (InterpretGPUParams) on jax 0.10.2 and 0.11.2;
  * lowers for cuda from a CPU-only machine (`--lower`): the Mosaic GPU MLIR is
    built in Python at lowering time, so layout and lowering errors show on CPU.

    python fwd_proto.py                # interpret-mode tests
    python fwd_proto.py --lower        # cross-lower for cuda (no execution)
"""

from __future__ import annotations

import functools
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Public in 0.11 (plgpu.InterpretGPUParams); private module path in both.
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

MASKED = -1e30  # finite "minus infinity" (keeps exp2 / max NaN-free for empty rows)
LOG2E = math.log2(math.e)
JAX_MINOR = tuple(int(x) for x in jax.__version__.split(".")[:2])


def _semantics(name: str):
    return {
        "lane": plgpu.LoweringSemantics.Lane,
        "warpgroup": plgpu.LoweringSemantics.Warpgroup,
    }[name]


def flash_fwd(
    q, k, v, *, block_q=64, block_kv=64, causal=False, kv_len=None, table=None,
    interpret=False, semantics="lane", p_in_smem=None, acc_in_place=None, swizzle=True,
    doc=None, ws=False,
):  # fmt: skip
    """q [B, H, L, D], k/v [B, H, S, D] (BHSD) -> out [B, H, L, D], lse [B, H, L] (natural log).

    kv_len: keys past it are masked (the kernel reads whole tiles; S % block_kv == 0).
    table: (kv_num_blocks [B, H, R] int32, kv_indices [B, H, R, C] int32) with
      R = L // block_q, C = S // block_kv (block size == tile size in this prototype).
    p_in_smem: stage P through SMEM for the PV wgmma (default: in interpret mode,
      which has no register-LHS wgmma); on the GPU P stays in registers (FA3).
    """
    B, H, L, D = q.shape
    S = k.shape[2]
    assert L % block_q == 0 and S % block_kv == 0, "prototype: whole tiles only"
    nq, nkv = L // block_q, S // block_kv
    dtype = q.dtype
    scale = 1.0 / math.sqrt(D)
    kv_len = S if kv_len is None else kv_len
    if p_in_smem is None:
        p_in_smem = bool(interpret)
    if acc_in_place is None:
        acc_in_place = not interpret
    sparse = table is not None
    has_doc = doc is not None  # a captured array read as doc[q_idx] and doc[kv_idx]
    lane = semantics == "lane"

    def smem(shape, dt):
        # Lane semantics: the wgmma operand tiles must be declared tiled+swizzled;
        # Warpgroup semantics infers the transforms.
        if lane and swizzle and len(shape) >= 2:
            elem = jnp.dtype(dt).itemsize
            sw = min(128, shape[-1] * elem)
            tr = (plgpu.TilingTransform((8, sw // elem)), plgpu.SwizzleTransform(sw))
            return plgpu.SMEM(shape, dt, transforms=tr)
        return plgpu.SMEM(shape, dt)

    def body(*refs):
        refs = list(refs)
        q_ref, k_ref, v_ref = refs[:3]
        num_ref, idx_ref = refs[3:5] if sparse else (None, None)
        doc_ref = refs[3 + 2 * sparse] if has_doc else None
        o_ref, lse_ref, scratch = refs[-3:]
        (q_s, k_s, v_s, p_s, lse_s, tbl_s, q_bar, k_bar, v_bar, t_bar, dq_s, dk_s, c_bar) = scratch
        b = lax.axis_index("b")
        h = lax.axis_index("h")
        qi = lax.axis_index("q")
        q_base = qi * block_q

        wg_id = lax.axis_index("wg") if ws else None

        # The block table row of this q tile: one small TMA copy GMEM -> SMEM,
        # then scalar reads from SMEM (the "scalar prefetch").
        def setup_copies():
            if sparse:
                plgpu.copy_gmem_to_smem(idx_ref.at[b, h, qi], tbl_s, t_bar.at[0])
            plgpu.copy_gmem_to_smem(q_ref.at[b, h, pl.ds(q_base, block_q)], q_s, q_bar.at[0])
            if has_doc:  # doc[q_idx] of the q tile: one contiguous slice, same barrier as Q
                plgpu.copy_gmem_to_smem(doc_ref.at[pl.ds(q_base, block_q)], dq_s, q_bar.at[0])

        if ws:
            pl.when(wg_id == 0)(setup_copies)
        else:
            setup_copies()

        if sparse:
            n_steps = num_ref[b, h, qi]  # scalar read from GMEM
            plgpu.barrier_wait(t_bar.at[0])
            kv_block = lambda j: tbl_s[j]
        else:
            if causal:
                n_steps = jnp.minimum(
                    lax.div(q_base + block_q + block_kv - 1, jnp.int32(block_kv)), nkv
                )
            else:
                n_steps = jnp.int32(nkv)
            kv_block = lambda j: j

        def issue(j, slot):
            rows = pl.ds(kv_block(j) * block_kv, block_kv)
            plgpu.copy_gmem_to_smem(k_ref.at[b, h, rows], k_s.at[slot], k_bar.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[b, h, rows], v_s.at[slot], v_bar.at[slot])
            if has_doc:  # doc[kv_idx] of the tile rides the K barrier (two copies, one barrier)
                plgpu.copy_gmem_to_smem(doc_ref.at[rows], dk_s.at[slot], k_bar.at[slot])

        if ws:
            # Producer warpgroup: TMA K/V into the 2-slot ring, waiting for the
            # consumer to release a slot before reusing it.
            @pl.when(wg_id == 1)
            def _producer():
                if not interpret:
                    plgpu.set_max_registers(40, action="decrease")

                def prod(j, _):
                    slot = lax.rem(j, 2)

                    @pl.when(j >= 2)
                    def _():
                        plgpu.barrier_wait(c_bar.at[slot])

                    issue(j, slot)

                lax.fori_loop(0, n_steps, prod, None)

                # Observe the consumer's last releases (the interpreter checks every
                # completed barrier phase is observed by a thread that observed one).
                def drain(j, _):
                    plgpu.barrier_wait(c_bar.at[lax.rem(j, 2)])

                lax.fori_loop(jnp.maximum(n_steps - 2, 0), n_steps, drain, None)
        else:

            @pl.when(n_steps > 0)
            def _():
                issue(0, 0)

        def consumer():
            if ws and not interpret:
                plgpu.set_max_registers(232, action="increase")
            plgpu.barrier_wait(q_bar.at[0])

            wg = plgpu.Layout.WGMMA
            row_l = wg.reduce(1)
            # jax 0.10.2's interpreter has no rule for layout_cast_p (0.11 treats it as a
            # no-op): interpret mode skips the casts, layouts only matter when compiled.
            if interpret:
                cast = lambda x, layout: x
                iota = lambda dt, shape, dim, layout: lax.broadcasted_iota(dt, shape, dim)
            else:
                cast = plgpu.layout_cast
                iota = lambda dt, shape, dim, layout: plgpu.broadcasted_iota(
                    dt, shape, dim, layout=layout
                )
            acc = cast(jnp.zeros((block_q, D), jnp.float32), wg)
            m_i = cast(jnp.full((block_q,), MASKED, jnp.float32), row_l)
            l_i = cast(jnp.zeros((block_q,), jnp.float32), row_l)
            # Index tiles with the accumulator's layout: element (r, c) of the score tile.
            q_idx = q_base + iota(jnp.int32, (block_q, block_kv), 0, wg)
            col = iota(jnp.int32, (block_q, block_kv), 1, wg)

            def load_vec(ref, layout):
                """An SMEM vector into registers in `layout` (a row or column of the tile)."""
                if interpret:  # 0.10.2's interpreter has no gpu load_p rule; 0.11's ignores layouts
                    return ref[...]
                if JAX_MINOR < (0, 11):
                    return plgpu.load(ref, (), layout=layout)
                return plgpu.load(ref, layout=layout)

            if has_doc:
                doc_q = lax.broadcast_in_dim(load_vec(dq_s, row_l), (block_q, block_kv), [0])

            def step(j, carry):
                acc, m_i, l_i = carry
                slot = lax.rem(j, 2)

                if not ws:  # single warpgroup: issue the next tile's copy before computing

                    @pl.when(j + 1 < n_steps)
                    def _():
                        issue(j + 1, 1 - slot)

                plgpu.barrier_wait(k_bar.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_s, k_s.at[slot].transpose((1, 0)))
                    return acc_ref[...]

                if interpret and JAX_MINOR < (0, 11):
                    # jax 0.10.2's interpreter cannot read a transposed SMEM operand of
                    # wgmma ('TransposeTransform' object has no attribute 'indices').
                    s = lax.dot_general(
                        q_s[...], k_s[slot], (((1,), (1,)), ((), ())),
                        precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
                    )  # fmt: skip
                else:
                    s = pl.run_scoped(qk, plgpu.ACC((block_q, block_kv), jnp.float32))
                # ---- the "score_mod / mask_mod" site: elementwise on a register tile.
                kv_idx = kv_block(j) * block_kv + col
                keep = kv_idx < kv_len
                if causal:
                    keep = keep & (q_idx >= kv_idx)
                if has_doc:
                    doc_kv = load_vec(dk_s.at[slot], wg.reduce(0))
                    keep = keep & (doc_q == lax.broadcast_in_dim(doc_kv, (block_q, block_kv), [1]))
                s = jnp.where(keep, s * (scale * LOG2E), MASKED)  # base-2 score units
                # ---- online softmax
                m_new = jnp.maximum(m_i, s.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                p = jnp.where(keep, p, 0.0)  # rows with nothing kept yet: exp2(0) = 1 otherwise
                l_new = l_i * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)
                plgpu.barrier_wait(v_bar.at[slot])
                if p_in_smem:
                    p_s[...] = p16
                    plgpu.commit_smem()
                    lhs = p_s
                else:
                    lhs = p16

                if acc_in_place:
                    # FA3: accumulate into the running accumulator (pl.run_state over ACC.init).
                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, lhs, v_s.at[slot])

                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                else:
                    # Interpret mode has no run_state: a fresh scoped accumulator, added.
                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, lhs, v_s.at[slot])
                        return acc_ref[...]

                    acc = acc + pl.run_scoped(pv, plgpu.ACC((block_q, D), jnp.float32))
                if ws:  # release the slot to the producer
                    plgpu.barrier_arrive(c_bar.at[slot])
                return acc, m_new, l_new

            acc, m_i, l_i = lax.fori_loop(0, n_steps, step, (acc, m_i, l_i))

            empty = l_i == 0.0
            l_safe = jnp.where(empty, 1.0, l_i)
            out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
            lse = jnp.where(empty, -jnp.inf, (m_i + jnp.log2(l_safe)) / LOG2E)
            q_s[...] = out.astype(dtype)  # reuse Q's buffer for the output tile
            lse_s[...] = lse
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_s, o_ref.at[b, h, pl.ds(q_base, block_q)])
            plgpu.copy_smem_to_gmem(lse_s, lse_ref.at[b, h, pl.ds(q_base, block_q)])
            plgpu.wait_smem_to_gmem(0)

        if ws:
            pl.when(wg_id == 0)(consumer)
        else:
            consumer()

    scratch = [
        smem((block_q, D), dtype),  # q, then out
        smem((2, block_kv, D), dtype),  # k ring
        smem((2, block_kv, D), dtype),  # v ring
        smem((block_q, block_kv), dtype) if p_in_smem else None,
        plgpu.SMEM((block_q,), jnp.float32),  # lse
        plgpu.SMEM((table[1].shape[-1] + (-table[1].shape[-1] % 32),), jnp.int32)
        if sparse
        else None,
        # Each copy_gmem_to_smem is one arrival: a barrier shared by n copies needs
        # num_arrivals=n (the interpreter reports "Barrier completed phase 1, but no
        # threads observed phase 0" otherwise; the GPU would run ahead or hang).
        plgpu.Barrier(num_arrivals=1 + has_doc, num_barriers=1),  # q (+ doc[q tile])
        plgpu.Barrier(num_arrivals=1 + has_doc, num_barriers=2),  # k (+ doc[kv tile])
        plgpu.Barrier(num_barriers=2),  # v
        plgpu.Barrier(num_barriers=1),  # block-table row
        plgpu.SMEM((block_q,), jnp.int32) if has_doc else None,
        plgpu.SMEM((2, block_kv), jnp.int32) if has_doc else None,
        plgpu.Barrier(num_barriers=2) if ws else None,  # slot consumed (consumer -> producer)
    ]
    params = interpret if isinstance(interpret, InterpretGPUParams) else InterpretGPUParams()
    kw = dict(interpret=params) if interpret else {}
    kernel = plgpu.kernel(
        body,
        out_type=(
            jax.ShapeDtypeStruct((B, H, L, D), dtype),
            jax.ShapeDtypeStruct((B, H, L), jnp.float32),
        ),
        scratch_types=[tuple(scratch)],
        grid=(nq, H, B),
        grid_names=("q", "h", "b"),
        **(dict(num_threads=2, thread_name="wg") if ws else {}),
        compiler_params=plgpu.CompilerParams(
            approx_math=not interpret, lowering_semantics=_semantics(semantics)
        ),
        **kw,
    )
    if sparse:
        num, idx = table
        pad = -idx.shape[-1] % 32  # Lane-semantics copies move a multiple of 128 bytes
        table = (num, jnp.pad(idx, ((0, 0),) * 3 + ((0, pad),)))
    args = (q, k, v) + (tuple(table) if sparse else ()) + ((doc,) if has_doc else ())
    return kernel(*args)


# ----------------------------------------------------------------------------- reference


def reference(
    q, k, v, *, causal=False, kv_len=None, block_mask=None, block_q=64, block_kv=64, doc=None
):
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    L, S, D = q.shape[2], k.shape[2], q.shape[3]
    s = jnp.einsum("bhqd,bhkd->bhqk", q32, k32, precision="highest") / math.sqrt(D)
    qi = jnp.arange(L)[:, None]
    ki = jnp.arange(S)[None, :]
    keep = ki < (S if kv_len is None else kv_len)
    if causal:
        keep = keep & (qi >= ki)
    if doc is not None:
        keep = keep & (doc[:L, None] == doc[None, :S])
    keep = jnp.broadcast_to(keep, s.shape)
    if block_mask is not None:  # [B, H, R, C] bool
        keep = keep & jnp.repeat(jnp.repeat(block_mask, block_q, 2), block_kv, 3)
    s = jnp.where(keep, s, -jnp.inf)
    m = s.max(-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = p.sum(-1, keepdims=True)
    out = jnp.einsum("bhqk,bhkd->bhqd", p / jnp.where(l == 0, 1, l), v32, precision="highest")
    lse = jnp.where(l[..., 0] == 0, -jnp.inf, (m + jnp.log(l))[..., 0])
    return out, lse


def tables_from_block_mask(bm):
    """BlockMask-style row tables from a dense [B, H, R, C] bool block mask."""
    bm = np.asarray(bm)
    num = bm.sum(-1).astype(np.int32)
    order = np.argsort(~bm, axis=-1, kind="stable").astype(np.int32)  # listed blocks first
    return jnp.asarray(num), jnp.asarray(order)


def _inputs(B, H, L, S, D, dtype, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return tuple(
        jax.random.normal(key, (B, H, n, D), jnp.float32).astype(dtype)
        for key, n in ((kq, L), (kk, S), (kv, S))
    )


def _check(name, got, want, atol):
    out, lse = got
    ro, rl = want
    err_o = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ro)))
    fin = jnp.isfinite(rl)
    err_l = float(jnp.max(jnp.where(fin, jnp.abs(lse - rl), 0.0)))
    inf_ok = bool(jnp.all(jnp.isfinite(lse) == fin))
    ok = err_o < atol and err_l < atol and inf_ok
    print(
        f"  {name}: max|out err|={err_o:.2e} max|lse err|={err_l:.2e} inf-pattern ok={inf_ok} -> {'PASS' if ok else 'FAIL'}"
    )
    return ok


def main_interpret(semantics="lane"):
    print(f"jax {jax.__version__}  interpret mode, semantics={semantics}")
    ok = True
    B, H, L, D = 1, 2, 256, 64
    for dtype, atol in ((jnp.float32, 2e-3), (jnp.bfloat16, 3e-2)):
        q, k, v = _inputs(B, H, L, L, D, dtype)
        for causal, kv_len in ((False, None), (True, None), (False, 200)):
            name = f"{jnp.dtype(dtype).name} causal={causal} kv_len={kv_len}"
            t = time.perf_counter()
            got = jax.block_until_ready(
                flash_fwd(
                    q, k, v, causal=causal, kv_len=kv_len, interpret=True, semantics=semantics
                )
            )
            dt = time.perf_counter() - t
            t = time.perf_counter()
            jax.block_until_ready(
                flash_fwd(
                    q, k, v, causal=causal, kv_len=kv_len, interpret=True, semantics=semantics
                )
            )
            dt2 = time.perf_counter() - t
            print(f" {name}: first call {dt:.2f}s, second {dt2:.2f}s")
            ok &= _check(name, got, reference(q, k, v, causal=causal, kv_len=kv_len), atol)
    # block-sparse: a random block mask (some rows empty), tables listing blocks in random order
    q, k, v = _inputs(B, H, L, L, D, jnp.float32, seed=1)
    R = C = L // 64
    rng = np.random.default_rng(0)
    bm = rng.random((B, H, R, C)) < 0.5
    bm[0, 0, 1, :] = False  # an empty row: out 0, lse -inf
    num, idx = tables_from_block_mask(bm)
    idx = np.array(idx)
    for r in range(R):  # shuffle the listed blocks: order must not matter
        for hh in range(H):
            n = int(num[0, hh, r])
            idx[0, hh, r, :n] = rng.permutation(idx[0, hh, r, :n])
    idx = jnp.asarray(idx)
    t = time.perf_counter()
    got = jax.block_until_ready(
        flash_fwd(q, k, v, table=(num, idx), interpret=True, semantics=semantics)
    )
    print(f" block-sparse f32: {time.perf_counter() - t:.2f}s")
    ok &= _check("block-sparse f32", got, reference(q, k, v, block_mask=jnp.asarray(bm)), 2e-3)
    # document mask: doc[q_idx] == doc[kv_idx] (+ causal), doc staged through SMEM
    doc = jnp.asarray(np.repeat(np.arange(5), [30, 70, 64, 2, 90]).astype(np.int32))
    for dtype, atol in ((jnp.float32, 2e-3), (jnp.bfloat16, 3e-2)):
        q, k, v = _inputs(B, H, L, L, D, dtype, seed=2)
        t = time.perf_counter()
        got = jax.block_until_ready(
            flash_fwd(q, k, v, causal=True, doc=doc, interpret=True, semantics=semantics)
        )
        name = f"doc-mask causal {jnp.dtype(dtype).name}"
        print(f" {name}: {time.perf_counter() - t:.2f}s")
        ok &= _check(name, got, reference(q, k, v, causal=True, doc=doc), atol)
    # warp specialisation: a producer warpgroup (TMA) and a consumer warpgroup, with
    # consumed barriers; detect_races on: the interpreter's vector clocks check the protocol.
    for name, kw in (
        ("ws causal+doc bf16", dict(causal=True, doc=doc)),
        ("ws block-sparse f32", dict(table=(num, idx))),
    ):
        dt_ = jnp.float32 if "f32" in name else jnp.bfloat16
        q, k, v = _inputs(B, H, L, L, D, dt_, seed=3)
        t = time.perf_counter()
        got = jax.block_until_ready(
            flash_fwd(
                q,
                k,
                v,
                ws=True,
                interpret=InterpretGPUParams(detect_races=True),
                semantics=semantics,
                **kw,
            )
        )
        print(f" {name}: {time.perf_counter() - t:.2f}s")
        want = reference(
            q,
            k,
            v,
            causal=kw.get("causal", False),
            doc=kw.get("doc"),
            block_mask=jnp.asarray(bm) if "table" in kw else None,
        )
        ok &= _check(name, got, want, 3e-2 if dt_ == jnp.bfloat16 else 2e-3)
    print("ALL PASS" if ok else "SOME FAILED")
    return ok


def main_lower():
    print(f"jax {jax.__version__}  cross-lowering for cuda on a CPU-only machine")
    B, H, L, D = 1, 2, 256, 64
    q, k, v = _inputs(B, H, L, L, D, jnp.bfloat16)
    num, idx = tables_from_block_mask(np.ones((B, H, L // 64, L // 64), bool))
    extra = [
        (
            "lane no-swizzle (must fail)",
            dict(semantics="lane", swizzle=False, causal=True),
            jnp.bfloat16,
            64,
        ),
        ("lane f32 (tf32 wgmma?)", dict(semantics="lane", causal=True), jnp.float32, 64),
        ("warpgroup f32", dict(semantics="warpgroup", causal=True), jnp.float32, 64),
        (
            "lane D=128 bq=128 bkv=128",
            dict(semantics="lane", causal=True, block_q=128, block_kv=128),
            jnp.bfloat16,
            128,
        ),
        (
            "warpgroup D=128 bq=128 bkv=128",
            dict(semantics="warpgroup", causal=True, block_q=128, block_kv=128),
            jnp.bfloat16,
            128,
        ),
    ]
    for tag, kw, dt, d in extra:
        qq, kk, vv = _inputs(B, H, L, L, d, dt)
        try:
            txt = (
                jax.jit(functools.partial(flash_fwd, **kw))
                .trace(qq, kk, vv)
                .lower(lowering_platforms=("cuda",))
                .as_text()
            )
            print(f"  {tag}: lowered OK ({'mosaic_gpu' in txt})")
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()
            print(f"  {tag}: FAILED {type(e).__name__}: {msg[0][:300] if msg else ''}")
    for semantics in ("lane", "warpgroup"):
        for p_in_smem in (False, True):
            doc = jnp.zeros((L,), jnp.int32)
            for name, kw in (
                ("dense causal", dict(causal=True)),
                ("sparse", dict(table=(num, idx))),
                ("doc-mask", dict(causal=True, doc=doc)),
                ("ws sparse+doc", dict(table=(num, idx), doc=doc, ws=True)),
            ):
                f = functools.partial(flash_fwd, semantics=semantics, p_in_smem=p_in_smem, **kw)
                tag = f"{semantics:9s} p_in_smem={p_in_smem!s:5s} {name}"
                try:
                    t = time.perf_counter()
                    txt = jax.jit(f).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
                    print(
                        f"  {tag}: lowered OK ({'mosaic_gpu' in txt}) {time.perf_counter() - t:.1f}s"
                    )
                except Exception as e:  # noqa: BLE001
                    msg = str(e).strip().splitlines()
                    print(f"  {tag}: FAILED {type(e).__name__}: {msg[0][:300] if msg else ''}")


if __name__ == "__main__":
    if "--lower" in sys.argv:
        main_lower()
    else:
        sem = "warpgroup" if "--warpgroup" in sys.argv else "lane"
        sys.exit(0 if main_interpret(sem) else 1)
