"""The memory estimate bounds what a forward really takes, without being wildly pessimistic."""

from __future__ import annotations

import subprocess
import sys

import torch

from vggt4d.resources import (
    FORWARD_OVERHEAD_BYTES,
    RUNTIME_OVERHEAD_BYTES,
    estimate_forward_memory,
)

MEASURE = """
import gc, pathlib, numpy as np, torch
from vggt4d.model import build_network
from vggt4d.predict import run_forward

def status(field):
    line = next(l for l in pathlib.Path("/proc/self/status").read_text().splitlines()
                if l.startswith(field))
    return int(line.split()[1]) * 1024

net = build_network("da3-small")
frames = np.random.default_rng(0).integers(0, 255, (6, 210, 280, 3), dtype=np.uint8)
gc.collect()
pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to now
before = status("VmRSS")
run_forward(net, frames, device=torch.device("cpu"), dtype=torch.float32, progress=False)
print(status("VmHWM") - before)
"""


def test_estimate_bounds_the_measured_forward_peak():
    measured = int(subprocess.run([sys.executable, "-c", MEASURE], capture_output=True,
                                  text=True, check=True).stdout.split()[-1])
    estimate = estimate_forward_memory(num_params=34_299_463, frames=6, height=210, width=280,
                                       embed_dim=384, head_features=64, dtype=torch.float32)
    assert estimate.activations >= measured
    assert estimate.activations <= 4 * measured


def test_estimate_grows_with_frames_and_counts_weights_and_overhead():
    kwargs = {"num_params": 1000, "height": 140, "width": 140, "embed_dim": 384,
              "head_features": 64, "dtype": torch.float32}
    small, large = (estimate_forward_memory(frames=t, **kwargs) for t in (4, 8))
    assert large.activations - small.activations == small.activations - FORWARD_OVERHEAD_BYTES
    assert small.total == 4000 + small.activations + RUNTIME_OVERHEAD_BYTES
