"""Block-sparse flex_attention forward in Pallas Mosaic GPU (sm90): FlashAttention-3's structure.

One CTA per (query head, q-block row of the BlockMask, batch), three
warpgroups:
  * a producer (few registers) that TMA-loads the K/V tiles of the row's
    kv blocks into a `stages`-deep shared-memory ring, each slot refilled once
    both consumers have released it (consumed barriers);
  * two consumers, each owning half of the q block (64 rows; the BlockMask's
    q block is 128), with Q in shared memory, QK^T and PV on wgmma (the
    accumulator and P in registers), the online softmax in float32 and base 2
    (`softmax.mod_score_units`); each step's QK^T is issued together with the
    previous step's PV, so the softmax runs while PV is on the tensor cores
    (`FwdConfig.pipelined`), and at D=64 a schedule barrier also makes the two
    consumers take turns (`default_config`: both measured).

The row's block list is the BlockMask's: first its partial blocks, where the
mods run and the mask_mod's keep decides (`score_tile.TileMods`, on index
tiles in the accumulator's register layout), then its full blocks, where only
the score_mod runs. Both lists are copied once into shared memory and read
as scalars by all three warpgroups; empty blocks cost nothing.

Out and lse go back through shared memory with TMA stores. lse is natural
log, -inf for rows that keep nothing (out 0 there, never NaN).

What it does not run (the backend's `supports` says so and the Triton
kernels run it): float32, head dims other than 64 and 128 or E != Ev, a q
block other than 128, lengths that are not multiples of the blocks, index
offsets (meshes, decode positions), captured-array reads at index
tiles.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import dispatch
from pallas_kernels.mosaic_gpu import compat, ring
from pallas_kernels.mosaic_gpu.staged_reads import StagedReads
from pallas_kernels.mosaic_gpu.tile_ops import MosaicTileOps
from pallas_kernels.score_tile import TileMods
from pallas_kernels.softmax import LOG2E, MASKED_SCORE, mod_score_units, scaled
from pallas_kernels.spec import KernelSpec, Layout, Mods, TableView
from pallas_kernels.triton.launch import kernel_mods, mod_inputs

__all__ = [
    "CONSUMERS", "SMEM_BYTES", "FwdConfig", "default_config", "flex_fwd", "fwd_refusal",
    "smem_bytes",
]  # fmt: skip

CONSUMERS = 2  # consumer warpgroups per CTA; each takes q_block_size // 2 rows
SMEM_BYTES = 227 * 1024  # shared memory a CTA may use on sm90


def smem_bytes(spec: KernelSpec, cfg: FwdConfig) -> int:
    """Shared memory of the forward kernel (an upper bound: swizzled buffers are 1 KiB aligned)."""
    item = jnp.dtype(spec.dtype).itemsize
    q_out = spec.q_block_size * spec.E * item
    ring = 2 * cfg.stages * spec.kv_block_size * spec.E * item
    tables = 2 * 4 * (spec.C + -spec.C % compat.TABLE_ALIGN)
    return q_out + ring + spec.q_block_size * 4 + tables + 4 * 1024  # buffers 1 KiB aligned


@dataclasses.dataclass(frozen=True, kw_only=True)
class FwdConfig:
    """stages: K/V ring depth; schedule_barrier: consumers take turns on the tensor cores;
    longest_first: CTAs take the BlockMask's rows last to first (under a causal mask the
    longest rows start first, and the short ones fill the last wave); pipelined: each
    consumer issues step j's QK^T with step j-1's PV and runs the softmax of S_j while PV
    runs (compiled kernels only: the interpreter has no in-place accumulator, so interpret
    mode runs the unpipelined order); triton_fwd: run the Triton backend's forward instead
    (the backward stays this backend's): asked for (AUTO does where Triton's forward
    measured faster, `MosaicGpuBackend.auto_options`) or set for the calls `fwd_refusal`
    names; triton: the Triton forward's config, for triton_fwd. The backend's defaults depend on the head
    dim (`default_config`)."""

    stages: int = 2
    schedule_barrier: bool = True
    longest_first: bool = True
    pipelined: bool = True
    triton_fwd: bool = False
    triton: Any = None

    def __post_init__(self):
        if self.stages < 2:
            raise ValueError(f"stages={self.stages} must be >= 2 (a ring of K/V tiles)")
        if self.triton_fwd and self.triton is None:
            raise ValueError("triton_fwd=True needs triton, the Triton forward's config")


def default_config(spec: KernelSpec, **values) -> FwdConfig:
    """FwdConfig(**values), the fields not given set as measured fastest for spec's head dim
    (H200, S=8192): at D=128 pipelined, without consumer turns (causal 1.77 ms; with turns
    1.85, unpipelined 1.89: bench/results/mosaic_gpu_h200_2026-11-29_pipelined.md); at D=64
    with consumer turns (pipelined 5.50 ms, without turns 5.95), a ring of 4, not pipelined
    (causal 5.46-5.48 ms against 5.54-5.56 pipelined with 2, noop 10.30-10.33 against
    10.52-10.57, three runs: bench/results/mosaic_fwd_rings_h200_2026-11-29.md)."""
    small = spec.E <= 64
    measured = {"schedule_barrier": small, "pipelined": not small, "stages": 4 if small else 2}
    return FwdConfig(**{**measured, **values})


def fwd_refusal(spec: KernelSpec) -> str | None:
    """Why this forward cannot run a call the backend supports (Triton's forward then runs
    it), or None: a short query the backend took for its decode kernel, run by the regular
    forward (under differentiation, or with kernel_options decode=False)."""
    if spec.L % spec.q_block_size:
        return f"a query length that is a multiple of the q block (L={spec.L})"
    return None


def _smem(shape, dtype, interpret: bool):
    """A shared-memory tile laid out for wgmma (Lane semantics declares the swizzle)."""
    if interpret:
        return plgpu.SMEM(shape, dtype)
    row_bytes = min(128, shape[-1] * jnp.dtype(dtype).itemsize)
    elems = row_bytes // jnp.dtype(dtype).itemsize
    transforms = (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(row_bytes))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def _row_bcast(x, shape):
    return lax.broadcast_in_dim(x, shape, [0])


@functools.partial(jax.jit, static_argnames=("spec", "cfg"))
def flex_fwd(q, k, v, tables: TableView, mods: Mods, offsets, *, spec: KernelSpec, cfg: FwdConfig):
    """q [B, Hq, L, E], k/v [Bkv, Hkv, S, E] in spec.layout's order -> out (q's dtype, the same
    order) and lse f32 ([B, Hq, L], or [B, L, Hq] for BSHD)."""
    dispatch.kernel_traced("MOSAIC_GPU", "fwd")
    if offsets is not None:
        raise ValueError("the Mosaic GPU forward takes no index offsets (supports() refuses them)")
    interpret = spec.interpret
    dtype = q.dtype
    bq, bkv, D = spec.q_block_size // CONSUMERS, spec.kv_block_size, spec.E
    stages, G = cfg.stages, spec.group_size
    pre, to_base2 = mod_score_units(spec.scale, mods.score)
    num, idx, full_num, full_idx = compat.padded_tables(tables)
    consts = mod_inputs(mods, None)
    programs = kernel_mods(mods)["programs"]
    n_score = len(mods.score_consts)
    partial, full = spec.has_partial, spec.has_full
    reads = StagedReads(mods, "forward")

    def at(b, h, rows):
        """The index of a [rows, D] tile of a [B, H, seq, D] array in the call's layout."""
        return (b, h, rows) if spec.layout is Layout.BHSD else (b, rows, h)

    def body(q_ref, k_ref, v_ref, num_ref, idx_ref, fnum_ref, fidx_ref, *rest):
        const_refs = rest[: len(consts)]
        o_ref, lse_ref, scratch = rest[len(consts) :]
        (qo_s, k_s, v_s, p_s, lse_s, tp_s, tf_s, q_stage, kv_stage,
         q_bar, k_bar, v_bar, t_bar, kc_bar, vc_bar, sched_bar) = scratch  # fmt: skip
        refs = (const_refs[:n_score], const_refs[n_score:])
        h, r, b = lax.axis_index("h"), lax.axis_index("q"), lax.axis_index("b")
        if cfg.longest_first:
            r = spec.R - 1 - r
        wg = lax.axis_index("wg")
        bm = 0 if spec.mask_batch_broadcast else b
        hm = 0 if spec.mask_head_broadcast else h
        kv_b = 0 if spec.kv_batch_broadcast else b
        kv_h = lax.div(h, jnp.int32(G)) if G > 1 else h
        n_p = num_ref[bm, hm, r] if partial else jnp.int32(0)
        n_f = fnum_ref[bm, hm, r] if full else jnp.int32(0)
        n = n_p + n_f

        def kv_block(j):
            """The kv block of step j: the partial list, then the full one (scalars in SMEM)."""
            if partial and full:
                return jnp.where(j < n_p, tp_s[j], tf_s[jnp.maximum(j - n_p, 0)])
            return (tp_s if partial else tf_s)[j]

        def producer():
            if partial:
                compat.copy_list(idx_ref.at[bm, hm, r], tp_s, t_bar.at[0])
            if full:
                compat.copy_list(fidx_ref.at[bm, hm, r], tf_s, t_bar.at[0])
            plgpu.barrier_wait(t_bar.at[0])

            def copy(ref, smem, bar, j, slot):
                rows = pl.ds(kv_block(j) * bkv, bkv)
                plgpu.copy_gmem_to_smem(ref.at[at(kv_b, kv_h, rows)], smem.at[slot], bar.at[slot])
                if ref is k_ref and reads.kv:  # the mods' kv_idx slices ride K's barrier
                    found = reads.starts(refs, b, h, r * (CONSUMERS * bq), kv_block(j) * bkv)
                    reads.copy(reads.kv, found, bkv, kv_stage, slot, bar.at[slot])

            k_part = (functools.partial(copy, k_ref, k_s, k_bar), kc_bar)
            v_part = (functools.partial(copy, v_ref, v_s, v_bar), vc_bar)
            ring.producer_ring(n, stages, [k_part, v_part], interpret)

        def consumer():
            qo = qo_s.at[wg]
            q_row0 = r * (CONSUMERS * bq) + wg * bq
            plgpu.copy_gmem_to_smem(q_ref.at[at(b, h, pl.ds(q_row0, bq))], qo, q_bar.at[wg])
            if reads.q:  # the mods' q_idx slices ride Q's barrier
                found = reads.starts(refs, b, h, q_row0, jnp.int32(0))
                reads.copy(reads.q, found, bq, q_stage, wg, q_bar.at[wg])
            plgpu.barrier_wait(t_bar.at[0])
            plgpu.barrier_wait(q_bar.at[wg])
            tile = (bq, bkv)
            ops = MosaicTileOps(interpret, tile)
            q_tiles = reads.tiles(reads.q, q_stage, wg, tile, 0, interpret)
            mods_ = TileMods(spec, programs, const_refs[:n_score], const_refs[n_score:], None, ops)

            acc0 = compat.layout_cast(jnp.zeros((bq, D), jnp.float32), compat.WGMMA, interpret)
            m_i0 = compat.layout_cast(
                jnp.full((bq,), MASKED_SCORE, jnp.float32), compat.ROW, interpret
            )
            l_i0 = compat.layout_cast(jnp.zeros((bq,), jnp.float32), compat.ROW, interpret)

            @pl.when(n > 0)
            def _():
                plgpu.barrier_wait(k_bar.at[0])

            turns = ring.Turns(sched_bar, wg)  # the consumers take turns (schedule_barrier)
            turns.start()

            def staged_for(j, masked: bool):
                """The staged slices this step's mods read (the kv_idx ones share K's slot:
                read them before releasing it; the producer refills both once the consumers
                arrive on kc_bar)."""
                needed = lambda read: read[0] == 0 or masked  # mask_mod: partial blocks only
                slot = lax.rem(j, stages)
                return q_tiles | reads.tiles(reads.kv, kv_stage, slot, tile, 1, interpret, needed)

            def online_softmax(s, j, masked: bool, staged, m_i, l_i):
                """Step j's raw scores -> (P in dtype, new max, new sum, the rescale alpha)."""
                s = scaled(s, pre)
                if masked or mods_.score is not None:
                    q_idx = ops.index(q_row0, 0)
                    kv_idx = ops.index(kv_block(j) * bkv, 1)
                    ops.staged = reads.order(staged, masked)
                    s, _, _ = mods_.apply(s, b, h, q_idx, kv_idx, masked)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                m_base2 = jnp.where(m_new == MASKED_SCORE, 0.0, m_new) * to_base2
                p = jnp.exp2(s * to_base2 - _row_bcast(m_base2, tile))
                alpha = jnp.exp2(m_i * to_base2 - m_base2)
                return p.astype(dtype), m_new, l_i * alpha + p.sum(axis=1), alpha

            def wait_next_k(j):
                nxt = j + 1

                @pl.when(nxt < n)
                def _():
                    plgpu.barrier_wait(k_bar.at[lax.rem(nxt, stages)])

            def step(j, carry, masked: bool):
                acc, m_i, l_i = carry
                slot = lax.rem(j, stages)
                staged = staged_for(j, masked)
                s = compat.matmul_nt(qo, k_s.at[slot], tile, interpret, after=turns.turn)
                ring.release(kc_bar.at[slot], bool(reads.kv))
                p16, m_new, l_i, alpha = online_softmax(s, j, masked, staged, m_i, l_i)
                acc = acc * _row_bcast(alpha, acc.shape)
                turns.arrive()  # done with the softmax: the other consumer's turn
                plgpu.barrier_wait(v_bar.at[slot])
                turns.wait()

                if interpret:  # no register-LHS wgmma nor in-place accumulator: stage P, add
                    p_s.at[wg][...] = p16
                    plgpu.commit_smem()

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p_s.at[wg], v_s.at[slot])
                        wait_next_k(j)
                        return acc_ref[...]

                    acc = acc + pl.run_scoped(pv, plgpu.ACC((bq, D), jnp.float32))
                else:

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_s.at[slot])
                        wait_next_k(j)

                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(vc_bar.at[slot])
                return acc, m_new, l_i

            def loops(step, carry):
                if partial:
                    carry = lax.fori_loop(0, n_p, functools.partial(step, masked=True), carry)
                if full:
                    carry = lax.fori_loop(n_p, n, functools.partial(step, masked=False), carry)
                return carry

            def pipelined(acc_ref):
                """The loop with step j's QK^T issued together with step j-1's PV, so the
                softmax of S_j runs while PV_{j-1} is on the tensor cores (FlashAttention-3's
                intra-warpgroup overlap); O stays in its accumulator registers throughout.

                Every wgmma wait is unconditional (ptxas serialises all wgmmas of a kernel
                whose accumulator reads it cannot prove ordered after a wait): step 0 also
                issues a PV, of P = 0 with its own V tile, which adds exactly what the
                unpipelined order and the reference add for that tile (0, or NaN where V
                holds a non-finite value: 0 * inf is NaN in both). Each V tile is waited for
                once: V_0 at step 0, V_i (i >= 1) at step i + 1 or after the loop."""

                def pstep(j, carry, masked: bool):
                    m_i, l_i, p_prev = carry
                    slot, prev = lax.rem(j, stages), lax.rem(j + stages - 1, stages)
                    first = j == 0
                    staged = staged_for(j, masked)
                    row = jnp.where(first, slot, prev)  # the V tile of this step's PV

                    def qk(s_ref):
                        plgpu.wgmma(s_ref, qo, k_s.at[slot].transpose((1, 0)))

                        @pl.when(j != 1)  # (step 1's PV reads V_0, waited for at step 0)
                        def _():
                            plgpu.barrier_wait(v_bar.at[row])

                        plgpu.wgmma(acc_ref, p_prev, v_s.at[row])
                        turns.turn()
                        plgpu.wgmma_wait(1)  # S_j is done; PV_{j-1} may still run
                        return plgpu.wgmma_accumulator_load(s_ref, wait_n=None)

                    s = pl.run_scoped(qk, plgpu.ACC(tile, jnp.float32))
                    ring.release(kc_bar.at[slot], bool(reads.kv))
                    p16, m_new, l_i, alpha = online_softmax(s, j, masked, staged, m_i, l_i)
                    turns.arrive()
                    plgpu.wgmma_wait(0)  # PV_{j-1} is done: rescale O, release its tile

                    @pl.when(~first)
                    def _():
                        plgpu.barrier_arrive(vc_bar.at[prev])

                    acc_ref[...] = acc_ref[...] * _row_bcast(alpha, (bq, D))
                    wait_next_k(j)
                    turns.wait()
                    return m_new, l_i, p16

                p0 = compat.layout_cast(jnp.zeros(tile, dtype), compat.WGMMA, False)
                m_i, l_i, p_last = loops(pstep, (m_i0, l_i0, p0))
                last = lax.rem(n + stages - 1, stages)

                @pl.when(n > 1)  # (with one step, V_0 was waited for at step 0)
                def _():
                    plgpu.barrier_wait(v_bar.at[last])

                @pl.when(n > 0)
                def _():
                    plgpu.wgmma(acc_ref, p_last, v_s.at[last])
                    plgpu.wgmma_wait(0)
                    plgpu.barrier_arrive(vc_bar.at[last])

                plgpu.wgmma_wait(0)  # (unconditional: see above)
                finish(acc_ref[...], m_i, l_i)

            def finish(acc, m_i, l_i):
                turns.end()
                empty = l_i == 0.0
                l_safe = jnp.where(empty, 1.0, l_i)
                m_nat = jnp.where(m_i == MASKED_SCORE, 0.0, m_i) * (to_base2 / LOG2E)
                lse = jnp.where(empty, MASKED_SCORE, m_nat + jnp.log(l_safe))
                qo[...] = (acc / _row_bcast(l_safe, acc.shape)).astype(dtype)
                lse_s.at[wg][...] = lse
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(qo, o_ref.at[at(b, h, pl.ds(q_row0, bq))])
                plgpu.copy_smem_to_gmem(lse_s.at[wg], lse_ref.at[b, h, pl.ds(q_row0, bq)])
                plgpu.wait_smem_to_gmem(0)

            if cfg.pipelined and not interpret:
                pl.run_state(pipelined)(plgpu.ACC.init(acc0))
            else:
                finish(*loops(step, (acc0, m_i0, l_i0)))

        ring.roles(CONSUMERS, interpret, producer, consumer)

    scratch = (
        _smem((CONSUMERS, bq, D), dtype, interpret),  # Q, then out
        _smem((stages, bkv, D), dtype, interpret),  # K ring
        _smem((stages, bkv, D), dtype, interpret),  # V ring
        plgpu.SMEM((CONSUMERS, bq, bkv), dtype) if interpret else None,  # P (interpret mode)
        plgpu.SMEM((CONSUMERS, bq), jnp.float32),  # lse
        plgpu.SMEM(idx.shape[-1:], jnp.int32) if partial else None,  # the row's partial blocks
        plgpu.SMEM(full_idx.shape[-1:], jnp.int32) if full else None,  # and its full blocks
        reads.scratch(reads.q, CONSUMERS, bq),  # the q_idx slices
        reads.scratch(reads.kv, stages, bkv),  # the kv_idx slices
        plgpu.Barrier(num_arrivals=1 + len(reads.q), num_barriers=CONSUMERS),  # Q (+ q slices)
        plgpu.Barrier(num_arrivals=1 + len(reads.kv), num_barriers=stages),  # K (+ kv slices)
        plgpu.Barrier(num_arrivals=1, num_barriers=stages),  # V slot filled
        plgpu.Barrier(
            num_arrivals=compat.list_arrivals(partial, idx, full, full_idx), num_barriers=1
        ),  # tables  # fmt: skip
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # K slot consumed
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # V slot consumed
        ring.Turns.scratch(cfg.schedule_barrier),  # the consumers' turns
    )
    out_type = (
        jax.ShapeDtypeStruct(spec.layout.shape(spec.B, spec.Hq, spec.L, D), dtype),
        jax.ShapeDtypeStruct((spec.B, spec.Hq, spec.L), jnp.float32),  # lse: rows contiguous
    )
    grid, names = (spec.Hq, spec.R, spec.B), ("h", "q", "b")
    kernel = compat.kernel(body, out_type, scratch, grid, names, CONSUMERS + 1, interpret)
    out, lse = kernel(q, k, v, num, idx, full_num, full_idx, *consts)
    if (
        spec.layout is Layout.BSHD
    ):  # lse [B, L, H] like out's order (TMA stores need rows contiguous)
        lse = jnp.swapaxes(lse, 1, 2)
    return out, lse
