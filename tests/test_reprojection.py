"""The hooks script's reprojection check: hand-computed planes, and the synthetic scene's ground
truth geometry against an independent per-pixel computation written here (a planted moving
object is flagged, the static room is not)."""

from __future__ import annotations

import numpy as np
import pytest

from vggt4d.errors import UserError
from vggt4d.reprojection import reprojection_error, reprojection_refine
from vggt4d.synthetic import SyntheticConfig, render_scene

K = np.array([[4.0, 0.0, 4.0], [0.0, 4.0, 3.0], [0.0, 0.0, 1.0]])  # 8 x 6 frames


def _cameras(shifts: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Identity rotations, camera k moved right by shifts[k] (X_cam = X − shift·x̂)."""
    extrinsics = np.zeros((len(shifts), 3, 4))
    extrinsics[:, :, :3] = np.eye(3)
    extrinsics[:, 0, 3] = [-s for s in shifts]
    return np.repeat(K[None], len(shifts), axis=0), extrinsics


def test_planes_by_hand():
    """Fronto-parallel planes at depth 2, 2.5, 3 seen by cameras 0.2 apart (frame 1 and 2 share
    a camera). Frame 0 pixel u lands in frame 1 at sample index u − 0.4 (inside for u ≥ 1); frame
    1 pixel u in frame 0 at u + 0.32 (inside for u ≤ 6) and in frame 2 at u (always inside)."""
    intrinsics, extrinsics = _cameras([0.0, 0.2, 0.2])
    depth = np.stack([np.full((6, 8), d) for d in (2.0, 2.5, 3.0)])
    error = reprojection_error(depth, intrinsics, extrinsics)
    assert np.isnan(error[0, :, 0]).all()
    np.testing.assert_allclose(error[0, :, 1:], abs(2.0 - 2.5) / 2.5, atol=1e-6)
    both = (abs(2.5 - 2.0) / 2.0 + abs(2.5 - 3.0) / 3.0) / 2
    np.testing.assert_allclose(error[1, :, :7], both, atol=1e-6)
    np.testing.assert_allclose(error[1, :, 7], abs(2.5 - 3.0) / 3.0, atol=1e-6)
    np.testing.assert_allclose(error[2], abs(3.0 - 2.5) / 2.5, atol=1e-6)
    # the same plane in every frame is static everywhere it can be checked
    static = reprojection_error(np.full((3, 6, 8), 2.0), intrinsics, extrinsics)
    assert np.nanmax(static) < 1e-6


def test_refine_unites_the_flagged_pixels_with_the_coarse_masks():
    intrinsics, extrinsics = _cameras([0.0, 0.2, 0.2])
    depth = np.stack([np.full((6, 8), d) for d in (2.0, 2.0, 2.15)])  # errors 0, 0.035, 0.07
    depth[1, 2:4, 3:5] = 3.0  # a box that moved back in frame 1 only
    coarse = np.zeros((3, 6, 8), bool)
    coarse[2, 0, 0] = True
    refined, report = reprojection_refine(coarse, depth, intrinsics, extrinsics, threshold=0.1)
    expected = coarse | (np.nan_to_num(reprojection_error(depth, intrinsics, extrinsics)) > 0.1)
    assert np.array_equal(refined, expected)
    assert refined[2, 0, 0] and refined[1, 2:4, 3:5].all()
    assert not refined[1, 0].any() and not refined[0, :, 0].any()
    assert report["pixels_added"] == int((refined & ~coarse).sum())
    assert report["pixels_added_per_frame"] == (refined & ~coarse).sum(axis=(1, 2)).tolist()
    with pytest.raises(UserError, match="do not match"):
        reprojection_refine(coarse[:, :5], depth, intrinsics, extrinsics)


def _independent_error(depth, intrinsics, extrinsics, object_ids):
    """Per-pixel errors from the formulas (float64, own bilinear weights), and for each pixel
    whether every counted projection's 2×2 footprint lies on the room."""
    frames, height, width = depth.shape
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    total, count = np.zeros(depth.shape), np.zeros(depth.shape)
    on_room = np.ones(depth.shape, bool)
    for t in range(frames):
        rays = np.stack([u + 0.5, v + 0.5, np.ones_like(u)], -1) @ np.linalg.inv(
            intrinsics[t].astype(np.float64)).T
        rot, trans = extrinsics[t, :, :3].astype(np.float64), extrinsics[t, :, 3]
        world = (rays * depth[t, ..., None] - trans) @ rot  # Rᵀ(X_cam − t)
        for n in (t - 1, t + 1):
            if not 0 <= n < frames:
                continue
            cam = world @ extrinsics[n, :, :3].astype(np.float64).T + extrinsics[n, :, 3]
            image = cam @ intrinsics[n].astype(np.float64).T
            z = cam[..., 2]
            col, row = image[..., 0] / z - 0.5, image[..., 1] / z - 0.5
            slack = 1e-3  # projections this close outside the outermost centres count
            ok = ((z > 0.1) & (col >= -slack) & (col <= width - 1 + slack)
                  & (row >= -slack) & (row <= height - 1 + slack))
            col, row = np.clip(col, 0, width - 1), np.clip(row, 0, height - 1)
            c0 = np.where(ok, np.clip(np.floor(col), 0, width - 2), 0).astype(int)
            r0 = np.where(ok, np.clip(np.floor(row), 0, height - 2), 0).astype(int)
            fc, fr = col - c0, row - r0
            seen = depth[n].astype(np.float64)
            d = (seen[r0, c0] * (1 - fc) * (1 - fr) + seen[r0, c0 + 1] * fc * (1 - fr)
                 + seen[r0 + 1, c0] * (1 - fc) * fr + seen[r0 + 1, c0 + 1] * fc * fr)
            total[t][ok] += (np.abs(z - d) / d)[ok]
            count[t][ok] += 1
            room = ((object_ids[n][r0, c0] == 0) & (object_ids[n][r0, c0 + 1] == 0)
                    & (object_ids[n][r0 + 1, c0] == 0) & (object_ids[n][r0 + 1, c0 + 1] == 0))
            on_room[t] &= ~ok | room
    return np.where(count > 0, total / np.maximum(count, 1), np.nan), on_room


@pytest.mark.parametrize("seed", [0, 3])
def test_synthetic_scene_moving_object_flagged_static_room_not(seed):
    scene = render_scene(SyntheticConfig(num_frames=5, width=96, height=72, object_speed=3.0,
                                         seed=seed))
    error = reprojection_error(scene.depth, scene.intrinsics, scene.extrinsics)
    reference, on_room = _independent_error(scene.depth, scene.intrinsics, scene.extrinsics,
                                            scene.object_ids)
    assert np.array_equal(np.isnan(error), np.isnan(reference))
    np.testing.assert_allclose(error, reference, rtol=0, atol=1e-5)  # float32 world points
    flagged = np.nan_to_num(error) > 0.1
    assert scene.dynamic_masks.sum() > 500
    assert flagged[scene.dynamic_masks].mean() > 0.95  # the planted sphere moves ~0.9 m a frame
    static_room = (scene.object_ids == 0) & on_room  # room, landing on room in t ± 1
    assert static_room.mean() > 0.8
    assert not flagged[static_room].any()


def test_static_scene_has_nothing_to_flag():
    scene = render_scene(SyntheticConfig(num_frames=4, width=64, height=48, num_objects=0))
    error = reprojection_error(scene.depth, scene.intrinsics, scene.extrinsics)
    assert np.isfinite(error).mean() > 0.9
    assert np.nanmax(error) < 0.1
