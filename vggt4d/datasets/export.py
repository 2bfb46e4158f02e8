"""Write the synthetic scene in the official layouts of the benchmark datasets.

Each sequence is one :func:`vggt4d.synthetic.render_scene` clip (sequence ``i`` uses seed
``seed + i``, the same clip in every layout), written the way the real files are, so the readers
of :mod:`vggt4d.datasets` (and other tools) read it unchanged; a user checks a setup by pointing
it at these folders first::

    python -m vggt4d.datasets.export OUT [--datasets davis2016,sintel,...] [--sequences 2]
        [--frames 12] [--width 280] [--height 210] [--seed 0] [--overwrite]

``OUT/export.json`` lists, per dataset, the root to give the reader, the sequence names and the
reader options the export needs (TUM and Bonn keep no intrinsics in their files, so the scene's
are given as ``intrinsics``). Layouts and byte formats:

* ``davis2016/DAVIS``: ``JPEGImages/480p/<seq>/00000.jpg`` (JPEG quality 95, no chroma subsampling),
  ``Annotations/480p/<seq>/00000.png`` binary greyscale 0 / 255 (the moving objects),
  ``ImageSets/480p/val.txt`` with one "image annotation" path pair per frame.
* ``davis2017/DAVIS``: the same frames; ``Annotations/480p`` and ``Annotations_unsupervised/480p``
  palette PNGs (index = object id of the moving objects, 0 = background, the PASCAL-VOC colour
  map DAVIS uses), ``ImageSets/2017/val.txt`` with one name per line.
* ``sintel/training``: ``final/<seq>/frame_0001.png``, ``depth/<seq>/frame_0001.dpt`` (float32
  tag 202021.25, int32 width, height, float32 depths, little-endian),
  ``camdata_left/<seq>/frame_0001.cam`` (tag, float64 M, float64 N = world-to-camera).
* ``tum/rgbd_dataset_<seq>`` and ``bonn/rgbd_bonn_dataset/rgbd_bonn_<seq>``: ``rgb/<t>.png``,
  ``depth/<t>.png`` (16-bit, metres × 5000, 0 beyond 13.1 m), ``rgb.txt``, ``depth.txt``,
  ``groundtruth.txt`` (camera-to-world ``t qx qy qz qw``) with TUM's comment headers; frames
  30 Hz apart, depth and poses stamped a few milliseconds off the frames, as a real recording.
* ``kitti``: ``val/<drive>/proj_depth/groundtruth/image_02/0000000000.png`` (16-bit, metres ×
  256, 0 = no point; the top 30 % of rows are left empty like the LiDAR's), raw frames
  ``<date>/<drive>/image_02/data/0000000000.png`` and ``<date>/calib_cam_to_cam.txt``
  (``S_rect_02``, ``R_rect_02``, ``P_rect_02``); drives ``2000_01_01_drive_000i_sync``. Every
  frame is annotated (real drives lack their first and last five).

Calibrations are written in the datasets' convention (pixel centres at integers: the scene's
``cx``, ``cy`` − 0.5). Every file is written atomically; the manifest comes last, so a folder
without ``export.json`` is an interrupted export.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.spatial.transform import Rotation

from vggt4d.datasets import sintel, tum
from vggt4d.errors import UserError
from vggt4d.io import atomic_write
from vggt4d.synthetic import SyntheticConfig, SyntheticScene, render_scene

DATASET_NAMES = ("davis2016", "davis2017", "sintel", "tum", "bonn", "kitti")
JPEG_QUALITY = 95
FRAME_PERIOD = 1.0 / 30.0  # seconds between frames of the TUM / Bonn exports
START_TIME = 1341846313.0  # an epoch time like the TUM fr3 recordings'
KITTI_DATE = "2000_01_01"
KITTI_EMPTY_ROWS = 0.3  # fraction of rows at the top without depth


def davis_palette() -> np.ndarray:
    """The PASCAL-VOC colour map (256, 3) uint8 DAVIS's palette PNGs use: the bits of the index
    spread over the high bits of R, G, B (index 1 → (128, 0, 0), 2 → (0, 128, 0), ...)."""
    index = np.arange(256)
    palette = np.zeros((256, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * shift + channel)) & 1) << (7 - shift)
    return palette.astype(np.uint8)


def _write_image(path: Path, image: Image.Image, image_format: str, **params) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format=image_format, **params))


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def depth_png(depth: np.ndarray, scale: float) -> Image.Image:
    """A 16-bit PNG image of (H, W) metres: ``round(depth · scale)``, 0 where that does not fit
    in 16 bits or the depth is not finite."""
    scaled = np.round(np.nan_to_num(depth.astype(np.float64), nan=0.0) * scale)
    scaled[(scaled > 65535) | (scaled < 0)] = 0
    return Image.fromarray(scaled.astype(np.uint16))


def _dataset_intrinsics(scene: SyntheticScene) -> tuple[float, float, float, float]:
    """fx, fy, cx, cy of the scene's first camera with pixel centres at integers."""
    k_mat = scene.intrinsics[0].astype(np.float64)
    return k_mat[0, 0], k_mat[1, 1], k_mat[0, 2] - 0.5, k_mat[1, 2] - 0.5


