"""Context parallelism: the sequence split over a mesh axis, K/V all-gathered, blocks balanced.

A sequence too long (or too slow) for one GPU is split along its length over
a mesh axis of n devices. Each device keeps its share of the queries and
gathers the whole K and V (`lax.all_gather`, what Llama 3, kvax, MaxText and
torch's FlexAttention context parallelism do); JAX transposes that gather
into the reduce-scatter of dK and dV by itself. The global BlockMask stays
the user's: each device runs the kernels on the table rows of its own q
blocks, so every kv block its queries never see is skipped, and the mods
see global indices (the kernels get the global first row of each local q
block, `KernelSpec.q_map_len`).

Which q blocks a device holds is a `SequenceOrder`, chosen once and applied
to the tokens once (at the model's input and output: `order.shard`,
`order.unshard`), never per layer:

* `contiguous_order`: device r holds the r-th n-th of the sequence. Under a
  causal mask the last device does 2n - 1 times the work of the first.
* `head_tail_order`: the sequence cut into 2n chunks, device r holding chunks
  r and 2n - 1 - r (torch's `_HeadTailLoadBalancer`, TE's DualChunkSwap):
  exact balance for causal masks.
* `ptrr_order`: q blocks sorted by their work in a BlockMask (kv blocks to
  visit) and dealt out round-robin, snaking (torch's `_PTRRLoadBalancer`):
  documents, windows, any mask.

Lengths that are not a multiple of n blocks are padded with blocks of
padding tokens (their rows keep nothing and `unshard` drops them). Inside
each device, K and V are put back in natural order after the gather, so kv
indices and the tables stay global. Memory: every device holds the whole K
and V of a layer (and, under autodiff, keeps them for the backward).

Two other strategies are here, measured against the gather and slower on
one NVLink host (see `context_parallel_attention`): Ulysses (all-to-all to
heads) and a ring (K/V shares passed round with `lax.ppermute`; the kernels
then get the global start of each local kv block too, `KernelSpec.kv_map_len`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from flexjax.api import _manual_axes, _prepare
from flexjax.block_mask import BlockMask, dense_to_ordered, ordered_to_dense, transpose_ordered
from flexjax.input_checks import check_mod_indices, check_score_mod
from flexjax.sharding import local_block_mask
from pallas_kernels import dispatch
from pallas_kernels.partition import ShardLayout, local_tables
from pallas_kernels.spec import BlockTables, q_block_offsets

__all__ = [
    "SequenceOrder",
    "context_parallel_attention",
    "contiguous_order",
    "head_tail_order",
    "ptrr_order",
]


@dataclasses.dataclass(frozen=True, eq=False)
class SequenceOrder:
    """Which q blocks each of n devices holds, and the token permutation that puts them there.

    blocks: int32 [n, R_local], the global q block held as local block j by
    device r; blocks >= ceil(seq_len / block_size) are padding. The sharded
    sequence is blocks[0, 0], blocks[0, 1], ..., blocks[1, 0], ... each of
    block_size tokens: padded_len tokens, local_len per device.
    """

    blocks: np.ndarray
    block_size: int
    seq_len: int
    name: str

    def __post_init__(self):
        blocks = np.asarray(self.blocks, np.int32)
        if blocks.ndim != 2 or sorted(blocks.ravel().tolist()) != list(range(blocks.size)):
            raise ValueError(
                f"SequenceOrder.blocks must be an [n, R_local] permutation of the block "
                f"indices 0..{blocks.size - 1}, got {blocks.tolist()}"
            )
        object.__setattr__(self, "blocks", blocks)

    @property
    def n(self) -> int:
        return self.blocks.shape[0]

    @property
    def local_len(self) -> int:
        """Tokens per device."""
        return self.blocks.shape[1] * self.block_size

    @property
    def padded_len(self) -> int:
        """Tokens of the sharded sequence, padding included (n * local_len)."""
        return self.blocks.size * self.block_size

    def positions(self) -> np.ndarray:
        """int32 [padded_len]: the global token at each position of the sharded sequence (seq_len: padding)."""
        rows = np.arange(self.block_size, dtype=np.int64)
        pos = (self.blocks.reshape(-1, 1).astype(np.int64) * self.block_size + rows).ravel()
        return np.minimum(pos, self.seq_len).astype(np.int32)

    def inverse(self) -> np.ndarray:
        """int32 [seq_len]: the position in the sharded sequence of each global token."""
        pos = self.positions()
        inv = np.empty(self.seq_len, np.int32)
        real = pos < self.seq_len
        inv[pos[real]] = np.nonzero(real)[0]
        return inv

    def shard(self, x: jax.Array, axis: int = 2) -> jax.Array:
        """x (seq_len long on `axis`, natural order) permuted and padded (with zeros) to this order."""
        _check_len(x, axis, self.seq_len, "shard", "the natural sequence length")
        pos = self.positions()
        taken = jnp.take(x, jnp.asarray(np.minimum(pos, self.seq_len - 1)), axis=axis)
        if (pos < self.seq_len).all():
            return taken
        shape = [1] * x.ndim
        shape[axis] = pos.size
        valid = jnp.asarray(pos < self.seq_len).reshape(shape)
        return jnp.where(valid, taken, jnp.zeros((), x.dtype))

    def unshard(self, x: jax.Array, axis: int = 2) -> jax.Array:
        """x in this order (padded_len long on `axis`) back in natural order, padding dropped."""
        _check_len(x, axis, self.padded_len, "unshard", "the padded length of the order")
        return jnp.take(x, jnp.asarray(self.inverse()), axis=axis)

    def work(self, block_mask: BlockMask) -> np.ndarray:
        """int64 [n]: kv blocks each device visits under `block_mask` (summed over batch and heads)."""
        per_block = _block_work(block_mask)
        padded = np.concatenate([per_block, np.zeros(self.blocks.size, np.int64)])
        return padded[self.blocks].sum(axis=1)

    def __repr__(self) -> str:
        return (
            f"SequenceOrder({self.name}, n={self.n}, seq_len={self.seq_len}, "
            f"block_size={self.block_size}, local_len={self.local_len})"
        )


def _check_len(x, axis, want, what, meaning):
    if not hasattr(x, "shape") or not -x.ndim <= axis < x.ndim or x.shape[axis] != want:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(
            f"SequenceOrder.{what}: x must have {meaning} ({want}) on axis {axis}, got shape {shape}"
        )


def _n_blocks(seq_len: int, n: int, block_size: int, multiple: int) -> tuple[int, int]:
    """(real q blocks, padded q blocks: a multiple of `multiple`)."""
    for name, value in (("seq_len", seq_len), ("n", n), ("block_size", block_size)):
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    real = -(-seq_len // block_size)
    return real, -(-real // multiple) * multiple


def contiguous_order(seq_len: int, n: int, block_size: int = 128) -> SequenceOrder:
    """Device r holds the r-th n-th of the q blocks."""
    _, padded = _n_blocks(seq_len, n, block_size, n)
    blocks = np.arange(padded).reshape(n, padded // n)
    return SequenceOrder(blocks, block_size, seq_len, "contiguous")


def head_tail_order(seq_len: int, n: int, block_size: int = 128) -> SequenceOrder:
    """2n chunks of q blocks; device r holds chunks r and 2n - 1 - r (balanced for causal masks)."""
    _, padded = _n_blocks(seq_len, n, block_size, 2 * n)
    chunks = np.arange(padded).reshape(2 * n, padded // (2 * n))
    blocks = np.stack([np.concatenate([chunks[r], chunks[2 * n - 1 - r]]) for r in range(n)])
    return SequenceOrder(blocks, block_size, seq_len, "head_tail")


def ptrr_order(block_mask: BlockMask, n: int) -> SequenceOrder:
    """q blocks sorted by work in block_mask, dealt round-robin in a snake; each device's in order.

    Work of a q block: the kv blocks it visits (partial and full), summed
    over the mask's batch and heads. The block mask must be concrete (built
    outside jit): the order is chosen once, before the tokens are permuted.
    """
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a flexjax.BlockMask, got {type(block_mask).__name__}")
    seq_len, block_size = block_mask.seq_lengths[0], block_mask.BLOCK_SIZE[0]
    real, padded = _n_blocks(seq_len, n, block_size, n)
    work = np.concatenate([_block_work(block_mask)[:real], np.zeros(padded - real, np.int64)])
    ranked = np.argsort(-work, kind="stable")  # heaviest first; padding blocks last
    mine = [[] for _ in range(n)]
    for k, start in enumerate(range(0, padded, n)):
        ranks = range(n) if k % 2 == 0 else reversed(range(n))
        for r, block in zip(ranks, ranked[start : start + n], strict=True):
            mine[r].append(block)
    return SequenceOrder(np.sort(np.array(mine), axis=1), block_size, seq_len, "ptrr")


def _block_work(block_mask: BlockMask) -> np.ndarray:
    """int64 [R]: kv blocks visited per q block, summed over batch and heads."""
    try:
        work = np.asarray(block_mask.kv_num_blocks, np.int64)
        if block_mask.full_kv_num_blocks is not None:
            work = work + np.asarray(block_mask.full_kv_num_blocks, np.int64)
    except jax.errors.TracerArrayConversionError:
        raise ValueError(
            "the block mask is traced (inside jit): a SequenceOrder is chosen once, from a "
            "concrete BlockMask built outside jit"
        ) from None
    return work.sum(axis=(0, 1))


# ---------------------------------------------------------------------------- attention


def context_parallel_attention(
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
    order: SequenceOrder,
    axis: str,
    mesh=None,
    q_sharding: PartitionSpec | None = None,
    strategy: str = "all_gather",
):
    """flex_attention of a sequence split over mesh axis `axis`, in `order` (self-attention).

    query [B, Hq, P, E], key [B or 1, Hkv, P, E], value [B or 1, Hkv, P, Ev]:
    the tokens already in `order` (`order.shard(x)`, P = order.padded_len).
    score_mod and block_mask are the whole sequence's (block_mask for
    (order.seq_len, order.seq_len), its q block size order.block_size,
    replicated); the mods see natural (global) indices. Returns out (and
    lse) in `order`, split like query; `order.unshard(out)` restores the
    natural order.

    Called outside a shard_map, it runs under one of its own over `mesh`
    (default: the mesh set by `jax.set_mesh`), with q split as q_sharding
    (default P(None, None, axis): batch and head axes may be added, e.g.
    P("dp", "tp", axis)); arrays placed otherwise are resharded to that.
    Inside the user's shard_map (`axis` manual), q is this device's
    [B, Hq, order.local_len, E] and q_sharding says how the whole q was split
    (default P(None, None, axis)).

    strategy (measured on 4 H100s, `bench/results/mesh_h100x4_2026-11-28.md`):
    "all_gather" (default, the fastest there): each device gathers K and V
    and runs its own queries. "ulysses": q, k, v and the outputs are
    exchanged all-to-all so that each device runs the whole sequence for
    Hq/n query heads (Hkv/n kv heads; both must divide by n, and q_sharding
    may not split heads): as fast for causal masks, slower for documents
    (more bytes under GQA), the least memory. "ring": the K/V shares pass
    round the devices (`lax.ppermute`), one kernel call per share, merged by
    lse; slower (lockstep steps) and no smaller under autodiff, there for
    comparison. The kv block size must divide the q block size.
    """
    if not isinstance(order, SequenceOrder):
        raise TypeError(
            f"order must be a flexjax.parallel.SequenceOrder, got {type(order).__name__}"
        )
    q_spec = PartitionSpec(None, None, axis) if q_sharding is None else q_sharding
    _check_q_spec(q_spec, axis)
    q_spec = PartitionSpec(*tuple(q_spec) + (None,) * (4 - len(q_spec)))  # four entries
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(_STRATEGIES)}, got {strategy!r}")
    local_fn = _STRATEGIES[strategy]
    score = check_score_mod(score_mod)
    if block_mask is None:
        block_mask = _full_block_mask(order)
    _check_block_mask(block_mask, order)
    B, Hq = _whole_batch_and_heads(query, q_spec, axis in _manual_axes())
    check_mod_indices(score[0], block_mask, B, Hq, order.seq_len, order.seq_len)
    options = dict(scale=scale, enable_gqa=enable_gqa, kernel_options=kernel_options)
    manual = _manual_axes()
    if axis in manual:
        _check_local_len(query, key, value, order.local_len, "this device's share")
        out, lse = local_fn(query, key, value, score, block_mask, order, axis, q_spec, **options)
        return (out, lse) if return_lse else out

    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.axis_names:
            raise ValueError(
                "context_parallel_attention: pass mesh= (or call it under jax.set_mesh) "
                f"with the axis {axis!r}"
            )
    if axis not in mesh.axis_names:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    if mesh.shape[axis] != order.n:
        raise ValueError(
            f"order was made for {order.n} devices but mesh axis {axis!r} has {mesh.shape[axis]}"
        )
    _check_local_len(query, key, value, order.padded_len, "order.padded_len")
    kv_spec = PartitionSpec(q_spec[0] if key.shape[0] > 1 else None, q_spec[1], axis)
    program, consts = score

    def local(q, k, v, consts, bm):
        return local_fn(q, k, v, (program, consts), bm, order, axis, q_spec, **options)

    out, lse = jax.shard_map(
        local, mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(), PartitionSpec()),
        out_specs=(PartitionSpec(*q_spec[:3]), PartitionSpec(*q_spec[:3])),
        check_vma=False,
    )(query, key, value, tuple(consts), block_mask)  # fmt: skip
    return (out, lse) if return_lse else out


def _all_gather_local(query, key, value, score, block_mask, order, axis, q_spec, *, scale,
                      enable_gqa, kernel_options):  # fmt: skip
    """(out, lse) of this device's queries: gather K/V, take the table rows of its blocks, run."""
    layout = _batch_head_shards(q_spec)
    B, Hq = query.shape[:2]
    mine = jnp.asarray(order.blocks)[lax.axis_index(axis)]
    key, value = (_gathered(x, order, axis) for x in (key, value))
    local_bm = _local_block_mask(block_mask, layout, B, Hq, mine, order)
    call = _prepare(query, key, value, score, local_bm, scale, enable_gqa, kernel_options)
    spec = dataclasses.replace(call.spec, q_map_len=order.seq_len, global_offsets=True)
    offsets = q_block_offsets(layout.offsets(B, Hq), mine * order.block_size)
    return dispatch.attention(
        query, key, value, call.tables, call.mods, spec, call.options, offsets
    )


