"""flex_attention for torch tensors: flexjax's kernels behind a torch.autograd.Function.

The forward converts the tensors to jax arrays (DLPack, no copy), runs
`jax.vjp` of flexjax's jitted call (the custom_vjp of the Pallas kernels)
and returns torch views of the results; the backward feeds torch's gradients
to the saved pullback and returns its results as torch tensors. Torch tensors
captured by the mods become jax arrays; floating ones that require grad are
inputs of the vjp, so a learnable bias gets its `.grad` like q, k and v.

Both directions are jitted and cached by the call's static structure, as
`flexjax.flex_attention` is: the forward returns the pullback itself (a
pytree of residuals, which jit can return), and the backward is a jitted
application of it, so a training step pays two cached dispatches, not an
eager trace of the vjp per call.

The tensors and outputs are also saved with `ctx.save_for_backward`: the
pullback reads the same memory, and torch's version counter then refuses a
backward after any of them was modified in place, instead of computing wrong
gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import torch

import flexjax
from flexjax import BlockMask
from flexjax.api import checked_static_call, jitted_call
from flexjax.block_mask import DEFAULT_SPARSE_BLOCK_SIZE
from flexjax.input_checks import check_score_mod
from pallas_kernels import dispatch
from pallas_kernels.spec import Layout
from torch_bridge.block_mask import from_torch_block_mask
from torch_bridge.convert import (
    arrays_to_torch,
    check_same_device,
    import_checked,
    tensors_to_jax,
)
from torch_bridge.mods import captured_tensors, jax_arrays, rebuild, with_jax_arrays

__all__ = ["create_block_mask", "flex_attention"]


def _jax_captures(fn):
    """({id(tensor): jax array} for the tensors fn captures, the float ones that require grad)."""
    diff = [t for t in captured_tensors(fn) if t.requires_grad and t.is_floating_point()]
    return jax_arrays(fn), diff


def _to_flexjax_block_mask(block_mask, mask_mod):
    """A flexjax BlockMask (its mask_mod's captured arrays are already jax arrays: it traced them)."""
    if block_mask is None or isinstance(block_mask, BlockMask):
        if mask_mod is not None:
            raise ValueError(
                "mask_mod= is only for converting a torch BlockMask; a flexjax BlockMask "
                "already carries its mask_mod"
            )
        return block_mask
    return from_torch_block_mask(block_mask, mask_mod=mask_mod)


@functools.partial(jax.jit, static_argnames=("diff", "static"))
def _forward_and_pullback(q, k, v, consts, block_mask, *, diff, static):
    """(out, lse) and the pullback of (q, k, v, consts[i] for i in diff): one cached dispatch."""

    def call(q, k, v, *diff_consts):
        replaced = list(consts)
        for i, x in zip(diff, diff_consts, strict=True):
            replaced[i] = x
        return jitted_call(q, k, v, tuple(replaced), block_mask, **dict(static))

    (out, lse), pullback = jax.vjp(call, q, k, v, *(consts[i] for i in diff))
    return out, lse, pullback


@jax.jit
def _apply_pullback(pullback, cotangents):
    """The pullback (cached by its structure, which a cached forward keeps) on the cotangents."""
    return pullback(cotangents)


class _FlexAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call, layout, query, key, value, *captured):
        """call(query, key, value, *captured) -> (out, lse, pullback or None): jax arrays.

        With layout BSHD, q/k/v/out and their gradients cross as [B, L, H, D]
        memory (torch sees [B, H, L, D] views of it), lse as [B, L, H].
        """
        ctx.layout = layout
        out, lse, ctx.pullback = call(query, key, value, *captured)
        t_out, t_lse = (_from(layout, x) for x in arrays_to_torch((out, lse), query.device))
        ctx.save_for_backward(query, key, value, *captured, t_out, t_lse)
        return t_out, t_lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        saved = ctx.saved_tensors  # raises if any of them was modified in place
        t_out, t_lse = saved[-2], saved[-1]
        if ctx.pullback is None:
            raise RuntimeError("flex_attention: backward called but no input required grad")
        d_out = torch.zeros_like(t_out) if d_out is None else d_out.to(t_out.dtype)
        d_lse = torch.zeros_like(t_lse) if d_lse is None else d_lse.to(t_lse.dtype)
        layout = ctx.layout
        d_out, d_lse = tensors_to_jax(
            (_to(layout, d_out), _to(layout, d_lse)), ("grad of out", "grad of lse")
        )
        grads = arrays_to_torch(ctx.pullback((d_out, d_lse)), t_out.device)
        ctx.pullback = None  # free the residuals
        return (None, None, *(_from(layout, g) for g in grads[:3]), *grads[3:])


