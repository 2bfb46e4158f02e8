"""Pinhole camera geometry shared by the refinement and the scene points.

Conventions (as in :mod:`vggt4d.synthetic` and DA3's outputs): ``extrinsics`` are OpenCV
world-to-camera ``[R | t]`` (``X_cam = R X + t``), ``intrinsics`` are pinhole ``K`` in pixels of
the frames given, ``depth`` is z-depth, and pixel ``(u, v)`` (column, row) is the ray through the
continuous image point ``(u + 0.5, v + 0.5)``.
"""

from __future__ import annotations

import numpy as np

from vggt4d.errors import UserError


def check_cameras(intrinsics: np.ndarray, extrinsics: np.ndarray, frames: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(T, 3, 3) intrinsics and (T, 3, 4) extrinsics as float64, checked against each other
    and against ``frames``."""
    k_mats = np.asarray(intrinsics, dtype=np.float64)
    w2c = np.asarray(extrinsics, dtype=np.float64)
    if k_mats.ndim != 3 or k_mats.shape[1:] != (3, 3):
        raise UserError(f"intrinsics must have shape (T, 3, 3), got {k_mats.shape}")
    if w2c.ndim != 3 or w2c.shape[1:] != (3, 4):
        raise UserError(f"extrinsics must have shape (T, 3, 4), got {w2c.shape}")
    if len(k_mats) != len(w2c) or (frames is not None and len(k_mats) != frames):
        raise UserError(f"intrinsics ({len(k_mats)}), extrinsics ({len(w2c)}) and the frames "
                        f"({frames}) must have the same number of frames")
    return k_mats, w2c


def backproject(depth: np.ndarray, intrinsics: np.ndarray, extrinsics: np.ndarray
                ) -> np.ndarray:
    """World points of every pixel: (T, H, W), (T, 3, 3), (T, 3, 4) → (T, H, W, 3) float32.

    ``X = C + depth · R^T K^{-1} (u + 0.5, v + 0.5, 1)^T`` with ``C = −R^T t`` the camera centre
    (the ray has camera-frame z = 1, so ``depth`` is z-depth), i.e. ``X = R^T (X_cam − t)``.
    Computed in float64. Non-finite depth gives non-finite points.
    """
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim != 3:
        raise UserError(f"depth must have shape (T, H, W), got {depth.shape}")
    k_mats, w2c = check_cameras(intrinsics, extrinsics, len(depth))
    _, height, width = depth.shape
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    pix = np.stack([u + 0.5, v + 0.5, np.ones_like(u)], axis=-1)  # (H, W, 3)
    rot = w2c[:, :, :3]
    rays_cam = np.einsum("tij,hwj->thwi", np.linalg.inv(k_mats), pix)  # z = 1
    rays_world = np.einsum("tji,thwj->thwi", rot, rays_cam)  # R^T ray
    centres = camera_centres(w2c)
    points = centres[:, None, None, :] + rays_world * depth[..., None]
    return points.astype(np.float32)


def project(points: np.ndarray, intrinsics: np.ndarray, extrinsics: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """Project world points into one camera: (N, 3), (3, 3), (3, 4) → pixel (N, 2), z (N,).

    ``X_cam = R X + t``, ``z = X_cam[2]``, ``(x, y) = (K X_cam)[:2] / z`` (float64). ``(x, y)``
    are continuous image coordinates in the convention of :func:`backproject`: pixel ``(u, v)``
    covers ``[u, u + 1) × [v, v + 1)`` and its centre is ``(u + 0.5, v + 0.5)``, so the pixel a
    point lands in is ``(floor(x), floor(y))`` (column, row) and back-projecting pixel ``(u, v)``
    with its depth and projecting again returns ``(u + 0.5, v + 0.5)``. Points with ``z <= 0``
    (behind or on the camera plane) get non-finite or meaningless ``(x, y)``: test ``z > 0``.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    k_mat = np.asarray(intrinsics, dtype=np.float64)
    w2c = np.asarray(extrinsics, dtype=np.float64)
    if k_mat.shape != (3, 3) or w2c.shape != (3, 4):
        raise UserError(f"project needs one camera: intrinsics (3, 3) and extrinsics (3, 4), "
                        f"got {k_mat.shape} and {w2c.shape}")
    cam = pts @ w2c[:, :3].T + w2c[:, 3]
    hom = cam @ k_mat.T
    z = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        pixel = hom[:, :2] / z[:, None]
    return pixel, z


def camera_centres(extrinsics: np.ndarray) -> np.ndarray:
    """(T, 3, 4) world-to-camera → (T, 3) camera centres ``C = −R^T t`` (float64)."""
    w2c = np.asarray(extrinsics, dtype=np.float64)
    return -np.einsum("tji,tj->ti", w2c[:, :, :3], w2c[:, :, 3])


def camera_to_world(extrinsics: np.ndarray) -> np.ndarray:
    """(T, 3, 4) world-to-camera ``[R | t]`` → (T, 3, 4) camera-to-world ``[R^T | −R^T t]``."""
    w2c = np.asarray(extrinsics, dtype=np.float64)
    rot_c2w = np.transpose(w2c[:, :, :3], (0, 2, 1))
    return np.concatenate([rot_c2w, camera_centres(w2c)[:, :, None]], axis=2)
