"""Test setup: `gpu` tests skip without a CUDA GPU; CPU tests run kernels in interpret mode."""

import os
import sys

import pytest

from pallas_kernels.runtime import has_gpu

sys.path.insert(0, os.path.dirname(__file__))  # torch_twins and other test helpers


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Every kernel backend the suites run against: a new backend joins by adding its
# kernel_options["BACKEND"] name here (tests it cannot run skip with its reason).
# MOSAIC_GPU joins on a GPU only: in interpret mode its kernel takes seconds a call,
# so the CPU suite covers it in tests/test_mosaic_gpu.py instead.
KERNEL_BACKENDS = ("TRITON", "MOSAIC_GPU") if has_gpu() else ("TRITON",)


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def flex(backend):
    """flexjax.flex_attention pinned to one kernel backend (kernel_options["BACKEND"])."""
    import flexjax
    from pallas_kernels.dispatch import BackendUnavailable

    def attend(*args, kernel_options=None, **kwargs):
        options = {"BACKEND": backend, **(kernel_options or {})}
        try:
            return flexjax.flex_attention(*args, kernel_options=options, **kwargs)
        except BackendUnavailable as e:  # e.g. a Hopper-only backend on another GPU
            pytest.skip(str(e))

    attend.backend = backend
    return attend
