"""BlockMask: which (q block, kv block) tiles attention must visit, PyTorch's layout.

For each batch, head and q-block row the mask lists the kv blocks to visit, in
two groups: *partial* blocks (`kv_num_blocks`, `kv_indices`), where the kernel
must evaluate `mask_mod` element by element, and *full* blocks
(`full_kv_num_blocks`, `full_kv_indices`), where every element is kept and the
kernel skips `mask_mod`. Blocks in neither group are empty and cost nothing.
The transposed tables (`q_num_blocks`, `q_indices`, and the full ones) list, per
kv-block column, the q blocks that see it: the dk/dv backward walks them.

Index tables have PyTorch's exact layout: `kv_indices[b, h, row]` holds the
selected columns in ascending order, followed by the unselected ones in
ascending order (a stable descending argsort of the dense block row), so tables
compare element for element with `torch.nn.attention.flex_attention.BlockMask`.

`BlockMask` is a JAX pytree. Its mask_mod is kept as data (`pallas_kernels.
mod_trace`): a traced program, static and hashed by its code, plus the arrays
it captures. The leaves are the eight tables and those captured arrays;
`seq_lengths`, `BLOCK_SIZE` and the program are static. So a BlockMask
rebuilt every step from a new closure over new values of the same shapes
(a packed batch's document ids) is the same pytree structure, and the user's
`jax.jit` does not retrace.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from flexjax.mod_utils import ModKind, convert_mod, noop_mask, traced_mod
from pallas_kernels.mod_trace import ModProgram
from pallas_kernels.spec import BlockTables

__all__ = ["DEFAULT_SPARSE_BLOCK_SIZE", "BlockMask"]

# PyTorch's `_DEFAULT_SPARSE_BLOCK_SIZE`: a 128x128 tile per block-table entry.
DEFAULT_SPARSE_BLOCK_SIZE = 128

_TABLE_NAMES = BlockTables._fields


def parse_block_size(block_size, argname: str = "BLOCK_SIZE") -> tuple[int, int]:
    """An int or a (Q_BLOCK_SIZE, KV_BLOCK_SIZE) pair of positive ints."""
    if isinstance(block_size, int | np.integer) and not isinstance(block_size, bool):
        pair = (int(block_size), int(block_size))
    elif (
        isinstance(block_size, tuple | list)
        and len(block_size) == 2
        and all(isinstance(x, int | np.integer) and not isinstance(x, bool) for x in block_size)
    ):
        pair = (int(block_size[0]), int(block_size[1]))
    else:
        raise TypeError(
            f"{argname} must be an int or a (Q_BLOCK_SIZE, KV_BLOCK_SIZE) pair of ints, "
            f"got {block_size!r}"
        )
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"{argname} must be positive, got {block_size!r}")
    return pair


def dense_to_ordered(dense: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[..., R, C] 0/1 blocks -> (num_blocks [..., R], indices [..., R, C]), both int32.

    Selected columns come first, in ascending order, then the rest (PyTorch's
    `_dense_to_ordered`: a stable descending argsort).
    """
    dense = dense.astype(jnp.int32)
    num_blocks = jnp.sum(dense, axis=-1, dtype=jnp.int32)
    indices = jnp.argsort(1 - dense, axis=-1, stable=True).astype(jnp.int32)
    return num_blocks, indices


def ordered_to_dense(num_blocks: jax.Array, indices: jax.Array, num_cols: int) -> jax.Array:
    """Inverse of `dense_to_ordered`: (num_blocks [..., R], indices [..., R, E]) -> [..., R, num_cols] int32.

    Only the first `num_blocks` entries of each row count; the rest are ignored.
    """
    *batch, rows, entries = indices.shape
    n = math.prod(batch)
    flat_num = jnp.reshape(num_blocks, (n, rows))
    flat_idx = jnp.reshape(indices, (n, rows, entries))

    def one(num, idx):
        # Entries past num_blocks are sent to a spare column that is cut off after.
        valid = jnp.arange(entries, dtype=jnp.int32)[None, :] < num[:, None]
        cols = jnp.where(valid, idx, num_cols)
        dense = jnp.zeros((rows, num_cols + 1), jnp.int32)
        dense = dense.at[jnp.arange(rows)[:, None], cols].set(1, mode="drop")
        return dense[:, :num_cols]

    return jnp.reshape(jax.vmap(one)(flat_num, flat_idx), (*batch, rows, num_cols))


