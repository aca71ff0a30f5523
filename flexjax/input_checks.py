"""Validation shared by flex_attention and its dense reference.

Every error names the argument, what was expected and what was given.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from flexjax.block_mask import BlockMask
from flexjax.mod_utils import ModKind, traced_mod
from pallas_kernels.index_ranges import check_index_ranges

SUPPORTED_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """Sizes of one flex_attention call: q [B, Hq, L, E], k [Bkv, Hkv, S, E], v [Bkv, Hkv, S, Ev]."""

    B: int
    Hq: int
    L: int
    E: int
    Bkv: int
    Hkv: int
    S: int
    Ev: int

    @property
    def group_size(self) -> int:
        return self.Hq // self.Hkv


def check_qkv(query, key, value, enable_gqa: bool) -> AttentionShape:
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array [B, H, L, E], got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must have 4 dimensions [B, H, L, E], got shape {x.shape}")
        if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
            raise TypeError(
                f"{name} must be float16, bfloat16, float32 or float64, got {jnp.dtype(x.dtype)}"
            )
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            "query, key and value must share one dtype, got "
            f"{query.dtype}, {key.dtype} and {value.dtype}"
        )
    _check_same_device(query, key, value)
    B, Hq, L, E = query.shape
    Bkv, Hkv, S, Ek = key.shape
    Bv, Hv, Sv, Ev = value.shape
    if Ek != E:
        raise ValueError(f"key's head dim must equal query's ({E}), got key shape {key.shape}")
    if (Bv, Hv, Sv) != (Bkv, Hkv, S):
        raise ValueError(
            f"value must have key's [B, H, S] = {(Bkv, Hkv, S)} leading dims, got shape {value.shape}"
        )
    if Bkv not in (1, B):
        raise ValueError(f"key/value batch must be 1 (broadcast) or query's batch {B}, got {Bkv}")
    if min(L, S, E, Ev, B, Hq, Hkv) == 0:
        raise ValueError(
            f"empty inputs are not supported: query {query.shape}, key {key.shape}, value {value.shape}"
        )
    if Hq != Hkv:
        if not enable_gqa:
            raise ValueError(
                f"query has {Hq} heads and key/value {Hkv}; pass enable_gqa=True for "
                "grouped-query attention, or give them the same number of heads"
            )
        if Hq % Hkv != 0:
            raise ValueError(
                f"with enable_gqa, query heads ({Hq}) must be a multiple of key/value heads ({Hkv})"
            )
    return AttentionShape(B=B, Hq=Hq, L=L, E=E, Bkv=Bkv, Hkv=Hkv, S=S, Ev=Ev)


def _check_same_device(*arrays) -> None:
    """Concrete arrays must live on one device set (tracers are placed by the caller's jit)."""
    placed = [x for x in arrays if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)]
    devices = [frozenset(x.devices()) for x in placed]
    if len(set(devices)) > 1:
        names = ", ".join(
            f"{n} on {sorted(str(d) for d in ds)}"
            for n, ds in zip(("query", "key", "value"), devices, strict=False)
        )
        raise ValueError(f"query, key and value must be on the same device(s), got {names}")


def check_scale(scale, E: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(E)
    if isinstance(scale, jax.Array | jax.core.Tracer) and jnp.ndim(scale) == 0:
        raise TypeError("scale must be a Python float (it is baked into the kernel), got an array")
    try:
        value = float(scale)
    except (TypeError, ValueError) as e:
        raise TypeError(f"scale must be a float or None, got {scale!r}") from e
    if not math.isfinite(value):
        raise ValueError(f"scale must be a finite float (or None for 1/sqrt(E)), got {scale!r}")
    return value


def check_score_mod(score_mod):
    """The score_mod's (program, captured arrays), or (None, []) without one."""
    if score_mod is None:
        return None, []
    return traced_mod(score_mod, ModKind.SCORE_MOD, "score_mod")


def check_block_mask(block_mask, shape: AttentionShape) -> None:
    if block_mask is None:
        return
    if not isinstance(block_mask, BlockMask):
        raise TypeError(
            f"block_mask must be a flexjax.BlockMask or None, got {type(block_mask).__name__}"
            " (torch BlockMasks go through torch_bridge)"
        )
    nb = block_mask.kv_num_blocks
    if nb.ndim != 3:
        raise ValueError(
            f"block_mask tables must be [B, H, R]; got kv_num_blocks of shape {nb.shape}"
        )
    Bm, Hm, R = nb.shape
    if Bm not in (1, shape.B):
        raise ValueError(
            f"block_mask batch must be 1 (broadcast) or query's batch {shape.B}, got {Bm}"
        )
    if Hm not in (1, shape.Hq):
        raise ValueError(
            f"block_mask heads must be 1 (broadcast) or the number of query heads {shape.Hq}, "
            f"got {Hm}"
        )
    if tuple(block_mask.seq_lengths) != (shape.L, shape.S):
        raise ValueError(
            f"block_mask was created for (Q_LEN, KV_LEN) = {tuple(block_mask.seq_lengths)} but "
            f"query has L={shape.L} and key S={shape.S}; create a block mask for these lengths"
        )
    q_bs, kv_bs = block_mask.BLOCK_SIZE
    C = block_mask.kv_indices.shape[-1]
    if R * q_bs < shape.L or C * kv_bs < shape.S:
        raise ValueError(
            f"block_mask tables ({R} x {C} blocks of {q_bs} x {kv_bs}) do not cover "
            f"L={shape.L}, S={shape.S}"
        )


def check_mod_indices(score_program, block_mask, B: int, H: int, L: int, S: int) -> None:
    """Refuse mods that can index a captured array out of its range (`pallas_kernels.index_ranges`).

    B, H, L, S: the whole call's sizes (the ranges of b, h, q_idx, kv_idx).
    """
    check_index_ranges(score_program, B, H, L, S)
    if isinstance(block_mask, BlockMask):
        check_index_ranges(block_mask.mask_program, B, H, L, S)
