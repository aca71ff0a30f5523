"""Kernel backends, the choice between them, and the one entry point below the public API.

A backend is one implementation of the attention kernels -- forward,
backward (dq, dk/dv, captured-array gradients), decode -- with its own
configs, autotune space, tile operations and shared-memory estimates. It
takes the backend-neutral call (`spec.KernelSpec`, `spec.BlockTables`,
`spec.Mods`, the index offsets) and plain arrays. The Triton kernels
(`pallas_kernels.triton`) are the first; a Mosaic GPU backend joins by
registering a second.

Choice, with PyTorch's key `kernel_options["BACKEND"]`:
  * "AUTO" (the default): the first backend (built-in ones first, then in
    registration order) that knows every backend-specific kernel_options key
    given and whose `auto` accepts the call (its `supports`, unless the
    backend is the worse choice there), with its `auto_options` (kernel
    choices measured better for the call, which options the call gives
    override); if none does, an error listing every backend's reason.
    Built-in order: Mosaic GPU (sm90, the calls it runs compiled), then
    Triton.
  * a name ("TRITON", ...): that backend, or an error with its reason. Never
    a silent fallback to another implementation.

`attention` is what `flexjax.flex_attention` calls after validating and
canonicalising: select, configure (or autotune), and run the differentiable
function of `vjp`. Every kernel launcher reports its traces to
`kernel_traced`, so tests count retraces here, whatever the backend.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import importlib
import os
from typing import Any

import jax

from pallas_kernels.runtime import has_gpu
from pallas_kernels.spec import BlockTables, KernelSpec, Layout, Mods, TableView
from pallas_kernels.vma import cast_varying, varying_axes

__all__ = [
    "DECODE_MAX_Q_LEN",
    "GENERIC_OPTION_KEYS",
    "Backend",
    "BackendUnavailable",
    "KernelConfigs",
    "KernelOptions",
    "attention",
    "backends",
    "default_interpret",
    "kernel_traced",
    "register",
    "select_backend",
    "trace_count",
    "xla_asks_determinism",
]

# Queries shorter than this (and within the BlockMask's first q block) may take
# a backend's decode kernel.
DECODE_MAX_Q_LEN = 128

# kernel_options keys every backend shares; the rest belong to the chosen backend.
GENERIC_OPTION_KEYS = ("BACKEND", "autotune", "decode", "deterministic", "interpret")

# XLA's own flags asking for deterministic GPU ops: with one set (=true, or bare), the
# `deterministic` kernel option defaults to True (flexjax's kernels follow XLA's).
_XLA_DETERMINISM_FLAGS = ("--xla_gpu_deterministic_ops", "--xla_gpu_exclude_nondeterministic_ops")

# Backends that ship with flexjax, imported on first use; each registers itself.
# They come first in the registry, in this order (AUTO's), whatever order they import in.
_BUILTIN_BACKENDS = ("pallas_kernels.mosaic_gpu", "pallas_kernels.triton")
_BUILTIN_NAMES = ("MOSAIC_GPU", "TRITON")


class BackendUnavailable(NotImplementedError):
    """The requested kernel backend cannot run this call (the message says why)."""


@dataclasses.dataclass(frozen=True)
class KernelConfigs:
    """A backend's configs for one call: forward, backward, and decode (None: no decode kernel)."""

    fwd: Any
    bwd: Any
    decode: Any = None


