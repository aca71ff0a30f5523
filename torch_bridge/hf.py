"""flexjax as a Hugging Face transformers attention implementation ("flexjax").

    import torch_bridge.hf
    torch_bridge.hf.register()  # once per process; importing this module registers nothing
    model = LlamaForCausalLM._from_config(config, attn_implementation="flexjax")
    # or, on an existing model: model.set_attn_implementation("flexjax")

Why two registrations. transformers splits attention into a mask builder,
called once per forward by the model (`create_causal_mask`,
`create_sliding_window_causal_mask`, ...), and an attention function called by
every layer with what the builder returned. `register()` adds both under one
name: `AttentionMaskInterface` gets `flexjax_attention_mask`, which returns a
flexjax `BlockMask`, so a forward builds its block tables once and every layer
skips the blocks that padding, causality or a window leave empty; nothing of
size [B, 1, L, S] is made. `AttentionInterface` gets
`flexjax_attention_forward`, which runs `torch_bridge.flex_attention` (the
Pallas kernels, torch autograd through DLPack).

The builder receives transformers' mask as a *torch* function composed from
its `masking_utils` pieces (causal, sliding-window and chunked overlays,
padding, packed sequences, `and_masks` / `or_masks`, index offsets). JAX
cannot run it, so each known piece is rewritten as the same jnp expression
over the same tensors (the padding mask, position ids, ...), which the kernels
then read as captured arrays. A piece it does not know (e.g. a model's own
`and_mask_function`) is evaluated by transformers' own `sdpa_mask` into a
dense boolean [B, 1, L, S] tensor that the mask_mod reads: still exact, but
with that tensor's memory, so it warns (`UserWarning`).

Generation: offsets into a KV cache reach the mask_mod as 0-d tensors (kernel
inputs, not constants), so with `cache_implementation="static"` the kernels
compile once per query length, not once per token. That path needs
`flexjax.BlockMask.ndim` (transformers recognises a prepared 4D mask by it).
A DynamicCache grows the key length every token, and every new length is a
new compile: use a StaticCache to generate with flexjax.

A query row that keeps no key (a left-padded position) gives 0, as sdpa and
torch's flex_attention do (eager averages every value there).

What the layers pass, and what happens to it:

| argument | flexjax |
|---|---|
| GQA (fewer key/value heads than query heads) | `enable_gqa=True`, no `repeat_kv` copy |
| `scaling` | `scale=` |
| `softcap` (Gemma 2) | score_mod `softcap * tanh(score / softcap)` |
| `sliding_window` (Mistral, Gemma 2) | already in the BlockMask the builder made for those layers; built here when no mask is given |
| `attention_mask=None` | causal when `is_causal` (the module's, or the kwarg) and more than one query, as `sdpa` does |
| a 4D torch tensor mask (a model's own, passed as is) | bool: read by a mask_mod; float: added by a score_mod |
| `dropout > 0` | ValueError: the kernels have no attention dropout |
| `s_aux` (attention sinks), `position_bias` | ValueError (not implemented) |

Returns (attn_output [B, L, H, D], None): attention weights are never formed.
transformers stays optional: only this module imports it, and neither
`flexjax` nor `torch_bridge` imports this module.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import jax.numpy as jnp
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

import torch_bridge
from flexjax import BlockMask
from flexjax.masks import causal_mask, generate_sliding_window

__all__ = ["NAME", "flexjax_attention_forward", "flexjax_attention_mask", "register"]

NAME = "flexjax"

_HF_MASKS = "transformers.masking_utils"


def register(name: str = NAME) -> str:
    """Register the attention function and its mask builder under `name` (idempotent); returns name."""
    AttentionInterface.register(name, flexjax_attention_forward)
    AttentionMaskInterface.register(name, flexjax_attention_mask)
    return name


# --- transformers' torch mask functions, rewritten as jnp mask_mods -------------------------------


class _UnknownMask(Exception):
    """A mask function that is not one of transformers' `masking_utils` pieces."""


