"""flex_attention: validate, canonicalise, trace the mods, dispatch to a kernel backend.

`prepare` turns a public call (PyTorch's signature) into what every kernel
backend takes -- a `KernelSpec`, the `BlockTables`, the `Mods` -- and
`pallas_kernels.dispatch.attention` picks the backend (kernel_options
["BACKEND"]), its configs, and runs the differentiable kernels. Nothing here
knows a backend, and nothing here copies q, k or v: ragged lengths and head
dims are the launchers' business.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from flexjax.block_mask import DEFAULT_SPARSE_BLOCK_SIZE, BlockMask
from flexjax.checks import find_bad_index
from flexjax.input_checks import (
    check_block_mask,
    check_mod_indices,
    check_qkv,
    check_scale,
    check_score_mod,
)
from flexjax.sharding import (
    explicit_call,
    explicit_q_spec,
    local_block_mask,
    shard_layout,
    spec_in_bhsd,
)
from pallas_kernels import dispatch
from pallas_kernels.mod_trace import indices_read
from pallas_kernels.spec import BlockTables, KernelSpec, Layout, Mods
from pallas_kernels.vma import varying_axes

__all__ = ["Prepared", "flex_attention", "prepare"]


def _full_tables(L: int, S: int, q_bs: int, kv_bs: int) -> BlockTables:
    """The eight tables of a mask where every block is full (block_mask=None)."""
    R, C = -(-L // q_bs), -(-S // kv_bs)

    def rows_of(n_rows, n_cols):
        zeros_num = jnp.zeros((1, 1, n_rows), jnp.int32)
        zeros_idx = jnp.zeros((1, 1, n_rows, 1), jnp.int32)
        full_num = jnp.full((1, 1, n_rows), n_cols, jnp.int32)
        full_idx = jnp.broadcast_to(jnp.arange(n_cols, dtype=jnp.int32), (1, 1, n_rows, n_cols))
        return (zeros_num, zeros_idx, full_num, full_idx)

    return BlockTables(*rows_of(R, C), *rows_of(C, R))


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One call, canonical: what `dispatch.attention` takes besides q, k, v and the offsets."""

    spec: KernelSpec
    tables: BlockTables
    mods: Mods
    options: dispatch.KernelOptions


def prepare(
    query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
    kernel_options=None,
) -> Prepared:  # fmt: skip
    """Validate a flex_attention call and canonicalise it for the kernel backends.

    Arguments as `flex_attention`'s. The sizes are the arrays' own: called on
    a shard or a chunk, this describes the local problem, and the index
    offsets passed to `dispatch.attention` (`spec.index_offsets`) say where it
    sits in the whole.
    """
    score = check_score_mod(score_mod)
    return _prepare(query, key, value, score, block_mask, scale, enable_gqa, kernel_options)


def _prepare(query, key, value, score, block_mask, scale, enable_gqa, kernel_options,
             layout=Layout.BHSD) -> Prepared:  # fmt: skip
    """`prepare` with the score_mod already traced: score = (program, captured arrays).

    layout: how q, k, v are laid out (the sizes are read accordingly).
    """
    shape = check_qkv(*(as_bhsd(x, layout) for x in (query, key, value)), enable_gqa)
    scale = check_scale(scale, shape.E)
    score_program, score_consts = score
    check_block_mask(block_mask, shape)
    options = dispatch.KernelOptions.parse(kernel_options)

    if block_mask is None:
        q_bs = kv_bs = DEFAULT_SPARSE_BLOCK_SIZE
        tables = _full_tables(shape.L, shape.S, q_bs, kv_bs)
        has_partial, mask_program, mask_consts = False, None, ()
    else:
        q_bs, kv_bs = block_mask.BLOCK_SIZE
        tables = block_mask.kernel_tables()
        has_partial = True
        mask_program, mask_consts = block_mask.mask_program, block_mask.mask_consts
    spec = KernelSpec(
        B=shape.B, Hq=shape.Hq, Hkv=shape.Hkv, L=shape.L, S=shape.S, E=shape.E, Ev=shape.Ev,
        Bkv=shape.Bkv,
        mask_batch_broadcast=tables.kv_num_blocks.shape[0] == 1,
        mask_head_broadcast=tables.kv_num_blocks.shape[1] == 1,
        q_block_size=q_bs, kv_block_size=kv_bs,
        R=tables.kv_num_blocks.shape[2], C=tables.q_num_blocks.shape[2],
        scale=scale, dtype=jnp.dtype(query.dtype).name,
        has_partial=has_partial,
        has_full=block_mask is None or block_mask.full_kv_num_blocks is not None,
        interpret=options.interpret, layout=layout,
    )  # fmt: skip
    mods = Mods(score_program, mask_program, tuple(score_consts), tuple(mask_consts))
    return Prepared(spec, tables, mods, options)


