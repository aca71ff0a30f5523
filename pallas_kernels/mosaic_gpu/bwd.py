"""Block-sparse flex_attention backward in Pallas Mosaic GPU (sm90): a dq and a dk/dv kernel.

The math is the Triton backward's (`pallas_kernels.triton.bwd`): with p
recomputed from the forward's lse, dv = p^T do, dp = do v^T,
ds = p (dp - delta) pulled back through the score_mod, dq = scale ds k,
dk = scale ds^T q. Two kernels (every output written by one CTA: bitwise
deterministic, no atomics), or by default one, the dk/dv kernel also adding
dq by TMA reduce-adds (`fused_dq`), each with the forward's structure
(`fwd`): a producer warpgroup TMA-loads the streamed tiles into a
`stages`-deep shared-memory ring, two consumer warpgroups hold their 64 rows
of the resident operand and run the products on wgmma, with the scores and P
in registers (interpret mode stages register operands through shared memory).

  * dq: one CTA per (query head, BlockMask row, batch), like the forward: the
    consumers hold Q, dO, lse and delta of their 64 q rows; the producer
    streams the row's K/V blocks (partial list, then full).
  * dk/dv: one CTA per (query head, BlockMask column, batch): the consumers
    hold K and V of their 64 kv rows (the column's kv block is 128); the
    producer streams Q, dO, lse and delta of the column's q blocks (partial
    list, then full) in 64-row halves (or whole blocks, `dkdv_q_rows`).
    Scores are transposed, [kv, q], so dv += p^T do and dk += ds^T q take P
    and dS straight from registers.
    With grouped-query attention or k/v broadcast over the batch, each query
    head's dk/dv is written in float32 and the group (batch) sum follows.

Captured-array reads at `q_idx + c` / `kv_idx + c` are staged as in the
forward (`staged_reads`): the slices of the streamed rows ride the producer's
copies, those of the resident rows the consumers' own.

What it does not run (`bwd_refusal`; the Triton backward runs it): BlockMask
kv blocks other than 128, gradients of captured arrays (and what the
backend's `supports` refuses for both directions).
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
from pallas_kernels.mosaic_gpu.fwd import CONSUMERS, SMEM_BYTES, _smem
from pallas_kernels.mosaic_gpu.staged_reads import StagedReads
from pallas_kernels.mosaic_gpu.tile_ops import MosaicTileOps
from pallas_kernels.score_tile import TileMods
from pallas_kernels.softmax import LOG2E, mod_score_units, scaled
from pallas_kernels.spec import BlockTables, KernelSpec, Layout, Mods
from pallas_kernels.triton.launch import kernel_mods, mod_inputs

__all__ = ["BWD_KV_BLOCK", "BwdConfig", "bwd_refusal", "default_config", "flex_bwd"]

BWD_KV_BLOCK = 128  # the dk/dv kernel's two consumers take 64 kv rows each
_ROWS = 64  # rows a consumer warpgroup owns (wgmma's M)
_GRID = ("h", "blk", "b")  # (query head, BlockMask row or column, batch)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BwdConfig:
    """stages: depth of the streamed operand's ring (both kernels: the dq kernel's K/V tiles
    of 128 rows, the dk/dv kernel's Q/dO tiles of 64); dkdv_stages: the dk/dv kernel's own
    depth, if given (its steps are half as long and its tiles half as big: at D=128 it fits
    4 where the dq kernel fits 2); dkdv_q_rows: the q rows of a dk/dv step, 64 (half a
    BlockMask block) or 128 (the whole block: twice the work per step, for the same waits
    and barriers; with 64-column heads only, where the transposed scores and dP^T of 64 x 128
    and the dk, dv accumulators fit a consumer's registers; not with fused_dq);
    fused_dq: accumulate dq in the dk/dv kernel where it can (`fused_dq`: TMA reduce-adds,
    so dq is not bitwise deterministic) instead of running the dq kernel; on in
    `default_config` (measured faster), off in a bare BwdConfig(); paired: the dk/dv kernel issues
    S^T with dP^T, then dV with dK (two waits a step) rather than S^T; dV with dP^T; dK
    (three); compiled, in FlashAttention-3's order with partial waits (P^T computed while
    dP^T runs, dK and dV accumulating in place); schedule_barrier: the two consumers take turns between their matmul groups
    (the forward's ping-pong: one runs its elementwise work while the other's matmuls use
    the tensor cores); longest_first: the dq kernel takes the BlockMask's rows last to first
    (as the forward: under a causal mask the longest rows start first and the short ones
    fill the last wave; the dk/dv kernel's columns already run longest first there);
    registers: per consumer thread (setmaxnreg: `ring.register_split`;
    at D=128 the dk/dv kernel spills 44 bytes with 232 and 12 with 240, its fused-dq form 376
    and 292, on an H200: 240 measured within 1% of 232); group_loop: with grouped-query
    heads, one dk/dv CTA per kv head (not per query head) that streams the q blocks of its
    group's query heads one head after the other, so dk and dv are written once, in the
    inputs' dtype (no float32 per-head copies, no group sum afterwards; `group_loop`);
    triton: the
    Triton backward's config, for the calls this backward refuses (`bwd_refusal`)."""

    stages: int = 2
    dkdv_stages: int | None = None
    dkdv_q_rows: int = _ROWS
    fused_dq: bool = False
    paired: bool = False
    schedule_barrier: bool = False
    longest_first: bool = True
    registers: int = ring.CONSUMER_REGISTERS
    group_loop: bool = False
    triton: Any = None

    def __post_init__(self):
        for name in ("stages", "dkdv_stages"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(f"{name}={value} must be >= 2 (a ring of tiles)")
        if self.dkdv_q_rows not in (_ROWS, 2 * _ROWS):
            raise ValueError(f"dkdv_q_rows={self.dkdv_q_rows}: expected {_ROWS} or {2 * _ROWS}")
        if self.dkdv_q_rows != _ROWS and self.fused_dq:
            raise ValueError(
                f"dkdv_q_rows={self.dkdv_q_rows} with fused_dq: the fused dq product takes "
                f"{_ROWS} q rows a step; use one or the other"
            )
        ring.register_split(CONSUMERS, self.registers)


def default_config(spec: KernelSpec, **values) -> BwdConfig:
    """BwdConfig(**values), the fields not given set as measured fastest (H200, causal,
    S=8192, fwd+bwd; bench/results/mosaic_bwd_fused_h200_2026-11-29_*.md): dq accumulated in
    the dk/dv kernel (`fused_dq`: bf16 D=128 7.67 ms against 8.14 with the dq kernel, fp16
    D=64 20.67 against 21.61), in the paired order (fp16 D=64 20.31; with the dq kernel,
    bf16 D=128 8.09), with 240 registers per consumer (bf16 D=128 fused, 232: 8.48 ms,
    ptxas spilling 316 bytes; fp16 D=64 within 0.4%). The fused dq is not bitwise
    deterministic (TMA reduce-adds in any order): `MOSAIC_FUSED_DQ=False` (what
    kernel_options["deterministic"] sets: the backend's `deterministic_options`) keeps the
    dq kernel and bitwise-repeatable gradients; so does `dkdv_q_rows=128`, which the fused
    product does not take. Grouped-query heads at D=128 (4 query heads a kv head) fuse too,
    their float32 per-head dk/dv staging sharing shared memory with the dS^T and dq buffers
    (`_aliased`): 7.52 ms against 8.01 with the dq kernel and 7.62 with the group loop
    (which stays off; bench/results/mosaic_bwd_gqa4_h200_2026-11-29.md). k and v broadcast
    over the batch at D=128 (the same aliasing, not measured) keep the dq kernel unless
    MOSAIC_FUSED_DQ=True asks. The dk/dv ring stays at 2: at fp16 D=64 a ring of 4 made the
    causal fwd+bwd 1.3% faster (20.02 ms against 20.28-20.30) but the dense noop backward 6%
    slower (31.54 against 29.72 in the seed table); at D=128 a deeper ring does not fit
    beside the fused dq (bench/results/mosaic_bwd_dkdv_stages_h200_2026-11-29_*.md,
    seed_table_fp16_d64_h200_2026-11-29_dkdv_ring4.md)."""
    broadcast_split = spec.kv_batch_broadcast and _dq_cols(spec) != spec.E
    fused = values.get("dkdv_q_rows", _ROWS) == _ROWS and not broadcast_split
    cfg = BwdConfig(**{"fused_dq": fused, "paired": True, **values})
    if "registers" not in values and fused_dq(spec, cfg):  # (what runs: 232 for two kernels)
        cfg = dataclasses.replace(cfg, registers=240)
    return cfg


def config_refusal(spec: KernelSpec, cfg: BwdConfig) -> str | None:
    """Why `cfg` cannot run `spec`'s backward as asked (the backend raises: a config the
    caller chose), or None."""
    if cfg.dkdv_q_rows != _ROWS and spec.E > 64:
        return (
            f"dkdv_q_rows={cfg.dkdv_q_rows} takes heads of at most 64 columns (E={spec.E}): "
            f"with more, the dk/dv accumulators and the {_ROWS} x {cfg.dkdv_q_rows} scores "
            f"and dP^T need more registers than a consumer has; use {_ROWS}"
        )
    return None


def dkdv_ring(cfg: BwdConfig) -> int:
    """The dk/dv kernel's ring depth: `dkdv_stages`, else `stages`."""
    return cfg.stages if cfg.dkdv_stages is None else cfg.dkdv_stages


def smem_bytes(spec: KernelSpec, cfg: BwdConfig, fused: bool = False) -> int:
    """Shared memory of the larger kernel run (an upper bound, as `fwd.smem_bytes`); fused:
    the dk/dv kernel that also accumulates dq."""
    return max(smem_by_kernel(spec, cfg, fused).values())


def smem_by_kernel(spec: KernelSpec, cfg: BwdConfig, fused: bool = False) -> dict[str, int]:
    """{"dq": bytes, "dkdv": bytes}: the shared memory of each kernel run (no "dq" when
    fused: the dk/dv kernel then also accumulates dq)."""
    item, D, R, Rq = jnp.dtype(spec.dtype).itemsize, spec.E, _ROWS, cfg.dkdv_q_rows
    tables = 2 * 4 * (max(spec.R, spec.C) + compat.TABLE_ALIGN)
    dq = 2 * CONSUMERS * R * D * item + 2 * cfg.stages * spec.kv_block_size * D * item
    dkdv = 2 * CONSUMERS * R * D * item + dkdv_ring(cfg) * (2 * Rq * D * item + 2 * Rq * 4)
    staging = CONSUMERS * R * D * 4 if _per_head(spec, cfg) else 0  # float32 staging of dk, dv
    if fused:
        dq_bufs = 2 * CONSUMERS * R * Rq * item  # dS^T, two steps' buffers
        dq_bufs += CONSUMERS * Rq * _dq_cols(spec) * 4  # float32 staging of dq's part
        # (sharing one region when `_aliased`: 1 KiB for the union's alignment)
        staging = max(staging, dq_bufs) + 1024 if _aliased(spec, cfg) else staging + dq_bufs
    dkdv += staging
    if group_loop(spec, cfg) and not spec.mask_head_broadcast:  # every head's lists
        dkdv += (spec.group_size - 1) * 2 * 4 * (spec.R + compat.TABLE_ALIGN)
    extra = 2 * CONSUMERS * R * 4 + tables + 4 * 1024
    return {"dkdv": dkdv + extra} if fused else {"dq": dq + extra, "dkdv": dkdv + extra}


def group_loop(spec: KernelSpec, cfg: BwdConfig) -> bool:
    """Whether the dk/dv kernel loops over the query heads of a kv head (`BwdConfig.
    group_loop`): grouped-query heads, k and v not broadcast over the batch."""
    return cfg.group_loop and spec.group_size > 1 and not spec.kv_batch_broadcast


def _per_head(spec: KernelSpec, cfg: BwdConfig) -> bool:
    """Whether the dk/dv kernel writes each query head's dk, dv in float32 (through a float32
    staging tile) for a group (batch) sum afterwards: grouped-query heads (unless it loops
    over them) or k/v broadcast over the batch."""
    return (spec.group_size > 1 and not group_loop(spec, cfg)) or spec.kv_batch_broadcast


def _aliased(spec: KernelSpec, cfg: BwdConfig) -> bool:
    """Whether the fused dk/dv kernel's float32 dk/dv staging shares shared memory with its
    dS^T and dq buffers (a `plgpu.RefUnion`): the staging is written only after the loop,
    once the consumers have last met (every product that read the other's dS^T is done) and
    each has seen its last reduce-add read its dq tile. With dq's columns split (D=128) only,
    where that meeting exists; there it is what lets the fused form fit (64 KiB each)."""
    return _per_head(spec, cfg) and _dq_cols(spec) != spec.E


def _dq_cols(spec: KernelSpec) -> int:
    """Columns of dq each consumer computes in the fused dk/dv kernel: with 128-column
    heads, half (the step's dS over both consumers' kv rows, times their K's half: one
    reduce-add of each dq element per step, and half the accumulator registers); else all
    (each consumer's dS times its own K: column halves would split a swizzled row)."""
    return spec.E // CONSUMERS if spec.E == 128 else spec.E


def bwd_refusal(spec: KernelSpec, mods: Mods, grad_slots, cfg: BwdConfig) -> str | None:
    """Why the Mosaic GPU backward cannot run a call (the Triton one then does), or None."""
    if smem_bytes(spec, cfg) > SMEM_BYTES:
        return (
            f"rings of {cfg.stages} (dq) and {dkdv_ring(cfg)} (dk/dv) stages need "
            f"{smem_bytes(spec, cfg)} bytes of shared memory"
        )
    if spec.kv_block_size != BWD_KV_BLOCK:
        return f"BlockMask kv blocks of {BWD_KV_BLOCK} (got {spec.kv_block_size})"
    if grad_slots:
        return "gradients of captured arrays (they need an atomic or two-pass reduction)"
    if spec.L % spec.q_block_size:  # a short query the backend took for its decode kernel
        return f"a query length that is a multiple of the q block (L={spec.L})"
    # (index offsets and reads it cannot stage: the backend's `supports` refused those)
    return None


def _bcast(x, shape, dim: int):
    """A row (dim 0) or column (dim 1) vector broadcast to a tile."""
    return lax.broadcast_in_dim(x, shape, [dim])


class _Kernel:
    """What both kernels share: the call's static facts and the in-kernel helpers."""

    def __init__(self, spec: KernelSpec, mods: Mods, dtype):
        self.spec, self.dtype = spec, dtype
        self.interpret = spec.interpret
        self.programs = kernel_mods(mods)["programs"]
        self.n_score = len(mods.score_consts)
        # (no captured-array gradients here: bwd_refusal sends those calls to Triton)
        self.pre, self.to_base2 = mod_score_units(spec.scale, mods.score)
        self.D = spec.E
        self.reads = StagedReads(mods, "backward")

    def split(self, const_refs):
        """(the score_mod's captured refs, the mask_mod's)."""
        return const_refs[: self.n_score], const_refs[self.n_score :]

    def at(self, b, h, rows):
        """The index of a [rows, D] tile of a [B, H, seq, D] array in the call's layout."""
        return (b, h, rows) if self.spec.layout is Layout.BHSD else (b, rows, h)

    def grid_indices(self):
        spec = self.spec
        h, blk, b = lax.axis_index("h"), lax.axis_index("blk"), lax.axis_index("b")
        bm = 0 if spec.mask_batch_broadcast else b
        hm = 0 if spec.mask_head_broadcast else h
        kv_b = 0 if spec.kv_batch_broadcast else b
        kv_h = lax.div(h, jnp.int32(spec.group_size)) if spec.group_size > 1 else h
        return h, blk, b, bm, hm, kv_b, kv_h

    def counts(self, num_ref, fnum_ref, bm, hm, blk):
        """(partial count, full count) of a row's (column's) block lists."""
        n_p = num_ref[bm, hm, blk] if self.spec.has_partial else jnp.int32(0)
        n_f = fnum_ref[bm, hm, blk] if self.spec.has_full else jnp.int32(0)
        return n_p, n_f

    def block(self, tp_s, tf_s, n_p, j):
        """The j-th block of the lists in shared memory (tp_s, tf_s: [len] views), the
        partial ones first."""
        partial, full = self.spec.has_partial, self.spec.has_full
        if partial and full:
            return jnp.where(j < n_p, tp_s[j], tf_s[jnp.maximum(j - n_p, 0)])
        return (tp_s if partial else tf_s)[j]

    def lists(self, num_ref, idx_ref, fnum_ref, fidx_ref, tp_s, tf_s, bm, hm, blk):
        """(partial count, full count, block(j)): the block list of a row or column."""
        n_p, n_f = self.counts(num_ref, fnum_ref, bm, hm, blk)
        return n_p, n_f, lambda j: self.block(tp_s, tf_s, n_p, j)

    def copy_lists(self, idx_ref, fidx_ref, tp_s, tf_s, t_bar, bm, hm, blk):
        """Copy a row's (column's) block lists; hm a head, or a pl.ds of heads (the lists
        then [heads, len])."""
        if self.spec.has_partial:
            compat.copy_list(idx_ref.at[bm, hm, blk], tp_s, t_bar.at[0])
        if self.spec.has_full:
            compat.copy_list(fidx_ref.at[bm, hm, blk], tf_s, t_bar.at[0])

    def list_scratch(self, idx, full_idx, heads: int | None = None):
        """The block lists' shared memory ([heads, len] when heads is given) and barrier."""
        spec = self.spec
        lead = () if heads is None else (heads,)
        return (
            plgpu.SMEM(lead + idx.shape[-1:], jnp.int32) if spec.has_partial else None,
            plgpu.SMEM(lead + full_idx.shape[-1:], jnp.int32) if spec.has_full else None,
            plgpu.Barrier(
                num_arrivals=compat.list_arrivals(spec.has_partial, idx, spec.has_full, full_idx),
                num_barriers=1,
            ),
        )

    def mod_tiles(self, const_refs, tile):
        ops = MosaicTileOps(self.interpret, tile)
        return ops, TileMods(self.spec, self.programs, *self.split(const_refs), None, ops)

    def matmul_acc(self, acc, lhs, rhs_smem, staging):
        """acc + lhs @ rhs_smem, lhs in registers (`compat.matmul_acc`)."""
        return compat.matmul_acc(acc, lhs.astype(self.dtype), rhs_smem, staging, self.interpret)

    def matmuls(self, terms, staging, after=None):
        """[acc + lhs @ rhs for (acc, lhs, rhs, how) in terms], issued together on the GPU
        (one wait for all; `after()` runs once they are issued). how: "reg" (lhs in
        registers, as `matmul_acc`), "nt" (lhs and rhs in shared memory, rhs read
        transposed), "refs" (lhs a list of (lhs, rhs) shared-memory views whose products are
        summed; rhs unused). Interpret mode runs them one by one through the helpers above."""
        if self.interpret:
            out = []
            for acc, lhs, rhs, how in terms:
                if how == "reg":
                    out.append(self.matmul_acc(acc, lhs, rhs, staging))
                elif how == "nt":
                    out.append(acc + compat.matmul_nt(lhs, rhs, acc.shape, True))
                else:
                    raise ValueError("interpret mode reads no transposed shared-memory lhs")
            if after is not None:
                after()
            return out

        def mm(acc_refs):
            for acc_ref, (_, lhs, rhs, how) in zip(acc_refs, terms, strict=True):
                if how == "refs":  # lhs: (lhs, rhs) pairs of shared-memory views, summed
                    for a, b in lhs:
                        plgpu.wgmma(acc_ref, a, b)
                    continue
                if how == "reg":
                    plgpu.wgmma(acc_ref, lhs.astype(self.dtype), rhs)
                else:  # "nt"
                    plgpu.wgmma(acc_ref, lhs, rhs.transpose((1, 0)))
            if after is not None:
                after()

        return list(pl.run_state(mm)(tuple(plgpu.ACC.init(t[0]) for t in terms)))

    def zeros(self, shape):
        return compat.layout_cast(jnp.zeros(shape, jnp.float32), compat.WGMMA, self.interpret)

    def store_tiles(self, pairs):
        """TMA-store (value, shared-memory staging tile, destination) triples' values."""
        for value, smem, _ in pairs:
            smem[...] = value.astype(smem.dtype)
        plgpu.commit_smem()
        for _, smem, dst in pairs:
            plgpu.copy_smem_to_gmem(smem, dst)
        plgpu.wait_smem_to_gmem(0)


def _roles(kern, lists, n, stages: int, cfg: BwdConfig, copy, consumed, consumer):
    """Run the producer warpgroup and the consumers (`consumer()`).

    The producer copies the block lists into shared memory (lists: `_Kernel.copy_lists`'s
    arguments; their barrier is the fifth), then fills a `stages`-deep ring with steps
    0..n-1: copy(j, slot) once the slot is released (`consumed`, by every consumer)."""

    def producer():
        kern.copy_lists(*lists)
        plgpu.barrier_wait(lists[4].at[0])
        ring.producer_ring(n, stages, [(copy, consumed)], kern.interpret)

    ring.roles(CONSUMERS, kern.interpret, producer, consumer, cfg.registers)


# ----------------------------------------------------------------------------------------- dq


def _dq(q, k, v, do, lse, delta, tables, consts, *, kern: _Kernel, cfg: BwdConfig):
    spec, interpret, dtype, D = kern.spec, kern.interpret, kern.dtype, kern.D
    bq, bkv, stages = _ROWS, spec.kv_block_size, cfg.stages
    num, idx, full_num, full_idx = compat.padded_tables(tables.rows)
    tile = (bq, bkv)
    reads = kern.reads

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, num_ref, idx_ref, fnum_ref,
             fidx_ref, *rest):  # fmt: skip
        const_refs = rest[: len(consts)]
        dq_ref, scratch = rest[len(consts) :]
        (q_s, do_s, lse_s, delta_s, k_s, v_s, ds_s, q_stage, kv_stage, tp_s, tf_s, t_bar, q_bar,
         k_bar, v_bar, c_bar, sched_bar) = scratch  # fmt: skip
        refs = kern.split(const_refs)
        h, r, b, bm, hm, kv_b, kv_h = kern.grid_indices()
        if cfg.longest_first:
            r = spec.R - 1 - r
        wg = lax.axis_index("wg")
        n_p, n_f, block = kern.lists(num_ref, idx_ref, fnum_ref, fidx_ref, tp_s, tf_s, bm, hm, r)
        n = n_p + n_f

        def copy(j, slot):  # the producer's step: K and V of the row's j-th kv block
            rows = pl.ds(block(j) * bkv, bkv)
            plgpu.copy_gmem_to_smem(k_ref.at[kern.at(kv_b, kv_h, rows)], k_s.at[slot], k_bar.at[slot])  # fmt: skip
            plgpu.copy_gmem_to_smem(v_ref.at[kern.at(kv_b, kv_h, rows)], v_s.at[slot], v_bar.at[slot])  # fmt: skip
            if reads.kv:  # the mods' kv_idx slices ride K's barrier
                found = reads.starts(refs, b, h, r * spec.q_block_size, block(j) * bkv)
                reads.copy(reads.kv, found, bkv, kv_stage, slot, k_bar.at[slot])

        def consumer():
            q_row0 = r * (CONSUMERS * bq) + wg * bq
            rows = pl.ds(q_row0, bq)
            qw, dow = q_s.at[wg], do_s.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[kern.at(b, h, rows)], qw, q_bar.at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[kern.at(b, h, rows)], dow, q_bar.at[wg])
            plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_s.at[wg], q_bar.at[wg])
            plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_s.at[wg], q_bar.at[wg])
            if reads.q:  # the mods' q_idx slices ride Q's barrier
                found = reads.starts(refs, b, h, q_row0, jnp.int32(0))
                reads.copy(reads.q, found, bq, q_stage, wg, q_bar.at[wg])
            plgpu.barrier_wait(t_bar.at[0])
            plgpu.barrier_wait(q_bar.at[wg])
            lse_b2 = compat.load_vector(lse_s.at[wg], compat.ROW, interpret) * LOG2E
            dlt = compat.load_vector(delta_s.at[wg], compat.ROW, interpret)
            ops, mods = kern.mod_tiles(const_refs, tile)
            q_tiles = reads.tiles(reads.q, q_stage, wg, tile, 0, interpret)
            turns = ring.Turns(sched_bar, wg)

            def step(j, dq, masked: bool):
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.barrier_wait(v_bar.at[slot])
                s, dp = kern.matmuls(
                    [(kern.zeros(tile), qw, k_s.at[slot], "nt"),
                     (kern.zeros(tile), dow, v_s.at[slot], "nt")], None, after=turns.turn,
                )  # fmt: skip
                s = scaled(s, kern.pre)
                q_idx = ops.index(q_row0, 0)
                kv_idx = ops.index(block(j) * bkv, 1)
                kv_tiles = reads.tiles(reads.kv, kv_stage, slot, tile, 1, interpret)
                ops.staged = reads.order(q_tiles | kv_tiles, masked)
                s, _, pullback = mods.apply(s, b, h, q_idx, kv_idx, masked, ())
                pullback = compat.without_add_any(pullback)
                p = jnp.exp2(s * kern.to_base2 - _bcast(lse_b2, tile, 0))
                ds, _ = pullback(p * (dp - _bcast(dlt, tile, 0)))
                turns.turn()
                dq = kern.matmul_acc(dq, ds, k_s.at[slot], ds_s.at[wg] if interpret else None)
                ring.release(c_bar.at[slot], bool(reads.kv))  # K, V (and slices) are read
                return dq

            dq = kern.zeros((bq, D))
            turns.start()
            if spec.has_partial:
                dq = lax.fori_loop(0, n_p, functools.partial(step, masked=True), dq)
            if spec.has_full:
                dq = lax.fori_loop(n_p, n, functools.partial(step, masked=False), dq)
            turns.end()
            kern.store_tiles([(dq * spec.scale, qw, dq_ref.at[kern.at(b, h, rows)])])

        lists = (idx_ref, fidx_ref, tp_s, tf_s, t_bar, bm, hm, r)
        _roles(kern, lists, n, stages, cfg, copy, c_bar, consumer)

    scratch = (
        _smem((CONSUMERS, bq, D), dtype, interpret),  # Q, then dq
        _smem((CONSUMERS, bq, D), dtype, interpret),  # dO
        plgpu.SMEM((CONSUMERS, bq), jnp.float32),  # lse
        plgpu.SMEM((CONSUMERS, bq), jnp.float32),  # delta
        _smem((stages, bkv, D), dtype, interpret),  # K ring
        _smem((stages, bkv, D), dtype, interpret),  # V ring
        plgpu.SMEM((CONSUMERS, bq, bkv), dtype) if interpret else None,  # dS (interpret mode)
        reads.scratch(reads.q, CONSUMERS, bq),  # the q_idx slices
        reads.scratch(reads.kv, stages, bkv),  # the kv_idx slices
        *kern.list_scratch(idx, full_idx),  # the row's block lists and their barrier
        plgpu.Barrier(num_arrivals=4 + len(reads.q), num_barriers=CONSUMERS),  # Q, dO, lse, delta
        plgpu.Barrier(num_arrivals=1 + len(reads.kv), num_barriers=stages),  # K slot filled
        plgpu.Barrier(num_arrivals=1, num_barriers=stages),  # V slot filled
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # slot consumed
        ring.Turns.scratch(cfg.schedule_barrier),  # the consumers' turns
    )
    grid = (spec.Hq, spec.R, spec.B)
    out = jax.ShapeDtypeStruct(q.shape, dtype)
    kernel = compat.kernel(body, out, scratch, grid, _GRID, CONSUMERS + 1, interpret)
    return kernel(q, k, v, do, lse, delta, num, idx, full_num, full_idx, *consts)


