"""First-call compile time for a new mod, and the memory peak of forward + backward, beside torch.

For each example, in a fresh process per library (so caches and allocator
peaks start clean; torch with an empty inductor cache directory):
  * cold: the first forward + backward call of the process for that example
    (trace, compile, run), after the inputs and the block mask exist;
  * new mod: then a *different* score_mod (a fresh closure with another
    constant) through the same call: the compile cost a user pays for each
    new mod in a warm process;
  * peak: the device memory peak during a forward + backward, minus the
    memory in use before it (inputs, block mask, dout), so it counts only
    what attention itself allocates (outputs, residuals, gradients,
    workspace). JAX: `memory_stats()["peak_bytes_in_use"]`; torch:
    `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 bench/bench_compile_memory.py \\
        --out bench/results/compile_memory_h100_<date>

GPU only (compile times and memory peaks in interpret mode mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

EXAMPLES = ("causal", "alibi_closure", "document", "softcap_approx")


def _jax_worker(name: str) -> dict:
    import jax
    import jax.numpy as jnp

    import flexjax as fj
    from flexjax.examples import EXAMPLES as CATALOGUE

    case = CATALOGUE[name].case("seed")
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (case.B, case.H, case.Q_LEN, case.D), case.dtype)
    k = jax.random.normal(ks[1], (case.B, case.H, case.KV_LEN, case.D), case.dtype)
    v = jax.random.normal(ks[2], (case.B, case.H, case.KV_LEN, case.D), case.dtype)
    dout = jax.random.normal(ks[3], q.shape, case.dtype)
    bm = None
    if case.mask_mod is not None:
        bm = fj.create_block_mask(case.mask_mod, 1, 1, case.Q_LEN, case.KV_LEN)
    jax.block_until_ready((q, k, v, dout, bm))
    dev = jax.devices()[0]

    def fwd_bwd(score_mod):
        def run(q, k, v, dout):
            out, pull = jax.vjp(lambda q, k, v: fj.flex_attention(q, k, v, score_mod, bm), q, k, v)
            return out, pull(dout)

        return jax.jit(run)

    base = dev.memory_stats()["bytes_in_use"]
    t0 = time.perf_counter()
    jax.block_until_ready(fwd_bwd(case.score_mod)(q, k, v, dout))
    cold = time.perf_counter() - t0
    peak = dev.memory_stats()["peak_bytes_in_use"] - base

    def shifted(score, b, h, q_idx, kv_idx, base_mod=case.score_mod):
        score = score if base_mod is None else base_mod(score, b, h, q_idx, kv_idx)
        return score * jnp.float32(0.75)

    t0 = time.perf_counter()
    jax.block_until_ready(fwd_bwd(shifted)(q, k, v, dout))
    new_mod = time.perf_counter() - t0
    return dict(cold_s=cold, new_mod_s=new_mod, peak_bytes=peak)


def _torch_worker(name: str) -> dict:
    import torch
    from torch.nn.attention import flex_attention as tfa

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import torch_twins

    from flexjax.examples import EXAMPLES as CATALOGUE

    case = CATALOGUE[name].case("seed")
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[
        case.dtype.name
    ]
    torch.set_default_device("cuda")
    score_twin, mask_twin = torch_twins.twin(name, case.H, case.KV_LEN)
    mk = lambda *s: torch.randn(*s, dtype=dtype).requires_grad_()
    q = mk(case.B, case.H, case.Q_LEN, case.D)
    k, v = mk(case.B, case.H, case.KV_LEN, case.D), mk(case.B, case.H, case.KV_LEN, case.D)
    dout = torch.randn_like(q)
    bm = None
    if mask_twin is not None:
        bm = tfa.create_block_mask(mask_twin, 1, 1, case.Q_LEN, case.KV_LEN)
    flex = torch.compile(tfa.flex_attention, dynamic=False)

    def fwd_bwd(score_mod):
        out = flex(q, k, v, score_mod=score_mod, block_mask=bm)
        return torch.autograd.grad(out, (q, k, v), dout)

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fwd_bwd(score_twin)
    torch.cuda.synchronize()
    cold = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base

    def shifted(score, b, h, q_idx, kv_idx, base_mod=score_twin):
        score = score if base_mod is None else base_mod(score, b, h, q_idx, kv_idx)
        return score * 0.75

    t0 = time.perf_counter()
    fwd_bwd(shifted)
    torch.cuda.synchronize()
    new_mod = time.perf_counter() - t0
    return dict(cold_s=cold, new_mod_s=new_mod, peak_bytes=peak)


def _run_worker(lib: str, name: str) -> dict:
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    with tempfile.TemporaryDirectory() as cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache  # a cold inductor / triton cache
        env["TRITON_CACHE_DIR"] = cache
        cmd = [sys.executable, __file__, "--worker", lib, name]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        return dict(failed=res.stderr.strip().splitlines()[-1][:200])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", nargs="+", default=list(EXAMPLES))
    p.add_argument("--out", default=None, help="path prefix for .md and .json")
    p.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        lib, name = args.worker
        print(json.dumps((_jax_worker if lib == "jax" else _torch_worker)(name)))
        return
    import jax
    import torch

    if not torch.cuda.is_available() or jax.devices()[0].platform != "gpu":
        sys.exit("bench_compile_memory.py needs a CUDA GPU seen by both JAX and torch")
    from report import meta_info, write_report

    meta = meta_info("seed", True)
    results = []
    for name in args.examples:
        row = dict(example=name, flexjax=_run_worker("jax", name), torch=_run_worker("torch", name))
        results.append(row)
        print(json.dumps(row), flush=True)

    def cell(r, key, scale, spec):
        return "failed" if "failed" in r else format(r[key] / scale, spec)

    lines = [
        f"# Compile time and memory peak: {meta['gpu']}, {meta['date']}",
        "",
        f"{meta['gpu']} (driver {meta['driver']}), jax {meta['jax']}, torch {meta['torch']}, "
        f"triton {meta['triton']}. Seed shapes. Command: `{meta['command']}`.",
        "cold: first forward+backward call in a fresh process (torch: empty inductor cache). "
        "new mod: a second, different score_mod in the same process. "
        "peak: device memory peak of forward+backward above what was in use before it.",
        "",
        "| example | flexjax cold s | torch cold s | flexjax new mod s | torch new mod s "
        "| flexjax peak GiB | torch peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    gib = 1 << 30
    for r in results:
        f, t = r["flexjax"], r["torch"]
        lines.append(
            f"| {r['example']} | {cell(f, 'cold_s', 1, '.1f')} | {cell(t, 'cold_s', 1, '.1f')} "
            f"| {cell(f, 'new_mod_s', 1, '.1f')} | {cell(t, 'new_mod_s', 1, '.1f')} "
            f"| {cell(f, 'peak_bytes', gib, '.2f')} | {cell(t, 'peak_bytes', gib, '.2f')} |"
        )
    write_report(args.out, "\n".join(lines) + "\n", dict(meta=meta, results=results))


if __name__ == "__main__":
    main()
