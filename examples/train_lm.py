"""A byte-level decoder-only transformer (Flax NNX + optax) on the Python standard library's source.

The corpus ships with every Python: the `.py` files under
`os.path.dirname(os.__file__)` (site-/dist-packages excluded), read in sorted
path order; every 50th file is held out for validation. Each file is one
document; files are concatenated and cut into windows of `seq_len` tokens, so a
sequence packs several documents (the ids ride along, one per token).

The model: token embedding, `num_layers` pre-norm blocks of
`nnx.MultiHeadAttention` + GELU MLP, a final RMSNorm and a byte head. Every
`local_every`-th layer (from layer 0) is local: it sees only the last `window`
tokens of its own document; the others see their whole document, causally.
ALiBi (a per-head linear distance penalty, a score_mod with captured slopes)
gives every layer positions; `--softcap C` adds Gemma-2's tanh soft-cap to the
global layers. Parameters are float32, compute in `--dtype` (bfloat16 by
default), the loss in float32; AdamW with warmup and cosine decay.

The attention masks are built inside the jitted train step from that batch's
document ids, so new batches never recompile. Three implementations of the same
attention (`--attention`):

- flexjax: `flexjax.flax_nnx.attention_fn(score_mod)` as MHA's attention_fn and
  a `flexjax.create_block_mask` BlockMask per mask kind, passed as `mask=`;
- dense: the reference, written out: einsum, the same score_mod on broadcast
  index arrays, the same mask_mod evaluated to a dense [B, 1, T, T] boolean
  mask, softmax, einsum (float32 logits, as jax.nn's XLA path);
- cudnn: `jax.nn.dot_product_attention(implementation="cudnn")`, is_causal and
  local_window_size for causality and windows, the document mask as a dense
  boolean mask and ALiBi as a dense bias. It cannot soft-cap, needs 16-bit
  inputs and a GPU: otherwise it is skipped, saying why.

`--compare` trains each from the same initialisation on the same batches and
writes a loss-curve PNG, a markdown table and JSON (median step time after
warmup, synchronised; peak device memory) into `--out`. On a GPU each
implementation runs in its own process by default (`--isolate`), so peak
memory is its own and one running out of memory does not stop the others.

    python examples/train_lm.py --compare                # 200 steps each, one H100
    python examples/train_lm.py --tiny --steps 20        # CPU (Pallas interpret mode)
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

if __package__ in (None, ""):  # run as a script from anywhere: import the checkout's flexjax
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flexjax as fj
from flexjax import flax_nnx
from flexjax.masks import generate_sliding_window

IMPLEMENTATIONS = ("flexjax", "dense", "cudnn")
VOCAB = 256  # bytes
VAL_EVERY = 50  # every 50th file (sorted order) is validation


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    d_model: int = 768
    num_layers: int = 12
    num_heads: int = 12
    seq_len: int = 2048
    batch_size: int = 4
    steps: int = 200
    lr: float = 3e-4
    warmup: int = 20
    window: int = 256  # local layers: the token itself and the `window` before it
    local_every: int = 2  # layers 0, local_every, 2 * local_every, ... are local
    alibi: bool = True
    softcap: float = 0.0  # > 0: tanh soft-cap of the global layers' scores
    dtype: str = "bfloat16"
    block_size: int = 128  # BlockMask block size
    seed: int = 0
    eval_batches: int = 0  # validation batches after training (0: none)
    log_every: int = 10

    def __post_init__(self):
        for name in ("d_model", "num_layers", "num_heads", "seq_len", "batch_size", "steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.d_model % self.num_heads:
            raise ValueError(f"{self.d_model=} must be a multiple of {self.num_heads=}")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"{self.dtype=} must be 'bfloat16' or 'float32'")
        if self.window < 0 or self.local_every < 1 or self.softcap < 0:
            raise ValueError(f"{self.window=}, {self.local_every=}, {self.softcap=} out of range")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def layer_kinds(self) -> list[str]:
        return ["local" if i % self.local_every == 0 else "global" for i in range(self.num_layers)]


# One H100: 85M parameters, 8K tokens a step. Batch 4, not 8: the dense reference keeps about
# 3.5 float32 [B, H, T, T] arrays per layer for its backward (XLA's estimate: 34.5 GiB at B=4,
# 69 GiB at B=8, over the H100's 80 GB with the rest).
GPU_CONFIG = Config()
# The CPU (Pallas interpret mode): a few seconds to compile, milliseconds a step.
TINY_CONFIG = Config(
    d_model=32,
    num_layers=2,
    num_heads=2,
    seq_len=128,
    batch_size=2,
    steps=20,
    lr=3e-3,
    warmup=2,
    window=32,
    dtype="float32",
    block_size=32,
    eval_batches=0,
    log_every=1,
)


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Corpus:
    tokens: np.ndarray  # [n] uint8
    doc_ids: np.ndarray  # [n] int32, the file each byte came from
    num_files: int


def stdlib_files() -> list[pathlib.Path]:
    root = pathlib.Path(os.path.dirname(os.__file__))
    skip = {"site-packages", "dist-packages"}
    return sorted(
        (
            p
            for p in root.rglob("*.py")
            if not skip & set(p.relative_to(root).parts) and p.is_file()
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def load_corpora() -> tuple[Corpus, Corpus]:
    """(train, validation): every VAL_EVERY-th file of the sorted list is validation."""
    parts = {"train": [], "val": []}
    for i, path in enumerate(stdlib_files()):
        data = path.read_bytes()
        if data:
            parts["val" if i % VAL_EVERY == VAL_EVERY - 1 else "train"].append((i, data))

    def corpus(files):
        tokens = np.frombuffer(b"".join(d for _, d in files), np.uint8)
        doc_ids = np.repeat(np.array([i for i, _ in files], np.int32), [len(d) for _, d in files])
        return Corpus(tokens, doc_ids, len(files))

    return corpus(parts["train"]), corpus(parts["val"])


def batch_at(corpus: Corpus, cfg: Config, step: int, stream_seed: int) -> dict[str, np.ndarray]:
    """Batch `step`: windows of seq_len + 1 tokens at positions permuted by `stream_seed`.

    inputs/targets [B, T] int32; doc_ids [B, T] (the inputs' documents); weights [B, T]
    float32, 0 where the target starts the next document (nothing to predict it from).
    """
    T, B = cfg.seq_len, cfg.batch_size
    num_windows = (len(corpus.tokens) - 1) // T
    if num_windows < 1:
        raise ValueError(f"the corpus ({len(corpus.tokens)} bytes) is shorter than {T=}")
    order = np.random.default_rng(stream_seed).permutation(num_windows)
    starts = order[(step * B + np.arange(B)) % num_windows] * T
    idx = starts[:, None] + np.arange(T + 1)[None, :]
    tokens, docs = corpus.tokens[idx].astype(np.int32), corpus.doc_ids[idx]
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "doc_ids": docs[:, :-1],
        "weights": (docs[:, 1:] == docs[:, :-1]).astype(np.float32),
    }


# ----------------------------------------------------------------------------- mods


def alibi_slopes(num_heads: int) -> jax.Array:
    return jnp.exp2(-(jnp.arange(num_heads, dtype=jnp.float32) + 1) * 8.0 / num_heads)


def layer_score_mod(cfg: Config, kind: str):
    """The layer's score_mod(score, b, h, q_idx, kv_idx), or None.

    Elementwise jnp only, so the dense paths can call it on broadcast index arrays.
    """
    cap = cfg.softcap if kind == "global" else 0.0
    slopes = alibi_slopes(cfg.num_heads) if cfg.alibi else None
    if not cap and slopes is None:
        return None

    def score_mod(score, b, h, q_idx, kv_idx):
        if cap:
            score = cap * jnp.tanh(score / cap)
        if slopes is not None:  # ALiBi: penalise distance, per head
            score = score + slopes[h] * (kv_idx - q_idx)
        return score

    score_mod.__qualname__ = f"{kind}_score_mod"
    return score_mod


def document_causal(doc_ids):
    """mask_mod: causal within the token's own document. doc_ids: [B, T] int32."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return mask_mod


def layer_mask_mod(cfg: Config, kind: str, doc_ids):
    if kind == "local":
        return fj.and_masks(document_causal(doc_ids), generate_sliding_window(cfg.window))
    return document_causal(doc_ids)


def broadcast_indices(B, H, T, S):
    """b [B,1,1,1], h [1,H,1,1], q_idx [1,1,T,1], kv_idx [1,1,1,S]: a mod on them is [B,H,T,S]."""
    return tuple(
        jnp.arange(n, dtype=jnp.int32).reshape([n if i == axis else 1 for i in range(4)])
        for axis, n in enumerate((B, H, T, S))
    )


# ----------------------------------------------------------------------------- attention


class Flexjax:
    """MHA's attention_fn from flexjax.flax_nnx; one BlockMask per mask kind and batch."""

    name = "flexjax"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def attention_fn(self, kind):
        return flax_nnx.attention_fn(score_mod=layer_score_mod(self.cfg, kind))

    def build_masks(self, doc_ids):
        B, T = doc_ids.shape
        return {
            kind: fj.create_block_mask(
                layer_mask_mod(self.cfg, kind, doc_ids),
                B,
                None,
                T,
                T,
                BLOCK_SIZE=self.cfg.block_size,
            )
            for kind in set(self.cfg.layer_kinds())
        }


def _check_plain_call(name, bias, dropout_rate, deterministic, module, is_causal):
    if bias is not None or module is not None or is_causal or (dropout_rate and not deterministic):
        raise ValueError(f"the {name} attention of this example takes no bias, dropout or sow")


class Dense:
    """The reference: scores, score_mod, dense mask and softmax written out."""

    name = "dense"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        # fp32 matmuls at full precision (flexjax's fp32 kernels are); bf16 at the native one.
        self.precision = jax.lax.Precision.HIGHEST if cfg.dtype == "float32" else None

    def attention_fn(self, kind):
        score_mod = layer_score_mod(self.cfg, kind)

        def attend(
            query,
            key,
            value,
            bias=None,
            mask=None,
            *,
            dropout_rate=0.0,
            deterministic=True,
            module=None,
            is_causal=False,
            **unused,
        ):
            _check_plain_call("dense", bias, dropout_rate, deterministic, module, is_causal)
            B, T, H, E = query.shape
            scores = jnp.einsum(
                "bqhe,bkhe->bhqk",
                query,
                key,
                precision=self.precision,
                preferred_element_type=jnp.float32,
            ) / math.sqrt(E)
            if score_mod is not None:
                scores = score_mod(scores, *broadcast_indices(B, H, T, key.shape[1]))
            probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
            out = jnp.einsum(
                "bhqk,bkhe->bqhe",
                probs.astype(value.dtype),
                value,
                precision=self.precision,
                preferred_element_type=jnp.float32,
            )
            return out.astype(query.dtype)

        return attend

    def build_masks(self, doc_ids):
        B, T = doc_ids.shape
        b, _, q_idx, kv_idx = broadcast_indices(B, 1, T, T)
        h = jnp.zeros((1, 1, 1, 1), jnp.int32)
        return {
            kind: jnp.broadcast_to(
                layer_mask_mod(self.cfg, kind, doc_ids)(b, h, q_idx, kv_idx), (B, 1, T, T)
            )
            for kind in set(self.cfg.layer_kinds())
        }


def cudnn_unsupported(cfg: Config) -> str | None:
    """Why jax.nn's cuDNN attention cannot run this model, or None."""
    if cfg.softcap:
        return (
            f"the global layers' tanh soft-cap (--softcap {cfg.softcap:g}) has no cuDNN "
            "equivalent in jax.nn.dot_product_attention; run with --softcap 0 to include cudnn"
        )
    if cfg.dtype != "bfloat16":
        return f"cuDNN flash attention takes 16-bit inputs, not --dtype {cfg.dtype}"
    if cfg.head_dim % 8 or cfg.head_dim > 128:
        return f"cuDNN needs a head dim <= 128 and a multiple of 8, not {cfg.head_dim}"
    if cfg.seq_len % 2:
        return f"cuDNN with a bias needs an even sequence length, not {cfg.seq_len}"
    if jax.default_backend() != "gpu":
        return f"cuDNN needs a CUDA GPU (JAX's backend here is {jax.default_backend()!r})"
    return None


class Cudnn:
    """jax.nn.dot_product_attention(implementation="cudnn"): causal and windows natively,
    documents as a dense boolean mask [B, 1, T, T], ALiBi as a dense bias [1, H, T, T]."""

    name = "cudnn"

    def __init__(self, cfg: Config):
        reason = cudnn_unsupported(cfg)
        if reason:
            raise Unsupported(reason)
        self.cfg = cfg

    def attention_fn(self, kind):
        score_mod = layer_score_mod(self.cfg, kind)  # additive here: ALiBi or nothing
        window = (self.cfg.window, 0) if kind == "local" else None

        def attend(
            query,
            key,
            value,
            bias=None,
            mask=None,
            *,
            dropout_rate=0.0,
            deterministic=True,
            module=None,
            is_causal=False,
            **unused,
        ):
            _check_plain_call("cudnn", bias, dropout_rate, deterministic, module, is_causal)
            _, T, H, _ = query.shape
            alibi = None
            if score_mod is not None:
                zeros = jnp.zeros((1, H, T, key.shape[1]), jnp.float32)
                alibi = score_mod(zeros, *broadcast_indices(1, H, T, key.shape[1]))
                alibi = alibi.astype(query.dtype)
            return jax.nn.dot_product_attention(
                query,
                key,
                value,
                bias=alibi,
                mask=mask,
                is_causal=True,
                local_window_size=window,
                implementation="cudnn",
            )

        return attend

    def build_masks(self, doc_ids):
        same_doc = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
        return dict.fromkeys(set(self.cfg.layer_kinds()), same_doc)


class Unsupported(Exception):
    """This implementation cannot run this configuration (the message says why)."""


def make_attention(name: str, cfg: Config):
    return {"flexjax": Flexjax, "dense": Dense, "cudnn": Cudnn}[name](cfg)


# ----------------------------------------------------------------------------- model


class Block(nnx.Module):
    def __init__(self, cfg: Config, kind: str, attention_fn, rngs: nnx.Rngs):
        d, dt = cfg.d_model, cfg.compute_dtype
        common = dict(dtype=dt, param_dtype=jnp.float32, rngs=rngs)
        self.kind = kind
        self.attn_norm = nnx.RMSNorm(d, **common)
        self.attn = nnx.MultiHeadAttention(
            num_heads=cfg.num_heads,
            in_features=d,
            use_bias=False,
            decode=False,
            attention_fn=attention_fn,
            **common,
        )
        self.mlp_norm = nnx.RMSNorm(d, **common)
        self.mlp_up = nnx.Linear(d, 4 * d, use_bias=False, **common)
        self.mlp_down = nnx.Linear(4 * d, d, use_bias=False, **common)

    def __call__(self, x, mask):
        x = x + self.attn(self.attn_norm(x), mask=mask)
        return x + self.mlp_down(jax.nn.gelu(self.mlp_up(self.mlp_norm(x))))


class ByteLM(nnx.Module):
    def __init__(self, cfg: Config, attention, rngs: nnx.Rngs):
        dt = cfg.compute_dtype
        self.embed = nnx.Embed(VOCAB, cfg.d_model, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
        blocks = [
            Block(cfg, kind, attention.attention_fn(kind), rngs) for kind in cfg.layer_kinds()
        ]
        self.blocks = getattr(nnx, "List", list)(blocks)  # nnx.List where Flax has it
        self.norm = nnx.RMSNorm(cfg.d_model, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
        self.head = nnx.Linear(
            cfg.d_model, VOCAB, use_bias=False, dtype=dt, param_dtype=jnp.float32, rngs=rngs
        )

    def __call__(self, tokens, masks):
        """tokens [B, T] int32; masks: the attention's masks by layer kind. -> logits [B, T, 256] f32."""
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, masks[block.kind])
        return self.head(self.norm(x)).astype(jnp.float32)


def make_optimizer(cfg: Config):
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, min(cfg.warmup, max(cfg.steps - 1, 1)), max(cfg.steps, 2), cfg.lr / 10
    )
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1))


