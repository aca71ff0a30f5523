"""The seed's `test_mask` table for every example, with flexjax rows, torch and JAX in one run.

Rows per example (each where it can express the example):
  causal FA2     torch SDPA with is_causal=True: the speed of plain causal attention
  F.sdpa + mask  torch SDPA given the dense mask (torch create_mask); for a score_mod
                 example the mask is where the mod is not -inf, so it computes the
                 example only when the example is a pure mask ("n/a" otherwise)
  FlexAttention  torch flex_attention under torch.compile
  jax cuDNN      jax.nn.dot_product_attention(implementation="cudnn"): no mask, causal,
                 or a causal sliding window
  flexjax        flexjax.flex_attention (Pallas kernels; AUTO's backend choice)
  flexjax <B>    with --backends: the same call pinned to kernel backend B
                 (kernel_options BACKEND; "refused: ..." where B cannot run it)

Columns: FW ms, FW TFLOP/s, BW ms (backward alone), BW TFLOP/s, density, check.
FLOPs count the useful work of the example: forward 4 * B * H * Q_LEN * KV_LEN * D
* density (two matmuls, q k^T and p v, 2 FLOPs per multiply-add), backward 10 *
... (five matmuls: q k^T again, dv = p^T do, dp = do v^T, dq = ds k, dk = ds^T q),
with density = the fraction of the scores in computed blocks (BlockMask.density:
1 - sparsity, with edge blocks clipped to the sequences); "causal FA2" uses the causal
density. check: flexjax's out, dq, dk, dv against torch FlexAttention's (max
error / max magnitude); F.sdpa + mask against FlexAttention where comparable.

Timing: torch with triton.testing.do_bench (CUDA events, median); JAX with the
median of synchronised repetitions after a warm-up. With --timer loop, both
libraries the same way instead (back-to-back calls, one sync; bench/timing.py
says how the two differ). Backward alone: torch
`out.backward(dout, retain_graph=True)`, JAX the jitted pullback of `jax.vjp`.

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 bench/seed_table.py \\
        --out bench/results/seed_table_h100_<date>
writes <out>.md, <out>.json and <out>.png. With no GPU it runs the small sizes
(torch eager, forward only for FlexAttention, flexjax in interpret mode): a
smoke test of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as tfa

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import torch_twins  # noqa: E402
from report import meta_info  # noqa: E402
from timing import TIMERS  # noqa: E402

import flexjax as fj  # noqa: E402
from flexjax.examples import EXAMPLES  # noqa: E402
from pallas_kernels.dispatch import BackendUnavailable  # noqa: E402
from pallas_kernels.runtime import has_gpu  # noqa: E402
from torch_bridge import tensor_to_jax  # noqa: E402

IMPLS = ("causal FA2", "F.sdpa + mask", "FlexAttention", "jax cuDNN", "flexjax")
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def rel_err(ours, theirs) -> float:
    ours = torch.as_tensor(np.asarray(ours, np.float32)) if not torch.is_tensor(ours) else ours
    ours, theirs = ours.detach().float().cpu(), theirs.detach().float().cpu()
    if not torch.isfinite(ours).all():
        return float("inf")
    return (ours - theirs).abs().max().item() / max(theirs.abs().max().item(), 1e-6)


# Which timers the rows use: "default" (torch do_bench, JAX synchronised calls) or
# "loop" (both libraries timed the same way: back-to-back calls, one sync; see timing.py).
def torch_row(name, fwd_fn, inputs, dout, reps, gpu, backward=True, timer="default"):
    """(fw_ms, bw_ms, out, grads) of a torch attention callable.

    The backward is timed by repeating `out.backward(retain_graph=True)`, which a compiled
    backward with donated buffers refuses (torch 2.11): donation is turned off for it.
    """
    torch._functorch.config.donated_buffer = False
    timed = TIMERS[timer][0]
    if not backward:  # torch's CPU flex_attention refuses inputs that require grad
        inputs = tuple(x.detach() for x in inputs)
        with torch.no_grad():
            fw = timed(lambda: fwd_fn(*inputs), reps, gpu)
            return fw, None, fwd_fn(*inputs), None
    fw = timed(lambda: fwd_fn(*inputs), reps, gpu)
    out = fwd_fn(*inputs)
    bw = timed(lambda: out.backward(dout, retain_graph=True), reps, gpu, inputs)
    grads = torch.autograd.grad(out, inputs, dout)
    return fw, bw, out.detach(), grads


def jax_row(attend, q, k, v, dout, reps, timer="default"):
    timed = TIMERS[timer][1]
    kern = jax.jit(attend)
    fw = timed(lambda: kern(q, k, v), reps)
    out, pullback = jax.vjp(attend, q, k, v)
    bwd = jax.jit(lambda pullback, dout: pullback(dout))
    bw = timed(lambda: bwd(pullback, dout), reps)
    return fw, bw, out, bwd(pullback, dout)


def cudnn_attend(name, case):
    """jax.nn.dot_product_attention on cuDNN, where the example is one of its masks."""
    window = None
    if name == "noop":
        causal = False
    elif name in ("causal", "causal_bias"):
        causal = True
    elif name == "sliding_window":
        causal, window = True, (case.KV_LEN // 8, 0)
    else:
        return None

    def attend(q, k, v):  # [B, H, T, D] in and out; cuDNN wants [B, T, H, D]
        t = lambda x: jnp.swapaxes(x, 1, 2)
        out = jax.nn.dot_product_attention(
            t(q), t(k), t(v), is_causal=causal, local_window_size=window, implementation="cudnn"
        )
        return t(out)

    return attend


def run_example(name, scale, reps, gpu, overrides=None, timer="default", impls=None,
                backends=()):  # fmt: skip
    """One example's rows; impls: the rows to time (FlexAttention and flexjax always run);
    backends: kernel backends to time flexjax on, one row each."""
    impls = set(IMPLS if impls is None else impls) | {"FlexAttention", "flexjax"}
    case = EXAMPLES[name].case(scale, **(overrides or {}))
    dev = "cuda" if gpu else "cpu"
    dtype = TORCH_DTYPES[jnp.dtype(case.dtype).name]
    B, H, L, S, D = case.B, case.H, case.Q_LEN, case.KV_LEN, case.D
    torch.manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, device=dev, dtype=dtype).requires_grad_()
    q, k, v = mk(B, H, L, D), mk(B, H, S, D), mk(B, H, S, D)
    dout = torch.randn(B, H, L, D, device=dev, dtype=dtype)
    prev = torch.get_default_device()
    torch.set_default_device(dev)  # the twins' captured tensors live on the device
    try:
        score_twin, mask_twin = torch_twins.twin(name, H, S)
    finally:
        torch.set_default_device(prev)
    t_bm = dense = bm = None
    if mask_twin is not None:
        t_bm = tfa.create_block_mask(mask_twin, 1, 1, L, S, device=dev)
        if "F.sdpa + mask" in impls:
            dense = tfa.create_mask(mask_twin, 1, 1, L, S, device=dev)
        bm = fj.create_block_mask(case.mask_mod, 1, 1, L, S)
    elif score_twin is not None and case.sdpa_comparable and "F.sdpa + mask" in impls:
        dense = tfa.create_mask(score_twin, 1, 1, L, S, device=dev)
    density = 1.0 if bm is None else bm.density()
    R = -(-L // 128)
    causal_density = (R + 1) / (2 * R)
    flops = 4 * B * H * L * S * D
    results = {}

    def add(impl, fw, bw, d, check, note=""):
        results[impl] = dict(
            impl=impl, fw_ms=fw, bw_ms=bw, density=d, check=check, note=note,
            fw_tflops=None if fw is None else flops * d / fw / 1e9,
            bw_tflops=None if bw is None else 2.5 * flops * d / bw / 1e9,
        )  # fmt: skip

    if L == S and "causal FA2" in impls:
        sdpa_causal = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        fw, bw, _, _ = torch_row(name, sdpa_causal, (q, k, v), dout, reps, gpu, timer=timer)
        add("causal FA2", fw, bw, causal_density, None, "speed reference, not this mask")
    sdpa_mask = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    if "F.sdpa + mask" in impls:
        fw, bw, sdpa_out, sdpa_grads = torch_row(
            name, sdpa_mask, (q, k, v), dout, reps, gpu, timer=timer
        )

    torch._dynamo.reset()  # past its recompile limit torch falls back to a dense eager path
    flex = torch.compile(tfa.flex_attention, dynamic=False) if gpu else tfa.flex_attention
    flex_fn = lambda q, k, v: flex(q, k, v, score_mod=score_twin, block_mask=t_bm)
    t_fw, t_bw, t_out, t_grads = torch_row(
        name, flex_fn, (q, k, v), dout, reps, gpu, backward=gpu, timer=timer
    )
    sdpa_check = None
    if case.sdpa_comparable and "F.sdpa + mask" in impls:
        sdpa_check = rel_err(sdpa_out, t_out)
        if t_grads is not None:
            sdpa_check = max(
                [sdpa_check] + [rel_err(a, b) for a, b in zip(sdpa_grads, t_grads, strict=True)]
            )
    if "F.sdpa + mask" in impls:
        add("F.sdpa + mask", fw, bw, density, sdpa_check, "" if case.sdpa_comparable else "n/a")
    add("FlexAttention", t_fw, t_bw, density, None, "" if gpu else "eager, forward only")

    jq, jk, jv, jdout = (tensor_to_jax(x, "input") for x in (q, k, v, dout))
    cudnn = cudnn_attend(name, case) if gpu and "jax cuDNN" in impls else None
    if cudnn is not None:
        try:
            fw, bw, _, _ = jax_row(cudnn, jq, jk, jv, jdout, reps, timer)
            # causal_bias is a causal mask written as a score_mod: cuDNN computes it causally.
            add("jax cuDNN", fw, bw, causal_density if name == "causal_bias" else density, None)
        except Exception as e:  # an unsupported cuDNN configuration is a row, not a crash
            add("jax cuDNN", None, None, density, None, f"failed: {type(e).__name__}")
    attend = lambda q, k, v: fj.flex_attention(q, k, v, case.score_mod, bm)
    fw, bw, out, grads = jax_row(attend, jq, jk, jv, jdout, reps, timer)
    check = rel_err(out, t_out)
    if t_grads is not None:
        check = max([check] + [rel_err(a, b) for a, b in zip(grads, t_grads, strict=True)])
    add("flexjax", fw, bw, density, check)
    for backend in backends:
        options = {"BACKEND": backend}
        pinned = lambda q, k, v, o=options: fj.flex_attention(
            q, k, v, case.score_mod, bm, kernel_options=o
        )
        try:
            fw, bw, out, grads = jax_row(pinned, jq, jk, jv, jdout, reps, timer)
        except BackendUnavailable as e:
            add(f"flexjax {backend}", None, None, density, None, f"refused: {_reason(e)}")
            continue
        check = rel_err(out, t_out)
        if t_grads is not None:
            check = max([check] + [rel_err(a, b) for a, b in zip(grads, t_grads, strict=True)])
        add(f"flexjax {backend}", fw, bw, density, check)
    shape = dict(B=B, H=H, Q_LEN=L, KV_LEN=S, D=D, dtype=str(dtype).replace("torch.", ""))
    order = [*IMPLS, *(f"flexjax {b}" for b in backends)]
    return dict(example=name, shape=shape, rows=[results[i] for i in order if i in results])


def _reason(e: Exception) -> str:
    """A backend's refusal, short enough for a table cell."""
    text = str(e).split("cannot run this call: ", 1)[-1].split(". Use BACKEND")[0]
    return text if len(text) <= 90 else text[:87] + "..."


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(meta, examples):
    lines = [
        f"# The seed's table with flexjax rows: {meta['gpu']}, {meta['date']}",
        "",
        f"{meta['gpu']} (driver {meta['driver']}), jax {meta['jax']}, torch {meta['torch']}, "
        f"triton {meta['triton']}. Scale: {meta['scale']}. Command: `{meta['command']}`.",
        "FW/BW: median ms (BW = backward alone). TFLOP/s: 4 (FW) and 10 (BW) x B·H·Q·KV·D x "
        "density. check: max error / max magnitude vs torch FlexAttention (out and grads).",
        "",
    ]
    if meta.get("timer") == "loop":
        lines += [
            "Timer: loop (both libraries: back-to-back calls, one sync, median of 3 loops).",
            "",
        ]
    if meta.get("note"):
        lines += [f"**{meta['note']}**", ""]
    for ex in examples:
        s = ex["shape"]
        lines += [
            f"## {ex['example']}  (B={s['B']} H={s['H']} Q_LEN={s['Q_LEN']} KV_LEN={s['KV_LEN']} "
            f"D={s['D']} {s['dtype']})",
            "",
            "| implementation | FW ms | FW TFLOP/s | BW ms | BW TFLOP/s | density | check |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in ex["rows"]:
            check = r["note"] or ("-" if r["check"] is None else f"{r['check']:.1e}")
            if r["check"] is not None and r["note"]:
                check = f"{r['check']:.1e} ({r['note']})"
            lines.append(
                f"| {r['impl']} | {fmt(r['fw_ms'], '.3f')} | {fmt(r['fw_tflops'], '.0f')} | "
                f"{fmt(r['bw_ms'], '.3f')} | {fmt(r['bw_tflops'], '.0f')} | "
                f"{r['density']:.3f} | {check} |"
            )
        lines.append("")
    lines += [
        "## flexjax / torch FlexAttention time ratio",
        "",
        "| example | FW | BW |",
        "|---|---|---|",
    ]
    pinned = (
        [r["impl"] for r in examples[0]["rows"] if r["impl"].startswith("flexjax ")]
        if examples
        else []
    )
    if pinned:  # one FW and one BW ratio per pinned backend
        lines[-2] = "| example | FW | BW | " + " | ".join(f"{p} FW | {p} BW" for p in pinned) + " |"
        lines[-1] = "|---|---|---|" + "---|---|" * len(pinned)
    ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}"
    for ex in examples:
        rows = {r["impl"]: r for r in ex["rows"]}
        t = rows["FlexAttention"]
        cells = []
        for impl in ["flexjax", *pinned]:
            j = rows.get(impl, {"fw_ms": None, "bw_ms": None})
            cells += [ratio(j["fw_ms"], t["fw_ms"]), ratio(j["bw_ms"], t["bw_ms"])]
        lines.append(f"| {ex['example']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(meta, examples, path):
    """Top: flexjax / torch FlexAttention time ratio per example; bottom: both times, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [ex["example"] for ex in examples]
    x = np.arange(len(names))

    def times(impl, key):
        rows = [next(r for r in ex["rows"] if r["impl"] == impl) for ex in examples]
        return np.array([np.nan if r[key] is None else r[key] for r in rows], float)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(9, 0.8 * len(names) + 4), 9), sharex=True)
    for off, key, label, color in (
        (-0.2, "fw_ms", "forward", "#2a6fdb"),
        (0.2, "bw_ms", "backward", "#f28e2b"),
    ):
        ratio = times("flexjax", key) / times("FlexAttention", key)
        bars = top.bar(x + off, ratio, 0.4, label=label, color=color)
        for bar, r in zip(bars, ratio, strict=True):
            if np.isfinite(r):
                top.annotate(f"{r:.2f}", (bar.get_x() + bar.get_width() / 2, r), ha="center",
                             va="bottom", fontsize=8)  # fmt: skip
    top.axhline(1.0, color="black", lw=1, ls="--")
    top.set_yscale("log", base=2)  # ratios: 2x slower and 2x faster sit equally far from 1
    top.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    top.set_ylabel("flexjax time / torch time (log scale)")
    top.set_title("flexjax / torch FlexAttention time ratio (below 1: flexjax faster)")
    top.legend()
    top.grid(axis="y", alpha=0.3)
    series = (
        ("FlexAttention", "fw_ms", "torch FW", "#ee4c2c", -0.3),
        ("flexjax", "fw_ms", "flexjax FW", "#2a6fdb", -0.1),
        ("FlexAttention", "bw_ms", "torch BW", "#f4a582", 0.1),
        ("flexjax", "bw_ms", "flexjax BW", "#92c5de", 0.3),
    )
    for impl, key, label, color, off in series:
        bottom.bar(x + off, times(impl, key), 0.2, label=label, color=color)
    bottom.set_yscale("log")
    bottom.set_ylabel("ms (log scale, lower is better)")
    bottom.set_title("median times")
    bottom.legend(ncol=4, fontsize=8)
    bottom.grid(axis="y", alpha=0.3, which="both")
    bottom.set_xticks(x, names, rotation=30, ha="right")
    fig.suptitle(f"{meta['gpu']}, {meta['scale']} sizes, {meta['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", nargs="+", default=list(EXAMPLES), choices=list(EXAMPLES))
    p.add_argument("--scale", choices=["auto", "seed", "small"], default="auto")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", default=None, help="path prefix for .md, .json and .png")
    p.add_argument("--from-json", default=None, help="re-render a saved run's .md and .png")
    p.add_argument(
        "--budget-s", type=float, default=None, help="start no new example after this many seconds"
    )
    for dim in ("B", "H", "S", "D"):
        p.add_argument(f"--{dim}", type=int, default=None, help=f"override the examples' {dim}")
    p.add_argument("--dtype", default=None, choices=list(TORCH_DTYPES), help="override the dtype")
    p.add_argument(
        "--timer", choices=list(TIMERS), default="default",
        help="default: torch do_bench, JAX synchronised calls; loop: both back to back",
    )  # fmt: skip
    p.add_argument(
        "--impls", nargs="+", choices=IMPLS, default=None,
        help="rows to time (default: all); FlexAttention and flexjax always run",
    )  # fmt: skip
    p.add_argument(
        "--backends", default="",
        help="comma-separated kernel backends (TRITON,MOSAIC_GPU): a flexjax row pinned to each",
    )  # fmt: skip
    args = p.parse_args(argv)
    backends = tuple(b.strip().upper() for b in args.backends.split(",") if b.strip())
    overrides = {d: getattr(args, d) for d in ("B", "H", "S", "D") if getattr(args, d)}
    if args.dtype:
        overrides["dtype"] = jnp.dtype(args.dtype)
    if args.from_json:
        with open(args.from_json) as fh:
            saved = json.load(fh)
        prefix = args.out or args.from_json.removesuffix(".json")
        with open(prefix + ".md", "w") as fh:
            fh.write(markdown(saved["meta"], saved["examples"]))
        chart(saved["meta"], saved["examples"], prefix + ".png")
        return
    gpu = torch.cuda.is_available() and has_gpu()
    scale = args.scale if args.scale != "auto" else ("seed" if gpu else "small")
    reps = args.reps or (20 if gpu else 1)
    meta = dict(meta_info(scale, gpu), timer=args.timer)
    examples = []
    t_start = time.perf_counter()
    for i, name in enumerate(args.examples, 1):
        if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
            print(f"time budget spent: not run {args.examples[i - 1 :]}", flush=True)
            break
        t0 = time.perf_counter()
        examples.append(
            run_example(name, scale, reps, gpu, overrides, args.timer, args.impls, backends)
        )
        print(f"[{i}/{len(args.examples)}] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
        if args.out:  # keep what is done if a later example fails or time runs out
            with open(args.out + ".json", "w") as fh:
                json.dump(dict(meta=meta, examples=examples), fh, indent=2)
    text = markdown(meta, examples)
    print(text)
    if args.out:
        with open(args.out + ".md", "w") as fh:
            fh.write(text)
        chart(meta, examples, args.out + ".png")


if __name__ == "__main__":
    main()
