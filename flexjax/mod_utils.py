"""How flexjax calls a user's mod: signature checks, tracing, and the b/h/q/kv vmap.

A mod is written for one score element, exactly as in PyTorch: every index
argument is a scalar int32 array, so `intervals[image_idx][0]` means what it
says. `traced_mod` checks a mod and traces it on scalars into a program plus
its captured arrays (`pallas_kernels.mod_trace`): the kernels evaluate that
program on tiles, and BlockMasks carry it as data. `vmap_bhqkv` lifts a
scalar mod over whole index ranges; the dense reference, `create_mask` and
`create_block_mask` evaluate mods that way.
"""

from __future__ import annotations

import enum
import inspect
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.mod_trace import ModProgram, ModTraceError, mod_name, trace_mod

__all__ = [
    "ModKind",
    "and_masks",
    "get_mod_kind",
    "mod_name",
    "noop_mask",
    "or_masks",
    "register_mod_converter",
    "traced_mod",
    "vmap_bhqkv",
]


class ModKind(enum.Enum):
    SCORE_MOD = 5  # score_mod(score, b, h, q_idx, kv_idx)
    MASK_MOD = 4  # mask_mod(b, h, q_idx, kv_idx)


def _num_required_positional(fn: Callable) -> int:
    if isinstance(fn, types.FunctionType) and not fn.__code__.co_flags & inspect.CO_VARARGS:
        # the common case, read off the code object (inspect.signature costs ~0.1 ms)
        return fn.__code__.co_argcount - len(fn.__defaults__ or ())
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError) as e:
        raise TypeError(f"cannot read the signature of mod {mod_name(fn)}: {e}") from e
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        raise TypeError(
            f"mod {mod_name(fn)} takes *args; write it with explicit arguments: "
            "score_mod(score, b, h, q_idx, kv_idx) or mask_mod(b, h, q_idx, kv_idx)"
        )
    return sum(
        1
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    )


def get_mod_kind(fn: Callable) -> ModKind:
    """5 required positional arguments make a score_mod, 4 a mask_mod (PyTorch's rule)."""
    if not callable(fn):
        raise TypeError(f"a mod must be callable, got {type(fn).__name__}: {fn!r}")
    n = _num_required_positional(fn)
    if n == 5:
        return ModKind.SCORE_MOD
    if n == 4:
        return ModKind.MASK_MOD
    raise TypeError(
        f"mod {mod_name(fn)} takes {n} required positional arguments; expected 5 for a "
        "score_mod(score, b, h, q_idx, kv_idx) or 4 for a mask_mod(b, h, q_idx, kv_idx)"
    )


def check_mod_kind(fn: Callable, expected: ModKind, argname: str) -> None:
    kind = get_mod_kind(fn)
    if kind is not expected:
        want = "score_mod(score, b, h, q_idx, kv_idx)"
        if expected is ModKind.MASK_MOD:
            want = "mask_mod(b, h, q_idx, kv_idx)"
        raise TypeError(
            f"{argname} must be a {want}; {mod_name(fn)} takes {kind.value} positional arguments"
        )


def vmap_bhqkv(fn: Callable, kind: ModKind) -> Callable:
    """Lift a scalar mod over (b, h, q_idx, kv_idx) axes, PyTorch's `_vmap_for_bhqkv`.

    The lifted mask_mod takes b: [B], h: [H], q_idx: [Q], kv_idx: [KV] and returns
    [B, H, Q, KV]; the lifted score_mod also takes score: [B, H, Q, KV] first.
    Any of the four index arrays may be a 0-d scalar instead: that axis is then
    not mapped (the kernels pass a scalar b and h and vectors for q and kv).
    """
    has_score = kind is ModKind.SCORE_MOD
    fn = convert_mod(fn)

    def lifted(*args):
        f = fn
        idx_args = args[1:] if has_score else args
        # Innermost vmap first: kv, then q, h, b.
        for pos in (3, 2, 1, 0):
            if jnp.ndim(idx_args[pos]) == 0:
                continue
            axes = [None] * 4
            axes[pos] = 0
            in_axes = ((0,) if has_score else ()) + tuple(axes)
            f = jax.vmap(f, in_axes=in_axes)
        return f(*args)

    return lifted


