"""What every dataset reader shares: the :class:`Sequence` it returns, frame selection, image reads.

Conventions of a :class:`Sequence` (those of :mod:`vggt4d.synthetic` and DA3's outputs):

* ``frames`` (T, H, W, 3) uint8 RGB at the dataset's own resolution, never resized.
* ``depth`` (T, H, W) float32 z-depth in metres; **NaN marks pixels without a measurement**
  (the datasets' 0 = missing). NaN rather than 0 so that a statistic taken by mistake over
  invalid pixels shows up as NaN instead of silently pulling towards 0;
  :func:`vggt4d.geometry_metrics.depth_metrics` scores only finite, positive ground truth.
* ``dynamic_masks`` / ``void_masks`` (T, H, W) bool: moving foreground, and pixels the dataset
  excludes from scoring (DAVIS's label 255).
* ``extrinsics`` (T, 3, 4) float64 world-to-camera ``[R | t]`` with OpenCV camera axes
  (x right, y down, z forward): ``X_cam = R X + t``.
* ``intrinsics`` (T, 3, 3) float64 pinhole K in pixels of the returned frames, with pixel
  ``(u, v)`` (column, row) the ray through the continuous point ``(u + 0.5, v + 0.5)``. The
  datasets' calibrations put pixel centres at integer coordinates (OpenCV's convention: Sintel's
  principal point is (W − 1)/2), so their ``cx`` and ``cy`` gain 0.5.
* A kind of ground truth the dataset (or the chosen options) does not provide is ``None``.

Frame selection (:func:`select_indices`) is Python slicing of the sequence's frame list,
``frames[start:stop:stride][:max_frames]``: the protocols' "frames 30–139" is ``start=30,
stop=140`` and "every 3rd frame, first 90" is ``stride=3, max_frames=90``. Only the selected
files are read.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vggt4d.errors import UserError


@dataclass
class Sequence:
    """One sequence of a benchmark dataset in the framework's conventions (module docstring)."""

    dataset: str  # registry name: davis2016, davis2017, sintel, tum, bonn, kitti
    name: str  # sequence name as the dataset spells it
    source: Path  # the sequence's folder (DAVIS: its JPEGImages folder)
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    frame_names: list[str]  # (T,) file stems of the frames, e.g. "00000", "frame_0001"
    frame_indices: np.ndarray  # (T,) int64 positions in the list the selection slices
    depth: np.ndarray | None = None  # (T, H, W) float32 metres, NaN = no measurement
    dynamic_masks: np.ndarray | None = None  # (T, H, W) bool
    void_masks: np.ndarray | None = None  # (T, H, W) bool
    extrinsics: np.ndarray | None = None  # (T, 3, 4) float64 world-to-camera, OpenCV axes
    intrinsics: np.ndarray | None = None  # (T, 3, 3) float64, pixel centres at +0.5
    timestamps: np.ndarray | None = None  # (T,) float64 seconds (TUM, Bonn)


def select_indices(count: int, start: int = 0, stop: int | None = None, stride: int = 1,
                   max_frames: int | None = None, *, what: str = "the sequence") -> np.ndarray:
    """Indices ``range(count)[start:stop:stride][:max_frames]`` as int64, refusing bad values
    and an empty selection with one line."""
    if start < 0 or (stop is not None and stop < 0):
        raise UserError(f"frame selection start={start}, stop={stop}: must be >= 0")
    if stride < 1:
        raise UserError(f"frame selection stride={stride}: must be >= 1")
    if max_frames is not None and max_frames < 1:
        raise UserError(f"frame selection max_frames={max_frames}: must be >= 1 or null")
    indices = np.arange(count, dtype=np.int64)[start:stop:stride][:max_frames]
    if len(indices) == 0:
        raise UserError(f"frame selection start={start}, stop={stop}, stride={stride} picks no "
                        f"frame of {what} ({count} frames)")
    return indices


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else one line naming it."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    return path


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a directory, else one line naming it."""
    if not path.is_dir():
        raise UserError(f"{what} not found: {path}")
    return path


def open_image(path: Path) -> Image.Image:
    """Open and decode an image file fully; a missing or undecodable file is one line."""
    require_file(path, "image")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"cannot read image {path}: {err}") from None


def read_rgb(paths: Seq[Path]) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 RGB; all must share the first frame's size."""
    frames = [np.asarray(open_image(path).convert("RGB")) for path in paths]
    check_sizes(frames, paths, frames[0].shape[:2], "frame")
    return np.stack(frames)


def check_sizes(arrays: Seq[np.ndarray], paths: Seq[Path], size: tuple[int, ...],
                what: str) -> None:
    """Refuse the first array whose (H, W) differs from ``size`` (the frames' size)."""
    for array, path in zip(arrays, paths, strict=True):
        if array.shape[:2] != size:
            raise UserError(f"{path}: {what} is {array.shape[1]}x{array.shape[0]}, the frames "
                            f"are {size[1]}x{size[0]}")


def read_depth_png(path: Path, scale: float) -> np.ndarray:
    """A 16-bit depth PNG as (H, W) float32 metres: ``value / scale``, 0 → NaN."""
    image = open_image(path)
    if image.mode not in ("I;16", "I;16B", "I"):
        raise UserError(f"{path}: depth PNG has mode {image.mode}, expected 16-bit greyscale")
    raw = np.asarray(image)
    if raw.min() < 0 or raw.max() > 65535:
        raise UserError(f"{path}: depth values outside the 16-bit range")
    depth = raw.astype(np.float32) / np.float32(scale)
    depth[raw == 0] = np.nan
    return depth


def pixel_centre_intrinsics(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """K (3, 3) float64 in the framework's convention from a calibration whose pixel centres
    are at integer coordinates (``cx + 0.5``, ``cy + 0.5``)."""
    return np.array([[fx, 0.0, cx + 0.5], [0.0, fy, cy + 0.5], [0.0, 0.0, 1.0]])


def repeat_intrinsics(k_mat: np.ndarray, count: int) -> np.ndarray:
    """One K (3, 3) for every frame: (T, 3, 3) float64."""
    return np.repeat(np.asarray(k_mat, dtype=np.float64)[None], count, axis=0)
