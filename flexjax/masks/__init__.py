"""Catalog of mask_mods: every mask of the seed walkthrough, one small file each."""

from flexjax.masks.causal import causal_mask
from flexjax.masks.document import (
    document_id_from_lengths,
    generate_doc_mask_mod,
    seed_document_lengths,
)
from flexjax.masks.flamingo import generate_vision_cross_attention_mask
from flexjax.masks.jagged import generate_jagged_mask_mod, offsets_from_lengths
from flexjax.masks.natten import generate_natten
from flexjax.masks.prefix_lm import generate_prefix_lm_mask
from flexjax.masks.sasa import generate_sasa_mask_mod
from flexjax.masks.sliding_window import generate_sliding_window

__all__ = [
    "causal_mask",
    "document_id_from_lengths",
    "generate_doc_mask_mod",
    "generate_jagged_mask_mod",
    "generate_natten",
    "generate_prefix_lm_mask",
    "generate_sasa_mask_mod",
    "generate_sliding_window",
    "generate_vision_cross_attention_mask",
    "offsets_from_lengths",
    "seed_document_lengths",
]
