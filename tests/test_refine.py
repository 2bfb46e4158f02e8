"""3-D refinement of coarse dynamic masks: VGGT4D's official rules, checked independently.

References written here: a pinhole model (camera centre and axes, no matrix inverse), Open3D's
statistical outlier rule as a per-point loop, torch ``grid_sample``'s nearest / bilinear
sampling written out per sample (zeros outside, or the border repeated), a per-point, per-frame
loop of the official projection rule and cluster decision, OpenCV's elliptic element and
morphology (``cv2``), hand-computed samples for the half-pixel quirk, central finite differences
of the projection-gradient loss, and the synthetic scene's exact ground truth.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import cv2
import numpy as np
import pytest
from sklearn.cluster import KMeans

from vggt4d.cameras import backproject, project
from vggt4d.config.refine import RefineConfig
from vggt4d.errors import UserError
from vggt4d.refine import (
    close_and_dilate,
    cluster_scores,
    elliptic_kernel,
    refine_masks,
    sample_frames,
    statistical_inliers,
)
from vggt4d.synthetic import SyntheticConfig, render_scene

BLOCK = (slice(25, 55), slice(100, 130))  # 30×30 on the textured back wall, ≥ 20 px from the sphere
TINY_BLOCK = (slice(3, 9), slice(4, 12))  # 6×8 on the wall of the 48×36 scene
SMALL_BLOCK = (slice(12, 27), slice(50, 65))  # 15×15 on the wall of the 140×105 scene


@pytest.fixture(scope="module")
def scene():
    return render_scene(SyntheticConfig(num_frames=8, object_speed=1.5))


@pytest.fixture(scope="module")
def planted(scene):
    mask = np.zeros_like(scene.dynamic_masks)
    mask[:, BLOCK[0], BLOCK[1]] = True
    return mask


@pytest.fixture(scope="module")
def tiny():
    return render_scene(SyntheticConfig(num_frames=4, width=48, height=36, object_speed=2.0))


def _pinhole_world(scene, t: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """World points of pixels (rows, cols) of frame t: centre + depth · (x̂ a + ŷ b + ẑ)."""
    k_mat = scene.intrinsics[t].astype(np.float64)
    rot = scene.extrinsics[t, :, :3].astype(np.float64)
    centre = -rot.T @ scene.extrinsics[t, :, 3].astype(np.float64)
    a = (cols + 0.5 - k_mat[0, 2]) / k_mat[0, 0]
    b = (rows + 0.5 - k_mat[1, 2]) / k_mat[1, 1]
    z = scene.depth[t, rows, cols].astype(np.float64)
    # the rows of R are the camera's x, y, z axes expressed in world coordinates
    return centre + z[:, None] * (a[:, None] * rot[0] + b[:, None] * rot[1] + rot[2])


def _pinhole_project(intrinsics, extrinsics, s: int, point) -> tuple[float, float, float]:
    """(x, y, z) of a world point in camera s: offsets from the centre along the camera axes."""
    k_mat = np.asarray(intrinsics[s], dtype=np.float64)
    rot = np.asarray(extrinsics[s, :, :3], dtype=np.float64)
    centre = -rot.T @ np.asarray(extrinsics[s, :, 3], dtype=np.float64)
    rel = np.asarray(point, dtype=np.float64) - centre
    z = float(rel @ rot[2])
    x = k_mat[0, 0] * float(rel @ rot[0]) / z + k_mat[0, 2]
    y = k_mat[1, 1] * float(rel @ rot[1]) / z + k_mat[1, 2]
    return x, y, z


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# ------------------------------------------------------------------------------ references


def _open3d_inliers(points: np.ndarray, neighbours: int, std_ratio: float) -> np.ndarray:
    """Open3D's RemoveStatisticalOutliers, one point at a time (the point is its own neighbour)."""
    pts = np.asarray(points, dtype=np.float64)
    n = len(pts)
    avg = np.empty(n)
    for i in range(n):
        dist = np.sort(np.sqrt(((pts - pts[i]) ** 2).sum(axis=1)))[:neighbours]
        avg[i] = dist.mean()
    total = sum(a for a in avg if a > 0)
    mean = total / n
    sq_sum = sum((a - mean) ** 2 for a in avg if a > 0)
    std = math.sqrt(sq_sum / (n - 1)) if n > 1 else math.nan
    return np.array([0 < a < mean + std_ratio * std for a in avg])


def _grid_value(image: np.ndarray, ix: float, iy: float, mode: str, padding: str):
    """torch grid_sample (align_corners=True) at index (ix, iy) of an (H, W[, C]) image."""
    height, width = image.shape[:2]
    if padding == "border":
        ix, iy = min(max(ix, 0.0), width - 1.0), min(max(iy, 0.0), height - 1.0)

    def at(row: int, col: int):
        inside = 0 <= row < height and 0 <= col < width
        return image[row, col] if inside else np.zeros_like(image[0, 0])

    if mode == "nearest":
        return at(round(iy), round(ix))  # Python's round: ties to even, as nearbyint
    x0, y0 = math.floor(ix), math.floor(iy)
    wx, wy = ix - x0, iy - y0
    top = (1 - wx) * at(y0, x0) + wx * at(y0, x0 + 1)
    bottom = (1 - wx) * at(y0 + 1, x0) + wx * at(y0 + 1, x0 + 1)
    return (1 - wy) * top + wy * bottom


