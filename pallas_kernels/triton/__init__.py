"""The Triton backend: Pallas kernels with the Triton lowering (any CUDA GPU JAX supports).

Kernels: `fwd.flex_fwd`, `bwd.flex_bwd` (dq, dk/dv, captured-array
gradients), `decode.flex_decode` (split-KV, GQA-packed). Configs, defaults
and the autotune space: `configs`. GPU tile operations (inline-asm exp2,
approximate tanh, atomic adds): `tile_ops`. What the launchers share
(BlockSpecs from the layout, bounded loads and stores): `launch`.

JAX 0.11 deprecated Pallas' Triton lowering in favour of Mosaic GPU; it is
still in every JAX this project supports, and it is the backend that runs on
GPUs older than Hopper.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.mod_eval import mod_loads
from pallas_kernels.runtime import has_gpu
from pallas_kernels.spec import KernelSpec, Mods
from pallas_kernels.triton import configs
from pallas_kernels.triton.bwd import BwdConfig, flex_bwd
from pallas_kernels.triton.decode import DecodeConfig, flex_decode
from pallas_kernels.triton.fwd import FwdConfig, flex_fwd

__all__ = ["TRITON", "TritonBackend"]

_DTYPES = ("float16", "bfloat16", "float32")
_MAX_HEAD_DIM = 256


class TritonBackend(dispatch.Backend):
    name = "TRITON"
    option_keys = configs.OPTION_KEYS

    def supports(self, spec: KernelSpec, mods: Mods) -> str | None:
        if not spec.interpret and not has_gpu():
            return (
                "compiled kernels need a CUDA GPU and JAX has none (kernel_options interpret=False)"
            )
        if not spec.interpret and spec.dtype not in _DTYPES:
            return f"on the GPU it computes in {', '.join(_DTYPES)}, got {spec.dtype}"
        if spec.head_dim > _MAX_HEAD_DIM:
            return f"head dims up to {_MAX_HEAD_DIM} (E={spec.E}, Ev={spec.Ev})"
        return None

    def _sizes(self, spec: KernelSpec, mods: Mods, options: dict) -> dict:
        return dict(
            q_block_size=spec.q_block_size, kv_block_size=spec.kv_block_size,
            interpret=spec.interpret, options=options, head_dim=spec.head_dim,
            dtype=jnp.dtype(spec.dtype), loads=mod_loads(mods.score) + mod_loads(mods.mask),
        )  # fmt: skip

    def configs(self, spec, mods, options, decode):
        sizes = self._sizes(spec, mods, options)
        dec = None
        if decode:
            dec = configs.decode_config(
                batch=spec.B, q_heads=spec.Hq, group_size=spec.group_size, q_len=spec.L,
                kv_blocks=spec.C, mask_head_broadcast=spec.mask_head_broadcast, **sizes,
            )  # fmt: skip
        return dispatch.KernelConfigs(
            fwd=configs.fwd_config(q_len=spec.L, **sizes),
            bwd=configs.bwd_config(**sizes),
            decode=dec,
        )

    def candidates(self, kind, spec, mods, fixed):
        space = configs.AUTOTUNE_SPACE["interpret" if spec.interpret else "gpu"][kind]
        prefix = "" if kind == "fwd" else "bwd_"
        keys = list(space)
        values = [(fixed[prefix + k],) if prefix + k in fixed else space[k] for k in keys]
        for combo in itertools.product(*values):
            c = dict(zip(keys, combo, strict=True))
            bm, bn = c["block_m"], c["block_n"]
            both = kind == "bwd"  # the dq kernel uses the backward tiles transposed
            if not configs.tiles_divide(bm, bn, spec.q_block_size, spec.kv_block_size, both):
                continue
            if kind == "fwd" and bm > max(16, spec.L) * 2 and prefix + "block_m" not in fixed:
                continue  # a q tile much longer than the query is padding
            if not spec.interpret and min(bm, bn) < 16:
                continue
            yield c, self.config_from(kind, c)

    def config_from(self, kind, values):
        return (FwdConfig if kind == "fwd" else BwdConfig)(**values)

    def fwd(self, q, k, v, tables, mods, offsets, *, spec, cfg: FwdConfig):
        return flex_fwd(q, k, v, tables, mods, offsets, spec=spec, cfg=cfg)

    def decode(self, q, k, v, tables, mods, offsets, *, spec, cfg: DecodeConfig):
        return flex_decode(q, k, v, tables, mods, offsets, spec=spec, cfg=cfg)

    def bwd(self, q, k, v, do, lse, delta, tables, mods, offsets, *, spec, cfg: BwdConfig,
            grad_slots):  # fmt: skip
        return flex_bwd(
            q, k, v, do, lse, delta, tables, mods, offsets, spec=spec, cfg=cfg,
            grad_slots=grad_slots,
        )  # fmt: skip


TRITON = TritonBackend()
dispatch.register(TRITON)
