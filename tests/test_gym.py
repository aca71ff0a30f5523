"""The gym (`make demo`): its checks run and can fail, including the sliced check used at seed sizes."""

import jax.numpy as jnp

from flexjax import gym
from flexjax.examples import EXAMPLES


def test_small_example_checks_flexjax_forward_and_backward():
    rows = gym.run_example("alibi_closure", "small", 1, False, 1e-4, dict(S=64, B=2, H=2, D=16))
    flex = next(r for r in rows if r.impl == "flexjax")
    assert flex.ok and flex.max_err < 1e-5 and flex.fw_ms > 0 and flex.bw_ms > 0


def test_sliced_check_when_dense_scores_do_not_fit(monkeypatch):
    # Pretend the dense scores do not fit: the gym then checks two (b, h) slices.
    monkeypatch.setattr(gym, "_DENSE_SCORE_LIMIT", 1)
    rows = gym.run_example("document", "small", 1, False, 1e-4, dict(S=96, B=2, H=3, D=16))
    assert [r.impl for r in rows] == ["flexjax"] and rows[0].ok and rows[0].max_err < 1e-5
    assert rows[0].note == "2 slices checked"


def test_a_wrong_result_fails_the_check(monkeypatch):
    real = gym.fj.flex_attention
    monkeypatch.setattr(gym.fj, "flex_attention", lambda *a, **k: real(*a, **k) * 1.01)
    rows = gym.run_example("causal", "small", 1, False, 1e-4, dict(S=64, B=1, H=2, D=16))
    assert not next(r for r in rows if r.impl == "flexjax").ok


def test_main_runs_and_reports(capsys):
    assert gym.main(["--examples", "flamingo", "--no-pictures", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "All 3 checks passed" in out and EXAMPLES["flamingo"].case().dtype == jnp.float32