def _official_decisions(depth, images, coarse, intrinsics, extrinsics, points, labels, colours,
                        source, settings, count):
    """Per point, per other frame: the projection rule; then each cluster's decision.

    Returns per cluster (samples, counted, depth term, photometric term, dynamic)."""
    t_count, height, width = depth.shape
    padding = "zeros" if settings.sampling == "official" else "border"
    shift = 0.0 if settings.sampling == "official" else 0.5
    samples, counted = np.zeros(count, int), np.zeros(count, int)
    dsum, psum = np.zeros(count), np.zeros(count)
    for point, label, colour in zip(points, labels, colours, strict=True):
        for s in range(t_count):
            if s == source or (settings.window and abs(s - source) > settings.window):
                continue
            samples[label] += 1
            x, y, z = _pinhole_project(intrinsics, extrinsics, s, point)
            if not (z > 0 and 0 < x < width and 0 < y < height):
                continue
            ix, iy = x - shift, y - shift
            d = float(_grid_value(depth[s], ix, iy, "nearest", padding))
            m = float(_grid_value(coarse[s].astype(float), ix, iy, "bilinear", padding))
            rgb = _grid_value(images[s], ix, iy, "bilinear", padding)
            margin = settings.visibility_margin
            visible = z - margin < d if settings.score == "absolute" else z < d * (1 + margin)
            if not (visible and m <= 0.5):
                continue
            counted[label] += 1
            dsum[label] += abs(z - d) / (d if settings.score == "residual" else 1.0)
            psum[label] += np.abs(colour - rgb).sum()
    out = []
    for c in range(count):
        # the official code divides in float32 by (samples + 1e-6)
        ratio = np.float32(counted[c]) / np.float32(samples[c] + 1e-6)
        if ratio < np.float32(settings.min_valid) or counted[c] == 0:
            out.append((samples[c], counted[c], None, None, True))
            continue
        d_term, p_term = dsum[c] / counted[c], psum[c] / counted[c] / 3
        out.append((samples[c], counted[c], d_term, p_term, d_term + p_term > settings.tau))
    return out


def _official_refine(scene, coarse, settings):
    """The official refinement, frame by frame, from the references above, sklearn and cv2."""
    t_count, height, width = coarse.shape
    images = scene.frames / 255.0
    rows, cols = (g.ravel() for g in np.mgrid[0:height, 0:width])
    raw = np.zeros_like(coarse)
    decisions = []
    for t in range(t_count):
        world = _pinhole_world(scene, t, rows, cols).astype(np.float32)
        inlier = _open3d_inliers(world, 20, 2.5)
        dyn = np.flatnonzero(inlier & coarse[t, rows, cols])
        labels = KMeans(n_clusters=min(30, dyn.size), random_state=42).fit_predict(world[dyn])
        frame = _official_decisions(scene.depth, images, coarse, scene.intrinsics,
                                    scene.extrinsics, world[dyn], labels,
                                    images[t, rows[dyn], cols[dyn]], t, settings,
                                    labels.max() + 1)
        decisions.append(frame)
        keep = dyn[np.array([entry[-1] for entry in frame])[labels]]
        raw[t, rows[keep], cols[keep]] = True
    ellipse = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    refined = np.stack([
        cv2.dilate(cv2.morphologyEx(m.astype(np.uint8) * 255, cv2.MORPH_CLOSE, ellipse),
                   np.ones((3, 3), np.uint8)) > 0
        for m in raw
    ])
    return refined, decisions


# ------------------------------------------------------------------------------ geometry


def test_backproject_project_round_trip_on_gt(scene):
    world = backproject(scene.depth, scene.intrinsics, scene.extrinsics)
    assert world.shape == (*scene.depth.shape, 3) and world.dtype == np.float32
    height, width = scene.depth.shape[1:]
    v, u = np.mgrid[0:height, 0:width]
    for t in (0, 5):
        pixel, z = project(world[t].reshape(-1, 3), scene.intrinsics[t], scene.extrinsics[t])
        assert np.abs(pixel[:, 0] - (u.ravel() + 0.5)).max() <= 1e-3
        assert np.abs(pixel[:, 1] - (v.ravel() + 0.5)).max() <= 1e-3
        np.testing.assert_allclose(z, scene.depth[t].ravel(), rtol=1e-5)
        # floor of the returned coordinates is the pixel index
        assert (np.floor(pixel[:, 0]) == u.ravel()).all()
        assert (np.floor(pixel[:, 1]) == v.ravel()).all()
    rows, cols = np.array([0, 17, 100, 209]), np.array([0, 250, 140, 279])
    np.testing.assert_allclose(world[2, rows, cols], _pinhole_world(scene, 2, rows, cols),
                               atol=1e-5)


