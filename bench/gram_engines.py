"""Gram statistics engines on synthetic Q/K at DA3-giant width (24 heads × 64, 1296 patches).

Each case runs in its own process so its peak memory can be read cleanly: the peak RSS counter is
reset after the inputs exist, and the extra peak is what the engine itself added.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from vggt4d.config.gram import GramConfig
from vggt4d.gram import (
    config_windows,
    dense_statistics,
    group_heads,
    layer_statistics,
    similarity_factor,
)

HEADS, HEAD_DIM, PATCHES = 24, 64, 1296
PAIRS = (("q", "q"), ("k", "k"), ("q", "k"))


def _status(field: str) -> int:
    line = next(row for row in Path("/proc/self/status").read_text().splitlines()
                if row.startswith(field))
    return int(line.split()[1]) * 1024


def run_case(engine: str, frames: int) -> dict[str, float]:
    """Time and extra peak memory of one engine on one layer, all three pairs, window ``all``."""
    generator = torch.Generator().manual_seed(frames)
    vectors = {name: torch.randn(frames, HEADS, PATCHES, HEAD_DIM, generator=generator)
               for name in ("q", "k")}
    spec = GramConfig(engine="chunked" if engine == "chunked" else "moments")
    windows = config_windows(spec, frames, True)
    factor = similarity_factor(HEADS, HEAD_DIM, scale=spec.scale, heads=spec.heads)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    start = time.perf_counter()
    if engine == "dense":
        grouped = {name: group_heads(value, "mean") for name, value in vectors.items()}
        results = [dense_statistics(grouped[x], grouped[y], windows, factor=factor,
                                    variance="pairs") for x, y in PAIRS]
    else:
        stats = layer_statistics(vectors["q"], vectors["k"], windows, factor=factor,
                                 pairs=spec.pairs, heads=spec.heads, variance=spec.variance,
                                 engine=spec.engine)
        results = [stats[x + y] for x, y in PAIRS]
    seconds = time.perf_counter() - start
    checksum = [float(r[1].double().mean()) for r in results]
    return {"seconds": seconds, "extra_peak_bytes": _status("VmHWM") - before,
            "input_bytes": 2 * frames * HEADS * PATCHES * HEAD_DIM * 4, "checksum": checksum}


def measure(engine: str, frames: int) -> dict[str, float]:
    output = subprocess.run([sys.executable, "-m", "bench.gram_engines", engine, str(frames)],
                            capture_output=True, text=True, check=True).stdout
    return {"engine": engine, "frames": frames, **json.loads(output.splitlines()[-1])}


def benchmark() -> dict[str, object]:
    cases = [measure(engine, frames) for frames in (8, 32)
             for engine in ("moments", "chunked")]
    cases.append(measure("dense", 8))
    cases += [measure("moments", frames) for frames in (128, 256)]
    by_case = {(c["engine"], c["frames"]): c for c in cases}
    speedup = by_case[("chunked", 32)]["seconds"] / by_case[("moments", 32)]["seconds"]
    agreement = max(abs(a - b) / abs(b) for a, b in zip(by_case[("moments", 8)]["checksum"],
                                                       by_case[("dense", 8)]["checksum"],
                                                       strict=True))
    return {
        "setup": f"one layer, pairs qq/kk/qk, window all, variance pairs, heads mean, "
                 f"{HEADS} heads x {HEAD_DIM}, {PATCHES} patches per frame, fp32 CPU",
        "cases": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in c.items()
                   if k != "checksum"} for c in cases],
        "moments_vs_chunked_speedup_T32": round(speedup, 2),
        "target_speedup": ">= 5", "speedup_met": bool(speedup >= 5),
        "moments_T256_ran": ("moments", 256) in by_case,
        "moments_dense_mean_var_relative_difference_T8": agreement,
    }


if __name__ == "__main__":
    print(json.dumps(run_case(sys.argv[1], int(sys.argv[2]))))
