"""The seed walkthrough's examples, as one catalogue for the tests, the gym and the benchmarks.

Each `Example` builds a `Case` (mods plus shapes) at one of two scales:
  "seed":  the seed's sizes (B=16, H=16, S=8192, D=64, float16; the document
           mask at S=32768; checkerboard B=8, H=8, S=2048, float32);
  "small": sizes that run in seconds on a CPU in interpret mode.
Mask parameters scale with the sequence length so that the small cases keep
the seed's shape of sparsity (window = S/8, prefix = S/4, ...).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import jax.numpy as jnp

from flexjax import masks, mods

__all__ = ["EXAMPLES", "Case", "Example"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Case:
    """One runnable example: q [B, H, Q_LEN, D], k/v [B, H, KV_LEN, D]."""

    name: str
    score_mod: Callable | None
    mask_mod: Callable | None
    B: int
    H: int
    Q_LEN: int
    KV_LEN: int
    D: int
    dtype: jnp.dtype
    # True when the example is a pure mask, so dense-mask SDPA computes the same thing.
    sdpa_comparable: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class Example:
    name: str
    description: str
    build: Callable[[int, int], tuple[Callable | None, Callable | None, int, int]]
    # build(H, S) -> (score_mod, mask_mod, Q_LEN, KV_LEN)
    seed_sizes: dict
    small_sizes: dict

    def case(self, scale: str = "small", **overrides) -> Case:
        """The example at `scale` ("seed" or "small"); keyword overrides for B, H, S, D, dtype."""
        if scale not in ("seed", "small"):
            raise ValueError(f"scale must be 'seed' or 'small', got {scale!r}")
        sizes = dict(self.seed_sizes if scale == "seed" else self.small_sizes)
        unknown = set(overrides) - {"B", "H", "S", "D", "dtype"}
        if unknown:
            raise TypeError(f"unknown size overrides {sorted(unknown)}; use B, H, S, D, dtype")
        sizes.update(overrides)
        score_mod, mask_mod, q_len, kv_len = self.build(sizes["H"], sizes["S"])
        return Case(
            name=self.name,
            score_mod=score_mod,
            mask_mod=mask_mod,
            B=sizes["B"],
            H=sizes["H"],
            Q_LEN=q_len,
            KV_LEN=kv_len,
            D=sizes["D"],
            dtype=jnp.dtype(sizes["dtype"]),
            sdpa_comparable=score_mod in (None, mods.noop, mods.causal_bias),
        )


SEED = dict(B=16, H=16, S=8192, D=64, dtype=jnp.float16)
SMALL = dict(B=2, H=2, S=256, D=32, dtype=jnp.float32)


def canvas_width(S: int) -> int:
    """Image width for the 2-D masks: the seed's 128, or smaller so tiny S still spans rows."""
    return 128 if S >= 8192 else max(4, int(S**0.5))


