"""Pallas kernels for flexjax, below one seam: backend-neutral types (`spec`), the backend
registry and entry point (`dispatch`), the custom_vjp (`vjp`), mods as data (`mod_trace`,
`mod_eval`), and the backends themselves (`triton`). Imports nothing of flexjax or torch."""

# jax 0.11 registers a config option that enters every jit's cache key ("trace context")
# when Pallas' fuser is first imported, which the first pallas_call does lazily: every jit
# cache entry made before the first kernel call (a create_block_mask builder, flex_attention's
# jitted call) would then compile once more. Imported here, the context is final up front.
import jax.experimental.pallas.fuser  # noqa: F401

from pallas_kernels.approx_math import tanh_approx, tanh_approx_p

__all__ = ["tanh_approx", "tanh_approx_p"]
