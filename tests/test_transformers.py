"""Hugging Face transformers models with attn_implementation="flexjax" (torch_bridge.hf), on the CPU.

Tiny models built from configs (no download), float32: the logits and a
training step's gradients of every parameter equal those of the same weights
under transformers' "sdpa" implementation (or "eager" for Gemma 2's soft-cap,
which sdpa refuses), with and without padding; the mask builder equals
transformers' dense `sdpa_mask` for each of its mask pieces; and what flexjax
cannot do is refused by name.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)
from transformers import masking_utils as mu  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

import flexjax as fj  # noqa: E402
import torch_bridge.hf as tbhf  # noqa: E402
from pallas_kernels import dispatch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGITS_TOL = 1e-5  # max error relative to the largest magnitude, float32 (seen: ~5e-7)
GRAD_TOL = 5e-5  # per parameter, relative to that gradient's largest magnitude (seen: ~6e-7)
VOCAB, B, L = 128, 2, 64
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
    initializer_range=0.2,  # 10x the default: scores of order 1, attention far from uniform
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def registered():
    assert tbhf.register() == "flexjax"


def rel_err(ours, theirs) -> float:
    scale = theirs.detach().abs().max().clamp_min(1e-30)
    return ((ours.detach() - theirs.detach()).abs().max() / scale).item()


def padding(kind: str) -> torch.Tensor | None:
    """A [B, L] attention_mask (1 = token) with left or right padding, or None."""
    if kind == "none":
        return None
    keep = torch.ones(B, L, dtype=torch.long)
    if kind == "left":
        keep[0, :13], keep[1, :40] = 0, 0
    else:
        keep[0, 50:], keep[1, 9:] = 0, 0
    return keep


def step(model, ids, attention_mask, targets):
    """Logits and every parameter's gradient of a cross-entropy on the real (unpadded) tokens.

    Padded positions are left out of the loss: their queries see no key, and
    implementations differ there (eager averages every value, sdpa and flexjax give 0).
    """
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=attention_mask).logits
    real = torch.ones(B, L, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    F.cross_entropy(logits[real], targets[real]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logits.detach(), real, grads


def compare_with(model, reference: str, pad: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids, targets = (torch.randint(0, VOCAB, (B, L), generator=gen) for _ in range(2))
    attention_mask = padding(pad)
    model.set_attn_implementation(reference)
    ref_logits, real, ref_grads = step(model, ids, attention_mask, targets)
    model.set_attn_implementation("flexjax")
    logits, _, grads = step(model, ids, attention_mask, targets)
    assert rel_err(logits[real], ref_logits[real]) < LOGITS_TOL
    assert set(grads) == set(ref_grads) and len(grads) > 10
    for name, g in grads.items():
        assert ref_grads[name].abs().max() > 0, name  # a gradient that tests something
        assert rel_err(g, ref_grads[name]) < GRAD_TOL, name


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(LlamaConfig(**TINY), attn_implementation="sdpa")


@pytest.mark.parametrize("pad", ["none", "left", "right"])
def test_llama_logits_and_gradients_match_sdpa(llama, pad):
    # 4 query heads over 2 key/value heads: GQA through enable_gqa; scaling = head_dim**-0.5.
    compare_with(llama, "sdpa", pad, seed={"none": 1, "left": 2, "right": 3}[pad])


def test_mistral_sliding_window_matches_sdpa():
    torch.manual_seed(1)
    config = MistralConfig(**TINY, sliding_window=16)  # windows of 16 in a 64-token sequence
    model = MistralForCausalLM._from_config(config, attn_implementation="sdpa")
    compare_with(model, "sdpa", "left", seed=4)


def test_gemma2_softcap_and_sliding_layers_match_eager():
    torch.manual_seed(2)
    # Scores of a few units, which a soft-cap of 2 bends; scaling = query_pre_attn_scalar**-0.5
    # = 1/16, not head_dim**-0.5.
    config = Gemma2Config(
        **dict(TINY, initializer_range=0.3), head_dim=16, sliding_window=16,
        attn_logit_softcapping=2.0, query_pre_attn_scalar=256,
    )  # fmt: skip
    model = Gemma2ForCausalLM._from_config(config, attn_implementation="eager")
    assert model.model.layers[0].self_attn.sliding_window == 16  # sliding, then full layers
    compare_with(model, "eager", "right", seed=5)


def test_llama_greedy_generation_with_cache_matches_sdpa(llama):
    # Prefill with left padding, then one query over a growing DynamicCache per token: the
    # builder gets q_offset / kv_length from the cache, and the kernels take the decode path.
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, VOCAB, (B, 20), generator=gen)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :7] = 0
    out = {}
    llama.eval()
    for impl in ("sdpa", "flexjax"):
        llama.set_attn_implementation(impl)
        out[impl] = llama.generate(
            ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False, pad_token_id=0
        )
    llama.train()
    assert out["sdpa"].shape == (B, 24)
    assert torch.equal(out["flexjax"], out["sdpa"])


def test_static_cache_generation_matches_sdpa_and_compiles_once_per_query_length(llama):
    # A StaticCache keeps every length fixed and moves the query offset, which the mask
    # builder passes as a captured 0-d tensor (a kernel input): 8 generated tokens trace
    # kernels for two query lengths (the prompt, then one token), not once per token.
    # generate() hands the prepared BlockMask back to the model, and transformers
    # recognises a prepared 4D mask by its .ndim.
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (B, 21), generator=gen)  # 21 + 8: lengths no other test uses
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0
    kwargs = dict(attention_mask=attention_mask, do_sample=False, pad_token_id=0)
    kwargs.update(cache_implementation="static", max_new_tokens=8)
    llama.eval()
    out = {}
    for impl in ("sdpa", "flexjax"):
        llama.set_attn_implementation(impl)
        before = sum(dispatch.trace_count(k) for k in ("fwd", "dq", "dkdv", "decode"))
        out[impl] = llama.generate(ids, **kwargs)
        traced = sum(dispatch.trace_count(k) for k in ("fwd", "dq", "dkdv", "decode")) - before
    llama.train()
    assert out["sdpa"].shape == (B, 29) and torch.equal(out["flexjax"], out["sdpa"])
    assert traced == 2


# --- the mask builder against transformers' dense masks ------------------------------------------


ML = 640  # the builder tests' length: five 128-blocks, so skipped blocks show in density()


def builder_masks(config, build, **kwargs):
    """(flexjax BlockMask, sdpa's dense [B, 1, ML, ML] bool mask) from one transformers mask builder."""
    embeds = torch.zeros(B, ML, 8)
    attention_mask = kwargs.pop("attention_mask", None)
    out = {}
    for impl in ("flexjax", "sdpa"):
        config._attn_implementation = impl
        out[impl] = build(config, embeds, attention_mask, None, **kwargs)
    return out["flexjax"], out["sdpa"]


def element_mask(bm: fj.BlockMask, batch: int) -> torch.Tensor:
    """The BlockMask's mask_mod evaluated everywhere, [batch, 1, L, S], as torch bool."""
    dense = fj.create_mask(bm.mask_mod, bm.shape[0], 1, bm.seq_lengths[0], bm.seq_lengths[1])
    return torch.from_dlpack(dense).bool().expand(batch, -1, -1, -1)


def pieces():
    keep = torch.ones(B, ML, dtype=torch.bool)
    keep[0, :300], keep[1, 600:] = False, False  # left padding, right padding
    packed = torch.cat([torch.arange(200), torch.arange(300), torch.arange(140)])[None].expand(
        B, ML
    )
    odd = lambda b, h, q, kv: (q + kv) % 3 != 0  # noqa: E731 (not a masking_utils piece)
    no_skip = {"allow_is_causal_skip": False}
    return {
        "causal": (mu.create_causal_mask, {}, no_skip),
        "causal+padding": (mu.create_causal_mask, {}, {"attention_mask": keep}),
        "sliding+padding": (
            mu.create_sliding_window_causal_mask, {"sliding_window": 70},
            {"attention_mask": keep, **no_skip},
        ),
        "chunked+padding": (
            mu.create_chunked_causal_mask, {"attention_chunk_size": 256},
            {"attention_mask": keep, **no_skip},
        ),
        "bidirectional+padding": (mu.create_bidirectional_mask, {}, {"attention_mask": keep}),
        "packed sequences": (mu.create_causal_mask, {}, {"position_ids": packed}),
        "or_mask_function": (
            mu.create_causal_mask, {}, {"or_mask_function": mu.sliding_window_overlay(-200)},
        ),
        "unknown and_mask_function": (
            mu.create_causal_mask, {}, {"attention_mask": keep, "and_mask_function": odd},
        ),
    }  # fmt: skip


@pytest.mark.parametrize("kind", list(pieces()))
def test_mask_builder_equals_sdpa_mask(kind):
    build, config_kwargs, kwargs = pieces()[kind]
    config = LlamaConfig(**TINY, **config_kwargs)
    if kind.startswith("unknown"):
        with pytest.warns(UserWarning, match="evaluated densely"):
            bm, dense = builder_masks(config, build, **kwargs)
    else:
        bm, dense = builder_masks(config, build, **kwargs)
    assert isinstance(bm, fj.BlockMask) and dense.shape == (B, 1, ML, ML)
    assert bm.shape[0] == (1 if kind in ("causal", "or_mask_function") else B)
    assert torch.equal(element_mask(bm, B), dense)
    # The tables visit exactly the 128 x 128 blocks holding a kept element: the ones that
    # causality, padding, windows or documents leave empty are skipped.
    blocks = dense.reshape(B, 1, ML // 128, 128, ML // 128, 128).any(dim=(3, 5))
    assert torch.equal(torch.from_dlpack(bm.to_dense()).bool().expand(B, -1, -1, -1), blocks)
    assert not blocks.all() or kind == "or_mask_function"


def test_mask_builder_with_cache_offsets_equals_sdpa_mask():
    # Decoding 4 tokens at positions 60..63 over a 64-token cache, padding on the left.
    keep = padding("left").bool()
    kwargs = dict(batch_size=B, q_length=4, kv_length=L, q_offset=torch.tensor(60), kv_offset=0)
    kwargs.update(mask_function=mu.causal_mask_function, attention_mask=keep)
    bm = tbhf.flexjax_attention_mask(**kwargs)
    dense = mu.sdpa_mask(**kwargs, allow_is_causal_skip=False)
    assert torch.equal(element_mask(bm, B), dense)


# --- the attention function on its own: masks given as tensors or not at all ---------------------


class Attn(torch.nn.Module):
    def __init__(self, is_causal, groups):
        super().__init__()
        self.is_causal, self.num_key_value_groups = is_causal, groups


def qkv(seed, Hq=4, Hkv=2, Lq=40, S=40, D=16):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=gen)
    k, v = (torch.randn(B, Hkv, S, D, generator=gen) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("mask", ["bool 4D", "float 4D", "None causal", "None bidirectional"])
def test_attention_function_matches_sdpa_function(mask):
    q, k, v = qkv(7)
    module = Attn(is_causal=mask != "None bidirectional", groups=2)
    gen = torch.Generator().manual_seed(8)
    attention_mask = None
    if mask == "bool 4D":
        attention_mask = torch.rand(B, 1, 40, 40, generator=gen) > 0.3
    elif mask == "float 4D":  # an additive bias, -inf where masked
        attention_mask = torch.randn(B, 1, 40, 40, generator=gen)
        attention_mask[torch.rand(B, 1, 40, 40, generator=gen) < 0.3] = -float("inf")
    ours, weights = tbhf.flexjax_attention_forward(module, q, k, v, attention_mask, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module, q, k, v, attention_mask, scaling=0.3)
    assert weights is None and ours.shape == (B, 40, 4, 16) == theirs.shape
    assert rel_err(ours, theirs) < LOGITS_TOL


# --- refusals ------------------------------------------------------------------------------------


def test_dropout_in_training_raises_and_eval_runs():
    torch.manual_seed(3)
    config = LlamaConfig(**TINY, attention_dropout=0.1)
    model = LlamaForCausalLM._from_config(config, attn_implementation="flexjax")
    ids = torch.randint(0, VOCAB, (B, L))
    model.train()
    with pytest.raises(ValueError, match="dropout=0.1"):
        model(ids)
    model.eval()  # the layers then pass dropout=0.0
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"s_aux": torch.zeros(4)}, ValueError, "s_aux"),
        ({"position_bias": torch.zeros(1, 4, 8, 8)}, ValueError, "position_bias"),
        ({"attention_mask": torch.ones(B, 8, dtype=torch.bool)}, TypeError, "4D torch tensor"),
        ({"attention_mask": "torch BlockMask"}, TypeError, "torch flex_attention BlockMask"),
        ({"sliding_window": 4, "is_causal": False}, ValueError, "sliding_window=4"),
    ],
)
def test_unsupported_arguments_are_refused_by_name(kwargs, error, match):
    q, k, v = qkv(9, Lq=8, S=8)
    if kwargs.get("attention_mask") == "torch BlockMask":
        from torch.nn.attention.flex_attention import create_block_mask

        kwargs["attention_mask"] = create_block_mask(
            mu.causal_mask_function, 1, 1, 8, 8, device="cpu"
        )
    attention_mask = kwargs.pop("attention_mask", None)
    with pytest.raises(error, match=match):
        tbhf.flexjax_attention_forward(Attn(True, 2), q, k, v, attention_mask, **kwargs)


def test_flexjax_and_torch_bridge_do_not_import_transformers():
    code = "import sys, flexjax, torch_bridge; print('transformers' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