def _ulysses_local(query, key, value, score, block_mask, order, axis, q_spec, *, scale,
                   enable_gqa, kernel_options):  # fmt: skip
    """(out, lse) of this device's queries: all-to-all to heads, the whole sequence, back."""
    n = jax.sharding.get_abstract_mesh().shape[axis]
    B, Hq, Hkv = query.shape[0], query.shape[1], key.shape[1]
    if q_spec[1] is not None or Hq % n or Hkv % n:
        raise ValueError(
            f"strategy='ulysses' splits the heads over {axis!r} ({n} devices): Hq={Hq} and "
            f"Hkv={Hkv} must divide by {n} and q_sharding may not split heads (got {q_spec}); "
            "use strategy='all_gather'"
        )
    inverse = jnp.asarray(order.inverse())

    def to_heads(x):  # [B, H, local, D] in the order -> [B, H/n, seq_len, D] in natural order
        x = lax.all_to_all(x, axis, split_axis=1, concat_axis=2, tiled=True)
        return jnp.take(x, inverse, axis=2)

    def to_sequence(x):  # the way back; rows of padding positions copy the last token
        x = jnp.take(x, jnp.asarray(np.minimum(order.positions(), order.seq_len - 1)), axis=2)
        return lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)

    query, key, value = (to_heads(x) for x in (query, key, value))
    sizes = dict(jax.sharding.get_abstract_mesh().shape)
    layout = ShardLayout.from_spec(PartitionSpec(q_spec[0], axis), sizes)
    heads = query.shape[1]
    block_mask = local_block_mask(block_mask, layout, B, heads)
    call = _prepare(query, key, value, score, block_mask, scale, enable_gqa, kernel_options)
    out, lse = dispatch.attention(
        query, key, value, call.tables, call.mods, call.spec, call.options,
        layout.offsets(B, heads),
    )  # fmt: skip
    return to_sequence(out), to_sequence(lse[..., None])[..., 0]


