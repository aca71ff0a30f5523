"""Autotuning of the forward and backward kernel configs, with an on-disk cache.

`kernel_options={"autotune": True}` makes flex_attention time a space of
configs (tiles, warps, stages) for the call's exact static setup and keep the
fastest, as torch.compile's max-autotune does for FlexAttention. Tuning runs
once per key; the result is kept in memory and in a JSON file, so later
processes start tuned:

    key = GPU name, jax version, kernel (fwd / bwd), padded shapes, dtype,
          and the static call (lengths, block sizes, GQA, mods' programs)

The file is `$FLEXJAX_CACHE_DIR/autotune.json` (default
`~/.cache/flexjax/autotune.json`); a missing or unreadable file only means
tuning again. Options given explicitly in kernel_options are fixed: the
search covers the others.

Timing uses fresh random q, k, v (and dout) of the call's shapes and dtype,
run outside any trace. The BlockMask tables and captured mod arrays are used
as given when they are concrete; when flex_attention is traced under jit
with a traced BlockMask, the search walks every block of the same table
shapes instead (and captured arrays are zeros), so the pick reflects the
kernel's cost per block rather than this mask's sparsity.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.configs import tiles_divide
from pallas_kernels.flex_bwd_triton import BwdConfig, flex_bwd, preprocess
from pallas_kernels.flex_fwd_triton import FwdConfig, FwdStatic, flex_fwd

__all__ = ["SPACES", "cache_path", "clear_memory_cache", "stats", "tune"]

# Searched values per kernel; explicitly given kernel_options are held fixed.
SPACES = {
    "gpu": {
        "fwd": dict(block_m=(64, 128), block_n=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3)),
        "bwd": dict(block_m=(32, 64, 128), block_n=(64, 128), num_warps=(4, 8), num_stages=(1, 2)),
    },
    # Interpret mode: a tiny space, so CPU tests exercise the mechanism.
    "interpret": {
        "fwd": dict(block_m=(32, 64), block_n=(32,), num_warps=(4,), num_stages=(1,)),
        "bwd": dict(block_m=(32,), block_n=(32, 64), num_warps=(4,), num_stages=(1,)),
    },
}
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


def _static_key(st: FwdStatic) -> str:
    parts = []
    for name in FwdStatic.__dataclass_fields__:
        value = getattr(st, name)
        parts.append(f"{name}={getattr(value, 'key', value)}")
    return ";".join(parts)


def _key(kernel: str, st: FwdStatic, shapes: tuple, dtype, fixed: dict) -> str:
    device = jax.devices()[0].device_kind if not st.interpret else "interpret"
    text = f"{device}|jax {jax.__version__}|{kernel}|{shapes}|{jnp.dtype(dtype).name}|"
    text += f"{sorted(fixed.items())}|{_static_key(st)}"
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


def _candidates(space, fixed, q_bs, kv_bs, q_len, interpret, both_ways=False):
    """The space's configs that the block sizes allow (both_ways: the backward's)."""
    keys = list(space)
    values = [(fixed[k],) if k in fixed else space[k] for k in keys]
    for combo in itertools.product(*values):
        c = dict(zip(keys, combo, strict=True))
        if not tiles_divide(c["block_m"], c["block_n"], q_bs, kv_bs, both_ways):
            continue
        if c["block_m"] > max(16, q_len) * 2 and "block_m" not in fixed:
            continue  # a q tile much longer than the query is padding
        if not interpret and min(c["block_m"], c["block_n"]) < 16:
            continue
        yield c


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _timing_inputs(st, q, k, v, tables, score_consts, mask_consts):
    """Concrete stand-ins for the call's arrays (see the module docstring)."""
    rng = np.random.default_rng(0)
    fresh = lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype)
    q, k, v = fresh(q), fresh(k), fresh(v)
    if not all(_concrete(t) for t in tables):
        tables = _dense_walk_tables(st, tables)
    consts = [
        c if _concrete(c) else jnp.zeros(c.shape, c.dtype) for c in (*score_consts, *mask_consts)
    ]
    return q, k, v, tuple(tables), consts[: len(score_consts)], consts[len(score_consts) :]


