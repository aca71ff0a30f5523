"""flex_attention on shards of a device mesh: every shard's mods see the user's (global) indices.

Inside a `jax.shard_map` each device holds a block of q, k and v. The
kernels run on those local blocks unchanged; what must change is what the
mods see: `alibi_slopes[h]` on the second head shard must read the slopes
of heads Hq/2.., not 0... So the call passes the kernels index offsets
(`pallas_kernels.spec.index_offsets`): b0 = (this device's position along
the batch axes) * local batch, h0 likewise for the query heads.

The device's position comes from `lax.axis_index` over the mesh axes that
shard each dimension -- which flex_attention cannot see from inside the
shard_map (a local array knows which axes it varies over, not which of its
dimensions they split). So the caller says it: `q_sharding`, q's
PartitionSpec over [B, Hq, L, E] as given to shard_map. Batch and heads may
be sharded (GQA: the kv heads with the same axes, so each shard keeps whole
groups); the sequence and head dims may not (context parallelism is a
separate mode).

The BlockMask may be passed whole (replicated): tables whose batch or head
dimension is the global size are sliced to this shard's block here; tables
of size 1 broadcast; tables already of the local size are used as given.
Captured arrays of the mods stay whole: mods index them with global indices.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax import lax
from jax.sharding import PartitionSpec

from flexjax.block_mask import BlockMask
from pallas_kernels.spec import index_offsets

__all__ = ["ShardLayout", "shard_layout"]


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """How q's batch and head dimensions are split over mesh axes (from a PartitionSpec)."""

    batch_axes: tuple[str, ...]
    head_axes: tuple[str, ...]

    def count(self, axes: tuple[str, ...]) -> int:
        """How many shards `axes` make (inside shard_map: from the current mesh)."""
        sizes = jax.sharding.get_abstract_mesh().shape
        return math.prod(sizes[a] for a in axes)

    def position(self, axes: tuple[str, ...]):
        """This device's index among the shards of `axes` (row-major, as PartitionSpec splits)."""
        return lax.axis_index(axes) if axes else 0

    def offsets(self, batch: int, q_heads: int):
        """The int32[4] index offsets of this shard: (b0, h0, 0, 0)."""
        b0 = self.position(self.batch_axes) * batch
        h0 = self.position(self.head_axes) * q_heads
        return index_offsets(b=b0, h=h0)


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def shard_layout(q_sharding) -> ShardLayout:
    """Check q_sharding (q's PartitionSpec, [B, Hq, L, E]) and read which axes split B and Hq."""
    if not isinstance(q_sharding, PartitionSpec):
        raise TypeError(
            "q_sharding must be a jax.sharding.PartitionSpec (q's in_spec in the enclosing "
            f"shard_map, over [B, Hq, L, E]), got {type(q_sharding).__name__}: {q_sharding!r}"
        )
    entries = tuple(q_sharding) + (None,) * (4 - len(q_sharding))
    if len(entries) > 4:
        raise ValueError(f"q_sharding has {len(q_sharding)} entries; q has 4 dims [B, Hq, L, E]")
    if entries[2] is not None or entries[3] is not None:
        raise NotImplementedError(
            f"q_sharding={q_sharding} splits the sequence or head dim of q: flex_attention "
            "shards batch and heads (P(batch_axes, head_axes)); sequence sharding is context "
            "parallelism, which this mode does not do"
        )
    return ShardLayout(batch_axes=_axes(entries[0]), head_axes=_axes(entries[1]))


def local_block_mask(block_mask: BlockMask, layout: ShardLayout, batch: int, q_heads: int):
    """The BlockMask of this shard: tables of the global batch or head size sliced to its block."""
    if block_mask is None:
        return None
    tables, (seq_lengths, block_size, program) = block_mask.tree_flatten()
    *tables, consts = tables
    Bm, Hm = block_mask.kv_num_blocks.shape[:2]
    sliced = []
    for t in tables:
        if t is not None:
            t = _local(t, 0, Bm, batch, layout.batch_axes, layout, "batch")
            t = _local(t, 1, Hm, q_heads, layout.head_axes, layout, "heads")
        sliced.append(t)
    return BlockMask.tree_unflatten((seq_lengths, block_size, program), (*sliced, consts))


def _local(table, axis: int, size: int, local: int, axes, layout: ShardLayout, what: str):
    """table's block of this shard along `axis` (size: the table's own, local: the shard's)."""
    shards = layout.count(axes)
    if size == 1 or size == local:
        return table  # broadcast, or already this shard's block
    if size != local * shards:
        raise ValueError(
            f"block_mask {what} dimension is {size}; with q's {what} split {shards} ways "
            f"({local} per shard) it must be 1, {local} (this shard's) or {local * shards} (whole)"
        )
    start = layout.position(axes) * local
    return lax.dynamic_slice_in_dim(table, start, local, axis=axis)
