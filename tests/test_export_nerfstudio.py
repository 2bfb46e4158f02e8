"""nerfstudio's transforms.json read back with json and checked the way nerfstudio casts rays."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.export_scene import export_scene, opencv_pixel
from vggt4d.export.nerfstudio import write_transforms

INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h")


def nerfstudio_ray(c2w: np.ndarray, fx: float, fy: float, cx: float, cy: float,
                   pixel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Origin and direction of the ray through a continuous image point as nerfstudio builds
    it: camera direction ``((x − cx) / fx, −(y − cy) / fy, −1)`` (OpenGL: y up, looking down
    −z), rotated by the camera-to-world matrix."""
    direction = np.array([(pixel[0] - cx) / fx, -(pixel[1] - cy) / fy, -1.0])
    return c2w[:3, 3], c2w[:3, :3] @ direction


@pytest.mark.parametrize("varying", [False, True])
def test_frames_cast_rays_through_the_planted_point(tmp_path, varying):
    scene = export_scene(varying_intrinsics=varying)
    count, (height, width) = len(scene.frames), scene.frames.shape[1:3]
    images = [f"images/frame_{t:04d}.png" for t in range(count)]
    masks = [f"masks/frame_{t:04d}.png.png" for t in range(count)]
    path = write_transforms(tmp_path / "transforms.json", images, scene.extrinsics,
                            scene.intrinsics, (height, width), masks)
    content = json.loads(path.read_text())
    assert content["camera_model"] == "PINHOLE" and len(content["frames"]) == count
    assert all(key in content for key in INTRINSIC_KEYS) != varying
    for t, frame in enumerate(content["frames"]):
        assert frame["file_path"] == images[t] and frame["mask_path"] == masks[t]
        assert frame["time"] == pytest.approx(t / (count - 1))
        values = frame if varying else content
        fx, fy, cx, cy, w, h = (values[key] for key in INTRINSIC_KEYS)
        assert (w, h) == (width, height)
        np.testing.assert_allclose([fx, fy, cx, cy],
                                   scene.intrinsics[t][[0, 1, 0, 1], [0, 1, 2, 2]], rtol=1e-12)
        c2w = np.array(frame["transform_matrix"])
        assert c2w.shape == (4, 4)
        np.testing.assert_allclose(c2w[3], [0, 0, 0, 1])
        np.testing.assert_allclose(c2w[:3, :3].T @ c2w[:3, :3], np.eye(3), atol=1e-6)
        assert np.linalg.det(c2w[:3, :3]) == pytest.approx(1, abs=1e-6)
        pixel = opencv_pixel(scene.centres[t], scene.intrinsics[t], scene.extrinsics[t])
        origin, direction = nerfstudio_ray(c2w, fx, fy, cx, cy, pixel)
        to_point = scene.centres[t] - origin
        assert np.dot(to_point, direction) > 0  # in front of the camera
        np.testing.assert_allclose(np.cross(to_point, direction) / np.linalg.norm(to_point)
                                   / np.linalg.norm(direction), 0, atol=1e-7)


def test_without_masks_no_frame_has_a_mask_path(tmp_path):
    scene = export_scene(frames=2)
    path = write_transforms(tmp_path / "transforms.json", ["a.png", "b.png"], scene.extrinsics,
                            scene.intrinsics, scene.frames.shape[1:3])
    frames = json.loads(path.read_text())["frames"]
    assert [frame["time"] for frame in frames] == [0.0, 1.0]
    assert not any("mask_path" in frame for frame in frames)