def _ring_local(query, key, value, score, block_mask, order, axis, q_spec, *, scale, enable_gqa,
                kernel_options):  # fmt: skip
    """(out, lse) of this device's queries: K/V shares passed round a ring, one kernel call a step.

    Step j runs the local queries against the share of device r - j (its q
    blocks' tokens: the same order for q and kv), with the table entries of
    those kv blocks and their global starts (`KernelSpec.kv_map_len`), while
    the share moves on to device r + 1 (`lax.ppermute`, free to overlap the
    step). The steps' outputs are merged by their lse. Autodiff sends dK/dV
    back round the ring.
    """
    n = jax.sharding.get_abstract_mesh().shape[axis]
    q_bs, kv_bs = block_mask.BLOCK_SIZE
    if q_bs % kv_bs:
        raise ValueError(
            f"strategy='ring' needs the kv block size ({kv_bs}) to divide the q block size "
            f"({q_bs}); use strategy='all_gather'"
        )
    layout = _batch_head_shards(q_spec)
    B, Hq = query.shape[:2]
    r = lax.axis_index(axis)
    blocks = jnp.asarray(order.blocks)
    mine = blocks[r]
    rows = _rows_of(block_mask, layout, B, Hq, mine)  # BlockTables rows: kv_num, kv_idx, ...
    dense = [ordered_to_dense(num, idx, block_mask.kv_indices.shape[-1]) for num, idx in rows]
    per_q = q_bs // kv_bs  # kv blocks per q block
    offsets = layout.offsets(B, Hq)
    outs, lses = [], []
    for j in range(n):
        theirs = blocks[(r - j) % n]
        kv_blocks = (theirs[:, None] * per_q + jnp.arange(per_q)).reshape(-1)  # global kv blocks
        step = _step_tables(dense, kv_blocks)
        step_bm = BlockMask._from_program(
            (order.local_len, order.local_len), step, block_mask.BLOCK_SIZE,
            block_mask.mask_program, block_mask.mask_consts,
        )  # fmt: skip
        call = _prepare(query, key, value, score, step_bm, scale, enable_gqa, kernel_options)
        spec = dataclasses.replace(
            call.spec, q_map_len=order.seq_len, kv_map_len=order.seq_len, global_offsets=True
        )
        step_offsets = q_block_offsets(offsets, mine * q_bs, kv_blocks * kv_bs)
        out, lse = dispatch.attention(
            query, key, value, call.tables, call.mods, spec, call.options, step_offsets
        )
        outs.append(out)
        lses.append(lse)
        if j < n - 1:
            ring = [(i, (i + 1) % n) for i in range(n)]
            key, value = lax.ppermute((key, value), axis, ring)
    return _merged(outs, lses, query.dtype)


