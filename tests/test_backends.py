"""The kernel-backend seam: choosing a backend, refusing what it cannot run, its options, retrace counts.

A fake backend that wraps the Triton one stands in for a second backend, so
these run on any machine.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_qkv

import flexjax as fj
from flexjax import masks
from flexjax.api import prepare
from flexjax.reference import flex_attention_reference
from pallas_kernels import dispatch
from pallas_kernels.spec import KernelSpec, Layout
from pallas_kernels.triton import TRITON


class FakeBackend(dispatch.Backend):
    """Runs the Triton kernels under another name, declining calls when told to."""

    option_keys = TRITON.option_keys

    def __init__(self, name, reason=None):
        self.name, self.reason, self.calls = name, reason, 0

    def supports(self, spec, mods):
        return self.reason

    def configs(self, spec, mods, options, decode):
        self.options = dict(options)  # what the call's kernel_options gave this backend
        own = {key: value for key, value in options.items() if key in TRITON.option_keys}
        return TRITON.configs(spec, mods, own, decode)

    def candidates(self, kind, spec, mods, fixed):
        return TRITON.candidates(kind, spec, mods, fixed)

    def config_from(self, kind, values):
        return TRITON.config_from(kind, values)

    def fwd(self, *args, **kwargs):
        self.calls += 1
        return TRITON.fwd(*args, **kwargs)

    def decode(self, *args, **kwargs):
        self.calls += 1
        return TRITON.decode(*args, **kwargs)

    def bwd(self, *args, **kwargs):
        self.calls += 1
        return TRITON.bwd(*args, **kwargs)


@pytest.fixture
def registry(monkeypatch):
    """Put backends ahead of the built-in ones (AUTO tries them in order); undone after the test."""

    def install(*fakes):
        builtin = dispatch.backends()
        monkeypatch.setattr(dispatch, "_REGISTRY", {f.name: f for f in fakes} | builtin)

    return install


def call(q, k, v, backend=None, **kw):
    options = {} if backend is None else {"BACKEND": backend}
    return fj.flex_attention(q, k, v, kernel_options=options, **kw)


def test_auto_falls_through_to_a_backend_that_can_run(registry):
    q, k, v = random_qkv(0, 1, 2, 40, 40, 16)
    declines = FakeBackend("DECLINES", reason="it only runs on Tuesdays")
    registry(declines)
    out = call(q, k, v)  # AUTO
    np.testing.assert_allclose(out, flex_attention_reference(q, k, v), atol=2e-5)
    assert declines.calls == 0
    accepts = FakeBackend("ACCEPTS")
    registry(accepts, declines)
    call(q, k, v)
    assert accepts.calls == 1


def test_a_named_backend_that_cannot_run_raises_with_its_reason(registry):
    q, k, v = random_qkv(1, 1, 2, 40, 40, 16)
    registry(FakeBackend("DECLINES", reason="it only runs on Tuesdays"))
    with pytest.raises(dispatch.BackendUnavailable, match="DECLINES.*only runs on Tuesdays"):
        call(q, k, v, backend="DECLINES")
    with pytest.raises(ValueError, match="'NOPE' is not a kernel backend.*TRITON"):
        call(q, k, v, backend="NOPE")
    out = call(q, k, v, backend="triton")  # names are case-insensitive, as torch's
    np.testing.assert_allclose(out, flex_attention_reference(q, k, v), atol=2e-5)


def test_auto_with_no_capable_backend_lists_every_reason(registry, monkeypatch):
    q, k, v = random_qkv(2, 1, 2, 40, 40, 16)
    registry(FakeBackend("DECLINES", reason="reason one"))
    monkeypatch.setattr(TRITON, "supports", lambda spec, mods: "reason two")
    with pytest.raises(
        dispatch.BackendUnavailable, match="DECLINES: reason one.*TRITON: reason two"
    ):
        call(q, k, v)


def test_the_chosen_backend_runs_forward_backward_and_decode(registry):
    import jax

    q, k, v = random_qkv(3, 1, 2, 4, 64, 16)
    fake = FakeBackend("FAKE")
    registry(fake)
    call(q, k, v, backend="FAKE")  # L=4: decode
    jax.grad(lambda q: jnp.sum(call(q, k, v, backend="FAKE")))(q)  # forward + backward
    assert fake.calls == 3


def test_backend_options_are_checked_against_the_chosen_backend(registry):
    q, k, v = random_qkv(4, 1, 1, 32, 32, 16)
    with pytest.raises(ValueError, match="unknown keys \\['BLOCK_Q'\\].*'TRITON': \\['BACKEND'"):
        fj.flex_attention(q, k, v, kernel_options={"BLOCK_Q": 64})  # AUTO: no backend reads it
    with pytest.raises(ValueError, match="unknown keys \\['BLOCK_Q'\\] for the TRITON backend"):
        fj.flex_attention(q, k, v, kernel_options={"BACKEND": "TRITON", "BLOCK_Q": 64})
    # AUTO skips a backend that does not read the options given.
    other = FakeBackend("OTHER")
    other.option_keys = ("BLOCK_Q",)
    registry(other)
    out = fj.flex_attention(q, k, v, kernel_options={"block_m": 32})
    np.testing.assert_allclose(out, flex_attention_reference(q, k, v), atol=2e-5)
    assert other.calls == 0
    with pytest.raises(ValueError, match="interpret'\\] must be True, False or None"):
        fj.flex_attention(q, k, v, kernel_options={"interpret": "no"})
    with pytest.raises(TypeError, match="BACKEND'\\] must be a string"):
        fj.flex_attention(q, k, v, kernel_options={"BACKEND": 3})


def test_deterministic_applies_each_backends_own_options(registry, monkeypatch):
    """kernel_options["deterministic"]: a backend's `deterministic_options` are applied (a
    given option that contradicts them raises, naming both); a backend that always is
    deterministic gets nothing; the default follows XLA_FLAGS' determinism flags."""
    fake = FakeBackend("FAKE")
    fake.option_keys = (*TRITON.option_keys, "FAKE_ATOMICS")
    fake.deterministic_options = {"FAKE_ATOMICS": False}
    registry(fake)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    parse = dispatch.KernelOptions.parse
    assert parse({"deterministic": True}).for_backend(fake) == {"FAKE_ATOMICS": False}
    assert parse({"deterministic": True}).for_backend(TRITON) == {}
    assert parse({"block_m": 32}).for_backend(fake) == {"block_m": 32}
    kept = parse({"deterministic": True, "FAKE_ATOMICS": False}).for_backend(fake)
    assert kept == {"FAKE_ATOMICS": False}
    with pytest.raises(ValueError, match="FAKE_ATOMICS=True is not deterministic on the FAKE"):
        parse({"deterministic": True, "FAKE_ATOMICS": True}).for_backend(fake)
    with pytest.raises(ValueError, match="deterministic'\\] must be True, False or None"):
        parse({"deterministic": "yes"})
    assert not parse(None).deterministic
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/d --xla_gpu_deterministic_ops=true")
    assert parse(None).deterministic and not parse({"deterministic": False}).deterministic
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_exclude_nondeterministic_ops")
    assert parse(None).deterministic
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=false")
    assert not parse(None).deterministic
    # XLA_FLAGS' default yields to an option the call gives; the call's own word does not
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
    assert parse({"FAKE_ATOMICS": True}).for_backend(fake) == {"FAKE_ATOMICS": True}
    with pytest.raises(ValueError, match="FAKE_ATOMICS=True is not deterministic"):
        parse({"FAKE_ATOMICS": True, "deterministic": True}).for_backend(fake)
    monkeypatch.delenv("XLA_FLAGS")
    q, k, v = random_qkv(5, 1, 1, 32, 32, 16)  # a real call: the option reaches the backend
    out = fj.flex_attention(q, k, v, kernel_options={"BACKEND": "FAKE", "deterministic": True})
    np.testing.assert_allclose(out, flex_attention_reference(q, k, v), atol=2e-5)
    assert fake.options == {"FAKE_ATOMICS": False}


