"""Chunk alignment: planted similarities recovered on the synthetic scene's exact geometry,
robustness to gross outliers and dynamic pixels, camera and depth transforms checked by
projecting points by hand, chains against step-by-step application."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from vggt4d.align import (
    Sim3,
    align_overlap,
    chain_to_first,
    estimate_sim3,
    overlap_correspondences,
    transform_depth,
    transform_extrinsics,
)
from vggt4d.errors import UserError
from vggt4d.synthetic import SyntheticConfig, render_scene

PLANTED = Sim3(1.37, Rotation.from_rotvec([0.2, -0.45, 0.3]).as_matrix(),
               np.array([0.8, -1.5, 2.2]))
RIGID = Sim3(1.0, PLANTED.rotation, PLANTED.translation)


@pytest.fixture(scope="module")
def scene():
    return render_scene(SyntheticConfig(num_frames=4, width=64, height=48, num_objects=2,
                                        object_speed=1.0))


def world_points_by_hand(depth, intrinsics, extrinsics) -> np.ndarray:
    """Float64 ``X = Rᵀ (d · K⁻¹ (u + ½, v + ½, 1) − t)`` per pixel: (T, H, W, 3)."""
    out = np.empty((*depth.shape, 3))
    for f in range(len(depth)):
        k_mat = intrinsics[f].astype(np.float64)
        rot, trans = extrinsics[f, :, :3].astype(np.float64), extrinsics[f, :, 3].astype(np.float64)
        for v in range(depth.shape[1]):
            for u in range(depth.shape[2]):
                ray = np.linalg.solve(k_mat, [u + 0.5, v + 0.5, 1.0])
                out[f, v, u] = rot.T @ (float(depth[f, v, u]) * ray - trans)
    return out


def inverse_by_hand(sim: Sim3, points: np.ndarray) -> np.ndarray:
    """``Rᵀ (X − t) / s`` row by row."""
    return np.array([sim.rotation.T @ (p - sim.translation) / sim.scale for p in points])


def assert_same_sim3(found: Sim3, expected: Sim3, tol: float) -> None:
    assert abs(found.scale - expected.scale) < tol
    assert np.abs(found.rotation - expected.rotation).max() < tol
    assert np.abs(found.translation - expected.translation).max() < tol


@pytest.mark.parametrize(("mode", "planted"), [("sim3", PLANTED), ("se3", RIGID),
                                               ("scale+se3", PLANTED)])
def test_planted_similarity_recovered_exactly_on_ground_truth_geometry(scene, mode, planted):
    points_a = world_points_by_hand(scene.depth, scene.intrinsics, scene.extrinsics).reshape(-1, 3)
    points_b = inverse_by_hand(planted, points_a)
    weights = np.random.default_rng(0).uniform(0.5, 2.0, len(points_a))
    scale = planted.scale if mode == "scale+se3" else None
    found, report = estimate_sim3(points_b, points_a, weights, mode=mode, scale=scale)
    assert_same_sim3(found, planted, 1e-9)
    assert report.rms < 1e-12 and report.inlier_fraction == 1.0
    assert report.converged and report.iterations == 1  # nothing to reweight: stops at once


@pytest.mark.parametrize("mode", ["sim3", "scale+se3"])
def test_chunk_b_built_with_the_inverse_transform_is_aligned_back(scene, mode):
    """Chunk b sees the same frames in a world S⁻¹ away: its cameras and depth by the module's
    transforms, its points by back-projection, must be S⁻¹ of chunk a's, and the alignment
    must find S (to float32 back-projection precision)."""
    inverse = PLANTED.inverse()
    depth_b = transform_depth(scene.depth, inverse)
    extrinsics_b = transform_extrinsics(scene.extrinsics, inverse)
    conf = 1.0 + np.random.default_rng(1).uniform(0.5, 3.0, scene.depth.shape)
    corr = overlap_correspondences(scene.depth, conf, scene.extrinsics, scene.intrinsics,
                                   depth_b, conf, extrinsics_b, scene.intrinsics)
    assert np.abs(corr.points_b - inverse_by_hand(PLANTED, corr.points_a)).max() < 2e-6
    found, report = align_overlap(corr, mode=mode)
    assert_same_sim3(found, PLANTED, 2e-6)
    assert report.rms < 1e-6


def test_gross_outliers_pull_the_closed_form_but_not_irls():
    rng = np.random.default_rng(2)
    src = rng.normal(size=(4000, 3)) * [2.0, 1.0, 3.0] + [0.0, 0.0, 5.0]
    dst = PLANTED.apply(src) + rng.normal(scale=0.01, size=src.shape)
    outliers = rng.random(len(src)) < 0.2
    dst[outliers] = rng.uniform(-20.0, 20.0, size=(outliers.sum(), 3))
    weights = rng.uniform(0.5, 2.0, len(src))
    inliers = PLANTED.apply(src[~outliers])

    def error(sim: Sim3) -> float:  # worst displacement of the true points, scene-relative
        return float(np.linalg.norm(sim.apply(src[~outliers]) - inliers, axis=1).max() / 5.0)

    plain, plain_report = estimate_sim3(src, dst, weights, iterations=0)
    robust, report = estimate_sim3(src, dst, weights)
    assert error(plain) > 0.3 and plain_report.iterations == 0
    assert error(robust) < 0.03 and report.iterations <= 5
    assert abs(report.inlier_fraction - weights[~outliers].sum() / weights.sum()) < 0.01
    assert report.rms > 1.0  # the report keeps the outliers: a bad overlap shows
    logged = json.loads(json.dumps({**report.as_dict(), **robust.as_dict()}))
    assert logged["points"] == 4000 and logged["scale"] == pytest.approx(robust.scale)


def test_dynamic_pixels_are_excluded(scene):
    """Chunk b sees the moving objects elsewhere (depth × 0.7): with them excluded the
    alignment is exact, with them included it is not."""
    inverse = PLANTED.inverse()
    depth_b = transform_depth(scene.depth, inverse)
    depth_b[scene.dynamic_masks] *= 0.7
    extrinsics_b = transform_extrinsics(scene.extrinsics, inverse)
    conf = np.full(scene.depth.shape, 2.0)
    args = (scene.depth, conf, scene.extrinsics, scene.intrinsics, depth_b, conf, extrinsics_b,
            scene.intrinsics)
    masked = overlap_correspondences(*args, exclude=scene.dynamic_masks)
    assert masked.candidates == len(masked.weights) == (~scene.dynamic_masks).sum()
    found, _ = align_overlap(masked, iterations=0)
    assert_same_sim3(found, PLANTED, 2e-6)
    polluted, _ = align_overlap(overlap_correspondences(*args), iterations=0)
    assert abs(polluted.scale - PLANTED.scale) > 1e-3


def test_confidence_selection_and_weights_by_hand():
    rng = np.random.default_rng(3)
    shape = (2, 3, 4)
    conf_a = 1.0 + rng.exponential(1.0, shape)
    conf_b = 1.0 + rng.exponential(1.0, shape)
    conf_a[0, 0, :2] = 1.0  # exp(x) → 0: no confidence at all
    conf_b[1, 2, 3] = 1.0 + 1e-9
    exclude = np.zeros(shape, dtype=bool)
    exclude[1, 0, 0] = True
    depth = rng.uniform(1.0, 3.0, shape)
    depth[0, 1, 1] = np.nan
    intrinsics = np.repeat(np.array([[[4.0, 0, 2], [0, 4.0, 1.5], [0, 0, 1]]]), 2, axis=0)
    extrinsics = np.repeat(np.eye(3, 4)[None], 2, axis=0)
    corr = overlap_correspondences(depth, conf_a, extrinsics, intrinsics, depth, conf_b,
                                   extrinsics, intrinsics, exclude=exclude)
    pixels = [(f, v, u) for f in range(2) for v in range(3) for u in range(4)
              if not exclude[f, v, u] and np.isfinite(depth[f, v, u])]
    threshold = 0.1 * min(statistics.median([conf_a[p] - 1 for p in pixels]),
                          statistics.median([conf_b[p] - 1 for p in pixels]))
    kept = [p for p in pixels if conf_a[p] - 1 > threshold and conf_b[p] - 1 > threshold]
    assert corr.candidates == len(pixels) == 22 and len(kept) == len(corr.weights)
    assert corr.threshold == pytest.approx(threshold, rel=1e-12)
    expected = sorted(((conf_a[p] - 1) * (conf_b[p] - 1)) ** 0.5 for p in kept)
    np.testing.assert_allclose(np.sort(corr.weights), expected, rtol=1e-12)
    assert len(kept) < len(pixels)  # the unconfident pixels were dropped
    sub = overlap_correspondences(depth, conf_a, extrinsics, intrinsics, depth, conf_b,
                                  extrinsics, intrinsics, exclude=exclude, max_points=5)
    assert 3 <= len(sub.weights) <= 5


def test_cameras_and_depth_follow_the_similarity():
    """A point seen by a chunk-b camera lands on the same pixel of the transformed camera at
    s times the depth; camera centres move like points."""
    rng = np.random.default_rng(4)
    rotations = Rotation.random(6, random_state=5).as_matrix()
    w2c = np.concatenate([rotations, rng.normal(size=(6, 3, 1))], axis=2)
    k_mat = np.array([[300.0, 0, 160], [0, 310.0, 120], [0, 0, 1]])
    moved = transform_extrinsics(w2c, PLANTED)
    for f in range(6):
        centre = -w2c[f, :, :3].T @ w2c[f, :, 3]
        point_b = centre + w2c[f, :, :3].T @ np.array([0.3, -0.2, 4.0])  # in front of camera
        point_a = PLANTED.scale * PLANTED.rotation @ point_b + PLANTED.translation
        seen_b = k_mat @ (w2c[f, :, :3] @ point_b + w2c[f, :, 3])
        seen_a = k_mat @ (moved[f, :, :3] @ point_a + moved[f, :, 3])
        np.testing.assert_allclose(seen_a[:2] / seen_a[2], seen_b[:2] / seen_b[2], atol=1e-9)
        assert seen_a[2] == pytest.approx(PLANTED.scale * seen_b[2], rel=1e-12)
        np.testing.assert_allclose(-moved[f, :, :3].T @ moved[f, :, 3],
                                   PLANTED.scale * PLANTED.rotation @ centre
                                   + PLANTED.translation, atol=1e-12)
        assert np.allclose(moved[f, :, :3] @ moved[f, :, :3].T, np.eye(3), atol=1e-12)
    depth = rng.uniform(1, 5, (2, 3, 4)).astype(np.float32)
    scaled = transform_depth(depth, PLANTED)
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled, depth * 1.37, rtol=1e-6)


def test_chain_maps_every_chunk_into_the_first():
    rng = np.random.default_rng(6)
    pairwise = [Sim3(float(rng.uniform(0.5, 2)), Rotation.random(random_state=i).as_matrix(),
                     rng.normal(size=3)) for i in range(4)]
    chained = chain_to_first(pairwise)
    points = rng.normal(size=(10, 3))
    assert len(chained) == 5
    np.testing.assert_allclose(chained[0].apply(points), points, atol=0)
    for k in range(1, 5):
        stepwise = points.copy()
        for step in reversed(pairwise[:k]):  # chunk k → k − 1 → … → 0
            stepwise = np.array([step.scale * step.rotation @ p + step.translation
                                 for p in stepwise])
        np.testing.assert_allclose(chained[k].apply(points), stepwise, atol=1e-12)
        np.testing.assert_allclose(chained[k].inverse().apply(stepwise), points, atol=1e-12)


def test_bad_inputs_are_refused_in_one_line():
    rng = np.random.default_rng(7)
    src = rng.normal(size=(10, 3))
    weights = np.ones(10)
    for kwargs, message in (({"mode": "affine"}, "not one of"),
                            ({"mode": "scale+se3"}, "positive fixed scale"),
                            ({"scale": 2.0}, "takes no fixed scale"),
                            ({"huber_delta": 0.0}, "Huber delta")):
        with pytest.raises(UserError, match=message):
            estimate_sim3(src, src, weights, **kwargs)
    line = np.outer(np.arange(10.0), [1.0, 2.0, 3.0])
    with pytest.raises(UserError, match="degenerate"):
        estimate_sim3(line, line, weights)
    with pytest.raises(UserError, match="at least 3 points"):
        estimate_sim3(src, src, np.zeros(10))
    ones = np.ones((1, 2, 2))
    cams = (np.eye(3, 4)[None], np.eye(3)[None])
    with pytest.raises(UserError, match="increase the chunk overlap"):
        overlap_correspondences(ones, ones, *cams, ones, ones, *cams)  # conf 1: no confidence