class Backend(abc.ABC):
    """One implementation of the attention kernels.

    Kernel methods take plain arrays in spec.layout's order and return plain
    arrays: q [B, Hq, L, E], k [Bkv, Hkv, S, E], v [Bkv, Hkv, S, Ev], out
    [B, Hq, L, Ev] in q's dtype, lse [B, Hq, L] float32 (natural log, -inf for
    rows that keep nothing).
    """

    name: str  # what kernel_options["BACKEND"] calls it
    option_keys: tuple[str, ...] = ()  # the kernel_options keys it reads

    @abc.abstractmethod
    def supports(self, spec: KernelSpec, mods: Mods) -> str | None:
        """None if this backend can run the call, else the reason it cannot."""

    def auto(self, spec: KernelSpec, mods: Mods) -> str | None:
        """Like `supports`, for AUTO: None if AUTO may choose this backend (it can run the call
        and is the better choice there), else why not. Default: `supports`."""
        return self.supports(spec, mods)

    def auto_options(self, spec: KernelSpec, mods: Mods) -> dict:
        """kernel_options (this backend's keys) AUTO sets when it picks this backend for the
        call, unless the call gives them: a per-kernel choice measured better for this kind of
        call. A call that names the backend gets none of them. Default: none."""
        return {}

    # This backend's kernel_options that make dq, dk and dv bitwise the same run to run,
    # applied under kernel_options["deterministic"] (`KernelOptions.for_backend`); empty for
    # a backend that always is.
    deterministic_options: dict = {}
    # Part of the autotune cache's key: raise it when the configs' fields or their defaults
    # change, so that entries written before do not rebuild configs of another meaning.
    config_version: int = 0

    @abc.abstractmethod
    def configs(self, spec: KernelSpec, mods: Mods, options: dict, decode: bool) -> KernelConfigs:
        """Default configs with `options` (this backend's kernel_options keys) applied."""

    @abc.abstractmethod
    def candidates(self, kind: str, spec: KernelSpec, mods: Mods, fixed: dict):
        """The autotune space of kernel `kind` ("fwd" or "bwd") for this call, as configs.

        fixed: the options the caller set (held fixed). Returns an iterable of
        (dict of the varied options, config).
        """

    @abc.abstractmethod
    def config_from(self, kind: str, values: dict):
        """A config of kernel `kind` from the dict `candidates` produced (the autotune cache's form)."""

    @abc.abstractmethod
    def fwd(self, q, k, v, tables: TableView, mods: Mods, offsets, *, spec, cfg):
        """(out, lse) over the row view of the tables."""

    @abc.abstractmethod
    def decode(self, q, k, v, tables: TableView, mods: Mods, offsets, *, spec, cfg):
        """(out, lse) for a short query (L < DECODE_MAX_Q_LEN within the first q block)."""

    @abc.abstractmethod
    def bwd(self, q, k, v, do, lse, delta, tables: BlockTables, mods: Mods, offsets, *,
            spec, cfg, grad_slots: tuple):  # fmt: skip
        """(dq, dk, dv, captured-array gradients); lse and delta from `vjp.preprocess`.

        grad_slots: which of the score_mod's captured arrays need a gradient;
        their gradients come back flat, float32, in that order.
        """

    def __repr__(self) -> str:
        return f"<flexjax kernel backend {self.name}>"


_REGISTRY: dict[str, Backend] = {}
_IMPORT_ERRORS: dict[str, str] = {}


def register(backend: Backend) -> None:
    """Add a backend after the built-in ones and those already registered (AUTO's order)."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register() takes a dispatch.Backend, got {type(backend).__name__}")
    if not backend.name.isupper():
        raise ValueError(
            f"a backend's name is upper case (kernel_options['BACKEND']), got {backend.name!r}"
        )
    _load_builtins()
    _REGISTRY[backend.name] = backend
    if backend.name in _BUILTIN_NAMES:  # built-ins in AUTO's order, ahead of the others
        builtin = {n: _REGISTRY[n] for n in _BUILTIN_NAMES if n in _REGISTRY}
        rest = {n: b for n, b in _REGISTRY.items() if n not in builtin}
        _REGISTRY.clear()
        _REGISTRY.update({**builtin, **rest})


def _load_builtins() -> None:
    """Import the built-in backends once (each registers itself); remember why one did not import."""
    for module in _BUILTIN_BACKENDS:
        if module not in _IMPORT_ERRORS:
            _IMPORT_ERRORS[module] = ""  # marked first: the module's own register() lands here
            try:
                importlib.import_module(module)
            except ImportError as e:  # e.g. a JAX without this Pallas lowering
                _IMPORT_ERRORS[module] = f"{module} did not import: {e}"


def backends() -> dict[str, Backend]:
    """The registered backends by name, in AUTO's order."""
    _load_builtins()
    return dict(_REGISTRY)


def select_backend(name: str, spec: KernelSpec, mods: Mods, option_keys=()) -> Backend:
    """The backend that runs this call (see the module docstring).

    option_keys: the backend-specific kernel_options keys the call gives.
    """
    registry = backends()
    import_errors = [why for why in _IMPORT_ERRORS.values() if why]
    if name == "AUTO":
        knowing = [b for b in registry.values() if set(option_keys) <= set(b.option_keys)]
        if not knowing:
            known = {b.name: [*GENERIC_OPTION_KEYS, *b.option_keys] for b in registry.values()}
            raise ValueError(
                f"kernel_options has unknown keys {sorted(option_keys)}: no kernel backend "
                f"reads all of them; known, by backend: {known}"
            )
        reasons = list(import_errors)
        for backend in knowing:
            why = backend.auto(spec, mods)
            if why is None:
                return backend
            reasons.append(f"{backend.name}: {why}")
        raise BackendUnavailable(
            "no flexjax kernel backend can run this call: " + "; ".join(reasons)
        )
    if name not in registry:
        raise ValueError(
            f"kernel_options['BACKEND']={name!r} is not a kernel backend; "
            f"known: {['AUTO', *registry]}" + "".join(f"; {why}" for why in import_errors)
        )
    why = registry[name].supports(spec, mods)
    if why is not None:
        raise BackendUnavailable(
            f"kernel_options['BACKEND']={name!r} cannot run this call: {why}. "
            "Use BACKEND='AUTO' to let flexjax choose."
        )
    return registry[name]