def jagged_lengths(S: int) -> list[int]:
    """The seed's 16 random sequence lengths in [1, 1024] (random.seed(0)), scaled to S."""
    rng = random.Random(0)
    n, longest = (16, 1024) if S >= 8192 else (4, max(2, S // 4))
    return [rng.randint(1, longest) for _ in range(n)]


def _build_jagged(H, S):
    lengths = jagged_lengths(S)
    total = sum(lengths)  # any total: no padding to a multiple of 128
    mask = masks.generate_jagged_mask_mod(masks.offsets_from_lengths(lengths))
    return None, mask, total, total


def document_lengths(S: int) -> list[int]:
    """The seed's documents at S >= 8192; below that its proportions (1/8, 1/8, then 1/4s)."""
    if S >= 8192:
        return masks.seed_document_lengths(S)
    eighth = max(1, S // 8)
    lengths = [eighth, eighth]
    while sum(lengths) < S:
        lengths.append(min(2 * eighth, S - sum(lengths)))
    return lengths


def _build_document(H, S):
    doc = masks.document_id_from_lengths(document_lengths(S))
    return None, masks.generate_doc_mask_mod(doc), S, S


def natten_kernel(S: int) -> int:
    return 7 if canvas_width(S) >= 128 else 3


def sasa_window(S: int) -> int:
    return max(1, canvas_width(S) // 16)


FLAMINGO_INTERVALS = [[0, 7], [1, 7], [7, 12]]
FLAMINGO_IMAGE_TOKENS = [3, 3, 3]


def _build_flamingo(H, S):
    mask = masks.generate_vision_cross_attention_mask(FLAMINGO_INTERVALS, FLAMINGO_IMAGE_TOKENS)
    return None, mask, 12, sum(FLAMINGO_IMAGE_TOKENS)


def _ex(name, description, build, seed=None, small=None):
    return Example(
        name=name,
        description=description,
        build=build,
        seed_sizes={**SEED, **(seed or {})},
        small_sizes={**SMALL, **(small or {})},
    )


_EXAMPLE_LIST = [
    _ex(
        "checkerboard",
        "score_mod halving odd-distance scores (basic usage)",
        lambda H, S: (mods.checkerboard, None, S, S),
        seed=dict(B=8, H=8, S=2048, dtype=jnp.float32),
    ),
    _ex("noop", "full attention, no mask", lambda H, S: (mods.noop, None, S, S)),
    _ex(
        "causal_bias",
        "causal attention as a -inf score_mod (no block sparsity)",
        lambda H, S: (mods.causal_bias, None, S, S),
    ),
    _ex("causal", "causal mask_mod", lambda H, S: (None, masks.causal_mask, S, S)),
    _ex(
        "sliding_window",
        "causal sliding window of S/8 (1024 at S=8192)",
        lambda H, S: (None, masks.generate_sliding_window(S // 8), S, S),
    ),
    _ex(
        "prefix_lm",
        "bidirectional prefix of S/4 (2048 at S=8192), causal after",
        lambda H, S: (None, masks.generate_prefix_lm_mask(S // 4), S, S),
    ),
    _ex(
        "document",
        "causal within documents of 4096, 4096, then 8192 tokens (captured document_id)",
        _build_document,
        seed=dict(S=32768),
    ),
    _ex(
        "sasa",
        "2-D window of 8 pixels over a 128-wide image",
        lambda H, S: (None, masks.generate_sasa_mask_mod(canvas_width(S), sasa_window(S)), S, S),
    ),
    _ex(
        "natten",
        "7x7 neighborhood kernel clamped inside a 128x128 canvas",
        lambda H, S: (
            None,
            masks.generate_natten(
                canvas_width(S), canvas_width(S), natten_kernel(S), natten_kernel(S)
            ),
            S,
            S,
        ),
    ),
    _ex(
        "alibi_closure",
        "ALiBi with the slopes as a captured array, plus a causal mask",
        lambda H, S: (mods.generate_alibi_bias(H), masks.causal_mask, S, S),
    ),
    _ex(
        "alibi_functional",
        "ALiBi with the slope computed in the mod, plus a causal mask",
        lambda H, S: (mods.generate_alibi_functional(H), masks.causal_mask, S, S),
    ),
    _ex(
        "softcap",
        "tanh soft-capping (cap 2, exact tanh), plus a causal mask",
        lambda H, S: (mods.generate_tanh_softcap(2.0), masks.causal_mask, S, S),
    ),
    _ex(
        "softcap_approx",
        "tanh soft-capping (cap 2, tanh.approx.f32 on the GPU), plus a causal mask",
        lambda H, S: (mods.generate_tanh_softcap(2.0, approx=True), masks.causal_mask, S, S),
    ),
    _ex(
        "jagged",
        "nested jagged tensor: 16 packed sequences of random length, causal in each",
        _build_jagged,
    ),
    _ex(
        "flamingo",
        "cross attention: 12 text tokens over 3 images of 3 tokens",
        _build_flamingo,
        seed=dict(S=12),
        small=dict(S=12),
    ),
]

EXAMPLES: dict[str, Example] = {ex.name: ex for ex in _EXAMPLE_LIST}
