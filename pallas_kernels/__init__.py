"""Pallas kernels for flexjax and the pieces they need (approximate math, mod tracing)."""

from pallas_kernels.approx_math import tanh_approx, tanh_approx_p

__all__ = ["tanh_approx", "tanh_approx_p"]