def test_static_pixel_projects_where_pinhole_says(scene):
    rows, cols = np.array([40, 160, 30]), np.array([115, 30, 200])  # wall, floor, wall
    assert not scene.dynamic_masks[0, rows, cols].any()
    world = backproject(scene.depth, scene.intrinsics, scene.extrinsics)[0, rows, cols]
    pixel, z = project(world, scene.intrinsics[3], scene.extrinsics[3])
    for i, point in enumerate(_pinhole_world(scene, 0, rows, cols)):
        x, y, zz = _pinhole_project(scene.intrinsics, scene.extrinsics, 3, point)
        assert abs(pixel[i, 0] - x) <= 1e-3 and abs(pixel[i, 1] - y) <= 1e-3
        assert abs(z[i] - zz) <= 1e-4
        # a static surface seen from frame 3: the renderer's depth there agrees (visible room)
        assert abs(scene.depth[3, math.floor(y), math.floor(x)] - zz) / zz < 0.02
    # the camera moved: the points do not land where they were in frame 0
    assert np.abs(pixel[:, 0] - (cols + 0.5)).min() > 3


# ------------------------------------------------------------------------------ outliers


def test_statistical_inliers_is_open3d_rule():
    rng = np.random.default_rng(3)
    blob = rng.normal(scale=0.1, size=(300, 3))
    points = np.concatenate([blob, [[5.0, 5.0, 5.0]], np.full((25, 3), 0.05)])  # + duplicates
    keep = statistical_inliers(points, neighbours=20, std_ratio=2.5)
    assert keep.dtype == bool and keep.shape == (326,)
    assert not keep[300]  # the far point
    assert not keep[301:].any()  # ≥ 20 coincident points: mean distance 0, removed by Open3D
    assert keep[:300].mean() > 0.97
    # small ratios put many points near the threshold, so any other definition (self excluded,
    # population std, <=, zeros in the sums) flips some of them
    for k, ratio in [(20, 2.5), (20, 0.1), (8, 0.3), (3, 1.0), (1, 2.0)]:
        np.testing.assert_array_equal(statistical_inliers(points, k, ratio),
                                      _open3d_inliers(points, k, ratio), err_msg=f"{k} {ratio}")
    assert not statistical_inliers(points, 1, 2.0).any()  # k = 1: each point's only neighbour
    # fewer points than neighbours: all of them are the neighbours
    np.testing.assert_array_equal(statistical_inliers(blob[:7], 20, 0.5),
                                  _open3d_inliers(blob[:7], 20, 0.5))
    assert statistical_inliers(points[:1]).tolist() == [False]


def test_statistical_inliers_by_hand():
    line = np.zeros((4, 3))
    line[:, 0] = [0.0, 1.0, 2.0, 10.0]
    # k = 2 (the point and its nearest): m = 0.5, 0.5, 0.5, 4; mean 1.375, sample std
    # sqrt(9.1875 / 3) = 1.75 (population std: 1.516)
    # ratio 1.5: threshold 4.0 exactly, and 4 is not < 4
    assert statistical_inliers(line, 2, 1.5).tolist() == [True, True, True, False]
    # ratio 1.6: 4.175 with the sample std keeps the far point (3.80 with the population std)
    assert statistical_inliers(line, 2, 1.6).tolist() == [True, True, True, True]
    # a duplicate: m = 0, 0, 0.5, 0.5, 4; mean 5 / 5 = 1 (zeros counted in N), squares of the
    # positive ones only: std = sqrt((0.25 + 0.25 + 9) / 4) = 1.541; ratio 1.85: 3.851 < 4
    # (with the zeros' squares: 4.137); the zeros themselves are removed
    dup = np.zeros((5, 3))
    dup[:, 0] = [0.0, 0.0, 1.0, 2.0, 10.0]
    assert statistical_inliers(dup, 2, 1.85).tolist() == [False, False, True, True, False]


# ------------------------------------------------------------------------------ morphology


@pytest.mark.parametrize("size", range(1, 12))
def test_elliptic_kernel_is_opencv(size):
    expected = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size)).astype(bool)
    np.testing.assert_array_equal(elliptic_kernel(size), expected)


