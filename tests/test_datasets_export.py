"""The synthetic exporter: its files are byte-compatible with the official formats (headers
parsed here with struct), and exporter → reader returns the rendered scene (depth within its
quantisation, poses to float tolerance, a back-projected pixel lands on the same pixel through
the read cameras)."""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from test_datasets_readers import raises_one_line

from vggt4d.datasets import read_sequence
from vggt4d.datasets.export import export_synthetic, main
from vggt4d.synthetic import SyntheticConfig, SyntheticScene, render_scene

CONFIG = SyntheticConfig(num_frames=5, width=48, height=36, num_objects=2, seed=7)
ALL = ["davis2016", "davis2017", "sintel", "tum", "bonn", "kitti"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export")
    return out, export_synthetic(out, ALL, CONFIG, num_sequences=2)


@pytest.fixture(scope="module")
def scenes() -> list[SyntheticScene]:
    """The two exported clips rendered again here (seeds 7 and 8)."""
    return [render_scene(dataclasses.replace(CONFIG, seed=CONFIG.seed + i)) for i in range(2)]


def _read(exported, dataset: str, index: int):
    out, manifest = exported
    entry = manifest["datasets"][dataset]
    return read_sequence(dataset, out / entry["root"], entry["sequences"][index],
                         **entry["options"])


def _png_chunks(path: Path) -> dict[bytes, bytes]:
    """Chunk type → data of a PNG file, checked against its CRCs."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = {}, 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind = data[offset + 4:offset + 8]
        body = data[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks.setdefault(kind, body)
        offset += 12 + length
    return chunks


def _bit_depth_and_colour_type(path: Path) -> tuple[int, int]:
    ihdr = _png_chunks(path)[b"IHDR"]
    return ihdr[8], ihdr[9]


# ------------------------------------------------------------------------------ bytes
def test_files_have_the_official_byte_formats(exported):
    out, _ = exported
    h, w = CONFIG.height, CONFIG.width
    dpt = (out / "sintel/training/depth/synthetic_1/frame_0001.dpt").read_bytes()
    assert struct.unpack("<fii", dpt[:12]) == (202021.25, w, h) and len(dpt) == 12 + 4 * w * h
    cam = (out / "sintel/training/camdata_left/synthetic_1/frame_0005.cam").read_bytes()
    assert len(cam) == 4 + 8 * 21 and struct.unpack("<f", cam[:4]) == (202021.25,)
    assert struct.unpack("<9d", cam[4:76])[6:] == (0.0, 0.0, 1.0)  # M's last row
    for path in (out / "tum/rgbd_dataset_synthetic_0/depth").iterdir():
        assert _bit_depth_and_colour_type(path) == (16, 0)  # 16-bit greyscale
    kitti_depth = out / "kitti/val/2000_01_01_drive_0001_sync/proj_depth/groundtruth/image_02"
    assert _bit_depth_and_colour_type(kitti_depth / "0000000004.png") == (16, 0)
    annotation = out / "davis2017/DAVIS/Annotations/480p/synthetic-0/00002.png"
    chunks = _png_chunks(annotation)
    assert chunks[b"IHDR"][8:10] == bytes([8, 3])  # 8-bit palette
    palette = np.frombuffer(chunks[b"PLTE"], np.uint8).reshape(-1, 3)
    assert palette[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    binary = out / "davis2016/DAVIS/Annotations/480p/synthetic-0/00002.png"
    assert _bit_depth_and_colour_type(binary) == (8, 0)
    jpeg = out / "davis2016/DAVIS/JPEGImages/480p/synthetic-0/00000.jpg"
    assert jpeg.read_bytes()[:2] == b"\xff\xd8"


def test_text_files_follow_the_tum_and_davis_formats(exported, scenes):
    out, _ = exported
    folder = out / "bonn/rgbd_bonn_dataset/rgbd_bonn_synthetic_1"
    rows = [line.split() for line in (folder / "groundtruth.txt").read_text().splitlines()
            if not line.startswith("#")]
    assert len(rows) == CONFIG.num_frames and {len(row) for row in rows} == {8}
    quaternions = np.array([[float(v) for v in row[4:]] for row in rows])
    assert np.allclose(np.linalg.norm(quaternions, axis=1), 1.0)
    stamps = [float(line.split()[0]) for line in (folder / "rgb.txt").read_text().splitlines()
              if not line.startswith("#")]
    assert np.allclose(np.diff(stamps), 1 / 30, atol=1e-6)
    lines = (out / "davis2016/DAVIS/ImageSets/480p/val.txt").read_text().splitlines()
    assert len(lines) == 2 * CONFIG.num_frames
    assert lines[6] == ("/JPEGImages/480p/synthetic-1/00001.jpg "
                        "/Annotations/480p/synthetic-1/00001.png")
    names = (out / "davis2017/DAVIS/ImageSets/2017/val.txt").read_text()
    assert names == "synthetic-0\nsynthetic-1\n"
    calib = (out / "kitti/2000_01_01/calib_cam_to_cam.txt").read_text()
    p_rect = [float(v) for v in calib.split("P_rect_02:")[1].split("\n")[0].split()]
    k_scene = scenes[0].intrinsics[0].astype(np.float64)
    assert p_rect[2] == k_scene[0, 2] - 0.5 and p_rect[0] == k_scene[0, 0]


# ------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("dataset", ["davis2016", "davis2017"])
def test_davis_round_trip(exported, scenes, dataset):
    for index, scene in enumerate(scenes):
        seq = _read(exported, dataset, index)
        assert np.array_equal(seq.dynamic_masks, scene.dynamic_masks)
        assert not seq.void_masks.any()
        error = np.abs(seq.frames.astype(int) - scene.frames)
        assert error.mean() < 4.0  # JPEG at quality 95 on 48x36 frames that are all edges
    seq = read_sequence("davis2017", exported[0] / "davis2017/DAVIS", "synthetic-1",
                        annotations="unsupervised", start=2)
    assert np.array_equal(seq.dynamic_masks, scenes[1].dynamic_masks[2:])


def _pixel_world_points(scene: SyntheticScene, t: int, pixels: np.ndarray) -> np.ndarray:
    """World points (N, 3) seen at the centres of ``pixels`` (N, 2) (column, row) of frame t,
    back-projected with the scene's own depth and cameras in float64."""
    k_mat = scene.intrinsics[t].astype(np.float64)
    rot, trans = (scene.extrinsics[t, :, :3].astype(np.float64),
                  scene.extrinsics[t, :, 3].astype(np.float64))
    depth = scene.depth[t, pixels[:, 1], pixels[:, 0]].astype(np.float64)
    rays = np.linalg.solve(k_mat, np.stack([pixels[:, 0] + 0.5, pixels[:, 1] + 0.5,
                                            np.ones(len(pixels))]))
    return ((rays * depth).T - trans) @ rot  # Rᵀ (X_cam − t), row-wise


def _project(k_mat: np.ndarray, w2c: np.ndarray, points: np.ndarray) -> np.ndarray:
    cam = points @ w2c[:, :3].T + w2c[:, 3]
    image = cam @ k_mat.T
    return image[:, :2] / image[:, 2:]


def _check_cameras(seq, scene: SyntheticScene) -> None:
    """A pixel on a moving object and a room pixel, back-projected in the scene, land on their
    own pixel centres through the read cameras, in every frame."""
    for t in range(len(scene.frames)):
        rows, cols = np.nonzero(scene.dynamic_masks[t])
        pixels = np.array([[cols[len(cols) // 2], rows[len(rows) // 2]], [3, 30]])
        points = _pixel_world_points(scene, t, pixels)
        projected = _project(seq.intrinsics[t], seq.extrinsics[t], points)
        assert np.allclose(projected, pixels + 0.5, atol=1e-3)
        assert np.array_equal(np.floor(projected).astype(int), pixels)


def test_sintel_round_trip(exported, scenes):
    for index, scene in enumerate(scenes):
        seq = _read(exported, "sintel", index)
        assert np.array_equal(seq.frames, scene.frames)
        assert np.array_equal(seq.depth, scene.depth)
        assert np.array_equal(seq.intrinsics, scene.intrinsics.astype(np.float64))
        assert np.array_equal(seq.extrinsics, scene.extrinsics.astype(np.float64))
        _check_cameras(seq, scene)


@pytest.mark.parametrize("dataset", ["tum", "bonn"])
def test_tum_and_bonn_round_trip(exported, scenes, dataset):
    for index, scene in enumerate(scenes):
        seq = _read(exported, dataset, index)
        assert np.array_equal(seq.frames, scene.frames)
        assert np.abs(seq.depth - scene.depth).max() <= 0.5 / 5000 + 1e-6  # 16-bit × 5000
        assert np.allclose(seq.extrinsics, scene.extrinsics, atol=2e-6, rtol=0)
        assert np.allclose(seq.intrinsics, scene.intrinsics, atol=1e-9, rtol=0)
        _check_cameras(seq, scene)
    seq = _read(exported, dataset, 1)
    picked = read_sequence(dataset, exported[0] / exported[1]["datasets"][dataset]["root"],
                           seq.name, start=1, stride=2, associate_with=["pose"])
    assert np.array_equal(picked.timestamps, seq.timestamps[1::2])
    assert np.array_equal(picked.extrinsics, seq.extrinsics[1::2])


def test_kitti_round_trip(exported, scenes):
    empty_rows = round(0.3 * CONFIG.height)
    for index, scene in enumerate(scenes):
        seq = _read(exported, "kitti", index)
        assert np.array_equal(seq.frames, scene.frames)
        assert np.isnan(seq.depth[:, :empty_rows]).all()
        assert np.abs(seq.depth[:, empty_rows:] - scene.depth[:, empty_rows:]).max() <= 0.5 / 256
        assert np.allclose(seq.intrinsics, scene.intrinsics, atol=1e-9, rtol=0)
        # no camera poses in KITTI depth: a camera-frame point projects through K alone
        k_mat = scene.intrinsics[0].astype(np.float64)
        camera_point = scene.depth[0, 30, 20] * np.linalg.solve(k_mat, [20.5, 30.5, 1.0])
        assert np.allclose(_project(seq.intrinsics[0], np.eye(3, 4), camera_point[None]),
                           [[20.5, 30.5]], atol=1e-6)


# ------------------------------------------------------------------------------ command
def test_command_writes_a_manifest_and_refuses_to_mix_exports(tmp_path: Path, capsys):
    args = [str(tmp_path), "--datasets", "sintel,kitti", "--frames", "3", "--width", "32",
            "--height", "28", "--sequences", "1"]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "export.json").read_text())
    assert sorted(manifest["datasets"]) == ["kitti", "sintel"]
    assert manifest["datasets"]["kitti"]["sequences"] == ["2000_01_01_drive_0000_sync"]
    assert "sintel: " in capsys.readouterr().out
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--overwrite" in error and "sintel is not empty" in error
    assert main([*args[:-1], "2", "--overwrite"]) == 0
    frames = sorted((tmp_path / "sintel/training/final").iterdir())
    assert [path.name for path in frames] == ["synthetic_0", "synthetic_1"]
    assert main([str(tmp_path / "x"), "--datasets", "nyu"]) == 2
    assert "nyu" in capsys.readouterr().err
    with raises_one_line("synthetic.width = 10"):
        export_synthetic(tmp_path / "y", ["sintel"], SyntheticConfig(width=10))
