"""A COLMAP model of the clip's cameras, written by pycolmap, for COLMAP and Gaussian-splatting
trainers (which read ``<root>/images/`` and ``<root>/sparse/0/``).

One ``PINHOLE`` camera (``fx fy cx cy`` in pixels of the frames' size, COLMAP's pixel convention:
pixel ``(u, v)`` centred at ``(u + ½, v + ½)``, the project's) shared by all images when every
frame has the same ``K``, else one per image. Each image stores its world-to-camera pose
``cam_from_world`` (COLMAP's ``images.txt``: ``QW QX QY QZ TX TY TZ``, ``X_cam = R X + t``, OpenCV
camera axes), which is DA3's extrinsics as they are. No 3-D points: ``points3D`` is written empty
(the poses come from DA3, not from feature tracks). COLMAP ≥ 3.12 also writes ``rigs`` and
``frames`` files (one trivial rig per camera, one frame per image); older readers ignore them.

Masks for these trainers sit beside ``images/`` (see :mod:`vggt4d.export.files`):
``masks/<image name>.png`` (COLMAP's naming rule) with 0 = ignore, so the dynamic pixels are 0
and a static-scene trainer skips the moving objects; ``dynamic_masks/`` holds the dynamic masks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vggt4d.config.export import ColmapFormat
from vggt4d.errors import UserError
from vggt4d.export.files import shared_intrinsics, write_folder_files


def colmap_reconstruction(names: list[str], extrinsics: np.ndarray, intrinsics: np.ndarray,
                          size: tuple[int, int]):
    """A ``pycolmap.Reconstruction`` of T images named ``names`` with (T, 3, 4) world-to-camera
    poses and (T, 3, 3) pinhole intrinsics at ``size`` = (H, W); ids start at 1."""
    import pycolmap

    height, width = size
    reconstruction = pycolmap.Reconstruction()
    shared = shared_intrinsics(intrinsics)
    for t, k_mat in enumerate(intrinsics[:1] if shared else intrinsics):
        params = [k_mat[0, 0], k_mat[1, 1], k_mat[0, 2], k_mat[1, 2]]
        reconstruction.add_camera_with_trivial_rig(pycolmap.Camera(
            model="PINHOLE", width=width, height=height, params=params, camera_id=t + 1))
    for t, (name, w2c) in enumerate(zip(names, extrinsics, strict=True)):
        image = pycolmap.Image(name=name, camera_id=1 if shared else t + 1, image_id=t + 1)
        pose = pycolmap.Rigid3d(pycolmap.Rotation3d(w2c[:, :3]), w2c[:, 3])
        reconstruction.add_image_with_trivial_frame(image, pose)
    return reconstruction


def write_colmap_model(folder: Path, names: list[str], extrinsics: np.ndarray,
                       intrinsics: np.ndarray, size: tuple[int, int],
                       file_format: str = ColmapFormat.binary) -> Path:
    """Write the model of :func:`colmap_reconstruction` into ``folder`` (e.g.
    ``<root>/sparse/0``) in COLMAP's ``binary`` (``*.bin``) or ``text`` (``*.txt``) layout."""
    if file_format not in tuple(ColmapFormat):
        raise UserError(f"COLMAP format '{file_format}' is not one of "
                        f"{', '.join(ColmapFormat)}")
    reconstruction = colmap_reconstruction(names, np.asarray(extrinsics, np.float64),
                                           np.asarray(intrinsics, np.float64), size)
    write_folder_files(folder, lambda tmp: getattr(reconstruction, f"write_{file_format}")(
        str(tmp)))
    return folder