def _moving_ids(scene: SyntheticScene) -> np.ndarray:
    """(T, H, W) uint8: the object id where a moving object is seen, else 0."""
    return np.where(scene.dynamic_masks, scene.object_ids, 0).astype(np.uint8)


def export_davis(scenes: dict[str, SyntheticScene], root: Path, year: int) -> None:
    """A DAVIS tree (``root`` = the DAVIS folder) of ``year`` 2016 (binary annotations, 2016
    ImageSets) or 2017 (palette annotations, both annotation sets, 2017 ImageSets)."""
    pairs = []
    for name, scene in scenes.items():
        ids = _moving_ids(scene)
        for t, frame in enumerate(scene.frames):
            stem = f"{t:05d}"
            _write_image(root / "JPEGImages" / "480p" / name / f"{stem}.jpg",
                         Image.fromarray(frame), "JPEG", quality=JPEG_QUALITY, subsampling=0)
            if year == 2016:
                mask = Image.fromarray(np.where(ids[t] > 0, 255, 0).astype(np.uint8))
                _write_image(root / "Annotations" / "480p" / name / f"{stem}.png", mask, "PNG")
            else:
                mask = Image.fromarray(ids[t])
                mask.putpalette(davis_palette().ravel().tolist())
                for folder in ("Annotations", "Annotations_unsupervised"):
                    _write_image(root / folder / "480p" / name / f"{stem}.png", mask, "PNG")
            pairs.append(f"/JPEGImages/480p/{name}/{stem}.jpg /Annotations/480p/{name}/{stem}.png")
    if year == 2016:
        _write_text(root / "ImageSets" / "480p" / "val.txt", "\n".join(pairs) + "\n")
    else:
        _write_text(root / "ImageSets" / "2017" / "val.txt", "\n".join(scenes) + "\n")


def dpt_bytes(depth: np.ndarray) -> bytes:
    """A Sintel ``.dpt`` file of (H, W) depth."""
    height, width = depth.shape
    header = np.array([(sintel.TAG_FLOAT, width, height)], dtype=sintel.DPT_HEADER)
    return header.tobytes() + np.ascontiguousarray(depth, dtype="<f4").tobytes()


def cam_bytes(intrinsics: np.ndarray, extrinsics: np.ndarray) -> bytes:
    """A Sintel ``.cam`` file of M (3, 3) and N (3, 4), in Sintel's own conventions."""
    return np.array([(sintel.TAG_FLOAT, intrinsics, extrinsics)], dtype=sintel.CAM_RECORD).tobytes()


def export_sintel(scenes: dict[str, SyntheticScene], root: Path) -> None:
    """A Sintel ``training`` tree under ``root``: final-pass PNGs, ``.dpt`` and ``.cam``."""
    for name, scene in scenes.items():
        m_mat = scene.intrinsics.astype(np.float64)
        m_mat[:, :2, 2] -= 0.5
        for t, frame in enumerate(scene.frames):
            stem = f"frame_{t + 1:04d}"
            _write_image(root / "training" / "final" / name / f"{stem}.png",
                         Image.fromarray(frame), "PNG")
            _write_bytes(root / "training" / "depth" / name / f"{stem}.dpt",
                         dpt_bytes(scene.depth[t]))
            _write_bytes(root / "training" / "camdata_left" / name / f"{stem}.cam",
                         cam_bytes(m_mat[t], scene.extrinsics[t].astype(np.float64)))


def _tum_header(kind: str, folder: Path, fields: str) -> str:
    return f"# {kind}\n# file: '{folder.name}.bag'\n# timestamp {fields}\n"


