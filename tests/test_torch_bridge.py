"""torch_bridge: torch tensors through flexjax's kernels, and the cross-framework parity suite.

Every seed example runs three ways on the same torch tensors:
  1. flexjax through the bridge (forward and backward, torch autograd);
  2. torch's own flex_attention: eager forward on the CPU (torch has no CPU
     flex backward), compiled forward and backward on the GPU;
  3. torch dense attention with autograd: SDPA with the dense mask for the
     pure-mask examples, the same math written out in torch (q k^T, the twin
     score_mod, the dense mask, softmax) for the score_mod examples, which
     SDPA cannot express.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_twins
from torch.nn.attention import flex_attention as tfa

import flexjax as fj
import torch_bridge as tb
import torch_bridge.attention as bridge
from flexjax import masks, mods
from flexjax.examples import EXAMPLES

F32_TOL = 2e-5  # max error relative to the largest magnitude, float32 on the CPU


def assert_close(ours, theirs, tol, what=""):
    ours, theirs = ours.detach().double().cpu(), theirs.detach().double().cpu()
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    assert not torch.isnan(ours).any(), f"{what}: NaN"
    finite = torch.isfinite(theirs)
    assert torch.equal(torch.isfinite(ours), finite), f"{what}: -inf rows differ"
    if not finite.any():
        return
    err = (ours[finite] - theirs[finite]).abs().max().item()
    scale = max(theirs[finite].abs().max().item(), 1e-6)
    assert err <= tol * scale, f"{what}: max error {err:.3g} vs max {scale:.3g}"


def dense_torch_attention(q, k, v, score_twin, dense_mask, scale):
    """Attention in plain torch ops with autograd: the third oracle for score_mod examples."""
    B, H, L, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    s = (q @ k.transpose(-1, -2)) * scale
    if score_twin is not None:
        idx = lambda n, dim: torch.arange(n).view([-1 if d == dim else 1 for d in range(4)])
        s = score_twin(s, idx(B, 0), idx(H, 1), idx(L, 2), idx(S, 3))
    if dense_mask is not None:
        s = s.masked_fill(~dense_mask, -float("inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return p @ v, lse


def leaf(x, dtype=torch.float32, device="cpu"):
    return x.to(device=device, dtype=dtype).detach().requires_grad_()


def backward_grads(out, lse, dout, dlse, tensors):
    loss = (out.float() * dout).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * dlse).sum()
    return torch.autograd.grad(loss, tensors)


def small_case(name):
    case = EXAMPLES[name].case("small", S=128, H=2, B=2, D=16)
    bm = t_bm = dense = None
    score_twin, mask_twin = torch_twins.twin(name, case.H, 128)
    if case.mask_mod is not None:
        L, S = case.Q_LEN, case.KV_LEN
        bm = fj.create_block_mask(case.mask_mod, 1, 1, L, S, BLOCK_SIZE=32)
        t_bm = tfa.create_block_mask(mask_twin, 1, 1, L, S, device="cpu", BLOCK_SIZE=32)
        dense = tfa.create_mask(mask_twin, 1, 1, L, S, device="cpu")
    return case, bm, t_bm, dense, score_twin


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_parity_every_seed_example(name):
    case, bm, t_bm, dense, score_twin = small_case(name)
    gen = torch.Generator().manual_seed(hash(name) % 1000)
    shape_q = (case.B, case.H, case.Q_LEN, case.D)
    shape_kv = (case.B, case.H, case.KV_LEN, case.D)
    q, k, v = (leaf(torch.randn(s, generator=gen)) for s in (shape_q, shape_kv, shape_kv))
    dout = torch.randn(shape_q, generator=gen)
    dlse = torch.randn(shape_q[:3], generator=gen) * 0.3
    scale = case.D**-0.5

    # 1. flexjax through the bridge
    out, lse = tb.flex_attention(q, k, v, score_mod=case.score_mod, block_mask=bm, return_lse=True)
    assert (
        isinstance(out, torch.Tensor) and out.dtype == torch.float32 and lse.dtype == torch.float32
    )
    grads = backward_grads(out, lse, dout, dlse, (q, k, v))

    # 2. torch flex_attention, eager forward (the CPU has no flex backward)
    with torch.no_grad():
        t_out, t_lse = tfa.flex_attention(
            q.detach(),
            k.detach(),
            v.detach(),
            score_mod=score_twin,
            block_mask=t_bm,
            return_lse=True,
        )
    assert_close(out, t_out, F32_TOL, "out vs torch flex")
    assert_close(lse, t_lse, F32_TOL, "lse vs torch flex")

    # 3. torch dense, forward and backward
    q2, k2, v2 = (leaf(x) for x in (q, k, v))
    if case.sdpa_comparable:
        if dense is None and score_twin is not None:  # a mask written as a score_mod
            dense = tfa.create_mask(score_twin, 1, 1, case.Q_LEN, case.KV_LEN, device="cpu")
        d_out = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=dense, scale=scale)
        _, d_lse = dense_torch_attention(q2, k2, v2, None, dense, scale)
    else:
        d_out, d_lse = dense_torch_attention(q2, k2, v2, score_twin, dense, scale)
    d_grads = backward_grads(d_out, d_lse, dout, dlse, (q2, k2, v2))
    assert_close(out, d_out, F32_TOL, "out vs torch dense")
    assert_close(lse, d_lse, F32_TOL, "lse vs torch dense")
    for g, d, n in zip(grads, d_grads, "qkv", strict=True):
        assert_close(g, d, F32_TOL, f"d{n} vs torch dense")


def test_zero_copy_both_ways():
    t = torch.randn(2, 3, 64, 16)
    j = tb.tensor_to_jax(t, "t")
    assert j.unsafe_buffer_pointer() == t.data_ptr()
    back = tb.array_to_torch(j)
    assert back.data_ptr() == t.data_ptr()
    x = jnp.arange(64.0).reshape(4, 16) * 2.0
    tx = tb.array_to_torch(x)
    assert tx.data_ptr() == x.unsafe_buffer_pointer()
    np.testing.assert_array_equal(tx.numpy(), np.asarray(x))
    # The bridge's output is a view of JAX's result: taking it back to JAX copies nothing.
    q = torch.randn(1, 1, 32, 16)
    out = tb.flex_attention(q, q, q)
    assert tb.tensor_to_jax(out, "out").unsafe_buffer_pointer() == out.data_ptr()


def test_gqa_kv_batch_broadcast_and_scale_match_sdpa():
    B, Hq, Hkv, L, S, E, Ev = 2, 4, 2, 48, 80, 16, 24
    gen = torch.Generator().manual_seed(3)
    q = leaf(torch.randn(B, Hq, L, E, generator=gen))
    k = leaf(torch.randn(1, Hkv, S, E, generator=gen))
    v = leaf(torch.randn(1, Hkv, S, Ev, generator=gen))
    bm = fj.create_block_mask(masks.generate_sliding_window(20), None, Hq, L, S, BLOCK_SIZE=16)
    out = tb.flex_attention(q, k, v, block_mask=bm, scale=0.3, enable_gqa=True)
    assert out.shape == (B, Hq, L, Ev)
    dout = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    dense = torch.from_numpy(np.array(fj.create_mask(bm.mask_mod, 1, 1, L, S)))
    q2, k2, v2 = (leaf(x) for x in (q, k, v))
    ref = F.scaled_dot_product_attention(
        q2, k2.expand(B, -1, -1, -1), v2.expand(B, -1, -1, -1),
        attn_mask=dense, scale=0.3, enable_gqa=True,
    )  # fmt: skip
    ref_grads = torch.autograd.grad((ref * dout).sum(), (q2, k2, v2))
    assert_close(out, ref, F32_TOL, "out")
    for g, r, n in zip(grads, ref_grads, "qkv", strict=True):
        assert g.shape == r.shape
        assert_close(g, r, F32_TOL, f"d{n}")


def test_captured_torch_tensors_and_learnable_parameter():
    # A mask capturing a torch document-id tensor; a score_mod capturing a learnable slope parameter.
    L, H = 96, 2
    doc = torch.tensor([0] * 40 + [1] * 56)
    slopes = torch.nn.Parameter(torch.tensor([0.3, 0.6]))

    def same_doc_causal(b, h, qi, kv):
        return (doc[qi] == doc[kv]) & (qi >= kv)

    def learnable_alibi(s, b, h, qi, kv):
        return s + slopes[h] * (kv - qi) * 0.1

    bm = tb.create_block_mask(same_doc_causal, 1, 1, L, L, BLOCK_SIZE=32)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (leaf(torch.randn(2, H, L, 16, generator=gen)) for _ in range(3))
    out = tb.flex_attention(q, k, v, score_mod=learnable_alibi, block_mask=bm)
    dout = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v, slopes))

    dense = (doc[:, None] == doc[None, :]) & torch.ones(L, L, dtype=torch.bool).tril()
    q2, k2, v2 = (leaf(x) for x in (q, k, v))
    ref, _ = dense_torch_attention(q2, k2, v2, learnable_alibi, dense, 16**-0.5)
    ref_grads = torch.autograd.grad((ref * dout).sum(), (q2, k2, v2, slopes))
    assert_close(out, ref, F32_TOL, "out")
    for g, r, n in zip(grads, ref_grads, ("dq", "dk", "dv", "dslopes"), strict=True):
        assert_close(g, r, F32_TOL, n)


def test_training_loop_compiles_once_and_unread_parameters_get_zero_grads():
    """Steps with new tensors and new parameter values reuse one jitted forward and backward."""
    from torch_bridge import attention as bridge

    L, H = 64, 2
    slopes = torch.nn.Parameter(torch.tensor([0.3, 0.6]))
    unread = torch.nn.Parameter(torch.tensor([1.0, 2.0]))  # captured, never read by the mod
    sizes = []
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        q, k, v = (leaf(torch.randn(1, H, L, 16, generator=gen)) for _ in range(3))

        def biased(s, b, h, qi, kv, unread=unread):
            return s + slopes[h] * (kv - qi) * 0.1

        out = tb.flex_attention(q, k, v, score_mod=biased)
        dout = torch.randn(out.shape, generator=gen)
        grads = torch.autograd.grad((out * dout).sum(), (q, k, v, slopes, unread))
        q2, k2, v2 = (leaf(x) for x in (q, k, v))
        ref, _ = dense_torch_attention(q2, k2, v2, biased, None, 16**-0.5)
        ref_grads = torch.autograd.grad((ref * dout).sum(), (q2, k2, v2, slopes))
        for g, r, n in zip(grads[:4], ref_grads, ("dq", "dk", "dv", "dslopes"), strict=True):
            assert_close(g, r, F32_TOL, n)
        assert torch.equal(grads[4], torch.zeros(2))
        with torch.no_grad():
            slopes.add_(0.1)  # a new value, as an optimizer step makes
        sizes.append(
            (bridge._forward_and_pullback._cache_size(), bridge._apply_pullback._cache_size())
        )
    assert sizes[1] == sizes[2] == sizes[0], sizes


def test_flexjax_block_masks_accept_mods_capturing_torch_tensors():
    """With torch_bridge imported, flexjax's own builders take mods that capture torch tensors."""
    L = 64
    doc = torch.tensor([0] * 24 + [1] * 40)

    def same_doc(b, h, qi, kv):
        return doc[qi] == doc[kv]

    bm = fj.create_block_mask(same_doc, 1, 1, L, L, BLOCK_SIZE=32)
    rows = fj.BlockMask.from_kv_blocks(
        bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
        BLOCK_SIZE=32, mask_mod=same_doc,
    )  # fmt: skip
    dense = (doc[:, None] == doc[None, :]).numpy()
    for mask in (bm, rows):
        np.testing.assert_array_equal(
            np.asarray(fj.create_mask(mask.mask_mod, 1, 1, L, L))[0, 0], dense
        )
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, L, 16, generator=gen) for _ in range(3))
    out = tb.flex_attention(q, k, v, block_mask=rows)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.from_numpy(dense))
    assert_close(out, ref, F32_TOL, "out")