def _jax_inputs(layout: Layout, query, key, value, captured) -> list:
    """q, k, v (in the layout's memory order) and the captured tensors as jax arrays."""
    tensors = [_to(layout, t) for t in (query, key, value)] + list(captured)
    names = ["query", "key", "value"] + ["a captured tensor"] * len(captured)
    return tensors_to_jax(tensors, names, float_only=[True] * 3 + [False] * len(captured))


def _to(layout: Layout, t: torch.Tensor) -> torch.Tensor:
    """t [B, H, L, ...] as the layout's memory order (a view: no copy for a matching tensor)."""
    return t.transpose(1, 2) if layout is Layout.BSHD else t


_from = _to  # the transpose is its own inverse


def _layout_of(*tensors: torch.Tensor) -> Layout:
    """BSHD when every tensor is a [B, H, L, D] view of [B, L, H, D] memory (as transformers'
    `.view(B, L, H, D).transpose(1, 2)` makes), so no copy is made; else BHSD."""
    if all(t.dim() == 4 and t.transpose(1, 2).is_contiguous() for t in tensors) and not all(
        t.is_contiguous() for t in tensors
    ):
        return Layout.BSHD
    return Layout.BHSD


class _WithUnusedZeros:
    """A pullback whose gradients also cover captured tensors the score_mod never reads (zeros)."""

    def __init__(self, pullback, places, diff_arrays):
        self.pullback, self.places, self.diff_arrays = pullback, places, diff_arrays

    def __call__(self, cotangents):
        grads = iter(_apply_pullback(self.pullback, cotangents))
        q, k, v = next(grads), next(grads), next(grads)
        const_grads = [
            jnp.zeros_like(x) if i is None else next(grads)
            for i, x in zip(self.places, self.diff_arrays, strict=True)
        ]
        return q, k, v, *const_grads


def flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Callable | None = None,
    block_mask=None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: dict | None = None,
    mask_mod: Callable | None = None,
):
    """`flexjax.flex_attention` on torch tensors (CPU or CUDA), differentiable with autograd.

    query [B, Hq, L, E], key [B|1, Hkv, S, E], value [B|1, Hkv, S, Ev]:
    float16, bfloat16 or float32 tensors on one device. score_mod and the
    block mask's mask_mod are jnp functions; the arrays they capture may be
    torch tensors (a captured float tensor with requires_grad gets a
    gradient) or jax arrays. block_mask: a flexjax BlockMask, or a torch
    BlockMask together with `mask_mod=`, its jnp equivalent (needed when it has
    partial blocks). Returns torch tensors on the inputs' device: out, and
    with return_lse also lse (float32). Outputs share memory with JAX's
    results (no copy). Tensors that are [B, H, L, D] views of [B, L, H, D]
    memory (`x.view(B, L, H, D).transpose(1, 2)`, as attention layers make
    them) run in that layout, without a copy; out then is such a view too.
    Under `torch.use_deterministic_algorithms(True)` kernel_options["deterministic"]
    defaults to True (bitwise-repeatable dq, dk, dv on every kernel backend).
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    kernel_options = _with_torch_determinism(kernel_options)
    if mask_mod is None and (block_mask is None or isinstance(block_mask, BlockMask)):
        if not captured_tensors(score_mod):
            return _planned_call(
                query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse,
                kernel_options,
            )  # fmt: skip
    return _general_call(
        query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options,
        mask_mod,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Calls whose mods capture no torch tensor: checked once per structure, then a short path
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What the checks decided for one call structure (`_plan_key`), reused by later calls.

    layout: the memory order q/k/v cross in; static: `jitted_call`'s static arguments;
    contiguous: q/k/v are contiguous in that layout (else each call copies them first).
    """

    layout: Layout
    static: dict
    contiguous: bool

    @functools.cached_property
    def static_items(self) -> tuple:
        return tuple(self.static.items())

    def inputs(self, query, key, value) -> list:
        """q, k, v as jax arrays in the plan's layout (no checks: the key stands for them)."""
        if not self.contiguous:
            return _jax_inputs(self.layout, query, key, value, ())
        tensors = [_to(self.layout, t) for t in (query, key, value)]
        return import_checked([t.detach() if t.requires_grad else t for t in tensors])


