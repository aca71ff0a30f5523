"""The mod tracer and the tile evaluator on their own: no Pallas kernel, CPU only.

Every kernel (forward, both backward passes, decode) sees a user's mod only
through `trace_mod` (a scalar jaxpr with the captured arrays hoisted out) and
`eval_mod` / `eval_score_mod_vjp` (that jaxpr walked on tiles). A bug there
shows up in the kernel suites as a wrong attention output far from its cause;
here each piece is checked directly against the plain definition of a mod, a
scalar function lifted with `vmap_bhqkv`:

* every catalogue mod, evaluated on tiles at a nonzero offset in the three
  layouts the kernels use ([BM, BN] forward/dq, transposed [BN, BM] dk/dv,
  and decode's rows of packed heads), equals the vmapped original;
* `ModProgram.bind` rebuilds the original mod; programs compare by code and
  captured shapes, not captured values;
* the score_mod pullback gives the score gradient and, through its
  (slot, flat index, value) gathers, the gradient of a captured array;
* operations the evaluator cannot do per tile raise `ModTraceError` naming
  the mod;
* captured scalars are baked in, captured arrays hoisted at their shapes.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexjax import masks, mods
from flexjax.examples import EXAMPLES
from flexjax.mod_utils import ModKind, vmap_bhqkv
from pallas_kernels.mod_eval import eval_mod, eval_score_mod_vjp
from pallas_kernels.mod_trace import ModProgram, ModTraceError, trace_mod
from pallas_kernels.tile_ops import IndexVector, TileOps

OPS = TileOps()
LAYOUTS = ("rows", "transposed", "packed_heads", "vectors", "vectors_transposed")
BH_PAIRS = ((0, 0), (0, 1), (1, 0), (1, 1))


# --------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------


def kind_of(is_score_mod):
    return ModKind.SCORE_MOD if is_score_mod else ModKind.MASK_MOD


def flat_refs(consts):
    """The hoisted arrays as a kernel sees them: flattened to 1-D (a jnp array is a fine ref)."""
    return [jnp.ravel(c) for c in consts]


def reference(fn, is_score_mod, b, h, q, kv, score=None):
    """The mod's plain meaning: the scalar function vmapped over q [Q] and kv [KV] -> [Q, KV]."""
    args = (jnp.int32(b), jnp.int32(h), q, kv)
    if is_score_mod:
        args = (score, *args)
    return np.asarray(vmap_bhqkv(fn, kind_of(is_score_mod))(*args))


def evaluate(program, consts, b, h, q, kv, layout, score=None):
    """eval_mod of `program` on the tile q x kv in `layout`; returned as [len(q), len(kv)].

    rows: q_idx [BM, 1], kv_idx [1, BN] (forward, dq). transposed: q_idx [1, BM],
    kv_idx [BN, 1] and the score [BN, BM] (dk/dv). b and h are scalars; decode's
    layout, where h is a tile too, is built in the catalogue test itself.
    """
    bm, bn = len(q), len(kv)
    b, h = jnp.int32(b), jnp.int32(h)
    if layout == "rows":
        args, shape = (b, h, q[:, None], kv[None, :]), (bm, bn)
    elif layout == "transposed":
        args, shape = (b, h, q[None, :], kv[:, None]), (bn, bm)
        score = None if score is None else score.T
    elif layout == "vectors":  # the Mosaic GPU kernels' index vectors
        shape = (bm, bn)
        args = (b, h, IndexVector(q, 0, shape), IndexVector(kv, 1, shape))
    elif layout == "vectors_transposed":
        shape = (bn, bm)
        args = (b, h, IndexVector(q, 1, shape), IndexVector(kv, 0, shape))
        score = None if score is None else score.T
    else:
        raise ValueError(layout)
    if program.is_score_mod:
        args = (score, *args)
    out = eval_mod(program, flat_refs(consts), args, shape, OPS)
    assert out.shape == shape
    out = np.asarray(out)
    return out.T if layout.endswith("transposed") else out