# -------------------------------------------------------------------------------------- dk/dv


def _dkdv(q, k, v, do, lse, delta, tables, consts, *, kern: _Kernel, cfg: BwdConfig,
          dq_acc=None):  # fmt: skip
    """dk, dv; with dq_acc (a float32 `jax.Ref` of q's shape, zeros) also each step's
    dS^T-transposed product with K, added into dq_acc by TMA reduce-add (`fused_dq`): the
    consumers write their dS^T into a shared buffer (one per step parity, so one consumer
    never overwrites what the other may still read), meet, and each multiplies by K its
    `_dq_cols` columns of dq. Compiled, with the columns split (D=128), that step runs in
    FlashAttention-3's order with partial waits (`overlapped`), as does the paired order."""
    spec, interpret, dtype, D = kern.spec, kern.interpret, kern.dtype, kern.D
    fused = dq_acc is not None
    bkv, bq = _ROWS, cfg.dkdv_q_rows
    stages = dkdv_ring(cfg)
    num, idx, full_num, full_idx = compat.padded_tables(tables.cols)
    tile = (bkv, bq)  # transposed scores: [kv, q]
    reads = kern.reads
    halves = spec.q_block_size // bq
    group = group_loop(spec, cfg)  # the grid's head axis: kv heads, each looping over its G
    G = spec.group_size if group else 1
    Gm = 1 if spec.mask_head_broadcast else G  # heads of the block lists it copies
    per_head = _per_head(spec, cfg)  # summed afterwards, in float32
    aliased = fused and _aliased(spec, cfg)
    out_dtype = jnp.float32 if per_head else dtype
    dq_cols = _dq_cols(spec)
    split = dq_cols != D  # each consumer: dq's column half, over both consumers' kv rows
    meets = fused and split  # the consumers meet each step once both dS^T are written

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, num_ref, idx_ref, fnum_ref,
             fidx_ref, *rest):  # fmt: skip
        const_refs = rest[: len(consts)]
        dq_ref = rest[len(consts)] if fused else None
        dk_ref, dv_ref, scratch = rest[len(consts) + fused :]
        (k_s, v_s, q_s, do_s, lse_s, delta_s, p_s, out_s, ds_s, dq_s, q_stage, kv_stage, tp_s,
         tf_s, t_bar, kv_bar, bar, c_bar, sched_bar, ds_bar, kvs_bar) = scratch  # fmt: skip
        if aliased:  # out_s: the union of the dk/dv staging and the dS^T and dq buffers
            out_s, (ds_s, dq_s) = out_s
        refs = kern.split(const_refs)
        h, c, b, bm, hm, kv_b, kv_h = kern.grid_indices()
        wg = lax.axis_index("wg")
        if group:  # h is a kv head; its query heads h * G + g, step ranges offs[g]..offs[g+1]
            kv_h = h
            hm = pl.ds(0 if spec.mask_head_broadcast else h * G, Gm)
            counts = [kern.counts(num_ref, fnum_ref, bm, 0 if Gm == 1 else h * G + g, c) for g in range(G)]  # fmt: skip
            offs = [jnp.int32(0)]
            for n_p_g, n_f_g in counts:
                offs.append(offs[-1] + (n_p_g + n_f_g) * halves)
            n = offs[-1]

            def locate(j):  # (the group's query head, step within its list) of step j
                g = sum((j >= offs[i]).astype(jnp.int32) for i in range(1, G))
                return g, j - _pick(offs[:-1], g)

            def block(g, k):  # head g's k-th block (its lists' row when they differ by head)
                r = g if Gm > 1 else 0
                rows = [None if t is None else t.at[r] for t in (tp_s, tf_s)]
                return kern.block(*rows, _pick([p for p, _ in counts], g), k)
        else:
            n_p, n_f, column_block = kern.lists(num_ref, idx_ref, fnum_ref, fidx_ref, tp_s, tf_s, bm, hm, c)  # fmt: skip
            n = (n_p + n_f) * halves  # steps of bq q rows
            locate = lambda j: (0, j)
            block = lambda g, k: column_block(k)

        def head(j):  # the query head of step j
            return h * G + locate(j)[0] if group else h

        def q_rows(j):
            g, k = locate(j)
            return block(g, lax.div(k, halves)) * spec.q_block_size + lax.rem(k, halves) * bq

        def copy(j, slot):  # the producer's step: Q, dO, lse, delta of step j's q rows
            rows, hj = pl.ds(q_rows(j), bq), head(j)
            plgpu.copy_gmem_to_smem(q_ref.at[kern.at(b, hj, rows)], q_s.at[slot], bar.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[kern.at(b, hj, rows)], do_s.at[slot], bar.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[b, hj, rows], lse_s.at[slot], bar.at[slot])
            plgpu.copy_gmem_to_smem(delta_ref.at[b, hj, rows], delta_s.at[slot], bar.at[slot])
            if reads.q:  # the mods' q_idx slices ride the step's barrier
                found = reads.starts(refs, b, hj, q_rows(j), c * spec.kv_block_size)
                reads.copy(reads.q, found, bq, q_stage, slot, bar.at[slot])

        def consumer():
            kv_row0 = c * spec.kv_block_size + wg * bkv
            kv_rows = pl.ds(kv_row0, bkv)
            kw, vw = k_s.at[wg], v_s.at[wg]
            plgpu.copy_gmem_to_smem(k_ref.at[kern.at(kv_b, kv_h, kv_rows)], kw, kv_bar.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[kern.at(kv_b, kv_h, kv_rows)], vw, kv_bar.at[wg])
            if reads.kv and not group:  # the mods' kv_idx slices ride K's and V's barrier
                found = reads.starts(refs, b, h, jnp.int32(0), kv_row0)
                reads.copy(reads.kv, found, bkv, kv_stage, wg, kv_bar.at[wg])
            plgpu.barrier_wait(t_bar.at[0])
            plgpu.barrier_wait(kv_bar.at[wg])
            ops, mods = kern.mod_tiles(const_refs, tile)
            # along rows; with the group loop, read each step instead (they change by head)
            kv_tiles = {} if group else reads.tiles(reads.kv, kv_stage, wg, tile, 0, interpret)

            def head_slices(g):
                """With the group loop, the kv_idx slices of query head g (they may read h):
                copied by this consumer once it has read the last head's."""
                plgpu.commit_smem()  # (its reads of them, before the TMA overwrites them)
                found = reads.starts(refs, b, h * G + g, jnp.int32(0), kv_row0)
                reads.copy(reads.kv, found, bkv, kv_stage, wg, kvs_bar.at[wg])
                plgpu.barrier_wait(kvs_bar.at[wg])

            def steps(step, carry):
                """carry through step(j, carry, masked) over every step: the partial blocks
                of the column, then the full ones (with the group loop, head by head)."""

                def run(start, n_p, end, carry):
                    if spec.has_partial:
                        carry = lax.fori_loop(start, start + n_p * halves, functools.partial(step, masked=True), carry)  # fmt: skip
                    if spec.has_full:
                        carry = lax.fori_loop(start + n_p * halves, end, functools.partial(step, masked=False), carry)  # fmt: skip
                    return carry

                if not group:
                    return run(0, n_p, n, carry)

                def one_head(g, carry):
                    if reads.kv:
                        head_slices(g)
                    n_p_g = _pick([p for p, _ in counts], g)
                    return run(_pick(offs[:-1], g), n_p_g, _pick(offs[1:], g), carry)

                return lax.fori_loop(0, G, one_head, carry)

            staging = p_s.at[wg] if interpret else None
            turns = ring.Turns(sched_bar, wg)  # (None when they meet: that pairs them)
            meet = ring.Turns(ds_bar, wg)  # (a rendezvous, `meet.turn()`; None unless `meets`)

            def probs(st, j, masked: bool, slot):
                """Raw S^T of step j -> (P^T in float32, the score_mod's pullback)."""
                st = scaled(st, kern.pre)
                q_idx = ops.index(q_rows(j), 1)
                kv_idx = ops.index(kv_row0, 0)
                q_tiles = reads.tiles(reads.q, q_stage, slot, tile, 1, interpret)  # along columns
                kv_now = kv_tiles
                if group:
                    kv_now = reads.tiles(reads.kv, kv_stage, wg, tile, 0, interpret)
                ops.staged = reads.order(q_tiles | kv_now, masked)
                st, _, pullback = mods.apply(st, b, head(j), q_idx, kv_idx, masked, ())
                lse_b2 = compat.load_vector(lse_s.at[slot], compat.COL, interpret) * LOG2E
                pt = jnp.exp2(st * kern.to_base2 - _bcast(lse_b2, tile, 1))
                return pt, compat.without_add_any(pullback)

            def dscores(pt, dpt, pullback, slot):
                """dS^T in the inputs' dtype (converted once: the dK product and the dq
                product's shared-memory copy both read it)."""
                dlt = compat.load_vector(delta_s.at[slot], compat.COL, interpret)
                dst, _ = pullback(pt * (dpt - _bcast(dlt, tile, 1)))
                return dst.astype(dtype)

            def dq_pairs(j, dst16):
                """Write this consumer's dS^T (one buffer per step parity, so one consumer
                never overwrites what the other may still read); when they split dq's columns,
                meet the other. -> the (lhs, rhs) shared-memory pairs of this consumer's dq
                product, dS^T read transposed."""
                ds_buf = ds_s.at[lax.rem(j, 2)]
                ds_buf.at[wg][...] = dst16
                plgpu.commit_smem()
                if not split:
                    return [(ds_buf.at[wg].transpose((1, 0)), kw)]
                meet.turn()  # both consumers' dS^T are written
                cols = pl.ds(wg * dq_cols, dq_cols)
                return [(ds_buf.at[w].transpose((1, 0)), k_s.at[w, :, cols]) for w in range(CONSUMERS)]  # fmt: skip

            def dq_store(j, dq):
                """Add this consumer's part of step j's dq into dq_acc (TMA reduce-add)."""
                dq_out = dq_ref.at[kern.at(b, head(j), pl.ds(q_rows(j), bq))]
                if split:  # this consumer's column half
                    dq_out = dq_out.at[:, pl.ds(wg * dq_cols, dq_cols)]
                _reduce_add(dq, dq_s.at[wg], dq_out)

            def step(j, carry, masked: bool):
                dk, dv = carry
                slot = lax.rem(j, stages)
                plgpu.barrier_wait(bar.at[slot])
                qj, doj = q_s.at[slot], do_s.at[slot]
                if cfg.paired:  # S^T and dP^T issued together
                    st, dpt = kern.matmuls(
                        [(kern.zeros(tile), kw, qj, "nt"), (kern.zeros(tile), vw, doj, "nt")],
                        None, after=turns.turn,
                    )  # fmt: skip
                else:
                    st = compat.matmul_nt(kw, qj, tile, interpret, after=turns.turn)
                pt, pullback = probs(st, j, masked, slot)
                if not cfg.paired:
                    dv, dpt = kern.matmuls(
                        [(dv, pt, doj, "reg"), (kern.zeros(tile), vw, doj, "nt")], staging
                    )
                dst16 = dscores(pt, dpt, pullback, slot)
                terms = [(dk, dst16, qj, "reg")]
                if cfg.paired:  # dV and dK issued together
                    terms.insert(0, (dv, pt, doj, "reg"))
                if fused:  # dq's part: dS^T through shared memory
                    terms.append((kern.zeros((bq, dq_cols)), dq_pairs(j, dst16), None, "refs"))
                turns.turn()
                out = kern.matmuls(terms, staging)
                if cfg.paired:
                    dv, out = out[0], out[1:]
                dk = out[0]
                if fused:
                    dq_store(j, out[1])
                ring.release(c_bar.at[slot], bool(reads.q))
                return dk, dv

            def overlapped(acc_refs):
                """The step in FlashAttention-3's order, compiled only (the interpreter has no
                in-place accumulators), dK and dV accumulating in place: S^T and dP^T issued
                together, P^T computed while dP^T runs; dV issued (before the consumers meet,
                fused); then dK, after the dq product when fused (dq read back while dK
                runs). Each wait is partial and unconditional (see the forward's pipelined
                loop). Runs the fused step at D=128 and the paired order."""
                dk_acc, dv_acc = acc_refs

                def ostep(j, carry, masked: bool):
                    slot = lax.rem(j, stages)
                    plgpu.barrier_wait(bar.at[slot])
                    qj, doj = q_s.at[slot], do_s.at[slot]

                    def sdp(st_ref, dpt_ref):
                        plgpu.wgmma(st_ref, kw, qj.transpose((1, 0)))
                        plgpu.wgmma(dpt_ref, vw, doj.transpose((1, 0)))
                        turns.turn()
                        plgpu.wgmma_wait(1)  # S^T is done; dP^T may still run
                        st = plgpu.wgmma_accumulator_load(st_ref, wait_n=None)
                        pt, pullback = probs(st, j, masked, slot)
                        plgpu.wgmma_wait(0)
                        dpt = plgpu.wgmma_accumulator_load(dpt_ref, wait_n=None)
                        return pt.astype(dtype), dscores(pt, dpt, pullback, slot)

                    pt16, dst16 = pl.run_scoped(sdp, plgpu.ACC(tile, jnp.float32), plgpu.ACC(tile, jnp.float32))  # fmt: skip
                    turns.turn()
                    plgpu.wgmma(dv_acc, pt16, doj)  # dV += P^T dO (running through the meeting)
                    if fused:
                        pairs = dq_pairs(j, dst16)

                        def dq_dk(dq_acc_ref):
                            for lhs, rhs in pairs:
                                plgpu.wgmma(dq_acc_ref, lhs, rhs)
                            plgpu.wgmma(dk_acc, dst16, qj)  # dK += dS^T Q
                            plgpu.wgmma_wait(1)  # dV and the dq product are done; dK may run
                            return plgpu.wgmma_accumulator_load(dq_acc_ref, wait_n=None)

                        dq_store(j, pl.run_scoped(dq_dk, plgpu.ACC((bq, dq_cols), jnp.float32)))
                    else:
                        plgpu.wgmma(dk_acc, dst16, qj)
                    plgpu.wgmma_wait(0)  # dV and dK are done: the step's Q and dO are read
                    ring.release(c_bar.at[slot], bool(reads.q))
                    return carry

                turns.start()
                steps(ostep, jnp.int32(0))
                turns.end()
                plgpu.wgmma_wait(0)
                finish(dk_acc[...], dv_acc[...])

            def finish(dk, dv):
                if fused:  # the last reduce-add has read its staging tile
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                # (when they meet) the other consumer's last dq product has read our K and
                # our dS^T, so the staging may reuse the dS^T buffers (`_aliased`)
                meet.turn()
                dk_out, dv_out = (ref.at[kern.at(b, h, kv_rows)] for ref in (dk_ref, dv_ref))
                if per_head:  # one float32 staging tile, used twice
                    kern.store_tiles([(dk * spec.scale, out_s.at[wg], dk_out)])
                    kern.store_tiles([(dv, out_s.at[wg], dv_out)])
                else:
                    kern.store_tiles([(dk * spec.scale, kw, dk_out), (dv, vw, dv_out)])

            zeros = (kern.zeros((bkv, D)), kern.zeros((bkv, D)))
            if (meets or cfg.paired) and not interpret:
                pl.run_state(overlapped)(tuple(plgpu.ACC.init(z) for z in zeros))
                return
            turns.start()
            carry = steps(step, zeros)
            turns.end()
            finish(*carry)

        lists = (idx_ref, fidx_ref, tp_s, tf_s, t_bar, bm, hm, c)
        _roles(kern, lists, n, stages, cfg, copy, c_bar, consumer)

    scratch = (
        _smem((CONSUMERS, bkv, D), dtype, interpret),  # K, then dk
        _smem((CONSUMERS, bkv, D), dtype, interpret),  # V, then dv
        _smem((stages, bq, D), dtype, interpret),  # Q ring
        _smem((stages, bq, D), dtype, interpret),  # dO ring
        plgpu.SMEM((stages, bq), jnp.float32),  # lse ring
        plgpu.SMEM((stages, bq), jnp.float32),  # delta ring
        plgpu.SMEM((CONSUMERS, bkv, bq), dtype) if interpret else None,  # P, dS (interpret)
        *_staging_scratch(per_head, fused, aliased, (bkv, bq, D, dq_cols), dtype, interpret),
        reads.scratch(reads.q, stages, bq),  # the q_idx slices
        reads.scratch(reads.kv, CONSUMERS, bkv),  # the kv_idx slices
        *kern.list_scratch(idx, full_idx, Gm if group else None),  # the block lists, barrier
        plgpu.Barrier(num_arrivals=2 + len(reads.kv) * (not group), num_barriers=CONSUMERS),  # K, V
        plgpu.Barrier(num_arrivals=4 + len(reads.q), num_barriers=stages),  # Q, dO, lse, delta
        plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # slot consumed
        ring.Turns.scratch(cfg.schedule_barrier and not meets),  # the consumers' turns
        ring.Turns.scratch(meets),  # their meeting once both dS^T are written
        # (group loop) the kv_idx slices of each query head
        plgpu.Barrier(num_arrivals=len(reads.kv), num_barriers=CONSUMERS)
        if group and reads.kv
        else None,  # fmt: skip
    )
    heads = spec.Hkv if group else spec.Hq
    out = jax.ShapeDtypeStruct(spec.layout.shape(spec.B, heads, spec.S, D), out_dtype)
    grid = (heads, spec.C, spec.B)
    kernel = compat.kernel(body, (out, out), scratch, grid, _GRID, CONSUMERS + 1, interpret)
    extra = (dq_acc,) if fused else ()
    dk, dv = kernel(q, k, v, do, lse, delta, num, idx, full_num, full_idx, *consts, *extra)
    if per_head:  # [B, Hq, ...] -> the sum over each kv head's group (and the batch)
        dk, dv = (_group_sum(x, spec).astype(dtype) for x in (dk, dv))
    return dk, dv