def _closure(fn) -> dict:
    cells = fn.__closure__ or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in cells), strict=True))


def _index_tensor(t: torch.Tensor) -> torch.Tensor:
    """Integer index data as int32 (JAX runs without x64); bool stays bool."""
    return t if t.dtype == torch.bool else t.to(torch.int32)


def _as_jnp(fn: Callable) -> Callable:
    """The jnp mask_mod computing what transformers' torch mask function `fn` computes.

    Raises _UnknownMask for anything but the `masking_utils` building blocks.
    """
    if getattr(fn, "__module__", None) != _HF_MASKS:
        raise _UnknownMask(fn)
    name, free = fn.__qualname__, _closure(fn)
    if name == "causal_mask_function":
        return causal_mask
    if name == "bidirectional_mask_function":
        return lambda b, h, q, kv: q >= 0
    if name in ("and_masks.<locals>.and_mask", "or_masks.<locals>.or_mask"):
        parts = [_as_jnp(f) for f in free["mask_functions"]]
        combine = jnp.logical_and if name.startswith("and") else jnp.logical_or

        def combined(b, h, q, kv):
            out = parts[0](b, h, q, kv)
            for part in parts[1:]:
                out = combine(out, part(b, h, q, kv))
            return out

        return combined
    if name == "sliding_window_overlay.<locals>.inner_mask":
        window = int(free["sliding_window"])
        return lambda b, h, q, kv: kv > q - window
    if name == "sliding_window_bidirectional_overlay.<locals>.inner_mask":
        window = int(free["sliding_window"])
        return lambda b, h, q, kv: jnp.abs(q - kv) <= window
    if name == "chunked_overlay.<locals>.inner_mask":
        chunk, left = int(free["chunk_size"]), _index_tensor(free["left_padding"])
        return lambda b, h, q, kv: (kv - left[b]) // chunk == (q - left[b]) // chunk
    if name == "padding_mask_function.<locals>.inner_mask":
        keep = _index_tensor(free["padding_mask"])
        return lambda b, h, q, kv: keep[b, kv] != 0
    if name == "packed_sequence_mask_function.<locals>.inner_mask":
        seq = _index_tensor(free["packed_sequence_mask"])
        return lambda b, h, q, kv: seq[b, q] == seq[b, kv]
    if name == "blockwise_overlay.<locals>.inner_mask":
        group = _index_tensor(free["block_sequence_ids"])
        return lambda b, h, q, kv: (group[b, q] == group[b, kv]) & (group[b, q] >= 0)
    if name == "remap_positions_for_packed_sequence.<locals>.inner_mask":
        inner, pos = _as_jnp(free["mask_function"]), _index_tensor(free["position_ids"])
        return lambda b, h, q, kv: inner(b, h, pos[b, q], pos[b, kv])
    if name == "add_offsets_to_mask_function.<locals>.inner_mask":
        inner = _as_jnp(free["mask_function"])
        q_off, kv_off = int(free["q_offset"]), int(free["kv_offset"])
        return lambda b, h, q, kv: inner(b, h, q + q_off, kv + kv_off)
    raise _UnknownMask(fn)


