"""Pallas kernels for flexjax, below one seam: backend-neutral types (`spec`), the backend
registry and entry point (`dispatch`), the custom_vjp (`vjp`), mods as data (`mod_trace`,
`mod_eval`), and the backends themselves (`triton`). Imports nothing of flexjax or torch."""

from pallas_kernels.approx_math import tanh_approx, tanh_approx_p

__all__ = ["tanh_approx", "tanh_approx_p"]
