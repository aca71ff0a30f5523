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

`tensors_to_jax` converts the tensors of one call together, and on a CUDA
device orders them with one stream handshake instead of one per tensor: the
first tensor crosses with the protocol above (torch makes JAX's stream wait
for all work queued on torch's current stream so far, and the jax array's
ready event comes after that wait); the others cross without a stream (no
wait, ready at once). That is as safe as a handshake per tensor, because
they are all inputs of the same computation: XLA waits for every input's
ready event before it starts, so it starts after the first tensor's, which
already covers the work that wrote the others (torch's protocol only ever
synchronises with the current stream). With JAX's lower-level DLPack import
(the public one adds dtype canonicalisation and placement, which these
dtypes do not need), q, k and v cross in 84 us on an H100 instead of 213 us
(bench/results/traps_h100_2026-11-28.md); a JAX without it takes the public path.
"""

from __future__ import annotations

import functools

import jax
import torch

from pallas_kernels.runtime import has_gpu

__all__ = [
    "ATTENTION_DTYPES",
    "array_to_torch",
    "check_same_device",
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
    device = _jax_device(first.device)
    if first.dtype in _NATIVE_DTYPES:  # the handshake: torch's queued work, then JAX's stream
        stream = device.get_stream_for_external_ready_events()
        out = [_import_buffer(first.__dlpack__(stream=stream), device, stream)]
    else:
        out = [jax.dlpack.from_dlpack(first)]
    for t in checked[1:]:
        if t.device != first.device or t.dtype not in _NATIVE_DTYPES:
            out.append(jax.dlpack.from_dlpack(t))  # the public path canonicalises and places
        else:
            out.append(_import_buffer(t.__dlpack__(stream=-1), device, None))
    return out


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
    try:
        from jax._src.lib import _jax, jaxlib_extension_version
    except ImportError:
        return None
    to_buffer = getattr(_jax, "dlpack_managed_tensor_to_buffer", None)
    if to_buffer is None:
        return None
    if jaxlib_extension_version >= 467:  # the DLPack device type became an argument
        return lambda capsule, device, stream: to_buffer(
            capsule, device, stream, None, 2
        )  # kDLCUDA
    return lambda capsule, device, stream: to_buffer(capsule, device, stream, None)


_import_buffer = _low_level_import()


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