def _dense_walk_tables(st, tables):
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
    for i in (0, 4):  # row tables, then column tables
        out += visit_all(tables[i], tables[i + 1], st.has_partial)
        out += visit_all(tables[i + 2], tables[i + 3], not st.has_partial)
    return out


def _median_ms(fn) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(_REPS):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _search(kernel, cands, make_cfg, run):
    best, best_ms, tried = None, float("inf"), []
    for c in cands:
        try:
            ms = _median_ms(lambda c=c: run(make_cfg(c)))
        except Exception as e:  # a config that does not compile is skipped
            tried.append(dict(config=c, failed=f"{type(e).__name__}: {str(e)[:120]}"))
            continue
        stats["timed"] += 1
        tried.append(dict(config=c, ms=ms))
        if ms < best_ms:
            best, best_ms = c, ms
    if best is None:
        raise RuntimeError(f"flexjax autotune: no {kernel} config compiled; tried {tried}")
    return best, best_ms, tried


def tune(st: FwdStatic, q, k, v, tables, score_consts, mask_consts, fixed: dict, L: int):
    """(FwdConfig, BwdConfig) for this call: cached, or timed now.

    q, k, v: the padded arrays (or tracers) the kernels will get; fixed: the
    config keys the caller set explicitly (fwd and bwd_ prefixed).
    """
    space = SPACES["interpret" if st.interpret else "gpu"]
    shapes = (tuple(q.shape), tuple(k.shape), tuple(v.shape))
    fwd_fixed = {k_: fixed[k_] for k_ in space["fwd"] if k_ in fixed}
    bwd_fixed = {k_: fixed["bwd_" + k_] for k_ in space["bwd"] if "bwd_" + k_ in fixed}
    keys = (
        _key("fwd", st, shapes, q.dtype, fwd_fixed),
        _key("bwd", st, shapes, q.dtype, bwd_fixed),
    )
    if not all(key in _memory for key in keys):
        on_file = _read_file()
        for key in keys:
            if key not in _memory and isinstance(on_file.get(key), dict):
                _memory[key] = on_file[key]
                stats["from_file"] += 1
    inputs = None
    q_bs, kv_bs = st.q_block_size, st.kv_block_size

    if keys[0] not in _memory:
        inputs = _timing_inputs(st, q, k, v, tables, score_consts, mask_consts)
        tq, tk, tv, tt, tsc, tmc = inputs
        cands = _candidates(space["fwd"], fwd_fixed, q_bs, kv_bs, L, st.interpret)
        best, ms, tried = _search(
            "forward", cands, lambda c: FwdConfig(**c),
            lambda cfg: flex_fwd(tq, tk, tv, tt[:4], tsc, tmc, st=st, cfg=cfg),
        )  # fmt: skip
        _memory[keys[0]] = entry = dict(config=best, ms=ms, tried=tried, shapes=str(shapes))
        _write_file(keys[0], entry)
    fwd_cfg = FwdConfig(**_memory[keys[0]]["config"])

    if keys[1] not in _memory:
        inputs = inputs or _timing_inputs(st, q, k, v, tables, score_consts, mask_consts)
        tq, tk, tv, tt, tsc, tmc = inputs
        out, lse = flex_fwd(tq, tk, tv, tt[:4], tsc, tmc, st=st, cfg=fwd_cfg)
        dout = jnp.asarray(np.random.default_rng(1).standard_normal(out.shape), out.dtype)
        rows = tt[0].shape[2] * q_bs
        delta, lse_b = preprocess(out, dout, lse, None, st.L, rows)
        pad = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, rows - x.shape[2]), (0, 0)])
        tq_b, dout_b = pad(tq), pad(dout)
        cands = _candidates(space["bwd"], bwd_fixed, q_bs, kv_bs, L, st.interpret, both_ways=True)
        best, ms, tried = _search(
            "backward", cands, lambda c: BwdConfig(**c),
            lambda cfg: flex_bwd(
                tq_b, tk, tv, dout_b, lse_b, delta, tt, tsc, tmc, st=st, cfg=cfg, grad_slots=()
            )[:3],
        )  # fmt: skip
        _memory[keys[1]] = entry = dict(config=best, ms=ms, tried=tried, shapes=str(shapes))
        _write_file(keys[1], entry)
    bwd_cfg = BwdConfig(**_memory[keys[1]]["config"])
    return fwd_cfg, bwd_cfg
