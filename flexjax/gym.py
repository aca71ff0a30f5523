"""The gym: every seed example end to end (what `make demo` runs).

For each example of the catalogue (flexjax.examples) it builds the BlockMask,
prints its picture and sparsity, runs every available implementation, checks
each against the float32 dense reference, and prints a timing table.

Implementations: "flexjax" (the Pallas kernels, forward and custom_vjp
backward), "reference" (dense jnp, O(S^2)) and, where the example is a pure
mask, "jax.nn sdpa + mask" (`jax.nn.dot_product_attention` given the dense
mask from `create_mask`, an oracle independent of flexjax's mod code).

With no GPU it uses the catalogue's "small" sizes and says so; on a GPU it
uses the seed's sizes (`--scale seed`). Where the dense scores would not fit
(the seed's sizes), the dense implementations are skipped and flexjax's out,
dq, dk and dv are checked on two (batch, head) slices instead, against the
reference run on just those slices.

    python -m flexjax.gym                       # all examples
    python -m flexjax.gym --examples causal document --scale small
    python -m flexjax.gym --examples causal --S 512 --B 1 --H 4
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import flexjax as fj
from flexjax.examples import EXAMPLES, Case
from flexjax.reference import flex_attention_reference, head_slice, shift_score_mod
from pallas_kernels.runtime import has_gpu, median_ms

# Dense implementations hold B*H*L*S float32 scores (several copies under grad).
_DENSE_SCORE_LIMIT = 1 << 28


@dataclasses.dataclass(frozen=True)
class Row:
    example: str
    impl: str
    fw_ms: float | None
    bw_ms: float | None
    max_err: float | None  # None: not checked (see note)
    ok: bool
    note: str = ""


def _inputs(case: Case, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (case.B, case.H, case.Q_LEN, case.D), case.dtype)
    k = jax.random.normal(ks[1], (case.B, case.H, case.KV_LEN, case.D), case.dtype)
    v = jax.random.normal(ks[2], (case.B, case.H, case.KV_LEN, case.D), case.dtype)
    dout = jax.random.normal(ks[3], (case.B, case.H, case.Q_LEN, case.D), case.dtype)
    return q, k, v, dout


def _fwd_bwd(attn):
    """jitted forward, and forward+backward returning (dq, dk, dv)."""
    fwd = jax.jit(attn)

    def loss(q, k, v, dout):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) * dout.astype(jnp.float32))

    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return fwd, bwd


def _sdpa_with_mask(dense_mask):
    def attn(q, k, v):  # jax.nn wants [B, T, N, H]
        t = lambda x: jnp.swapaxes(x, 1, 2)
        out = jax.nn.dot_product_attention(t(q), t(k), t(v), mask=dense_mask, implementation="xla")
        return t(out)

    return attn


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.abs(got - want).max()) / max(float(np.abs(want).max()), 1e-6)


def _slice_errors(case: Case, block_mask, q, k, v, dout, got) -> float:
    """Max relative error of flexjax's (out, dq, dk, dv) on two (b, h) slices vs the reference."""
    errs = []
    for b0, h0 in sorted({(0, 0), (case.B - 1, case.H - 1)}):
        sl = lambda x, b0=b0, h0=h0: head_slice(x, b0, h0)
        score_mod = shift_score_mod(case.score_mod, b0, h0)
        ref = lambda q, k, v, score_mod=score_mod: flex_attention_reference(
            q, k, v, score_mod=score_mod, block_mask=block_mask
        )
        fwd, bwd = _fwd_bwd(ref)
        want = [fwd(sl(q), sl(k), sl(v)), *bwd(sl(q), sl(k), sl(v), sl(dout))]
        errs += [_rel_err(sl(g), w) for g, w in zip(got, want, strict=True)]
        del want
    return max(errs)


def run_example(
    name: str, scale: str, reps: int, show_picture: bool, tol: float, sizes: dict
) -> list[Row]:
    rows = _run_example(name, scale, reps, show_picture, tol, sizes)
    for r in rows:  # progress: each example's results as soon as they exist
        err = r.note if r.max_err is None else f"max rel err {r.max_err:.1e}"
        print(
            f"    {r.impl}: FW {r.fw_ms:.3f} ms, FW+BW {r.bw_ms:.3f} ms, {err}: "
            + ("ok" if r.ok else "FAIL")
        )
    return rows


