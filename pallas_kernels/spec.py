"""What every kernel backend is given: `KernelSpec`, `BlockTables`, `Mods` and the index offsets.

These types belong to no backend. `flexjax.flex_attention` turns a public
call into them (validate, canonicalise, trace the mods) and the dispatch layer
hands them to whichever backend runs the call (`pallas_kernels.dispatch`):

* `KernelSpec`: everything static about the call -- sizes, GQA, broadcasts,
  the BlockMask's block sizes and table shapes, scale, dtype, array layout --
  frozen and hashable, so it can be a static argument of `jax.jit`.
* `BlockTables`: the BlockMask's eight int32 tables by name, with the row
  view (`rows`: kv blocks per q-block row, what the forward and the dq kernel
  walk) and the column view (`cols`: q blocks per kv-block column, what the
  dk/dv kernel walks).
* `Mods`: the traced score_mod / mask_mod programs (static) and the arrays
  they capture (pytree leaves: new values never retrace).
* the index offsets: an int32[4] operand `(b0, h0, q0, kv0)`, the global
  batch, query-head, query and key position of the kernel's first local
  element. Kernels add them to their local indices before a mod runs, so a
  kernel running on a shard of the batch or heads, a chunk of a prompt or a
  decoding step at position p hands the mods the indices the user means.
  They are an ordinary (possibly traced) operand, not static: shard offsets
  come from `lax.axis_index` and decode positions change every step.
  Context parallelism with a load-balancing order scatters a device's q
  blocks over the sequence: then (`KernelSpec.q_map_len`) the operand is
  int32[4 + R], the four offsets followed by the global first row of each
  local q block (`q_block_offsets`); a ring step's K/V chunk adds the
  global first row of each local kv block (`KernelSpec.kv_map_len`).
  The block tables stay local: row r of the tables is the kernel's local q
  block r, and their kv indices address the local K/V.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.mod_trace import ModProgram

__all__ = [
    "BlockTables",
    "KernelSpec",
    "Layout",
    "Mods",
    "TableView",
    "index_offsets",
    "q_block_offsets",
]


class Layout(enum.Enum):
    """How q, k, v and out are laid out in memory; every kernel BlockSpec is built from it."""

    BHSD = "BHSD"  # [batch, heads, sequence, head dim]: PyTorch's and flex_attention's
    BSHD = "BSHD"  # [batch, sequence, heads, head dim]: jax.nn.dot_product_attention's

    def shape(self, batch: int, heads: int, seq: int, dim: int) -> tuple[int, int, int, int]:
        """An array's shape in this layout."""
        if self is Layout.BHSD:
            return (batch, heads, seq, dim)
        return (batch, seq, heads, dim)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelSpec:
    """Everything static about one attention call (local sizes: a shard's, on a mesh).

    q [B, Hq, L, E], k [Bkv, Hkv, S, E], v [Bkv, Hkv, S, Ev] in `layout`'s
    order; the BlockMask tables are [Bm, Hm, R, C] (rows) and [Bm, Hm, C, R]
    (columns) with Bm in {1, B}, Hm in {1, Hq}, R * q_block_size >= L and
    C * kv_block_size >= S. has_partial: the tables list partial blocks (where
    the mask_mod runs); has_full: they list full blocks. interpret: run the
    kernels in Pallas' interpret mode (no GPU). global_offsets: the kernels
    take the index offsets operand and add the offsets the mods use; False
    means they are all zero (a whole, unsharded call), and the kernels are
    built without them. q_map_len: 0, or the global query length when the
    local q blocks are scattered over the sequence (context parallelism with
    a load-balancing order): the offsets operand then has R more entries,
    the global first row of each local q block, and the mods' q indices are
    clamped to q_map_len - 1 (rows of padding blocks). kv_map_len: the same
    for the local kv blocks (a ring step's chunk of K/V): C more entries
    after those, and columns past kv_map_len - 1 are dropped.
    """

    B: int
    Hq: int
    Hkv: int
    L: int
    S: int
    E: int
    Ev: int
    Bkv: int
    mask_batch_broadcast: bool
    mask_head_broadcast: bool
    q_block_size: int
    kv_block_size: int
    R: int
    C: int
    scale: float
    dtype: str
    has_partial: bool
    has_full: bool
    interpret: bool
    layout: Layout = Layout.BHSD
    global_offsets: bool = False
    q_map_len: int = 0
    kv_map_len: int = 0

    def __post_init__(self):
        for name in (
            "B",
            "Hq",
            "Hkv",
            "L",
            "S",
            "E",
            "Ev",
            "Bkv",
            "q_block_size",
            "kv_block_size",
            "R",
            "C",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"KernelSpec.{name}={getattr(self, name)} must be >= 1")
        if self.Hq % self.Hkv:
            raise ValueError(f"KernelSpec: {self.Hq=} must be a multiple of {self.Hkv=}")
        if self.Bkv not in (1, self.B):
            raise ValueError(f"KernelSpec: {self.Bkv=} must be 1 or {self.B=}")
        if self.R * self.q_block_size < self.L or self.C * self.kv_block_size < self.S:
            raise ValueError(
                f"KernelSpec: tables of {self.R} x {self.C} blocks of "
                f"{self.q_block_size} x {self.kv_block_size} do not cover L={self.L}, S={self.S}"
            )
        if (self.q_map_len or self.kv_map_len) and not self.global_offsets:
            raise ValueError(
                "KernelSpec: q_map_len / kv_map_len need global_offsets (maps in them)"
            )
        if not isinstance(self.layout, Layout):
            raise TypeError(f"KernelSpec.layout must be a Layout, got {self.layout!r}")

    @property
    def group_size(self) -> int:
        """G: query heads per kv head (GQA); query head h reads kv head h // G."""
        return self.Hq // self.Hkv

    @property
    def kv_batch_broadcast(self) -> bool:
        """k and v have batch 1 and serve every batch element."""
        return self.Bkv == 1 and self.B > 1

    @property
    def head_dim(self) -> int:
        return max(self.E, self.Ev)


