"""``make bench``: speed figures, each with its reference measured in the same run.

Results go to ``bench/results/<benchmark>.json`` with the machine, package versions, timings and
the ratio to the reference, and a summary is printed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch

from vggt4d.frames import processing_size, resize_frames
from vggt4d.io import atomic_write
from vggt4d.model import build_network
from vggt4d.predict import run_forward
from vggt4d.synthetic import SyntheticConfig, render_scene

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, object]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    return {
        "cpu": cpu, "cores": torch.get_num_threads(), "gpu": torch.cuda.get_device_name()
        if torch.cuda.is_available() else None, "python": platform.python_version(),
        "torch": torch.__version__, "numpy": version("numpy"),
        "depth_anything_3": version("depth-anything-3"),
    }


def write_result(name: str, result: dict[str, object]) -> None:
    record = {"benchmark": name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), **result}

    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(record, indent=2) + "\n")

    atomic_write(RESULTS / f"{name}.json", write)
    print(json.dumps(record, indent=2))


def hook_overhead(frames: int = 8, size: int = 280, repeats: int = 5) -> None:
    """Hooked DA3 forward (no-op Q/K consumer on every block) / plain forward, da3-small,
    8 frames at 280 px; plain and hooked runs interleaved, medians compared. Target ≤ 1.05."""
    scene = render_scene(SyntheticConfig(num_frames=frames))
    clip = resize_frames(scene.frames, processing_size(*scene.frames.shape[1:3], size))
    torch.manual_seed(0)
    net = build_network("da3-small")
    cpu = torch.device("cpu")

    def timed(consumer) -> float:
        start = time.perf_counter()
        run_forward(net, clip, device=cpu, dtype=torch.float32, on_qk=consumer, progress=False)
        return time.perf_counter() - start

    def no_op(_capture) -> None:
        return None

    timed(None), timed(no_op)  # warm-up
    plain, hooked = [], []
    for _ in range(repeats):
        plain.append(timed(None))
        hooked.append(timed(no_op))
    ratio = statistics.median(hooked) / statistics.median(plain)
    write_result("hook_overhead", {
        "setup": f"da3-small random weights, {frames} frames {clip.shape[2]}x{clip.shape[1]}, "
                 f"fp32 CPU, {repeats} interleaved repeats",
        "plain_s": [round(t, 4) for t in plain], "hooked_s": [round(t, 4) for t in hooked],
        "median_plain_s": round(statistics.median(plain), 4),
        "median_hooked_s": round(statistics.median(hooked), 4),
        "ratio": round(ratio, 4), "target": "<= 1.05", "met": bool(ratio <= 1.05),
        "grid": [clip.shape[1] // 14, clip.shape[2] // 14],
    })


def gram_engines() -> None:
    """Closed-form vs streamed Gram statistics; see :mod:`bench.gram_engines`."""
    from bench.gram_engines import benchmark

    write_result("gram_engines", benchmark())


SWEEP = ["bands.middle=[1,3],[1,2],[2,3],[2,4]", "bands.deep=[5,5],[4,5]"]


def band_sweep(repeats: int = 3) -> None:
    """Wall time of an 8-point band sweep / one run (da3-small, random weights, the default
    synthetic scene and pipeline, W&B offline), each from a cold cache, interleaved ``repeats``
    times; medians compared (single pairs vary by ±10 % on a busy 2-core machine). ≤ 1.5."""
    ones, sweeps, forwards = [], [], []
    for _ in range(repeats):
        one, sweep, count = _one_run_and_sweep()
        ones.append(one)
        sweeps.append(sweep)
        forwards.append(count)
    ratio = statistics.median(sweeps) / statistics.median(ones)
    write_result("band_sweep", {
        "setup": "python -m vggt4d.run model=da3-small model.weights=random latent.encoder=tiny "
                 "latent.weights=random (12 frames 504x378, full default pipeline incl. "
                 "pictures, videos, scene tokens and offline W&B), cold caches",
        "sweep": SWEEP, "one_run_s": [round(t, 2) for t in ones],
        "sweep_8_jobs_s": [round(t, 2) for t in sweeps], "da3_forwards_per_sweep": forwards,
        "ratio_of_medians": round(ratio, 3), "target": "<= 1.5", "met": bool(ratio <= 1.5),
        "rerun_everything_would_be": "about 8",
    })


def _one_run_and_sweep() -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        env = {**os.environ, "HF_HUB_OFFLINE": "1",
               **{name: str(root / "wandb") for name in
                  ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")}}
        model = ["model=da3-small", "model.weights=random", "latent.encoder=tiny",
                 "latent.weights=random"]

        def timed(*arguments: str) -> float:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "vggt4d.run", *arguments], env=env,
                           check=True, capture_output=True)
            return time.perf_counter() - start

        one = timed(*model, f"cache_dir={root / 'one_cache'}", f"hydra.run.dir={root / 'one'}")
        sweep = timed("-m", *model, *SWEEP, f"cache_dir={root / 'sweep_cache'}",
                      f"hydra.sweep.dir={root / 'sweep'}")
        forwards = len([p for p in (root / "sweep_cache" / "predict").iterdir() if p.is_dir()])
    return one, sweep, forwards


def gridsample(points: int = 8_000_000, grid_size: float = 0.02, repeats: int = 9) -> None:
    """Pointcept GridSample, train mode with inverse (voxelise, hash, group, pick one point per
    voxel, inverse map), :mod:`vggt4d.gridsample` in torch on the CPU vs the NumPy reference
    :mod:`bench.gridsample_numpy`, on 8 M back-projected points at 2 cm, both hash types; one
    untimed run each (which also checks the two agree), then ``repeats`` interleaved timed runs,
    medians compared. ratio = numpy / torch, target ≥ 5 for each hash type. The torch sorting
    path (:func:`vggt4d.gridsample.group_sorted`, what :func:`~vggt4d.gridsample.group` falls
    back to for sparse boxes) is timed alongside for reference."""
    import numpy as np

    from bench.gridsample_numpy import grid_sample_train, synthetic_cloud
    from vggt4d.gridsample import group, group_sorted, sample_train

    cloud = synthetic_cloud(points)
    coord = torch.from_numpy(cloud)
    load_before = os.getloadavg()[0]  # other work on this 2-core machine skews the figures

    def status(field: str) -> int:
        row = next(r for r in Path("/proc/self/status").read_text().splitlines()
                   if r.startswith(field))
        return int(row.split()[1]) * 1024

    def run(side: str, hash_type: str, seed: int) -> tuple[float, int, object]:
        """Seconds, extra peak RSS over the inputs, and the result of one run."""
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS counter
        before = status("VmRSS")
        start = time.perf_counter()
        if side in ("torch", "torch_sorted"):
            voxels = (group if side == "torch" else group_sorted)(coord, grid_size, hash_type)
            result = voxels, sample_train(voxels, torch.Generator().manual_seed(seed))
        else:
            result = grid_sample_train(cloud, grid_size, hash_type, np.random.RandomState(seed))
        return time.perf_counter() - start, status("VmHWM") - before, result

    cases = {}
    for hash_type in ("fnv", "ravel"):
        _, _, (voxels, picks) = run("torch", hash_type, 0)
        _, _, ref = run("numpy", hash_type, 0)
        everyone = np.arange(len(ref["keys"]))
        agree = {
            "keys": bool(np.array_equal(voxels.keys.numpy().view(np.uint64), ref["keys"])),
            "counts": bool(np.array_equal(voxels.counts.numpy(), ref["count"])),
            "inverse": bool(np.array_equal(voxels.inverse.numpy(), ref["inverse"])),
            "voxel_grid_coord": bool(np.array_equal(voxels.grid_coord.numpy(),
                                                    ref["grid_coord"])),
            "min_coord": bool(np.array_equal(voxels.min_coord.numpy(),
                                             ref["min_coord"].astype(np.float32))),
            "torch_picks_in_their_voxels": bool(np.array_equal(ref["inverse"][picks.numpy()],
                                                               everyone)),
            "numpy_picks_in_their_voxels": bool(np.array_equal(
                voxels.inverse.numpy()[ref["idx_unique"]], everyone)),
        }
        assert all(agree.values()), f"torch and NumPy grid samples differ ({hash_type}): {agree}"
        shape = {"voxels": len(ref["keys"]), "max_points_per_voxel": int(ref["count"].max()),
                 "cells_per_axis": (voxels.grid_coord.amax(0) + 1).tolist()}
        del voxels, picks, ref
        timings = {"torch": [], "numpy": [], "torch_sorted": []}
        peaks = dict.fromkeys(timings, 0)
        for repeat in range(repeats):
            for side in timings:
                seconds, peak, _ = run(side, hash_type, repeat + 1)
                timings[side].append(seconds)
                peaks[side] = max(peaks[side], peak)
        medians = {side: statistics.median(t) for side, t in timings.items()}
        ratio = medians["numpy"] / medians["torch"]
        cases[hash_type] = {
            **shape, "identical": agree,
            "torch_s": [round(t, 3) for t in timings["torch"]],
            "numpy_s": [round(t, 3) for t in timings["numpy"]],
            "median_torch_s": round(medians["torch"], 3),
            "median_numpy_s": round(medians["numpy"], 3), "ratio": round(ratio, 2),
            "ratio_of_minima": round(min(timings["numpy"]) / min(timings["torch"]), 2),
            "torch_sorted_s": [round(t, 3) for t in timings["torch_sorted"]],
            "median_torch_sorted_s": round(medians["torch_sorted"], 3),
            "torch_extra_peak_bytes": peaks["torch"], "numpy_extra_peak_bytes": peaks["numpy"],
        }
    ratio = min(case["ratio"] for case in cases.values())
    write_result("gridsample", {
        "setup": f"{points} float32 points (8 back-projected 1000-px depth frames of a furnished "
                 f"6x5x3 m room, depth noise 1.5 mm at 1 m), grid {grid_size} m, train mode with "
                 f"inverse; torch CPU ({torch.get_num_threads()} threads) vs NumPy reference; "
                 f"1 untimed run each, then {repeats} interleaved repeats",
        "cases": cases, "input_bytes": cloud.nbytes, "ratio": ratio,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),  # torch huge pages
        "target": ">= 5 (numpy / torch, each hash type)", "met": bool(ratio >= 5),
    })


def encoder() -> None:
    """PTv3 small forward at about 50 k and 500 k voxels (:mod:`bench.encoder`); ratio = time at
    500 k over linear scaling from 50 k."""
    from bench.encoder import encoder_forward

    write_result("encoder", encoder_forward())


def long_video() -> None:
    """Chunked pipeline at 64, 256 and 1,024 frames (:mod:`bench.long_video`): peak memory and
    time per frame, ratios to the 64-frame case."""
    from bench.long_video import benchmark

    write_result("long_video", benchmark())


def cache_restore() -> None:
    """Restoring and storing a cached forward as verified copies vs hard links
    (:mod:`bench.cache_restore`)."""
    from bench.cache_restore import benchmark

    write_result("cache_restore", benchmark())


BENCHMARKS = {"hook": hook_overhead, "gram": gram_engines, "sweep": band_sweep,
              "gridsample": gridsample, "encoder": encoder, "cache": cache_restore,
              "long_video": long_video}


def main() -> None:
    chosen = sys.argv[1:] or list(BENCHMARKS)
    for name in chosen:
        BENCHMARKS[name]()


if __name__ == "__main__":
    main()
