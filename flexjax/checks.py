"""The checked mode, `kernel_options={"check_indices": True}`: find a bad index by evaluation.

`pallas_kernels.index_ranges` refuses, before anything runs, every mod whose
index arithmetic can leave a captured array. An index read from data
(`offsets[doc[q_idx]]`) has no range to derive, and the kernels clamp it. In
the checked mode flex_attention first evaluates each mod over every
(b, h, q_idx, kv_idx) of the call in XLA under `jax.experimental.checkify`'s
index checks and raises `ModIndexError` with the first out-of-range index
(the array's shape, the index, the axis). That costs one evaluation of the
mods per score element, in bounded memory (rows of S at a time): a debugging
mode, for the captured arrays a call is given, so they must be concrete
(call it eagerly, outside jit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from pallas_kernels.index_ranges import ModIndexError
from pallas_kernels.mod_trace import ModProgram

__all__ = ["find_bad_index"]

_ELEMENTS_PER_STEP = 1 << 22


def find_bad_index(
    program: ModProgram | None, consts, B: int, H: int, L: int, S: int, traced: bool = False
) -> None:
    """Raise ModIndexError if `program` with `consts` indexes out of range at some (b, h, q, kv).

    traced: the call is being traced (inside jit), where nothing can be raised from data.
    """
    if program is None or not program.const_shapes:
        return
    if traced or any(isinstance(c, jax.core.Tracer) for c in consts):
        raise ValueError(
            "kernel_options check_indices=True evaluates the mods on the captured arrays "
            "given; they are traced here (inside jit): call flex_attention eagerly to check"
        )
    mod = program.bind(consts)
    kv = jnp.arange(S, dtype=jnp.int32)
    zero = jnp.float32(0)

    def row(bhq):
        b, h, q = bhq
        args = (b, h, q)
        if program.is_score_mod:
            return jax.vmap(lambda kv: mod(zero, *args, kv).astype(jnp.float32))(kv)
        return jax.vmap(lambda kv: mod(*args, kv).astype(jnp.float32))(kv)

    def run():
        grid = jnp.meshgrid(*(jnp.arange(n, dtype=jnp.int32) for n in (B, H, L)), indexing="ij")
        rows = tuple(g.reshape(-1) for g in grid)
        per_step = max(1, min(B * H * L, _ELEMENTS_PER_STEP // S))
        return jax.lax.map(row, rows, batch_size=per_step)

    err, _ = checkify.checkify(jax.jit(run), errors=checkify.index_checks)()
    message = err.get()
    if message:
        kind = "score_mod" if program.is_score_mod else "mask_mod"
        raise ModIndexError(
            f"{kind} {program.name} (kernel_options check_indices=True, over b < {B}, h < {H}, "
            f"q_idx < {L}, kv_idx < {S}): {message.strip()}"
        )