def make_steps(cfg: Config, attention, graphdef, rest, tx):
    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params, rest)
        masks = attention.build_masks(batch["doc_ids"])  # this batch's documents, in the step
        logits = model(batch["inputs"], masks)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        w = batch["weights"]
        return jnp.sum(losses * w) / jnp.maximum(jnp.sum(w), 1.0)

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step, jax.jit(loss_fn)


# ----------------------------------------------------------------------------- running


def device_info() -> dict:
    dev = jax.local_devices()[0]
    import flax

    return {
        "device": getattr(dev, "device_kind", str(dev)),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
    }


def peak_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def train(cfg: Config, impl: str, corpora=None, log=print) -> dict:
    """Train `impl` for cfg.steps; the result dict (losses, step times, memory) or a skip."""
    result = {"impl": impl, "config": dataclasses.asdict(cfg), **device_info()}
    try:
        attention = make_attention(impl, cfg)
    except Unsupported as e:
        log(f"[{impl}] skipped: {e}")
        return {**result, "status": "skipped", "reason": str(e)}
    train_set, val_set = corpora if corpora is not None else load_corpora()
    model = ByteLM(cfg, attention, nnx.Rngs(cfg.seed))  # same seed: same parameters for all
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    tx = make_optimizer(cfg)
    opt_state = tx.init(params)
    train_step, eval_loss = make_steps(cfg, attention, graphdef, rest, tx)
    log(
        f"[{impl}] {n_params / 1e6:.2f}M parameters, layers {cfg.layer_kinds()}, "
        f"{train_set.num_files} train files ({len(train_set.tokens) / 1e6:.1f}M bytes)"
    )

    losses, times = [], []
    for step in range(cfg.steps):
        batch = jax.device_put(batch_at(train_set, cfg, step, cfg.seed))
        t0 = time.perf_counter()
        params, opt_state, loss = train_step(params, opt_state, batch)
        loss = float(jax.block_until_ready(loss))
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"[{impl}] loss {loss} at step {step}")
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            log(f"[{impl}] step {step:4d}  loss {loss:.4f}  {times[-1] * 1e3:8.1f} ms")

    warm = times[min(10, len(times) // 2) :]
    median = statistics.median(warm)
    val = None
    if cfg.eval_batches:
        val = statistics.fmean(
            float(eval_loss(params, jax.device_put(batch_at(val_set, cfg, i, cfg.seed + 1))))
            for i in range(cfg.eval_batches)
        )
        log(f"[{impl}] validation loss {val:.4f} ({cfg.eval_batches} batches)")
    return {
        **result,
        "status": "ok",
        "parameters": n_params,
        "losses": losses,
        "step_times_s": times,
        "first_step_s": times[0],
        "median_step_ms": median * 1e3,
        "tokens_per_s": cfg.batch_size * cfg.seq_len / median,
        "peak_bytes": peak_bytes(),
        "val_loss": val,
    }


def run_isolated(cfg: Config, impl: str, out: pathlib.Path, log=print) -> dict:
    """`train` in a fresh process: its own peak memory, and an OOM stays there."""
    out.mkdir(parents=True, exist_ok=True)
    cfg_path, res_path = out / f".config_{impl}.json", out / f"train_lm_{impl}.json"
    cfg_path.write_text(json.dumps(dataclasses.asdict(cfg)))
    res_path.unlink(missing_ok=True)
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # room for the dense reference
    cmd = [
        sys.executable,
        str(pathlib.Path(__file__).resolve()),
        "--attention",
        impl,
        "--run-config",
        str(cfg_path),
        "--out",
        str(out),
    ]
    tail = collections.deque(maxlen=15)
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail.append(line.rstrip())
    cfg_path.unlink(missing_ok=True)
    if proc.returncode != 0 or not res_path.exists():
        reason = f"exit code {proc.returncode}: " + " | ".join(tail)[-600:]
        log(f"[{impl}] failed: {reason}")
        return {"impl": impl, "status": "failed", "reason": reason}
    return json.loads(res_path.read_text())


def fmt_bytes(n):
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def compare(cfg: Config, impls, out: pathlib.Path, isolate: bool, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if isolate:
        results = [run_isolated(cfg, impl, out, log) for impl in impls]
    else:
        corpora = load_corpora()
        results = [train(cfg, impl, corpora, log) for impl in impls]
    by_impl = {r["impl"]: r for r in results}
    ref = by_impl.get("dense", {}).get("losses")
    for r in results:
        if r["status"] == "ok" and ref and r["impl"] != "dense":
            diffs = np.abs(np.asarray(r["losses"]) - np.asarray(ref))
            r["max_abs_loss_diff_vs_dense"] = float(diffs.max())
            r["mean_abs_loss_diff_vs_dense"] = float(diffs.mean())
    summary = {
        "date": datetime.date.today().isoformat(),
        "isolated_processes": isolate,
        "config": dataclasses.asdict(cfg),
        "results": results,
    }
    (out / "train_lm_compare.json").write_text(json.dumps(summary, indent=1))
    table = markdown_table(cfg, results, isolate)
    (out / "train_lm_compare.md").write_text(table)
    plot(results, out / "train_lm_compare.png", cfg)
    log("\n" + table)
    log(f"wrote {out / 'train_lm_compare.md'}, .json and .png")
    return summary


def markdown_table(cfg: Config, results, isolate: bool) -> str:
    ok = next((r for r in results if r["status"] == "ok"), results[0])
    lines = [
        "# train_lm: flexjax vs dense attention vs cuDNN",
        "",
        f"{ok.get('device', '?')}, jax {ok.get('jax', '?')}, flax {ok.get('flax', '?')}, "
        f"optax {ok.get('optax', '?')}, {datetime.date.today().isoformat()}. "
        f"{cfg.num_layers} layers ({cfg.layer_kinds().count('local')} local, window "
        f"{cfg.window}), d_model {cfg.d_model}, {cfg.num_heads} heads, T={cfg.seq_len}, "
        f"batch {cfg.batch_size}, {cfg.dtype} compute, fp32 params; ALiBi "
        f"{'on' if cfg.alibi else 'off'}, soft-cap {cfg.softcap:g}; {cfg.steps} steps, "
        "same initialisation and batches. Step time: median after "
        f"{min(10, cfg.steps // 2)} warm-up steps, "
        "synchronised. Peak memory: the device's peak_bytes_in_use"
        + ("" if isolate else " (one process for all: each row is the peak so far)")
        + ".",
        "",
        "| attention | status | median step (ms) | tokens/s | first step incl. compile (s) "
        "| peak memory | final loss | max abs loss diff vs dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['impl']} | {r['status']}: {r['reason']} | | | | | | |")
            continue
        diff = r.get("max_abs_loss_diff_vs_dense")
        lines.append(
            f"| {r['impl']} | ok | {r['median_step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{r['first_step_s']:.1f} | {fmt_bytes(r['peak_bytes'])} | {r['losses'][-1]:.4f} | "
            f"{'-' if diff is None else f'{diff:.2e}'} |"
        )
    return "\n".join(lines) + "\n"


def plot(results, path: pathlib.Path, cfg: Config):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in results if r["status"] == "ok"]
    ref = next((r for r in ran if r["impl"] == "dense"), None)
    fig, axes = plt.subplots(1, 2 if ref else 1, figsize=(12 if ref else 6, 4), squeeze=False)
    for r in ran:
        axes[0, 0].plot(r["losses"], label=r["impl"], linewidth=1)
    axes[0, 0].set(xlabel="step", ylabel="train loss (nats/byte)", title="loss")
    axes[0, 0].legend()
    if ref:
        for r in ran:
            if r is not ref:
                diff = np.asarray(r["losses"]) - np.asarray(ref["losses"])
                axes[0, 1].plot(diff, label=f"{r['impl']} - dense", linewidth=1)
        axes[0, 1].axhline(0, color="gray", linewidth=0.5)
        axes[0, 1].set(xlabel="step", ylabel="loss difference", title="difference from dense")
        axes[0, 1].legend()
    fig.suptitle(
        f"byte LM on the stdlib: {cfg.num_layers} layers, d={cfg.d_model}, T={cfg.seq_len}, "
        f"B={cfg.batch_size}, {cfg.dtype}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line

FIELD_HELP = {
    "d_model": "model width",
    "num_layers": "transformer blocks",
    "num_heads": "attention heads (head dim = d_model / num_heads)",
    "seq_len": "tokens (bytes) per packed sequence",
    "batch_size": "sequences per step",
    "steps": "training steps (per implementation with --compare)",
    "lr": "peak learning rate (AdamW, warmup then cosine to lr/10)",
    "warmup": "warmup steps",
    "window": "local layers see the token itself and this many before it, in its document",
    "local_every": "layers 0, k, 2k, ... are local (sliding window)",
    "alibi": "ALiBi score_mod in every layer",
    "softcap": "tanh soft-cap of the global layers' scores (0: off; cuDNN cannot run it)",
    "dtype": "compute dtype, bfloat16 or float32 (parameters stay float32)",
    "block_size": "BlockMask block size",
    "seed": "initialisation and data order",
    "eval_batches": "validation batches after training",
    "log_every": "print the loss every this many steps",
}


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Train a byte-level transformer (Flax NNX) on the Python standard library's "
        "source with flexjax attention (document masks, sliding windows, ALiBi, soft-cap), or "
        "compare it with dense and cuDNN attention from the same initialisation and data.",
    )
    p.add_argument("--tiny", action="store_true", help="the CPU-sized config (else one H100's)")
    p.add_argument(
        "--attention",
        choices=IMPLEMENTATIONS,
        default="flexjax",
        help="the attention of a single run (default flexjax)",
    )
    p.add_argument("--compare", action="store_true", help="train every --impls and compare")
    p.add_argument(
        "--impls",
        default="flexjax,dense,cudnn",
        help="what --compare runs, in order (default flexjax,dense,cudnn)",
    )
    default_out = pathlib.Path(__file__).parent / "results"
    p.add_argument(
        "--out", default=str(default_out), help="output folder (default examples/results/)"
    )
    iso = p.add_mutually_exclusive_group()
    iso.add_argument(
        "--isolate",
        dest="isolate",
        action="store_true",
        default=None,
        help="--compare: one process per implementation (default without --tiny)",
    )
    iso.add_argument(
        "--no-isolate",
        dest="isolate",
        action="store_false",
        help="--compare: all in this process (default with --tiny)",
    )
    g = p.add_argument_group("model and training (default: the H100 config, or --tiny's)")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        defaults = f"H100 default {getattr(GPU_CONFIG, f.name)}"
        if getattr(TINY_CONFIG, f.name) != getattr(GPU_CONFIG, f.name):
            defaults += f", tiny {getattr(TINY_CONFIG, f.name)}"
        help_text = f"{FIELD_HELP[f.name]} ({defaults})"
        if f.type in ("bool", bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            g.add_argument(flag, type=kind, default=None, help=help_text)
    p.add_argument("--run-config", help=argparse.SUPPRESS)  # a child of --isolate
    args = p.parse_args(argv)
    if args.run_config:
        cfg = Config(**json.loads(pathlib.Path(args.run_config).read_text()))
    else:
        base = TINY_CONFIG if args.tiny else GPU_CONFIG
        given = {
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(Config)
            if getattr(args, f.name) is not None
        }
        cfg = dataclasses.replace(base, **given)
    if args.isolate is None:
        args.isolate = not args.tiny
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    bad = [s for s in impls if s not in IMPLEMENTATIONS]
    if bad or not impls:
        p.error(
            f"--impls: expected a comma-separated subset of {IMPLEMENTATIONS}, got {args.impls!r}"
        )
    args.impls = impls
    return args, cfg


def main(argv=None) -> dict:
    """Run as the command line says; returns the result (one run) or the comparison summary."""
    args, cfg = parse_args(argv)
    out = pathlib.Path(args.out)
    if args.compare:
        summary = compare(cfg, args.impls, out, args.isolate)
        if not any(r["status"] == "ok" for r in summary["results"]):
            raise SystemExit("no implementation ran")
        return summary
    result = train(cfg, args.attention)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_lm_{args.attention}.json").write_text(json.dumps(result, indent=1))
    if result["status"] != "ok":
        if args.run_config:  # a child of --compare: the parent reports the skip
            return result
        raise SystemExit(f"--attention {args.attention}: {result['reason']}")
    print(
        f"\n| attention | steps | first loss | final loss | median step (ms) | tokens/s | peak |\n"
        f"|---|---|---|---|---|---|---|\n"
        f"| {args.attention} | {cfg.steps} | {result['losses'][0]:.4f} | "
        f"{result['losses'][-1]:.4f} | {result['median_step_ms']:.1f} | "
        f"{result['tokens_per_s']:,.0f} | {fmt_bytes(result['peak_bytes'])} |"
    )
    return result


if __name__ == "__main__":
    main()
