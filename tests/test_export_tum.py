"""The TUM-like folder read back with Pillow and NumPy against the inputs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation

from tests.export_scene import export_scene, opencv_pixel
from vggt4d.errors import UserError
from vggt4d.export.tum import write_tum_folder

# planted depths (row 0 of frame 0) and their PNG values at 1000 per unit, by hand
PLANTED = [(np.nan, 0), (-1.0, 0), (0.0, 0), (1.2346, 1235), (2.0, 2000), (65.535, 65535),
           (70.0, 65535), (0.0004, 0)]


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_frames_depth_masks_and_lists_read_back(tmp_path):
    scene = export_scene()
    for column, (value, _) in enumerate(PLANTED):
        scene.depth[0, 0, column] = value
    folder = write_tum_folder(tmp_path / "tum", scene.frames, scene.depth, scene.dynamic,
                              scene.extrinsics, scene.intrinsics)
    for t in range(len(scene.frames)):
        np.testing.assert_array_equal(read_png(folder / "rgb" / f"{t:06d}.png"), scene.frames[t])
        mask = read_png(folder / "dynamic_mask" / f"{t:06d}.png")
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, scene.dynamic[t])
        depth = read_png(folder / "depth" / f"{t:06d}.png")
        assert depth.dtype == np.uint16
        start = len(PLANTED) if t == 0 else 0  # the rest of the frame: real depths in mm
        np.testing.assert_allclose(depth[0, start:] / 1000.0, scene.depth[t, 0, start:],
                                   atol=0.0005 + 1e-9)
        np.testing.assert_allclose(depth[1:] / 1000.0, scene.depth[t, 1:], atol=0.0005 + 1e-9)
    first_row = read_png(folder / "depth" / "000000.png")[0, :len(PLANTED)]
    assert first_row.tolist() == [png for _, png in PLANTED]
    for kind in ("rgb", "depth"):
        rows = [line.split() for line in (folder / f"{kind}.txt").read_text().splitlines()
                if not line.startswith("#")]
        assert rows == [[str(t), f"{kind}/{t:06d}.png"] for t in range(len(scene.frames))]


@pytest.mark.parametrize("varying", [False, True])
def test_poses_and_intrinsics_project_the_planted_point_like_the_inputs(tmp_path, varying):
    """poses.txt is camera-to-world (centre, scalar-last quaternion), intrinsic.txt fx fy cx
    cy: the sphere centre projected through them lands where the inputs put it, inside the
    dynamic mask."""
    scene = export_scene(varying_intrinsics=varying)
    folder = write_tum_folder(tmp_path / "tum", scene.frames, scene.depth, scene.dynamic,
                              scene.extrinsics, scene.intrinsics)
    poses = np.loadtxt(folder / "poses.txt", comments="#")
    intrinsics = np.loadtxt(folder / "intrinsic.txt", comments="#")
    assert poses.shape == (len(scene.frames), 8) and intrinsics.shape == (len(scene.frames), 5)
    np.testing.assert_array_equal(poses[:, 0], np.arange(len(scene.frames)))
    np.testing.assert_array_equal(intrinsics[:, 0], np.arange(len(scene.frames)))
    for t, (pose, k_row) in enumerate(zip(poses, intrinsics, strict=True)):
        centre, quat = pose[1:4], pose[4:]
        assert abs(np.linalg.norm(quat) - 1) < 1e-7 and quat[3] >= 0
        camera_to_world = Rotation.from_quat(quat).as_matrix()
        camera = camera_to_world.T @ (scene.centres[t] - centre)
        fx, fy, cx, cy = k_row[1:]
        pixel = np.array([fx * camera[0] / camera[2] + cx, fy * camera[1] / camera[2] + cy])
        want = opencv_pixel(scene.centres[t], scene.intrinsics[t], scene.extrinsics[t])
        np.testing.assert_allclose(pixel, want, atol=1e-5)
        np.testing.assert_allclose([fx, fy, cx, cy], scene.intrinsics[t][[0, 1, 0, 1],
                                                                         [0, 1, 2, 2]],
                                   rtol=1e-8)
        column, row = np.floor(want).astype(int)
        assert read_png(folder / "dynamic_mask" / f"{t:06d}.png")[row, column] == 255


def test_depth_scale_is_a_setting_and_bad_inputs_are_refused(tmp_path):
    scene = export_scene(frames=2)
    scene.depth[:] = 1.0
    folder = write_tum_folder(tmp_path / "tum", scene.frames, scene.depth, scene.dynamic,
                              scene.extrinsics, scene.intrinsics, depth_scale=5000)
    assert (read_png(folder / "depth" / "000001.png") == 5000).all()
    with pytest.raises(UserError, match="depth scale"):
        write_tum_folder(tmp_path / "bad", scene.frames, scene.depth, scene.dynamic,
                         scene.extrinsics, scene.intrinsics, depth_scale=0)
    with pytest.raises(UserError, match="dynamic must have the frames' shape"):
        write_tum_folder(tmp_path / "bad", scene.frames, scene.depth, scene.dynamic[:, 1:],
                         scene.extrinsics, scene.intrinsics)
    with pytest.raises(UserError, match="same number of frames"):
        write_tum_folder(tmp_path / "bad", scene.frames, scene.depth, scene.dynamic,
                         scene.extrinsics[:1], scene.intrinsics)
