"""Partitioning the kernels over a mesh: what a shard computes, and the automatic (Auto-axes) mode.

Batch and heads shard without communication: each device runs the kernels on
its block of q, k, v, with the BlockMask tables cut to its batches and heads
and the index offsets (b0, h0) of its block, so the mods see global indices.
`ShardLayout` holds that arithmetic; `flexjax.sharding` uses it inside a
user's shard_map and on Explicit mesh axes.

Under `jax.jit` with arrays placed by a NamedSharding over Auto mesh axes,
nothing at trace time says how the inputs are split: XLA decides at compile
time, and a pallas_call alone has no rule, so XLA would all-gather q, k and v
and run the whole attention on every device. Here each kernel stage (forward,
decode, backward) is a `jax.experimental.custom_partitioning` op with a
Shardy rule: batch and query heads -- the latter as (kv head, group member),
kv heads major, so a shard keeps whole GQA groups -- pass through; sequence
and head dims, the tables and the captured arrays need replication. The
partition callback reads the shardings Shardy chose and returns the
per-shard computation: the same kernels on local blocks with offsets, a
`psum` of the captured arrays' gradients (and of dk/dv of k/v broadcast over
a sharded batch): the only collectives. A q split along its sequence is
gathered by that rule (documented; context parallelism is its own mode).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
from jax.experimental.custom_partitioning import (
    BATCHING,
    ArrayMapping,
    CompoundFactor,
    SdyShardingRule,
    custom_partitioning,
)
from jax.sharding import NamedSharding, PartitionSpec

from pallas_kernels.spec import KernelSpec, Layout, Mods, index_offsets

__all__ = ["ShardLayout", "local_tables", "partitioned_stages", "use_auto_partitioning"]


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """How q's batch and head dimensions are split over mesh axes, and the axes' sizes."""

    batch_axes: tuple[str, ...]
    head_axes: tuple[str, ...]
    axis_sizes: tuple[tuple[str, int], ...]

    @classmethod
    def from_spec(cls, spec: PartitionSpec, axis_sizes: dict) -> ShardLayout:
        entries = tuple(spec) + (None,) * (4 - len(spec))
        if entries[2] is not None or entries[3] is not None:
            raise NotImplementedError(
                f"q sharded as {spec} splits its sequence or head dim: flex_attention shards "
                "batch and heads (P(batch_axes, head_axes)); sequence sharding is context "
                "parallelism, which this mode does not do"
            )
        return cls(_axes(entries[0]), _axes(entries[1]), tuple(sorted(axis_sizes.items())))

    def count(self, axes: tuple[str, ...]) -> int:
        sizes = dict(self.axis_sizes)
        return math.prod(sizes[a] for a in axes)

    def whole(self, batch: int, q_heads: int) -> tuple[int, int]:
        """The whole (batch, query heads) of a shard's (batch, q_heads)."""
        return batch * self.count(self.batch_axes), q_heads * self.count(self.head_axes)

    def position(self, axes: tuple[str, ...]):
        """This device's index among the shards of `axes` (row-major, as PartitionSpec splits)."""
        return lax.axis_index(axes) if axes else 0

    def offsets(self, batch: int, q_heads: int):
        """The int32[4] index offsets of this shard: (b0, h0, 0, 0)."""
        b0 = self.position(self.batch_axes) * batch
        h0 = self.position(self.head_axes) * q_heads
        return index_offsets(b=b0, h=h0)

    @property
    def sharded_axes(self) -> tuple[str, ...]:
        return self.batch_axes + self.head_axes

    def entry(self, axes: tuple[str, ...]):
        """A PartitionSpec entry for `axes`: None, one name, or a tuple of names."""
        return None if not axes else axes[0] if len(axes) == 1 else axes


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def local_table(table, axis: int, local: int, axes, layout: ShardLayout, what: str):
    """A table's block for this shard along `axis` (batch or heads): sliced when it is whole."""
    size, shards = table.shape[axis], layout.count(axes)
    if size == 1 or size == local:
        return table  # broadcast, or already this shard's block
    if size != local * shards:
        raise ValueError(
            f"block_mask {what} dimension is {size}; with q's {what} split {shards} ways "
            f"({local} per shard) it must be 1, {local} (this shard's) or {local * shards} (whole)"
        )
    start = layout.position(axes) * local
    return lax.dynamic_slice_in_dim(table, start, local, axis=axis)


def local_tables(tables, layout: ShardLayout, batch: int, q_heads: int):
    """Every table of a pytree (None kept) cut to this shard's batches and heads."""

    def cut(t):
        t = local_table(t, 0, batch, layout.batch_axes, layout, "batch")
        return local_table(t, 1, q_heads, layout.head_axes, layout, "heads")

    return jax.tree.map(cut, tables)


# ---------------------------------------------------------------------------- Auto axes


def use_auto_partitioning() -> bool:
    """Whether kernel stages go through custom_partitioning: several devices, not inside a shard_map."""
    if len(jax.devices()) < 2:
        return False
    mesh = jax.sharding.get_abstract_mesh()
    manual = jax.sharding.AxisType.Manual
    return not any(t == manual for t in mesh.axis_types)


