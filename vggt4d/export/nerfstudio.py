"""nerfstudio's ``transforms.json`` (its "nerfstudio-data" format), beside ``images/`` and
``masks/``, for NeRF and 3-D/4-D Gaussian trainers that read it.

Per frame: ``file_path`` (relative to the JSON's folder), ``transform_matrix`` the 4×4
camera-to-world matrix in the OpenGL camera convention (x right, y up, z back: the OpenCV
camera's y and z axes negated, ``c2w_gl = c2w_cv · diag(1, −1, −1, 1)``), ``mask_path`` (a
single-channel PNG, 0 = ignore the pixel: the static masks of :mod:`vggt4d.export.files`, so the
moving objects are ignored), ``time`` = t / (T − 1) in [0, 1] (the D-NeRF convention 4-D
trainers read; 0 for a single frame) and the frame index ``colmap_im_id`` = t + 1 (the image id
of the COLMAP model). Intrinsics ``fl_x fl_y cx cy w h`` (pixels; pixel ``(u, v)`` centred at
``(u + ½, v + ½)``, nerfstudio's convention) at the top level when all frames share them, else in
every frame. ``camera_model`` is ``PINHOLE`` (no distortion).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vggt4d.cameras import camera_to_world
from vggt4d.export.files import shared_intrinsics
from vggt4d.io import atomic_write

OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])
"""Right-multiplied onto an OpenCV camera-to-world matrix: flips the camera's y and z axes."""


def opengl_camera_to_world(extrinsics: np.ndarray) -> np.ndarray:
    """(T, 3, 4) OpenCV world-to-camera → (T, 4, 4) OpenGL camera-to-world."""
    c2w = np.zeros((len(extrinsics), 4, 4))
    c2w[:, :3] = camera_to_world(extrinsics)
    c2w[:, 3, 3] = 1.0
    return c2w @ OPENCV_TO_OPENGL


def _intrinsics(k_mat: np.ndarray, size: tuple[int, int]) -> dict:
    return {"fl_x": float(k_mat[0, 0]), "fl_y": float(k_mat[1, 1]), "cx": float(k_mat[0, 2]),
            "cy": float(k_mat[1, 2]), "w": int(size[1]), "h": int(size[0])}


def transforms(image_paths: list[str], extrinsics: np.ndarray, intrinsics: np.ndarray,
               size: tuple[int, int], mask_paths: list[str] | None = None) -> dict:
    """The ``transforms.json`` content (module docstring) for T images at ``size`` = (H, W)."""
    intrinsics = np.asarray(intrinsics, np.float64)
    shared = shared_intrinsics(intrinsics)
    c2w = opengl_camera_to_world(extrinsics)
    count = len(image_paths)
    frames = []
    for t, path in enumerate(image_paths):
        frame = {"file_path": path, "transform_matrix": c2w[t].tolist(),
                 "time": t / (count - 1) if count > 1 else 0.0, "colmap_im_id": t + 1}
        if mask_paths is not None:
            frame["mask_path"] = mask_paths[t]
        if not shared:
            frame.update(_intrinsics(intrinsics[t], size))
        frames.append(frame)
    content = {"camera_model": "PINHOLE"}
    if shared:
        content.update(_intrinsics(intrinsics[0], size))
    return {**content, "frames": frames}


def write_transforms(path: Path, image_paths: list[str], extrinsics: np.ndarray,
                     intrinsics: np.ndarray, size: tuple[int, int],
                     mask_paths: list[str] | None = None) -> Path:
    """Write :func:`transforms` as JSON to ``path``, atomically."""
    content = transforms(image_paths, extrinsics, intrinsics, size, mask_paths)
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(content, indent=2) + "\n"))