def flex_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    score_mod: Callable | None = None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: dict | None = None,
    *,
    q_sharding: PartitionSpec | None = None,
):
    """Block-sparse attention with user mods, on Pallas kernels.

    query: [B, Hq, L, E]; key: [B or 1, Hkv, S, E]; value: [B or 1, Hkv, S, Ev].
    score_mod(score, b, h, q_idx, kv_idx) -> score, applied (after `scale`) to
    every kept element; block_mask decides which elements are kept (its
    mask_mod runs only in partial blocks). Returns out [B, Hq, L, Ev] in
    query's dtype, and with return_lse also lse [B, Hq, L] float32 (natural
    log; -inf for a row that keeps nothing, whose out is 0).

    Differentiable (`jax.grad`, `jax.vjp`, under `jax.jit` and `jax.vmap`):
    the backward runs a dq kernel and a dk/dv kernel over the same block
    tables. Captured float arrays of score_mod (learnable biases) get
    gradients too; on the GPU those are accumulated with atomic adds, so they
    are not bitwise reproducible (dq, dk and dv are).

    kernel_options (every key optional):

    | key | meaning |
    |---|---|
    | BACKEND | "AUTO" (default: the first backend that can run the call), or a backend by name: "MOSAIC_GPU", "TRITON". A named backend that cannot run the call raises with its reason. |
    | decode | None (automatic), True, False: queries shorter than 128 rows within the BlockMask's first q block run the split-KV decode kernel when not differentiated. |
    | check_indices | True: first evaluate the mods over every (b, h, q_idx, kv_idx) under `checkify` and raise `ModIndexError` at the first out-of-range index into a captured array (`flexjax.checks`; eager calls; costs a pass over the whole score matrix). Index arithmetic that can leave an array is refused without it (`pallas_kernels.index_ranges`). |
    | autotune | True: time the backend's space of forward and backward configs for this call on first use and keep the fastest (cached on disk, `pallas_kernels.autotune`). |
    | deterministic | True: dq, dk and dv bitwise the same run to run, on every backend (MOSAIC_GPU then runs its dq kernel rather than reduce-adding dq: `Backend.deterministic_options`). Default: True when XLA_FLAGS asks XLA for determinism (`--xla_gpu_deterministic_ops=true`), else False. Gradients of captured arrays use atomic adds either way. |
    | interpret | run the kernels in Pallas interpret mode (default: when there is no GPU). |
    | block_m, block_n, num_warps, num_stages | TRITON forward: compute tiles (powers of 2 dividing the BlockMask's block size) and launch parameters. |
    | bwd_block_m, bwd_block_n, bwd_num_warps, bwd_num_stages | TRITON backward (torch's BLOCK_M1 / BLOCK_N1: q and kv rows of the dk/dv kernel, which the dq kernel uses transposed, so each must divide both block sizes). |
    | decode_block_n, decode_splits, decode_num_warps, decode_num_stages | TRITON decode kernel. |
    | MOSAIC_STAGES, MOSAIC_SCHEDULE_BARRIER, MOSAIC_LONGEST_FIRST, MOSAIC_PIPELINED | MOSAIC_GPU forward: K/V ring depth, consumers taking turns on the tensor cores, longest BlockMask rows first, each step's QK^T issued with the previous step's PV (defaults by head dim: `pallas_kernels.mosaic_gpu.fwd.default_config`). |
    | MOSAIC_TRITON_FWD | MOSAIC_GPU: True runs the Triton backend's forward and this backend's backward (what AUTO sets for mask_mods dividing their indices, where each measured faster: `MosaicGpuBackend.auto_options`). |
    | MOSAIC_FUSED_DQ | MOSAIC_GPU backward: accumulate dq in the dk/dv kernel (TMA reduce-add, not bitwise deterministic) instead of its own kernel; the default where measured faster (`pallas_kernels.mosaic_gpu.bwd.default_config`), False under `deterministic`. |

    q_sharding: inside a `jax.shard_map`, q's PartitionSpec there (over
    [B, Hq, L, E]; batch and heads may be split). The mods then see global
    batch and head indices on every shard, and a whole (replicated)
    block_mask is cut to the shard's batches and heads (`flexjax.sharding`).
    Without it, a call inside shard_map whose mods read b or h is refused
    rather than computed with shard-local indices. On Explicit mesh axes
    (`jax.set_mesh`) q's sharding is read from its type and the call runs on
    its shards by itself, keeping q's sharding for the outputs.
    """
    return _checked_call(
        query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options,
        q_sharding, Layout.BHSD,
    )  # fmt: skip


