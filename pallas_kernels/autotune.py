"""Autotuning of the forward and backward kernel configs, with an on-disk cache.

`kernel_options={"autotune": True}` makes flex_attention time the chosen
backend's space of configs (`Backend.candidates`: for Triton, tiles, warps
and stages) for the call's exact static setup and keep the fastest, as
torch.compile's max-autotune does for FlexAttention. Tuning runs once per
key; the result is kept in memory and in a JSON file, so later processes
start tuned:

    key = GPU name, jax version, backend, kernel (fwd / bwd), the KernelSpec
          (sizes, dtype, block sizes, GQA, broadcasts), the mods' programs,
          and the kernel_options given

The file is `$FLEXJAX_CACHE_DIR/autotune.json` (default
`~/.cache/flexjax/autotune.json`); a missing or unreadable file only means
tuning again. Options given explicitly in kernel_options are fixed: the
search covers the others.

Timing uses fresh random q, k, v (and dout) of the call's shapes and dtype,
run eagerly even when flex_attention is being traced (on a thread of its own). The BlockMask tables and captured mod arrays are used
as given when they are concrete; when flex_attention is traced under jit
with a traced BlockMask, the search walks every block of the same table
shapes instead (and captured arrays are zeros), so the pick reflects the
kernel's cost per block rather than this mask's sparsity.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import vjp
from pallas_kernels.dispatch import Backend, KernelConfigs
from pallas_kernels.runtime import median_ms
from pallas_kernels.spec import BlockTables, KernelSpec, Mods

__all__ = ["cache_path", "clear_memory_cache", "stats", "tune"]

_REPS = 10
_memory: dict[str, dict] = {}
stats = {"timed": 0, "from_file": 0}  # configs timed; keys found in the file (tests use these)


def cache_path() -> str:
    root = os.environ.get("FLEXJAX_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "flexjax"
    )
    return os.path.join(root, "autotune.json")


def clear_memory_cache() -> None:
    """Forget tuned configs held in memory (the file stays)."""
    _memory.clear()


def _key(backend: Backend, kernel: str, spec: KernelSpec, mods: Mods, fixed: dict) -> str:
    device = jax.devices()[0].device_kind if not spec.interpret else "interpret"
    programs = [getattr(p, "key", None) for p in mods.programs]
    text = f"{device}|jax {jax.__version__}|{backend.name}|{kernel}|{spec}|{programs}|"
    text += f"{backend.config_version}|"
    text += f"{sorted(fixed.items())}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _read_file() -> dict:
    try:
        with open(cache_path()) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(
            f"flexjax autotune cache {cache_path()} unreadable ({e}); tuning again", stacklevel=2
        )
        return {}


def _write_file(key: str, entry: dict) -> None:
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _read_file()
        data[key] = entry
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file
    except OSError as e:
        warnings.warn(
            f"flexjax autotune cache {path} not writable ({e}); kept in memory only", stacklevel=2
        )


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _timing_inputs(spec, q, k, v, tables, mods):
    """Concrete stand-ins for the call's arrays (see the module docstring)."""
    rng = np.random.default_rng(0)
    fresh = lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype)
    q, k, v = fresh(q), fresh(k), fresh(v)
    if not all(_concrete(t) for t in tables):
        tables = _dense_walk_tables(spec, tables)
    stand_in = lambda c: c if _concrete(c) else jnp.zeros(c.shape, c.dtype)
    mods = jax.tree.map(stand_in, mods)
    return q, k, v, tables, mods


def _dense_walk_tables(spec: KernelSpec, tables: BlockTables) -> BlockTables:
    """Tables of the same shapes in which every block is visited once.

    The visits go to the partial tables when the call has partial blocks (a
    mask_mod to evaluate), else to the full ones (no block mask).
    """

    def visit_all(num, idx, visit: bool):
        n = idx.shape[-1]
        return (
            jnp.full(num.shape, n if visit else 0, jnp.int32),
            jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), idx.shape),
        )

    out = []
    for view in (tables.rows, tables.cols):
        out += visit_all(view.num_blocks, view.indices, spec.has_partial)
        out += visit_all(view.full_num_blocks, view.full_indices, not spec.has_partial)
    return BlockTables(*out)


