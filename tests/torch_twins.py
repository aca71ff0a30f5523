"""The seed's PyTorch mods, written as in the walkthrough, with the catalogue's parameters.

Tests compare flexjax's jnp catalogue against these: same masks from
`create_mask`, same block tables from torch's `create_block_mask`, same
attention from torch's `flex_attention`.
"""

from __future__ import annotations

import torch

from flexjax import examples as ex


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(window):
    def sliding_window_causal_mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

    return sliding_window_causal_mask


def prefix_lm(prefix):
    def prefix_lm_causal_mask(b, h, q_idx, kv_idx):
        return (kv_idx <= prefix) | (q_idx >= kv_idx)

    return prefix_lm_causal_mask


def document(lengths):
    document_id = torch.repeat_interleave(
        torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths)
    )

    def document_causal_mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (document_id[q_idx] == document_id[kv_idx])

    return document_causal_mask


def sasa(W, window):
    def sasa_mask(b, h, q_idx, kv_idx):
        q_x, q_y = q_idx // W, q_idx % W
        kv_x, kv_y = kv_idx // W, kv_idx % W
        return ((q_x - kv_x).abs() <= window) & ((q_y - kv_y).abs() <= window)

    return sasa_mask


def natten(W, H, K_W, K_H):
    def natten_mask(b, h, q_idx, kv_idx):
        q_x, q_y = q_idx // W, q_idx % W
        kv_x, kv_y = kv_idx // W, kv_idx % W
        kernel_x = q_x.clamp(K_W // 2, (W - 1) - K_W // 2)
        kernel_y = q_y.clamp(K_H // 2, (H - 1) - K_H // 2)
        return ((kernel_x - kv_x).abs() <= K_W // 2) & ((kernel_y - kv_y).abs() <= K_H // 2)

    return natten_mask


def jagged(lengths):
    offsets = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int64)
    total = int(offsets[-1])
    seq_idx = torch.searchsorted(offsets, torch.arange(total), right=True) - 1

    def njt_mask(b, h, q_idx, kv_idx):
        q_nested = q_idx - offsets[seq_idx[q_idx]]
        kv_nested = kv_idx - offsets[seq_idx[kv_idx]]
        return causal_mask(b, h, q_nested, kv_nested) & (seq_idx[q_idx] == seq_idx[kv_idx])

    return njt_mask


def flamingo():
    image_boundaries = torch.repeat_interleave(
        torch.arange(len(ex.FLAMINGO_IMAGE_TOKENS)), torch.tensor(ex.FLAMINGO_IMAGE_TOKENS)
    )
    intervals = torch.tensor(ex.FLAMINGO_INTERVALS, dtype=torch.long)

    def vision_x_attention_mask(b, h, q_idx, kv_idx):
        image_idx = image_boundaries[kv_idx]
        interval = intervals[image_idx]
        return (q_idx >= interval[0]) & (q_idx < interval[1])

    return vision_x_attention_mask


def checkerboard(score, batch, head, token_q, token_kv):
    score = torch.where(torch.abs(token_kv - token_q) % 1 == 0, score * 0.5, score)
    score = torch.where(torch.abs(token_kv - token_q) % 2 == 0, score * 2.0, score)
    return score


def noop(score, b, h, q_idx, kv_idx):
    return score


def causal_bias(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, score, -float("inf"))


def alibi_closure(H):
    alibi_bias = torch.exp2(torch.tensor([-((h + 1) * 8.0 / H) for h in range(H)]))

    def alibi_and_causal_closure(score, b, h, q_idx, kv_idx):
        return score + alibi_bias[h] * (q_idx - kv_idx)

    return alibi_and_causal_closure


def alibi_functional(H):
    def alibi_and_causal_functional(score, b, h, q_idx, kv_idx):
        scale = torch.exp2(-((h + 1) * 8.0 / H))
        return score + (q_idx - kv_idx) * scale

    return alibi_and_causal_functional


def tanh_soft_cap(score, b, h, q_idx, kv_idx):
    return torch.tanh(score / 2) * 2


def twin(name: str, H: int, S: int):
    """(score_mod, mask_mod) in torch for catalogue example `name` built at (H, S)."""
    masks = {
        "causal": lambda: causal_mask,
        "sliding_window": lambda: sliding_window(S // 8),
        "prefix_lm": lambda: prefix_lm(S // 4),
        "document": lambda: document(ex.document_lengths(S)),
        "sasa": lambda: sasa(ex.canvas_width(S), ex.sasa_window(S)),
        "natten": lambda: natten(
            ex.canvas_width(S), ex.canvas_width(S), ex.natten_kernel(S), ex.natten_kernel(S)
        ),
        "jagged": lambda: jagged(ex.jagged_lengths(S)),
        "flamingo": flamingo,
    }
    score_mods = {
        "checkerboard": (checkerboard, None),
        "noop": (noop, None),
        "causal_bias": (causal_bias, None),
        "alibi_closure": (alibi_closure(H), causal_mask),
        "alibi_functional": (alibi_functional(H), causal_mask),
        "softcap": (tanh_soft_cap, causal_mask),
        "softcap_approx": (tanh_soft_cap, causal_mask),
    }
    if name in masks:
        return None, masks[name]()
    return score_mods[name]