def test_torch_block_mask_is_converted_with_its_jnp_mask_mod():
    L = 100
    t_bm = tfa.create_block_mask(torch_twins.causal_mask, 1, 1, L, L, device="cpu", BLOCK_SIZE=32)
    gen = torch.Generator().manual_seed(5)
    # Distinct q, k, v: torch 2.13's dynamo crashes explaining a recompile for aliased inputs.
    q, k, v = (leaf(torch.randn(1, 2, L, 16, generator=gen)) for _ in range(3))
    out = tb.flex_attention(q, k, v, block_mask=t_bm, mask_mod=masks.causal_mask)
    with torch.no_grad():
        ref = tfa.flex_attention(q.detach(), k.detach(), v.detach(), block_mask=t_bm)
    assert_close(out, ref, F32_TOL, "out")
    with pytest.raises(ValueError, match="mask_mod="):
        tb.flex_attention(q, k, v, block_mask=t_bm)


def jagged_inputs(lengths, H, D, gen):
    """Packed values [total, H*D] (the leaves) and their jagged tensors, as in the seed."""
    total = sum(lengths)
    offsets = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int64)
    values = [leaf(torch.randn(total, H * D, generator=gen)) for _ in range(3)]
    njts = [torch.nested.nested_tensor_from_jagged(x, offsets) for x in values]
    return values, njts, offsets


