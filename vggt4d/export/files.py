"""What every export shares: input checks, frame names, images, masks and atomic folder writes.

Inputs (all at the frames' size, as in ``prediction.npz``): ``frames`` (T, H, W, 3) uint8 RGB,
``depth`` (T, H, W) z-depth in DA3's units, ``dynamic`` (T, H, W) bool (True = moving),
``extrinsics`` (T, 3, 4) OpenCV world-to-camera ``[R | t]`` (``X_cam = R X + t``; camera x right,
y down, z forward), ``intrinsics`` (T, 3, 3) pinhole ``K`` in pixels whose pixel ``(u, v)``
covers ``[u, u + 1) × [v, v + 1)`` (centre ``(u + ½, v + ½)``: COLMAP's and nerfstudio's
convention, so ``cx, cy`` carry over unchanged).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from vggt4d.cameras import check_cameras
from vggt4d.errors import UserError
from vggt4d.io import atomic_write

IMAGES = "images"
"""Folder of the RGB frames shared by the COLMAP model and ``transforms.json``."""
MASKS = "masks"
"""Static masks for trainers of a static scene: ``masks/<image name>.png`` (COLMAP's rule),
255 = use the pixel (static), 0 = ignore it (dynamic)."""
DYNAMIC_MASKS = "dynamic_masks"
"""The dynamic masks themselves, ``dynamic_masks/<image name>``: 255 = dynamic, 0 = static."""


def check_clip(frames: np.ndarray, extrinsics: np.ndarray, intrinsics: np.ndarray,
               **per_pixel: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Raise :class:`UserError` unless ``frames`` is (T, H, W, 3) uint8, the cameras are
    (T, 3, 4) / (T, 3, 3) and every array of ``per_pixel`` (None = absent) is (T, H, W);
    returns the cameras as float64 (``extrinsics``, ``intrinsics``)."""
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise UserError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    k_mats, w2c = check_cameras(intrinsics, extrinsics, len(frames))
    for name, array in per_pixel.items():
        if array is not None and array.shape != frames.shape[:3]:
            raise UserError(f"{name} must have the frames' shape {frames.shape[:3]}, "
                            f"got {array.shape}")
    return w2c, k_mats


def frame_names(count: int, suffix: str = ".png") -> list[str]:
    """``frame_0000.png`` … (at least four digits, zero-padded so names sort in frame order)."""
    width = max(4, len(str(count - 1)))
    return [f"frame_{t:0{width}d}{suffix}" for t in range(count)]


def mask_name(image_name: str) -> str:
    """COLMAP's mask file for an image: the image's full name plus ``.png``
    (``frame_0000.png`` → ``frame_0000.png.png``)."""
    return f"{image_name}.png"


def write_png(path: Path, image: np.ndarray) -> None:
    """A (H, W, 3) uint8 RGB, (H, W) uint8 or (H, W) uint16 array as a PNG, atomically."""
    picture = Image.fromarray(image)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def write_mask(path: Path, mask: np.ndarray) -> None:
    """A (H, W) bool mask as a 0/255 greyscale PNG (255 = True), atomically."""
    write_png(path, np.where(mask, 255, 0).astype(np.uint8))


def write_images(folder: Path, frames: np.ndarray, names: list[str]) -> None:
    """``folder/<name>`` RGB PNG of every frame."""
    for frame, name in zip(frames, names, strict=True):
        write_png(folder / name, frame)


def write_trainer_masks(root: Path, dynamic: np.ndarray, names: list[str]) -> None:
    """The masks trainers read beside ``images/``: ``masks/<name>.png`` with the dynamic pixels
    at 0 (ignored) and the static ones at 255, and ``dynamic_masks/<name>`` (255 = dynamic)."""
    for mask, name in zip(dynamic, names, strict=True):
        write_mask(root / MASKS / mask_name(name), ~mask)
        write_mask(root / DYNAMIC_MASKS / name, mask)


def shared_intrinsics(intrinsics: np.ndarray) -> bool:
    """True when every frame has exactly the same ``K`` (one camera serves the whole clip)."""
    return bool((intrinsics == intrinsics[:1]).all())


def write_folder_files(folder: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_dir)`` on an empty temporary folder beside ``folder``, then move each
    file it wrote into ``folder`` with an atomic rename (no file is ever half-written)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        write(tmp)
        for source in sorted(tmp.iterdir()):
            os.replace(source, folder / source.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
