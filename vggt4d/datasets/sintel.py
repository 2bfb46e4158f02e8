"""MPI-Sintel (training set) in its official layout, read in place.

Layout (``MPI-Sintel-training_images.zip`` and ``MPI-Sintel-depth-training-20150305.zip``
unpacked into one root, which holds ``training/``)::

    training/final/<seq>/frame_0001.png     (or training/clean/..., pass_name="clean")
    training/depth/<seq>/frame_0001.dpt
    training/camdata_left/<seq>/frame_0001.cam

Binary formats (the Sintel depth SDK's ``sintel_io``; all little-endian):

* ``.dpt``: float32 tag 202021.25, int32 width, int32 height, then width × height float32
  depths, row-major.
* ``.cam``: float32 tag 202021.25, float64 3×3 intrinsics M, float64 3×4 extrinsics N, both
  row-major, with ``x = M N X`` for a homogeneous world point X: N is world-to-camera with
  OpenCV camera axes, M has its principal point at (W − 1)/2 (pixel centres at integers).

Converted: ``intrinsics`` = M with ``cx``, ``cy`` + 0.5 (the framework's pixel centres);
``extrinsics`` = N as is; depth as stored (z-depth in metres, all pixels valid, so no NaN; the
protocols cap it at 70 m themselves). These files are parsed here by hand because they are a
dozen bytes of header that no maintained library reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vggt4d.datasets.common import (
    Sequence,
    check_sizes,
    read_rgb,
    require_dir,
    require_file,
    select_indices,
)
from vggt4d.errors import UserError

TAG_FLOAT = 202021.25
PASSES = ("final", "clean")
DPT_HEADER = np.dtype([("tag", "<f4"), ("width", "<i4"), ("height", "<i4")])
CAM_RECORD = np.dtype([("tag", "<f4"), ("intrinsics", "<f8", (3, 3)),
                       ("extrinsics", "<f8", (3, 4))])
_MAX_PIXELS = 100_000_000  # the SDK's sanity bound on width × height


def training_root(root: Path | str) -> Path:
    """The ``training`` folder: ``root/training`` or ``root`` itself."""
    root = Path(root).expanduser()
    for candidate in (root / "training", root):
        if any((candidate / name).is_dir() for name in (*PASSES, "depth", "camdata_left")):
            return candidate
    raise UserError(f"Sintel root {root} has no training/final, training/clean, training/depth "
                    "or training/camdata_left folder")


def _read_bytes(path: Path, what: str) -> bytes:
    require_file(path, what)
    try:
        return path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err}") from None


def _check_tag(tag: float, path: Path) -> None:
    if tag != np.float32(TAG_FLOAT):
        raise UserError(f"{path}: wrong tag {float(tag)!r} (expected {TAG_FLOAT}): not a "
                        "Sintel file, or written big-endian")


def read_dpt(path: Path) -> np.ndarray:
    """A Sintel ``.dpt`` depth file as (H, W) float32."""
    data = _read_bytes(path, "Sintel depth file")
    if len(data) < DPT_HEADER.itemsize:
        raise UserError(f"{path}: truncated .dpt file ({len(data)} bytes, the header alone "
                        f"takes {DPT_HEADER.itemsize})")
    header = np.frombuffer(data, DPT_HEADER, count=1)[0]
    _check_tag(header["tag"], path)
    width, height = int(header["width"]), int(header["height"])
    if width < 1 or height < 1 or width * height > _MAX_PIXELS:
        raise UserError(f"{path}: invalid .dpt size {width}x{height}")
    expected = DPT_HEADER.itemsize + 4 * width * height
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "trailing bytes in"
        raise UserError(f"{path}: {problem} .dpt file: {len(data)} bytes, a {width}x{height} "
                        f"depth map takes {expected}")
    return np.frombuffer(data, "<f4", offset=DPT_HEADER.itemsize).reshape(height, width)


def read_cam(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A Sintel ``.cam`` file as its own M (3, 3) and N (3, 4), float64, unconverted."""
    data = _read_bytes(path, "Sintel camera file")
    if len(data) != CAM_RECORD.itemsize:
        raise UserError(f"{path}: a .cam file has {CAM_RECORD.itemsize} bytes (tag, 3x3 and 3x4 "
                        f"float64), this one {len(data)}")
    record = np.frombuffer(data, CAM_RECORD, count=1)[0]
    _check_tag(record["tag"], path)
    if not (np.isfinite(record["intrinsics"]).all() and np.isfinite(record["extrinsics"]).all()):
        raise UserError(f"{path}: non-finite camera values")
    return record["intrinsics"].astype(np.float64), record["extrinsics"].astype(np.float64)


def list_sequences(root: Path | str, *, pass_name: str = "final") -> list[str]:
    """Sequence folders of ``training/<pass_name>``, sorted."""
    images = require_dir(training_root(root) / _check_pass(pass_name), "Sintel image folder")
    return sorted(path.name for path in images.iterdir() if path.is_dir())


def _check_pass(pass_name: str) -> str:
    if pass_name not in PASSES:
        raise UserError(f"Sintel pass_name={pass_name!r}: choose one of {', '.join(PASSES)}")
    return pass_name


def read_sequence(root: Path | str, name: str, *, start: int = 0, stop: int | None = None,
                  stride: int = 1, max_frames: int | None = None,
                  pass_name: str = "final") -> Sequence:
    """Frames of ``training/<pass_name>/<name>`` with their ``.dpt`` depth and ``.cam`` cameras
    (same file stems; every selected frame needs both)."""
    base = training_root(root)
    image_dir = base / _check_pass(pass_name) / name
    if not image_dir.is_dir():
        raise UserError(f"Sintel sequence {name!r} not found: no folder {image_dir}")
    paths = sorted(image_dir.glob("frame_*.png"))
    if not paths:
        raise UserError(f"Sintel sequence {name!r}: no frame_*.png in {image_dir}")
    indices = select_indices(len(paths), start, stop, stride, max_frames,
                             what=f"Sintel sequence {name}")
    paths = [paths[i] for i in indices]
    frames = read_rgb(paths)
    depth_dir = require_dir(base / "depth" / name, f"Sintel depth of {name!r} (from "
                            "MPI-Sintel-depth-training-20150305.zip)")
    cam_dir = require_dir(base / "camdata_left" / name, f"Sintel cameras of {name!r} (from "
                          "MPI-Sintel-depth-training-20150305.zip)")
    depth_paths = [depth_dir / f"{path.stem}.dpt" for path in paths]
    depth = [read_dpt(path) for path in depth_paths]
    check_sizes(depth, depth_paths, frames.shape[1:3], "depth")
    cameras = [read_cam(cam_dir / f"{path.stem}.cam") for path in paths]
    intrinsics = np.stack([m for m, _ in cameras])
    intrinsics[:, :2, 2] += 0.5
    return Sequence(
        dataset="sintel", name=name, source=image_dir, frames=frames,
        frame_names=[path.stem for path in paths], frame_indices=indices,
        depth=np.stack(depth).astype(np.float32), intrinsics=intrinsics,
        extrinsics=np.stack([n for _, n in cameras]),
    )