def _pick(values, g):
    """values[g] for a traced g (a short static list of scalars)."""
    out = values[0]
    for i in range(1, len(values)):
        out = jnp.where(g == i, values[i], out)
    return out


def _staging_scratch(per_head, fused, aliased, dims, dtype, interpret):
    """The dk/dv kernel's float32 dk/dv staging (per_head), dS^T buffers of two steps and
    float32 dq tile (fused): three scratch entries, or the union of the first with the
    other two and two Nones (aliased: `_aliased`)."""
    bkv, bq, D, dq_cols = dims
    out = _smem((CONSUMERS, bkv, D), jnp.float32, interpret) if per_head else None
    ds = _smem((2, CONSUMERS, bkv, bq), dtype, interpret) if fused else None
    dq = _smem((CONSUMERS, bq, dq_cols), jnp.float32, interpret) if fused else None
    if aliased:
        return plgpu.RefUnion(out, (ds, dq)), None, None
    return out, ds, dq


def _reduce_add(value, staging, dst):
    """dst += value (float32): staged once the previous reduce-add has read the staging tile,
    then a TMA reduce-add (unordered across CTAs, so dq is not bitwise deterministic)."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    staging[...] = value
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(staging, dst, reduction_op="add")


def _group_sum(x, spec: KernelSpec):
    """Per-query-head gradients [B, Hq, S, D] (layout order) summed to k/v's [Bkv, Hkv, S, D]."""
    G, Hkv = spec.group_size, spec.Hkv
    h_axis = 1 if spec.layout is Layout.BHSD else 2
    shape = list(x.shape)
    shape[h_axis : h_axis + 1] = [Hkv, G]
    x = x.reshape(shape).sum(axis=h_axis + 1)
    if spec.kv_batch_broadcast:
        x = x.sum(axis=0, keepdims=True)
    return x


