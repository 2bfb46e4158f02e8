"""TUM RGB-D / Bonn reader on hand-written sequences (text files, 16-bit PNGs written here), its
conversions against hand-computed poses, and timestamp association against a brute-force loop
over all pairs (TUM's associate.py procedure written out plainly)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_datasets_readers import raises_one_line

from vggt4d.datasets import list_sequences, read_sequence
from vggt4d.datasets.tum import associate

HEADER = "# color images\n# file: 'x.bag'\n# timestamp filename\n"
S = math.sqrt(0.5)


def _rgb(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 5, 3), value, dtype=np.uint8)).save(path)


def _depth(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint16)).save(path)


DEPTH_RAW = np.array([[0, 5000, 12345, 65532, 1]] * 4)  # + frame index: up to 65535


def _sequence(folder: Path) -> None:
    """Four RGB frames (t = 10.0, 10.1, 10.2, 10.3); depth for all, stamped 5 ms late;
    ground truth for frames 0, 1, 3 (frame 2's nearest pose is 25 ms away)."""
    rgb_lines, depth_lines = [], []
    for index, stamp in enumerate((10.0, 10.1, 10.2, 10.3)):
        _rgb(folder / "rgb" / f"{stamp:.6f}.png", 50 + index)
        _depth(folder / "depth" / f"{stamp + 0.005:.6f}.png", DEPTH_RAW + index)
        rgb_lines.append(f"{stamp:.6f} rgb/{stamp:.6f}.png")
        depth_lines.append(f"{stamp + 0.005:.6f}\tdepth/{stamp + 0.005:.6f}.png")
    rgb_lines[1] = rgb_lines[1].replace(" ", ",")  # associate.py also splits on commas
    (folder / "rgb.txt").write_text(HEADER + "\n".join(rgb_lines) + "\n\n")
    (folder / "depth.txt").write_text(HEADER + "\n".join(depth_lines) + "\n")
    (folder / "groundtruth.txt").write_text(
        "# ground truth trajectory\n# timestamp tx ty tz qx qy qz qw\n"
        "9.9990 1 2 3 0 0 0.7071067811865476 0.7071067811865476\n"  # 90 deg about z
        "10.0980 0 0 0 0 0 0 2\n"  # identity, quaternion not normalised
        "10.1750 9 9 9 0 0 0 1\n"  # 25 ms from frame 2: too far
        "10.2990 -1 0 0.5 1 0 0 0\n")  # 180 deg about x


@pytest.fixture
def tum_root(tmp_path: Path) -> Path:
    _sequence(tmp_path / "rgbd_dataset_freiburg3_walking_xyz")
    return tmp_path


def test_poses_depth_and_intrinsics_are_converted(tum_root: Path):
    seq = read_sequence("tum", tum_root, "freiburg3_walking_xyz")
    assert seq.name == "rgbd_dataset_freiburg3_walking_xyz"
    assert seq.timestamps.tolist() == [10.0, 10.1, 10.3]  # frame 2 has no pose
    assert seq.frame_indices.tolist() == [0, 1, 2]
    assert [int(frame[0, 0, 0]) for frame in seq.frames] == [50, 51, 53]
    # camera-to-world R = Rz(90°), C = (1, 2, 3) → world-to-camera [Rᵀ | −Rᵀ C]
    expected0 = np.array([[0, 1, 0, -2], [-1, 0, 0, 1], [0, 0, 1, -3.0]])
    expected2 = np.array([[1, 0, 0, 1], [0, -1, 0, 0], [0, 0, -1, 0.5]])
    assert np.allclose(seq.extrinsics[0], expected0, atol=1e-12)
    assert np.allclose(seq.extrinsics[1], np.eye(3, 4), atol=1e-12)
    assert np.allclose(seq.extrinsics[2], expected2, atol=1e-12)
    raw = DEPTH_RAW + np.array([0, 1, 3])[:, None, None]
    expected_depth = np.where(raw == 0, np.nan, raw / 5000.0).astype(np.float32)
    assert np.array_equal(seq.depth, expected_depth, equal_nan=True)
    assert np.isnan(seq.depth[0, :, 0]).all() and seq.depth[0, 0, 1] == 1.0
    k_fr3 = np.array([[535.4, 0, 320.6], [0, 539.2, 248.1], [0, 0, 1]])
    assert np.allclose(seq.intrinsics, k_fr3, atol=1e-12, rtol=0)


def test_associate_with_depth_only_keeps_every_frame(tum_root: Path):
    seq = read_sequence("tum", tum_root, "rgbd_dataset_freiburg3_walking_xyz",
                        associate_with=["depth"], start=1, stride=2)
    assert seq.timestamps.tolist() == [10.1, 10.3] and seq.frame_indices.tolist() == [1, 3]
    assert seq.extrinsics is None and seq.depth.shape == (2, 4, 5)
    with raises_one_line("no RGB frame has a depth entry within 0.004 s"):
        read_sequence("tum", tum_root, "freiburg3_walking_xyz", associate_with=["depth"],
                      max_difference=0.004)  # the depth is stamped 5 ms late


def test_bonn_names_calibration_and_override(tmp_path: Path):
    _sequence(tmp_path / "rgbd_bonn_dataset" / "rgbd_bonn_balloon2")
    assert list_sequences("bonn", tmp_path) == ["rgbd_bonn_balloon2"]
    seq = read_sequence("bonn", tmp_path, "balloon2", associate_with=["pose"])
    assert seq.depth is None and len(seq.frames) == 3
    k_bonn = [[542.822841, 0, 316.09352], [0, 542.57687, 238.256098], [0, 0, 1]]
    assert np.allclose(seq.intrinsics[0], k_bonn, atol=1e-12, rtol=0)
    seq = read_sequence("bonn", tmp_path / "rgbd_bonn_dataset", "rgbd_bonn_balloon2",
                        intrinsics=[100, 110, 2, 1.5])
    assert np.array_equal(seq.intrinsics[1], [[100, 0, 2.5], [0, 110, 2], [0, 0, 1]])
    _sequence(tmp_path / "tum" / "rgbd_dataset_synthetic")
    assert read_sequence("tum", tmp_path / "tum", "synthetic").intrinsics is None


def test_errors_are_one_line(tum_root: Path):
    folder = tum_root / "rgbd_dataset_freiburg3_walking_xyz"
    truth = folder / "groundtruth.txt"
    good = truth.read_text()
    truth.write_text(good + "10.4 1 2 3 0 0 0\n")
    with raises_one_line("groundtruth.txt, line 7", "expected 8 fields, got 7"):
        read_sequence("tum", tum_root, "freiburg3_walking_xyz")
    truth.write_text(good + "ten 1 2 3 0 0 0 1\n")
    with raises_one_line("groundtruth.txt, line 7", "'ten' is not a number"):
        read_sequence("tum", tum_root, "freiburg3_walking_xyz")
    truth.write_text(good + "10.4 1 2 x 0 0 0 1\n")
    with raises_one_line("groundtruth.txt, line 7", "bad pose", "'x'"):
        read_sequence("tum", tum_root, "freiburg3_walking_xyz")
    truth.write_text(good + "10.4 1 2 3 0 0 0 0\n")
    with raises_one_line("groundtruth.txt, line 7", "bad pose", "zero norm"):
        read_sequence("tum", tum_root, "freiburg3_walking_xyz")
    truth.write_text("# nothing\n")
    with raises_one_line("groundtruth.txt lists no entries"):
        read_sequence("tum", tum_root, "freiburg3_walking_xyz")
    truth.write_text("50.0 0 0 0 0 0 0 1\n")
    with raises_one_line("no RGB frame has a depth and pose entry within 0.02 s"):
        read_sequence("tum", tum_root, "freiburg3_walking_xyz")
    truth.unlink()
    with raises_one_line("ground-truth trajectory not found", "groundtruth.txt"):
        read_sequence("tum", tum_root, "freiburg3_walking_xyz")
    with raises_one_line("associate_with=['pose', 'imu']", "'imu'"):
        read_sequence("tum", tum_root, "freiburg3_walking_xyz", associate_with=["pose", "imu"])
    with raises_one_line("tum sequence 'walking_rpy' not found"):
        read_sequence("tum", tum_root, "walking_rpy")
    with raises_one_line("intrinsics=[1.0, 2.0]", "[fx, fy, cx, cy]"):
        read_sequence("tum", tum_root, "freiburg3_walking_xyz", associate_with=["depth"],
                      intrinsics=[1.0, 2.0])
    depth_png = folder / "depth" / "10.105000.png"
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(depth_png)
    with raises_one_line("10.105000.png", "mode L", "16-bit"):
        read_sequence("tum", tum_root, "freiburg3_walking_xyz", associate_with=["depth"])
    (folder / "rgb" / "10.200000.png").unlink()
    with raises_one_line("image not found", "10.200000.png"):
        read_sequence("tum", tum_root, "freiburg3_walking_xyz", associate_with=[])


# --------------------------------------------------------------------------- association
def _brute_force(first, second, max_difference):
    """TUM's associate.py on index pairs: all candidates, sorted, taken greedily."""
    candidates = sorted(
        (abs(a - b), a, b, i, j)
        for i, a in enumerate(first) for j, b in enumerate(second)
        if abs(a - b) < max_difference)
    used_i, used_j, matches = set(), set(), []
    for _, a, b, i, j in candidates:
        if i not in used_i and j not in used_j:
            used_i.add(i)
            used_j.add(j)
            matches.append((a, b))
    return sorted(matches)


@pytest.mark.parametrize("seed", range(8))
def test_association_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    rgb = 100.0 + np.arange(60) / 30.0 + rng.uniform(-0.004, 0.004, 60)
    gt = 99.9 + np.sort(rng.uniform(0.0, 2.3, 230))  # about 100 Hz, irregular
    if seed % 2:
        gt = np.concatenate([gt, rgb[::7] + 0.01])  # equal distances to neighbours: ties
        rng.shuffle(gt)
    pairs = associate(rgb, gt, 0.02)
    got = [(rgb[i], gt[j]) for i, j in pairs]
    assert got == _brute_force(rgb.tolist(), gt.tolist(), 0.02)
    assert len(set(pairs[:, 0])) == len(pairs) == len(set(pairs[:, 1]))


def test_association_on_a_coarse_grid_with_many_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        first = rng.integers(0, 40, 25) / 8.0  # exact binary fractions: many equal distances
        second = rng.integers(0, 40, 30) / 8.0
        pairs = associate(first, second, 0.3)
        got = sorted((first[i], second[j]) for i, j in pairs)
        assert got == _brute_force(first.tolist(), second.tolist(), 0.3)


def test_association_edge_cases():
    assert associate(np.array([1.0]), np.array([1.25]), 0.25).shape == (0, 2)  # strict <
    assert associate(np.array([1.0]), np.array([1.25]), 0.2500001).tolist() == [[0, 0]]
    assert associate(np.array([]), np.array([1.0]), 0.02).shape == (0, 2)
    assert associate(np.array([1.0, 2.0]), np.array([1.5]), 0.02).shape == (0, 2)