def _batch_heads(x, layout: Layout) -> tuple[int, int]:
    """(batch, heads) of a 4-d array in `layout`."""
    shape = x.shape
    return (shape[0], shape[1]) if layout is Layout.BHSD else (shape[0], shape[2])


def _local_spec(spec: KernelSpec, q, k) -> KernelSpec:
    B, Hq = _batch_heads(q, spec.layout)
    Bkv, Hkv = _batch_heads(k, spec.layout)
    return dataclasses.replace(spec, B=B, Hq=Hq, Bkv=Bkv, Hkv=Hkv, global_offsets=True)


def _layout_of(arg_sharding, mesh, ndim: int, layout: Layout) -> ShardLayout:
    """How q's last four dims (a vmap may have added leading ones) are split, read in BHSD order."""
    spec = tuple(arg_sharding.spec) + (None,) * (ndim - len(arg_sharding.spec))
    b, x1, x2, d = spec[ndim - 4 :]
    heads, seq = (x1, x2) if layout is Layout.BHSD else (x2, x1)
    return ShardLayout.from_spec(PartitionSpec(b, heads, seq, d), dict(mesh.shape))


def _over_leading(fn, lead: int):
    """fn on arrays with `lead` extra leading dims (a vmap's): vmapped over them."""
    for _ in range(lead):
        fn = jax.vmap(fn)
    return fn


def _vmappable(op):
    """op under jax.vmap: every operand given the vmapped dim in front, op called on that.

    custom_partitioning has no batching rule; the stages accept leading dims
    instead (their Shardy rules carry them as BATCHING dims, and each shard
    vmaps its kernels over them). An operand the vmap does not batch is
    broadcast (a copy: vmap q, k and v together).
    """

    @jax.custom_batching.custom_vmap
    def call(*args):
        return op(*args)

    @call.def_vmap
    def rule(axis_size, in_batched, *args):
        leaves, tree = jax.tree.flatten(args)
        flags = jax.tree.leaves(in_batched)
        leaves = [
            x if batched else jax.numpy.broadcast_to(x, (axis_size, *x.shape))
            for x, batched in zip(leaves, flags, strict=True)
        ]
        out = call(*jax.tree.unflatten(tree, leaves))
        return out, jax.tree.map(lambda _: True, out)

    return call


def _rule(spec: KernelSpec, bwd: bool):
    """The Shardy rule of a stage: q, k, v (and do, lse, delta) map to factors, the rest replicate.

    Query heads are the compound (kv head, group member), kv heads major; the
    group member factor, the sequences and head dims need replication, so
    only batch and whole GQA groups of heads are ever split. With one kv head
    (MQA) the query heads split alone and k/v stay whole. Shardy refuses a
    compound factor of size 1, hence the three forms.
    """
    G, mqa = spec.group_size, spec.Hkv == 1 and spec.group_size > 1
    heads = "g" if mqa else CompoundFactor("hk", "g") if G > 1 else "hk"

    def array(b, h, seq, dim):  # BATCHING ("...") stands for the leading dims a vmap adds
        return ArrayMapping(BATCHING, *spec.layout.shape(b, h, seq, dim))

    q_map, out_map = array("b", heads, "l", "d"), array("b", heads, "l", "e")
    row_map = ArrayMapping(BATCHING, *spec.layout.shape("b", heads, "l", None)[:3])
    kv_b = "b" if spec.Bkv == spec.B else "bk"  # k/v broadcast over the batch: never split
    k_map, v_map = array(kv_b, "hk", "s", "d"), array(kv_b, "hk", "s", "e")
    fixed = [q_map, k_map, v_map] + ([out_map, row_map, row_map] if bwd else [])

    def rule(mesh, value_types, result_types):
        lead = len(value_types[0].shape) - 4  # dims a vmap added in front of every operand
        need = ["l", "d", "s", "e"] + (["bk"] if kv_b == "bk" else [])
        need += ["hk"] if mqa else ["g"] if G > 1 else []

        def own(prefix, shape):  # an array of its own factors, all replicated
            names = tuple(f"{prefix}{j}" for j in range(len(shape) - lead))
            need.extend(names)
            return ArrayMapping(BATCHING, *names)

        rest = value_types[len(fixed) :]
        operands = fixed + [own(f"x{i}_", t.shape) for i, t in enumerate(rest)]
        if bwd:
            grads = result_types[3:]
            results = [q_map, k_map, v_map] + [own(f"y{i}_", t.shape) for i, t in enumerate(grads)]
        else:
            results = [out_map, row_map]
        order = []
        for mapping in (*operands, *results):
            for dim in mapping[1:]:  # after BATCHING
                for factor in dim if isinstance(dim, CompoundFactor) else (dim,):
                    if factor not in order:
                        order.append(factor)
        need = sorted(set(need) & set(order), key=order.index)  # Shardy wants first-seen order
        sizes = {"g": G} if G > 1 and not mqa else {}
        return SdyShardingRule(
            tuple(operands), tuple(results), need_replication_factors=tuple(need), **sizes
        )

    return rule