def noop_mask(b, h, q_idx, kv_idx):
    """A mask_mod that keeps every score."""
    return jnp.ones((), dtype=jnp.bool_)


def _check_mask_mods(mask_mods, combinator: str) -> None:
    if not mask_mods:
        raise TypeError(f"{combinator} needs at least one mask_mod, got none")
    for i, m in enumerate(mask_mods):
        check_mod_kind(m, ModKind.MASK_MOD, f"{combinator} argument {i}")


def and_masks(*mask_mods: Callable) -> Callable:
    """A mask_mod that keeps a score only where every given mask_mod keeps it."""
    _check_mask_mods(mask_mods, "and_masks")

    def and_mask(b, h, q_idx, kv_idx):
        result = jnp.ones((), dtype=jnp.bool_)
        for m in mask_mods:
            result = result & m(b, h, q_idx, kv_idx)
        return result

    and_mask.__qualname__ = f"and_masks({', '.join(mod_name(m) for m in mask_mods)})"
    return and_mask


def or_masks(*mask_mods: Callable) -> Callable:
    """A mask_mod that keeps a score where any given mask_mod keeps it."""
    _check_mask_mods(mask_mods, "or_masks")

    def or_mask(b, h, q_idx, kv_idx):
        result = jnp.zeros((), dtype=jnp.bool_)
        for m in mask_mods:
            result = result | m(b, h, q_idx, kv_idx)
        return result

    or_mask.__qualname__ = f"or_masks({', '.join(mod_name(m) for m in mask_mods)})"
    return or_mask


# Functions that rewrite a mod before it is traced (e.g. torch_bridge swaps captured
# torch tensors for jax arrays); each returns its argument when it has nothing to do.
_MOD_CONVERTERS: list[Callable] = []


def register_mod_converter(convert: Callable) -> None:
    """Rewrite every mod with `convert(mod) -> mod` before flexjax traces it.

    For frameworks whose arrays a mod may capture but JAX cannot index with a
    traced index: torch_bridge registers one that swaps torch tensors for jax
    arrays sharing their memory, so flexjax.BlockMask, create_block_mask and
    flex_attention accept such mods once torch_bridge is imported.
    """
    if convert not in _MOD_CONVERTERS:
        _MOD_CONVERTERS.append(convert)


def convert_mod(fn: Callable) -> Callable:
    """fn after the registered converters (itself when none applies)."""
    for convert in _MOD_CONVERTERS:
        fn = convert(fn)
    return fn


def traced_mod(fn: Callable, kind: ModKind, argname: str) -> tuple[ModProgram, list]:
    """Check `fn` is a mod of `kind` returning one value per element; its program and captured arrays.

    One trace on scalar inputs (a score_mod's score is float32) does both.
    """
    check_mod_kind(fn, kind, argname)
    fn = convert_mod(fn)
    try:
        program, consts = trace_mod(fn, is_score_mod=kind is ModKind.SCORE_MOD)
    except ModTraceError:
        raise
    except Exception as e:
        raise ModTraceError(
            f"{argname} {mod_name(fn)} failed on scalar int32 indices: {type(e).__name__}: {e}. "
            "A mod computes one element with jnp operations; Python control flow on its "
            "arguments (if, while, int()) cannot be traced: use jnp.where."
        ) from e
    outs = program.jaxpr.outvars
    if len(outs) != 1:
        raise TypeError(f"{argname} {mod_name(fn)} must return one array, got {len(outs)} values")
    aval = outs[0].aval
    if aval.shape != ():
        raise ValueError(
            f"{argname} {mod_name(fn)} must return one value per score element (shape ()), "
            f"got shape {aval.shape}; index arguments are scalars, as in PyTorch"
        )
    if kind is ModKind.MASK_MOD and aval.dtype != jnp.bool_:
        raise TypeError(f"{argname} {mod_name(fn)} must return bool, got {aval.dtype}")
    if kind is ModKind.SCORE_MOD and not jnp.issubdtype(aval.dtype, jnp.floating):
        raise TypeError(f"{argname} {mod_name(fn)} must return a float score, got {aval.dtype}")
    return program, consts
