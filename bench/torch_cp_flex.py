"""PyTorch's own context parallelism for flex_attention: forward and forward+backward times.

Measures torch.distributed.tensor.experimental context parallelism (CP) with
FlexAttention the way torchtitan runs it, to set beside flexjax's CP on the same
GPUs (bench_mesh.py --part cp):

* the whole sequence's BlockMask from a compiled `create_block_mask`;
* q, k, v and the output gradient reordered by a load balancer and split on the
  sequence by `_context_parallel_shard`, which also builds each rank's CP BlockMask
  (its query shard against the whole sequence);
* a module calling `torch.compile`d `flex_attention`, parallelized with
  `_ContextParallel(FLEX)`: its forward pre-hook all-gathers k and v (and
  reduce-scatters their gradients in backward).

With one process there is no CP: the same compiled flex_attention on the whole
sequence of one GPU, the baseline.

Workload (all flags): B=1, GQA with 32 query and 8 kv heads, D=128, bfloat16,
BLOCK_SIZE 128 (torch's CP BlockMask is fixed at 128). --mask causal uses torch's
head-tail balancer; --mask docs16 is causal inside 16 documents whose lengths are a
random split of S (numpy default_rng(0), as bench_mesh.py) and uses the PTRR
balancer. Timer (as timing.time_loop_torch): one warm-up call, then three loops of
--reps back-to-back calls, each closed by one device sync and a barrier; per-call
ms = loop time / reps, the median loop. Forward runs under no_grad; forward+backward
is the call then out.backward(fixed random gradient), q/k/v .grad set to None first.
max_mem_gib: torch.cuda.max_memory_allocated after the warm-ups, the largest over
ranks and both modes.

    torchrun --standalone --nproc_per_node=4 bench/torch_cp_flex.py \\
        --seq 65536 --mask causal --out $OUT/torch_cp.jsonl
    torchrun --standalone --nproc_per_node=1 bench/torch_cp_flex.py \\
        --seq 65536 --mask causal --out $OUT/torch_cp.jsonl

--check compares the CP output and q/k/v gradients, unsharded, with flex_attention
on the whole sequence on rank 0 (same seeded inputs) and prints the max abs diffs.
On a machine without GPUs (gloo, small sizes; torch's flex_attention has no CPU
backward, so there the gradients come from SDPA with the BlockMask's mask_mod,
see cpu_flex, while the CP machinery around it is the same):

    torchrun --standalone --nproc_per_node=2 bench/torch_cp_flex.py --device cpu \\
        --seq 2048 --hq 4 --hkv 2 --dim 32 --dtype float32 --reps 1 --check

Rank 0 appends one JSON line per run to --out. A failure in the setup or in a
mode is caught on every rank and written there as "error" (with the traceback's
last lines) instead of crashing the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.attention.flex_attention as tfa
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

# torch's CP API is private and experimental (torch.distributed.tensor.experimental
# ._attention, re-exported from ._context_parallel), so it is imported where used:
# a torch without it is reported in the JSON line like any other failure.

BLOCK_SIZE = 128  # torch's CP BlockMask (_create_cp_block_mask) uses the default 128
SEQ_DIM = 2  # q, k, v: [B, H, S, D]


# ---------------------------------------------------------------------------- workload


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def document_mask(S: int, device, n_docs: int = 16):
    """Causal attention inside n_docs documents of random lengths (numpy seed 0)."""
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, S), n_docs - 1, replace=False))
    lengths = np.diff(np.concatenate([[0], cuts, [S]]))
    doc = torch.repeat_interleave(torch.arange(n_docs), torch.as_tensor(lengths)).to(device)

    def doc_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    return doc_causal


def load_balancer(mask: str, block_mask, S: int, world: int, device):
    """(torch's balancer for `mask`, its name): head-tail for causal, PTRR for documents."""
    from torch.distributed.tensor.experimental import _attention as cp

    if mask == "docs16" and hasattr(cp, "_PTRRLoadBalancer"):
        return cp._PTRRLoadBalancer(block_mask, world), "ptrr"
    name = "head_tail" if mask == "causal" else "head_tail (this torch has no _PTRRLoadBalancer)"
    return cp._HeadTailLoadBalancer(S, world, device), name


def random_inputs(args, device) -> list[torch.Tensor]:
    """q, k, v and the output gradient, the same on every rank (seeded)."""
    gen = torch.Generator(device).manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    q_shape = (1, args.hq, args.seq, args.dim)
    kv_shape = (1, args.hkv, args.seq, args.dim)
    shapes = (q_shape, kv_shape, kv_shape, q_shape)
    return [torch.randn(s, generator=gen, device=device, dtype=dtype) for s in shapes]


CPU_FLEX = torch.compile(tfa.flex_attention, dynamic=False)


def cpu_flex(q, k, v, block_mask, enable_gqa):
    """flex_attention on CPU, where it has no backward (and refuses inputs requiring grad).

    Without grad: compiled flex_attention itself. With grad: the same math by SDPA,
    the BlockMask's mask_mod made a dense mask, so the CP gradients can be checked.
    """
    if not torch.is_grad_enabled():
        q, k, v = q.detach(), k.detach(), v.detach()
        return CPU_FLEX(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    mask = tfa.create_mask(block_mask.mask_mod, 1, 1, q.shape[-2], k.shape[-2], device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


def attention_fn(device: torch.device, compile_mode: str):
    """flex_attention under torch.compile on a GPU (as torch users run it); cpu_flex on CPU."""
    if device.type == "cpu":
        return cpu_flex
    return torch.compile(tfa.flex_attention, dynamic=False, mode=compile_mode)


class FlexAttention(torch.nn.Module):
    """flex_attention as a module, for `_ContextParallel`'s hook (as torchtitan's wrapper)."""

    def __init__(self, flex):
        super().__init__()
        self.flex = flex

    def forward(self, q, k, v, block_mask):
        return self.flex(q, k, v, block_mask=block_mask, enable_gqa=True)


@dataclass
class Run:
    attention: FlexAttention
    q: torch.Tensor  # this rank's shards (the whole tensors with one rank)
    k: torch.Tensor
    v: torch.Tensor
    grad_out: torch.Tensor
    block_mask: tfa.BlockMask
    balancer: object | None
    balancer_name: str
    mesh: DeviceMesh | None


def setup(args, device, world: int) -> tuple[Run, list[torch.Tensor], tfa.BlockMask]:
    """This rank's Run, and the whole inputs and BlockMask (for --check)."""
    full_inputs = random_inputs(args, device)
    mask_mod = causal if args.mask == "causal" else document_mask(args.seq, device)
    create = torch.compile(tfa.create_block_mask)
    bm = create(mask_mod, 1, 1, args.seq, args.seq, device=device, BLOCK_SIZE=BLOCK_SIZE)
    attention = FlexAttention(attention_fn(device, args.compile_mode))
    if world == 1:
        run = Run(attention, *full_inputs, bm, None, "-", None)
    else:
        from torch.distributed.tensor.experimental._attention import (
            _context_parallel_shard,
            _ContextParallel,
        )
        from torch.distributed.tensor.parallel import parallelize_module

        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("cp",))
        balancer, name = load_balancer(args.mask, bm, args.seq, world, device)
        flex_cp = _ContextParallel(
            seq_dim=SEQ_DIM, attention_type=_ContextParallel.AttentionType.FLEX
        )
        parallelize_module(attention, mesh, flex_cp)  # all-gathers k, v before each call
        # Reorders by the balancer, keeps this rank's part; the BlockMask becomes this
        # rank's queries against the whole sequence (_create_cp_block_mask).
        *shards, cp_bm = _context_parallel_shard(
            mesh, [*full_inputs, bm], [SEQ_DIM] * 5, load_balancer=balancer
        )
        run = Run(attention, *shards, cp_bm, balancer, name, mesh)
    for t in (run.q, run.k, run.v):
        t.requires_grad_()
    return run, full_inputs, bm


# ---------------------------------------------------------------------------- modes


def forward(run: Run):
    with torch.no_grad():
        return run.attention(run.q, run.k, run.v, run.block_mask)


def forward_backward(run: Run):
    for t in (run.q, run.k, run.v):
        t.grad = None
    out = run.attention(run.q, run.k, run.v, run.block_mask)
    out.backward(run.grad_out)
    return out


def measure(fn, reps: int, cuda: bool) -> tuple[float, float | None]:
    """(ms per call, GiB peak on this rank or None on CPU) of `fn()`: the loop timer."""
    sync = torch.cuda.synchronize if cuda else lambda: None
    fn()  # warm-up (compiles)
    sync()
    dist.barrier()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        dist.barrier()
        times.append((time.perf_counter() - t0) * 1e3 / reps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return statistics.median(times), peak


def results(run: Run) -> list[torch.Tensor]:
    """The forward output and the q, k, v gradients of `run` (this rank's shards)."""
    out = forward(run)
    forward_backward(run)
    return [out, run.q.grad, run.k.grad, run.v.grad]


def check(run: Run, full_inputs, full_bm) -> dict | None:
    """Max abs diffs of the CP results (unsharded) against one rank's, on rank 0."""
    got = results(run)
    if run.mesh is not None:
        from torch.distributed.tensor.experimental._attention import context_parallel_unshard

        got = context_parallel_unshard(run.mesh, got, [SEQ_DIM] * 4, load_balancer=run.balancer)
    if dist.get_rank() != 0:
        return None
    q, k, v = (t.detach().clone().requires_grad_() for t in full_inputs[:3])
    one_rank = FlexAttention(run.attention.flex)
    ref = Run(one_rank, q, k, v, full_inputs[3], full_bm, None, "-", None)
    want = results(ref)
    names = ("out", "dq", "dk", "dv")
    return {
        f"max_abs_diff_{n}": (a - b).abs().max().item()
        for n, a, b in zip(names, got, want, strict=True)
    }


# ---------------------------------------------------------------------------- errors, report


def error_fields(exc: BaseException) -> dict:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": "".join(tb).splitlines()[-8:]}


def attempt(stage: str, fn):
    """(fn()'s result, None) or (None, error fields), the same verdict on every rank.

    Every rank runs fn; if any raised, all return the first failing rank's error,
    so no rank goes on alone into a collective the others skip.
    """
    result, err = None, None
    try:
        result = fn()
    except Exception as exc:  # reported in the JSON line, not raised
        err = {"stage": stage, "rank": dist.get_rank(), **error_fields(exc)}
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, err)
    first = next((e for e in errors if e is not None), None)
    return (None, first) if first else (result, None)


def max_over_ranks(x: float | None, device) -> float | None:
    if x is None:
        return None
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def record(args, device, world: int) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return dict(
        impl="torch_cp_flex" if world > 1 else "torch_flex_1gpu", n_gpus=world, seq=args.seq,
        mask=args.mask, balancer=None, hq=args.hq, hkv=args.hkv, dim=args.dim, dtype=args.dtype,
        block_size=BLOCK_SIZE, compile_mode=args.compile_mode, reps=args.reps,
        fwd_ms=None, fwd_bwd_ms=None, max_mem_gib=None,
        torch=torch.__version__, triton=triton_version, device=name or device.type,
        date=time.strftime("%Y-%m-%d"), command=" ".join(["bench/torch_cp_flex.py", *sys.argv[1:]]),
    )  # fmt: skip


def write(row: dict, out: str | None) -> None:
    ms = lambda x: "-" if x is None else f"{x:.3f} ms"
    mem = "-" if row["max_mem_gib"] is None else f"{row['max_mem_gib']:.2f} GiB"
    summary = (
        f"{row['impl']} n={row['n_gpus']} S={row['seq']} {row['mask']} ({row['balancer']}): "
        f"fwd {ms(row['fwd_ms'])}, fwd+bwd {ms(row['fwd_bwd_ms'])}, max mem {mem}"
    )
    for e in row.get("errors", []):
        summary += f"\n  {e['stage']} failed on rank {e['rank']}: {e['error']}"
    print(summary, flush=True)
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=65536)
    p.add_argument("--mask", choices=("causal", "docs16"), default="causal")
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode of flex_attention (torchtitan: max-autotune-no-cudagraphs)",
    )
    p.add_argument("--check", action="store_true", help="compare with one rank's result first")
    p.add_argument("--out", default=None, help="JSON lines file to append to (rank 0)")
    return p.parse_args(argv)


