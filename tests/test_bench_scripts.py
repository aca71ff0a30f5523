"""The benchmark scripts run end to end (CPU, small sizes): a smoke test, not a measurement."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_seed_table_writes_markdown_json_and_chart(tmp_path):
    out = tmp_path / "table"
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "bench/seed_table.py", "--examples", "causal", "--out", str(out)]
    cmd += ["--backends", "TRITON,MOSAIC_GPU"]  # a row per backend (Mosaic refuses float32)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
    saved = json.loads((tmp_path / "table.json").read_text())
    rows = {r["impl"]: r for r in saved["examples"][0]["rows"]}
    backends = {"flexjax TRITON", "flexjax MOSAIC_GPU"}
    assert set(rows) == {"causal FA2", "F.sdpa + mask", "FlexAttention", "flexjax", *backends}
    assert rows["flexjax TRITON"]["check"] < 1e-4 and rows["flexjax TRITON"]["fw_ms"] > 0
    assert rows["flexjax MOSAIC_GPU"]["note"].startswith("refused: it computes in float16")
    assert rows["flexjax"]["check"] < 1e-4 and rows["F.sdpa + mask"]["check"] < 1e-4
    assert rows["flexjax"]["fw_ms"] > 0 and rows["flexjax"]["bw_ms"] > 0
    text = (tmp_path / "table.md").read_text()
    assert "| flexjax |" in text and "time ratio" in text and "flexjax MOSAIC_GPU FW" in text
    assert (tmp_path / "table.png").stat().st_size > 10_000


def test_config_sweep_times_and_checks_every_config(tmp_path):
    out = tmp_path / "sweep"
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "bench/sweep_configs.py", "--example", "causal", "--S", "128"]
    cmd += ["--B", "1", "--H", "2", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert {r["phase"] for r in rows} == {"fwd", "bwd"} and len(rows) == 4
    for r in rows:
        assert "failed" not in r, r
        assert r["ms"] > 0 and r["err"] < 1e-5


def test_decode_benchmark_runs_every_row(tmp_path):
    out = tmp_path / "decode"
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "bench/bench_decode.py", "--out", str(out)]
    cmd += ["--variants", '[{"decode_splits": 2}]']
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
    saved = json.loads((tmp_path / "decode.json").read_text())
    impls = [(r["impl"], r["mask"]) for r in saved["rows"]]
    assert ("flexjax decode TRITON", "causal") in impls and ("flexjax regular", "none") in impls
    assert ('flexjax decode {"decode_splits": 2}', "none") in impls
    for r in saved["rows"]:
        assert r["ms"] > 0
        if r["check"] is not None:  # bf16 outputs against torch SDPA
            assert r["check"] < 2e-2, r


def test_loop_timers_run_every_call_and_clear_gradients():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import jax.numpy as jnp
    import torch
    from timing import time_loop_jax, time_loop_torch

    x = torch.ones(3, requires_grad=True)
    calls = []

    def backward():
        assert x.grad is None  # cleared before every call, as do_bench does
        (x * 2).sum().backward()
        calls.append(1)

    ms = time_loop_torch(backward, reps=4, gpu=False, grads=(x,))
    assert ms > 0 and len(calls) == 1 + 3 * 4  # a warm-up, then three loops of 4
    assert time_loop_jax(lambda: jnp.ones(4) * 2, reps=3) > 0


def test_mesh_benchmark_runs_both_parts_on_forced_devices(tmp_path):
    out = tmp_path / "mesh"
    flags = "--xla_force_host_platform_device_count=4"
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=flags)
    cmd = [sys.executable, "bench/bench_mesh.py", "--masks", "docs16", "--out", str(out)]
    cmd += ["--strategies", "all_gather,ring"]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, timeout=900)
    saved = json.loads((tmp_path / "mesh.json").read_text())
    assert saved["meta"]["devices"] == 4 and flags in saved["meta"]["xla_flags"]
    shard = {(r["n_gpus"], r["layout"], r["mode"][:9]) for r in saved["shard"]}
    assert (4, "heads", "shard_map") in shard and (2, "batch", "jit + Nam") in shard
    for r in saved["shard"]:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_collectives"] == "-", r  # no collective
    cp_rows = {(r["n_gpus"], r["strategy"]): r for r in saved["cp"]}
    assert set(cp_rows) == {
        (1, "-"),
        (2, "all_gather"),
        (2, "ring"),
        (4, "all_gather"),
        (4, "ring"),
    }
    assert cp_rows[4, "all_gather"]["fwd_bwd_collectives"] == "all-gather x2, reduce-scatter x2"
    assert "collective-permute" in cp_rows[4, "ring"]["fwd_collectives"]


def test_traps_benchmark_runs_every_part(tmp_path):
    out = tmp_path / "traps"
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "bench/bench_traps.py", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, timeout=900)
    saved = json.loads((tmp_path / "traps.json").read_text())
    assert {(r["impl"], r["S"]) for r in saved["block_mask"]} == {("flexjax", 256), ("torch", 256)}
    assert all(r["ms"] > 0 for r in saved["block_mask"])
    (over,) = saved["overhead"]
    assert over["kernel_ms"] > 0 and over["eager_ms"] > 0 and over["bridge_ms"] > 0
    assert {(r["mask"], r["dtype"]) for r in saved["bool"]} == {
        (m, d) for m in ("longformer", "key_padding") for d in ("bool", "int32")
    }


def test_kernel_trace_summarizes_gaps_overlaps_and_reads_both_profilers():
    """bench/kernel_trace.py: per-call kernel, busy and span times and the idle gaps of a
    trace (overlapping intervals counted once in busy); the JAX and torch traces read back
    (host events here: the CPU has no kernels)."""
    sys.path.insert(0, ROOT)
    import jax.numpy as jnp
    import pytest
    import torch

    from bench.kernel_trace import _row, host_ms, jax_events, summarize, table, torch_events

    us = 1000
    events = [  # (start, duration, name): two calls; a second stream overlaps the first kernel
        (0, 100 * us, "a"), (50 * us, 100 * us, "b"), (155 * us, 45 * us, "a"),
        (2200 * us, 100 * us, "a"), (2300 * us, 100 * us, "b"),
    ]  # fmt: skip
    s = summarize(list(reversed(events)), calls=2)
    assert s["kernel_ms"] == pytest.approx(0.445 / 2)
    assert s["busy_ms"] == pytest.approx((0.195 + 0.2) / 2)  # 155 - 150 us is launch latency
    assert s["span_ms"] == pytest.approx(2.4 / 2)
    assert s["gaps"] == [(3, pytest.approx(2.0))]  # after the first call's three kernels
    assert list(s["kernels"]) == ["a", "b"] and s["kernels"]["a"] == (3, pytest.approx(0.08166, rel=1e-3))  # fmt: skip
    with pytest.raises(ValueError, match="no events"):
        summarize([], calls=1)

    f = lambda: jnp.sin(jnp.ones((64, 64))) @ jnp.ones((64, 64))
    f().block_until_ready()
    assert summarize(jax_events(f, 3, plane="/host:CPU", line=""), 3)["busy_ms"] > 0
    x = torch.ones(64, 64)
    assert summarize(torch_events(lambda: x @ x, 3, cuda=False), 3)["kernel_ms"] > 0
    synced = []
    times = host_ms(f, 4, lambda result: synced.append(result))
    assert len(times) == 4 and min(times) > 0 and len(synced) == 1
    text = table([_row("flexjax X", "fwd+bwd", 2.5, [0.1, 0.3, 0.2], s)])
    assert "| flexjax X | fwd+bwd | 2.500 | 0.200 (0.300) | 0.223 | 0.198 | 3: 2.000 |" in text