def export_tum_sequence(scene: SyntheticScene, folder: Path, seed: int) -> None:
    """One TUM-format sequence folder: frames 30 Hz apart from :data:`START_TIME`, depth stamped
    2–8 ms and poses up to 5 ms off each frame (seeded), so each frame has one partner within
    the association window."""
    rng = np.random.default_rng(seed)
    count = len(scene.frames)
    rgb_times = START_TIME + seed + np.arange(count) * FRAME_PERIOD
    depth_times = rgb_times + rng.choice([-1, 1], count) * rng.uniform(0.002, 0.008, count)
    pose_times = rgb_times + rng.uniform(-0.005, 0.005, count)
    rgb_lines, depth_lines, pose_lines = [], [], []
    rotation = scene.extrinsics[:, :, :3].astype(np.float64)
    centres = -np.einsum("tji,tj->ti", rotation, scene.extrinsics[:, :, 3].astype(np.float64))
    quaternions = Rotation.from_matrix(np.transpose(rotation, (0, 2, 1))).as_quat()  # x y z w
    for t in range(count):
        rgb_name, depth_name = f"rgb/{rgb_times[t]:.6f}.png", f"depth/{depth_times[t]:.6f}.png"
        _write_image(folder / rgb_name, Image.fromarray(scene.frames[t]), "PNG")
        _write_image(folder / depth_name, depth_png(scene.depth[t], tum.DEPTH_SCALE), "PNG")
        rgb_lines.append(f"{rgb_times[t]:.6f} {rgb_name}\n")
        depth_lines.append(f"{depth_times[t]:.6f} {depth_name}\n")
        values = [*centres[t], *quaternions[t]]
        pose_lines.append(f"{pose_times[t]:.6f} " + " ".join(repr(float(v)) for v in values)
                          + "\n")
    _write_text(folder / "rgb.txt", _tum_header("color images", folder, "filename")
                + "".join(rgb_lines))
    _write_text(folder / "depth.txt", _tum_header("depth maps", folder, "filename")
                + "".join(depth_lines))
    _write_text(folder / "groundtruth.txt",
                _tum_header("ground truth trajectory", folder, "tx ty tz qx qy qz qw")
                + "".join(pose_lines))


def _numbers(values) -> str:
    """Numbers in KITTI's exponent notation, with every digit of a float64."""
    return " ".join(f"{float(v):.16e}" for v in values)