def test_elliptic_kernel_5_by_hand():
    expected = np.array([[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1],
                         [0, 0, 1, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(elliptic_kernel(5), expected)


@pytest.mark.parametrize(("close", "dilate", "kind"),
                         [(5, 3, "ellipse"), (4, 2, "ellipse"), (7, 3, "ellipse"),
                          (5, 3, "square"), (0, 3, "ellipse"), (5, 1, "ellipse")])
def test_close_and_dilate_is_opencv(close, dilate, kind):
    rng = np.random.default_rng(close * 10 + dilate)
    masks = rng.random((3, 23, 31)) < 0.35
    masks[1, :4, :] = True  # touching the border
    masks[2] = False
    expected = []
    for mask in masks.astype(np.uint8):
        if close > 1:
            shape = cv2.MORPH_ELLIPSE if kind == "ellipse" else cv2.MORPH_RECT
            element = cv2.getStructuringElement(shape, (close, close))
            mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, element)
        if dilate > 1:
            mask = cv2.dilate(mask, np.ones((dilate, dilate), np.uint8))
        expected.append(mask > 0)
    np.testing.assert_array_equal(close_and_dilate(masks, close, dilate, kind),
                                  np.stack(expected))


# ------------------------------------------------------------------------------ sampling


def test_sample_frames_by_hand():
    image = np.arange(24, dtype=np.float64).reshape(1, 4, 6, 1)  # value = 6 row + col
    x = np.array([[2.8, 2.5, 5.7, 5.4, 0.3]])
    y = np.array([[1.2, 1.5, 1.0, 3.0, 0.2]])
    near = sample_frames(image, x, y, "nearest", "official")[0, :, 0]
    # round(2.8)=3, round(1.2)=1 → 9; ties to even: (2, 2) → 14; round(5.7)=6 is outside → 0
    np.testing.assert_allclose(near[:3], [9.0, 14.0, 0.0])
    bil = sample_frames(image, x, y, "bilinear", "official")[0, :, 0]
    # (2.8, 1.2): 6·1.2 + 2.8; (5.4, 3): 0.6 · 23 + 0.4 · 0 (column 6 is outside, zero)
    np.testing.assert_allclose(bil[[0, 3]], [6 * 1.2 + 2.8, 0.6 * 23.0], atol=1e-12)
    con = sample_frames(image, x, y, "bilinear", "consistent")[0, :, 0]
    # index (x − .5, y − .5), clamped to [0, W − 1] × [0, H − 1]: (2.3, .7) → 6 · .7 + 2.3;
    # (5.2, .5) → (5, .5) → 8; (.3, .2) → (0, 0) → 0
    np.testing.assert_allclose(con[[0, 2, 4]], [6 * 0.7 + 2.3, 8.0, 0.0], atol=1e-12)
    con_near = sample_frames(image, x, y, "nearest", "consistent")[0, :, 0]
    np.testing.assert_allclose(con_near[[0, 2]], [6 * 1 + 2, 6 * 0 + 5])  # (2, 1) and (5, 0)


def _quirk_scene():
    """Two frames of 5×9 pixels seen by the camera K = I, [R | t] = [I | 0] (x = X/Z, y = Y/Z;
    W − 1 = 8 and H − 1 = 4, so grid_sample's normalised coordinates are exact).

    Frame 1: depth 2 (column 3: 2.5), coarse mask on column 4, grey 0.5 (column 4: 0.6)."""
    depth = np.full((2, 5, 9), 2.0)
    depth[1, :, 3] = 2.5
    coarse = np.zeros((2, 5, 9), dtype=bool)
    coarse[1, :, 4] = True
    images = np.full((2, 5, 9, 3), 0.5)
    images[1, :, 4] = 0.6
    k_mats = np.eye(3)[None].repeat(2, 0)
    w2c = np.concatenate([np.eye(3), np.zeros((3, 1))], axis=1)[None].repeat(2, 0)
    return depth, images, coarse, k_mats, w2c


def _one_point_clusters(image_points, settings: RefineConfig) -> list[dict]:
    """cluster_scores of one-point clusters of frame 0 at image points (x, y, z), grey 0.5."""
    points = np.array([[x * z, y * z, z] for x, y, z in image_points])
    count = len(points)
    return cluster_scores(points, np.arange(count), np.full((count, 3), 0.5), 0,
                          *_quirk_scene(), settings)


def test_half_pixel_quirk_official_and_consistent_differ_by_hand():
    image_points = [(2.9, 1.2, 2.0), (3.8, 2.2, 2.5), (8.7, 1.2, 2.0)]
    official = _one_point_clusters(image_points, RefineConfig())
    consistent = _one_point_clusters(image_points, RefineConfig(sampling="consistent"))
    # official, index (x, y):
    # 0: nearest depth at round(2.9) = column 3 → 2.5, mask 0, colour 0.5 → |2 − 2.5| = 0.5
    assert official[0]["counted"] == 1 and official[0]["photometric_term"] == pytest.approx(0)
    assert official[0]["score"] == pytest.approx(0.5) and official[0]["dynamic"]
    # 1: mask at x = 3.8 is 0.2 · 0 + 0.8 · 1 = 0.8 > 0.5 → not counted → cannot be checked
    # 2: nearest column round(8.7) = 9 is outside → depth 0 → hidden → cannot be checked
    for entry in official[1:]:
        assert entry["counted"] == 0 and entry["score"] is None and entry["dynamic"]
    # consistent, index (x − .5, y − .5), the point's own pixel floor(x):
    # 0: column 2 → depth 2 = z, colours equal → 0
    # 1: (3.3, 1.7): mask 0.3, depth column 3 = 2.5 = z, colour 0.7 · 0.5 + 0.3 · 0.6 = 0.53
    #    → Σ|Δ| / 3 = 0.03
    # 2: (8.2, 0.7): column 8 (column 9 is the border repeated) → depth 2 = z, mask 0 → 0
    assert [entry["counted"] for entry in consistent] == [1, 1, 1]
    for entry, score in zip(consistent, [0.0, 0.03, 0.0], strict=True):
        assert entry["score"] == pytest.approx(score, abs=1e-12) and not entry["dynamic"]
        assert entry["depth_term"] == pytest.approx(0.0)


def test_projection_rules_are_strict_by_hand():
    margin = RefineConfig(visibility_margin=0.25)  # binary fractions: exact comparisons
    entries = _one_point_clusters(
        [(3.5, 1.5, 2.0), (2.4, 1.2, 2.25), (2.4, 1.2, 2.125), (0.0, 1.2, 2.0)], margin)
    # 0: mask at x = 3.5 is exactly 0.5, static enough (≤ 0.5); nearest (round half to even)
    #    column 4, row 2 → depth 2; colour 0.5 · 0.5 + 0.5 · 0.6 = 0.55 → 3 · 0.05 / 3
    assert entries[0]["counted"] == 1 and entries[0]["score"] == pytest.approx(0.05)
    # 1: z − 0.25 = 2 is not < d = 2: hidden; 2: 1.875 < 2 counts, |Δz| = 0.125
    assert entries[1]["counted"] == 0 and entries[1]["dynamic"]
    assert entries[2]["counted"] == 1 and entries[2]["depth_term"] == pytest.approx(0.125)
    # 3: x = 0 is not inside (0 < x < W)
    assert entries[3]["counted"] == 0 and entries[3]["dynamic"]


def _counted_in(open_frames: int, others: int) -> dict:
    """One point of frame 0 at (2.9, 1.2), depth 2, projected into ``others`` frames of flat
    depth 2 and grey 0.5, the first ``open_frames`` static, the rest covered by the coarse
    mask (not counted): one cluster's entry."""
    count = others + 1
    coarse = np.ones((count, 4, 6), dtype=bool)
    coarse[1 : open_frames + 1] = False
    k_mats = np.eye(3)[None].repeat(count, 0)
    w2c = np.concatenate([np.eye(3), np.zeros((3, 1))], axis=1)[None].repeat(count, 0)
    return cluster_scores([[5.8, 2.4, 2.0]], [0], np.full((1, 3), 0.5), 0,
                          np.full((count, 4, 6), 2.0), np.full((count, 4, 6, 3), 0.5), coarse,
                          k_mats, w2c)[0]


def test_few_counted_projections_keep_a_cluster_like_float32_official():
    # the official fraction is float32: counted / float32(samples + 1e-6) < float32(0.05)
    # 2 of 40: float32(40.000001) = 40 (half an ulp is 1.9e-6), 2 / 40 = float32(0.05): not
    # below, the cluster is checked (score 0: static); in float64 2 / 40.000001 < 0.05 would
    # keep it unchecked
    entry = _counted_in(2, 40)
    assert (entry["samples"], entry["counted"]) == (40, 2)
    assert entry["score"] == pytest.approx(0.0) and not entry["dynamic"]
    # 1 of 20: float32(20.000001) = 20.0000019 (half an ulp is 9.5e-7), 1 / 20.0000019 rounds to
    # 0.049999997 < float32(0.05) = 0.050000001: unchecked, stays dynamic
    entry = _counted_in(1, 20)
    assert (entry["samples"], entry["counted"]) == (20, 1)
    assert entry["score"] is None and entry["dynamic"]
    entry = _counted_in(2, 20)  # 10 %: checked
    assert entry["counted"] == 2 and not entry["dynamic"]


# ------------------------------------------------------------------------------ scores


SCORE_CASES = [RefineConfig(), RefineConfig(sampling="consistent"),
               RefineConfig(score="residual", window=2)]


@pytest.mark.parametrize("settings", SCORE_CASES, ids=["official", "consistent", "residual-w2"])
def test_cluster_scores_match_per_sample_loop(scene, planted, settings):
    coarse = scene.dynamic_masks | planted
    images = scene.frames / 255.0
    rng = np.random.default_rng(settings.window)
    rows, cols = np.nonzero(planted[0])
    pick = rng.choice(rows.size, 40, replace=False)
    wall = _pinhole_world(scene, 0, rows[pick], cols[pick])
    centre0 = -scene.extrinsics[0, :, :3].T.astype(float) @ scene.extrinsics[0, :, 3]
    srows, scols = np.nonzero(scene.dynamic_masks[0])
    spick = rng.choice(srows.size, 40, replace=False)
    sphere = _pinhole_world(scene, 0, srows[spick], scols[spick])
    points = np.concatenate([
        wall,  # 0: static
        centre0 + 0.8 * (wall - centre0),  # 1: floating in front of the wall
        centre0 + 1.3 * (wall - centre0),  # 2: behind the wall (hidden elsewhere)
        sphere,  # 3: the moving sphere
    ])
    labels = np.repeat(np.arange(4), 40)
    wall_rgb = images[0, rows[pick], cols[pick]]
    colours = np.concatenate([wall_rgb, wall_rgb, wall_rgb, images[0, srows[spick],
                                                                   scols[spick]]])

    result = cluster_scores(points, labels, colours, 0, scene.depth, images, coarse,
                            scene.intrinsics, scene.extrinsics, settings)
    expected = _official_decisions(scene.depth, images, coarse, scene.intrinsics,
                                   scene.extrinsics, points, labels, colours, 0, settings, 4)
    assert [entry["cluster"] for entry in result] == [0, 1, 2, 3]
    tol = {"rel": 1e-6, "abs": 1e-8}  # float32 cameras, float64 sums in another order
    for entry, (samples, counted, d_term, p_term, dynamic) in zip(result, expected, strict=True):
        assert entry["frame"] == 0 and entry["points"] == 40
        assert (entry["samples"], entry["counted"], entry["dynamic"]) == (samples, counted,
                                                                          dynamic)
        if d_term is None:
            assert entry["score"] is None
        else:
            assert entry["depth_term"] == pytest.approx(d_term, **tol)
            assert entry["photometric_term"] == pytest.approx(p_term, **tol)
    assert expected[0][0] == 40 * (2 if settings.window else 7)
    static, front, behind, sphere_entry = result
    assert static["counted_fraction"] > 0.1 and static["score"] < 0.05 and not static["dynamic"]
    assert front["counted_fraction"] > 0.05 and front["score"] > 0.15 and front["dynamic"]
    assert behind["counted"] <= 0.2 * static["counted"]  # occluded: not counted
    assert sphere_entry["dynamic"]
    json.dumps(result)


def _bilinear_centres(depth: np.ndarray, x: float, y: float) -> float:
    ix = min(max(x - 0.5, 0.0), depth.shape[1] - 1.0)
    iy = min(max(y - 0.5, 0.0), depth.shape[0] - 1.0)
    x0, y0 = min(int(ix), depth.shape[1] - 2), min(int(iy), depth.shape[0] - 2)
    wx, wy = ix - x0, iy - y0
    top = (1 - wx) * depth[y0, x0] + wx * depth[y0, x0 + 1]
    bottom = (1 - wx) * depth[y0 + 1, x0] + wx * depth[y0 + 1, x0 + 1]
    return float((1 - wy) * top + wy * bottom)


def test_gradient_score_matches_finite_differences(scene):
    depth, images = scene.depth[:2].astype(np.float64), scene.frames[:2] / 255.0
    coarse = scene.dynamic_masks[:2]
    settings = RefineConfig(score="gradient", gradient_weight=1.0)
    candidates = np.concatenate([
        _pinhole_world(scene, 0, np.array([40, 150, 60]), np.array([115, 40, 230])),  # static
        _pinhole_world(scene, 0, *np.nonzero(scene.dynamic_masks[0])),  # sphere at t = 0
    ])
    chosen = []
    for point in candidates:  # points whose projection into frame 1 counts
        (_, counted, *_), = _official_decisions(depth, images, coarse, scene.intrinsics[:2],
                                                scene.extrinsics[:2], [point], [0],
                                                [np.zeros(3)], 0, settings, 1)
        if counted:
            chosen.append(point)
        if len(chosen) == 6:
            break
    points = np.array(chosen)
    result = cluster_scores(points, np.arange(6), np.zeros((6, 3)), 0, depth, images, coarse,
                            scene.intrinsics[:2], scene.extrinsics[:2], settings)
    scale = float(np.median(depth))

    def loss(point):
        x, y, z = _pinhole_project(scene.intrinsics, scene.extrinsics, 1, point)
        return 0.5 * (z - _bilinear_centres(depth[1], x, y)) ** 2

    step = 1e-6
    for i, point in enumerate(points):
        grad = [(loss(point + step * e) - loss(point - step * e)) / (2 * step) for e in np.eye(3)]
        assert result[i]["counted"] == 1
        assert result[i]["depth_term"] == pytest.approx(np.linalg.norm(grad) / scale,
                                                        rel=1e-3, abs=1e-6)
    assert max(result[i]["depth_term"] for i in range(3)) < 1e-3  # static: nothing to correct
    assert min(result[i]["depth_term"] for i in range(3, 6)) > 0.05  # moved: large gradient


# ------------------------------------------------------------------------------ refinement


@pytest.mark.parametrize("settings", SCORE_CASES[:2], ids=["official", "consistent"])
def test_refine_is_the_official_rule_on_a_tiny_scene(tiny, settings):
    coarse = tiny.dynamic_masks.copy()
    coarse[:, TINY_BLOCK[0], TINY_BLOCK[1]] = True  # static wall marked dynamic
    refined, report = refine_masks(coarse, tiny.depth, tiny.frames, tiny.intrinsics,
                                   tiny.extrinsics, settings)
    expected, decisions = _official_refine(tiny, coarse, settings)
    assert report["skipped"] is None
    for t, frame in enumerate(decisions):  # k-means per frame: 30 clusters in each
        got = [entry for entry in report["clusters"] if entry["frame"] == t]
        assert len(got) == len(frame) == 30
        assert [(e["samples"], e["counted"], e["dynamic"]) for e in got] == [
            (samples, counted, dynamic) for samples, counted, _, _, dynamic in frame]
        for entry, (*_, d_term, p_term, _) in zip(got, frame, strict=True):
            if d_term is not None:
                assert entry["score"] == pytest.approx(d_term + p_term, abs=1e-6)
    np.testing.assert_array_equal(refined, expected)
    # the test means something: both decisions occur, pixels leave the mask, none of the sphere
    assert 0 < report["clusters_removed"] < len(report["clusters"])
    assert report["pixels_removed"] > 0
    assert (refined & tiny.dynamic_masks).sum() == tiny.dynamic_masks.sum()


def test_refine_uses_the_cameras_given(tiny):
    """VGGT4D refines with pass-1 depth and intrinsics but pass-2 poses: whatever extrinsics are
    passed serve the back-projection and every projection."""
    coarse = tiny.dynamic_masks.copy()
    coarse[:, TINY_BLOCK[0], TINY_BLOCK[1]] = True
    moved = tiny.extrinsics.copy()
    moved[1:, 0, 3] += 0.3  # other poses, same depth and intrinsics
    refined, report = refine_masks(coarse, tiny.depth, tiny.frames, tiny.intrinsics, moved)
    expected, decisions = _official_refine(replace(tiny, extrinsics=moved), coarse,
                                           RefineConfig())
    assert [e["dynamic"] for e in report["clusters"]] == [
        entry[-1] for frame in decisions for entry in frame]
    np.testing.assert_array_equal(refined, expected)
    unmoved, _ = refine_masks(coarse, tiny.depth, tiny.frames, tiny.intrinsics, tiny.extrinsics)
    assert not np.array_equal(refined, unmoved)


@pytest.fixture(scope="module")
def small():
    """6 frames of 140×105 with a static 15×15 wall block planted in the coarse masks."""
    clip = render_scene(SyntheticConfig(num_frames=6, width=140, height=105, object_speed=1.5))
    planted_block = np.zeros_like(clip.dynamic_masks)
    planted_block[:, SMALL_BLOCK[0], SMALL_BLOCK[1]] = True
    return clip, planted_block


@pytest.fixture(scope="module")
def refine_small(small):
    """refine_masks on the small clip's coarse masks (ground truth + planted block), cached."""
    clip, planted_block = small
    cache: dict = {}

    def run(**fields):
        key = tuple(sorted(fields.items()))
        if key not in cache:
            cache[key] = refine_masks(clip.dynamic_masks | planted_block, clip.depth,
                                      clip.frames, clip.intrinsics, clip.extrinsics,
                                      RefineConfig(**fields))
        return cache[key]

    return run


@pytest.mark.parametrize(("score", "sampling"), [("absolute", "official"),
                                                 ("absolute", "consistent"),
                                                 ("residual", "official"),
                                                 ("gradient", "official")])
def test_refine_removes_planted_static_region_keeps_sphere(small, refine_small, score,
                                                           sampling):
    clip, planted_block = small
    gt = clip.dynamic_masks
    coarse = gt | planted_block
    refined, report = refine_small(score=score, sampling=sampling)
    assert refined.shape == coarse.shape and refined.dtype == bool
    assert report["skipped"] is None
    # of the 1350 planted pixels, the official sampling keeps one cluster of 25 pixels in one
    # frame (its colours compared half a pixel off: score 0.102 > 0.1), 37 after the
    # morphology; the consistent sampling and the relative scores keep none
    limit = 60 if (score, sampling) == ("absolute", "official") else 0
    assert (refined & planted_block).sum() <= limit
    assert (refined & gt).sum() == gt.sum()
    before, after = _iou(coarse, gt), _iou(refined, gt)
    assert after >= before + 0.05, (before, after)  # 0.79 → 0.86; the 3×3 dilation costs most
    assert report["clusters_removed"] >= 1 and report["clusters_kept"] >= 1
    assert report["pixels_refined"] == int(refined.sum())
    assert all(len([e for e in report["clusters"] if e["frame"] == t]) == 30 for t in range(6))
    for entry in report["clusters"]:
        if not entry["dynamic"]:
            assert entry["score"] <= 0.1 and entry["counted_fraction"] >= 0.05
    json.dumps(report)


def test_refine_morphology_is_opencv_ellipse_close_then_dilate(small, refine_small):
    clip, planted_block = small
    gt, coarse = clip.dynamic_masks, clip.dynamic_masks | planted_block
    refined, _ = refine_small()
    # before the morphology the mask is a subset of the coarse one, nearly the sphere; then
    # OpenCV's elliptic 5×5 close and 3×3 dilation
    raw, _ = refine_small(close=1, dilate=1)
    assert not (raw & ~coarse).any() and _iou(raw, gt) > 0.99
    ellipse = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    expected = np.stack([cv2.dilate(cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_CLOSE,
                                                     ellipse), np.ones((3, 3), np.uint8)) > 0
                         for m in raw])
    np.testing.assert_array_equal(refined, expected)


def test_refine_subsampled_points_follow_the_sample(small, refine_small):
    clip, planted_block = small
    refined, report = refine_small(max_points=500, seed=1)
    assert all(f["fitted"] == min(500, f["clustered"]) for f in report["frames"])
    assert max(f["clustered"] for f in report["frames"]) > 1000
    assert (refined & planted_block).sum() <= 0.1 * planted_block.sum()
    assert (refined & clip.dynamic_masks).sum() == clip.dynamic_masks.sum()


@pytest.mark.parametrize("score", ["residual", "gradient"])
def test_relative_scores_do_not_depend_on_depth_scale(tiny, score):
    coarse = tiny.dynamic_masks.copy()
    coarse[:, TINY_BLOCK[0], TINY_BLOCK[1]] = True
    scaled = tiny.extrinsics.copy()
    scaled[:, :, 3] *= 0.05
    settings = RefineConfig(score=score)
    mask_a, rep_a = refine_masks(coarse, tiny.depth, tiny.frames, tiny.intrinsics,
                                 tiny.extrinsics, settings)
    mask_b, rep_b = refine_masks(coarse, tiny.depth * 0.05, tiny.frames, tiny.intrinsics,
                                 scaled, settings)
    np.testing.assert_array_equal(mask_a, mask_b)
    assert 0 < rep_a["clusters_removed"] < len(rep_a["clusters"])
    for a, b in zip(rep_a["clusters"], rep_b["clusters"], strict=True):
        assert (a["counted"], a["dynamic"]) == (b["counted"], b["dynamic"])
        assert a["score"] == (None if b["score"] is None else pytest.approx(b["score"], rel=1e-3,
                                                                             abs=1e-4))


def test_defaults_are_the_official_values():
    s = RefineConfig()
    assert (s.neighbours, s.std_ratio, s.clusters, s.seed, s.window) == (20, 2.5, 30, 42, 0)
    assert (s.sampling, s.score, s.visibility_margin, s.min_valid, s.tau) == (
        "official", "absolute", 0.01, 0.05, 0.1)
    assert (s.close, s.close_kernel, s.dilate, s.max_points, s.min_points) == (
        5, "ellipse", 3, 0, 0)


def test_too_few_points_or_frames_skipped_mask_unchanged(scene):
    coarse = np.zeros_like(scene.dynamic_masks)
    coarse[1, 10:15, 10:15] = True  # 25 < 50 pixels
    args = (scene.depth, scene.frames, scene.intrinsics, scene.extrinsics)
    refined, report = refine_masks(coarse, *args, RefineConfig(min_points=50))
    np.testing.assert_array_equal(refined, coarse)
    assert isinstance(report["skipped"], str) and "25" in report["skipped"]
    assert report["clusters"] == []
    json.loads(json.dumps(report))
    single, report = refine_masks(coarse[1:2], *(a[1:2] for a in args))
    np.testing.assert_array_equal(single, coarse[1:2])
    assert "single frame" in report["skipped"]
    empty, report = refine_masks(np.zeros_like(coarse), *args)
    assert not empty.any() and report["skipped"] is None and report["clusters"] == []


def test_bad_settings_and_shapes_raise_user_error(scene):
    args = (scene.dynamic_masks, scene.depth, scene.frames, scene.intrinsics, scene.extrinsics)
    for field, value in [("clusters", 0), ("neighbours", 0), ("visibility_margin", -1.0),
                         ("seed", -1), ("seed", 2**32)]:
        with pytest.raises(UserError, match=field):
            refine_masks(*args, RefineConfig(**{field: value}))
    with pytest.raises(UserError, match="depth"):
        refine_masks(scene.dynamic_masks, scene.depth[:, :-1], *args[2:])


def refine_growth(num_frames: int, head: bool = False) -> int:
    """Peak anonymous memory of :func:`refine_masks` (``window=2``) on the 6-frame scene
    repeated to ``num_frames`` frames, its inputs made beforehand; run in a fresh process."""
    from tests.memory import anonymous_peak

    clip = render_scene(SyntheticConfig(num_frames=6, width=140, height=105, object_speed=1.5))
    coarse = clip.dynamic_masks.copy()
    coarse[:, SMALL_BLOCK[0], SMALL_BLOCK[1]] = True
    inputs = [np.resize(array, (num_frames, *array.shape[1:])) for array in
              (coarse, clip.depth, clip.frames, clip.intrinsics, clip.extrinsics)]
    settings = RefineConfig(window=2)
    refine_masks(*(array[:3] for array in inputs), settings)  # imports and first-use buffers
    return anonymous_peak(lambda: refine_masks(*inputs, settings))


def test_refinement_memory_does_not_follow_the_clip(tmp_path):
    """Depth and frames are read a few views at a time in their own types: 8 times the frames
    add about the clip's three (T, H, W) bool arrays (coarse, usable, refined), where float64
    copies of depth and RGB would add 32 bytes a pixel (38 MiB here)."""
    from tests.memory import MIB, in_fresh_process

    growth = {n: in_fresh_process("tests.test_refine", "refine_growth", n) for n in (12, 96)}
    pixels = (96 - 12) * 105 * 140
    assert 32 * pixels > 32 * MIB
    assert growth[96] - growth[12] < 8 * pixels + 4 * MIB, growth
