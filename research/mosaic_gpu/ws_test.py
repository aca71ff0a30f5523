# Does the interpreter run JAX's own warp-specialised FA3 kernel (3 warpgroups, emit_pipeline_warp_specialized)?
import time

import jax
import jax.numpy as jnp
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams, force_gpu_interpret_mode
from jax.experimental.pallas.ops.gpu import attention_mgpu as am

B, S, H, D = 1, 256, 1, 64


class _CV:
    @staticmethod
    def cuda_runtime_get_version():
        return 13000


am.cuda_versions = _CV()
ks = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(kk, (B, S, H, D), jnp.float16) for kk in ks)
cfg = am.TuningConfig(block_q=64, block_kv=64, max_concurrent_steps=2)
ref = am.attention_reference(q, k, v)
for name, fn in (
    ("attention_with_pipeline_emitter", am.attention_with_pipeline_emitter),
    (
        "_attention_forward (hand-rolled WS)",
        lambda q, k, v, config: am._attention_forward(q, k, v, config),
    ),
):
    try:
        t = time.perf_counter()
        with force_gpu_interpret_mode(InterpretGPUParams(detect_races=True)):
            out = jax.block_until_ready(fn(q, k, v, config=cfg))
        print(
            f"{jax.__version__} {name}: ran {time.perf_counter() - t:.2f}s max err {float(jnp.abs(out.astype(jnp.float32) - ref).max()):.2e}"
        )
    except Exception as e:
        msg = [l for l in str(e).splitlines() if l.strip()]
        print(
            f"{jax.__version__} {name}: FAILED {type(e).__name__}: {msg[-1][:300] if msg else ''}"
        )
