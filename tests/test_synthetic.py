"""Tests for the synthetic renderer, checked against independent pinhole / ray-sphere formulas."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from vggt4d.errors import UserError
from vggt4d.synthetic import SyntheticConfig, SyntheticScene, render_scene

# The room documented in vggt4d.synthetic (written out here, not imported, so the test is
# independent of the module's constants).
ROOM_LO = np.array([-3.0, -1.5, -2.0])
ROOM_HI = np.array([3.0, 1.5, 5.0])


@pytest.fixture(scope="module")
def default_scene() -> SyntheticScene:
    return render_scene(SyntheticConfig())


def _pose(scene: SyntheticScene, t: int) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera rotation (3, 3) and translation (3,) of frame t, float64."""
    ext = scene.extrinsics[t].astype(np.float64)
    return ext[:, :3], ext[:, 3]


def _pixel_rays(scene: SyntheticScene, t: int) -> np.ndarray:
    """Camera-frame rays (H, W, 3) with z = 1 through pixel centres (u + 0.5, v + 0.5)."""
    _, h, w = scene.depth.shape
    k = scene.intrinsics[t].astype(np.float64)
    v, u = np.mgrid[0:h, 0:w] + 0.5
    x = (u - k[0, 2]) / k[0, 0]
    y = (v - k[1, 2]) / k[1, 1]
    return np.stack([x, y, np.ones_like(x)], axis=-1)