def _search(kernel, candidates, run):
    best, best_ms, tried = None, float("inf"), []
    for values, cfg in candidates:
        try:
            ms = median_ms(lambda cfg=cfg: run(cfg), _REPS)
        except Exception as e:  # a config that does not compile is skipped
            tried.append(dict(config=values, failed=f"{type(e).__name__}: {str(e)[:120]}"))
            continue
        stats["timed"] += 1
        tried.append(dict(config=values, ms=ms))
        if ms < best_ms:
            best, best_ms = values, ms
    if best is None:
        raise RuntimeError(f"flexjax autotune: no {kernel} config compiled; tried {tried}")
    return best, best_ms, tried


def _cached(keys) -> None:
    """Move the keys found in the file into memory."""
    if all(key in _memory for key in keys):
        return
    on_file = _read_file()
    for key in keys:
        if key not in _memory and isinstance(on_file.get(key), dict):
            _memory[key] = on_file[key]
            stats["from_file"] += 1


def tune(
    backend: Backend, spec: KernelSpec, mods: Mods, q, k, v, tables: BlockTables, offsets,
    options: dict, decode: bool,
) -> KernelConfigs:  # fmt: skip
    """The call's KernelConfigs: forward and backward cached or timed now, decode by default.

    q, k, v: the arrays (or tracers) the kernels will get; options: the
    backend's kernel_options, held fixed.
    """
    keys = {kind: _key(backend, kind, spec, mods, options) for kind in ("fwd", "bwd")}
    _cached(keys.values())
    # JAX's trace state is per thread: on a thread of its own the search runs and times
    # kernels even while a user's jit is tracing this call (here, it would stage them).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(
            _tune_missing, backend, spec, mods, q, k, v, tables, offsets, options, keys
        ).result()
    defaults = backend.configs(spec, mods, options, decode)
    return KernelConfigs(
        fwd=backend.config_from("fwd", _memory[keys["fwd"]]["config"]),
        bwd=backend.config_from("bwd", _memory[keys["bwd"]]["config"]),
        decode=defaults.decode,
    )


def _tune_missing(backend, spec, mods, q, k, v, tables, offsets, options, keys) -> None:
    """Time the kernels whose keys are not cached yet, and cache the fastest configs."""
    inputs = None
    if offsets is not None and not _concrete(offsets):
        offsets = jnp.zeros(offsets.shape, jnp.int32)  # stand-ins: the mods read index 0

    def record(kind, best, ms, tried):
        _memory[keys[kind]] = entry = dict(config=best, ms=ms, tried=tried, spec=str(spec))
        _write_file(keys[kind], entry)

    if keys["fwd"] not in _memory:
        inputs = _timing_inputs(spec, q, k, v, tables, mods)
        tq, tk, tv, tt, tm = inputs
        run = lambda cfg: backend.fwd(tq, tk, tv, tt.rows, tm, offsets, spec=spec, cfg=cfg)
        record("fwd", *_search("forward", backend.candidates("fwd", spec, mods, options), run))
    if keys["bwd"] not in _memory:
        fwd_cfg = backend.config_from("fwd", _memory[keys["fwd"]]["config"])
        tq, tk, tv, tt, tm = inputs or _timing_inputs(spec, q, k, v, tables, mods)
        out, lse = backend.fwd(tq, tk, tv, tt.rows, tm, offsets, spec=spec, cfg=fwd_cfg)
        dout = jnp.asarray(np.random.default_rng(1).standard_normal(out.shape), out.dtype)
        delta, lse_b = vjp.preprocess(out, dout, lse, None)
        run = lambda cfg: backend.bwd(
            tq, tk, tv, dout, lse_b, delta, tt, tm, offsets, spec=spec, cfg=cfg, grad_slots=()
        )[:3]
        record("bwd", *_search("backward", backend.candidates("bwd", spec, mods, options), run))