class TableView(NamedTuple):
    """One direction of a BlockMask: for each (batch, head, row) the partial blocks, then the full ones.

    num_blocks [Bm, Hm, N] int32 and indices [Bm, Hm, N, M] int32, where a
    row lists its first num_blocks entries of indices.
    """

    num_blocks: jax.Array
    indices: jax.Array
    full_num_blocks: jax.Array
    full_indices: jax.Array


class BlockTables(NamedTuple):
    """The eight BlockMask tables, int32, in PyTorch's names and order (a pytree)."""

    kv_num_blocks: jax.Array
    kv_indices: jax.Array
    full_kv_num_blocks: jax.Array
    full_kv_indices: jax.Array
    q_num_blocks: jax.Array
    q_indices: jax.Array
    full_q_num_blocks: jax.Array
    full_q_indices: jax.Array

    @property
    def rows(self) -> TableView:
        """Per q-block row, the kv blocks to visit (forward, decode, dq)."""
        return TableView(*self[:4])

    @property
    def cols(self) -> TableView:
        """Per kv-block column, the q blocks that see it (dk/dv)."""
        return TableView(*self[4:])


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Mods:
    """The call's mods as data: traced programs (static) and their captured arrays (leaves).

    score / mask: the programs of score_mod and the BlockMask's mask_mod
    (None: no score_mod; mask_mod is noop or never evaluated). The consts are
    each program's hoisted captured arrays in their original shapes, in the
    program's order (`ModProgram.const_slots`).
    """

    score: ModProgram | None
    mask: ModProgram | None
    score_consts: tuple = ()
    mask_consts: tuple = ()

    def tree_flatten(self):
        return (tuple(self.score_consts), tuple(self.mask_consts)), (self.score, self.mask)

    @classmethod
    def tree_unflatten(cls, programs, consts):
        return cls(*programs, *consts)

    @property
    def programs(self) -> tuple[ModProgram | None, ModProgram | None]:
        return (self.score, self.mask)


def index_offsets(b=0, h=0, q=0, kv=0) -> jax.Array:
    """The int32[4] offsets operand (b0, h0, q0, kv0); each may be a Python int or a traced scalar."""
    return jnp.stack([jnp.asarray(x, jnp.int32).reshape(()) for x in (b, h, q, kv)])


def q_block_offsets(offsets: jax.Array, *block_starts: jax.Array) -> jax.Array:
    """The operand of a call whose local q (then kv) block j starts at global row block_starts[j].

    offsets: int32[4] from `index_offsets`; block_starts: int32[R] for a
    mapped q (spec.q_map_len), then int32[C] for a mapped kv (kv_map_len).
    """
    starts = [jnp.asarray(x, jnp.int32).reshape(-1) for x in block_starts]
    return jnp.concatenate([offsets, *starts])
