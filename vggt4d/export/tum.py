"""The TUM-like folder of the AnyDynamics "hooks" research script, for RGB-D SLAM tools.

Layout (``t`` = frame index, ``NNNNNN`` its six-digit zero-padded form)::

    rgb/NNNNNN.png           the frame, RGB
    depth/NNNNNN.png         uint16 depth: round(depth · depth_scale), clipped to 65535;
                             0 = no depth (non-finite or ≤ 0)
    dynamic_mask/NNNNNN.png  0/255, 255 = dynamic
    rgb.txt, depth.txt       "timestamp filename" per frame (TUM's association lists)
    intrinsic.txt            "timestamp fx fy cx cy" per frame (pixels of the frames' size)
    poses.txt                "timestamp tx ty tz qx qy qz qw" per frame

Depth scale: ``depth_scale = 1000`` (the research script's convention) stores DA3's depth unit
× 1000, "millimetres" when the model is metric (TUM's own datasets use 5000 per metre: set the
scale a reader expects). Read back as ``depth = png / depth_scale``; 65535 / depth_scale is the
farthest depth stored (65.5 units at 1000).

Timestamps are the frame indices. Poses follow TUM's ground-truth format: camera-to-world, i.e.
``(tx, ty, tz)`` the camera centre ``C = −Rᵀ t`` in DA3's world and ``(qx, qy, qz, qw)`` the unit
quaternion (scalar last, ``qw ≥ 0``) of the camera-to-world rotation ``Rᵀ`` of the OpenCV camera
(x right, y down, z forward), so ``X_world = R_q X_cam + (tx, ty, tz)``. Intrinsics keep the
project's pixel convention (pixel ``(u, v)`` centred at ``(u + ½, v + ½)``): an OpenCV-style reader
that puts pixel centres on integers uses ``cx − ½, cy − ½``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from vggt4d.cameras import camera_to_world
from vggt4d.errors import UserError
from vggt4d.export.files import check_clip, write_mask, write_png
from vggt4d.io import atomic_write

DEPTH_SCALE = 1000.0
"""PNG value per DA3 depth unit (the research script's millimetres)."""
UINT16_MAX = 65535


def depth_to_uint16(depth: np.ndarray, depth_scale: float = DEPTH_SCALE) -> np.ndarray:
    """(…) float depth → uint16 ``round(depth · depth_scale)`` clipped to 65535; non-finite and
    non-positive depth → 0 (TUM's "no measurement")."""
    if not (np.isfinite(depth_scale) and depth_scale > 0):
        raise UserError(f"depth scale {depth_scale} must be a positive number (PNG value per "
                        f"depth unit, e.g. 1000)")
    valid = np.isfinite(depth) & (depth > 0)
    scaled = np.where(valid, np.asarray(depth, np.float64) * depth_scale, 0.0)
    return np.clip(np.rint(scaled), 0, UINT16_MAX).astype(np.uint16)


def tum_pose_lines(extrinsics: np.ndarray) -> list[str]:
    """(T, 3, 4) world-to-camera → "t tx ty tz qx qy qz qw" camera-to-world lines."""
    c2w = camera_to_world(extrinsics)
    quats = Rotation.from_matrix(c2w[:, :, :3]).as_quat()  # (x, y, z, w)
    quats[quats[:, 3] < 0] *= -1
    return [" ".join([str(t), *(f"{v:.9g}" for v in (*c2w[t, :, 3], *quats[t]))])
            for t in range(len(c2w))]


def _write_lines(path: Path, header: str, lines: list[str]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(f"# {header}\n" + "\n".join(lines) + "\n"))


def write_tum_folder(folder: Path, frames: np.ndarray, depth: np.ndarray, dynamic: np.ndarray,
                     extrinsics: np.ndarray, intrinsics: np.ndarray,
                     depth_scale: float = DEPTH_SCALE) -> Path:
    """Write the TUM-like folder (module docstring) for (T, H, W, 3) frames, (T, H, W) depth
    and dynamic masks, (T, 3, 4) world-to-camera and (T, 3, 3) intrinsics; returns ``folder``."""
    w2c, k_mats = check_clip(frames, extrinsics, intrinsics, depth=depth, dynamic=dynamic)
    depth_png = depth_to_uint16(depth, depth_scale)
    names = [f"{t:06d}.png" for t in range(len(frames))]
    for t, name in enumerate(names):
        write_png(folder / "rgb" / name, frames[t])
        write_png(folder / "depth" / name, depth_png[t])
        write_mask(folder / "dynamic_mask" / name, dynamic[t])
    for kind in ("rgb", "depth"):
        _write_lines(folder / f"{kind}.txt", "timestamp filename",
                     [f"{t} {kind}/{name}" for t, name in enumerate(names)])
    _write_lines(folder / "intrinsic.txt",
                 f"timestamp fx fy cx cy (pixels of {frames.shape[2]}x{frames.shape[1]}; "
                 f"pixel (u, v) centred at (u + 0.5, v + 0.5))",
                 [" ".join([str(t), *(f"{v:.9g}" for v in (k[0, 0], k[1, 1], k[0, 2], k[1, 2]))])
                  for t, k in enumerate(k_mats)])
    _write_lines(folder / "poses.txt",
                 "timestamp tx ty tz qx qy qz qw (camera-to-world, OpenCV camera axes; depth "
                 f"PNG = depth x {depth_scale:g})", tum_pose_lines(w2c))
    return folder
