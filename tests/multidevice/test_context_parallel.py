"""Context parallelism on 4 (forced CPU) devices equals one device: out, lse and every gradient.

Causal, sliding-window, document and prefix-LM masks under the contiguous,
head-tail and PTRR orders, with a sequence length that is not a multiple
of the blocks (padding blocks), GQA, a learnable captured bias, batch and
head axes beside the sequence axis, the user's own shard_map, and the
compiled programs' collectives: K and V all-gathered (and dK, dV
reduce-scattered), q and the outputs never moved.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_qkv
from jax.sharding import PartitionSpec as P

import flexjax as fj
from flexjax import masks
from flexjax import parallel as cp
from pallas_kernels import dispatch

TOL = dict(atol=2e-5, rtol=2e-5)
GRAD_TOL = dict(atol=1e-4, rtol=1e-4)
S, BS = 1000, 64  # 16 blocks, the last one partial


def mesh_of(shape, names):
    return jax.sharding.Mesh(np.array(jax.devices()[: np.prod(shape)]).reshape(shape), names)


def documents(seq_len):
    lengths = [137, 300, 63, 200, seq_len - 700]
    doc = masks.document_id_from_lengths(lengths)
    return masks.generate_doc_mask_mod(doc)


MASKS = {
    "causal": lambda: masks.causal_mask,
    "sliding_window": lambda: masks.generate_sliding_window(150),
    "documents": lambda: documents(S),
    "prefix_lm": lambda: masks.generate_prefix_lm_mask(300),
}
ORDERS = {
    "contiguous": lambda bm, n: cp.contiguous_order(S, n, BS),
    "head_tail": lambda bm, n: cp.head_tail_order(S, n, BS),
    "ptrr": lambda bm, n: cp.ptrr_order(bm, n),
}


def bias(slopes):
    def learnable_alibi(score, b, h, q_idx, kv_idx):  # global h and q_idx must show
        return score + slopes[h] * (kv_idx - q_idx) * 0.01 + 0.1 * b

    return learnable_alibi


def loss_of(attend, order, w_out, w_lse):
    """A loss of the natural-order outputs of attend(q, k, v, slopes) (which may take sharded ones)."""

    def loss(q, k, v, slopes):
        if order is not None:
            q, k, v = (order.shard(x) for x in (q, k, v))
        out, lse = attend(q, k, v, slopes)
        if order is not None:
            out, lse = order.unshard(out), order.unshard(lse)
        lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out * w_out) + jnp.sum(lse * w_lse)

    return loss


def check_equal_one_device(
    mask_mod, order_of, mesh, q_spec, B=1, Hq=4, Hkv=2, axis="cp", seed=0, strategy="all_gather"
):
    q, k, v = random_qkv(seed, B, Hq, S, S, 16, Hkv=Hkv)
    bm = fj.create_block_mask(mask_mod, 1, 1, S, S, BLOCK_SIZE=BS)
    order = order_of(bm, mesh.shape[axis])
    slopes = jnp.asarray(np.random.default_rng(seed + 1).uniform(-1, 1, Hq), jnp.float32)
    rng = np.random.default_rng(seed + 2)
    w_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal(q.shape[:3]), jnp.float32)

    def one_device(q, k, v, slopes):
        return fj.flex_attention(q, k, v, bias(slopes), bm, enable_gqa=True, return_lse=True)

    def on_mesh(q, k, v, slopes):
        return cp.context_parallel_attention(
            q, k, v, bias(slopes), bm, enable_gqa=True, return_lse=True,
            order=order, axis=axis, mesh=mesh, q_sharding=q_spec, strategy=strategy,
        )  # fmt: skip

    want_out, want_lse = one_device(q, k, v, slopes)
    sharded = [order.shard(x) for x in (q, k, v)]
    got_out, got_lse = jax.jit(on_mesh)(*sharded, slopes)
    np.testing.assert_allclose(order.unshard(got_out), want_out, **TOL)
    np.testing.assert_allclose(order.unshard(got_lse), want_lse, **TOL)

    grads = lambda f, order: jax.jit(
        jax.grad(loss_of(f, order, w_out, w_lse), argnums=(0, 1, 2, 3))
    )
    got = grads(on_mesh, order)(q, k, v, slopes)
    want = grads(one_device, None)(q, k, v, slopes)
    for name, g, w in zip(("dq", "dk", "dv", "dslopes"), got, want, strict=True):
        np.testing.assert_allclose(g, w, **GRAD_TOL, err_msg=name)
    return order, bm


@pytest.mark.parametrize("order_name", list(ORDERS))
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_context_parallel_equals_one_device(mask_name, order_name):
    mesh = mesh_of((4,), ("cp",))
    check_equal_one_device(MASKS[mask_name](), ORDERS[order_name], mesh, None)


def test_context_parallel_with_batch_and_head_axes():
    """q split over batch ("dp") and heads ("tp") too: mods still see global b and h."""
    mesh = mesh_of((2, 1, 2), ("dp", "tp", "cp"))
    check_equal_one_device(
        documents(S), ORDERS["ptrr"], mesh, P("dp", "tp", "cp"), B=2, Hq=4, Hkv=2, seed=3
    )
    mesh = mesh_of((2, 2), ("tp", "cp"))
    check_equal_one_device(
        masks.causal_mask, ORDERS["head_tail"], mesh, P(None, "tp", "cp"), seed=4
    )


@pytest.mark.parametrize("mask_name", ["causal", "documents"])
def test_ulysses_equals_one_device(mask_name):
    """All-to-all to heads: the whole sequence on Hq/n heads per device (Hkv = n here)."""
    mesh = mesh_of((4,), ("cp",))
    order_of = ORDERS["head_tail" if mask_name == "causal" else "ptrr"]
    check_equal_one_device(
        MASKS[mask_name](), order_of, mesh, None, Hq=8, Hkv=4, strategy="ulysses"
    )
    mesh = mesh_of((2, 2), ("dp", "cp"))
    check_equal_one_device(
        MASKS[mask_name](), order_of, mesh, P("dp", None, "cp"), B=2, Hq=4, Hkv=2, seed=5,
        strategy="ulysses",
    )  # fmt: skip


def test_orders_balance_the_work():
    causal = fj.create_block_mask(masks.causal_mask, 1, 1, 4096, 4096, BLOCK_SIZE=128)
    docs = fj.create_block_mask(documents(4096), 1, 1, 4096, 4096, BLOCK_SIZE=128)
    work = lambda order, bm: order.work(bm)
    # 32 * 33 / 2 kv blocks in all, 132 each
    assert work(cp.head_tail_order(4096, 4, 128), causal).tolist() == [132] * 4
    contiguous = work(cp.contiguous_order(4096, 4, 128), causal)
    assert contiguous.max() / contiguous.mean() > 1.7
    ptrr = work(cp.ptrr_order(docs, 4), docs)
    assert ptrr.max() / ptrr.mean() < 1.05
    assert sum(ptrr) == int(
        np.asarray(docs.kv_num_blocks).sum() + np.asarray(docs.full_kv_num_blocks).sum()
    )


def test_shard_and_unshard_are_inverse_with_padding():
    order = cp.head_tail_order(S, 4, BS)  # 16 real blocks + padding to 2n chunks
    assert order.padded_len % (2 * 4 * BS) == 0 and order.padded_len >= S
    x = jnp.arange(3 * S, dtype=jnp.float32).reshape(1, 3, S) + 1
    sharded = order.shard(x, axis=2)
    assert sharded.shape == (1, 3, order.padded_len)
    assert int(jnp.sum(sharded == 0)) == 3 * (order.padded_len - S)  # padding is zeros
    np.testing.assert_array_equal(order.unshard(sharded, axis=2), x)


def test_inside_the_users_shard_map():
    mesh = mesh_of((4,), ("cp",))
    q, k, v = random_qkv(7, 1, 2, S, S, 16)
    mask_mod = documents(S)
    bm = fj.create_block_mask(mask_mod, 1, 1, S, S, BLOCK_SIZE=BS)
    order = cp.ptrr_order(bm, 4)
    spec = P(None, None, "cp")

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
    def attend(q, k, v):
        assert q.shape[2] == order.local_len
        return cp.context_parallel_attention(q, k, v, block_mask=bm, order=order, axis="cp")

    got = order.unshard(attend(*(order.shard(x) for x in (q, k, v))))
    np.testing.assert_allclose(got, fj.flex_attention(q, k, v, block_mask=bm), **TOL)


def _collectives(hlo: str) -> dict:
    """{collective: [result shape of each operand]} of compiled HLO text.

    The CPU writes `%x = f32[..] all-gather(...)`; the GPU combines collectives
    (one for K and V) and runs them async: `%x = (f32[..], f32[..]) all-gather-done(...)` after an
    `all-gather-start` whose tuple also holds the operands (skipped here).
    """
    ops = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
    found = {}
    for result, name in re.findall(r"= (.*?) ([\w-]+)\(", hlo):
        op = name.removesuffix("-done")
        if op in ops:
            found.setdefault(op, []).extend(_squeezed(result))
    return found


def _squeezed(hlo_type: str) -> list[str]:
    """The array shapes in an HLO type, without size-1 dims (the GPU bitcasts them away)."""
    shapes = re.findall(r"(\w+)\[([\d,]*)\]", hlo_type)
    return [f"{t}[{','.join(d for d in dims.split(',') if d != '1')}]" for t, dims in shapes]


def test_compiled_programs_gather_only_k_and_v():
    mesh = mesh_of((4,), ("cp",))
    B, H, D = 1, 2, 16
    q, k, v = random_qkv(8, B, H, S, S, D)
    bm = fj.create_block_mask(masks.causal_mask, 1, 1, S, S, BLOCK_SIZE=BS)
    order = cp.head_tail_order(S, 4, BS)
    attend = lambda q, k, v: cp.context_parallel_attention(
        q, k, v, block_mask=bm, order=order, axis="cp", mesh=mesh
    )
    sharded = [order.shard(x) for x in (q, k, v)]
    spec = jax.sharding.NamedSharding(mesh, P(None, None, "cp"))
    sharded = [jax.device_put(x, spec) for x in sharded]
    fwd = _collectives(jax.jit(attend).lower(*sharded).compile().as_text())
    (local,) = _squeezed(f"f32[{B},{H},{order.local_len},{D}]")
    (whole,) = _squeezed(f"f32[{B},{H},{order.padded_len},{D}]")
    assert set(fwd) == {"all-gather"} and sorted(fwd["all-gather"]) == [whole, whole], fwd
    loss = lambda q, k, v: jnp.sum(attend(q, k, v) ** 2)
    bwd = _collectives(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*sharded).compile().as_text()
    )
    assert sorted(bwd) == ["all-gather", "reduce-scatter"], bwd
    assert all(s == whole for s in bwd["all-gather"]) and len(bwd["all-gather"]) <= 4, bwd
    assert sorted(bwd["reduce-scatter"]) == [local, local], bwd


def test_bad_calls_are_refused():
    mesh = mesh_of((4,), ("cp",))
    q, k, v = random_qkv(9, 1, 2, S, S, 16)
    order = cp.head_tail_order(S, 4, BS)
    bm = fj.create_block_mask(masks.causal_mask, 1, 1, S, S, BLOCK_SIZE=BS)
    call = lambda *a, **kw: cp.context_parallel_attention(*a, **{"axis": "cp", "mesh": mesh, **kw})
    with pytest.raises(ValueError, match="order.padded_len.*order.shard"):
        call(q, k, v, block_mask=bm, order=order)  # not in the order
    qs, ks, vs = (order.shard(x) for x in (q, k, v))
    with pytest.raises(ValueError, match="made for 2 devices but mesh axis 'cp' has 4"):
        call(qs, ks, vs, block_mask=bm, order=cp.head_tail_order(S, 2, BS))
    with pytest.raises(ValueError, match="q block size is 128 but the order's is 64"):
        call(
            qs, ks, vs, block_mask=fj.create_block_mask(masks.causal_mask, 1, 1, S, S), order=order
        )
    with pytest.raises(ValueError, match="whole sequence's"):
        small = fj.create_block_mask(masks.causal_mask, 1, 1, 512, 512, BLOCK_SIZE=BS)
        call(qs, ks, vs, block_mask=small, order=order)
    with pytest.raises(ValueError, match="along L by the axis 'cp'"):
        call(qs, ks, vs, block_mask=bm, order=order, q_sharding=P("cp"))
    with pytest.raises(ValueError, match="axis 'sp' is not an axis"):
        call(qs, ks, vs, block_mask=bm, order=order, axis="sp", q_sharding=P(None, None, "sp"))
    with pytest.raises(ValueError, match="Hkv=2 must divide by 4"):
        call(qs, ks, vs, block_mask=bm, order=order, strategy="ulysses")
    with pytest.raises(ValueError, match="strategy must be one of"):
        call(qs, ks, vs, block_mask=bm, order=order, strategy="star")
    with pytest.raises(ValueError, match="permutation"):
        cp.SequenceOrder(np.array([[0, 1], [1, 2]]), BS, S, "bad")


def test_check_vma_true_inside_the_users_shard_map():
    """Typed with check_vma=True (traced here: Pallas' CPU interpreter cannot run it); numbers on a GPU."""
    mesh = mesh_of((4,), ("cp",))
    q, k, v = random_qkv(10, 1, 4, S, S, 16, Hkv=2)
    bm = fj.create_block_mask(masks.causal_mask, 1, 1, S, S, BLOCK_SIZE=BS)
    order = cp.head_tail_order(S, 4, BS)
    slopes = jnp.linspace(-1.0, 1.0, 4)
    spec = P(None, None, "cp")

    def local(q, k, v, slopes):
        return cp.context_parallel_attention(
            q, k, v, bias(slopes), bm, enable_gqa=True, order=order, axis="cp"
        )

    f = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P()), out_specs=spec)
    sharded = [order.shard(x) for x in (q, k, v)]
    assert jax.jit(f).trace(*sharded, slopes).out_info.shape == sharded[0].shape
    loss = lambda q, k, v, s: jnp.sum(
        order.unshard(f(order.shard(q), order.shard(k), order.shard(v), s)) ** 2
    )
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    assert [g.shape for g in grad.trace(q, k, v, slopes).out_info] == [
        q.shape,
        k.shape,
        v.shape,
        (4,),
    ]
    if jax.devices()[0].platform == "gpu":
        one = lambda q, k, v, s: jnp.sum(
            fj.flex_attention(q, k, v, bias(s), bm, enable_gqa=True) ** 2
        )
        want = jax.jit(jax.grad(one, argnums=(0, 1, 2, 3)))(q, k, v, slopes)
        for g, w in zip(grad(q, k, v, slopes), want, strict=True):
            np.testing.assert_allclose(g, w, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("mask_name", ["causal", "documents", "prefix_lm"])
def test_ring_equals_one_device(mask_name):
    """K/V shares round a ring: mapped kv blocks, padding rows bounded, steps merged by lse."""
    mesh = mesh_of((4,), ("cp",))
    order_of = ORDERS["head_tail" if mask_name == "causal" else "ptrr"]
    check_equal_one_device(MASKS[mask_name](), order_of, mesh, None, strategy="ring")
    if mask_name == "documents":
        mesh = mesh_of((2, 2), ("tp", "cp"))
        check_equal_one_device(
            MASKS[mask_name](), ORDERS["contiguous"], mesh, P(None, "tp", "cp"), seed=6,
            strategy="ring",
        )  # fmt: skip


def test_autotune_under_context_parallelism(tmp_path, monkeypatch):
    """The autotuner times a mapped call (offsets of 4 + R entries) and the result still matches."""
    from pallas_kernels import autotune

    monkeypatch.setenv("FLEXJAX_CACHE_DIR", str(tmp_path))
    autotune.clear_memory_cache()
    mesh = mesh_of((4,), ("cp",))
    q, k, v = random_qkv(11, 1, 2, S, S, 16)
    bm = fj.create_block_mask(documents(S), 1, 1, S, S, BLOCK_SIZE=BS)
    order = cp.ptrr_order(bm, 4)
    timed = autotune.stats["timed"]
    triton = dispatch.backends()["TRITON"]
    shapes, fwd = [], triton.fwd

    def recording_fwd(q, k, v, tables, mods, offsets, **kw):
        shapes.append(None if offsets is None else offsets.shape)
        return fwd(q, k, v, tables, mods, offsets, **kw)

    monkeypatch.setattr(triton, "fwd", recording_fwd)
    attend = jax.jit(
        lambda q, k, v: cp.context_parallel_attention(
            q,
            k,
            v,
            bias(jnp.linspace(-1.0, 1.0, 2)),
            bm,
            order=order,
            axis="cp",
            mesh=mesh,
            kernel_options={"autotune": True},
        )  # fmt: skip
    )
    got = order.unshard(attend(*(order.shard(x) for x in (q, k, v))))
    cp_shapes = list(shapes)  # the context-parallel call's, not the reference's below
    want = fj.flex_attention(q, k, v, bias(jnp.linspace(-1.0, 1.0, 2)), bm)
    np.testing.assert_allclose(got, want, **TOL)
    assert autotune.stats["timed"] > timed  # it did time configs
    R = order.local_len // BS
    assert cp_shapes and set(cp_shapes) == {(4 + R,)}, cp_shapes  # timed with the call's map
    autotune.clear_memory_cache()