def test_auto_options_reach_the_backend_auto_picks_not_a_named_one(registry):
    """A backend's `auto_options` (per-kernel choices measured better for a call) are set
    when AUTO picks it; an option the call gives wins; a call naming the backend gets none."""
    fake = FakeBackend("FAKE")
    fake.option_keys = (*TRITON.option_keys, "FAKE_FWD")
    fake.auto_options = lambda spec, mods: {"FAKE_FWD": "other"} if spec.E == 16 else {}
    registry(fake)
    q, k, v = random_qkv(6, 1, 1, 32, 32, 16)
    out = fj.flex_attention(q, k, v)  # AUTO
    np.testing.assert_allclose(out, flex_attention_reference(q, k, v), atol=2e-5)
    assert fake.options == {"FAKE_FWD": "other"}
    fj.flex_attention(q, k, v, kernel_options={"FAKE_FWD": "mine"})
    assert fake.options == {"FAKE_FWD": "mine"}
    fj.flex_attention(q, k, v, kernel_options={"BACKEND": "FAKE"})
    assert fake.options == {}
    q8, k8, v8 = (x[..., :8] for x in (q, k, v))
    fj.flex_attention(q8, k8, v8)  # AUTO, a call its auto_options leave alone
    assert fake.options == {}
    fake.auto_options = lambda spec, mods: {"NOT_READ": 1}  # a backend's bug, said as such
    with pytest.raises(
        ValueError, match="auto_options gave keys it does not read: \\['NOT_READ'\\]"
    ):
        fj.flex_attention(*random_qkv(7, 1, 1, 48, 48, 16))  # (a shape not traced before)


