"""bench/bench_transformers.py runs end to end on the CPU (tiny model): a smoke test, not a measurement."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(tmp_path, *args):
    out = tmp_path / "tf"
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "bench/bench_transformers.py", "--out", str(out), *args]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
    return json.loads((tmp_path / "tf.json").read_text()), (tmp_path / "tf.md").read_text()


def test_bench_times_flexjax_and_sdpa_in_both_modes_and_checks_them(tmp_path):
    saved, text = run_bench(tmp_path, "--reps", "1")
    assert saved["meta"]["transformers"] and saved["config"]["dtype"] == "float32"
    rows = {(r["impl"], r["workload"], r["mode"]): r for r in saved["rows"]}
    assert set(rows) == {
        (impl, workload, mode)
        for impl in ("sdpa", "flexjax")
        for workload in ("causal", "padded")
        for mode in ("train", "forward")
    }
    for (impl, _, mode), r in rows.items():
        assert r["ms"] > 0 and r["tokens_per_s"] > 0
        if impl == "sdpa":
            assert r["check"] is None
        else:  # float32: flexjax's logits, loss and gradient equal sdpa's to rounding
            assert r["check"] < 1e-4
            assert (r["check_grad"] < 1e-4) if mode == "train" else r["check_grad"] is None
    assert "| padded | train | flexjax |" in text and "time / sdpa's" in text


def test_bench_runs_transformers_flex_attention_forward(tmp_path):
    # torch's flex_attention has no CPU backward: forward only here (compiled for the CPU).
    args = ("--impls", "flexjax,flex_attention,sdpa", "--modes", "forward", "--reps", "1")
    saved, _ = run_bench(tmp_path, *args, "--workloads", "padded")
    assert [r["impl"] for r in saved["rows"]] == ["sdpa", "flex_attention", "flexjax"]
    assert all(r["check"] < 1e-4 for r in saved["rows"][1:])
