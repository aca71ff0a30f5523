"""create_block_mask: time and peak memory, flexjax vs PyTorch's eager version.

Each measurement runs in a fresh subprocess so its peak resident memory
(ru_maxrss) belongs to that one call; the figure includes the interpreter and
the framework (about 0.3 to 0.5 GiB before any mask work). Timing: the first
call (trace + compile + run) and the median of repeated calls.

    python bench/bench_create_block_mask.py                 # default cases
    python bench/bench_create_block_mask.py --seq-lens 131072 --frameworks flexjax
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys

CHILD = r"""
import json, resource, statistics, sys, time
framework, S, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, sys.argv[4])
from flexjax.examples import document_lengths
lengths = document_lengths(S)
if framework == "flexjax":
    import jax, flexjax as fj
    from flexjax.masks import document_id_from_lengths, generate_doc_mask_mod
    mod = generate_doc_mask_mod(document_id_from_lengths(lengths))
    def build():
        bm = fj.create_block_mask(mod, None, None, S, S)
        jax.block_until_ready(bm.kv_indices)
        return bm
else:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    def mod(b, h, q, kv):
        return (q >= kv) & (doc[q] == doc[kv])
    def build():
        return create_block_mask(mod, None, None, S, S, device="cpu")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter(); bm = build(); first = time.perf_counter() - t0
times = []
for _ in range(reps):
    t0 = time.perf_counter(); build(); times.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(first_s=first, median_s=statistics.median(times) if times else None,
                      peak_rss_gib=peak / 2**20, rss_before_gib=base / 2**20,
                      sparsity=float(bm.sparsity()))))
"""


@dataclasses.dataclass(frozen=True)
class Result:
    framework: str
    seq_len: int
    first_s: float | None
    median_s: float | None
    peak_rss_gib: float | None
    rss_before_gib: float | None
    sparsity: float | None
    error: str | None = None


def measure(framework: str, S: int, reps: int, mem_limit_gib: float) -> Result:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Cap the child's address space so a dense S x S mask fails fast instead of swapping.
    limit = int(mem_limit_gib * 2**30)
    preexec = None
    if mem_limit_gib > 0:

        def preexec():
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "-c", CHILD, framework, str(S), str(reps), root],
        capture_output=True,
        text=True,
        preexec_fn=preexec,
        timeout=3600,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return Result(framework, S, None, None, None, None, None, error=last[:200])
    return Result(framework, S, **json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--frameworks", nargs="+", default=["flexjax", "torch"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--mem-limit-gib",
        type=float,
        default=16.0,
        help="address-space cap per measurement (0: none)",
    )
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args()
    results = []
    for S in args.seq_lens:
        for fw in args.frameworks:
            reps = args.reps if S <= 32768 else 1
            r = measure(fw, S, reps, args.mem_limit_gib)
            results.append(r)
            print(r, flush=True)
    print()
    print("| framework | S | first call (s) | median (s) | peak RSS (GiB) | sparsity % | note |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        f = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"
        print(
            f"| {r.framework} | {r.seq_len} | {f(r.first_s)} | {f(r.median_s)} | "
            f"{f(r.peak_rss_gib)} | {f(r.sparsity)} | {r.error or ''} |"
        )
    if args.out:
        import jax

        meta = dict(
            date=datetime.date.today().isoformat(),
            machine=platform.machine(),
            processor=platform.processor(),
            cpus=os.cpu_count(),
            python=platform.python_version(),
            jax=jax.__version__,
            mask="seed document mask (causal within 4096, 4096, then 8192-token documents)",
            block_size=128,
        )
        try:
            import torch

            meta["torch"] = torch.__version__
        except ImportError:
            pass
        with open(args.out, "w") as fh:
            json.dump(
                dict(meta=meta, results=[dataclasses.asdict(r) for r in results]), fh, indent=2
            )


if __name__ == "__main__":
    main()