def transpose_ordered(num_blocks: jax.Array, indices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The per-column view of a per-row table (PyTorch's `_transpose_ordered`)."""
    dense = ordered_to_dense(num_blocks, indices, indices.shape[-1])
    return dense_to_ordered(jnp.swapaxes(dense, -1, -2))


def _is_concrete(x) -> bool:
    return x is None or not isinstance(x, jax.core.Tracer)


@jax.tree_util.register_pytree_node_class
class BlockMask:
    """Block-sparse description of an attention mask (PyTorch's BlockMask, as a pytree).

    Fields (R = number of q blocks, C = number of kv blocks):
      kv_num_blocks, full_kv_num_blocks: [B, H, R] int32
      kv_indices, full_kv_indices:       [B, H, R, C] int32
      q_num_blocks, full_q_num_blocks:   [B, H, C] int32
      q_indices, full_q_indices:         [B, H, C, R] int32
      BLOCK_SIZE: (Q_BLOCK_SIZE, KV_BLOCK_SIZE)
      seq_lengths: (Q_LEN, KV_LEN)
      mask_mod: the mask_mod applied inside partial blocks (assignable, as in
        PyTorch); held as `mask_program` (static) and `mask_consts` (the
        arrays it captures, pytree leaves after the eight tables: a
        `jax.tree.map` over a BlockMask reaches them too; captured Python
        and 0-d scalars are part of the program).
    The full tables may be None (then every listed block is partial). B and H
    may be 1 to broadcast over the batch and the query heads.

    Build one with `create_block_mask` or `BlockMask.from_kv_blocks`.
    """

    def __init__(
        self,
        seq_lengths: tuple[int, int],
        kv_num_blocks: jax.Array,
        kv_indices: jax.Array,
        full_kv_num_blocks: jax.Array | None,
        full_kv_indices: jax.Array | None,
        q_num_blocks: jax.Array | None,
        q_indices: jax.Array | None,
        full_q_num_blocks: jax.Array | None,
        full_q_indices: jax.Array | None,
        BLOCK_SIZE: tuple[int, int],
        mask_mod: Callable,
    ):
        self.seq_lengths = tuple(seq_lengths)
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.full_kv_num_blocks = full_kv_num_blocks
        self.full_kv_indices = full_kv_indices
        self.q_num_blocks = q_num_blocks
        self.q_indices = q_indices
        self.full_q_num_blocks = full_q_num_blocks
        self.full_q_indices = full_q_indices
        self.BLOCK_SIZE = tuple(BLOCK_SIZE)
        self.mask_mod = mask_mod

    # --------------------------------------------------------------- mask_mod
    @property
    def mask_mod(self) -> Callable:
        """The mask_mod: as given, or rebuilt from its program and captured arrays."""
        if self._mask_mod is None:
            program, consts = self.mask_program, self.mask_consts
            self._mask_mod = noop_mask if program is None else program.bind(consts)
        return self._mask_mod

    @mask_mod.setter
    def mask_mod(self, mask_mod: Callable | None) -> None:
        if mask_mod is None or mask_mod is noop_mask:
            self._set_program(None, (), noop_mask)
        else:
            program, consts = traced_mod(mask_mod, ModKind.MASK_MOD, "mask_mod")
            self._set_program(program, consts, convert_mod(mask_mod))

    def _set_program(self, program: ModProgram | None, consts, mask_mod=None) -> None:
        self.mask_program = program  # None: noop_mask
        self.mask_consts = tuple(consts)
        self._mask_mod = mask_mod

    # ----------------------------------------------------------------- pytree
    def tree_flatten(self):
        tables = tuple(getattr(self, name) for name in _TABLE_NAMES)
        return (*tables, self.mask_consts), (self.seq_lengths, self.BLOCK_SIZE, self.mask_program)

    @classmethod
    def tree_unflatten(cls, aux, children):
        seq_lengths, block_size, program = aux
        bm = object.__new__(cls)  # leaves may be anything (tracers, None, sharding specs)
        bm.seq_lengths, bm.BLOCK_SIZE = seq_lengths, block_size
        for name, table in zip(_TABLE_NAMES, children[:-1], strict=True):
            setattr(bm, name, table)
        bm._set_program(program, children[-1])
        return bm

    @classmethod
    def _from_program(
        cls, seq_lengths, tables, BLOCK_SIZE, program, consts, mask_mod=None
    ) -> BlockMask:
        """A BlockMask from tables and an already traced mask_mod (no second trace).

        mask_mod: the function the program was traced from, kept as `mask_mod`.
        """
        bm = cls.tree_unflatten(
            (tuple(seq_lengths), tuple(BLOCK_SIZE), program), (*tables, tuple(consts))
        )
        bm._mask_mod = mask_mod
        return bm

    def kernel_tables(self) -> BlockTables:
        """The eight tables as the kernels take them: int32, none missing.

        Missing full tables become empty ones; missing q tables (a BlockMask
        built with compute_q_blocks=False) are derived, as the backward needs them.
        """
        kv = (self.kv_num_blocks, self.kv_indices)
        if self.full_kv_num_blocks is not None:
            full_kv = (self.full_kv_num_blocks, self.full_kv_indices)
        else:
            full_kv = (jnp.zeros_like(kv[0]), kv[1][..., :1])
        q = (self.q_num_blocks, self.q_indices)
        if q[0] is None:
            q = transpose_ordered(*kv)
        if self.full_kv_num_blocks is None:
            full_q = (jnp.zeros_like(q[0]), q[1][..., :1])
        elif self.full_q_num_blocks is not None:
            full_q = (self.full_q_num_blocks, self.full_q_indices)
        else:
            full_q = transpose_ordered(*full_kv)
        return BlockTables(*(t.astype(jnp.int32) for t in (*kv, *full_kv, *q, *full_q)))

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_kv_blocks(
        cls,
        kv_num_blocks: jax.Array,
        kv_indices: jax.Array,
        full_kv_num_blocks: jax.Array | None = None,
        full_kv_indices: jax.Array | None = None,
        BLOCK_SIZE: int | tuple[int, int] = DEFAULT_SPARSE_BLOCK_SIZE,
        mask_mod: Callable | None = None,
        seq_lengths: tuple[int, int] | None = None,
        compute_q_blocks: bool = True,
    ) -> BlockMask:
        """Build a BlockMask from per-row kv tables; the transposed q tables are derived.

        kv_num_blocks: [..., R] int; kv_indices: [..., R, C] int. `mask_mod=None`
        means `noop_mask`; `seq_lengths=None` means (R * Q_BLOCK_SIZE, C * KV_BLOCK_SIZE).
        """
        kv_num_blocks = jnp.asarray(kv_num_blocks)
        kv_indices = jnp.asarray(kv_indices)
        if kv_indices.ndim < 2:
            raise ValueError(
                f"kv_indices must have at least 2 dimensions [..., R, C], got shape {kv_indices.shape}"
            )
        if kv_num_blocks.shape != kv_indices.shape[:-1]:
            raise ValueError(
                f"kv_num_blocks must have shape kv_indices.shape[:-1] = {kv_indices.shape[:-1]}, "
                f"got {kv_num_blocks.shape}"
            )
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError(
                "full_kv_num_blocks and full_kv_indices must be given together or both omitted"
            )
        if full_kv_num_blocks is not None:
            full_kv_num_blocks = jnp.asarray(full_kv_num_blocks)
            full_kv_indices = jnp.asarray(full_kv_indices)
            if full_kv_indices.shape[:-1] != kv_indices.shape[:-1]:
                raise ValueError(
                    f"full_kv_indices must have shape [{', '.join(map(str, kv_indices.shape[:-1]))}, C], "
                    f"got {full_kv_indices.shape}"
                )
            if full_kv_num_blocks.shape != full_kv_indices.shape[:-1]:
                raise ValueError(
                    f"full_kv_num_blocks must have shape {full_kv_indices.shape[:-1]}, "
                    f"got {full_kv_num_blocks.shape}"
                )
        block_size = parse_block_size(BLOCK_SIZE)
        if seq_lengths is None:
            seq_lengths = (
                kv_indices.shape[-2] * block_size[0],
                kv_indices.shape[-1] * block_size[1],
            )
        else:
            seq_lengths = (int(seq_lengths[0]), int(seq_lengths[1]))

        kv_num_blocks = kv_num_blocks.astype(jnp.int32)
        kv_indices = kv_indices.astype(jnp.int32)
        q_num_blocks = q_indices = full_q_num_blocks = full_q_indices = None
        if compute_q_blocks:
            q_num_blocks, q_indices = transpose_ordered(kv_num_blocks, kv_indices)
        if full_kv_num_blocks is not None:
            full_kv_num_blocks = full_kv_num_blocks.astype(jnp.int32)
            full_kv_indices = full_kv_indices.astype(jnp.int32)
            if compute_q_blocks:
                full_q_num_blocks, full_q_indices = transpose_ordered(
                    full_kv_num_blocks, full_kv_indices
                )
        return cls(
            seq_lengths,
            kv_num_blocks,
            kv_indices,
            full_kv_num_blocks,
            full_kv_indices,
            q_num_blocks,
            q_indices,
            full_q_num_blocks,
            full_q_indices,
            BLOCK_SIZE=block_size,
            mask_mod=mask_mod,
        )

    # ------------------------------------------------------------- accessors
    def as_tuple(self, flatten: bool = True) -> tuple:
        """(Q_LEN, KV_LEN, the eight tables, Q_BLOCK_SIZE, KV_BLOCK_SIZE, mask_mod).

        With flatten=False the lengths and the block size stay pairs.
        """
        tables = tuple(getattr(self, name) for name in _TABLE_NAMES)
        if flatten:
            return (*self.seq_lengths, *tables, *self.BLOCK_SIZE, self.mask_mod)
        return (self.seq_lengths, *tables, self.BLOCK_SIZE, self.mask_mod)

    @property
    def shape(self) -> tuple[int, ...]:
        """(*batch dims, Q_LEN, KV_LEN)."""
        *batch_dims, _, _ = self.kv_indices.shape
        return tuple(batch_dims) + self.seq_lengths

    @property
    def ndim(self) -> int:
        """len(shape): code that handles masks of any kind (transformers' generate) reads it."""
        return len(self.shape)

    def numel(self) -> int:
        """Elements of the mask, not counting sparsity."""
        return math.prod(self.shape)

    def sparsity(self) -> float:
        """100 * (1 - computed blocks' area / numel()): PyTorch's formula.

        Blocks count whole, so with sequences shorter than a block this goes
        negative, as in PyTorch; `density()` clips blocks to the sequences.
        """
        computed = int(np.asarray(self.kv_num_blocks).sum(dtype=np.int64))
        if self.full_kv_num_blocks is not None:
            computed += int(np.asarray(self.full_kv_num_blocks).sum(dtype=np.int64))
        computed_size = computed * self.BLOCK_SIZE[0] * self.BLOCK_SIZE[1]
        return 100 * (1 - computed_size / self.numel())

    def density(self) -> float:
        """Fraction of the Q_LEN x KV_LEN scores inside computed blocks, edge blocks clipped.

        The work the kernels do (1 - sparsity / 100 without the clipping);
        the benchmarks count FLOPs with it. O(blocks), never O(Q_LEN x KV_LEN).
        """
        L, S = self.seq_lengths
        q_bs, kv_bs = self.BLOCK_SIZE
        visited = np.asarray(self.to_dense(), np.float64)  # [..., R, C]
        rows = np.minimum(q_bs, L - q_bs * np.arange(visited.shape[-2]))
        cols = np.minimum(kv_bs, S - kv_bs * np.arange(visited.shape[-1]))
        area = np.einsum("...rc,r,c->...", visited, rows.clip(0), cols.clip(0))
        return float(np.mean(area)) / (L * S)

    def to_dense(self) -> jax.Array:
        """[..., R, C] int32: 1 where a block is visited (partial or full), else 0."""
        num_cols = self.kv_indices.shape[-1]
        dense = ordered_to_dense(self.kv_num_blocks, self.kv_indices, num_cols)
        if self.full_kv_num_blocks is not None:
            dense = dense | ordered_to_dense(
                self.full_kv_num_blocks, self.full_kv_indices, self.full_kv_indices.shape[-1]
            )
        return dense

    def block_kinds(self) -> np.ndarray:
        """[..., R, C] numpy int8: 0 empty, 1 partial, 2 full."""
        num_cols = self.kv_indices.shape[-1]
        kinds = np.asarray(ordered_to_dense(self.kv_num_blocks, self.kv_indices, num_cols))
        kinds = kinds.astype(np.int8)
        if self.full_kv_num_blocks is not None:
            full = np.asarray(
                ordered_to_dense(self.full_kv_num_blocks, self.full_kv_indices, num_cols)
            )
            kinds = np.where(full != 0, np.int8(2), kinds)
        return kinds

    def to_string(self, grid_size: int | tuple[int, int] = (20, 20), limit: int = 4) -> str:
        """The block picture: '██' full, '░░' partial, '  ' empty.

        Rows are q blocks, columns kv blocks; when there are more blocks than
        `grid_size`, each character summarises a group of blocks (full only if
        all are full, empty only if all are empty). `grid_size=-1` prints every
        block. At most `limit` (batch, head) pictures are printed.
        """
        kinds = self.block_kinds()
        *batch_dims, num_rows, num_cols = kinds.shape
        if grid_size == -1:
            max_rows, max_cols = num_rows, num_cols
        elif isinstance(grid_size, int):
            max_rows = max_cols = grid_size
        else:
            max_rows, max_cols = grid_size
        row_step = max(1, -(-num_rows // max_rows))
        col_step = max(1, -(-num_cols // max_cols))

        def picture(batch_idx) -> str:
            grid = kinds[batch_idx]
            lines = [f"{batch_idx}"]
            for r in range(0, num_rows, row_step):
                line = []
                for c in range(0, num_cols, col_step):
                    section = grid[r : r + row_step, c : c + col_step]
                    if (section == 2).all():
                        line.append("██")
                    elif (section == 0).all():
                        line.append("  ")
                    else:
                        line.append("░░")
                lines.append("".join(line))
            return "\n".join(lines) + "\n"

        out = []
        for i, batch_idx in enumerate(itertools.product(*[range(n) for n in batch_dims])):
            if i == limit:
                out.append("...")
                out.append("To print out more, set BlockMask.to_string(limit=N)")
                out.append(
                    "You can also index (BlockMask[batch, head]) to choose a specific batch or head"
                )
                break
            out.append(picture(batch_idx))
        return "\n".join(out)

    def __str__(self) -> str:
        if not all(_is_concrete(getattr(self, n)) for n in _TABLE_NAMES):
            return repr(self)
        s = f"BlockMask(shape={self.shape}, sparsity={self.sparsity():.2f}%, \n"
        s += self.to_string().strip("\n")
        return s + "\n)"

    def __repr__(self) -> str:
        name = "noop_mask" if self.mask_program is None else self.mask_program.name
        return (
            f"BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, "
            f"full_blocks={'yes' if self.full_kv_num_blocks is not None else 'no'}, "
            f"mask_mod={name})"
        )

    # --------------------------------------------------------------- slicing
    def __getitem__(self, index) -> BlockMask:
        """Select batches, heads and q-block rows: `bm[b]`, `bm[b, h]`, `bm[:, :, rows]`.

        Like PyTorch, an integer keeps its dimension (length 1) and `seq_lengths`
        is kept. Unlike PyTorch (which disables it), the mask_mod of the result
        is the original one with its indices mapped back, so a sliced mask still
        computes the same scores: batch b of the result is batch `b_sel[b]` of
        the original, and q index q is q-block row `rows[q // Q_BLOCK_SIZE]`.
        """
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) > 3:
            raise IndexError(
                f"a BlockMask takes at most 3 indices (batch, head, q-block row), got {len(index)}"
            )
        if self.kv_num_blocks.ndim != 3:
            raise IndexError(
                f"indexing needs a BlockMask with [B, H, R] tables, got kv_num_blocks shape "
                f"{self.kv_num_blocks.shape}"
            )
        sizes = self.kv_num_blocks.shape
        padded = (*index, slice(None), slice(None), slice(None))[:3]
        selections = []  # original positions kept, per axis, as numpy int arrays
        for axis, (i, n) in enumerate(zip(padded, sizes, strict=True)):
            positions = np.arange(n)
            if isinstance(i, int | np.integer) and not isinstance(i, bool):
                if not -n <= i < n:
                    raise IndexError(f"index {i} is out of range for axis {axis} of size {n}")
                sel = positions[[int(i)]]
            elif isinstance(i, slice):
                sel = positions[i]
            else:
                arr = np.asarray(i)
                if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
                    raise IndexError(
                        f"BlockMask indices must be ints, slices or integer arrays, got {i!r}"
                    )
                sel = positions[arr.reshape(-1)]
            selections.append(sel)
        np_index = np.ix_(*selections)

        def take(x, ndim_extra):
            if x is None:
                return None
            return x[np_index + (slice(None),) * ndim_extra] if ndim_extra else x[np_index]

        return BlockMask.from_kv_blocks(
            take(self.kv_num_blocks, 0),
            take(self.kv_indices, 1),
            take(self.full_kv_num_blocks, 0),
            take(self.full_kv_indices, 1),
            BLOCK_SIZE=self.BLOCK_SIZE,
            mask_mod=_remap_mask_mod(self.mask_mod, selections, sizes, self.BLOCK_SIZE[0]),
            seq_lengths=self.seq_lengths,
            compute_q_blocks=self.q_indices is not None,
        )


def _remap_mask_mod(mask_mod, selections, sizes, q_block_size):
    """mask_mod of a sliced BlockMask: map new (b, h, q) back to the original ones."""
    b_sel, h_sel, row_sel = selections
    identity = [
        len(sel) == n and (n == 1 or np.array_equal(sel, np.arange(n)))
        for sel, n in zip(selections, sizes, strict=True)
    ]
    if all(identity) or mask_mod is noop_mask:
        return mask_mod
    b_map = None if identity[0] else jnp.asarray(b_sel, jnp.int32)
    h_map = None if identity[1] else jnp.asarray(h_sel, jnp.int32)
    row_map = None if identity[2] else jnp.asarray(row_sel, jnp.int32)

    def sliced_mask_mod(b, h, q_idx, kv_idx):
        if b_map is not None:
            b = b_map[b]
        if h_map is not None:
            h = h_map[h]
        if row_map is not None:
            q_idx = row_map[q_idx // q_block_size] * q_block_size + q_idx % q_block_size
        return mask_mod(b, h, q_idx, kv_idx)

    sliced_mask_mod.__qualname__ = f"sliced({getattr(mask_mod, '__qualname__', mask_mod)})"
    return sliced_mask_mod
