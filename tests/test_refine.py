"""3-D refinement of coarse dynamic masks, checked on the synthetic scene's exact ground truth.

References: a pinhole model written out here (camera centre and axes, no matrix inverse), a
brute-force pairwise distance matrix, a per-sample Python loop over points and frames, and
central finite differences of the projection-gradient loss.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vggt4d.cameras import backproject, project
from vggt4d.errors import UserError
from vggt4d.postprocess import morphology
from vggt4d.refine import (
    OCCLUSION_TOLERANCE,
    RefineSettings,
    cluster_scores,
    refine_masks,
    statistical_inliers,
)
from vggt4d.synthetic import SyntheticConfig, render_scene

BLOCK = (slice(25, 55), slice(100, 130))  # 30×30 on the textured back wall, ≥ 20 px from the sphere


@pytest.fixture(scope="module")
def scene():
    return render_scene(SyntheticConfig(num_frames=8, object_speed=1.5))


@pytest.fixture(scope="module")
def planted(scene):
    mask = np.zeros_like(scene.dynamic_masks)
    mask[:, BLOCK[0], BLOCK[1]] = True
    return mask


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


def _pinhole_project(scene, s: int, point: np.ndarray) -> tuple[float, float, float]:
    """(x, y, z) of a world point in camera s: offsets from the centre along the camera axes."""
    k_mat = scene.intrinsics[s].astype(np.float64)
    rot = scene.extrinsics[s, :, :3].astype(np.float64)
    centre = -rot.T @ scene.extrinsics[s, :, 3].astype(np.float64)
    rel = point - centre
    z = float(rel @ rot[2])
    x = k_mat[0, 0] * float(rel @ rot[0]) / z + k_mat[0, 2]
    y = k_mat[1, 1] * float(rel @ rot[1]) / z + k_mat[1, 2]
    return x, y, z


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


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
    # and the points are the independent pinhole ones
    rows, cols = np.array([0, 17, 100, 209]), np.array([0, 250, 140, 279])
    np.testing.assert_allclose(world[2, rows, cols], _pinhole_world(scene, 2, rows, cols),
                               atol=1e-5)


def test_static_pixel_projects_where_pinhole_says(scene):
    rows, cols = np.array([40, 160, 30]), np.array([115, 30, 200])  # wall, floor, wall
    assert not scene.dynamic_masks[0, rows, cols].any()
    world = backproject(scene.depth, scene.intrinsics, scene.extrinsics)[0, rows, cols]
    pixel, z = project(world, scene.intrinsics[3], scene.extrinsics[3])
    for i, point in enumerate(_pinhole_world(scene, 0, rows, cols)):
        x, y, zz = _pinhole_project(scene, 3, point)
        assert abs(pixel[i, 0] - x) <= 1e-3 and abs(pixel[i, 1] - y) <= 1e-3
        assert abs(z[i] - zz) <= 1e-4
        # a static surface seen from frame 3: the renderer's depth there agrees (visible room)
        col, row = math.floor(x), math.floor(y)
        assert abs(scene.depth[3, row, col] - zz) / zz < 0.02
    # the camera moved: the points do not land where they were in frame 0
    assert np.abs(pixel[:, 0] - (cols + 0.5)).min() > 3


# ------------------------------------------------------------------------------ outliers


def test_statistical_inliers_removes_planted_outlier_like_brute_force():
    rng = np.random.default_rng(3)
    blob = rng.normal(scale=0.1, size=(300, 3))
    points = np.concatenate([blob, [[5.0, 5.0, 5.0]]])
    keep = statistical_inliers(points, neighbours=20, std_ratio=2.5)
    assert keep.dtype == bool and keep.shape == (301,)
    assert not keep[-1]
    assert keep[:-1].mean() > 0.97
    # brute force: full distance matrix, self excluded, k smallest, mean + ratio · std; small
    # ratios put many points near the threshold, so any other definition flips some of them
    dist = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    for k, ratio in [(20, 2.5), (20, 0.0), (8, 0.3), (3, -0.2)]:
        mean_knn = np.sort(dist, axis=1)[:, :k].mean(axis=1)
        expected = mean_knn <= mean_knn.mean() + ratio * mean_knn.std()
        np.testing.assert_array_equal(statistical_inliers(points, k, ratio), expected)
    # tiny inputs: every point is kept, k shrinks to N − 1
    assert statistical_inliers(points[:1]).all()
    assert statistical_inliers(points[:5], neighbours=20).shape == (5,)


# ------------------------------------------------------------------------------ scores


def _brute_scores(scene, coarse, points, labels, src, colours, window, count):
    """Per-sample loop of the validity rule and the residual score."""
    height, width = scene.depth.shape[1:]
    samples, valid = np.zeros(count), np.zeros(count)
    dsum, psum = np.zeros(count), np.zeros(count)
    for i, point in enumerate(points):
        for s in range(len(scene.depth)):
            if s == src[i] or (window and abs(s - src[i]) > window):
                continue
            samples[labels[i]] += 1
            x, y, z = _pinhole_project(scene, s, point)
            if z <= 0 or not (0 <= x < width and 0 <= y < height):
                continue
            col, row = math.floor(x), math.floor(y)
            d = float(scene.depth[s, row, col])
            if coarse[s, row, col] or z > d * (1 + OCCLUSION_TOLERANCE):
                continue
            valid[labels[i]] += 1
            dsum[labels[i]] += abs(z - d) / d
            seen = scene.frames[s, row, col].astype(float)
            psum[labels[i]] += np.abs(colours[i] - seen).sum() / 3 / 255
    return samples, valid, dsum, psum


@pytest.mark.parametrize("window", [0, 2])
def test_cluster_scores_match_per_sample_loop(scene, planted, window):
    coarse = scene.dynamic_masks | planted
    rng = np.random.default_rng(window)
    rows, cols = np.nonzero(planted[0])
    pick = rng.choice(rows.size, 40, replace=False)
    wall = _pinhole_world(scene, 0, rows[pick], cols[pick])
    centre0 = -scene.extrinsics[0, :, :3].T.astype(float) @ scene.extrinsics[0, :, 3]
    srows, scols = np.nonzero(scene.dynamic_masks[2])
    spick = rng.choice(srows.size, 40, replace=False)
    sphere = _pinhole_world(scene, 2, srows[spick], scols[spick])
    points = np.concatenate([
        wall,  # 0: static
        centre0 + 0.8 * (wall - centre0),  # 1: floating in front of the wall
        centre0 + 1.3 * (wall - centre0),  # 2: behind the wall (hidden elsewhere)
        sphere,  # 3: the moving sphere
    ])
    labels = np.repeat(np.arange(4), 40)
    src = np.repeat([0, 0, 0, 2], 40)
    wall_rgb = scene.frames[0, rows[pick], cols[pick]].astype(float)
    sphere_rgb = scene.frames[2, srows[spick], scols[spick]].astype(float)
    colours = np.concatenate([wall_rgb, wall_rgb, wall_rgb, sphere_rgb])

    result = cluster_scores(points, labels, src, colours, scene.depth, scene.frames, coarse,
                            scene.intrinsics, scene.extrinsics, window=window)
    samples, valid, dsum, psum = _brute_scores(scene, coarse, points, labels, src, colours,
                                               window, 4)
    assert [entry["cluster"] for entry in result] == [0, 1, 2, 3]
    tol = {"rel": 1e-6, "abs": 1e-8}  # float32 cameras in the module, float64 here
    for c, entry in enumerate(result):
        assert entry["points"] == 40
        assert entry["samples"] == samples[c]
        assert entry["valid"] == valid[c]
        assert entry["valid_fraction"] == pytest.approx(valid[c] / samples[c])
        if valid[c]:
            assert entry["depth_term"] == pytest.approx(dsum[c] / valid[c], **tol)
            assert entry["photometric_term"] == pytest.approx(psum[c] / valid[c], **tol)
            assert entry["score"] == pytest.approx((dsum[c] + psum[c]) / valid[c], **tol)
    assert samples[0] == 40 * (2 if window else 7)
    static, front, behind, sphere_entry = result
    assert static["valid_fraction"] > 0.1 and static["score"] < 0.03 and not static["dynamic"]
    assert front["valid_fraction"] > 0.05 and front["score"] > 0.15 and front["dynamic"]
    assert behind["valid"] <= 0.2 * static["valid"]  # occluded: not counted
    assert sphere_entry["score"] > 0.3 and sphere_entry["dynamic"]
    json.dumps(result)


def _bilinear(depth: np.ndarray, x: float, y: float) -> float:
    ix = min(max(x - 0.5, 0.0), depth.shape[1] - 1.0)
    iy = min(max(y - 0.5, 0.0), depth.shape[0] - 1.0)
    x0, y0 = min(int(ix), depth.shape[1] - 2), min(int(iy), depth.shape[0] - 2)
    wx, wy = ix - x0, iy - y0
    top = (1 - wx) * depth[y0, x0] + wx * depth[y0, x0 + 1]
    bottom = (1 - wx) * depth[y0 + 1, x0] + wx * depth[y0 + 1, x0 + 1]
    return float((1 - wy) * top + wy * bottom)


def test_gradient_score_matches_finite_differences(scene):
    depth, frames = scene.depth[:2].astype(np.float64), scene.frames[:2]
    coarse = scene.dynamic_masks[:2]
    candidates = np.concatenate([
        _pinhole_world(scene, 0, np.array([40, 150, 60]), np.array([115, 40, 230])),  # static
        _pinhole_world(scene, 0, *np.nonzero(scene.dynamic_masks[0])),  # sphere at t = 0
    ])
    chosen = []
    for point in candidates:  # keep points whose projection into frame 1 is a valid sample
        x, y, z = _pinhole_project(scene, 1, point)
        col, row = math.floor(x), math.floor(y)
        if not coarse[1, row, col] and z <= depth[1, row, col] * (1 + OCCLUSION_TOLERANCE):
            chosen.append(point)
        if len(chosen) == 6:
            break
    points = np.array(chosen)
    result = cluster_scores(points, np.arange(6), np.zeros(6, int), np.zeros((6, 3)), depth,
                            frames, coarse, scene.intrinsics[:2], scene.extrinsics[:2],
                            score="gradient", gradient_weight=1.0)
    scale = float(np.median(depth))

    def loss(point):
        x, y, z = _pinhole_project(scene, 1, point)
        return 0.5 * (z - _bilinear(depth[1], x, y)) ** 2

    step = 1e-6
    for i, point in enumerate(points):
        grad = [(loss(point + step * e) - loss(point - step * e)) / (2 * step) for e in np.eye(3)]
        assert result[i]["valid"] == 1
        assert result[i]["depth_term"] == pytest.approx(np.linalg.norm(grad) / scale,
                                                        rel=1e-3, abs=1e-6)
    assert max(result[i]["depth_term"] for i in range(3)) < 1e-3  # static: nothing to correct
    assert min(result[i]["depth_term"] for i in range(3, 6)) > 0.05  # moved: large gradient


# ------------------------------------------------------------------------------ refinement


@pytest.mark.parametrize("score", ["residual", "gradient"])
def test_refine_removes_planted_static_region_keeps_sphere(scene, planted, score):
    gt = scene.dynamic_masks
    coarse = gt | planted
    refined, report = refine_masks(coarse, scene.depth, scene.frames, scene.intrinsics,
                                   scene.extrinsics, RefineSettings(score=score))
    assert refined.shape == coarse.shape and refined.dtype == bool
    assert report["skipped"] is None
    assert (refined & planted).sum() <= 20  # ≤ a few boundary pixels of 7200
    assert (refined & gt).sum() >= 0.9 * gt.sum()
    before, after = _iou(coarse, gt), _iou(refined, gt)
    assert after >= before + 0.1, (before, after)
    assert report["clusters_removed"] >= 1 and report["clusters_kept"] >= 1
    assert report["pixels_refined"] == int(refined.sum())
    # the mask before morphology is a subset of the coarse one; then close 5×5, dilate 3×3
    raw, _ = refine_masks(coarse, scene.depth, scene.frames, scene.intrinsics,
                          scene.extrinsics, RefineSettings(score=score, close=1, dilate=1))
    assert not (raw & ~coarse).any()
    expected = morphology(morphology(raw, "close", 5), "dilate", 3)
    np.testing.assert_array_equal(refined, expected)
    for entry in report["clusters"]:
        assert entry["kept"] == entry["dynamic"]
        if not entry["kept"]:
            assert entry["score"] <= 0.1 and entry["valid_fraction"] >= 0.05
    json.dumps(report)


def test_refine_subsampled_points_follow_the_sample(scene, planted):
    gt = scene.dynamic_masks
    settings = RefineSettings(max_points=4000, seed=1)
    refined, report = refine_masks(gt | planted, scene.depth, scene.frames, scene.intrinsics,
                                   scene.extrinsics, settings)
    assert report["points_used"] == 4000 and report["points"] > 30000
    assert (refined & planted).sum() <= 20
    assert (refined & gt).sum() >= 0.9 * gt.sum()


def test_refine_scores_do_not_depend_on_depth_scale(scene, planted):
    coarse = scene.dynamic_masks | planted
    scaled_ext = scene.extrinsics.copy()
    scaled_ext[:, :, 3] *= 0.05
    for score in ("residual", "gradient"):
        settings = RefineSettings(score=score, clusters=8)
        mask_a, rep_a = refine_masks(coarse, scene.depth, scene.frames, scene.intrinsics,
                                     scene.extrinsics, settings)
        mask_b, rep_b = refine_masks(coarse, scene.depth * 0.05, scene.frames,
                                     scene.intrinsics, scaled_ext, settings)
        np.testing.assert_array_equal(mask_a, mask_b)
        for a, b in zip(rep_a["clusters"], rep_b["clusters"], strict=True):
            assert a["valid"] == b["valid"]
            assert a["score"] == pytest.approx(b["score"], rel=1e-3, abs=1e-4)


def test_too_few_points_skipped_mask_unchanged(scene):
    coarse = np.zeros_like(scene.dynamic_masks)
    coarse[1, 10:15, 10:15] = True  # 25 < 50 pixels
    refined, report = refine_masks(coarse, scene.depth, scene.frames, scene.intrinsics,
                                   scene.extrinsics)
    np.testing.assert_array_equal(refined, coarse)
    assert isinstance(report["skipped"], str) and "25" in report["skipped"]
    assert report["clusters"] == []
    json.loads(json.dumps(report))
    empty, report = refine_masks(np.zeros_like(coarse), scene.depth, scene.frames,
                                 scene.intrinsics, scene.extrinsics)
    assert not empty.any() and report["skipped"]


def test_bad_settings_and_shapes_raise_user_error(scene):
    args = (scene.dynamic_masks, scene.depth, scene.frames, scene.intrinsics, scene.extrinsics)
    with pytest.raises(UserError, match="score"):
        refine_masks(*args, RefineSettings(score="magic"))
    with pytest.raises(UserError, match="clusters"):
        refine_masks(*args, RefineSettings(clusters=0))
    with pytest.raises(UserError, match="depth"):
        refine_masks(scene.dynamic_masks, scene.depth[:, :-1], *args[2:])