def _checked_call(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse,
                  kernel_options, q_sharding, layout):  # fmt: skip
    """The checks that need the caller's arrays, then the cached jitted call (`jitted_call`)."""
    consts, static = checked_static_call(
        query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options, q_sharding,
        layout,
    )  # fmt: skip
    out, lse = jitted_call(query, key, value, tuple(consts), block_mask, **static)
    return (out, lse) if return_lse else out


def checked_static_call(query, key, value, score_mod, block_mask, scale, enable_gqa,
                        kernel_options, q_sharding=None, layout=Layout.BHSD):  # fmt: skip
    """Check a call; return the score_mod's captured arrays and `jitted_call`'s static arguments.

    `jitted_call(query, key, value, tuple(consts), block_mask, **static)` is then the
    call; the torch bridge wraps it in its own jitted vjp.
    """
    program, consts = check_score_mod(score_mod)  # traced once, here, whatever follows
    q_sharding = spec_in_bhsd(q_sharding, layout)
    views = [as_bhsd(x, layout) for x in (query, key, value)]
    check_qkv(*views, enable_gqa)  # the checks that need concrete arrays
    check_scale(scale, query.shape[-1])
    sizes = _global_sizes(views[0], views[1], q_sharding)
    check_mod_indices(program, block_mask, *sizes)
    kernel_options = _checked_by_evaluation(
        kernel_options, program, consts, block_mask, sizes, isinstance(query, jax.core.Tracer)
    )
    explicit = spec_in_bhsd(explicit_q_spec(query), layout) if q_sharding is None else None
    static = dict(
        program=program, scale=scale, enable_gqa=enable_gqa,
        kernel_options=_frozen(kernel_options), q_sharding=q_sharding, explicit=explicit,
        layout=layout, backends=tuple(dispatch.backends().items()),  # new registry, new call
    )  # fmt: skip
    return consts, static


def as_bhsd(x, layout: Layout):
    """x itself for BHSD; for another layout, the shape and dtype x would have in BHSD (no data)."""
    if layout is Layout.BHSD or getattr(x, "ndim", 0) != 4:
        return x
    B, T, N, D = x.shape
    return jax.ShapeDtypeStruct((B, N, T, D), x.dtype)


def _global_sizes(query, key, q_sharding) -> tuple[int, int, int, int]:
    """(B, Hq, L, S) of the whole call: a shard's sizes times its shard counts."""
    B, Hq, L = query.shape[:3]
    if q_sharding is not None:
        B, Hq = shard_layout(q_sharding).whole(B, Hq)
    return B, Hq, L, key.shape[2]


