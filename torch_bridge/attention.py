"""flex_attention for torch tensors: flexjax's kernels behind a torch.autograd.Function.

The forward converts the tensors to jax arrays (DLPack, no copy), runs
`jax.vjp` of `flexjax.flex_attention` (the custom_vjp of the Pallas kernels)
and returns torch views of the results; the backward feeds torch's gradients
to the saved pullback and returns its results as torch tensors. Torch tensors
captured by the mods become jax arrays; floating ones that require grad are
inputs of the vjp, so a learnable bias gets its `.grad` like q, k and v.

The tensors and outputs are also saved with `ctx.save_for_backward`: the
pullback reads the same memory, and torch's version counter then refuses a
backward after any of them was modified in place, instead of computing wrong
gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import torch

import flexjax
from flexjax import BlockMask
from flexjax.block_mask import DEFAULT_SPARSE_BLOCK_SIZE
from torch_bridge.block_mask import from_torch_block_mask
from torch_bridge.convert import array_to_torch, check_same_device, tensor_to_jax
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


class _FlexAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, need_vjp, query, key, value, *captured):
        jax_in = [
            tensor_to_jax(t, name)
            for t, name in zip((query, key, value), ("query", "key", "value"), strict=True)
        ]
        jax_in += [tensor_to_jax(t, "a captured tensor", False) for t in captured]
        if need_vjp:  # else no pullback (and no residuals) is kept
            (out, lse), pullback = jax.vjp(run, *jax_in)
            ctx.pullback = pullback
        else:
            out, lse = run(*jax_in)
            ctx.pullback = None
        t_out, t_lse = array_to_torch(out), array_to_torch(lse)
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
        d_out, d_lse = tensor_to_jax(d_out, "grad of out"), tensor_to_jax(d_lse, "grad of lse")
        grads = ctx.pullback((d_out, d_lse))
        ctx.pullback = None  # free the residuals
        return (None, None, *(array_to_torch(g) for g in grads))


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
    results (no copy).
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
    diff_ids = [id(t) for t in diff]

    def run(q, k, v, *diff_arrays):
        replaced = dict(arrays)
        replaced.update(zip(diff_ids, diff_arrays, strict=True))
        return flexjax.flex_attention(
            q, k, v,
            score_mod=rebuild(score_mod, replaced),
            block_mask=bm, scale=scale, enable_gqa=enable_gqa,
            return_lse=True, kernel_options=kernel_options,
        )  # fmt: skip

    # Decided here: inside Function.forward grad mode is always off.
    need_vjp = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, *diff))
    args = (run, need_vjp, query, key, value, *diff)
    if device.type == "cuda":
        with torch.cuda.device(device):
            out, lse = _FlexAttentionFunction.apply(*args)
    else:
        out, lse = _FlexAttentionFunction.apply(*args)
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
