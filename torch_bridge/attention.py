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
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import torch

import flexjax
from flexjax import BlockMask
from flexjax.api import checked_static_call, jitted_call
from flexjax.block_mask import DEFAULT_SPARSE_BLOCK_SIZE
from pallas_kernels.spec import Layout
from torch_bridge.block_mask import from_torch_block_mask
from torch_bridge.convert import array_to_torch, check_same_device, tensors_to_jax
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
        """call(q, k, v, captured arrays) -> (out, lse, pullback or None): jax arrays.

        With layout BSHD, q/k/v/out and their gradients cross as [B, L, H, D]
        memory (torch sees [B, H, L, D] views of it), lse as [B, L, H].
        """
        ctx.layout = layout
        out, lse, ctx.pullback = call(*_jax_inputs(layout, query, key, value, captured))
        t_out, t_lse = (_from(layout, array_to_torch(x)) for x in (out, lse))
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
        grads = [array_to_torch(g) for g in ctx.pullback((d_out, d_lse))]
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
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    device = check_same_device(query=query, key=key, value=value)
    kernel_options = dict(kernel_options or {})
    # The tensors' device decides, not JAX's default one: CPU tensors on a GPU machine
    # run the kernels in interpret mode.
    kernel_options.setdefault("interpret", device.type != "cuda")
    bm = _to_flexjax_block_mask(block_mask, mask_mod)
    arrays, diff = _jax_captures(score_mod)
    # Decided here: inside Function.forward grad mode is always off.
    need_vjp = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, *diff))

    def call(q, k, v, *diff_arrays):
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
            out, lse, _ = call(*_jax_inputs(layout, query, key, value, diff))
            out = _from(layout, array_to_torch(out))
            return (out, _from(layout, array_to_torch(lse))) if return_lse else out
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
