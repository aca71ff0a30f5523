"""A Hugging Face Llama through torch_bridge: tokens/s of "flexjax" beside "sdpa" and "flex_attention".

One `LlamaForCausalLM` built from a config (no download), random weights, its
attention implementation switched between transformers' "sdpa" (the default;
flash attention when no mask is passed), "flex_attention" (transformers' own,
on torch's compiled `flex_attention`, block mask from its compiled
`create_block_mask`) and "flexjax" (`torch_bridge.hf`: the Pallas kernels
through DLPack, a flexjax BlockMask built once per forward). Same weights and
inputs for all three. Two workloads:

* `causal`: no attention_mask (sdpa then runs its flash kernel with is_causal);
* `padded`: right padding, each row keeps between half and all of its tokens
  (sdpa then needs a dense [B, 1, S, S] mask; the two flex implementations
  skip the padded blocks).

and two modes: `train` (forward, loss on the real tokens, backward into every
parameter; gradients set to None before each step) and `forward` (no_grad
logits). Each is timed the same way for every implementation: `--warmup`
steps (compiles included there), then `--reps` steps, each followed by
`torch.cuda.synchronize()`; the median step's wall time gives tokens/s =
B * S / time (padding included). Beside each time, the difference from sdpa:
forward, the max |logits - sdpa's| on real tokens over max |sdpa's|; train,
the same for the loss and for layer 0's q_proj weight gradient.

With torch and JAX in one process on a GPU, JAX must not preallocate (it
would take 75% of the card before torch allocates anything); the script sets
XLA_PYTHON_CLIENT_PREALLOCATE=false itself unless it is already set:

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 bench/bench_transformers.py \\
        --out bench/results/transformers_h100_<date>

GPU default: hidden 2048, 16 query / 8 key-value heads (head_dim 128), 8
layers, MLP 5632, vocab 32000, B=4, S=4096, bf16. With no GPU it runs a tiny
fp32 model in interpret mode, flexjax and sdpa only (torch's flex_attention
has no CPU backward): a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before JAX starts

import torch  # noqa: E402
import transformers  # noqa: E402
from report import meta_info, write_report  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import torch_bridge.hf  # noqa: E402
from pallas_kernels.runtime import has_gpu  # noqa: E402

IMPLS = ("sdpa", "flex_attention", "flexjax")  # sdpa first: the others are checked against it


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    hidden: int
    heads: int
    kv_heads: int
    layers: int
    mlp: int
    vocab: int
    B: int
    S: int
    dtype: str

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.heads=} must be a multiple of {self.kv_heads=}")
        if self.hidden % self.heads:
            raise ValueError(f"{self.hidden=} must be a multiple of {self.heads=}")

    def llama(self) -> LlamaConfig:
        return LlamaConfig(
            hidden_size=self.hidden, intermediate_size=self.mlp, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab, max_position_embeddings=self.S, attention_dropout=0.0,
        )  # fmt: skip


GPU_CONFIG = ModelConfig(
    hidden=2048,
    heads=16,
    kv_heads=8,
    layers=8,
    mlp=5632,
    vocab=32000,
    B=4,
    S=4096,
    dtype="bfloat16",
)
CPU_CONFIG = ModelConfig(
    hidden=64, heads=4, kv_heads=2, layers=2, mlp=128, vocab=128, B=2, S=128, dtype="float32"
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Row:
    impl: str
    workload: str
    mode: str
    ms: float
    tokens_per_s: float
    check: float | None  # relative difference from sdpa (None for sdpa itself)
    check_grad: float | None = None  # train: layer 0 q_proj weight gradient against sdpa's


def median_step_ms(step, warmup: int, reps: int, sync) -> float:
    """Median wall ms of step(), each call synchronised, after `warmup` calls."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def inputs(cfg: ModelConfig, workload: str, dev: str):
    """input_ids, attention_mask (None for `causal`) and labels (-100 on padding), seeded."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab, (cfg.B, cfg.S), generator=gen)
    mask = None
    labels = ids.clone()
    if workload == "padded":
        lengths = torch.randint(cfg.S // 2, cfg.S + 1, (cfg.B,), generator=gen)
        mask = (torch.arange(cfg.S)[None] < lengths[:, None]).long()
        labels[mask == 0] = -100
        mask = mask.to(dev)
    return ids.to(dev), mask, labels.to(dev)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_step(model, mode, ids, mask, labels):
    """One training step (forward, loss, backward; returns the loss) or one no_grad forward."""
    if mode == "train":
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            out = model(ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            return out.loss.detach()

    else:
        model.eval()

        def step():
            with torch.no_grad():
                return model(ids, attention_mask=mask).logits

    return step


def measure(model, cfg, impls, workloads, modes, warmup, reps, dev) -> list[Row]:
    # Modes outermost: transformers' flex_attention recompiles whenever the train flag changes.
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    rows = []
    for mode in modes:
        for workload in workloads:
            ids, mask, labels = inputs(cfg, workload, dev)
            real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            reference = None  # sdpa's loss and gradient, or logits
            for impl in impls:
                model.set_attn_implementation(impl)
                step = make_step(model, mode, ids, mask, labels)
                result = step()  # the check's values (and the first compile)
                if mode == "train":
                    result = (result, q_proj.grad.detach().clone())
                else:
                    result = (result[real],)
                ms = median_step_ms(step, warmup, reps, sync)
                model.zero_grad(set_to_none=True)
                checks = [None, None]
                if impl == "sdpa":
                    reference = result
                elif reference is not None:
                    checks[: len(result)] = [
                        rel(x, r) for x, r in zip(result, reference, strict=True)
                    ]
                del result
                row = Row(
                    impl=impl, workload=workload, mode=mode, ms=ms,
                    tokens_per_s=cfg.B * cfg.S / (ms / 1e3), check=checks[0], check_grad=checks[1],
                )  # fmt: skip
                rows.append(row)
                print(row, flush=True)
    return rows


def table(rows: list[Row]) -> str:
    sdpa = {(r.workload, r.mode): r.ms for r in rows if r.impl == "sdpa"}
    fmt = lambda x: "-" if x is None else f"{x:.2g}"  # noqa: E731
    lines = [
        "| workload | mode | impl | step ms | tokens/s | time / sdpa's | check | check grad |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = sdpa.get((r.workload, r.mode))
        ratio = "-" if ratio is None else f"{r.ms / ratio:.2f}"
        lines.append(
            f"| {r.workload} | {r.mode} | {r.impl} | {r.ms:.1f} | {r.tokens_per_s:,.0f} | "
            f"{ratio} | {fmt(r.check)} | {fmt(r.check_grad)} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--impls", default=None, help="comma-separated, from " + ",".join(IMPLS))
    p.add_argument("--workloads", default="causal,padded")
    p.add_argument("--modes", default="train,forward")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--B", type=int, default=None)
    p.add_argument("--S", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", default=None, help="path prefix for .md and .json")
    args = p.parse_args(argv)
    gpu = has_gpu() and torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    cfg = GPU_CONFIG if gpu else CPU_CONFIG
    overrides = {k: getattr(args, k) for k in ("layers", "B", "S") if getattr(args, k)}
    cfg = dataclasses.replace(cfg, **overrides)
    # torch's flex_attention has no CPU backward (and would compile C++): GPU only by default.
    impls = (args.impls or ",".join(IMPLS if gpu else ("sdpa", "flexjax"))).split(",")
    for impl in impls:
        if impl not in IMPLS:
            raise ValueError(f"--impls: {impl!r} is not one of {IMPLS}")
    impls = sorted(impls, key=IMPLS.index)
    warmup = args.warmup or (3 if gpu else 1)
    reps = args.reps or (10 if gpu else 2)

    torch_bridge.hf.register()
    torch.manual_seed(0)
    with torch.device(dev):  # initialised on the device, in the benchmark's dtype
        model = LlamaForCausalLM._from_config(
            cfg.llama(), attn_implementation="sdpa", dtype=getattr(torch, cfg.dtype)
        )
    n_params = sum(p.numel() for p in model.parameters())
    rows = measure(
        model, cfg, impls, args.workloads.split(","), args.modes.split(","), warmup, reps, dev
    )

    meta = meta_info("GPU" if gpu else "CPU smoke test", gpu)
    meta.update(transformers=transformers.__version__, warmup=warmup, reps=reps)
    head = (
        f"# Llama ({n_params / 1e6:.3g}M parameters) through transformers' attention "
        f"implementations, {meta['gpu']}, {meta['date']}\n"
    )
    text = [
        head,
        f"`{meta['command']}`; jax {meta['jax']}, torch {meta['torch']}, transformers "
        f"{meta['transformers']}, triton {meta['triton']}, driver {meta['driver']}.\n",
        f"Model: {dataclasses.asdict(cfg)}. Timing: {warmup} warm-up steps, median of {reps} "
        "synchronised steps; tokens/s = B * S / step time. check: max |difference from "
        "sdpa| / max |sdpa| (forward: logits on real tokens; train: the loss, and layer 0's "
        "q_proj weight gradient).\n",
        table(rows),
        "",
    ]
    payload = dict(
        meta=meta, config=dataclasses.asdict(cfg), parameters=n_params,
        rows=[dataclasses.asdict(r) for r in rows],
    )  # fmt: skip
    write_report(args.out, "\n".join(text), payload)


if __name__ == "__main__":
    main()