def kitti_calibration(scene: SyntheticScene) -> str:
    """``calib_cam_to_cam.txt`` text for camera 2 of the scene (rectified, no stereo offset)."""
    fx, fy, cx, cy = _dataset_intrinsics(scene)
    height, width = scene.depth.shape[1:]
    projection = [fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return (f"calib_time: synthetic scene written by vggt4d\n"
            f"S_rect_02: {_numbers([width, height])}\n"
            f"R_rect_02: {_numbers(np.eye(3).ravel())}\n"
            f"P_rect_02: {_numbers(projection)}\n")


def export_kitti(scenes: dict[str, SyntheticScene], root: Path) -> None:
    """KITTI depth ``val`` drives with raw frames and calibration under ``root``."""
    for drive, scene in scenes.items():
        depth = scene.depth.copy()
        depth[:, : round(KITTI_EMPTY_ROWS * depth.shape[1])] = np.nan
        for t, frame in enumerate(scene.frames):
            name = f"{t:010d}.png"
            _write_image(root / "val" / drive / "proj_depth" / "groundtruth" / "image_02" / name,
                         depth_png(depth[t], 256.0), "PNG")
            _write_image(root / KITTI_DATE / drive / "image_02" / "data" / name,
                         Image.fromarray(frame), "PNG")
        _write_text(root / KITTI_DATE / "calib_cam_to_cam.txt", kitti_calibration(scene))


def sequence_names(dataset: str, count: int) -> list[str]:
    """The exported sequences' names in ``dataset``'s naming style."""
    pattern = {"davis2016": "synthetic-{}", "davis2017": "synthetic-{}", "sintel": "synthetic_{}",
               "tum": "rgbd_dataset_synthetic_{}", "bonn": "rgbd_bonn_synthetic_{}",
               "kitti": KITTI_DATE + "_drive_{:04d}_sync"}[dataset]
    return [pattern.format(i) for i in range(count)]


#: where each dataset's reader root lies inside ``OUT/<dataset>``
READER_ROOTS = {"davis2016": "DAVIS", "davis2017": "DAVIS", "sintel": ".", "tum": ".",
                "bonn": tum.BONN_FOLDER, "kitti": "."}


def write_dataset(dataset: str, scenes: dict[str, SyntheticScene], root: Path,
                  seeds: list[int]) -> None:
    """Write ``scenes`` (name → scene, seeded ``seeds``) as ``dataset`` under its reader root."""
    if dataset in ("davis2016", "davis2017"):
        export_davis(scenes, root, int(dataset[-4:]))
    elif dataset == "sintel":
        export_sintel(scenes, root)
    elif dataset in ("tum", "bonn"):
        for (name, scene), seed in zip(scenes.items(), seeds, strict=True):
            export_tum_sequence(scene, root / name, seed)
    else:
        export_kitti(scenes, root)


def export_synthetic(out: Path, datasets: list[str], config: SyntheticConfig,
                     num_sequences: int = 2, overwrite: bool = False) -> dict:
    """Render ``num_sequences`` clips (seeds ``config.seed + i``) and write them in each of
    ``datasets`` under ``out/<dataset>``; returns the manifest written to ``out/export.json``."""
    unknown = [name for name in datasets if name not in DATASET_NAMES]
    if unknown or not datasets:
        raise UserError(f"datasets {datasets}: choose from {', '.join(DATASET_NAMES)}")
    if num_sequences < 1:
        raise UserError(f"sequences={num_sequences}: must be >= 1")
    config.validate()
    out = Path(out).expanduser()
    for name in datasets:
        target = out / name
        if target.exists() and any(target.iterdir()):
            if not overwrite:
                raise UserError(f"{target} is not empty: choose another output folder or pass "
                                "--overwrite to replace it")
            shutil.rmtree(target)
    configs = [dataclasses.replace(config, seed=config.seed + i) for i in range(num_sequences)]
    scenes = [render_scene(cfg) for cfg in configs]
    manifest: dict = {"synthetic": dataclasses.asdict(config), "datasets": {}}
    for dataset in datasets:
        names = sequence_names(dataset, num_sequences)
        seeds = [cfg.seed for cfg in configs]
        root = Path(dataset) / READER_ROOTS[dataset]
        write_dataset(dataset, dict(zip(names, scenes, strict=True)), out / root, seeds)
        options = ({"intrinsics": [float(v) for v in _dataset_intrinsics(scenes[0])]}
                   if dataset in ("tum", "bonn") else {})
        manifest["datasets"][dataset] = {
            "root": root.as_posix(), "sequences": names, "seeds": seeds, "options": options,
            "frames": config.num_frames, "height": config.height, "width": config.width,
        }
    _write_text(out / "export.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(
        prog="python -m vggt4d.datasets.export",
        description="Write the synthetic scene in the official layouts of DAVIS, Sintel, TUM, "
                    "Bonn and KITTI (a setup check for the dataset readers and benchmarks).")
    parser.add_argument("out", type=Path, help="output folder (one subfolder per dataset)")
    parser.add_argument("--datasets", default=",".join(DATASET_NAMES),
                        help=f"comma-separated subset of {','.join(DATASET_NAMES)} (default all)")
    parser.add_argument("--sequences", type=int, default=2, help="sequences per dataset")
    parser.add_argument("--frames", type=int, default=defaults.num_frames)
    parser.add_argument("--width", type=int, default=defaults.width)
    parser.add_argument("--height", type=int, default=defaults.height)
    parser.add_argument("--num-objects", type=int, default=defaults.num_objects)
    parser.add_argument("--object-speed", type=float, default=defaults.object_speed)
    parser.add_argument("--camera-motion", type=float, default=defaults.camera_motion)
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the first sequence; sequence i uses seed + i")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing dataset folders under OUT")
    args = parser.parse_args(argv)
    config = SyntheticConfig(num_frames=args.frames, width=args.width, height=args.height,
                             num_objects=args.num_objects, object_speed=args.object_speed,
                             camera_motion=args.camera_motion, seed=args.seed)
    try:
        manifest = export_synthetic(args.out, [d for d in args.datasets.split(",") if d],
                                    config, args.sequences, args.overwrite)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for dataset, entry in manifest["datasets"].items():
        print(f"{dataset}: {args.out / entry['root']} ({', '.join(entry['sequences'])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