def njt_causal_block_mask(offsets, total, device="cpu"):
    """The seed's NJT wrapper: causal within each packed sequence (jnp mod, torch tensors captured)."""
    seq_idx = (
        torch.searchsorted(offsets, torch.arange(total, device=offsets.device), right=True) - 1
    )

    def njt_causal(b, h, q_idx, kv_idx):
        q_nested = q_idx - offsets[seq_idx[q_idx]]
        kv_nested = kv_idx - offsets[seq_idx[kv_idx]]
        return (q_nested >= kv_nested) & (seq_idx[q_idx] == seq_idx[kv_idx])

    return tb.create_block_mask(njt_causal, 1, 1, total, total, device=device, BLOCK_SIZE=32)


def test_nested_jagged_tensor_without_multiple_of_128_rule():
    lengths = [37, 1, 90, 14, 61]
    H, D = 2, 16
    total = sum(lengths)
    assert total % 128 != 0
    gen = torch.Generator().manual_seed(6)
    values, njts, offsets = jagged_inputs(lengths, H, D, gen)
    bm = njt_causal_block_mask(offsets, total)
    heads = lambda x: x.unflatten(-1, (H, D)).transpose(0, 1).unsqueeze(0)  # [1, H, total, D]
    out = tb.flex_attention(*(heads(x) for x in values), block_mask=bm)
    dout = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((out * dout).sum(), values)
    # SDPA on the jagged tensor's sequences (torch's CPU SDPA refuses a causal jagged
    # batch, so the sequences go one by one; the GPU test uses the jagged batch).
    ref = torch.cat(
        [
            F.scaled_dot_product_attention(
                *(x.unflatten(-1, (H, D)).transpose(0, 1) for x in seq), is_causal=True
            )
            for seq in zip(*(njt.unbind() for njt in njts), strict=True)
        ],
        dim=1,
    ).unsqueeze(0)
    ref_grads = torch.autograd.grad((ref * dout).sum(), values)
    assert_close(out, ref, F32_TOL, "out")
    for g, r, n in zip(grads, ref_grads, "qkv", strict=True):
        assert_close(g, r, F32_TOL, f"d{n}")


