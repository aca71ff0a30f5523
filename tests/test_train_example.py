"""examples/train_lm.py at its CPU size: it learns, and flexjax trains like the dense reference.

The example's `main` is imported and called in-process with `--tiny` (2 layers,
T=128, kernels in Pallas interpret mode): a dozen steps lower the loss; the
compare mode writes its PNG, markdown and JSON, and from the same
initialisation and batches flexjax's fp32 losses equal the written-out dense
attention's at steps 0-3 (soft-cap, ALiBi, document and window masks all on).
The pieces the two share are checked too: the dense masks equal the BlockMask's
dense form, the mods do what they say, the data is deterministic.
"""

import importlib.util
import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax.nnx")
pytest.importorskip("optax")
pytest.importorskip("matplotlib")

import flexjax as fj  # noqa: E402

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_lm.py"


@pytest.fixture(scope="module")
def train_lm():
    spec = importlib.util.spec_from_file_location("train_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_lm"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("train_lm", None)


@pytest.fixture(scope="module")
def corpora(train_lm):
    return train_lm.load_corpora()


def test_help_works(train_lm, capsys):
    with pytest.raises(SystemExit) as e:
        train_lm.main(["--help"])
    assert e.value.code == 0
    assert "--attention" in capsys.readouterr().out


def test_tiny_training_lowers_the_loss(train_lm, tmp_path):
    argv = ["--tiny", "--steps", "12", "--eval-batches", "1", "--out", str(tmp_path)]
    result = train_lm.main(argv)
    losses = result["losses"]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert losses[0] > 5.0  # ~ln(256) at initialisation
    assert np.mean(losses[-3:]) < losses[0] - 0.5
    assert np.isfinite(result["val_loss"]) and result["val_loss"] < losses[0]
    saved = json.loads((tmp_path / "train_lm_flexjax.json").read_text())
    assert saved["losses"] == losses and saved["status"] == "ok"


def test_compare_writes_its_files_and_flexjax_matches_dense(train_lm, tmp_path):
    argv = ["--tiny", "--compare", "--steps", "4", "--softcap", "0.5", "--out", str(tmp_path)]
    summary = train_lm.main(argv)
    results = {r["impl"]: r for r in summary["results"]}
    assert results["flexjax"]["status"] == results["dense"]["status"] == "ok"
    assert results["cudnn"]["status"] == "skipped"
    assert "soft-cap" in results["cudnn"]["reason"]  # says why

    flex, dense = (np.asarray(results[k]["losses"]) for k in ("flexjax", "dense"))
    assert flex.shape == dense.shape == (4,)
    np.testing.assert_allclose(flex[0], dense[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(flex, dense, atol=1e-4, rtol=0)
    assert flex[-1] < flex[0]  # it trained

    png = tmp_path / "train_lm_compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = (tmp_path / "train_lm_compare.md").read_text()
    for row in ("| flexjax | ok |", "| dense | ok |", "| cudnn | skipped"):
        assert row in table
    saved = json.loads((tmp_path / "train_lm_compare.json").read_text())
    assert [r["impl"] for r in saved["results"]] == ["flexjax", "dense", "cudnn"]


def test_dense_masks_equal_the_block_masks(train_lm):
    """What the dense reference masks with is what the BlockMasks keep, for both layer kinds."""
    cfg = train_lm.TINY_CONFIG
    doc = jnp.asarray([[4] * 50 + [5] * 78, [9] * 128], jnp.int32)
    dense = train_lm.Dense(cfg).build_masks(doc)
    flex = train_lm.Flexjax(cfg).build_masks(doc)
    assert set(dense) == set(flex) == {"local", "global"}
    B, T = doc.shape
    for kind in ("local", "global"):
        want = fj.create_mask(train_lm.layer_mask_mod(cfg, kind, doc), B, 1, T, T)
        np.testing.assert_array_equal(dense[kind], want)
        assert flex[kind].seq_lengths == (T, T)
    local, glob = dense["local"], dense["global"]
    assert np.all(local <= glob) and not np.array_equal(local, glob)  # the window cuts


def test_mods_do_what_they_say(train_lm):
    cfg = train_lm.Config(**{**vars(train_lm.TINY_CONFIG), "softcap": 2.0})
    b, h, q, kv = train_lm.broadcast_indices(1, 2, 4, 4)
    scores = jnp.full((1, 2, 4, 4), 10.0)
    glob = train_lm.layer_score_mod(cfg, "global")(scores, b, h, q, kv)
    local = train_lm.layer_score_mod(cfg, "local")(scores, b, h, q, kv)
    slopes = train_lm.alibi_slopes(2)
    alibi = slopes[h] * (kv - q)
    np.testing.assert_allclose(local, 10.0 + alibi, rtol=1e-6)  # no cap on local layers
    np.testing.assert_allclose(glob, 2.0 * np.tanh(5.0) + alibi, rtol=1e-6)
    no_mods = train_lm.Config(**{**vars(cfg), "softcap": 0.0, "alibi": False})
    assert train_lm.layer_score_mod(no_mods, "global") is None


def test_data_is_deterministic_and_weights_skip_document_starts(train_lm, corpora):
    train, val = corpora
    assert train.num_files > 100 and val.num_files > 0
    assert not set(np.unique(val.doc_ids)) & set(np.unique(train.doc_ids))
    cfg = train_lm.TINY_CONFIG
    a, b = train_lm.batch_at(train, cfg, 5, 0), train_lm.batch_at(train, cfg, 5, 0)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["inputs"], train_lm.batch_at(train, cfg, 6, 0)["inputs"])
    np.testing.assert_array_equal(a["inputs"][:, 1:], a["targets"][:, :-1])
    # a target is weighted iff it comes from its input's file: find batches that cross files
    long = train_lm.Config(**{**vars(cfg), "seq_len": 4096, "batch_size": 4})
    crossing = 0
    for step in range(8):
        batch = train_lm.batch_at(train, long, step, 0)
        d, w = batch["doc_ids"], batch["weights"]
        np.testing.assert_array_equal(w[:, :-1], (d[:, 1:] == d[:, :-1]).astype(np.float32))
        crossing += int((w == 0).sum())
    assert crossing > 0
    assert set(np.unique(a["weights"])) <= {0.0, 1.0}
    assert train_lm.stdlib_files() == sorted(train_lm.stdlib_files())
