"""The Mosaic GPU backend: Hopper-native (sm90) kernels in Pallas Mosaic GPU (issue 18).

Its own kernels are the forward (`fwd.flex_fwd`: TMA, a K/V ring filled by a
producer warpgroup, two consumer warpgroups on wgmma taking turns), the
backward (`bwd.flex_bwd`: a dq and a dk/dv kernel of the same structure) and
the split-KV decode kernel (`decode.flex_decode`). The calls one of them
refuses (`fwd.fwd_refusal`, `bwd.bwd_refusal`, `decode.decode_refusal`) run
that kernel of the Triton backend, with Triton's configs: a call on this
backend differentiates like any other, and `kernels(spec, mods)` says which
backend runs each kernel of a call, and why.

`supports` says what it cannot run, so AUTO passes such a call on to the
next backend and a forced `BACKEND="MOSAIC_GPU"` raises with the reason.
AUTO tries this backend first for compiled calls on sm90 (measured faster
than Triton there: bench/results/mosaic_gpu_h100_2026-11-28.md), except
where `auto` says it has not been measured (short queries); with
mask_mods dividing their indices it runs Triton's forward and this
backend's backward (`auto_options`, each measured the faster there, and
`kernels(..., auto=True)` says so); never in interpret mode, where
Triton's interpreter is many times faster (force it with
`kernel_options={"BACKEND": "MOSAIC_GPU"}` to test it on a CPU).

Configs (`fwd.FwdConfig`): `stages` (the K/V ring depth, kernel_options
"MOSAIC_STAGES"), `schedule_barrier` ("MOSAIC_SCHEDULE_BARRIER"),
`longest_first` ("MOSAIC_LONGEST_FIRST"), `pipelined` ("MOSAIC_PIPELINED":
QK^T of a step issued with PV of the one before) and `triton_fwd`
("MOSAIC_TRITON_FWD": Triton's forward kernel, this backend's backward),
defaults by head dim (`fwd.default_config`, measured); the backward's (`bwd.BwdConfig`):
`fused_dq` ("MOSAIC_FUSED_DQ": dq accumulated in the dk/dv kernel by TMA
reduce-add where `bwd.fused_dq` allows, instead of its own kernel; on by
default, measured faster, not bitwise deterministic: False, or the generic
kernel_options["deterministic"], keeps the dq kernel; the default gives way
to rings asked for that leave it no room, True asked raises there), defaults
(`bwd.default_config`, measured),
`stages` ("MOSAIC_BWD_STAGES", both kernels' rings), `dkdv_stages`
("MOSAIC_BWD_DKDV_STAGES", the dk/dv kernel's, if given), `dkdv_q_rows`
("MOSAIC_BWD_DKDV_Q_ROWS", q rows a dk/dv step: 64, or 128 at D=64),
`paired` ("MOSAIC_BWD_PAIRED"),
`schedule_barrier` ("MOSAIC_BWD_SCHEDULE_BARRIER"), `longest_first`
("MOSAIC_BWD_LONGEST_FIRST", the dq kernel's rows), `registers`
("MOSAIC_BWD_REGISTERS", per consumer thread) and `group_loop`
("MOSAIC_BWD_GROUP_LOOP": with grouped-query heads, a dk/dv CTA per kv head);
the decode kernel's (`decode.DecodeConfig`): "MOSAIC_DECODE_SPLITS",
"MOSAIC_DECODE_BLOCK_N", "MOSAIC_DECODE_STAGES".
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax._src import core as jax_core

from pallas_kernels import dispatch
from pallas_kernels.mosaic_gpu import bwd as mosaic_bwd
from pallas_kernels.mosaic_gpu import decode as mosaic_decode
from pallas_kernels.mosaic_gpu.fwd import (
    CONSUMERS,
    SMEM_BYTES,
    FwdConfig,
    default_config,
    flex_fwd,
    fwd_refusal,
    smem_bytes,
)
from pallas_kernels.mosaic_gpu.staging import read_kinds
from pallas_kernels.runtime import has_gpu
from pallas_kernels.spec import KernelSpec, Mods
from pallas_kernels.triton import TRITON
from pallas_kernels.triton import configs as triton_configs

__all__ = ["MOSAIC_GPU", "MosaicGpuBackend"]

_DTYPES = ("float16", "bfloat16")
_HEAD_DIMS = (64, 128)
_KV_BLOCKS = (64, 128)
_OPTIONS = {  # kernel_options key: (kernel, config field)
    "MOSAIC_STAGES": ("fwd", "stages"),
    "MOSAIC_SCHEDULE_BARRIER": ("fwd", "schedule_barrier"),
    "MOSAIC_LONGEST_FIRST": ("fwd", "longest_first"),
    "MOSAIC_PIPELINED": ("fwd", "pipelined"),
    "MOSAIC_TRITON_FWD": ("fwd", "triton_fwd"),
    "MOSAIC_FUSED_DQ": ("bwd", "fused_dq"),
    "MOSAIC_BWD_STAGES": ("bwd", "stages"),
    "MOSAIC_BWD_DKDV_STAGES": ("bwd", "dkdv_stages"),
    "MOSAIC_BWD_DKDV_Q_ROWS": ("bwd", "dkdv_q_rows"),
    "MOSAIC_BWD_PAIRED": ("bwd", "paired"),
    "MOSAIC_BWD_SCHEDULE_BARRIER": ("bwd", "schedule_barrier"),
    "MOSAIC_BWD_LONGEST_FIRST": ("bwd", "longest_first"),
    "MOSAIC_BWD_REGISTERS": ("bwd", "registers"),
    "MOSAIC_BWD_GROUP_LOOP": ("bwd", "group_loop"),
    "MOSAIC_DECODE_SPLITS": ("decode", "splits"),
    "MOSAIC_DECODE_BLOCK_N": ("decode", "block_n"),
    "MOSAIC_DECODE_STAGES": ("decode", "stages"),
}


def _divides_indices(program) -> bool:
    """Whether a mod's program has an integer division or remainder (nested jaxprs too)."""
    if program is None:
        return False

    def walk(jaxpr) -> bool:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("div", "rem") and jnp.issubdtype(
                eqn.outvars[0].aval.dtype, jnp.integer
            ):
                return True
            for sub in jax_core.jaxprs_in_params(eqn.params):
                if walk(sub):
                    return True
        return False

    return walk(program.jaxpr)


