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

Explicit mesh axes (`jax.make_mesh(..., axis_types=Explicit)` + `jax.set_mesh`)
put the sharding in the arrays' types, so there flex_attention reads q's
PartitionSpec at trace time and runs the same local call under a shard_map
of its own (`explicit_call`). What it needs it arranges, explicitly: k and v
resharded to q's batch and head split if theirs differs, the block mask and
the mods' captured arrays replicated. The outputs keep q's sharding.

jax.nn's [B, T, N, H] layout (`flexjax.dot_product_attention`) takes the
same paths: its specs are read as the same split of [B, H, L, D]
(`spec_in_bhsd`) and the shard_map's specs are written in its layout.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from flexjax.block_mask import BlockMask
from pallas_kernels.partition import ShardLayout, local_tables
from pallas_kernels.spec import Layout

__all__ = [
    "explicit_call",
    "explicit_q_spec",
    "local_block_mask",
    "shard_layout",
    "spec_in_bhsd",
]


def shard_layout(q_sharding) -> ShardLayout:
    """Check q_sharding (q's PartitionSpec, [B, Hq, L, E]) and read which mesh axes split B and Hq."""
    if not isinstance(q_sharding, PartitionSpec):
        raise TypeError(
            "q_sharding must be a jax.sharding.PartitionSpec (q's in_spec in the enclosing "
            f"shard_map, over [B, Hq, L, E]), got {type(q_sharding).__name__}: {q_sharding!r}"
        )
    if len(q_sharding) > 4:
        raise ValueError(f"q_sharding has {len(q_sharding)} entries; q has 4 dims [B, Hq, L, E]")
    return ShardLayout.from_spec(q_sharding, dict(jax.sharding.get_abstract_mesh().shape))


def local_block_mask(block_mask: BlockMask, layout: ShardLayout, batch: int, q_heads: int):
    """The BlockMask of this shard: tables of the global batch or head size cut to its block."""
    if block_mask is None:
        return None
    leaves, aux = block_mask.tree_flatten()
    *tables, consts = leaves
    tables = local_tables(tables, layout, batch, q_heads)
    return BlockMask.tree_unflatten(aux, (*tables, consts))


def explicit_q_spec(query) -> PartitionSpec | None:
    """q's PartitionSpec when its type carries a sharding over Explicit mesh axes, else None."""
    sharding = getattr(jax.typeof(query), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not mesh.axis_names:
        return None
    explicit = jax.sharding.AxisType.Explicit
    if not any(t == explicit for t in mesh.axis_types):
        return None
    spec = sharding.spec
    return spec if any(entry is not None for entry in spec) else None


def explicit_call(attend, query, key, value, score, block_mask, q_spec, *, layout, **kwargs):
    """attend(...) on the shards of q's Explicit sharding: a shard_map over the local call.

    attend(q, k, v, score, block_mask, q_sharding=..., layout=..., **kwargs) -> (out, lse):
    the local call; score: the traced score_mod (program, captured arrays),
    whose arrays cross into the shard_map as arguments, not closures. q_spec:
    q's split in BHSD terms (`spec_in_bhsd`); the shard_map's specs follow `layout`.
    """
    score_program, score_consts = score
    shards = shard_layout(q_spec)
    b_entry, h_entry = shards.entry(shards.batch_axes), shards.entry(shards.head_axes)
    kv_batch = b_entry if key.shape[0] > 1 else None
    q_out = PartitionSpec(*layout.shape(b_entry, h_entry, None, None))
    kv_spec = PartitionSpec(*layout.shape(kv_batch, h_entry, None, None))
    lse_out = PartitionSpec(*layout.shape(b_entry, h_entry, None, None)[:3])
    key, value = (_resharded(x, kv_spec) for x in (key, value))
    score_consts = tuple(_resharded(c, PartitionSpec()) for c in score_consts)
    block_mask = jax.tree.map(lambda t: _resharded(t, PartitionSpec()), block_mask)
    mesh = jax.typeof(query).sharding.mesh

    def local(q, k, v, consts, bm):
        q_sharding = PartitionSpec(b_entry, h_entry)
        return attend(
            q, k, v, (score_program, consts), bm, q_sharding=q_sharding, layout=layout, **kwargs
        )

    return jax.shard_map(
        local, mesh=mesh, in_specs=(q_out, kv_spec, kv_spec, PartitionSpec(), PartitionSpec()),
        out_specs=(q_out, lse_out), axis_names=set(mesh.axis_names), check_vma=False,
    )(query, key, value, score_consts, block_mask)  # fmt: skip


def spec_in_bhsd(spec, layout: Layout):
    """A PartitionSpec over an array in `layout` as the same split of its [B, H, L, D] dims.

    The shard arithmetic (`shard_layout`, `ShardLayout`) speaks BHSD; a
    [B, T, N, H] query's spec has its sequence and head entries swapped.
    Anything that is not a spec of at most 4 entries is returned as given,
    for `shard_layout` to refuse by name.
    """
    if layout is Layout.BHSD or not isinstance(spec, PartitionSpec) or len(spec) > 4:
        return spec
    b, t, n, d = tuple(spec) + (None,) * (4 - len(spec))
    return PartitionSpec(b, n, t, d)


def _resharded(x, spec: PartitionSpec):
    """x with sharding `spec` on its mesh: itself if it has it, else an explicit reshard."""
    current = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    padded = tuple(spec) + (None,) * (x.ndim - len(spec))
    if current is not None and tuple(current) + (None,) * (x.ndim - len(current)) == padded:
        return x
    return jax.sharding.reshard(x, PartitionSpec(*padded))
