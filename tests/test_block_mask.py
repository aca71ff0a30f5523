"""BlockMask behaviour: pytree, pictures, slicing, combinators, errors, bounded evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexjax as fj
from flexjax import masks
from flexjax.reference import kept_elements


def test_picture_shows_full_partial_and_empty_blocks():
    causal = fj.create_block_mask(masks.causal_mask, None, None, 512, 512, BLOCK_SIZE=128)
    text = str(causal)
    assert text.startswith("BlockMask(shape=(1, 1, 512, 512), sparsity=37.50%")
    rows = text.splitlines()[2:6]
    assert rows == ["░░      ", "██░░    ", "████░░  ", "██████░░"]

    window = fj.create_block_mask(masks.generate_sliding_window(128), 1, 1, 1024, 1024)
    rows = str(window).splitlines()[2:10]
    assert rows[0] == "░░" + " " * 14
    assert rows[5] == " " * 8 + "░░░░" + " " * 4  # q 640..767 sees kv 512..767
    assert "██" not in str(window)  # a 128 window never fills a whole 128x128 block here

    doc = masks.generate_doc_mask_mod(masks.document_id_from_lengths([256, 256, 512]))
    rows = str(fj.create_block_mask(doc, 1, 1, 1024, 1024)).splitlines()[2:10]
    assert rows[2] == "    ░░          "
    assert rows[7] == "        ██████░░"


def test_picture_summarises_large_masks_and_limits_heads():
    bm = fj.create_block_mask(masks.causal_mask, 1, 6, 64 * 40, 64 * 40, BLOCK_SIZE=64)
    text = bm.to_string()
    pictures = text.split("\n\n")
    assert len(pictures) == 4 + 1  # limit=4 pictures, then the "..." notice
    assert len(pictures[0].splitlines()) == 1 + 20  # header + 20 summarised rows
    assert len(bm.to_string(grid_size=-1, limit=1).split("\n\n")[0].splitlines()) == 1 + 40


def test_block_mask_is_a_pytree_usable_under_jit():
    bm = fj.create_block_mask(masks.causal_mask, 2, 1, 300, 300, BLOCK_SIZE=64)
    leaves, treedef = jax.tree_util.tree_flatten(bm)
    assert len(leaves) == 8  # the tables; causal_mask captures no array
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.seq_lengths == (300, 300) and rebuilt.mask_program == bm.mask_program
    dense = lambda m: np.asarray(fj.create_mask(m.mask_mod, 1, 1, 300, 300))
    np.testing.assert_array_equal(dense(rebuilt), dense(bm))

    @jax.jit
    def total_blocks(block_mask):
        return block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum()

    assert int(total_blocks(bm)) == int(np.asarray(bm.to_dense()).sum())


def test_create_block_mask_inside_jit_with_traced_capture():
    @jax.jit
    def blocks_for(document_id):
        mod = masks.generate_doc_mask_mod(document_id)
        return fj.create_block_mask(mod, 1, 1, 256, 256, BLOCK_SIZE=32).to_dense()

    a = blocks_for(masks.document_id_from_lengths([64, 192]))
    b = blocks_for(masks.document_id_from_lengths([128, 128]))
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    expected = fj.create_block_mask(
        masks.generate_doc_mask_mod(masks.document_id_from_lengths([128, 128])),
        1,
        1,
        256,
        256,
        BLOCK_SIZE=32,
    )
    np.testing.assert_array_equal(np.asarray(b), np.asarray(expected.to_dense()))


def test_tables_agree_with_a_numpy_block_classification():
    rng = np.random.default_rng(1)
    dense = rng.random((2, 3, 70, 90)) < 0.97  # mostly kept: full, partial and a few empty
    dense[..., 20:40, :] = False
    captured = jnp.asarray(dense)

    def lookup(b, h, q, kv):
        return captured[b, h, q, kv]

    bm = fj.create_block_mask(lookup, 2, 3, 70, 90, BLOCK_SIZE=(16, 32))
    pad = np.zeros((2, 3, 80, 96), bool)
    pad[..., :70, :90] = dense
    counts = pad.reshape(2, 3, 5, 16, 3, 32).sum(axis=(3, 5))
    kinds = np.where(counts == 16 * 32, 2, np.where(counts > 0, 1, 0))
    np.testing.assert_array_equal(bm.block_kinds(), kinds)
    # The BlockMask keeps exactly the dense mask's elements.
    kept = kept_elements(bm, 2, 3, 70, 90)
    np.testing.assert_array_equal(np.asarray(kept), dense)


def test_sliced_block_mask_keeps_the_same_elements():
    def mod(b, h, q, kv):
        return (q >= kv) & ((q + 2 * kv + b + 3 * h) % 5 != 0)

    bm = fj.create_block_mask(mod, 3, 2, 200, 150, BLOCK_SIZE=32)
    full = np.asarray(kept_elements(bm, 3, 2, 200, 150))
    sub = bm[2, 1:2, [1, 3]]
    assert sub.kv_num_blocks.shape == (1, 1, 2)
    kept = np.asarray(kept_elements(_with_len(sub, 64, 150), 1, 1, 64, 150))
    expected = np.concatenate([full[2, 1, 32:64], full[2, 1, 96:128]])[None, None]
    np.testing.assert_array_equal(kept, expected)


def _with_len(bm, q_len, kv_len):
    return fj.BlockMask(
        (q_len, kv_len),
        *[
            getattr(bm, n)
            for n in (
                "kv_num_blocks",
                "kv_indices",
                "full_kv_num_blocks",
                "full_kv_indices",
                "q_num_blocks",
                "q_indices",
                "full_q_num_blocks",
                "full_q_indices",
            )
        ],
        BLOCK_SIZE=bm.BLOCK_SIZE,
        mask_mod=bm.mask_mod,
    )


def test_combinators_and_create_mask():
    a = masks.causal_mask
    b = masks.generate_sliding_window(3)
    both = np.asarray(fj.create_mask(fj.and_masks(a, b), 1, 1, 20, 20))
    either = np.asarray(fj.create_mask(fj.or_masks(a, b), 1, 1, 20, 20))
    ma = np.asarray(fj.create_mask(a, 1, 1, 20, 20))
    mb = np.asarray(fj.create_mask(b, 1, 1, 20, 20))
    np.testing.assert_array_equal(both, ma & mb)
    np.testing.assert_array_equal(either, ma | mb)
    assert np.asarray(fj.create_mask(fj.noop_mask, 2, 3, 5, 7)).all()
    assert fj.create_mask(fj.noop_mask, 2, 3, 5, 7).shape == (2, 3, 5, 7)
    # create_mask takes a score_mod too: kept unless it makes the score -inf.
    from flexjax.mods import causal_bias, checkerboard

    np.testing.assert_array_equal(np.asarray(fj.create_mask(causal_bias, 1, 1, 20, 20)), ma)
    assert np.asarray(fj.create_mask(checkerboard, 1, 1, 20, 20)).all()


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: fj.create_block_mask(lambda b, h, q: q > 0, 1, 1, 8, 8), TypeError, "3 required"),
        (lambda: fj.create_block_mask(lambda s, b, h, q, kv: s, 1, 1, 8, 8), TypeError, "mask_mod"),
        (lambda: fj.create_block_mask(lambda b, h, q, kv: q - kv, 1, 1, 8, 8), TypeError, "bool"),
        (lambda: fj.create_block_mask(masks.causal_mask, 1, 1, 0, 8), ValueError, "Q_LEN"),
        (
            lambda: fj.create_block_mask(masks.causal_mask, 1, 1, 8, 8, BLOCK_SIZE=0),
            ValueError,
            "BLOCK_SIZE",
        ),
        (
            lambda: fj.create_block_mask(masks.causal_mask, 1, 1, 8, 8, BLOCK_SIZE=(8, 8, 8)),
            TypeError,
            "BLOCK_SIZE",
        ),
        (
            lambda: fj.create_block_mask(
                lambda b, h, q, kv: jnp.stack([q > kv, q < kv]), 1, 1, 8, 8
            ),
            ValueError,
            "shape ()",
        ),
        (lambda: fj.and_masks(lambda s, b, h, q, kv: s), TypeError, "and_masks argument 0"),
        (
            lambda: fj.BlockMask.from_kv_blocks(jnp.zeros((1, 1, 2)), jnp.zeros((1, 1, 3, 2))),
            ValueError,
            "kv_num_blocks",
        ),
    ],
)
def test_errors_name_the_argument(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


def test_large_sequence_is_evaluated_in_bounded_chunks():
    # 16K x 16K would be 256 MiB of bools if materialised; the tables are tiny.
    doc = masks.generate_doc_mask_mod(masks.document_id_from_lengths([4096, 4096, 8192]))
    bm = fj.create_block_mask(doc, None, None, 16384, 16384)
    assert bm.kv_indices.shape == (1, 1, 128, 128)
    kinds = bm.block_kinds()[0, 0]
    assert (kinds.diagonal() == 1).all()
    # Row 40 (q 5120..5247) is in document 1 (4096..8191): kv blocks 32..39.
    assert kinds[40, 35] == 2 and kinds[40, 10] == 0 and kinds[40, 41] == 0
    assert kinds[100, 70] == 2 and kinds[100, 63] == 0


def test_density_clips_edge_blocks_to_the_sequences():
    """density() = fraction of the L x S scores in computed blocks; sparsity() counts whole blocks."""
    # Shorter than one block: PyTorch's sparsity goes negative, density is 1.
    tiny = fj.create_block_mask(lambda b, h, q, kv: q >= 0, 1, 1, 12, 9)
    assert tiny.sparsity() < 0
    assert tiny.density() == pytest.approx(1.0)
    # Causal, 100 x 100 in 32-blocks: the diagonal blocks count whole (clipped at the edge).
    causal = fj.create_block_mask(lambda b, h, q, kv: q >= kv, 1, 1, 100, 100, BLOCK_SIZE=32)
    sizes = np.array([32, 32, 32, 4])
    want = sum(sizes[r] * sizes[c] for r in range(4) for c in range(r + 1)) / 100**2
    assert causal.density() == pytest.approx(want)
    # Per-head masks average over heads.
    per_head = fj.create_block_mask(
        lambda b, h, q, kv: (h == 0) | (kv < 32), 1, 2, 64, 64, BLOCK_SIZE=32
    )
    assert per_head.density() == pytest.approx((1.0 + 0.5) / 2)