_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 512  # keys hold shapes, dtypes and mod programs (no arrays); cleared when full


def _plan_key(query, key, value, program, block_mask, scale, enable_gqa, kernel_options):
    """What decides a call's checks and static arguments, or None (then it is checked anew).

    Tensors by shape, strides, dtype and device (so also their layout and contiguity), the
    score_mod by its traced program (its captured arrays are inputs), a BlockMask by its
    mask_mod's program and sizes (its tables are inputs), the options by value, and the
    backend registry. `check_indices` reads the captured values, so it is never skipped.
    """
    if isinstance(kernel_options, dict) and kernel_options.get("check_indices"):
        return None
    tensors = []
    for t in (query, key, value):
        if t.is_nested or t.layout is not torch.strided:
            return None
        tensors.append((t.shape, t.stride(), t.dtype, t.device))
    bm = block_mask
    bm_key = None if bm is None else (bm.mask_program, bm.seq_lengths, bm.BLOCK_SIZE)
    options = None if kernel_options is None else tuple(sorted(kernel_options.items()))
    registry = tuple(dispatch.backends().items())
    plan_key = (*tensors, program, bm_key, scale, enable_gqa, options, registry)
    try:
        hash(plan_key)
    except TypeError:  # an unhashable option value: checked every call
        return None
    return plan_key


def _make_plan(query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options):
    """Every check of the call (errors name the argument), and its plan."""
    device = check_same_device(query=query, key=key, value=value)
    kernel_options = _with_interpret_default(kernel_options, device)
    layout = _layout_of(query, key, value)
    q, k, v = _jax_inputs(layout, query, key, value, ())
    _, static = checked_static_call(
        q, k, v, score_mod, block_mask, scale, enable_gqa, kernel_options, layout=layout
    )
    contiguous = all(_to(layout, t).is_contiguous() for t in (query, key, value))
    return _Plan(layout, static, contiguous)


def _planned_call(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse,
                  kernel_options):  # fmt: skip
    program, consts = check_score_mod(score_mod)  # cached by the mod's signature
    consts = tuple(consts)
    plan_key = _plan_key(query, key, value, program, block_mask, scale, enable_gqa, kernel_options)
    plan = None if plan_key is None else _PLANS.get(plan_key)
    if plan is None:
        plan = _make_plan(query, key, value, score_mod, block_mask, scale, enable_gqa,
                          kernel_options)  # fmt: skip
        if plan_key is not None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[plan_key] = plan
    layout = plan.layout
    need_vjp = torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad
    )
    if not need_vjp:  # no autograd node, and lse crosses back only when asked for
        out, lse = jitted_call(*plan.inputs(query, key, value), consts, block_mask, **plan.static)
        results = arrays_to_torch((out, lse) if return_lse else (out,), query.device)
        results = [_from(layout, x) for x in results]
        return tuple(results) if return_lse else results[0]

    def call(query, key, value):
        q, k, v = plan.inputs(query, key, value)
        out, lse, pullback = _forward_and_pullback(
            q, k, v, consts, block_mask, diff=(), static=plan.static_items
        )
        return out, lse, functools.partial(_apply_pullback, pullback)

    out, lse = _FlexAttentionFunction.apply(call, layout, query, key, value)
    return (out, lse) if return_lse else out


