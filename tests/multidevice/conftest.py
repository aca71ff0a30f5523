"""Multi-device tests: they need 4 JAX devices, which on a CPU means forced host devices.

`make test` runs this folder in its own process with
XLA_FLAGS=--xla_force_host_platform_device_count=4 (the flag must be set before JAX
starts); in a process with fewer devices these tests skip.
"""

import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # tests/helpers.py

N_DEVICES = 4


def pytest_collection_modifyitems(config, items):
    if len(jax.devices()) >= N_DEVICES:
        return
    skip = pytest.mark.skip(
        reason=f"needs {N_DEVICES} devices: XLA_FLAGS=--xla_force_host_platform_device_count=4 "
        "(make test runs this folder so)"
    )
    for item in items:
        if "multidevice" in str(item.fspath):
            item.add_marker(skip)