def _checked_by_evaluation(kernel_options, program, consts, block_mask, sizes, traced):
    """kernel_options without "check_indices", after running that check if it is True."""
    if not isinstance(kernel_options, dict) or "check_indices" not in kernel_options:
        return kernel_options
    kernel_options = dict(kernel_options)
    check = kernel_options.pop("check_indices")
    if not isinstance(check, bool):
        raise ValueError(f"kernel_options['check_indices'] must be True or False, got {check!r}")
    if check:
        find_bad_index(program, consts, *sizes, traced=traced)
        if isinstance(block_mask, BlockMask):
            find_bad_index(block_mask.mask_program, block_mask.mask_consts, *sizes, traced=traced)
    return kernel_options


def _frozen(kernel_options):
    """kernel_options as a hashable static argument (sorted pairs), checked as a dict first."""
    if kernel_options is None:
        return None
    if not isinstance(kernel_options, dict):
        raise TypeError(
            f"kernel_options must be a dict or None, got {type(kernel_options).__name__}"
        )
    dispatch.KernelOptions.parse(kernel_options)  # its errors, before anything is traced
    return tuple(sorted(kernel_options.items()))


@functools.partial(
    jax.jit,
    static_argnames=(
        "program", "scale", "enable_gqa", "kernel_options", "q_sharding", "explicit", "layout",
        "backends",
    ),
)  # fmt: skip
def jitted_call(query, key, value, consts, block_mask, *, program, scale, enable_gqa, kernel_options,
          q_sharding, explicit, layout, backends):  # fmt: skip
    """flex_attention's work as one jitted function of arrays (static: the rest).

    Called eagerly, a call after the first with the same structure (shapes,
    dtypes, mods' programs, BlockMask structure, options) costs one cached
    executable's dispatch: the mods' new captured values and a new BlockMask's
    tables are arguments. Inside a user's jit it is inlined. backends: the
    registry's contents, only as part of the cache key.
    """
    del backends
    score = (program, consts)
    options = dict(
        scale=scale, enable_gqa=enable_gqa,
        kernel_options=None if kernel_options is None else dict(kernel_options),
    )  # fmt: skip
    if explicit is not None:
        return explicit_call(
            _attend, query, key, value, score, block_mask, explicit, layout=layout, **options
        )
    return _attend(
        query, key, value, score, block_mask, q_sharding=q_sharding, layout=layout, **options
    )


def _attend(query, key, value, score, block_mask, *, scale, enable_gqa, kernel_options,
            q_sharding=None, layout=Layout.BHSD):  # fmt: skip
    """(out, lse) of a call on this device's arrays; q_sharding: see flex_attention."""
    offsets = None
    if q_sharding is not None:
        shards = shard_layout(q_sharding)
        B, Hq = as_bhsd(query, layout).shape[:2]
        block_mask = local_block_mask(block_mask, shards, B, Hq)
        offsets = shards.offsets(B, Hq)
    call = _prepare(query, key, value, score, block_mask, scale, enable_gqa, kernel_options, layout)
    if offsets is None:
        _refuse_local_indices(query, call.mods)
    return dispatch.attention(
        query, key, value, call.tables, call.mods, call.spec, call.options, offsets
    )


def _refuse_local_indices(query, mods: Mods) -> None:
    """Inside a shard_map, mods reading b or h need q_sharding (else they would see local ones).

    With check_vma=True a query that varies over no axis is whole on every
    device, so its local indices are the global ones; with check_vma=False
    nothing says so, and any manual mesh axis counts.
    """
    read = indices_read(mods.score) | indices_read(mods.mask)
    names = [n for i, n in ((0, "b"), (1, "h")) if i in read]
    manual = _manual_axes()
    if not names or not manual:
        return
    vma_checked = bool(varying_axes(lax.axis_index(manual[0])))
    if vma_checked and not varying_axes(query):
        return
    raise ValueError(
        f"flex_attention inside jax.shard_map (manual mesh axes {manual}): the mods read "
        f"{' and '.join(names)}, which would be this shard's local indices. Pass "
        "q_sharding=<query's PartitionSpec in the shard_map> so they see global ones."
    )


def _manual_axes() -> list[str]:
    """The mesh axes a shard_map around this call made manual (none outside one)."""
    mesh = jax.sharding.get_abstract_mesh()
    manual = jax.sharding.AxisType.Manual
    return [n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t == manual]
