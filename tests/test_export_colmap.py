"""The COLMAP model read back with pycolmap, and the trainers' masks read back with Pillow."""

from __future__ import annotations

import numpy as np
import pycolmap
import pytest
from PIL import Image

from tests.export_scene import export_scene, opencv_pixel
from vggt4d.errors import UserError
from vggt4d.export.colmap import write_colmap_model
from vggt4d.export.files import frame_names, write_trainer_masks


@pytest.mark.parametrize(("file_format", "varying"),
                         [("binary", False), ("text", False), ("binary", True)])
def test_model_holds_the_inputs_cameras(tmp_path, file_format, varying):
    """Poses (world-to-camera), PINHOLE intrinsics (one shared camera unless they vary), image
    names, no points; pycolmap's own projection of the planted point matches the inputs'."""
    scene = export_scene(varying_intrinsics=varying)
    count, (height, width) = len(scene.frames), scene.frames.shape[1:3]
    names = frame_names(count)
    folder = write_colmap_model(tmp_path / "sparse" / "0", names, scene.extrinsics,
                                scene.intrinsics, (height, width), file_format)
    suffix = ".bin" if file_format == "binary" else ".txt"
    assert {"cameras", "images", "points3D"} <= {p.stem for p in folder.glob(f"*{suffix}")}
    model = pycolmap.Reconstruction(str(folder))
    assert model.num_images() == count and model.num_points3D() == 0
    assert model.num_cameras() == (count if varying else 1)
    for t in range(count):
        image = model.find_image_with_name(names[t])
        camera = model.cameras[image.camera_id]
        assert camera.model.name == "PINHOLE" and (camera.width, camera.height) == (width, height)
        np.testing.assert_allclose(camera.calibration_matrix(), scene.intrinsics[t], rtol=1e-12)
        np.testing.assert_allclose(image.cam_from_world().matrix(), scene.extrinsics[t],
                                   atol=1e-6)
        projected = image.project_point(scene.centres[t])
        want = opencv_pixel(scene.centres[t], scene.intrinsics[t], scene.extrinsics[t])
        np.testing.assert_allclose(projected, want, atol=1e-5)
        # the camera centre pycolmap derives is the inputs' −Rᵀ t
        rotation, translation = scene.extrinsics[t][:, :3], scene.extrinsics[t][:, 3]
        np.testing.assert_allclose(image.projection_center(), -rotation.T @ translation,
                                   atol=1e-6)


def test_unknown_format_is_refused(tmp_path):
    scene = export_scene(frames=2)
    with pytest.raises(UserError, match="binary, text"):
        write_colmap_model(tmp_path, frame_names(2), scene.extrinsics, scene.intrinsics,
                           scene.frames.shape[1:3], "ply")


def test_trainer_masks_ignore_the_dynamic_pixels(tmp_path):
    """masks/<image>.png (COLMAP's name rule): 0 on dynamic pixels (ignored), 255 elsewhere;
    dynamic_masks/<image>: 255 on dynamic pixels."""
    scene = export_scene()
    names = frame_names(len(scene.frames))
    write_trainer_masks(tmp_path, scene.dynamic, names)
    assert names[0] == "frame_0000.png"
    for t, name in enumerate(names):
        static = np.asarray(Image.open(tmp_path / "masks" / f"{name}.png"))
        dynamic = np.asarray(Image.open(tmp_path / "dynamic_masks" / name))
        assert static.ndim == 2 and static.dtype == np.uint8
        np.testing.assert_array_equal(static, np.where(scene.dynamic[t], 0, 255))
        np.testing.assert_array_equal(dynamic, np.where(scene.dynamic[t], 255, 0))
        assert scene.dynamic[t].any() and (static == 0).sum() == scene.dynamic[t].sum()
