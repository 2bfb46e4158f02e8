"""DAVIS, Sintel and KITTI readers and the registry, on files written byte by byte here in the
official formats (struct for Sintel's binaries, Pillow for PNG/JPEG, plain text), including
malformed ones: every error is one line naming the file."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggt4d.datasets import DATASETS, list_sequences, read_sequence, select_indices
from vggt4d.errors import UserError

TAG = 202021.25


@contextlib.contextmanager
def raises_one_line(*parts: str):
    """Expect a UserError whose message is one line containing every one of ``parts``."""
    with pytest.raises(UserError) as info:
        yield info
    message = str(info.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)


def _jpeg(path: Path, rgb: tuple[int, int, int], size=(8, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path, format="JPEG", quality=100)


def _palette_png(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(ids.astype(np.uint8))
    image.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [255, 255, 255] * 253)
    assert image.mode == "P"
    image.save(path)


# ------------------------------------------------------------------------------ selection
def test_selection_is_python_slicing():
    for count in (1, 5, 12):
        for start in (0, 1, 4):
            for stop in (None, 3, 10, 40):
                for stride in (1, 2, 3):
                    for max_frames in (None, 1, 2):
                        expected = list(range(count))[start:stop:stride][:max_frames]
                        if not expected:
                            with raises_one_line("picks no frame"):
                                select_indices(count, start, stop, stride, max_frames)
                            continue
                        got = select_indices(count, start, stop, stride, max_frames)
                        assert got.tolist() == expected and got.dtype == np.int64


@pytest.mark.parametrize(("kwargs", "part"), [
    ({"start": -1}, "start=-1"), ({"stride": 0}, "stride=0"),
    ({"max_frames": 0}, "max_frames=0"), ({"stop": -2}, "stop=-2")])
def test_selection_refuses_bad_values(kwargs, part):
    with raises_one_line(part):
        select_indices(10, **kwargs)


# ------------------------------------------------------------------------------ DAVIS
@pytest.fixture
def davis2017(tmp_path: Path) -> Path:
    root = tmp_path / "DAVIS"
    ids = np.zeros((3, 6, 8), dtype=np.uint8)
    ids[0, 1:3, 1:4] = 1
    ids[1, 2:4, 2:6] = 2
    ids[1, 0, :] = 255
    ids[2, 4:, 5:] = 1
    ids[2, 0:2, 0:2] = 2
    for t in range(3):
        _jpeg(root / "JPEGImages" / "480p" / "dog" / f"{t:05d}.jpg", (40 * t, 100, 200))
        _palette_png(root / "Annotations" / "480p" / "dog" / f"{t:05d}.png", ids[t])
        _palette_png(root / "Annotations_unsupervised" / "480p" / "dog" / f"{t:05d}.png",
                     np.full((6, 8), 3 if t == 1 else 0))
    _jpeg(root / "JPEGImages" / "480p" / "cat" / "00000.jpg", (0, 0, 0))
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("dog\ncat\n\n")
    np.save(tmp_path / "ids.npy", ids)
    return tmp_path


def test_davis2017_unites_objects_and_keeps_void_apart(davis2017: Path):
    ids = np.load(davis2017 / "ids.npy")
    seq = read_sequence("davis2017", davis2017, "dog")  # the parent of DAVIS/ is accepted too
    assert seq.frames.shape == (3, 6, 8, 3) and seq.frames.dtype == np.uint8
    assert np.abs(seq.frames[2].astype(int) - [80, 100, 200]).max() <= 3  # a flat JPEG
    assert np.array_equal(seq.dynamic_masks, (ids == 1) | (ids == 2))
    assert np.array_equal(seq.void_masks, ids == 255)
    assert seq.frame_names == ["00000", "00001", "00002"]
    assert seq.depth is None and seq.extrinsics is None and seq.intrinsics is None
    assert list_sequences("davis2017", davis2017 / "DAVIS") == ["dog", "cat"]


def test_davis_selection_and_unsupervised_annotations(davis2017: Path):
    seq = read_sequence("davis2017", davis2017, "dog", start=1, max_frames=1,
                        annotations="unsupervised")
    assert seq.frame_names == ["00001"] and seq.frame_indices.tolist() == [1]
    assert seq.dynamic_masks.all() and not seq.void_masks.any()


def test_davis2016_binary_annotations_and_2016_imagesets(tmp_path: Path):
    root = tmp_path / "DAVIS"
    mask = np.zeros((6, 8), dtype=np.uint8)
    mask[2:5, 3:7] = 255
    for t in range(2):
        _jpeg(root / "JPEGImages" / "480p" / "bear" / f"{t:05d}.jpg", (10, 20, 30))
        path = root / "Annotations" / "480p" / "bear" / f"{t:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(path)  # greyscale 0 / 255, as the 2016 release
    sets = root / "ImageSets" / "480p"
    sets.mkdir(parents=True)
    (sets / "val.txt").write_text(
        "/JPEGImages/480p/bear/00000.jpg /Annotations/480p/bear/00000.png\n"
        "/JPEGImages/480p/bear/00001.jpg /Annotations/480p/bear/00001.png\n"
        "/JPEGImages/480p/swan/00000.jpg /Annotations/480p/swan/00000.png\n")
    seq = read_sequence("davis2016", root, "bear")
    assert np.array_equal(seq.dynamic_masks, np.stack([mask == 255] * 2))
    assert not seq.void_masks.any()
    assert list_sequences("davis2016", root) == ["bear", "swan"]
    (sets / "val.txt").write_text("/JPEGImages/480p/bear/00000.jpg\n")
    with raises_one_line("val.txt, line 1", "expected"):
        list_sequences("davis2016", root)


def test_davis_errors(davis2017: Path):
    base = davis2017 / "DAVIS"
    with raises_one_line("'owl' not found", "owl"):
        read_sequence("davis2017", base, "owl")
    with raises_one_line("no JPEGImages"):
        read_sequence("davis2017", davis2017 / "nowhere", "dog")
    with raises_one_line("annotations='weak'", "semi-supervised"):
        read_sequence("davis2017", base, "dog", annotations="weak")
    with raises_one_line("annotations", "cat"):
        read_sequence("davis2017", base, "cat")  # no annotation folder
    (base / "Annotations" / "480p" / "dog" / "00001.png").unlink()
    with raises_one_line("DAVIS annotation not found", "00001.png"):
        read_sequence("davis2017", base, "dog")
    Image.new("RGB", (8, 6)).save(base / "Annotations" / "480p" / "dog" / "00001.png")
    with raises_one_line("00001.png", "mode RGB"):
        read_sequence("davis2017", base, "dog")
    _palette_png(base / "Annotations" / "480p" / "dog" / "00001.png", np.zeros((5, 8)))
    with raises_one_line("00001.png", "annotation is 8x5", "8x6"):
        read_sequence("davis2017", base, "dog")
    (base / "Annotations" / "480p" / "dog" / "00001.png").write_bytes(b"not a png")
    with raises_one_line("cannot read image", "00001.png"):
        read_sequence("davis2017", base, "dog")
    (base / "ImageSets" / "2017" / "val.txt").write_text("dog cat\n")
    with raises_one_line("val.txt, line 1", "one sequence name"):
        list_sequences("davis2017", base)


# ------------------------------------------------------------------------------ Sintel
def _dpt(path: Path, depth: np.ndarray, tag: float = TAG) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = depth.shape
    path.write_bytes(struct.pack("<fii", tag, width, height)
                     + struct.pack(f"<{depth.size}f", *depth.ravel().tolist()))


def _cam(path: Path, m_mat: np.ndarray, n_mat: np.ndarray, tag: float = TAG) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<f9d12d", tag, *m_mat.ravel().tolist(),
                                 *n_mat.ravel().tolist()))


SINTEL_M = np.array([[1120.0, 0.0, 3.5], [0.0, 1120.0, 2.5], [0.0, 0.0, 1.0]])


@pytest.fixture
def sintel_root(tmp_path: Path) -> Path:
    training = tmp_path / "training"
    rng = np.random.default_rng(0)
    for t in range(1, 5):
        stem = f"frame_{t:04d}"
        image = training / "final" / "alley_2" / f"{stem}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 8, 3), 10 * t, dtype=np.uint8)).save(image)
        _dpt(training / "depth" / "alley_2" / f"{stem}.dpt",
             rng.uniform(0.5, 80.0, (6, 8)).astype(np.float32))
        n_mat = np.concatenate([np.eye(3), [[t], [0.5], [-2.0]]], axis=1)
        _cam(training / "camdata_left" / "alley_2" / f"{stem}.cam", SINTEL_M, n_mat)
    return tmp_path


def test_sintel_reads_depth_and_cameras(sintel_root: Path):
    seq = read_sequence("sintel", sintel_root, "alley_2", start=1, stride=2)
    assert seq.frame_names == ["frame_0002", "frame_0004"]
    assert seq.frames[1].max() == 40 and seq.frames[1].min() == 40
    raw = (sintel_root / "training" / "depth" / "alley_2" / "frame_0004.dpt").read_bytes()
    expected = np.array(struct.unpack("<48f", raw[12:]), dtype=np.float32).reshape(6, 8)
    assert seq.depth.dtype == np.float32 and np.array_equal(seq.depth[1], expected)
    # (W - 1)/2 = 3.5 in Sintel's integer pixel centres is the image centre 4.0 here
    k_expected = np.array([[1120.0, 0.0, 4.0], [0.0, 1120.0, 3.0], [0.0, 0.0, 1.0]])
    assert np.array_equal(seq.intrinsics, np.stack([k_expected] * 2))
    assert np.array_equal(seq.extrinsics[0], [[1, 0, 0, 2], [0, 1, 0, 0.5], [0, 0, 1, -2]])
    assert list_sequences("sintel", sintel_root / "training") == ["alley_2"]


def test_sintel_errors(sintel_root: Path):
    training = sintel_root / "training"
    dpt = training / "depth" / "alley_2" / "frame_0002.dpt"
    cam = training / "camdata_left" / "alley_2" / "frame_0003.cam"
    good = dpt.read_bytes()
    _dpt(dpt, np.ones((6, 8), np.float32), tag=1.0)
    with raises_one_line("frame_0002.dpt", "wrong tag", "202021.25"):
        read_sequence("sintel", sintel_root, "alley_2")
    dpt.write_bytes(good[:-4])
    with raises_one_line("frame_0002.dpt", "truncated"):
        read_sequence("sintel", sintel_root, "alley_2")
    dpt.write_bytes(good[:7])
    with raises_one_line("frame_0002.dpt", "truncated", "header"):
        read_sequence("sintel", sintel_root, "alley_2")
    dpt.write_bytes(good + b"\0\0\0\0")
    with raises_one_line("frame_0002.dpt", "trailing bytes"):
        read_sequence("sintel", sintel_root, "alley_2")
    dpt.write_bytes(struct.pack("<fii", TAG, 0, 6))
    with raises_one_line("frame_0002.dpt", "invalid .dpt size 0x6"):
        read_sequence("sintel", sintel_root, "alley_2")
    _dpt(dpt, np.ones((5, 8), np.float32))
    with raises_one_line("frame_0002.dpt", "depth is 8x5"):
        read_sequence("sintel", sintel_root, "alley_2")
    dpt.write_bytes(good)
    cam.write_bytes(cam.read_bytes()[:-8])
    with raises_one_line("frame_0003.cam", "172 bytes", "164"):
        read_sequence("sintel", sintel_root, "alley_2")
    _cam(cam, SINTEL_M, np.zeros((3, 4)), tag=TAG + 1)
    with raises_one_line("frame_0003.cam", "wrong tag"):
        read_sequence("sintel", sintel_root, "alley_2")
    cam.unlink()
    with raises_one_line("Sintel camera file not found", "frame_0003.cam"):
        read_sequence("sintel", sintel_root, "alley_2")
    with raises_one_line("'cave_4' not found"):
        read_sequence("sintel", sintel_root, "cave_4")
    with raises_one_line("pass_name='albedo'"):
        read_sequence("sintel", sintel_root, "alley_2", pass_name="albedo")
    with raises_one_line("no training/final"):
        read_sequence("sintel", sintel_root / "elsewhere", "alley_2")
    (training / "depth" / "alley_2" / "frame_0001.dpt").unlink()
    for path in (training / "depth" / "alley_2").iterdir():
        path.unlink()
    (training / "depth" / "alley_2").rmdir()
    with raises_one_line("Sintel depth of 'alley_2'", "MPI-Sintel-depth-training"):
        read_sequence("sintel", sintel_root, "alley_2")


# ------------------------------------------------------------------------------ KITTI
DRIVE = "2011_09_26_drive_0002_sync"
P_RECT_02 = ("7.215377e+02 0.000000e+00 6.095593e+02 4.485728e+01 0.000000e+00 7.215377e+02 "
             "1.728540e+02 2.163791e-01 0.000000e+00 0.000000e+00 1.000000e+00 2.745884e-03")


@pytest.fixture
def kitti_root(tmp_path: Path) -> Path:
    raw = np.zeros((4, 6), dtype=np.uint16)
    raw[1] = [256, 1000, 60000, 0, 512, 128]
    for index in range(5, 9):
        name = f"{index:010d}.png"
        depth = tmp_path / "val" / DRIVE / "proj_depth" / "groundtruth" / "image_02" / name
        depth.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(raw + index).save(depth)
        image = tmp_path / "2011_09_26" / DRIVE / "image_02" / "data" / name
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 6, 3), index, dtype=np.uint8)).save(image)
    (tmp_path / "2011_09_26" / "calib_cam_to_cam.txt").write_text(
        "calib_time: 09-Jan-2012 13:57:47\ncorner_dist: 9.950000e-02\n"
        "S_rect_02: 6.000000e+00 4.000000e+00\n"
        f"P_rect_02: {P_RECT_02}\n")
    return tmp_path


def test_kitti_depth_raw_frames_and_intrinsics(kitti_root: Path):
    seq = read_sequence("kitti", kitti_root, DRIVE, start=1, max_frames=2)
    assert seq.frame_names == ["0000000006", "0000000007"]
    assert seq.frames[0].max() == 6 and seq.frames[1].min() == 7
    expected_row = np.array([262, 1006, 60006, 6, 518, 134], dtype=np.float32) / 256  # + 6
    assert seq.depth.dtype == np.float32 and np.array_equal(seq.depth[0, 1], expected_row)
    assert np.array_equal(seq.depth[1, 0], np.full(6, 7 / 256, dtype=np.float32))
    k_expected = np.array([[721.5377, 0.0, 610.0593], [0.0, 721.5377, 173.354], [0, 0, 1.0]])
    assert np.allclose(seq.intrinsics, k_expected, atol=1e-9, rtol=0)
    assert seq.extrinsics is None and seq.dynamic_masks is None
    assert list_sequences("kitti", kitti_root) == [DRIVE]


def test_kitti_zero_is_invalid_and_calibration_is_optional(kitti_root: Path):
    path = kitti_root / "val" / DRIVE / "proj_depth" / "groundtruth" / "image_02"
    values = np.array([[0, 256, 1000], [65535, 0, 1]], dtype=np.uint16)
    Image.fromarray(np.tile(values, (2, 2))).save(path / "0000000005.png")
    (kitti_root / "2011_09_26" / "calib_cam_to_cam.txt").unlink()
    seq = read_sequence("kitti", kitti_root, DRIVE, max_frames=1)
    expected = np.tile(np.array([[np.nan, 1.0, 3.90625], [255.99609375, np.nan, 1 / 256]]), (2, 2))
    assert np.array_equal(seq.depth[0], expected.astype(np.float32), equal_nan=True)
    assert seq.intrinsics is None


def test_kitti_errors(kitti_root: Path):
    calib = kitti_root / "2011_09_26" / "calib_cam_to_cam.txt"
    depth_dir = kitti_root / "val" / DRIVE / "proj_depth" / "groundtruth" / "image_02"
    with raises_one_line("'2011_09_26_drive_0001_sync' not found"):
        read_sequence("kitti", kitti_root, "2011_09_26_drive_0001_sync")
    with raises_one_line("camera='image_00'"):
        read_sequence("kitti", kitti_root, DRIVE, camera="image_00")
    calib.write_text(f"S_rect_02: 1.242000e+03 3.750000e+02\nP_rect_02: {P_RECT_02}\n")
    with raises_one_line("calib_cam_to_cam.txt", "S_rect_02 is 1242x375", "6x4"):
        read_sequence("kitti", kitti_root, DRIVE)
    calib.write_text("P_rect_02: 1 2 3\n")
    with raises_one_line("calib_cam_to_cam.txt", "P_rect_02 needs 12"):
        read_sequence("kitti", kitti_root, DRIVE)
    calib.write_text("P_rect_02: 1 2 x 4 5 6 7 8 9 10 11 12\n")
    with raises_one_line("calib_cam_to_cam.txt", "non-number"):
        read_sequence("kitti", kitti_root, DRIVE)
    calib.write_text("S_rect_02 6 4\n")
    with raises_one_line("calib_cam_to_cam.txt, line 1", "key: values"):
        read_sequence("kitti", kitti_root, DRIVE)
    calib.write_text("S_rect_02: 6 4\n")
    with raises_one_line("calib_cam_to_cam.txt", "no P_rect_02"):
        read_sequence("kitti", kitti_root, DRIVE)
    calib.unlink()
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(depth_dir / "0000000006.png")
    with raises_one_line("0000000006.png", "mode L", "16-bit"):
        read_sequence("kitti", kitti_root, DRIVE)
    Image.fromarray(np.zeros((3, 6), np.uint16)).save(depth_dir / "0000000006.png")
    with raises_one_line("0000000006.png", "depth is 6x3"):
        read_sequence("kitti", kitti_root, DRIVE)
    (kitti_root / "2011_09_26" / DRIVE / "image_02" / "data" / "0000000008.png").unlink()
    with raises_one_line("raw KITTI frame not found", "0000000008.png"):
        read_sequence("kitti", kitti_root, DRIVE, start=3)


# ------------------------------------------------------------------------------ registry
def test_registry_names_and_option_checks(sintel_root: Path):
    assert set(DATASETS) == {"davis2016", "davis2017", "sintel", "tum", "bonn", "kitti"}
    with raises_one_line("unknown dataset 'nyu'", "davis2016", "kitti"):
        read_sequence("nyu", sintel_root, "x")
    with raises_one_line("sintel has no option 'year'", "pass_name"):
        read_sequence("sintel", sintel_root, "alley_2", year=2017)
    with raises_one_line("davis2017 has no option 'pass_name'", "split, resolution"):
        list_sequences("davis2017", sintel_root, pass_name="final")