def test_triton_says_what_it_cannot_run(monkeypatch):
    import pallas_kernels.triton as triton_backend

    q, k, v = random_qkv(5, 1, 1, 32, 32, 16)
    call_ = prepare(q, k, v)
    assert TRITON.supports(call_.spec, call_.mods) is None
    replace = lambda **kw: KernelSpec(**{**call_.spec.__dict__, **kw})
    assert TRITON.supports(replace(layout=Layout.BSHD), call_.mods) is None  # both layouts
    assert "head dims up to 256" in TRITON.supports(replace(E=512), call_.mods)
    monkeypatch.setattr(triton_backend, "has_gpu", lambda: False)
    assert "need a CUDA GPU" in TRITON.supports(replace(interpret=False), call_.mods)
    monkeypatch.setattr(triton_backend, "has_gpu", lambda: True)
    assert "float64" in TRITON.supports(replace(dtype="float64", interpret=False), call_.mods)


def test_offsets_must_be_int32_of_four():
    q, k, v = random_qkv(7, 1, 1, 32, 32, 16)
    call_ = prepare(q, k, v)
    for bad in (jnp.zeros((3,), jnp.int32), jnp.zeros((4,), jnp.float32)):
        with pytest.raises(ValueError, match="offsets must be an int32\\[4\\]"):
            dispatch.attention(q, k, v, call_.tables, call_.mods, call_.spec, call_.options, bad)


def test_retraces_are_counted_through_the_dispatch_hook():
    q, k, v = random_qkv(6, 1, 2, 63, 61, 16)  # a shape no other test uses
    bm = fj.create_block_mask(masks.causal_mask, 1, 1, 63, 61, BLOCK_SIZE=32)
    options = {"block_n": 16, "decode": False}
    before = dispatch.trace_count("fwd", backend="TRITON")
    fj.flex_attention(q, k, v, block_mask=bm, kernel_options=options)
    assert dispatch.trace_count("fwd", backend="TRITON") == before + 1
    fj.flex_attention(q, k, v, block_mask=bm, kernel_options=options)
    assert dispatch.trace_count("fwd", backend="TRITON") == before + 1  # cached: not traced again
