"""flexjax as people call it in loops: no hidden recompiles, no slow dtypes, no silent bad reads.

* A new closure over new captured values of the same shapes -- 0-d, 1-d,
  2-d, bool -- compiles nothing new: not the kernels (forward, dq, dk/dv),
  not flex_attention's jitted call, not create_block_mask's builder; eagerly
  and inside a user's jit.
* Narrow integer and bool captured arrays reach the kernels as int32 and give
  the same results as int32 arrays.
* A mod that can index a captured array out of its range is refused before
  anything runs, naming the mod, the array's shape and the index range.
* Errors that say what to do: Python control flow on an index, a bad scale.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_qkv

import flexjax as fj
from flexjax import api, mask_builders, masks
from flexjax.reference import flex_attention_reference
from pallas_kernels import dispatch, mod_trace
from pallas_kernels.index_ranges import ModIndexError

B, H, S, D = 1, 2, 128, 16
KERNELS = ("fwd", "dq", "dkdv")


def compiled_state():
    """What a recompile would change: kernel traces, flex's and the builder's jit caches."""
    traces = tuple(dispatch.trace_count(k) for k in KERNELS)
    return traces, api.jitted_call._cache_size(), mask_builders._block_tables._cache_size()


def captures(kind, step):
    """(score_mod, mask_mod) closing over step-dependent values of one shape and dtype."""
    rng = np.random.default_rng(step)
    if kind == "0d":
        temperature = jnp.float32(rng.uniform(0.5, 2.0))
        return (lambda s, b, h, q, kv: s * temperature), masks.causal_mask
    if kind == "1d":
        bias = jnp.asarray(rng.standard_normal(S), jnp.float32)
        return (lambda s, b, h, q, kv: s + bias[kv]), masks.causal_mask
    if kind == "2d":
        table = jnp.asarray(rng.standard_normal((H, S // 16)), jnp.float32)
        return (lambda s, b, h, q, kv: s + table[h, kv // 16]), masks.causal_mask
    is_global = jnp.asarray(rng.random(S) < 0.1)  # bool, Longformer-style global tokens

    def longformer(b, h, q, kv):
        return (jnp.abs(q - kv) <= 16) | is_global[kv] | is_global[q]

    return None, longformer


@pytest.mark.parametrize("kind", ["0d", "1d", "2d", "bool"])
def test_new_closures_compile_nothing_new(kind):
    q, k, v = random_qkv(0, B, H, S, S, D)

    def step(i):
        score_mod, mask_mod = captures(kind, i)
        bm = fj.create_block_mask(mask_mod, 1, 1, S, S, BLOCK_SIZE=32)
        out = fj.flex_attention(q, k, v, score_mod, bm)
        dq = jax.grad(lambda q: jnp.sum(fj.flex_attention(q, k, v, score_mod, bm) ** 2))(q)
        return out, dq, score_mod, bm

    step(0)  # the first call compiles
    before = compiled_state()
    for i in (1, 2):
        out, dq, score_mod, bm = step(i)
        want = flex_attention_reference(q, k, v, score_mod, bm)
        np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
    assert compiled_state() == before

    @jax.jit
    def in_jit(q, i):  # the closure is built inside: new values are traced arguments
        return fj.flex_attention(q, k, v, *captures_in_jit(kind, i))

    in_jit(q, 0)
    traced = compiled_state()
    for i in (1, 2):
        in_jit(q, i)
    assert compiled_state() == traced


def captures_in_jit(kind, i):
    """(score_mod, block_mask) whose captured values are traced inside a jit."""
    scale = 1.0 + 0.25 * i.astype(jnp.float32)
    row, grid = scale * jnp.arange(S) / S, scale * jnp.ones((H, S // 16))  # traced captures
    score_mod = {
        "0d": lambda s, b, h, q, kv: s * scale,
        "1d": lambda s, b, h, q, kv: s + row[kv],
        "2d": lambda s, b, h, q, kv: s + grid[h, kv // 16],
        "bool": None,
    }[kind]
    is_global = (jnp.arange(S) % 7) == i

    def mask_mod(b, h, q, kv):
        return (q >= kv) | is_global[kv]

    return score_mod, fj.create_block_mask(mask_mod, 1, 1, S, S, BLOCK_SIZE=32)


WINDOW = 8  # read by a mod below as a global: a new value must give a new program


def test_known_closures_are_not_traced_again_and_their_guards_hold(monkeypatch):
    """A new closure of known code and captured shapes reuses the program, with its own arrays.

    The signature that decides this covers cells, defaults and the globals the
    code names: a changed Python constant there (a global, a captured int) gives
    a new program; a captured object the signature cannot read is traced each time.
    """
    global WINDOW
    traces = []
    trace = mod_trace._trace
    monkeypatch.setattr(mod_trace, "_trace", lambda *a: traces.append(1) or trace(*a))

    def doc_mask(doc, offset, shift=0):
        def mask_mod(b, h, q, kv):
            in_doc = (offset[kv] <= offset[q]) & (doc[q] == doc[kv])  # offset is read first
            return in_doc & (jnp.abs(q - kv) <= WINDOW + shift)

        return mask_mod

    rng = np.random.default_rng(0)

    def traced_build(mask_mod, want):
        """How many traces building mask_mod's BlockMask took; checks its dense mask."""
        before = len(traces)
        bm = fj.create_block_mask(mask_mod, 1, 1, S, S, BLOCK_SIZE=32)
        n = len(traces) - before
        # the program with the arrays it got (not the closure given) and the block tables
        got = fj.create_mask(bm.mask_program.bind(bm.mask_consts), 1, 1, S, S)[0, 0]
        np.testing.assert_array_equal(np.asarray(got), want)
        blocks = want.reshape(S // 32, 32, S // 32, 32)
        kinds = np.where(blocks.all((1, 3)), 2, np.where(blocks.any((1, 3)), 1, 0))
        np.testing.assert_array_equal(bm.block_kinds()[0, 0], kinds)
        return n

    def docs(shift=0):
        doc = jnp.asarray(np.sort(rng.integers(0, 4, S)), jnp.int32)
        offset = jnp.asarray(rng.integers(0, 2, S), jnp.int32)
        d, o, i = np.asarray(doc), np.asarray(offset), np.arange(S)
        want = (
            (o[None, :] <= o[:, None])
            & (d[:, None] == d[None, :])
            & (np.abs(i[:, None] - i[None, :]) <= WINDOW + shift)
        )
        return doc_mask(doc, offset, shift), want

    assert traced_build(*docs()) == 1
    assert [traced_build(*docs()) for _ in range(3)] == [0, 0, 0]  # new arrays: no new trace
    WINDOW = 20
    try:
        assert traced_build(*docs()) == 1  # the global changed: traced, and the new value shows
        assert traced_build(*docs(shift=3)) == 1  # a captured int changed
        assert traced_build(*docs(shift=3)) == 0
    finally:
        WINDOW = 8

    class Config:
        window = 4

    for window in (4, 9, 9):
        cfg = Config()
        cfg.window = window
        i = np.arange(S)
        want = np.abs(i[:, None] - i[None, :]) <= window
        # an object's attributes are not guarded: traced every time
        assert traced_build(lambda b, h, q, kv, cfg=cfg: jnp.abs(q - kv) <= cfg.window, want) == 1


def test_signature_guards_module_attributes_and_values_read_at_trace_time(monkeypatch):
    """What a trace bakes in keys the program: a module's attribute the mod reads, and a
    captured array whose value (not just shape) the mod reads; library calls do not stop reuse."""
    import types

    traces = []
    trace = mod_trace._trace
    monkeypatch.setattr(mod_trace, "_trace", lambda *a: traces.append(1) or trace(*a))
    settings = types.ModuleType("settings")  # a user's config module
    settings.window = 4
    glob = {"settings": settings, "jnp": jnp}
    # Closures reading settings.window, made as a user's module would make them. (Like
    # jax.jit, JAX caches a trace per function object: a new closure is what traces again.)
    exec("def windowed():\n    return lambda b, h, q, kv: jnp.abs(q - kv) <= settings.window", glob)
    windowed = glob["windowed"]
    i = np.arange(S)

    def dense_of(mask_mod):
        before = len(traces)
        bm = fj.create_block_mask(mask_mod, 1, 1, S, S, BLOCK_SIZE=32)
        n = len(traces) - before
        got = fj.create_mask(bm.mask_program.bind(bm.mask_consts), 1, 1, S, S)[0, 0]
        return np.asarray(got), n

    got, n = dense_of(windowed())
    np.testing.assert_array_equal(got, np.abs(i[:, None] - i[None, :]) <= 4)
    assert dense_of(windowed())[1] == 0  # nothing changed: the cached program
    settings.window = 9
    got, n = dense_of(windowed())
    np.testing.assert_array_equal(got, np.abs(i[:, None] - i[None, :]) <= 9)
    assert n == 1

    # The same module reached through a closure cell, and a submodule's attribute.
    settings.model = types.ModuleType("settings.model")
    settings.model.window = 2

    def captured(cfg):
        return lambda b, h, q, kv: jnp.abs(q - kv) <= cfg.window + cfg.model.window

    for window, inner, traced in ((9, 2, 1), (9, 2, 0), (9, 5, 1), (1, 5, 1)):
        settings.window, settings.model.window = window, inner
        got, n = dense_of(captured(settings))
        np.testing.assert_array_equal(got, np.abs(i[:, None] - i[None, :]) <= window + inner)
        assert n == traced, (window, inner, n)

    def concrete(n_arr):  # the mod reads a numpy array's value while tracing: baked in
        return lambda b, h, q, kv: jnp.where(q >= kv, True, q - kv < int(n_arr[0]))

    for width in (3, 11, 11):
        got, n = dense_of(concrete(np.asarray([width])))
        np.testing.assert_array_equal(
            got, (i[:, None] >= i[None, :]) | (i[:, None] - i[None, :] < width)
        )
        assert n == 1  # traced every time: never a program with another call's value

    def doc_where(doc):  # jnp.where and friends: library functions, keyed by identity
        return lambda b, h, q, kv: jnp.where(q >= kv, doc[q] == doc[kv], False)

    counts = [dense_of(doc_where(jnp.asarray(i // d, jnp.int32)))[1] for d in (16, 32, 8)]
    assert counts == [1, 0, 0], counts


def test_eager_calls_reuse_one_executable():
    """The eager path is one cached jitted call: nothing traced after the first."""
    q, k, v = random_qkv(1, B, H, S, S, D)
    fj.flex_attention(q, k, v)
    size = api.jitted_call._cache_size()
    for seed in (2, 3):
        q2, k2, v2 = random_qkv(seed, B, H, S, S, D)
        np.testing.assert_allclose(
            fj.flex_attention(q2, k2, v2), flex_attention_reference(q2, k2, v2), atol=2e-5
        )
    assert api.jitted_call._cache_size() == size


def pallas_operand_dtypes(fn, *args) -> set:
    """Dtypes of every operand of every pallas_call in fn's jaxpr (nested jaxprs included)."""
    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                found.update(str(v.aval.dtype) for v in eqn.invars)
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple | list) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("dtype", [jnp.bool_, jnp.int8, jnp.uint8, jnp.int16])
def test_narrow_captured_arrays_are_widened_and_agree_with_int32(dtype):
    q, k, v = random_qkv(4, B, H, S, S, D)
    rng = np.random.default_rng(5)
    flags = rng.random(S) < 0.1
    weights = rng.integers(0, 3, S)

    def mods(array_dtype):
        glob = jnp.asarray(flags, array_dtype)
        w = jnp.asarray(weights, jnp.bool_ if dtype == jnp.bool_ else array_dtype)

        def mask_mod(b, h, q, kv):
            return (q >= kv) | (glob[kv] != 0)

        def score_mod(s, b, h, q, kv):
            return s + 0.1 * w[kv].astype(jnp.float32)

        bm = fj.create_block_mask(mask_mod, 1, 1, S, S, BLOCK_SIZE=32)
        return score_mod, bm

    narrow, wide = mods(dtype), mods(jnp.int32)
    out_n = fj.flex_attention(q, k, v, *narrow)
    np.testing.assert_array_equal(out_n, fj.flex_attention(q, k, v, *wide))
    loss = lambda q, mods: jnp.sum(fj.flex_attention(q, k, v, *mods) ** 2)
    np.testing.assert_array_equal(jax.grad(loss)(q, narrow), jax.grad(loss)(q, wide))
    dtypes = pallas_operand_dtypes(lambda q: fj.flex_attention(q, k, v, *narrow), q)
    assert dtypes and not dtypes & {"bool", "int8", "uint8", "int16"}, dtypes


# ---------------------------------------------------------------------------- index ranges

DOC = jnp.zeros(1000, jnp.int32)
TABLE = jnp.zeros(100, jnp.float32)
SLOPES = jnp.linspace(0.1, 1.0, 4)
BIAS = jnp.zeros((2, 4), jnp.float32)
FULL = jnp.zeros(4096, jnp.int32)
GRID = jnp.zeros((64, 64), jnp.float32)

OUT_OF_RANGE = {
    # name: (score_mod or None, mask_mod or None, (B, H, L, S), shape, range)
    "document_id_too_short": (
        None,
        lambda b, h, q, kv: DOC[q] == DOC[kv],
        (1, 1, 4096, 4096),
        "(1000,)",
        "[0, 4095]",
    ),  # fmt: skip
    "relative_table": (
        lambda s, b, h, q, kv: s + TABLE[q - kv + 50],
        None,
        (1, 1, 4096, 4096),
        "(100,)",
        "[-4045,",
    ),  # fmt: skip
    "more_heads_than_slopes": (
        lambda s, b, h, q, kv: s * SLOPES[h],
        None,
        (1, 8, 256, 256),
        "(4,)",
        "[0, 7]",
    ),  # fmt: skip
    "bias_batch_too_small": (
        lambda s, b, h, q, kv: s + BIAS[b, h],
        None,
        (3, 4, 256, 256),
        "(2, 4)",
        "[0, 2]",
    ),  # fmt: skip
    "off_by_one": (
        None,
        lambda b, h, q, kv: FULL[kv + 1] >= 0,
        (1, 1, 4096, 4096),
        "(4096,)",
        "[1, 4096]",
    ),  # fmt: skip
    "coarse_grid_too_fine": (
        lambda s, b, h, q, kv: s + GRID[q // 32, kv // 64],
        None,
        (1, 1, 4096, 4096),
        "(64, 64)",
        "[0, 127]",
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", list(OUT_OF_RANGE))
def test_out_of_range_indices_are_refused_before_running(name):
    score_mod, mask_mod, (b, h, L, S_), shape, index_range = OUT_OF_RANGE[name]
    q = jax.ShapeDtypeStruct((b, h, L, 16), jnp.float32)  # never run: refused at trace time
    if mask_mod is not None:
        with pytest.raises(ModIndexError) as err:
            fj.create_block_mask(mask_mod, b, h, L, S_)
    else:
        with pytest.raises(ModIndexError) as err:
            jax.eval_shape(lambda q: fj.flex_attention(q, q, q, score_mod), q)
    message = str(err.value)
    assert "<lambda>" in message and shape in message and index_range in message, message
    assert "clamp the index" in message


def test_mask_mods_are_checked_for_the_attention_call_too():
    """A block mask built for B=1 may be broadcast over a batch its mask_mod cannot index."""
    per_batch = jnp.zeros((1, 256), jnp.int32)

    def mask_mod(b, h, q, kv):
        return per_batch[b, kv] == 0

    bm = fj.create_block_mask(mask_mod, 1, 1, 256, 256)  # b < 1: in range
    q = jax.ShapeDtypeStruct((2, 1, 256, 16), jnp.float32)
    with pytest.raises(ModIndexError, match=r"\(1, 256\).*\[0, 1\]"):
        jax.eval_shape(lambda q: fj.flex_attention(q, q, q, block_mask=bm), q)


def test_in_range_and_data_dependent_indices_are_accepted():
    doc = masks.document_id_from_lengths([100, 156])
    q, k, v = random_qkv(6, 1, 4, 256, 256, 16)
    checks = [
        (lambda s, b, h, q, kv: s + TABLE[jnp.clip(q - kv + 50, 0, 99)], None),
        (lambda s, b, h, q, kv: s + TABLE[(q - kv) % 100] + SLOPES[h], None),
        (None, masks.generate_doc_mask_mod(doc)),
        (lambda s, b, h, q, kv: s + TABLE[doc[q]], None),  # data-dependent: clamped, not refused
        (lambda s, b, h, q, kv: s + GRID[q // 64, kv // 64], None),
    ]
    for score_mod, mask_mod in checks:
        bm = None if mask_mod is None else fj.create_block_mask(mask_mod, 1, 1, 256, 256)
        out = fj.flex_attention(q, k, v, score_mod, bm)
        np.testing.assert_allclose(
            out, flex_attention_reference(q, k, v, score_mod, bm), atol=2e-5, rtol=2e-5
        )


def test_check_indices_finds_a_data_dependent_bad_index():
    q, k, v = random_qkv(8, 1, 2, 256, 256, 16)
    doc = jnp.arange(256, dtype=jnp.int32) // 50  # documents 0..5
    offsets = jnp.linspace(0.0, 1.0, 5)  # one entry short: doc 5 reads past it

    def doc_bias(s, b, h, q_idx, kv_idx):
        return s + offsets[doc[q_idx]]

    out = fj.flex_attention(q, k, v, doc_bias)  # unchecked: clamped, as JAX's gathers
    np.testing.assert_allclose(out, flex_attention_reference(q, k, v, doc_bias), atol=2e-5)
    with pytest.raises(
        ModIndexError, match=r"(?s)doc_bias.*shape \(5,\): index 5 is out of bounds"
    ):
        fj.flex_attention(q, k, v, doc_bias, kernel_options={"check_indices": True})
    good = jnp.linspace(0.0, 1.0, 6)
    fine = lambda s, b, h, q_idx, kv_idx: s + good[doc[q_idx]]
    out = fj.flex_attention(q, k, v, fine, kernel_options={"check_indices": True})
    np.testing.assert_allclose(out, flex_attention_reference(q, k, v, fine), atol=2e-5)
    with pytest.raises(ValueError, match="call flex_attention eagerly"):
        jax.jit(
            lambda q: fj.flex_attention(q, k, v, doc_bias, kernel_options={"check_indices": True})
        )(q)


# ---------------------------------------------------------------------------- errors


def test_errors_say_what_to_do():
    q, k, v = random_qkv(7, 1, 1, 32, 32, 16)

    def python_if(s, b, h, q_idx, kv_idx):
        if q_idx > kv_idx:
            return s
        return s - 1.0

    with pytest.raises(TypeError, match="(?s)python_if.*use jnp.where"):
        fj.flex_attention(q, k, v, python_if)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a finite float"):
            fj.flex_attention(q, k, v, scale=bad)
    with pytest.raises(TypeError, match="kernel_options must be a dict"):
        fj.flex_attention(q, k, v, kernel_options=[("BACKEND", "TRITON")])