def _rows_of(block_mask, layout, B, Hq, mine):
    """(num, indices) of the partial and the full kv tables, rows of this device's q blocks."""
    tables = local_tables(block_mask.kernel_tables(), layout, B, Hq)
    R = tables.kv_num_blocks.shape[-1]
    rows = jnp.minimum(mine, R)  # R: an empty row appended for padding blocks

    def take(num, idx):
        num = jnp.concatenate([num, jnp.zeros_like(num[..., :1])], axis=-1)
        idx = jnp.concatenate([idx, jnp.zeros_like(idx[..., :1, :])], axis=-2)
        return num[..., rows], idx[..., rows, :]

    return [
        take(tables.kv_num_blocks, tables.kv_indices),
        take(tables.full_kv_num_blocks, tables.full_kv_indices),
    ]


def _step_tables(dense, kv_blocks) -> BlockTables:
    """The eight tables of this device's q blocks against the kv blocks `kv_blocks` (local order)."""
    views = []
    for d in dense:  # [Bm, Hm, R_local, C] 0/1: partial, then full
        C = d.shape[-1]
        d = jnp.concatenate([d, jnp.zeros_like(d[..., :1])], axis=-1)  # C: padding blocks
        views.append(d[..., jnp.minimum(kv_blocks, C)])
    kv, full_kv = (dense_to_ordered(d) for d in views)
    q, full_q = (dense_to_ordered(jnp.swapaxes(d, -1, -2)) for d in views)
    return BlockTables(*kv, *full_kv, *q, *full_q)