def flexjax_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int | torch.Tensor = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    **kwargs,
) -> BlockMask:
    """transformers' mask builder for "flexjax": a flexjax BlockMask [B or 1, 1, q_length, kv_length].

    mask_function: transformers' torch mask function (causal by default);
    attention_mask: the 2D padding mask [B, >= kv_offset + kv_length] (True = keep).
    The same arguments as `transformers.masking_utils.sdpa_mask`, which builds
    the dense mask for mask functions this module cannot rewrite.
    """
    if isinstance(attention_mask, BlockMask):
        # Already built by this function: generate() prepares the masks of a StaticCache
        # step itself and passes them back in (given BlockMask.ndim, which transformers
        # reads to recognise a prepared 4D mask).
        return attention_mask
    keep = None
    if attention_mask is not None and not bool(attention_mask.all()):
        keep = attention_mask.to(device=device, dtype=torch.bool)
        if (short := int(kv_offset) + kv_length - keep.shape[-1]) > 0:  # as prepare_padding_mask
            keep = torch.nn.functional.pad(keep, (0, short))
    try:
        pattern = _as_jnp(mask_function)
    except _UnknownMask:
        pattern = None
    if pattern is None:
        warnings.warn(
            f"flexjax: transformers mask function {getattr(mask_function, '__qualname__', '?')} "
            "is not one of masking_utils' pieces; it is evaluated densely into a "
            f"[{batch_size}, 1, {q_length}, {kv_length}] bool tensor that the mask_mod reads",
            stacklevel=2,
        )
        dense = sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length,
            q_offset=int(q_offset), kv_offset=int(kv_offset), mask_function=mask_function,
            attention_mask=attention_mask, allow_is_causal_skip=False,
            allow_is_bidirectional_skip=False, use_vmap=kwargs.get("use_vmap", False),
            device=device,
        )  # fmt: skip
        return _bool_tensor_block_mask(dense, q_length, kv_length, device)

    # transformers' indices are absolute positions: q_idx + q_offset, kv_idx + kv_offset.
    q_offset, kv_offset = _offset(q_offset, device), _offset(kv_offset, device)

    def mask_mod(b, h, q_idx, kv_idx):
        q, kv = q_idx + q_offset, kv_idx + kv_offset
        kept = pattern(b, h, q, kv)
        if keep is not None:
            kept = kept & (keep[b, kv] != 0)
        return kept

    per_batch = keep is not None or _reads_tensors(mask_function)
    B = batch_size if per_batch else 1
    return torch_bridge.create_block_mask(mask_mod, B, 1, q_length, kv_length, device=device)


def _offset(offset: int | torch.Tensor, device) -> int | torch.Tensor:
    """0 stays a Python 0 (nothing to add); any other offset becomes a 0-d int32 tensor.

    A captured tensor is a kernel input, so decoding over a StaticCache (fixed lengths,
    a moving offset) reuses the compiled builder and kernels instead of compiling
    one per position, as a Python int (a constant in the kernel) would.
    """
    if isinstance(offset, torch.Tensor):
        return offset.to(device=device, dtype=torch.int32).reshape(())
    if offset == 0:
        return 0
    return torch.tensor(offset, dtype=torch.int32, device=device)


def _reads_tensors(fn: Callable) -> bool:
    """Whether a (rewritten) transformers mask function captures a tensor, e.g. packed sequence ids."""
    stack, seen = [fn], set()
    while stack:
        f = stack.pop()
        if id(f) in seen or not callable(f) or not hasattr(f, "__code__"):
            continue
        seen.add(id(f))
        for value in _closure(f).values():
            if isinstance(value, torch.Tensor):
                return True
            if callable(value):
                stack.append(value)
            elif isinstance(value, tuple | list):
                stack.extend(value)
    return False


def _bool_tensor_block_mask(mask: torch.Tensor, q_length: int, kv_length: int, device):
    """A BlockMask whose mask_mod reads a dense bool mask [B|1, H|1, L, S] (True = keep)."""
    mask = mask.to(torch.bool)
    B, H = mask.shape[0], mask.shape[1]

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[b if B > 1 else 0, h if H > 1 else 0, q_idx, kv_idx]

    return torch_bridge.create_block_mask(mask_mod, B, H, q_length, kv_length, device=device)


# --- the attention function -----------------------------------------------------------------------

_DEFAULT_MASKS: dict = {}  # (q_length, kv_length, window, device) -> BlockMask, for mask=None calls


