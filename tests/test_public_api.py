"""Every public module imports, its __all__ names exist, and flexjax needs no torch."""

import importlib
import subprocess
import sys

import pytest

PUBLIC_MODULES = [
    "flexjax",
    "flexjax.masks",
    "flexjax.mods",
    "flexjax.examples",
    "flexjax.reference",
    "flexjax.block_mask",
    "flexjax.mask_builders",
    "flexjax.mod_utils",
    "pallas_kernels",
    "pallas_kernels.approx_math",
    "pallas_kernels.spec",
    "pallas_kernels.dispatch",
    "pallas_kernels.mod_trace",
    "pallas_kernels.mod_eval",
    "pallas_kernels.triton",
    "pallas_kernels.partition",
    "pallas_kernels.vma",
    "flexjax.sharding",
    "flexjax.parallel",
    "flexjax.jax_layout",
    "flexjax.flax_nnx",
    "pallas_kernels.mod_signature",
    "torch_bridge.hf",
]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_names_exist(name):
    module = importlib.import_module(name)
    assert module.__all__, f"{name} has an empty __all__"
    for attr in module.__all__:
        assert hasattr(module, attr), f"{name}.__all__ lists missing {attr}"


def test_flexjax_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import flexjax, flexjax.masks, flexjax.mods, flexjax.examples, flexjax.reference\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_direction():
    """pallas_kernels imports neither flexjax nor torch; flexjax never imports torch_bridge."""
    code = (
        "import sys\n"
        "import pallas_kernels.approx_math, pallas_kernels.dispatch, pallas_kernels.triton\n"
        "import pallas_kernels.vjp, pallas_kernels.autotune, pallas_kernels.partition\n"
        "assert not any(m.startswith(('flexjax', 'torch')) for m in sys.modules), sorted(sys.modules)\n"
        "import flexjax.examples\n"
        "assert not any(m.startswith('torch') for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
