"""PTv3 encoder forward cost: the small variant at about 50 k and 500 k voxels.

The voxels are those of a back-projected synthetic room (:func:`bench.gridsample_numpy.
synthetic_cloud`), grid-sampled at the grid size that gives the wanted count (surface voxels
scale as ``1 / g²``). The reference measured in the same run is linear scaling from the 50 k
case: ``ratio = t(500 k) / (t(50 k) · 500 k / 50 k)`` (1 = linear; patch attention and the
sparse convolution are linear in the voxel count, so much above 1 means something is not).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch

from bench.gridsample_numpy import synthetic_cloud
from vggt4d.gridsample import group, sample_train
from vggt4d.ptv3.model import VARIANTS, PTv3Encoder


def _rss(field: str) -> int:
    row = next(r for r in Path("/proc/self/status").read_text().splitlines()
               if r.startswith(field))
    return int(row.split()[1]) * 1024


def voxels_near(coord: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One train-mode point per voxel, ``(coord, grid_coord)``, at a grid size giving about
    ``target`` voxels, and that grid size."""
    grid_size = 0.02
    voxels = group(coord, grid_size)
    for _ in range(6):
        if abs(len(voxels.keys) - target) < 0.02 * target:
            break
        grid_size *= math.sqrt(len(voxels.keys) / target)
        voxels = group(coord, grid_size)
    chosen = sample_train(voxels, torch.Generator().manual_seed(0))
    return coord[chosen], voxels.grid_coord, grid_size


def encoder_forward(sizes: tuple[int, ...] = (50_000, 500_000), repeats: int = 3) -> dict:
    """Median forward seconds per voxel count, and the memory the first (warm-up) forward
    adds beyond what is resident before it (peak RSS on CPU, peak allocation on CUDA)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    encoder = PTv3Encoder(VARIANTS["small"]).to(device).eval()
    cloud = torch.from_numpy(synthetic_cloud(8_000_000))
    cases = {}
    for target in sizes:
        coord, grid_coord, grid_size = voxels_near(cloud, target)
        coord = coord - coord.mean(dim=0)
        feat = torch.cat([coord, torch.full_like(coord, 0.5), torch.zeros_like(coord)], dim=1)
        inputs = [t.to(device) for t in (coord, grid_coord, feat)]
        seconds, peak = [], 0
        for repeat in range(repeats + 1):  # the first run warms up and is not timed
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            else:
                Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS
                before = _rss("VmRSS")
            start = time.perf_counter()
            with torch.inference_mode():
                encoder(*inputs, generator=torch.Generator().manual_seed(0))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            extra = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                     else _rss("VmHWM")) - before
            if repeat:
                seconds.append(elapsed)
            else:  # the allocator keeps freed pages: only the first run shows the growth
                peak = extra
        cases[str(target)] = {"voxels": len(coord), "grid_size_m": round(grid_size, 5),
                              "seconds": [round(s, 3) for s in seconds],
                              "median_s": round(statistics.median(seconds), 3),
                              "extra_peak_bytes": peak,
                              "us_per_voxel": round(1e6 * statistics.median(seconds)
                                                    / len(coord), 2)}
    small, large = (cases[str(s)] for s in (sizes[0], sizes[-1]))
    ratio = large["median_s"] / (small["median_s"] * large["voxels"] / small["voxels"])
    return {"setup": f"PTv3 small (random weights, {sum(p.numel() for p in encoder.parameters())}"
                     f" parameters), fp32 inference on {device.type}, voxels of a "
                     f"back-projected synthetic room; 1 warm-up + {repeats} timed runs",
            "cases": cases, "ratio": round(ratio, 3),
            "reference": "linear scaling from the smallest case (ratio 1 = linear)"}