def default_interpret() -> bool:
    """Interpret mode whenever JAX has no GPU, so CPU tests run the real kernel code."""
    return not has_gpu()


def xla_asks_determinism() -> bool:
    """Whether XLA_FLAGS asks XLA for deterministic GPU ops (`--xla_gpu_deterministic_ops`
    or `--xla_gpu_exclude_nondeterministic_ops`, =true or bare): the default of
    kernel_options["deterministic"]."""
    for flag in os.environ.get("XLA_FLAGS", "").split():
        name, _, value = flag.partition("=")
        if name in _XLA_DETERMINISM_FLAGS and value.lower() in ("", "true", "1"):
            return True
    return False


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """kernel_options, parsed once: the generic keys typed, the backend's kept for it."""

    backend: str = "AUTO"
    autotune: bool = False
    decode: bool | None = None
    deterministic: bool = False
    deterministic_given: bool = False  # said in kernel_options (not XLA_FLAGS' default)
    interpret: bool = False
    backend_options: tuple = ()  # sorted (key, value) pairs for the chosen backend

    @classmethod
    def parse(cls, kernel_options: dict | None) -> KernelOptions:
        options = dict(kernel_options or {})
        if not all(isinstance(k, str) for k in options):
            raise TypeError(f"kernel_options keys must be strings, got {list(options)}")
        backend = options.pop("BACKEND", "AUTO")
        if not isinstance(backend, str):
            raise TypeError(f"kernel_options['BACKEND'] must be a string, got {backend!r}")
        autotune = options.pop("autotune", False)
        if not isinstance(autotune, bool):
            raise ValueError(f"kernel_options['autotune'] must be True or False, got {autotune!r}")
        decode = options.pop("decode", None)
        if decode is not None and not isinstance(decode, bool):
            raise ValueError(
                f"kernel_options['decode'] must be True, False or None, got {decode!r}"
            )
        deterministic = options.pop("deterministic", None)
        if deterministic is not None and not isinstance(deterministic, bool):
            raise ValueError(
                "kernel_options['deterministic'] must be True, False or None (XLA_FLAGS "
                f"decides), got {deterministic!r}"
            )
        given = deterministic is not None
        deterministic = xla_asks_determinism() if deterministic is None else deterministic
        interpret = options.pop("interpret", None)
        if interpret is not None and not isinstance(interpret, bool):
            raise ValueError(
                f"kernel_options['interpret'] must be True, False or None, got {interpret!r}"
            )
        interpret = default_interpret() if interpret is None else interpret
        return cls(
            backend=backend.upper(),
            autotune=autotune,
            decode=decode,
            deterministic=deterministic,
            deterministic_given=given,
            interpret=interpret,
            backend_options=tuple(sorted(options.items())),
        )

    def for_backend(self, backend: Backend) -> dict:
        """The backend's options, after checking every key is one it (or dispatch) knows;
        when deterministic, with the backend's `deterministic_options`: an option the call
        gives that contradicts them raises when the call asked for determinism, and wins
        over XLA_FLAGS' process-wide default (the call's word is the more specific)."""
        options = dict(self.backend_options)
        unknown = sorted(set(options) - set(backend.option_keys))
        if unknown:
            known = [*GENERIC_OPTION_KEYS, *backend.option_keys]
            raise ValueError(
                f"kernel_options has unknown keys {unknown} for the {backend.name} backend; "
                f"known: {known}"
            )
        if self.deterministic:
            for key, value in backend.deterministic_options.items():
                if options.setdefault(key, value) != value and self.deterministic_given:
                    raise ValueError(
                        f"kernel_options {key}={options[key]!r} is not deterministic on the "
                        f"{backend.name} backend, and kernel_options['deterministic']=True "
                        "(given, or set by torch_bridge under "
                        f"torch.use_deterministic_algorithms) asks for it: give {key}="
                        f"{value!r}, or deterministic=False"
                    )
        return options