def _with_torch_determinism(kernel_options):
    """kernel_options with "deterministic": True when torch asks for deterministic algorithms
    and the caller did not say (torch users' switch for it, as XLA_FLAGS is JAX users')."""
    if not torch.are_deterministic_algorithms_enabled():
        return kernel_options
    if kernel_options is not None and not isinstance(kernel_options, dict):
        return kernel_options  # (the API's own check says what is wrong with it)
    if kernel_options is not None and "deterministic" in kernel_options:
        return kernel_options
    return {**(kernel_options or {}), "deterministic": True}


def _with_interpret_default(kernel_options, device: torch.device) -> dict:
    """The tensors' device decides interpret mode, not JAX's default one: CPU tensors on a GPU
    machine run the kernels in interpret mode."""
    kernel_options = dict(kernel_options or {})
    kernel_options.setdefault("interpret", device.type != "cuda")
    return kernel_options


# ---------------------------------------------------------------------------------------------
# Calls whose mods capture torch tensors (a captured parameter may need a gradient)
# ---------------------------------------------------------------------------------------------


def _general_call(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse,
                  kernel_options, mask_mod):  # fmt: skip
    """The call with every check, its torch captures converted (and differentiable)."""
    device = check_same_device(query=query, key=key, value=value)
    kernel_options = _with_interpret_default(kernel_options, device)
    bm = _to_flexjax_block_mask(block_mask, mask_mod)
    arrays, diff = _jax_captures(score_mod)
    # Decided here: inside Function.forward grad mode is always off.
    need_vjp = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, *diff))

    def call(query, key, value, *diff_tensors):
        q, k, v, *diff_arrays = _jax_inputs(layout, query, key, value, diff_tensors)
        replaced = dict(arrays)
        replaced.update(zip(map(id, diff), diff_arrays, strict=True))
        consts, static = checked_static_call(
            q, k, v, rebuild(score_mod, replaced), bm, scale, enable_gqa, kernel_options,
            layout=layout,
        )  # fmt: skip
        if not need_vjp:  # no pullback, so no residuals are kept
            return *jitted_call(q, k, v, tuple(consts), bm, **static), None
        # The captured tensors that need a gradient, by their place among the mod's arrays.
        places = [next((i for i, c in enumerate(consts) if c is x), None) for x in diff_arrays]
        diff_places = tuple(i for i in places if i is not None)
        out, lse, pullback = _forward_and_pullback(
            q, k, v, tuple(consts), bm, diff=diff_places, static=tuple(static.items())
        )
        return out, lse, _WithUnusedZeros(pullback, places, diff_arrays)

    layout = _layout_of(query, key, value)
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        if not need_vjp:  # no autograd node, and lse crosses back only when asked for
            out, lse, _ = call(query, key, value, *diff)
            out, lse = (_from(layout, x) for x in arrays_to_torch((out, lse), device))
            return (out, lse) if return_lse else out
        out, lse = _FlexAttentionFunction.apply(call, layout, query, key, value, *diff)
    return (out, lse) if return_lse else out


def create_block_mask(
    mask_mod: Callable,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: str | torch.device = "cpu",
    BLOCK_SIZE: int | tuple[int, int] = DEFAULT_SPARSE_BLOCK_SIZE,
) -> BlockMask:
    """`flexjax.create_block_mask` for a jnp mask_mod that may capture torch tensors.

    The tables are built on the JAX device matching `device` (torch's naming:
    "cpu", "cuda", "cuda:1"), and the returned BlockMask's mask_mod uses jax
    arrays, ready for `torch_bridge.flex_attention`.
    """
    dev = torch.device(device)
    jax_mask_mod = with_jax_arrays(mask_mod)
    platform = "gpu" if dev.type == "cuda" else "cpu"
    target = jax.devices(platform)[dev.index or 0]
    with jax.default_device(target):  # build there too, not only store there
        return flexjax.create_block_mask(
            jax_mask_mod, B, H, Q_LEN, KV_LEN, device=target, BLOCK_SIZE=BLOCK_SIZE
        )