def _project(scene: SyntheticScene, t: int, world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Continuous pixel coordinates (N, 2) and z-depth (N,) of world points (N, 3) in frame t."""
    rot, trans = _pose(scene, t)
    cam = world @ rot.T + trans
    k = scene.intrinsics[t].astype(np.float64)
    uv = np.stack(
        [k[0, 0] * cam[:, 0] / cam[:, 2] + k[0, 2], k[1, 1] * cam[:, 1] / cam[:, 2] + k[1, 2]],
        axis=1,
    )
    return uv, cam[:, 2]


def test_shapes_dtypes_and_depth_positive(default_scene: SyntheticScene) -> None:
    s = default_scene
    assert s.frames.shape == (12, 210, 280, 3) and s.frames.dtype == np.uint8
    assert s.depth.shape == (12, 210, 280) and s.depth.dtype == np.float32
    assert s.dynamic_masks.shape == (12, 210, 280) and s.dynamic_masks.dtype == np.bool_
    assert s.object_ids.shape == (12, 210, 280) and s.object_ids.dtype == np.int16
    assert s.intrinsics.shape == (12, 3, 3) and s.intrinsics.dtype == np.float32
    assert s.extrinsics.shape == (12, 3, 4) and s.extrinsics.dtype == np.float32
    assert np.isfinite(s.depth).all() and (s.depth > 0).all()
    small = render_scene(SyntheticConfig(num_frames=3, width=40, height=30, num_objects=2))
    assert small.frames.shape == (3, 30, 40, 3)
    assert set(np.unique(small.object_ids)) <= {0, 1, 2}


def test_intrinsics_match_fov() -> None:
    s = render_scene(SyntheticConfig(num_frames=2, width=100, height=60, fov_deg=90.0))
    expected = np.array([[50.0, 0, 50.0], [0, 50.0, 30.0], [0, 0, 1]])  # f = (W / 2) / tan(45)
    np.testing.assert_allclose(s.intrinsics, np.broadcast_to(expected, (2, 3, 3)), atol=1e-4)


def test_extrinsics_are_rigid_and_camera_inside_room(default_scene: SyntheticScene) -> None:
    for t in range(default_scene.extrinsics.shape[0]):
        rot, trans = _pose(default_scene, t)
        np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-6)
        assert np.linalg.det(rot) == pytest.approx(1.0, abs=1e-6)
        centre = -rot.T @ trans
        assert (centre > ROOM_LO + 0.3).all() and (centre < ROOM_HI - 0.3).all()


def test_static_points_reproject_consistently(default_scene: SyntheticScene) -> None:
    s = default_scene
    _, h, w = s.depth.shape
    for i, j in [(0, 11), (11, 0), (3, 7)]:
        rot_i, trans_i = _pose(s, i)
        cam = _pixel_rays(s, i) * s.depth[i, :, :, None].astype(np.float64)
        world = (cam[s.object_ids[i] == 0] - trans_i) @ rot_i  # R^T (X_cam - t), row form
        uv, z = _project(s, j, world)
        # Inverse depth is affine in pixel coordinates on a plane, so bilinear interpolation
        # of 1/depth between the four surrounding pixel centres is exact inside a face.
        grid = uv - 0.5  # pixel centres sit at integer grid coordinates
        base = np.floor(grid).astype(int)
        sel = (z > 0) & (base >= 0).all(axis=1) & (base < [w - 1, h - 1]).all(axis=1)
        (x0, y0), (fx, fy), z = base[sel].T, (grid[sel] - base[sel]).T, z[sel]
        corners = [(y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)]
        weights = [(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy]
        # Points hidden by an object in frame j are skipped; the room is convex seen from
        # inside, so it never hides a part of itself.
        unoccluded = np.all([s.object_ids[j][c] == 0 for c in corners], axis=0)
        inv = sum(
            wt / s.depth[j][c].astype(np.float64) for c, wt in zip(corners, weights, strict=True)
        )
        rel_err = np.abs(inv * z - 1.0)[unoccluded]
        assert rel_err.size > 20000
        # Exact up to float32 rounding, except where the 4 pixels straddle a room edge.
        assert np.median(rel_err) < 1e-6
        assert np.quantile(rel_err, 0.95) < 5e-6
        assert rel_err.max() < 2e-2


def test_room_corners_project_where_pinhole_says(default_scene: SyntheticScene) -> None:
    s = default_scene
    _, h, w = s.depth.shape
    corners = np.array([[x, y, ROOM_HI[2]] for x in (-3.0, 3.0) for y in (-1.5, 1.5)])
    rot, trans = _pose(s, 0)
    k = s.intrinsics[0].astype(np.float64)
    for corner in corners:
        cam = rot @ corner + trans
        u = k[0, 0] * cam[0] / cam[2] + k[0, 2]
        v = k[1, 1] * cam[1] / cam[2] + k[1, 2]
        assert 0 <= u < w and 0 <= v < h, "far corners of the room should be in view"
        col, row = int(u), int(v)
        assert s.object_ids[0, row, col] == 0
        # Depth is continuous across the two walls and the floor/ceiling meeting at the corner.
        assert s.depth[0, row, col] == pytest.approx(cam[2], rel=1e-2)


def test_sphere_silhouette_and_depth_match_analytic() -> None:
    s = render_scene(SyntheticConfig(num_frames=2, camera_motion=0.0))
    rot, trans = _pose(s, 0)
    centre = rot @ s.object_centers[0, 0].astype(np.float64) + trans
    radius = float(s.object_radii[0])
    k = s.intrinsics[0].astype(np.float64)
    f = k[0, 0]
    mask = s.object_ids[0] == 1
    rows, cols = np.nonzero(mask)
    assert rows.min() > 0 and cols.min() > 0  # silhouette fully inside the image
    assert rows.max() < mask.shape[0] - 1 and cols.max() < mask.shape[1] - 1
    # Area of the ellipse a sphere projects to (pinhole, square pixels).
    d2, z = centre @ centre, centre[2]
    area = math.pi * f**2 * radius**2 * math.sqrt(d2 - radius**2) / (z**2 - radius**2) ** 1.5
    assert mask.sum() == pytest.approx(area, rel=0.03)
    # Pixel-exact silhouette: rays passing within `radius` of the centre.
    rays = _pixel_rays(s, 0)
    unit = rays / np.linalg.norm(rays, axis=-1, keepdims=True)
    along = unit @ centre
    analytic_mask = d2 - along**2 < radius**2
    assert (analytic_mask != mask).sum() <= 3
    # Depth at the centre pixel: distance to the centre minus the half-chord, along the ray.
    u = f * centre[0] / z + k[0, 2]
    v = k[1, 1] * centre[1] / z + k[1, 2]
    col, row = int(u), int(v)
    b = along[row, col]
    dist = b - math.sqrt(radius**2 - (d2 - b**2))
    assert s.depth[0, row, col] == pytest.approx(dist * unit[row, col, 2], abs=1e-4)
    assert dist == pytest.approx(math.sqrt(d2) - radius, abs=1e-2)  # the ray nearly hits the centre


def test_objects_occlude_room_and_each_other() -> None:
    s = render_scene(SyntheticConfig(num_frames=3, num_objects=4, seed=3))
    for t in range(3):
        rot, trans = _pose(s, t)
        rays = _pixel_rays(s, t)
        best = np.full(rays.shape[:2], np.inf)
        best_id = np.zeros(rays.shape[:2], dtype=int)
        for k, (world_c, radius) in enumerate(
            zip(s.object_centers[t], s.object_radii, strict=True)
        ):
            c = rot @ world_c.astype(np.float64) + trans
            a, b = (rays**2).sum(-1), rays @ c
            disc = b**2 - a * (c @ c - float(radius) ** 2)
            root = (b - np.sqrt(np.maximum(disc, 0))) / a  # z-depth, since rays have z = 1
            hit = (disc >= 0) & (root > 0) & (root < best)
            best[hit], best_id[hit] = root[hit], k + 1
        visible = best < s.depth[t] * (1 + 1e-4)  # in front of (or on) whatever is rendered
        on_obj = s.object_ids[t] > 0
        assert (visible != on_obj).sum() <= 5
        both = visible & on_obj
        assert (best_id[both] != s.object_ids[t][both]).sum() <= 5
        np.testing.assert_allclose(s.depth[t][both], best[both], rtol=1e-4)
        assert set(np.unique(s.object_ids[t])) == {0, 1, 2, 3, 4}


def test_dynamic_masks(default_scene: SyntheticScene) -> None:
    s = default_scene
    np.testing.assert_array_equal(s.dynamic_masks, s.object_ids > 0)
    assert all(s.dynamic_masks[t].sum() > 200 for t in range(s.depth.shape[0]))
    first, last = (np.argwhere(s.dynamic_masks[t]).mean(axis=0) for t in (0, -1))
    assert np.linalg.norm(first - last) > 5.0

    no_objects = render_scene(SyntheticConfig(num_frames=3, num_objects=0))
    assert not no_objects.dynamic_masks.any() and not no_objects.object_ids.any()
    assert no_objects.object_centers.shape == (3, 0, 3)

    still = render_scene(SyntheticConfig(num_frames=3, object_speed=0.0, num_objects=2))
    assert not still.dynamic_masks.any()
    assert (still.object_ids > 0).any()  # the objects are there, they just do not move
    assert np.ptp(still.object_centers, axis=0).max() == 0.0


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_default_object_stays_in_view(seed: int) -> None:
    s = render_scene(SyntheticConfig(seed=seed, width=140, height=105))
    assert all((s.object_ids[t] == 1).sum() > 20 for t in range(s.depth.shape[0]))


def test_static_camera_when_motion_is_zero() -> None:
    s = render_scene(SyntheticConfig(num_frames=4, camera_motion=0.0))
    assert np.ptp(s.extrinsics, axis=0).max() == 0.0
    moving = render_scene(SyntheticConfig(num_frames=4))
    assert np.ptp(moving.extrinsics[:, :, 3], axis=0).max() > 0.1


def test_object_colors() -> None:
    cfg = SyntheticConfig(num_frames=2, num_objects=2, object_colors=[0.0, 0.0, 1.0, 0.0, 1.0, 0])
    s = render_scene(cfg)
    frames = s.frames.astype(int)
    blue, green = frames[s.object_ids == 1], frames[s.object_ids == 2]
    assert (blue[:, 2] > 40).all() and (blue[:, :2] == 0).all()
    assert (green[:, 1] > 40).all() and (green[:, [0, 2]] == 0).all()
    # Default palette: saturated and unlike the room.
    d = render_scene(SyntheticConfig(num_frames=2))
    obj, room = d.frames[d.object_ids == 1].astype(int), d.frames[d.object_ids == 0].astype(int)
    obj_sat = (obj.max(1) - obj.min(1)) / np.maximum(obj.max(1), 1)
    room_sat = (room.max(1) - room.min(1)) / np.maximum(room.max(1), 1)
    assert np.median(obj_sat) > 0.8 and np.quantile(room_sat, 0.95) < 0.5


def test_deterministic_and_seed_sensitive() -> None:
    cfg = SyntheticConfig(num_frames=3, num_objects=2)
    a, b = render_scene(cfg), render_scene(dataclasses.replace(cfg))
    for f in dataclasses.fields(SyntheticScene):
        np.testing.assert_array_equal(getattr(a, f.name), getattr(b, f.name))
    c = render_scene(dataclasses.replace(cfg, seed=1))
    assert not np.array_equal(a.frames, c.frames)
    assert not np.array_equal(a.extrinsics, c.extrinsics)
    assert not np.array_equal(a.object_centers, c.object_centers)


def test_textures_have_structure(default_scene: SyntheticScene) -> None:
    for frame in default_scene.frames:
        assert (frame.reshape(-1, 3).astype(float).std(axis=0) > 20).all()
    # Faces differ: the 14x14 patches of a frame are far from all alike.
    patches = default_scene.frames[0, :196, :266].reshape(14, 14, 19, 14, 3).swapaxes(1, 2)
    means = patches.reshape(14 * 19, -1, 3).mean(axis=1)
    assert len(np.unique(np.round(means / 8), axis=0)) > 60


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"num_frames": 1}, "num_frames"),
        ({"width": 27}, "width"),
        ({"height": 10}, "height"),
        ({"num_objects": -1}, "num_objects"),
        ({"num_objects": 9}, "num_objects"),
        ({"fov_deg": 10.0}, "fov_deg"),
        ({"fov_deg": 150.0}, "fov_deg"),
        ({"camera_motion": -0.1}, "camera_motion"),
        ({"object_speed": -1.0}, "object_speed"),
        ({"object_colors": [1.0, 0.0]}, "object_colors"),
        ({"object_colors": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]}, "object_colors"),
        ({"object_colors": [1.0, 0.0, 1.5]}, "object_colors"),
        ({"object_colors": [1.0, -0.1, 0.0]}, "object_colors"),
    ],
)
def test_validate_rejects_bad_fields(overrides: dict, name: str) -> None:
    cfg = dataclasses.replace(SyntheticConfig(), **overrides)
    with pytest.raises(UserError, match=name):
        cfg.validate()
    with pytest.raises(UserError, match=name):
        render_scene(cfg)


def test_validate_accepts_edge_values() -> None:
    SyntheticConfig(num_frames=2, width=28, height=28, num_objects=0).validate()
    SyntheticConfig(num_objects=8, camera_motion=0.0, object_speed=0.0).validate()
    SyntheticConfig(num_objects=1, object_colors=[0.0, 1.0, 0.5]).validate()


def test_extreme_settings_stay_inside_room() -> None:
    cfg = SyntheticConfig(
        num_frames=5, width=56, height=42, num_objects=8, camera_motion=3.0, object_speed=3.0
    )
    s = render_scene(cfg)
    assert (s.depth > 0).all() and s.dynamic_masks.any()
    for t in range(cfg.num_frames):
        rot, trans = _pose(s, t)
        centre = -rot.T @ trans
        assert (centre > ROOM_LO).all() and (centre < ROOM_HI).all()


def test_omegaconf_structured_config() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    schema = omegaconf.OmegaConf.structured(SyntheticConfig)
    merged = omegaconf.OmegaConf.merge(schema, {"num_frames": 2, "object_colors": [0, 1, 0]})
    cfg = omegaconf.OmegaConf.to_object(merged)
    assert isinstance(cfg, SyntheticConfig) and cfg.object_colors == [0.0, 1.0, 0.0]
    assert render_scene(cfg).frames.shape == (2, 210, 280, 3)
