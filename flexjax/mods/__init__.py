"""Catalog of score_mods: every score modification of the seed walkthrough."""

from flexjax.mods.alibi import alibi_slopes, generate_alibi_bias, generate_alibi_functional
from flexjax.mods.basic import causal_bias, checkerboard, noop
from flexjax.mods.relative_position import generate_relative_bias_table, relative_positional
from flexjax.mods.softcap import generate_tanh_softcap
from pallas_kernels.approx_math import tanh_approx

__all__ = [
    "alibi_slopes",
    "causal_bias",
    "checkerboard",
    "generate_alibi_bias",
    "generate_alibi_functional",
    "generate_relative_bias_table",
    "generate_tanh_softcap",
    "noop",
    "relative_positional",
    "tanh_approx",
]
