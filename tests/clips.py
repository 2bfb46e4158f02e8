"""Small image folders for the tests that run ``python -m vggt4d.run data=images``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_noise_frames(folder: Path, count: int, height: int, width: int, seed: int = 0) -> Path:
    """Write ``count`` uniform-noise RGB frames ``f0.png`` … into a new ``folder``; returns it."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for index in range(count):
        noise = (rng.random((height, width, 3)) * 255).astype(np.uint8)
        Image.fromarray(noise).save(folder / f"f{index}.png")
    return folder
