"""torch.Tensor <-> jax.Array through DLPack: no copies, and ordered across CUDA streams.

Both directions use the DLPack *protocol* (`__dlpack__(stream=...)`), never a
bare capsule, so each consumer tells the producer which stream it will read
on: `jax.dlpack.from_dlpack(tensor)` hands torch JAX's stream for external
ready events (torch makes it wait for its pending work on the tensor), and
`torch.from_dlpack(array)` hands JAX torch's current stream (JAX makes it wait
until the array is computed). Memory is shared, not copied; each side keeps
the other's buffer alive.

Attention inputs must be float16, bfloat16 or float32 (the kernels' dtypes):
anything else is refused by name rather than converted (JAX without x64 would
silently turn float64 into a float32 copy). A non-contiguous tensor is made
contiguous first (a copy, and a correct result).
"""

from __future__ import annotations

import jax
import torch

from pallas_kernels.runtime import has_gpu

__all__ = ["ATTENTION_DTYPES", "array_to_torch", "check_same_device", "tensor_to_jax"]

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SUPPORTED_DEVICES = ("cpu", "cuda")


def tensor_to_jax(t: torch.Tensor, argname: str, float_only: bool = True) -> jax.Array:
    """A jax.Array sharing `t`'s memory (t is detached; autograd is the caller's business)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{argname} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested:
        raise TypeError(
            f"{argname} is a nested tensor: pass its packed values ([1, H, total, D]) and a "
            "block mask built from its offsets (see torch_bridge.create_block_mask)"
        )
    if t.device.type not in _SUPPORTED_DEVICES:
        raise ValueError(f"{argname} must be on a cpu or cuda device, got {t.device}")
    if float_only and t.dtype not in ATTENTION_DTYPES:
        raise TypeError(f"{argname} must be float16, bfloat16 or float32, got {t.dtype}")
    if t.dtype == torch.float64 and not jax.config.jax_enable_x64:
        raise TypeError(
            f"{argname} is float64 but JAX runs without x64 (it would become a float32 copy); "
            "convert it to float32 or enable jax_enable_x64"
        )
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.device.type == "cuda" and not has_gpu():
        raise RuntimeError(
            f"{argname} is on {t.device} but this JAX has no GPU backend (install jax[cuda])"
        )
    return jax.dlpack.from_dlpack(t)


def array_to_torch(x: jax.Array) -> torch.Tensor:
    """A torch.Tensor sharing `x`'s memory."""
    return torch.from_dlpack(x)


def check_same_device(**tensors) -> torch.device:
    """All tensors on one device; returns it. Errors name every argument and its device."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{', '.join(devices)} must be on the same device, got {listing}")
    return next(iter(devices.values()))
