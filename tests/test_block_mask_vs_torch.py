"""create_block_mask's tables equal PyTorch's, element for element, for every seed mask."""

import numpy as np
import pytest
import torch
import torch_twins
from helpers import assert_same_tables
from torch.nn.attention import flex_attention as tfa

import flexjax as fj
from flexjax.examples import EXAMPLES

MASK_EXAMPLES = [name for name, ex in EXAMPLES.items() if ex.case("small").mask_mod is not None]
SQUARE_EXAMPLES = [n for n in MASK_EXAMPLES if n not in ("jagged", "flamingo", "alibi_functional")]
# alibi_functional shares the causal mask with alibi_closure; no need to test it twice.


def _both(name, S, q_len, kv_len, block_size, B=1, H=1):
    case = EXAMPLES[name].case("small", S=S)
    _, torch_mask = torch_twins.twin(name, case.H, S)
    ours = fj.create_block_mask(case.mask_mod, B, H, q_len, kv_len, BLOCK_SIZE=block_size)
    theirs = tfa.create_block_mask(
        torch_mask, B, H, q_len, kv_len, device="cpu", BLOCK_SIZE=block_size
    )
    return ours, theirs


@pytest.mark.parametrize("name", SQUARE_EXAMPLES)
@pytest.mark.parametrize(
    "q_len,kv_len,block_size",
    [
        (256, 256, 128),
        (1000, 1000, 128),
        (4097, 4097, 128),
        (1000, 1000, (64, 32)),
        (256, 1000, 64),
    ],
)
def test_tables_match_torch(name, q_len, kv_len, block_size):
    ours, theirs = _both(name, max(q_len, kv_len), q_len, kv_len, block_size)
    assert_same_tables(ours, theirs)
    assert ours.shape == tuple(theirs.shape)
    assert ours.sparsity() == pytest.approx(theirs.sparsity(), abs=1e-9)
    np.testing.assert_array_equal(np.asarray(ours.to_dense()), theirs.to_dense().numpy())


@pytest.mark.parametrize("block_size", [128, 16, (32, 8)])
def test_jagged_and_flamingo_match_torch(block_size):
    case = EXAMPLES["jagged"].case("small", S=1000)  # total length is not a multiple of 128
    ours, theirs = _both("jagged", 1000, case.Q_LEN, case.KV_LEN, block_size)
    assert case.Q_LEN % 128 != 0
    assert_same_tables(ours, theirs)
    ours, theirs = _both("flamingo", 12, 12, 9, block_size)
    assert_same_tables(ours, theirs)
    assert ours.sparsity() == pytest.approx(theirs.sparsity())


def test_batch_and_head_dependent_mask_matches_torch():
    def ours_mod(b, h, q, kv):
        return (q >= kv) | ((b + h) % 2 == 1)

    def torch_mod(b, h, q, kv):
        return (q >= kv) | ((b + h) % 2 == 1)

    ours = fj.create_block_mask(ours_mod, 3, 2, 300, 200, BLOCK_SIZE=(64, 32))
    theirs = tfa.create_block_mask(torch_mod, 3, 2, 300, 200, device="cpu", BLOCK_SIZE=(64, 32))
    assert_same_tables(ours, theirs)


def test_slicing_matches_torch():
    ours, theirs = _both("document", 1000, 1000, 1000, 128, B=2, H=3)
    for index in [1, (0, 2), (slice(0, 2), slice(1, 3)), (slice(None), 1, slice(2, 5))]:
        assert_same_tables(ours[index], theirs[index])
    rows = np.array([1, 3])
    assert_same_tables(ours[:, :, rows], theirs[:, :, torch.from_numpy(rows)])


def test_from_kv_blocks_matches_torch():
    rng = np.random.default_rng(0)
    dense = rng.random((2, 1, 5, 7)) < 0.4
    num = dense.sum(-1).astype(np.int32)
    idx = np.argsort(~dense, axis=-1, kind="stable").astype(np.int32)
    ours = fj.BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=(16, 32))
    theirs = tfa.BlockMask.from_kv_blocks(
        torch.from_numpy(num), torch.from_numpy(idx), BLOCK_SIZE=(16, 32)
    )
    assert_same_tables(ours, theirs)
    assert ours.sparsity() == pytest.approx(theirs.sparsity())