def _merged(outs, lses, dtype):
    """out and lse of the union of the steps' keys, from each step's (out, lse)."""
    lse = jnp.stack(lses)
    top = jnp.max(lse, axis=0)
    safe = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(lse - safe)  # 0 for a step that kept nothing (-inf)
    total = jnp.sum(weights, axis=0)
    out = sum(w[..., None] * o.astype(jnp.float32) for w, o in zip(weights, outs, strict=True))
    out = jnp.where(total[..., None] > 0, out / jnp.where(total > 0, total, 1.0)[..., None], 0.0)
    return out.astype(dtype), jnp.where(total > 0, safe + jnp.log(total), -jnp.inf)


_STRATEGIES = {"all_gather": _all_gather_local, "ulysses": _ulysses_local, "ring": _ring_local}


def _gathered(x, order: SequenceOrder, axis: str):
    """This device's K or V share -> the whole sequence in natural order (seq_len long)."""
    full = lax.all_gather(x, axis, axis=2, tiled=True)
    inverse = order.inverse()
    if np.array_equal(inverse, np.arange(order.seq_len)):
        return full if order.padded_len == order.seq_len else full[:, :, : order.seq_len]
    return jnp.take(full, jnp.asarray(inverse), axis=2)


def _local_block_mask(block_mask, layout, B, Hq, mine, order) -> BlockMask:
    """The rows of this device's q blocks (padding blocks: empty rows), columns re-derived."""
    kv, full_kv = _rows_of(block_mask, layout, B, Hq, mine)
    local = BlockTables(*kv, *full_kv, *transpose_ordered(*kv), *transpose_ordered(*full_kv))
    if block_mask.full_kv_num_blocks is None:
        local = local._replace(
            full_kv_num_blocks=None, full_kv_indices=None, full_q_num_blocks=None,
            full_q_indices=None,
        )  # fmt: skip
    return BlockMask._from_program(
        (order.local_len, order.seq_len), local, block_mask.BLOCK_SIZE,
        block_mask.mask_program, block_mask.mask_consts,
    )  # fmt: skip