def packed_rows(bm, n_heads, seed):
    """Decode's layout: each row of the tile is (a random head, a query index)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, n_heads, bm), jnp.int32)


def tile_at(length, size, start):
    """Indices start..start+size (shrunk to fit in [0, length)), never starting at 0."""
    size = min(size, length // 2)
    start = min(start, length - size)
    assert start > 0
    return jnp.arange(start, start + size, dtype=jnp.int32)


def random_scores(rng, shape):
    return jnp.asarray(rng.standard_normal(shape) * 3.0, jnp.float32)


def assert_same(out, ref, is_score_mod, err_msg=""):
    if is_score_mod:
        assert out.dtype == np.float32, err_msg
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6, err_msg=err_msg)
    else:
        assert out.dtype == np.bool_, err_msg
        np.testing.assert_array_equal(out, ref, err_msg=err_msg)


def catalogue_case(name):
    return EXAMPLES[name].case("small", S=256 if name == "jagged" else 96, H=2, B=2)


def mods_of(case):
    return [(fn, is_score) for fn, is_score in ((case.score_mod, True), (case.mask_mod, False))]


# --------------------------------------------------------------------------
# 1. Every catalogue mod on tiles equals the vmapped original.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_catalogue_mods_on_tiles_match_vmapped_mod(name, layout):
    case = catalogue_case(name)
    rng = np.random.default_rng(zlib.crc32(f"{name}/{layout}".encode()))
    q = tile_at(case.Q_LEN, 24, 37)  # BM != BN: a swapped orientation cannot pass
    kv = tile_at(case.KV_LEN, 40, 5)
    checked = 0
    for fn, is_score_mod in mods_of(case):
        if fn is None:
            continue
        program, consts = trace_mod(fn, is_score_mod)
        assert program.is_score_mod == is_score_mod
        score = random_scores(rng, (len(q), len(kv))) if is_score_mod else None
        if layout == "packed_heads":
            # h varies per row: row i is head heads[i]; compare with the [H, Q, KV] reference.
            heads = packed_rows(len(q), case.H, rng.integers(1 << 30))
            for b in range(case.B):
                args = (jnp.int32(b), heads[:, None], q[:, None], kv[None, :])
                if is_score_mod:
                    args = (score, *args)
                out = np.asarray(eval_mod(program, flat_refs(consts), args, (len(q), len(kv)), OPS))
                all_heads = jnp.arange(case.H, dtype=jnp.int32)
                ref_args = (jnp.int32(b), all_heads, q, kv)
                if is_score_mod:
                    ref_args = (jnp.broadcast_to(score, (case.H, *score.shape)), *ref_args)
                ref = np.asarray(vmap_bhqkv(fn, kind_of(is_score_mod))(*ref_args))
                ref = ref[np.asarray(heads), np.arange(len(q))]
                assert_same(out, ref, is_score_mod, f"{name} {fn.__qualname__} b={b}")
                checked += 1
            continue
        for b, h in BH_PAIRS:
            out = evaluate(program, consts, b, h, q, kv, layout, score)
            ref = reference(fn, is_score_mod, b, h, q, kv, score)
            assert_same(out, ref, is_score_mod, f"{name} {fn.__qualname__} b={b} h={h}")
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("name", ["natten", "sasa"])
def test_index_vectors_keep_one_index_math_on_the_vector(name):
    """With q_idx and kv_idx as `IndexVector`s, `q // W`, `q % W`, `kv // W`, `kv % W` run on
    [BM] / [BN] vectors: no integer division or remainder on a whole [BM, BN] tile."""
    case = catalogue_case(name)
    program, consts = trace_mod(case.mask_mod, False)
    shape = (16, 32)
    q, kv = tile_at(case.Q_LEN, 16, 20), tile_at(case.KV_LEN, 32, 3)
    args = (jnp.int32(0), jnp.int32(0), IndexVector(q, 0, shape), IndexVector(kv, 1, shape))
    jaxpr = jax.make_jaxpr(lambda: eval_mod(program, flat_refs(consts), args, shape, OPS))()
    ops = [(e.primitive.name, e.outvars[0].aval.shape) for e in jaxpr.jaxpr.eqns]
    assert any(name in ("div", "rem") and s in ((16,), (32,)) for name, s in ops), ops
    assert not any(name in ("div", "rem") and s == shape for name, s in ops), ops


def _relative(score, b, h, q_idx, kv_idx):  # a bias of distance, negated and scaled twice
    return score - 3 * (-(kv_idx - q_idx) * 2).astype(jnp.float32) * 0.25


@pytest.mark.parametrize(
    "name, mod",
    [("alibi_functional", mods.generate_alibi_functional(8)),
     ("alibi_closure", mods.generate_alibi_bias(8)), ("relative", _relative)],
)  # fmt: skip
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
def test_relative_position_converts_as_two_vectors(name, mod, transposed):
    """`q_idx - kv_idx` on bounded index vectors (`IndexVector.bound`, as `score_tile` marks
    them) reaches float32 as float(q) - float(kv), one float op per score instead of an
    integer op and an integer-to-float conversion (`mod_eval._OuterSum`): bitwise the same
    scores as the tile form and as the plain mod. Without bounds, or past 2^24, the integer
    tile is converted as before."""
    program, consts = trace_mod(mod, True)
    bm, bn = 16, 32
    q = jnp.asarray(np.random.default_rng(1).permutation(4096)[:bm], jnp.int32)
    kv = jnp.asarray(np.random.default_rng(2).permutation(4096)[:bn], jnp.int32)
    shape, (dq, dkv) = ((bn, bm), (1, 0)) if transposed else ((bm, bn), (0, 1))
    score = jax.random.normal(jax.random.key(3), shape, jnp.float32) * 4
    want = reference(mod, True, 0, 5, q, kv, score.T if transposed else score)

    def run(q_bound, kv_bound):
        args = (score, jnp.int32(0), jnp.int32(5), IndexVector(q, dq, shape, q_bound),
                IndexVector(kv, dkv, shape, kv_bound))  # fmt: skip
        f = lambda: eval_mod(program, flat_refs(consts), args, shape, OPS)
        tile_converts = [
            e for e in jax.make_jaxpr(f)().jaxpr.eqns
            if e.primitive.name == "convert_element_type" and e.invars[0].aval.shape == shape
            and jnp.issubdtype(e.invars[0].aval.dtype, jnp.integer)
        ]  # fmt: skip
        out = np.asarray(f())
        return (out.T if transposed else out), len(tile_converts)

    fast, converts = run(4095, 4095)
    assert converts == 0
    np.testing.assert_array_equal(fast, np.asarray(want))
    for bounds in ((None, 4095), (2**23, 2**24 + 1)):  # unknown, or past float32's integers
        slow, converts = run(*bounds)
        assert converts >= 1
        np.testing.assert_array_equal(slow, fast)


_FACTORED = {  # integer index math between q_idx - kv_idx and its conversion
    "sub": lambda s, b, h, q, kv: s + (q - kv).astype(jnp.float32),
    "add": lambda s, b, h, q, kv: s + (q + kv).astype(jnp.float32),
    "negated, times -3": lambda s, b, h, q, kv: s + (-(kv - q) * -3).astype(jnp.float32),
    "times 3, times 3": lambda s, b, h, q, kv: s + ((q - kv) * 3 * 3).astype(jnp.float32),
    "times 0": lambda s, b, h, q, kv: s + ((q - kv) * 0).astype(jnp.float32),
    "times h": lambda s, b, h, q, kv: s + ((q - kv) * h).astype(jnp.float32),
    "compared": lambda s, b, h, q, kv: jnp.where((q - kv) * 2 > 5, s, 1.0),
}


@pytest.mark.parametrize("bound", [100, 2**22, 2**23 - 1, 2**23, 2**24 - 1, 2**24])
@pytest.mark.parametrize("name", list(_FACTORED))
def test_outer_sums_stay_exact_up_to_their_bounds(name, bound):
    """Index vectors holding values up to their bound, up to float32's largest exact
    integers (2^24): the bounded evaluation (`_OuterSum` where it applies, refused where a
    factor would take a vector past 2^24) is bitwise the unbounded one (integer tiles)."""
    program, _ = trace_mod(_FACTORED[name], True)
    shape = (4, 8)
    rng = np.random.default_rng(bound)
    q, kv = rng.integers(-bound, bound + 1, 4), rng.integers(-bound, bound + 1, 8)
    q[0], kv[0], kv[1] = bound, -bound, bound  # the extremes

    def run(b):
        args = (jnp.zeros(shape, jnp.float32), jnp.int32(0), jnp.int32(3),
                IndexVector(jnp.asarray(q, jnp.int32), 0, shape, b),
                IndexVector(jnp.asarray(kv, jnp.int32), 1, shape, b))  # fmt: skip
        return np.asarray(jax.jit(lambda: eval_mod(program, [], args, shape, OPS))())

    np.testing.assert_array_equal(run(bound).view(np.uint32), run(None).view(np.uint32))


@pytest.mark.parametrize("dtype", [jnp.uint32, jnp.int16, jnp.int8])
def test_outer_sums_are_int32_only(dtype):
    """Narrower or unsigned index vectors wrap where int32 does not: no `_OuterSum`, even
    with a bound (uint32 5 - 3 must stay 2, int16 30000 - -30000 must wrap)."""
    program, _ = trace_mod(_FACTORED["sub"], True)
    shape = (4, 8)
    q, kv, bound = {jnp.uint32: (5, 3, 10), jnp.int16: (30000, -30000, 30000),
                    jnp.int8: (100, -100, 100)}[dtype]  # fmt: skip

    def run(b):
        args = (jnp.zeros(shape, jnp.float32), jnp.int32(0), jnp.int32(3),
                IndexVector(jnp.full(4, q, dtype), 0, shape, b),
                IndexVector(jnp.full(8, kv, dtype), 1, shape, b))  # fmt: skip
        return np.asarray(eval_mod(program, [], args, shape, OPS))

    want = float(np.asarray(q, dtype) - np.asarray(kv, dtype))
    np.testing.assert_array_equal(run(bound), np.full(shape, want, np.float32))
    np.testing.assert_array_equal(run(bound), run(None))


def test_catalogue_tiles_are_not_trivial():
    """The tiles above cut through every mask: each catalogue mask keeps some and drops some."""
    for name in EXAMPLES:
        case = catalogue_case(name)
        if case.mask_mod is None:
            continue
        q = tile_at(case.Q_LEN, 24, 37)
        kv = tile_at(case.KV_LEN, 40, 5)
        ref = reference(case.mask_mod, False, 1, 1, q, kv)
        assert ref.any() and not ref.all(), name


# --------------------------------------------------------------------------
# 2. bind, and programs as cache keys.
# --------------------------------------------------------------------------


def doc_mask(seed, n=64):
    rng = np.random.default_rng(seed)
    doc = jnp.asarray(np.sort(rng.integers(0, 5, n)), jnp.int32)
    return masks.generate_doc_mask_mod(doc)


def alibi(seed, n_heads=4):
    rng = np.random.default_rng(seed)
    return mods.generate_alibi_bias(n_heads, slopes=rng.uniform(0.1, 1.0, n_heads))


def relative_bias(seed, max_distance=9):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal(2 * max_distance + 1).astype(np.float32)
    return mods.generate_relative_bias_table(table, max_distance)


CAPTURING = {
    "document": (doc_mask, False, lambda seed: doc_mask(seed, n=80)),
    "alibi": (alibi, True, lambda seed: alibi(seed, n_heads=8)),
    "relative_bias": (relative_bias, True, lambda seed: relative_bias(seed, max_distance=5)),
}


def full_reference(fn, is_score_mod, score):
    """fn over b [2], h [4], q [64], kv [64]."""
    idx = (jnp.arange(2), jnp.arange(4), jnp.arange(64), jnp.arange(64))
    idx = tuple(i.astype(jnp.int32) for i in idx)
    args = (score, *idx) if is_score_mod else idx
    return np.asarray(vmap_bhqkv(fn, kind_of(is_score_mod))(*args))


@pytest.mark.parametrize("name", list(CAPTURING))
def test_bind_reproduces_the_mod(name):
    make, is_score_mod, _ = CAPTURING[name]
    rng = np.random.default_rng(7)
    score = random_scores(rng, (2, 4, 64, 64)) if is_score_mod else None
    fn = make(1)
    program, consts = trace_mod(fn, is_score_mod)
    assert len(consts) == 1  # the mod does capture an array
    bound = program.bind(consts)
    assert bound.__name__ == program.name
    ref = full_reference(fn, is_score_mod, score)
    assert_same(full_reference(bound, is_score_mod, score), ref, is_score_mod)
    if not is_score_mod:
        assert ref.any() and not ref.all()
    # The values come from the consts given to bind, not from the traced closure.
    other = make(2)
    _, other_consts = trace_mod(other, is_score_mod)
    assert not np.array_equal(np.asarray(other_consts[0]), np.asarray(consts[0]))
    assert_same(
        full_reference(program.bind(other_consts), is_score_mod, score),
        full_reference(other, is_score_mod, score),
        is_score_mod,
    )
    with pytest.raises(ValueError, match="captures 1 arrays"):
        program.bind([])


@pytest.mark.parametrize("name", list(CAPTURING))
def test_program_identity_is_code_and_shapes_not_values(name):
    make, is_score_mod, make_other_shape = CAPTURING[name]
    p1, c1 = trace_mod(make(1), is_score_mod)
    p2, c2 = trace_mod(make(2), is_score_mod)
    assert not np.array_equal(np.asarray(c1[0]), np.asarray(c2[0]))
    assert p1 == p2 and hash(p1) == hash(p2)
    assert len({p1, p2}) == 1  # usable as a dict key / jit static argument
    p3, c3 = trace_mod(make_other_shape(1), is_score_mod)
    assert c3[0].shape != c1[0].shape
    assert p3 != p1
    assert p1 != trace_mod(mods.noop, True)[0]
    assert p1 != "not a program"


def test_score_mod_and_mask_mod_programs_differ():
    def as_score(score, b, h, q_idx, kv_idx):
        return score

    p_score, _ = trace_mod(as_score, True)
    p_mask, _ = trace_mod(masks.causal_mask, False)
    assert isinstance(p_score, ModProgram) and p_score != p_mask
    assert not p_mask.is_score_mod


# --------------------------------------------------------------------------
# 3. The score_mod pullback and gradients of captured arrays.
# --------------------------------------------------------------------------

L = S = 64
N_HEADS = 4


def table_bias(table):
    def learnable_table(s, b, h, q_idx, kv_idx):
        return s + table[q_idx - kv_idx + S]

    return learnable_table


def slope_scale(slopes):
    def learnable_slopes(s, b, h, q_idx, kv_idx):
        return s * slopes[h]

    return learnable_slopes


def tanh_table(table):
    """Nonlinear in both the score and the gathered value."""

    def tanh_bias(s, b, h, q_idx, kv_idx):
        t = table[q_idx - kv_idx + S]
        return jnp.tanh(s * t) + t * t

    return tanh_bias


LEARNABLE = {
    "table": (table_bias, lambda rng: rng.standard_normal(L + S)),
    "slopes": (slope_scale, lambda rng: rng.uniform(0.1, 1.0, N_HEADS)),
    "tanh_table": (tanh_table, lambda rng: rng.standard_normal(L + S)),
}


def accumulate(grads, slot, size):
    """The captured array's gradient from the pullback's gathers, as the kernel scatter-adds it."""
    total = jnp.zeros(size, jnp.float32)
    for s, flat, d_value in grads:
        assert s == slot
        assert jnp.shape(d_value) == jnp.shape(flat)
        total = total.at[flat].add(d_value)
    return np.asarray(total)


@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
@pytest.mark.parametrize("name", list(LEARNABLE))
def test_score_mod_vjp_matches_jax_vjp(name, transposed):
    factory, init = LEARNABLE[name]
    rng = np.random.default_rng(11)
    param = jnp.asarray(init(rng), jnp.float32)
    program, consts = trace_mod(factory(param), True)
    assert len(consts) == 1 and consts[0].shape == param.shape
    q = jnp.arange(29, 29 + 24, dtype=jnp.int32)
    kv = jnp.arange(3, 3 + 40, dtype=jnp.int32)
    for b, h in ((0, 1), (1, 3)):
        score = random_scores(rng, (len(q), len(kv)))
        d_out = random_scores(rng, (len(q), len(kv)))

        def ref_fn(score, param, b=b, h=h):
            return vmap_bhqkv(factory(param), ModKind.SCORE_MOD)(
                score, jnp.int32(b), jnp.int32(h), q, kv
            )

        ref_out, ref_vjp = jax.vjp(ref_fn, score, param)
        ref_d_score, ref_d_param = ref_vjp(d_out)

        bi, hi = jnp.int32(b), jnp.int32(h)
        if transposed:
            args, shape = (score.T, bi, hi, q[None, :], kv[:, None]), (len(kv), len(q))
            d_tile = d_out.T
        else:
            args, shape = (score, bi, hi, q[:, None], kv[None, :]), (len(q), len(kv))
            d_tile = d_out
        out, pullback = eval_score_mod_vjp(program, flat_refs(consts), args, shape, OPS, [0])
        d_score, grads = pullback(d_tile)
        if transposed:
            out, d_score = out.T, d_score.T
        np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(d_score, ref_d_score, rtol=1e-5, atol=1e-6)
        assert grads, "no gathers recorded for the captured array"
        d_param = accumulate(grads, 0, param.size).reshape(param.shape)
        np.testing.assert_allclose(d_param, ref_d_param, rtol=1e-5, atol=1e-5)
        assert np.abs(np.asarray(ref_d_param)).max() > 0


def test_score_mod_vjp_reports_only_grad_slots():
    rng = np.random.default_rng(3)
    slopes = jnp.asarray(rng.uniform(0.1, 1.0, N_HEADS), jnp.float32)
    table = jnp.asarray(rng.standard_normal(L + S), jnp.float32)

    def both(s, b, h, q_idx, kv_idx):
        return s * slopes[h] + table[q_idx - kv_idx + S]

    program, consts = trace_mod(both, True)
    assert [c.shape for c in consts] == [slopes.shape, table.shape]
    q = jnp.arange(10, 26, dtype=jnp.int32)
    kv = jnp.arange(7, 39, dtype=jnp.int32)
    score = random_scores(rng, (16, 32))
    d_out = random_scores(rng, (16, 32))
    args = (score, jnp.int32(1), jnp.int32(2), q[:, None], kv[None, :])

    def ref_fn(score, slopes, table):
        def mod(s, b, h, q_idx, kv_idx):
            return s * slopes[h] + table[q_idx - kv_idx + S]

        return vmap_bhqkv(mod, ModKind.SCORE_MOD)(score, jnp.int32(1), jnp.int32(2), q, kv)

    _, ref_vjp = jax.vjp(ref_fn, score, slopes, table)
    ref_d_score, ref_d_slopes, ref_d_table = ref_vjp(d_out)

    for grad_slots, expected in (([1], {1}), ([0, 1], {0, 1}), ([], set())):
        out, pullback = eval_score_mod_vjp(
            program, flat_refs(consts), args, (16, 32), OPS, grad_slots
        )
        d_score, grads = pullback(d_out)
        np.testing.assert_allclose(d_score, ref_d_score, rtol=1e-5, atol=1e-6)
        assert {slot for slot, _, _ in grads} == expected
        for slot, size, ref in ((0, N_HEADS, ref_d_slopes), (1, L + S, ref_d_table)):
            if slot in expected:
                got = accumulate([g for g in grads if g[0] == slot], slot, size)
                np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# 4. What the evaluator cannot do is a ModTraceError naming the mod.
# --------------------------------------------------------------------------


def _tile_args(is_score_mod):
    q = jnp.arange(4, 12, dtype=jnp.int32)[:, None]
    kv = jnp.arange(2, 18, dtype=jnp.int32)[None, :]
    args = (jnp.int32(0), jnp.int32(1), q, kv)
    if is_score_mod:
        score = random_scores(np.random.default_rng(0), (8, 16))
        args = (score, *args)
    return args


def summing_score_mod_factory():
    table = jnp.asarray(np.random.default_rng(1).standard_normal(16), jnp.float32)

    def summing_table_bias(score, b, h, q_idx, kv_idx):
        return score + jnp.sum(table)

    return summing_table_bias


def cumsum_mask_mod_factory():
    lengths = jnp.asarray([3, 5, 2, 6], jnp.int32)

    def cumsum_lengths_mask(b, h, q_idx, kv_idx):
        ends = jnp.cumsum(lengths)
        return kv_idx < ends[q_idx % 4]

    return cumsum_lengths_mask


def sorting_mask_mod_factory():
    values = jnp.asarray(np.random.default_rng(2).integers(0, 20, 32), jnp.int32)

    def sorted_values_mask(b, h, q_idx, kv_idx):
        return jnp.sort(values)[q_idx] >= kv_idx

    return sorted_values_mask


UNSUPPORTED = {
    "sum_of_captured": (summing_score_mod_factory, True, "reduce_sum"),
    "cumsum_of_captured": (cumsum_mask_mod_factory, False, "cumsum"),
    "sort_of_captured": (sorting_mask_mod_factory, False, "sort"),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_operations_raise_mod_trace_error(name):
    factory, is_score_mod, op = UNSUPPORTED[name]
    fn = factory()
    score = random_scores(np.random.default_rng(4), (4, 4))
    ref = reference(fn, is_score_mod, 0, 1, jnp.arange(4), jnp.arange(4), score)
    assert ref.shape == (4, 4)  # a valid jax function: vmap evaluates it
    program, consts = trace_mod(fn, is_score_mod)  # tracing succeeds
    assert len(consts) == 1
    with pytest.raises(ModTraceError) as err:
        eval_mod(program, flat_refs(consts), _tile_args(is_score_mod), (8, 16), OPS)
    message = str(err.value)
    assert fn.__name__ in message
    assert ("score_mod" if is_score_mod else "mask_mod") in message
    assert op in message
    assert isinstance(err.value, TypeError)  # ModTraceError is a TypeError for callers


# --------------------------------------------------------------------------
# 5. Python / numpy scalars are literals; captured JAX arrays (0-d too) are hoisted.
# --------------------------------------------------------------------------


def scalar_capturing(py_float, np_scalar, np_0d, jax_0d):
    def scaled(score, b, h, q_idx, kv_idx):
        return score * py_float + np_scalar * (q_idx - kv_idx) + np_0d * h + jax_0d * b

    return scaled


def test_python_scalars_are_baked_in_and_jax_scalars_are_inputs():
    rng = np.random.default_rng(5)
    values = [
        float(rng.uniform(0.5, 2.0)),
        np.float32(rng.uniform(0.5, 2.0)),
        np.asarray(rng.uniform(0.5, 2.0), np.float32),
        jnp.float32(rng.uniform(0.5, 2.0)),
    ]
    fn = scalar_capturing(*values)
    program, consts = trace_mod(fn, True)
    assert program.const_shapes == ((),) and len(consts) == 1  # the jax 0-d array
    np.testing.assert_array_equal(consts[0], values[3])
    assert sorted(kind for kind, _ in program.const_slots).count("hoisted") == 1
    q, kv = tile_at(64, 16, 21), tile_at(64, 24, 9)
    score = random_scores(rng, (len(q), len(kv)))
    for layout in ("rows", "transposed"):
        out = evaluate(program, consts, 1, 1, q, kv, layout, score)
        np.testing.assert_allclose(out, reference(fn, True, 1, 1, q, kv, score), rtol=1e-6)
    full_score = random_scores(rng, (2, 4, 64, 64))
    np.testing.assert_allclose(
        full_reference(program.bind(consts), True, full_score),
        full_reference(fn, True, full_score),
        rtol=1e-6,
    )
    # Python and numpy scalars are part of the program; the JAX scalar is not.
    for i in range(len(values)):
        changed = list(values)
        changed[i] = changed[i] * 3
        other, other_consts = trace_mod(scalar_capturing(*changed), True)
        if i == 3:
            assert other == program and float(other_consts[0]) == float(values[3] * 3)
        else:
            assert other != program, f"captured scalar {i} is not part of the program"


HOISTED = {
    "1d_f32": ((7,), jnp.float32, lambda h, q, kv: (q % 7,)),
    "2d_f32": ((3, 5), jnp.float32, lambda h, q, kv: (h, kv % 5)),
    "3d_i32": ((2, 3, 4), jnp.int32, lambda h, q, kv: (h % 2, q % 3, kv % 4)),
    "size_1": ((1,), jnp.int32, lambda h, q, kv: (q * 0,)),
}


@pytest.mark.parametrize("name", list(HOISTED))
def test_captured_arrays_are_hoisted_with_their_shapes(name):
    shape, dtype, pick = HOISTED[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    data = rng.integers(1, 9, shape) if dtype == jnp.int32 else rng.standard_normal(shape)
    array = jnp.asarray(data, dtype)

    def gathering(score, b, h, q_idx, kv_idx):
        return score + array[pick(h, q_idx, kv_idx)]

    program, consts = trace_mod(gathering, True)
    assert program.const_slots == (("hoisted", 0),)
    assert program.const_shapes == (shape,)
    assert program.const_dtypes == (str(jnp.dtype(dtype)),)
    assert len(consts) == 1 and consts[0].shape == shape and consts[0].dtype == dtype
    np.testing.assert_array_equal(np.asarray(consts[0]), np.asarray(array))
    # The evaluator reads the values from the refs it is given, not from the closure.
    q, kv = tile_at(64, 8, 3), tile_at(64, 12, 2)
    score = random_scores(rng, (len(q), len(kv)))
    out = evaluate(program, consts, 0, 2, q, kv, "rows", score)
    np.testing.assert_allclose(out, reference(gathering, True, 0, 2, q, kv, score), rtol=1e-6)
    doubled = evaluate(program, [consts[0] * 2], 0, 2, q, kv, "rows", score)
    bias = out - np.asarray(score)
    assert np.abs(bias).min() > 0
    np.testing.assert_allclose(doubled - np.asarray(score), 2 * bias, rtol=1e-5, atol=1e-5)
