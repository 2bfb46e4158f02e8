"""KITTI depth (the depth-prediction benchmark's annotated maps) with the matching raw images.

Layout (``data_depth_annotated.zip`` and the raw ``<date>_drive_<nnnn>_sync.zip`` /
``<date>_calib.zip`` unpacked into one root)::

    <split>/<drive>/proj_depth/groundtruth/image_02/0000000005.png   (split: val or train)
    <date>/<drive>/image_02/data/0000000005.png                      (raw frames, same name)
    <date>/calib_cam_to_cam.txt                                      (optional)

with ``<drive>`` like ``2011_09_26_drive_0002_sync`` and ``<date>`` its first ten characters.
Depth maps are 16-bit PNGs, metres = value / 256, 0 = no LiDAR point (the devkit's
``depth_read``); the annotated drives have no map for their first and last five frames, so the
sequence is the list of depth maps (MonST3R's protocol: the first 110 of them), each with the raw
frame of the same name. ``calib_cam_to_cam.txt`` holds ``key: values`` lines; ``P_rect_02``
(3×4, row-major) is camera 2's rectified projection and ``S_rect_02`` its image size.

Converted: depth / 256 with 0 → NaN; intrinsics = the left 3×3 of ``P_rect_0N`` with ``cx``,
``cy`` + 0.5 (pixel centres at integers in KITTI's calibration), ``None`` when the calibration
file is absent. KITTI depth has no camera poses here (the raw drives' GPS/IMU poses are not read)
and no masks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vggt4d.datasets.common import (
    Sequence,
    check_sizes,
    read_depth_png,
    read_rgb,
    repeat_intrinsics,
    require_dir,
    require_file,
    select_indices,
)
from vggt4d.errors import UserError

DEPTH_SCALE = 256.0
CAMERAS = ("image_02", "image_03")


def read_calibration(path: Path) -> dict[str, str]:
    """``key: values`` lines of a KITTI calibration file (values as text)."""
    require_file(path, "KITTI calibration")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    entries = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, colon, values = line.partition(":")
        if not colon or not key.strip():
            raise UserError(f"{path}, line {number}: expected 'key: values', got {line.strip()!r}")
        entries[key.strip()] = values.strip()
    return entries


def calibration_values(entries: dict[str, str], key: str, count: int, path: Path) -> np.ndarray:
    """The ``count`` numbers of ``key`` as float64, or one line saying what is wrong."""
    if key not in entries:
        raise UserError(f"{path}: no {key} entry")
    try:
        values = np.array([float(value) for value in entries[key].split()])
    except ValueError:
        raise UserError(f"{path}: {key} holds a non-number: {entries[key]!r}") from None
    if len(values) != count or not np.isfinite(values).all():
        raise UserError(f"{path}: {key} needs {count} finite numbers, got {entries[key]!r}")
    return values


def camera_intrinsics(path: Path, camera: str, size: tuple[int, int]) -> np.ndarray:
    """K (3, 3) float64 of ``camera`` from ``calib_cam_to_cam.txt``, framework convention;
    ``size`` (H, W) of the frames is checked against ``S_rect_0N``."""
    entries = read_calibration(path)
    index = camera[-2:]
    projection = calibration_values(entries, f"P_rect_{index}", 12, path).reshape(3, 4)
    if f"S_rect_{index}" in entries:
        width, height = calibration_values(entries, f"S_rect_{index}", 2, path)
        if (round(height), round(width)) != size:
            raise UserError(f"{path}: S_rect_{index} is {width:g}x{height:g}, the frames are "
                            f"{size[1]}x{size[0]}")
    k_mat = projection[:, :3].copy()
    k_mat[:2, 2] += 0.5
    return k_mat


def list_sequences(root: Path | str, *, split: str = "val", camera: str = "image_02"
                   ) -> list[str]:
    """Drives of ``<split>`` that have annotated depth for ``camera``, sorted."""
    base = require_dir(Path(root).expanduser() / split, f"KITTI {split} depth folder")
    return sorted(path.parents[2].name
                  for path in base.glob(f"*/proj_depth/groundtruth/{_check_camera(camera)}"))


def _check_camera(camera: str) -> str:
    if camera not in CAMERAS:
        raise UserError(f"KITTI camera={camera!r}: choose one of {', '.join(CAMERAS)}")
    return camera


def read_sequence(root: Path | str, name: str, *, start: int = 0, stop: int | None = None,
                  stride: int = 1, max_frames: int | None = None, split: str = "val",
                  camera: str = "image_02", raw_root: str | None = None) -> Sequence:
    """Annotated depth of drive ``name`` with its raw frames (``raw_root``: where the
    ``<date>/<drive>/`` folders are, default ``root``) and intrinsics when calibrated."""
    root = Path(root).expanduser()
    depth_dir = root / split / name / "proj_depth" / "groundtruth" / _check_camera(camera)
    if not depth_dir.is_dir():
        raise UserError(f"KITTI drive {name!r} not found: no folder {depth_dir}")
    depth_paths = sorted(depth_dir.glob("*.png"))
    if not depth_paths:
        raise UserError(f"KITTI drive {name!r}: no depth maps in {depth_dir}")
    indices = select_indices(len(depth_paths), start, stop, stride, max_frames,
                             what=f"KITTI drive {name}")
    depth_paths = [depth_paths[i] for i in indices]
    date_dir = (Path(raw_root).expanduser() if raw_root else root) / name[:10]
    image_dir = require_dir(date_dir / name / camera / "data", f"raw KITTI frames of {name!r}")
    paths = [require_file(image_dir / path.name, "raw KITTI frame") for path in depth_paths]
    frames = read_rgb(paths)
    depth = [read_depth_png(path, DEPTH_SCALE) for path in depth_paths]
    check_sizes(depth, depth_paths, frames.shape[1:3], "depth")
    calibration = date_dir / "calib_cam_to_cam.txt"
    intrinsics = (repeat_intrinsics(camera_intrinsics(calibration, camera, frames.shape[1:3]),
                                    len(paths)) if calibration.is_file() else None)
    return Sequence(
        dataset="kitti", name=name, source=image_dir, frames=frames,
        frame_names=[path.stem for path in paths], frame_indices=indices,
        depth=np.stack(depth), intrinsics=intrinsics,
    )