def _full_block_mask(order: SequenceOrder) -> BlockMask:
    """Every block full (no mask), for (seq_len, seq_len) in the order's block size."""
    R = -(-order.seq_len // order.block_size)
    full_idx = jnp.broadcast_to(jnp.arange(R, dtype=jnp.int32), (1, 1, R, R))
    return BlockMask.from_kv_blocks(
        jnp.zeros((1, 1, R), jnp.int32), jnp.zeros((1, 1, R, 1), jnp.int32),
        jnp.full((1, 1, R), R, jnp.int32), full_idx,
        BLOCK_SIZE=order.block_size, seq_lengths=(order.seq_len, order.seq_len),
    )  # fmt: skip


def _batch_head_shards(q_spec: PartitionSpec) -> ShardLayout:
    """Which mesh axes split q's batch and heads (q_spec: four entries, the sequence's ignored)."""
    sizes = dict(jax.sharding.get_abstract_mesh().shape)
    return ShardLayout.from_spec(PartitionSpec(*q_spec[:2]), sizes)


def _whole_batch_and_heads(query, q_spec, local: bool) -> tuple[int, int]:
    """q's whole batch and head counts (a local q's times its shard counts)."""
    B, Hq = query.shape[:2]
    return _batch_head_shards(q_spec).whole(B, Hq) if local else (B, Hq)


def _check_q_spec(q_spec, axis):
    if not isinstance(q_spec, PartitionSpec):
        raise TypeError(f"q_sharding must be a PartitionSpec, got {type(q_spec).__name__}")
    entries = tuple(q_spec) + (None,) * (4 - len(q_spec))
    if len(entries) != 4 or entries[2] != axis or entries[3] is not None:
        raise ValueError(
            f"q_sharding must split q [B, Hq, L, E] along L by the axis {axis!r} alone (and may "
            f"split B and Hq), e.g. P(None, None, {axis!r}); got {q_spec}"
        )


def _check_block_mask(block_mask, order):
    if not isinstance(block_mask, BlockMask):
        raise TypeError(
            f"block_mask must be a flexjax.BlockMask or None, got {type(block_mask).__name__}"
        )
    if tuple(block_mask.seq_lengths) != (order.seq_len, order.seq_len):
        raise ValueError(
            f"block_mask is for (Q_LEN, KV_LEN) = {tuple(block_mask.seq_lengths)}; context "
            f"parallelism needs the whole sequence's, ({order.seq_len}, {order.seq_len})"
        )
    if block_mask.BLOCK_SIZE[0] != order.block_size:
        raise ValueError(
            f"block_mask's q block size is {block_mask.BLOCK_SIZE[0]} but the order's is "
            f"{order.block_size}: make the order with block_size={block_mask.BLOCK_SIZE[0]}"
        )


def _check_local_len(query, key, value, want, meaning):
    for name, x in (("query", query), ("key", key), ("value", value)):
        if getattr(x, "ndim", 0) != 4 or x.shape[2] != want:
            raise ValueError(
                f"{name} must be [B, H, {want}, D] ({meaning}: the tokens in the order, "
                f"order.shard(x)), got shape {getattr(x, 'shape', type(x).__name__)}"
            )