# -------------------------------------------------------------------------------- launcher


@functools.partial(jax.jit, static_argnames=("spec", "cfg"))
def flex_bwd(q, k, v, do, lse, delta, tables: BlockTables, mods: Mods, *, spec: KernelSpec,
             cfg: BwdConfig):  # fmt: skip
    """dq, dk, dv of flex_attention (see the module docstring); q/k/v/do in spec.layout's
    order, lse and delta float32 from `vjp.preprocess` in out's row order."""
    dispatch.kernel_traced("MOSAIC_GPU", "dkdv")
    if spec.layout is Layout.BSHD:  # [B, L, H] -> rows contiguous for the TMA copies
        lse, delta = jnp.swapaxes(lse, 1, 2), jnp.swapaxes(delta, 1, 2)
    kern = _Kernel(spec, mods, q.dtype)
    consts = mod_inputs(mods, None)
    args = (q, k, v, do, lse, delta, tables)
    if fused_dq(spec, cfg):
        dq_acc = jax.new_ref(jnp.zeros(q.shape, jnp.float32))
        dk, dv = _dkdv(*args, consts, kern=kern, cfg=cfg, dq_acc=dq_acc)
        return (dq_acc[...] * spec.scale).astype(q.dtype), dk, dv
    dispatch.kernel_traced("MOSAIC_GPU", "dq")  # (counted only when the dq kernel runs)
    dq = _dq(*args, consts, kern=kern, cfg=cfg)
    dk, dv = _dkdv(*args, consts, kern=kern, cfg=cfg)
    return dq, dk, dv


def fused_dq(spec: KernelSpec, cfg: BwdConfig) -> bool:
    """Whether dq is accumulated inside the dk/dv kernel (TMA reduce-add into a float32
    `jax.Ref`): compiled kernels on a JAX whose `plgpu.kernel` takes Ref operands (0.11+;
    the interpreter has no reduction copies), unless the config turns it off."""
    if not cfg.fused_dq or spec.interpret or compat.JAX_VERSION < (0, 11):
        return False
    return smem_bytes(spec, cfg, fused=True) <= SMEM_BYTES
