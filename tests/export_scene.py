"""A small posed clip for the export tests, and the reference they check conventions against.

The synthetic scene is moved into a randomly rotated and shifted world (so no pose is close to
the identity and a swapped or transposed rotation shows), its object centre planted as the
known 3-D point each test projects through the camera it reads back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from vggt4d.synthetic import SyntheticConfig, render_scene


@dataclass
class ExportScene:
    frames: np.ndarray  # (T, H, W, 3) uint8
    depth: np.ndarray  # (T, H, W) float32
    dynamic: np.ndarray  # (T, H, W) bool
    extrinsics: np.ndarray  # (T, 3, 4) float64 OpenCV world-to-camera
    intrinsics: np.ndarray  # (T, 3, 3) float64
    centres: np.ndarray  # (T, 3) float64: the moving sphere's centre, in front of every camera


def export_scene(frames: int = 5, width: int = 64, height: int = 48,
                 varying_intrinsics: bool = False, seed: int = 3) -> ExportScene:
    """The synthetic clip in a world ``X' = G X + g`` (random rotation ``G``, shift ``g``);
    with ``varying_intrinsics`` every frame gets its own focal lengths and principal point."""
    scene = render_scene(SyntheticConfig(num_frames=frames, width=width, height=height,
                                         camera_motion=2.0))
    rotation = Rotation.random(random_state=seed).as_matrix()
    shift = np.array([0.7, -1.9, 3.1])
    w2c = scene.extrinsics.astype(np.float64)
    # X_cam = R X + t = R Gᵀ (X' − g) + t
    new_rotation = w2c[:, :, :3] @ rotation.T
    new_translation = w2c[:, :, 3] - np.einsum("tij,j->ti", new_rotation, shift)
    intrinsics = scene.intrinsics.astype(np.float64)
    if varying_intrinsics:
        steps = np.arange(frames, dtype=np.float64)
        intrinsics[:, 0, 0] *= 1 + 0.03 * steps
        intrinsics[:, 1, 1] *= 1 + 0.02 * steps
        intrinsics[:, 0, 2] += 0.25 * steps
        intrinsics[:, 1, 2] -= 0.5 * steps
    return ExportScene(
        frames=scene.frames, depth=scene.depth.copy(), dynamic=scene.dynamic_masks,
        extrinsics=np.concatenate([new_rotation, new_translation[:, :, None]], axis=2),
        intrinsics=intrinsics,
        centres=scene.object_centers[:, 0].astype(np.float64) @ rotation.T + shift)


def opencv_pixel(point: np.ndarray, k_mat: np.ndarray, w2c: np.ndarray) -> np.ndarray:
    """Continuous image point of a world point: ``K (R X + t)`` divided by its z (float64)."""
    camera = w2c[:, :3] @ point + w2c[:, 3]
    assert camera[2] > 0, "the planted point must be in front of the camera"
    image = k_mat @ camera
    return image[:2] / image[2]
