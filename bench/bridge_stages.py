"""Where a torch_bridge call's host time goes, on a CUDA GPU (issue 16).

B=2, H=4, S=4096, D=64 fp16, no mask, no grad: the jitted call, the eager
call and the bridge, dispatch only and synchronised (median of 300 calls),
the DLPack pieces alone, then the bridge again with each module-level helper
it calls wrapped in a timer (median per call; the wrappers add ~1 us each).

    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python3 bench/bridge_stages.py

Results: bench/results/bridge_stages_h200_2026-11-28_{before,after}.log (the
"before" run wrapped the helpers of the bridge before its plan cache).
"""

import functools
import statistics
import sys
import time

import jax
import torch

import flexjax as fj
import torch_bridge
from torch_bridge import attention as A
from torch_bridge import convert

dev = "cuda"
if not torch.cuda.is_available():
    sys.exit("bridge_stages.py times CUDA calls: no CUDA device here")
sync = torch.cuda.synchronize
N = 300


def med(ts):
    return statistics.median(ts)


def tm(name, f, n=N, synced=False):
    for _ in range(20):
        f()
    sync()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = f()
        if synced:
            (jax.block_until_ready(r) if not isinstance(r, torch.Tensor) else sync())
        ts.append((time.perf_counter() - t0) * 1e6)
    sync()
    print(f"{name:50s} {med(ts):8.1f} us", flush=True)
    return med(ts)


B, H, S, D = 2, 4, 4096, 64
torch.manual_seed(0)
tq, tk, tv = (torch.randn(B, H, S, D, device=dev, dtype=torch.float16) for _ in range(3))
q, k, v = convert.tensors_to_jax([tq, tk, tv], ["q", "k", "v"])
jitted = jax.jit(lambda q, k, v: fj.flex_attention(q, k, v))
j_d = tm("jitted dispatch", lambda: jitted(q, k, v))
j_s = tm("jitted synced", lambda: jitted(q, k, v), synced=True)
e_s = tm("eager flexjax synced", lambda: fj.flex_attention(q, k, v), synced=True)
b_d = tm("bridge dispatch", lambda: torch_bridge.flex_attention(tq, tk, tv))
b_s = tm("bridge synced", lambda: torch_bridge.flex_attention(tq, tk, tv), synced=True)
tm("torch.from_dlpack(jitted) dispatch", lambda: torch.from_dlpack(jitted(q, k, v)))
tm(
    "arrays_to_torch(jitted) dispatch",
    lambda: convert.arrays_to_torch([jitted(q, k, v)], tq.device),
)
tm("import_checked(q,k,v)", lambda: convert.import_checked([tq, tk, tv]))
tm("tensors_to_jax(q,k,v)", lambda: convert.tensors_to_jax([tq, tk, tv], ["q", "k", "v"]))
tm("torch.cuda.device ctx", lambda: torch.cuda.device(tq.device).__enter__())
tm("is_grad_enabled", torch.is_grad_enabled)

# Stage times inside the bridge: wrap the module-level names the bridge calls.
stages = {}


def timed(name, fn):
    @functools.wraps(fn)
    def w(*a, **kw):
        t0 = time.perf_counter()
        r = fn(*a, **kw)
        stages.setdefault(name, []).append((time.perf_counter() - t0) * 1e6)
        return r

    return w


for name in (
    "import_checked",
    "jitted_call",
    "arrays_to_torch",
    "check_score_mod",
    "_plan_key",
    "captured_tensors",
):
    setattr(A, name, timed(name, getattr(A, name)))
tot = []
for _ in range(N + 20):
    t0 = time.perf_counter()
    torch_bridge.flex_attention(tq, tk, tv)
    tot.append((time.perf_counter() - t0) * 1e6)
sync()
print(f"{'bridge dispatch (wrapped)':50s} {med(tot[20:]):8.1f} us")
for name, ts in stages.items():
    print(f"  {name:48s} {med(ts[20:]):8.1f} us  x{len(ts) // (N + 20)}")
print(
    f"SUMMARY jitted_synced={j_s:.1f} bridge_synced={b_s:.1f} overhead={b_s - j_s:.1f} "
    f"eager_overhead={e_s - j_s:.1f} us"
)
