"""Test setup: `gpu` tests skip without a CUDA GPU; CPU tests run kernels in interpret mode."""

import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # torch_twins and other test helpers


def has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