def init(kind: str) -> torch.device:
    if kind == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def main(argv=None):
    args = parse_args(argv)
    device = init(args.device)
    world, rank, cuda = dist.get_world_size(), dist.get_rank(), device.type == "cuda"
    row = record(args, device, world)
    errors = []
    built, err = attempt("setup", lambda: setup(args, device, world))
    errors += [err] if err else []
    if built is not None:
        run, full, full_bm = built
        row["balancer"] = run.balancer_name
        if args.check:
            diffs, err = attempt("check", lambda: check(run, full, full_bm))
            errors += [err] if err else []
            if rank == 0 and diffs:
                print("check (max abs diff vs one rank):", diffs, flush=True)
                row.update(diffs)
        del built, full  # the whole tensors are not part of the measured memory (n > 1)
        peaks = []
        for mode, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
            timed, err = attempt(mode, lambda: measure(lambda: fn(run), args.reps, cuda))
            if err:
                errors.append(err)
                continue
            row[f"{mode}_ms"] = max_over_ranks(timed[0], device)
            peaks.append(max_over_ranks(timed[1], device))
        row["max_mem_gib"] = max((p for p in peaks if p is not None), default=None)
    if errors:  # the first failure with its traceback, then every failure in brief
        row.update(error=errors[0]["error"], traceback=errors[0]["traceback"])
        row["errors"] = [{k: e[k] for k in ("stage", "rank", "error")} for e in errors]
    if rank == 0:
        write(row, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
