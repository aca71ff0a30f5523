"""Small shared helpers for the tests: random inputs and numpy views of block masks."""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.spec import BlockTables


def random_qkv(seed, B, Hq, L, S, E, Ev=None, Hkv=None, Bkv=None, dtype=np.float32):
    """Fresh standard-normal q, k, v (never zeros) as jax arrays."""
    rng = np.random.default_rng(seed)
    Ev = E if Ev is None else Ev
    Hkv = Hq if Hkv is None else Hkv
    Bkv = B if Bkv is None else Bkv
    q = rng.standard_normal((B, Hq, L, E))
    k = rng.standard_normal((Bkv, Hkv, S, E))
    v = rng.standard_normal((Bkv, Hkv, S, Ev))
    return tuple(jax.numpy.asarray(x, dtype) for x in (q, k, v))


def random_block_mask(seed):
    """A random element mask with random lengths and block sizes: (block_mask, L, S)."""
    import flexjax as fj

    rng = np.random.default_rng(seed)
    L, S = int(rng.integers(20, 150)), int(rng.integers(20, 150))
    q_bs, kv_bs = (int(x) for x in rng.choice([16, 32, 64], 2))
    dense = jax.numpy.asarray(rng.random((L, S)) < rng.uniform(0.05, 0.95))

    def random_mask(b, h, q, kv):
        return dense[q, kv]

    return fj.create_block_mask(random_mask, 1, 1, L, S, BLOCK_SIZE=(q_bs, kv_bs)), L, S


TABLES = BlockTables._fields


def tables_np(block_mask):
    """The eight tables of a flexjax or torch BlockMask as numpy arrays (None stays None)."""
    out = {}
    for name in TABLES:
        t = getattr(block_mask, name)
        if t is None:
            out[name] = None
        elif hasattr(t, "detach"):
            out[name] = t.detach().cpu().numpy()
        else:
            out[name] = np.asarray(t)
    return out


def assert_same_tables(ours, theirs):
    a, b = tables_np(ours), tables_np(theirs)
    for name in TABLES:
        if a[name] is None or b[name] is None:
            assert a[name] is None and b[name] is None, name
            continue
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert tuple(ours.BLOCK_SIZE) == tuple(theirs.BLOCK_SIZE)
    assert tuple(ours.seq_lengths) == tuple(theirs.seq_lengths)


def learnable_biases(B, H, L, S, alibi_scale):
    """Three learnable captured arrays and a score_mod factory using them all.

    ALiBi slopes[h], a relative-position table[q - kv + S] and a
    Graphormer-style table[h, dist[b, q, kv]] (dist a captured int array).
    """
    rng = np.random.default_rng(0)
    slopes = jnp.asarray(rng.uniform(0.1, 1.0, H), jnp.float32)
    table = jnp.asarray(rng.standard_normal(L + S), jnp.float32)
    dist = jnp.asarray(rng.integers(0, 7, (B, L, S)), jnp.int32)
    graph_table = jnp.asarray(rng.standard_normal((H, 7)), jnp.float32)

    def make_kw(slopes, table, graph_table):
        def learnable_bias(s, b, h, qi, kv):
            alibi = slopes[h] * (kv - qi) * alibi_scale
            return s + alibi + table[qi - kv + S] + graph_table[h, dist[b, qi, kv]]

        return dict(score_mod=learnable_bias)

    return (slopes, table, graph_table), make_kw