def _run_example(
    name: str, scale: str, reps: int, show_picture: bool, tol: float, sizes: dict
) -> list[Row]:
    case = EXAMPLES[name].case(scale, **sizes)
    print(f"\n=== {name}: {EXAMPLES[name].description}")
    print(
        f"    B={case.B} H={case.H} Q_LEN={case.Q_LEN} KV_LEN={case.KV_LEN} D={case.D} "
        f"dtype={case.dtype.name}"
    )
    block_mask = None
    if case.mask_mod is not None:
        block_size = 128 if scale == "seed" else 32
        t0 = time.perf_counter()
        block_mask = fj.create_block_mask(
            case.mask_mod, 1, 1, case.Q_LEN, case.KV_LEN, BLOCK_SIZE=block_size
        )
        jax.block_until_ready(block_mask.kv_indices)
        print(f"    create_block_mask: {(time.perf_counter() - t0) * 1e3:.1f} ms (first call)")
        print(
            f"    sparsity {block_mask.sparsity():.2f}% (PyTorch's formula); computes "
            f"{100 * block_mask.density():.2f}% of the scores"
        )
        if show_picture:
            print("    " + str(block_mask).replace("\n", "\n    "))
    else:
        print("    block mask: None (every block computed)")

    q, k, v, dout = _inputs(case)
    flex = lambda q, k, v: fj.flex_attention(q, k, v, case.score_mod, block_mask)
    flex_fwd, flex_bwd = _fwd_bwd(flex)
    t0 = time.perf_counter()
    got = [flex_fwd(q, k, v), *flex_bwd(q, k, v, dout)]
    jax.block_until_ready(got)
    print(f"    flexjax forward + backward, first call: {time.perf_counter() - t0:.1f} s")
    fw = median_ms(lambda: flex_fwd(q, k, v), reps)
    fwbw = median_ms(lambda: flex_bwd(q, k, v, dout), reps)
    dense_elems = case.B * case.H * case.Q_LEN * case.KV_LEN
    if dense_elems > _DENSE_SCORE_LIMIT:
        print(f"    {dense_elems:.2e} scores do not fit densely: checking two (b, h) slices")
        err = _slice_errors(case, block_mask, q, k, v, dout, got)
        return [Row(name, "flexjax", fw, fwbw, err, err <= tol, "2 slices checked")]

    impls = {
        "reference": lambda q, k, v: flex_attention_reference(
            q, k, v, score_mod=case.score_mod, block_mask=block_mask
        )
    }
    if case.sdpa_comparable:
        dense = fj.create_mask(case.mask_mod or case.score_mod, 1, 1, case.Q_LEN, case.KV_LEN)
        impls["jax.nn sdpa + mask"] = _sdpa_with_mask(dense)

    # Oracle: the reference on float32 copies of the inputs.
    f32 = [x.astype(jnp.float32) for x in (q, k, v, dout)]
    oracle_fwd, oracle_bwd = _fwd_bwd(impls["reference"])
    want = [oracle_fwd(*f32[:3]), *oracle_bwd(*f32)]
    err = max(_rel_err(g, w) for g, w in zip(got, want, strict=True))
    rows = [Row(name, "flexjax", fw, fwbw, err, err <= tol)]
    for impl, attn in impls.items():
        fwd, bwd = _fwd_bwd(attn)
        got = [fwd(q, k, v), *bwd(q, k, v, dout)]
        # The reference in the inputs' dtype; for float32 inputs it *is* the oracle.
        is_oracle = impl == "reference" and case.dtype == jnp.float32
        err = None if is_oracle else max(_rel_err(g, w) for g, w in zip(got, want, strict=True))
        rows.append(
            Row(
                example=name,
                impl=impl,
                fw_ms=median_ms(lambda fwd=fwd: fwd(q, k, v), reps),
                bw_ms=median_ms(lambda bwd=bwd: bwd(q, k, v, dout), reps),
                max_err=err,
                ok=is_oracle or err <= tol,
                note="the oracle" if is_oracle else "",
            )
        )
    return rows


def print_table(rows: list[Row]) -> None:
    header = ["example", "implementation", "FW ms", "FW+BW ms", "max rel err", "check"]
    lines = [header]
    for r in rows:
        f = lambda x: "-" if x is None else f"{x:.3f}"
        lines.append(
            [
                r.example,
                r.impl,
                f(r.fw_ms),
                f(r.bw_ms),
                r.note if r.max_err is None else f"{r.max_err:.1e}",
                "ok" if r.ok else "FAIL",
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for j, line in enumerate(lines):
        print(" | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)))
        if j == 0:
            print("-+-".join("-" * w for w in widths))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run every seed example through flexjax.")
    p.add_argument("--examples", nargs="+", default=list(EXAMPLES), choices=list(EXAMPLES))
    p.add_argument("--scale", choices=["auto", "small", "seed"], default="auto")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (median)")
    for dim in ("B", "H", "S", "D"):
        p.add_argument(f"--{dim}", type=int, default=None, help=f"override the example's {dim}")
    p.add_argument("--no-pictures", action="store_true", help="skip the block mask pictures")
    args = p.parse_args(argv)

    gpu = has_gpu()
    scale = args.scale if args.scale != "auto" else ("seed" if gpu else "small")
    # Interpret-mode timings measure the interpreter, not the kernels: few repetitions.
    reps = args.reps or (20 if gpu else 2)
    sizes = {d: getattr(args, d) for d in ("B", "H", "S", "D") if getattr(args, d) is not None}
    print(f"flexjax gym: jax {jax.__version__} on {jax.devices()[0].platform}")
    if scale == "small":
        print("No GPU (or --scale small): running small sizes on the CPU; see flexjax/examples.py.")
    rows = []
    t_start = time.perf_counter()
    for i, name in enumerate(args.examples, 1):
        print(f"\n[{i}/{len(args.examples)}] {name} ({time.perf_counter() - t_start:.0f} s so far)")
        case_dtype = EXAMPLES[name].case(scale).dtype
        tol = 1e-4 if case_dtype == jnp.float32 else 2e-2
        rows += run_example(name, scale, reps, not args.no_pictures, tol, sizes)
    print(f"\nTimings: median of {reps} runs after a warm-up (FW+BW: jax.grad of sum(out * dout)).")
    print("Errors: max |x - ref| / max |ref| over out, dq, dk and dv against the float32 dense")
    print("reference (on two (b, h) slices where the whole would not fit).")
    if scale == "small" and not gpu:
        print("CPU: the kernels run in Pallas interpret mode, so times are not kernel speeds.\n")
    else:
        print()
    print_table(rows)
    failed = [r for r in rows if not r.ok]
    if failed:
        print(f"\n{len(failed)} check(s) FAILED: {[(r.example, r.impl) for r in failed]}")
        return 1
    print(f"\nAll {len(rows)} checks passed in {time.perf_counter() - t_start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