def uses_decode(spec: KernelSpec, want: bool | None) -> bool:
    """Whether the call runs a decode kernel: short queries within the first q block.

    want: kernel_options["decode"] (None automatic, False never, True required).
    """
    fits = spec.L < DECODE_MAX_Q_LEN and spec.L <= spec.q_block_size and not spec.q_map_len
    fits = fits and not spec.kv_map_len and spec.layout is Layout.BHSD
    if want and not fits:
        raise ValueError(
            "kernel_options['decode']=True needs a query shorter than "
            f"{DECODE_MAX_Q_LEN} rows within the BlockMask's first q block "
            f"(Q_LEN={spec.L}, q BLOCK_SIZE={spec.q_block_size})"
        )
    return fits and want is not False


# ---------------------------------------------------------------------------- retraces

_TRACES: collections.Counter = collections.Counter()


def kernel_traced(backend: str, kernel: str) -> None:
    """Called by a kernel launcher each time JAX traces it (not on a cache hit)."""
    _TRACES[backend, kernel] += 1


def trace_count(kernel: str, backend: str | None = None) -> int:
    """How often `kernel` ("fwd", "dq", "dkdv", "decode") was traced, by any or one backend."""
    return sum(n for (b, k), n in _TRACES.items() if k == kernel and backend in (None, b))


# ---------------------------------------------------------------------------- entry point


def attention(q, k, v, tables: BlockTables, mods: Mods, spec: KernelSpec,
              options: KernelOptions, offsets=None):  # fmt: skip
    """(out, lse) of one call, differentiable: select the backend, configure, run.

    q, k, v in spec.layout's order; tables, mods as in `spec`. offsets: the
    int32[4] (b0, h0, q0, kv0) of a shard or chunk (`spec.index_offsets`), or
    None for a whole call (all zero: the kernels are built without them);
    int32[4 + R (+ C)] when spec.q_map_len (kv_map_len): `spec.q_block_offsets`.
    """
    from pallas_kernels import autotune, partition, vjp  # they call back into backends

    mapped = (spec.R if spec.q_map_len else 0) + (spec.C if spec.kv_map_len else 0)
    if mapped and offsets is None:
        raise ValueError("spec.q_map_len / kv_map_len need offsets with the block maps")
    if offsets is not None:
        n = 4 + mapped
        if getattr(offsets, "shape", None) != (n,) or offsets.dtype != jax.numpy.int32:
            what = "(b0, h0, q0, kv0) from spec.index_offsets"
            if mapped:
                what = "(b0, h0, q0, kv0, first row of each mapped block) from spec.q_block_offsets"
            raise ValueError(
                f"offsets must be an int32[{n}] array {what}, "
                f"got {getattr(offsets, 'dtype', type(offsets).__name__)}"
                f"{list(getattr(offsets, 'shape', []))}"
            )
        spec = dataclasses.replace(spec, global_offsets=True)
    given = [key for key, _ in options.backend_options]
    partitioned = offsets is None and partition.use_auto_partitioning()
    # Under custom_partitioning each shard's kernels take index offsets: choose for that.
    chosen_for = dataclasses.replace(spec, global_offsets=True) if partitioned else spec
    backend = select_backend(options.backend, chosen_for, mods, given)
    backend_options = options.for_backend(backend)
    if options.backend == "AUTO":
        chosen = backend.auto_options(chosen_for, mods)
        if not set(chosen) <= set(backend.option_keys):
            raise ValueError(
                f"the {backend.name} backend's auto_options gave keys it does not read: "
                f"{sorted(set(chosen) - set(backend.option_keys))} (a bug in that backend)"
            )
        backend_options = {**chosen, **backend_options}
    decode = uses_decode(spec, options.decode)
    if options.autotune:
        cfgs = autotune.tune(backend, spec, mods, q, k, v, tables, offsets, backend_options, decode)
    else:
        cfgs = backend.configs(spec, mods, backend_options, decode)
    auto = tuple(sorted(backend_options.items())) if partitioned else None
    attend = vjp.attention_fn(backend, spec, mods.programs, cfgs, auto)
    args = (q, k, v, tables, tuple(mods.score_consts), tuple(mods.mask_consts), offsets)
    # Inside shard_map: every operand varies like the others, so autodiff sums the
    # gradients of replicated ones (vma.py).
    return attend(*cast_varying(args, varying_axes(args)))
