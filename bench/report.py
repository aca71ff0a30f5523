"""What every benchmark writes beside its numbers: the card, versions, date and command, and the files.

Shared by the bench scripts so a result file always says where and how it was
measured, in the same words.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def meta_info(scale: str, gpu: bool) -> dict:
    """Card, driver, jax / torch / triton versions, date, scale and the command line that ran."""
    import jax
    import torch

    driver = "-"
    if gpu:
        q = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        lines = subprocess.run(q, capture_output=True, text=True).stdout.split()
        driver = lines[0] if lines else "-"  # one line per GPU; a host's GPUs share a driver
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    script = "bench/" + os.path.basename(sys.argv[0])
    return dict(
        gpu=torch.cuda.get_device_name() if gpu else "CPU (interpret mode)",
        driver=driver, jax=jax.__version__, torch=torch.__version__, triton=triton_version,
        date=time.strftime("%Y-%m-%d"), scale=scale, command=" ".join([script, *sys.argv[1:]]),
    )  # fmt: skip


def write_report(out: str | None, text: str, payload: dict) -> None:
    """Print the markdown `text`; with a path prefix `out`, also write it as .md and `payload` as .json."""
    print(text)
    if out:
        with open(out + ".md", "w") as fh:
            fh.write(text)
        with open(out + ".json", "w") as fh:
            json.dump(payload, fh, indent=2)