@functools.lru_cache(maxsize=256)
def partitioned_stages(backend, spec: KernelSpec, programs: tuple, cfgs, options: tuple):
    """(forward, decode or None, backward) of one call as custom_partitioning ops.

    forward(q, k, v, tables, score_consts, mask_consts) -> (out, lse);
    backward(q, k, v, do, lse, delta, tables, score_consts, mask_consts,
    grad_slots) -> (dq, dk, dv, captured-array gradients). options: the
    backend's kernel_options as sorted pairs (a shard's decode config is
    recomputed for its sizes).
    """

    def mods_of(score_consts, mask_consts):
        return Mods(*programs, tuple(score_consts), tuple(mask_consts))

    def forward_stage(decode: bool):
        def one(q, k, v, tables, score_consts, mask_consts):
            mods = mods_of(score_consts, mask_consts)
            if decode:
                return backend.decode(q, k, v, tables.rows, mods, None, spec=spec, cfg=cfgs.decode)
            return backend.fwd(q, k, v, tables.rows, mods, None, spec=spec, cfg=cfgs.fwd)

        op = custom_partitioning(lambda q, *rest: _over_leading(one, q.ndim - 4)(q, *rest))

        def partition(mesh, arg_shapes, result_shape):
            shardings = jax.tree.map(lambda a: a.sharding, arg_shapes)
            ndim = len(arg_shapes[0].shape)
            layout = _layout_of(shardings[0], mesh, ndim, spec.layout)

            def shard(q, k, v, tables, score_consts, mask_consts):
                local = _local_spec(spec, q, k)
                mods = mods_of(score_consts, mask_consts)
                t = local_tables(tables, layout, local.B, local.Hq)
                off = layout.offsets(local.B, local.Hq)
                if decode:
                    cfg = backend.configs(local, mods, dict(options), True).decode
                    return backend.decode(q, k, v, t.rows, mods, off, spec=local, cfg=cfg)
                return backend.fwd(q, k, v, t.rows, mods, off, spec=local, cfg=cfgs.fwd)

            q_spec = tuple(shardings[0].spec) + (None,) * (ndim - len(shardings[0].spec))
            outs = (NamedSharding(mesh, PartitionSpec(*q_spec[: ndim - 1])),) * 2
            return mesh, _over_leading(shard, ndim - 4), outs, shardings

        op.def_partition(partition=partition, sharding_rule=_rule(spec, bwd=False))
        return _vmappable(op)

    def backward_stage(grad_slots: tuple):
        def one(q, k, v, do, lse, delta, tables, score_consts, mask_consts):
            mods = mods_of(score_consts, mask_consts)
            return backend.bwd(
                q, k, v, do, lse, delta, tables, mods, None, spec=spec, cfg=cfgs.bwd,
                grad_slots=grad_slots,
            )  # fmt: skip

        op = custom_partitioning(lambda q, *rest: _over_leading(one, q.ndim - 4)(q, *rest))

        def partition(mesh, arg_shapes, result_shape):
            shardings = jax.tree.map(lambda a: a.sharding, arg_shapes)
            ndim = len(arg_shapes[0].shape)
            layout = _layout_of(shardings[0], mesh, ndim, spec.layout)

            def shard(q, k, v, do, lse, delta, tables, score_consts, mask_consts):
                local = _local_spec(spec, q, k)
                mods = mods_of(score_consts, mask_consts)
                t = local_tables(tables, layout, local.B, local.Hq)
                off = layout.offsets(local.B, local.Hq)
                dq, dk, dv, grads = backend.bwd(
                    q, k, v, do, lse, delta, t, mods, off, spec=local, cfg=cfgs.bwd,
                    grad_slots=grad_slots,
                )  # fmt: skip
                if kv_summed:  # k/v whole along axes that split q: sum their partial grads
                    dk, dv = (lax.psum(x, kv_summed) for x in (dk, dv))
                if layout.sharded_axes:
                    grads = [lax.psum(g, layout.sharded_axes) for g in grads]
                return dq, dk, dv, grads

            kv_axes = {a for entry in shardings[1].spec for a in _axes(entry)}
            kv_summed = tuple(a for a in layout.sharded_axes if a not in kv_axes)
            q_spec = tuple(shardings[0].spec) + (None,) * (ndim - len(shardings[0].spec))
            lead = PartitionSpec(*q_spec[: ndim - 4])  # vmapped dims: split like q's
            grads = [NamedSharding(mesh, lead) for _ in grad_slots]
            outs = (shardings[0], shardings[1], shardings[2], grads)
            return mesh, _over_leading(shard, ndim - 4), outs, shardings

        op.def_partition(partition=partition, sharding_rule=_rule(spec, bwd=True))
        return _vmappable(op)

    forward = forward_stage(False)
    decode = forward_stage(True) if cfgs.decode is not None else None
    return forward, decode, functools.lru_cache(maxsize=32)(backward_stage)