_TRITON_FWD_WHY = (
    "AUTO's choice for a mask_mod dividing its indices (natten, sasa): Triton's forward "
    "measured faster there, this backend's backward too (H200: natten, fp16 D=64, forward "
    "1.05x torch flex's time against Triton's 0.83x, backward 0.63x against 0.88x; "
    "bench/results/seed_table_fp16_d64_h200_2026-11-29_fused_b.md)"
)


def _is_sm90() -> bool:
    try:
        return any(str(getattr(d, "compute_capability", "")) == "9.0" for d in jax.devices("gpu"))
    except RuntimeError:
        return False


class MosaicGpuBackend(dispatch.Backend):
    name = "MOSAIC_GPU"
    option_keys = tuple(_OPTIONS)
    deterministic_options = {"MOSAIC_FUSED_DQ": False}  # the dq kernel: no reduce-adds
    # 1: bwd defaults measured (`bwd.default_config`); 2: gqa fused; 3: FwdConfig.triton_fwd;
    # 4: the forward at D=64 unpipelined with a ring of 4
    config_version = 4

    def supports(self, spec: KernelSpec, mods: Mods) -> str | None:
        if not spec.interpret and not (has_gpu() and _is_sm90()):
            return "compiled kernels need an sm90 GPU (H100/H200) and JAX has none"
        if spec.dtype not in _DTYPES:
            return f"it computes in {', '.join(_DTYPES)}, got {spec.dtype}"
        if spec.E != spec.Ev or spec.E not in _HEAD_DIMS:
            return f"head dims {_HEAD_DIMS} with E == Ev (E={spec.E}, Ev={spec.Ev})"
        if spec.q_block_size != 64 * CONSUMERS or spec.kv_block_size not in _KV_BLOCKS:
            return (
                f"BlockMask blocks of {64 * CONSUMERS} x {_KV_BLOCKS} "
                f"(got {spec.q_block_size} x {spec.kv_block_size})"
            )
        short = dispatch.uses_decode(spec, None)  # decoded here; its regular forward: Triton's
        if (spec.L % spec.q_block_size and not short) or spec.S % spec.kv_block_size:
            return (
                f"lengths that are multiples of the blocks (L={spec.L}, S={spec.S}, "
                f"blocks {spec.q_block_size} x {spec.kv_block_size})"
            )
        if spec.global_offsets:
            return "calls without index offsets only (no shards, chunks or decode positions)"
        for program in mods.programs:
            kinds = read_kinds(program)
            if isinstance(kinds, str):
                return kinds
        return TRITON.supports(spec, mods)  # the fallback of the kernels that refuse a call

    def auto(self, spec: KernelSpec, mods: Mods) -> str | None:
        if spec.interpret:
            return "interpret mode (the Triton kernels interpret much faster; force it by name)"
        if spec.L % spec.q_block_size:
            return "short queries: the Mosaic GPU decode kernel has not been measured faster"
        return self.supports(spec, mods)

    def auto_options(self, spec: KernelSpec, mods: Mods) -> dict:
        """Under AUTO, a mask_mod dividing its indices (2-D neighbourhoods: natten, sasa)
        takes Triton's forward and this backend's backward, each the faster there (H200, seed
        table, `_TRITON_FWD_WHY`)."""
        return {"MOSAIC_TRITON_FWD": True} if _divides_indices(mods.mask) else {}

    def configs(self, spec, mods, options, decode):
        triton = TRITON.configs(spec, mods, {}, decode)
        values = {kind: {} for kind in ("fwd", "bwd", "decode")}
        for key, value in options.items():
            kind, field = _OPTIONS[key]
            values[kind][field] = value
        # Triton's forward when asked or when this one refuses the call (whatever was asked)
        if fwd_refusal(spec) is not None or values["fwd"].get("triton_fwd", False):
            values["fwd"].update(triton_fwd=True, triton=triton.fwd)
        fwd = default_config(spec, **values["fwd"])
        if not fwd.triton_fwd and smem_bytes(spec, fwd) > SMEM_BYTES:
            raise ValueError(
                f"kernel_options MOSAIC_STAGES={fwd.stages}: a K/V ring of {fwd.stages} tiles of "
                f"{spec.kv_block_size} x {spec.E} needs {smem_bytes(spec, fwd)} bytes of shared "
                f"memory with Q, more than the {SMEM_BYTES} an sm90 CTA has; use fewer stages"
            )
        try:
            bwd = mosaic_bwd.default_config(spec, triton=triton.bwd, **values["bwd"])
        except ValueError as e:
            given = ", ".join(f"{k}={v}" for k, v in options.items() if _OPTIONS[k][0] == "bwd")
            raise ValueError(f"kernel_options {given}: {e}") from None
        fused_need = mosaic_bwd.smem_bytes(spec, bwd, fused=True)
        if values["bwd"].get("fused_dq") and fused_need > SMEM_BYTES:  # asked: never dropped
            raise ValueError(
                f"kernel_options MOSAIC_FUSED_DQ=True: the dk/dv kernel with dq's buffers and a "
                f"ring of {mosaic_bwd.dkdv_ring(bwd)} would need {fused_need} bytes of shared "
                f"memory, more than the {SMEM_BYTES} an sm90 CTA has; use fewer stages "
                "(MOSAIC_BWD_DKDV_STAGES, MOSAIC_BWD_STAGES) or MOSAIC_FUSED_DQ=False"
            )
        why = mosaic_bwd.config_refusal(spec, bwd)
        if why is not None:
            raise ValueError(f"kernel_options MOSAIC_BWD_DKDV_Q_ROWS={bwd.dkdv_q_rows}: {why}")
        rings = {"dq": ("MOSAIC_BWD_STAGES", bwd.stages)}
        if bwd.dkdv_stages is None:
            rings["dkdv"] = rings["dq"]
        else:
            rings["dkdv"] = ("MOSAIC_BWD_DKDV_STAGES", bwd.dkdv_stages)
        for kernel, need in mosaic_bwd.smem_by_kernel(spec, bwd).items():
            if need > SMEM_BYTES:
                key, depth = rings[kernel]
                raise ValueError(
                    f"kernel_options {key}={depth}: the backward's {kernel} kernel would need "
                    f"{need} bytes of shared memory for its ring, more than the {SMEM_BYTES} "
                    "an sm90 CTA has; use fewer stages"
                )
        dec = None
        if decode:
            sms = triton_configs.sm_count()
            dec = mosaic_decode.decode_config(spec, values["decode"], sms, triton.decode)
        return dispatch.KernelConfigs(fwd=fwd, bwd=bwd, decode=dec)

    def candidates(self, kind, spec, mods, fixed):
        if kind == "bwd":  # the Triton fallback's space; the Mosaic fields as fixed (or defaults)
            own = {f: fixed[key] for key, (k, f) in _OPTIONS.items() if k == "bwd" and key in fixed}
            mine = mosaic_bwd.default_config(spec, **own)  # every field, so config_from rebuilds it
            own = {f.name: getattr(mine, f.name) for f in dataclasses.fields(mine) if f.name != "triton"}  # fmt: skip
            for values, cfg in TRITON.candidates(kind, spec, mods, {}):
                yield {**values, **own}, dataclasses.replace(mine, triton=cfg)
            return
        # (the forward: Triton's, for a short query or when asked)
        if kind != "fwd" or fwd_refusal(spec) or fixed.get("MOSAIC_TRITON_FWD"):
            for values, cfg in TRITON.candidates(kind, spec, mods, {}):
                yield ({**values, "triton": True}, FwdConfig(triton_fwd=True, triton=cfg)) if kind == "fwd" else (values, cfg)  # fmt: skip
            return
        stages = [fixed["MOSAIC_STAGES"]] if "MOSAIC_STAGES" in fixed else [2, 3, 4]
        both = lambda key: [fixed[key]] if key in fixed else [True, False]
        kept = {"longest_first": fixed["MOSAIC_LONGEST_FIRST"]} if "MOSAIC_LONGEST_FIRST" in fixed else {}  # fmt: skip
        for s in stages:
            for sb in both("MOSAIC_SCHEDULE_BARRIER"):
                for pipe in both("MOSAIC_PIPELINED"):
                    values = {"stages": s, "schedule_barrier": sb, "pipelined": pipe, **kept}
                    if smem_bytes(spec, FwdConfig(**values)) <= SMEM_BYTES:
                        yield values, FwdConfig(**values)

    def config_from(self, kind, values):
        if kind == "bwd":
            own = {f for k, f in _OPTIONS.values() if k == "bwd"}
            mine = {key: value for key, value in values.items() if key in own}
            rest = {key: value for key, value in values.items() if key not in own}
            return mosaic_bwd.BwdConfig(**mine, triton=TRITON.config_from(kind, rest))
        if kind == "fwd" and values.get("triton"):
            values = {key: value for key, value in values.items() if key != "triton"}
            return FwdConfig(triton_fwd=True, triton=TRITON.config_from(kind, values))
        return FwdConfig(**values) if kind == "fwd" else TRITON.config_from(kind, values)

    def fwd(self, q, k, v, tables, mods, offsets, *, spec, cfg: FwdConfig):
        if cfg.triton_fwd:  # (`configs` sets it where `fwd_refusal` refuses the call)
            return TRITON.fwd(q, k, v, tables, mods, offsets, spec=spec, cfg=cfg.triton)
        return flex_fwd(q, k, v, tables, mods, offsets, spec=spec, cfg=cfg)

    def decode(self, q, k, v, tables, mods, offsets, *, spec, cfg):
        if mosaic_decode.decode_refusal(spec, mods, cfg) is None:
            return mosaic_decode.flex_decode(q, k, v, tables, mods, offsets, spec=spec, cfg=cfg)
        return TRITON.decode(q, k, v, tables, mods, offsets, spec=spec, cfg=cfg.triton)

    def bwd(self, q, k, v, do, lse, delta, tables, mods, offsets, *, spec, cfg, grad_slots):
        if mosaic_bwd.bwd_refusal(spec, mods, grad_slots, cfg) is None:
            dq, dk, dv = mosaic_bwd.flex_bwd(q, k, v, do, lse, delta, tables, mods, spec=spec,
                                             cfg=cfg)  # fmt: skip
            return dq, dk, dv, []
        return TRITON.bwd(
            q, k, v, do, lse, delta, tables, mods, offsets, spec=spec, cfg=cfg.triton,
            grad_slots=grad_slots,
        )  # fmt: skip

    def kernels(self, spec: KernelSpec, mods: Mods, grad_slots=(), auto: bool = False) -> dict:
        """Which backend runs each kernel of a call on this backend, and why not this one;
        auto: as it runs when AUTO picks it (with `auto_options`; whether AUTO picks it is
        `auto`'s word), not as a call naming this backend."""
        decode_cfg = mosaic_decode.decode_config(spec, {}, 132, None)
        asked = auto and self.auto_options(spec, mods).get("MOSAIC_TRITON_FWD", False)
        refusals = {
            "fwd": fwd_refusal(spec) or (_TRITON_FWD_WHY if asked else None),
            "bwd": mosaic_bwd.bwd_refusal(spec, mods, grad_slots, mosaic_bwd.default_config(spec)),
            "decode": mosaic_decode.decode_refusal(spec, mods, decode_cfg),
        }
        return {
            kernel: self.name if why is None else f"{TRITON.name} ({why})"
            for kernel, why in refusals.items()
        }


MOSAIC_GPU = MosaicGpuBackend()
dispatch.register(MOSAIC_GPU)