def test_lse_only_backward_and_no_grad():
    gen = torch.Generator().manual_seed(7)
    q, k, v = (leaf(torch.randn(1, 2, 40, 16, generator=gen)) for _ in range(3))
    _, lse = tb.flex_attention(q, k, v, return_lse=True)
    grads = torch.autograd.grad(lse.sum(), (q, k, v), allow_unused=True)
    q2, k2, v2 = (leaf(x) for x in (q, k, v))
    _, ref_lse = dense_torch_attention(q2, k2, v2, None, None, 0.25)
    ref = torch.autograd.grad(ref_lse.sum(), (q2, k2, v2), allow_unused=True)
    assert_close(grads[0], ref[0], F32_TOL, "dq")
    assert_close(grads[1], ref[1], F32_TOL, "dk")
    assert grads[2].abs().max() == 0 and ref[2] is None  # lse does not depend on v
    with torch.no_grad():
        out = tb.flex_attention(q, k, v)
    assert not out.requires_grad and out.grad_fn is None


def test_in_place_changes_before_backward_are_refused():
    q = leaf(torch.randn(1, 1, 32, 16))
    out = tb.flex_attention(q, q, q)
    with torch.no_grad():
        out.add_(1.0)  # the pullback reads `out`'s memory: torch must refuse
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_torch_deterministic_mode_asks_the_kernels_for_determinism(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the call's kernel_options gain
    "deterministic": True (what the caller says wins), and the call runs with it."""
    seen = []
    monkeypatch.setattr(bridge, "_PLANS", {})  # every structure checked anew
    checked = bridge.checked_static_call
    monkeypatch.setattr(
        bridge, "checked_static_call", lambda *a, **kw: seen.append(a[7]) or checked(*a, **kw)
    )
    q, k, v = (torch.randn(1, 2, 32, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))  # fmt: skip
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        out = tb.flex_attention(q, k, v)
        tb.flex_attention(q, k, v, kernel_options={"deterministic": False})
    finally:
        torch.use_deterministic_algorithms(before)
    tb.flex_attention(q, k, v, kernel_options={"block_m": 16})
    assert [o.get("deterministic") for o in seen] == [True, False, None]
    ref, _ = dense_torch_attention(q, k, v, None, None, 16**-0.5)
    assert_close(out, ref, F32_TOL, "out")


def test_non_contiguous_inputs_give_the_contiguous_result():
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(1, 32, 2, 16, generator=gen)
    q = base.transpose(1, 2)  # [1, 2, 32, 16], not contiguous
    assert not q.is_contiguous()
    out = tb.flex_attention(q, q, q, score_mod=mods.causal_bias)
    ref = tb.flex_attention(*(q.contiguous(),) * 3, score_mod=mods.causal_bias)
    assert_close(out, ref, F32_TOL, "out")  # q runs as BSHD memory: a different tiling
    other = torch.randn(1, 2, 32, 32, generator=gen)[..., ::2]  # neither layout
    assert not other.is_contiguous() and not other.transpose(1, 2).is_contiguous()
    out = tb.flex_attention(other, other, other, score_mod=mods.causal_bias)
    ref = tb.flex_attention(*(other.contiguous(),) * 3, score_mod=mods.causal_bias)
    assert torch.equal(out, ref)  # copied to BHSD: the same call


def test_bshd_views_run_without_copies_and_match_contiguous_inputs():
    """[B, H, L, D] views of [B, L, H, D] memory (attention layers' q/k/v) run in that layout.

    Forward, lse and every gradient equal the contiguous call's; out is a view
    of [B, L, H, D] memory, and q/k/v's memory is read in place (no copy).
    """
    from torch_bridge import attention as bridge

    gen = torch.Generator().manual_seed(9)
    B, L, S, Hq, Hkv, E = 2, 40, 56, 4, 2, 16
    qs, ks, vs = (torch.randn(B, n, h, E, generator=gen) for n, h in ((L, Hq), (S, Hkv), (S, Hkv)))
    views = [leaf(x).transpose(1, 2) for x in (qs, ks, vs)]  # grads flow to the BSHD leaves
    assert bridge._layout_of(*views) is bridge.Layout.BSHD
    dense = [leaf(x.transpose(1, 2).contiguous()) for x in (qs, ks, vs)]
    assert bridge._layout_of(*dense) is bridge.Layout.BHSD
    bm = fj.create_block_mask(masks.causal_mask, 1, 1, L, S, BLOCK_SIZE=16)
    run = lambda q, k, v: tb.flex_attention(
        q, k, v, mods.causal_bias, bm, enable_gqa=True, return_lse=True
    )
    out, lse = run(*views)
    ref, ref_lse = run(*dense)
    assert out.transpose(1, 2).is_contiguous() and lse.transpose(1, 2).is_contiguous()
    assert_close(out, ref, F32_TOL, "out")
    assert_close(lse, ref_lse, F32_TOL, "lse")
    dout = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((out * dout).sum() + lse.sum(), views)
    ref_grads = torch.autograd.grad((ref * dout).sum() + ref_lse.sum(), dense)
    for g, r, n in zip(grads, ref_grads, ("dq", "dk", "dv"), strict=True):
        assert g.shape == r.shape
        assert_close(g, r, F32_TOL, n)
    copied = []

    def recording(convert):
        def record(tensors, *a, **kw):
            copied.extend(not t.is_contiguous() for t in tensors)
            return convert(tensors, *a, **kw)

        return record

    originals = {name: getattr(bridge, name) for name in ("tensors_to_jax", "import_checked")}
    for name, convert in originals.items():
        setattr(bridge, name, recording(convert))
    try:
        run(*views)
    finally:
        for name, convert in originals.items():
            setattr(bridge, name, convert)
    assert copied == [False, False, False]  # every tensor crossed as it lies in memory


def test_repeated_call_structures_are_checked_once_and_stay_correct(monkeypatch):
    """A call structure seen before skips the checks (`_plan_key`), with new tensors and a new
    closure over new captured values each call; anything that changes the structure is
    checked again, and bad input still raises after a good call of the same shapes."""
    calls = []
    checked = bridge.checked_static_call
    monkeypatch.setattr(
        bridge, "checked_static_call", lambda *a, **kw: calls.append(1) or checked(*a, **kw)
    )
    B, H, L, D = 1, 2, 64, 16

    def slope_mod(slope):  # a new closure over a new 0-d array each call
        return lambda s, b, h, qi, kv: s + slope * (qi - kv) / L

    bm = fj.create_block_mask(masks.causal_mask, 1, 1, L, L, BLOCK_SIZE=16)
    dense = tfa.create_mask(torch_twins.causal_mask, 1, 1, L, L, device="cpu")
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
        out = tb.flex_attention(q, k, v, slope_mod(jnp.float32(0.5 * step + 0.25)), bm)
        twin = lambda s, b, h, qi, kv, c=0.5 * step + 0.25: s + c * (qi - kv) / L
        ref, _ = dense_torch_attention(q, k, v, twin, dense, D**-0.5)
        assert_close(out, ref, F32_TOL, f"step {step}")
    assert len(calls) == 1
    tq, tk, tv = (leaf(torch.randn(B, H, L, D, generator=gen)) for _ in range(3))
    out = tb.flex_attention(tq, tk, tv, block_mask=bm)
    grads = torch.autograd.grad(out.sum(), (tq, tk, tv))
    ref, _ = dense_torch_attention(tq, tk, tv, None, dense, D**-0.5)
    for g, r in zip(grads, torch.autograd.grad(ref.sum(), (tq, tk, tv)), strict=True):
        assert_close(g, r, F32_TOL, "grad")
    tb.flex_attention(q, k, v, block_mask=bm)  # no grad: the same plan again
    assert len(calls) == 2  # the score_mod's program differs from the first plan's
    tb.flex_attention(q, k, v, block_mask=bm, scale=0.3)
    tb.flex_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, block_mask=bm)
    assert len(calls) == 4  # a new scale, new strides: checked again
    with pytest.raises(ValueError, match="scale"):
        tb.flex_attention(q, k, v, block_mask=bm, scale=float("nan"))
    with pytest.raises(TypeError, match="float64"):
        tb.flex_attention(q.double(), k, v, block_mask=bm)
    with pytest.raises(ValueError, match="BACKEND"):
        tb.flex_attention(q, k, v, block_mask=bm, kernel_options={"BACKEND": "NOPE"})


@pytest.mark.parametrize(
    "make,exc,words",
    [
        (lambda q: dict(query=q.double()), TypeError, "query must be float16, bfloat16 or float32"),
        (lambda q: dict(key=q.to(torch.int32)), TypeError, "key must be float16"),
        (lambda q: dict(value=torch.empty(q.shape, device="meta")), ValueError, "same device"),
        (lambda q: dict(query="q"), TypeError, "query must be a torch.Tensor"),
        (
            lambda q: dict(
                block_mask=fj.create_block_mask(masks.causal_mask, 1, 1, 32, 32),
                mask_mod=masks.causal_mask,
            ),
            ValueError,
            "only for converting a torch BlockMask",
        ),
    ],
)
def test_bad_inputs_get_clear_errors(make, exc, words):
    q = torch.randn(1, 1, 32, 16)
    args = dict(query=q, key=q, value=q)
    args.update(make(q))
    with pytest.raises(exc, match=words):
        tb.flex_attention(**args)


# ----------------------------------------------------------------------------- GPU


def _cuda_case(name):
    case = EXAMPLES[name].case("seed")
    torch.set_default_device("cuda")  # the twins' captured tensors must live on the GPU
    try:
        score_twin, mask_twin = torch_twins.twin(name, case.H, case.KV_LEN)
    finally:
        torch.set_default_device(None)
    bm = t_bm = None
    if case.mask_mod is not None:
        bm = fj.create_block_mask(case.mask_mod, 1, 1, case.Q_LEN, case.KV_LEN)
        t_bm = tfa.create_block_mask(mask_twin, 1, 1, case.Q_LEN, case.KV_LEN, device="cuda")
    return case, bm, t_bm, score_twin


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_parity_at_seed_sizes_against_compiled_torch_flex_on_gpu(name):
    case, bm, t_bm, score_twin = _cuda_case(name)
    dtype = {jnp.float16: torch.float16, jnp.bfloat16: torch.bfloat16}.get(
        case.dtype.type, torch.float32
    )
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape_q = (case.B, case.H, case.Q_LEN, case.D)
    shape_kv = (case.B, case.H, case.KV_LEN, case.D)
    q, k, v = (
        leaf(torch.randn(s, generator=gen, device="cuda"), dtype, "cuda")
        for s in (shape_q, shape_kv, shape_kv)
    )
    dout = torch.randn(shape_q, generator=gen, device="cuda")
    dlse = torch.randn(shape_q[:3], generator=gen, device="cuda") * 0.3

    out, lse = tb.flex_attention(q, k, v, score_mod=case.score_mod, block_mask=bm, return_lse=True)
    assert out.device == q.device and out.dtype == dtype
    grads = backward_grads(out, lse, dout, dlse, (q, k, v))

    # A fresh dynamo cache: past its recompile limit torch silently falls back to an
    # eager flex_attention that materialises the scores (64 GiB here).
    torch._dynamo.reset()
    compiled = torch.compile(tfa.flex_attention, dynamic=False)
    q2, k2, v2 = (leaf(x, dtype, "cuda") for x in (q, k, v))
    t_out, t_lse = compiled(q2, k2, v2, score_mod=score_twin, block_mask=t_bm, return_lse=True)
    t_grads = backward_grads(t_out, t_lse, dout, dlse, (q2, k2, v2))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert_close(out, t_out, tol, "out")
    assert_close(lse, t_lse, 1e-3, "lse")
    for g, t, n in zip(grads, t_grads, "qkv", strict=True):
        assert_close(g, t, tol, f"d{n}")


@pytest.mark.gpu
def test_nested_jagged_tensor_against_jagged_sdpa_on_gpu():
    # The seed's example: 16 sequences of random length 1..1024, fp16, causal per sequence.
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 1025, (16,), generator=gen).tolist()
    H, D = 16, 64
    total = sum(lengths)
    values, _, offsets = jagged_inputs(lengths, H, D, gen)
    values = [leaf(x, torch.float16, "cuda") for x in values]
    offsets = offsets.cuda()
    njts = [torch.nested.nested_tensor_from_jagged(x, offsets) for x in values]
    bm = njt_causal_block_mask(offsets, total, device="cuda")
    heads = lambda x: x.unflatten(-1, (H, D)).transpose(0, 1).unsqueeze(0)
    out = tb.flex_attention(*(heads(x) for x in values), block_mask=bm)
    dout = torch.randn(out.shape, device="cuda", dtype=torch.float16)
    grads = torch.autograd.grad((out * dout).sum(), values)
    ref = F.scaled_dot_product_attention(
        *(x.unflatten(-1, (H, D)).transpose(1, 2) for x in njts), is_causal=True
    )  # jagged batch [16, H, j, D]
    ref = ref.transpose(1, 2).values().transpose(0, 1).unsqueeze(0)  # [1, H, total, D]
    ref_grads = torch.autograd.grad((ref * dout).sum(), values)
    assert_close(out, ref, 1e-2, "out")
    for g, r, n in zip(grads, ref_grads, "qkv", strict=True):
        assert_close(g, r, 1e-2, f"d{n}")


@pytest.mark.gpu
def test_inputs_written_just_before_the_call_are_read_after_the_write_on_gpu():
    # tensors_to_jax orders the group with one stream handshake (on the first tensor): the
    # others, still being written by queued torch work when the call is made, must be read
    # after that work. A long matmul chain queued first makes a missing wait visible.
    gen = torch.Generator(device="cuda").manual_seed(3)
    B, H, S, D = 2, 4, 1024, 64
    q, k0, v0 = (torch.randn(B, H, S, D, generator=gen, device="cuda") for _ in range(3))
    big = torch.randn(4096, 4096, generator=gen, device="cuda") / 64
    for _ in range(3):
        ref_out = F.scaled_dot_product_attention(q, k0, v0)
        k, v = torch.zeros_like(k0), torch.zeros_like(v0)
        torch.cuda.synchronize()
        x = big
        for _ in range(40):  # ~ms of queued work before k and v are written
            x = x @ big
        k.copy_(k0 + 0 * x[0, 0])  # written after the chain, on torch's stream
        v.copy_(v0 + 0 * x[0, 1])
        out = tb.flex_attention(q, k, v, kernel_options={"interpret": False})
        assert_close(out, ref_out, 2e-2, "out")