def _default_mask(q_length: int, kv_length: int, window: int | None, device) -> BlockMask:
    """Causal (upper-left, as sdpa's is_causal) and optionally windowed, built once per shape."""
    key = (q_length, kv_length, window, str(device))
    if key not in _DEFAULT_MASKS:
        # transformers' window counts the query itself: kv in (q - window, q]
        mask_mod = causal_mask if window is None else generate_sliding_window(window - 1)
        _DEFAULT_MASKS[key] = torch_bridge.create_block_mask(
            mask_mod, 1, 1, q_length, kv_length, device=device
        )
    return _DEFAULT_MASKS[key]


def _is_torch_block_mask(mask) -> bool:
    return type(mask).__name__ == "BlockMask" and isinstance(
        getattr(mask, "kv_num_blocks", None), torch.Tensor
    )


def flexjax_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: BlockMask | torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function for "flexjax".

    query: [B, Hq, L, D]; key, value: [B, Hkv, S, D] (Hq a multiple of Hkv);
    attention_mask: the BlockMask of `flexjax_attention_mask`, a 4D torch mask
    (bool: True = keep; float: added to the scores) or None. Returns
    (attn_output [B, L, Hq, D], None).
    """
    if dropout and dropout > 0:
        raise ValueError(
            f"flexjax attention has no attention dropout, got dropout={dropout}: set the "
            "config's attention_dropout to 0.0 or run the model in eval mode"
        )
    for unsupported in ("s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(
                f"flexjax attention does not implement {unsupported} (given by "
                f"{type(module).__name__}); use attn_implementation='eager' for this model"
            )
    softcap = kwargs.get("softcap")
    window = kwargs.get("sliding_window")
    q_length, kv_length = query.shape[2], key.shape[2]

    block_mask, bias = None, None
    if isinstance(attention_mask, BlockMask):
        # Built by flexjax_attention_mask from the model's own mask function, which holds
        # the sliding window of sliding layers already.
        block_mask = attention_mask
    elif attention_mask is None:
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        if is_causal and q_length > 1:
            block_mask = _default_mask(q_length, kv_length, window, query.device)
        elif window is not None:
            raise ValueError(
                f"flexjax attention got sliding_window={window} with no attention_mask and a "
                "non-causal call; pass the mask transformers builds for it"
            )
    elif _is_torch_block_mask(attention_mask):
        raise TypeError(
            "attention_mask is a torch flex_attention BlockMask, whose mask_mod JAX cannot run: "
            "build the model with attn_implementation='flexjax' after torch_bridge.hf.register() "
            "so that transformers builds a flexjax BlockMask"
        )
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 4:
        mask = attention_mask[:, :, :, :kv_length]
        if mask.dtype == torch.bool:
            block_mask = _bool_tensor_block_mask(mask, q_length, kv_length, query.device)
        else:
            bias = mask.to(torch.float32)
    else:
        raise TypeError(
            "attention_mask must be a flexjax BlockMask, a 4D torch tensor or None, got "
            f"{type(attention_mask).__name__} of shape {getattr(attention_mask, 'shape', None)}"
        )

    score_mod = _score_mod(softcap, bias)
    out = torch_bridge.flex_attention(
        query, key, value,
        score_mod=score_mod, block_mask=block_mask, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
        kernel_options=kwargs.get("kernel_options"),
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def _score_mod(softcap: float | None, bias: torch.Tensor | None) -> Callable | None:
    """softcap * tanh(score / softcap) (Gemma 2), then + bias[b, h, q, kv] (an additive 4D mask)."""
    if softcap is None and bias is None:
        return None
    cap = None if softcap is None else float(softcap)
    Bb, Hb = (1, 1) if bias is None else (bias.shape[0], bias.shape[1])

    def score_mod(score, b, h, q_idx, kv_idx):
        if cap is not None:
            score = cap * jnp.tanh(score / cap)
        if bias is not None:
            score = score + bias[b if Bb > 1 else 0, h if Hb > 1 else 0, q_idx, kv_idx]
        return score

    return score_mod
