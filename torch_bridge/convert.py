"""torch.Tensor <-> jax.Array through DLPack: no copies, and ordered across CUDA streams.

A single tensor or array crosses with the DLPack *protocol*
(`__dlpack__(stream=...)`), so each consumer tells the producer which stream
it will read on: `jax.dlpack.from_dlpack(tensor)` hands torch JAX's stream for
external ready events (torch makes it wait for its pending work on the
tensor), and `torch.from_dlpack(array)` hands JAX torch's current stream (JAX
makes it wait until the array is computed). Memory is shared, not copied;
each side keeps the other's buffer alive.

Attention inputs must be float16, bfloat16 or float32 (the kernels' dtypes):
anything else is refused by name rather than converted (JAX without x64 would
silently turn float64 into a float32 copy). A non-contiguous tensor is made
contiguous first (a copy, and a correct result).

The tensors of one call cross together (`tensors_to_jax`, `import_checked`),
and on a CUDA device with one stream handshake instead of one per tensor:
JAX's stream waits for all work queued on torch's current stream so far, the
first tensor is imported with that stream (its ready event comes after the
wait), the others without one (ready at once). That is as safe as a handshake
per tensor, because they are all inputs of the same computation: XLA waits
for every input's ready event before it starts, so it starts after the first
tensor's, which already covers the work that wrote the others (torch's
protocol only ever synchronises with the current stream). They cross as bare
capsules into jaxlib's import (the public one adds dtype canonicalisation and
placement, which these dtypes do not need, and `__dlpack__` its checks, which
`_checked` made): q, k and v cross in 84 us on an H100 instead of 213 us with
the protocol per tensor (bench/results/traps_h100_2026-11-28.md). The results
go back the same way (`arrays_to_torch`: torch's current stream waits for
them). A JAX without these functions takes the public paths.
"""

from __future__ import annotations

import functools

import jax
import torch
from torch.utils.dlpack import from_dlpack as _torch_from_capsule
from torch.utils.dlpack import to_dlpack

from pallas_kernels.runtime import has_gpu

__all__ = [
    "ATTENTION_DTYPES",
    "array_to_torch",
    "arrays_to_torch",
    "check_same_device",
    "import_checked",
    "tensor_to_jax",
    "tensors_to_jax",
]

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SUPPORTED_DEVICES = ("cpu", "cuda")


def tensor_to_jax(t: torch.Tensor, argname: str, float_only: bool = True) -> jax.Array:
    """A jax.Array sharing `t`'s memory (t is detached; autograd is the caller's business)."""
    return jax.dlpack.from_dlpack(_checked(t, argname, float_only))


def tensors_to_jax(tensors, argnames, float_only: bool | list[bool] = True) -> list[jax.Array]:
    """`tensor_to_jax` of the tensors of one computation, with one stream handshake (see above).

    float_only: for all tensors, or one flag per tensor.
    """
    flags = [float_only] * len(tensors) if isinstance(float_only, bool) else float_only
    pairs = zip(tensors, argnames, flags, strict=True)
    checked = [_checked(t, name, flag) for t, name, flag in pairs]
    if not checked or checked[0].device.type != "cuda" or _import_buffer is None:
        return [jax.dlpack.from_dlpack(t) for t in checked]
    first = checked[0]
    if any(t.device != first.device or t.dtype not in _NATIVE_DTYPES for t in checked):
        return [jax.dlpack.from_dlpack(t) for t in checked]  # canonicalised, a handshake each
    return import_checked(checked)


def import_checked(tensors) -> list[jax.Array]:
    """jax arrays sharing the memory of tensors that passed `_checked`: detached, contiguous,
    of `_NATIVE_DTYPES`, on one device. On CUDA: JAX's stream for external ready events waits
    for the work queued on torch's current stream (one handshake), and every tensor crosses
    as a bare capsule (`torch.utils.dlpack.to_dlpack`, without `__dlpack__`'s per-tensor
    checks and stream logic)."""
    first = tensors[0]
    if first.device.type != "cuda" or _import_buffer is None:
        return [jax.dlpack.from_dlpack(t) for t in tensors]
    device = _jax_device(first.device)
    stream = device.get_stream_for_external_ready_events()
    _external_stream(stream, first.device).wait_stream(torch.cuda.current_stream(first.device))
    out = [_import_buffer(to_dlpack(first), device, stream)]  # its ready event: after the wait
    out += [_import_buffer(to_dlpack(t), device, None) for t in tensors[1:]]
    return out


@functools.cache
def _external_stream(stream: int, device: torch.device):
    """JAX's stream as a torch stream object (made once: the pointer does not change)."""
    return torch.cuda.ExternalStream(stream, device=device)


def _checked(t, argname: str, float_only: bool) -> torch.Tensor:
    """t detached and contiguous, after the checks (errors name the argument)."""
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
    return t


# Dtypes JAX takes as they are (no x64 canonicalisation): the import below needs no conversion.
_NATIVE_DTYPES = (*ATTENTION_DTYPES, torch.int32, torch.bool, torch.int8, torch.uint8, torch.int16)


@functools.cache
def _jax_device(device: torch.device):
    """JAX's device for a CUDA torch device (the same local ordinal)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    [dev] = [d for d in jax.local_devices(backend="gpu") if d.local_hardware_id == index]
    return dev


def _low_level_import():
    """jaxlib's DLPack import f(capsule, device, stream) of a CUDA buffer, or None."""
    to_buffer = getattr(_jax, "dlpack_managed_tensor_to_buffer", None)
    if to_buffer is None:
        return None
    if jaxlib_extension_version >= 467:  # the DLPack device type became an argument
        return lambda capsule, device, stream: to_buffer(
            capsule, device, stream, None, 2
        )  # kDLCUDA
    return lambda capsule, device, stream: to_buffer(capsule, device, stream, None)


try:
    from jax._src.lib import _jax, jaxlib_extension_version
except ImportError:  # a JAX without these names: the public paths only
    _jax = None
_import_buffer = _low_level_import() if _jax is not None else None
_export_buffer = getattr(_jax, "buffer_to_dlpack_managed_tensor", None)


def array_to_torch(x: jax.Array) -> torch.Tensor:
    """A torch.Tensor sharing `x`'s memory."""
    return torch.from_dlpack(x)


def arrays_to_torch(arrays, device: torch.device) -> list[torch.Tensor]:
    """`array_to_torch` of single-device arrays on `device` (torch's naming), the results of
    one call: on CUDA through jaxlib's export, which makes torch's current stream wait for
    the arrays (what `torch.from_dlpack` asks of `__dlpack__`, without its checks)."""
    if device.type != "cuda" or _export_buffer is None:
        return [torch.from_dlpack(x) for x in arrays]
    stream = torch.cuda.current_stream(device).cuda_stream
    stream = 1 if stream == 0 else stream  # DLPack's name for the legacy default stream
    return [
        _torch_from_capsule(_export_buffer(x.addressable_data(0), stream=stream)) for x in arrays
    ]


def check_same_device(**tensors) -> torch.device:
    """All tensors on one device; returns it. Errors name every argument and its device."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{', '.join(devices)} must be on the same device, got {listing}")
    return next(iter(devices.values()))
