"""Scene points: back-projection, normals, filters and the encoder frame vs analytic answers."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from torch import nn

from vggt4d.config.points import PointsConfig
from vggt4d.errors import UserError
from vggt4d.points import (
    Y_DOWN_TO_Z_UP,
    camera_vertical,
    estimate_normals,
    scene_points,
)
from vggt4d.predict import sky_capture
from vggt4d.synthetic import ROOM_MAX, ROOM_MIN, SyntheticConfig, render_scene


@pytest.fixture(scope="module")
def scene():
    return render_scene(SyntheticConfig(num_frames=3, width=96, height=72, object_speed=0.0,
                                        num_objects=1))


def all_pixels(**kwargs) -> PointsConfig:
    return PointsConfig(conf_percentile=0.0, **kwargs)


def test_points_lie_on_the_room_or_the_sphere_with_their_frames_colours(scene):
    cloud = scene_points(scene.depth, np.ones_like(scene.depth), scene.frames, scene.intrinsics,
                         scene.extrinsics, all_pixels(up="none"), "metric")
    pts = cloud.points
    assert len(pts) == scene.depth.size and cloud.scale == 1.0
    room = pts.coord[scene.object_ids.reshape(-1)[pts.pixel] == 0].astype(np.float64)
    # distance of a point inside the box to the nearest face
    to_face = np.minimum(room - ROOM_MIN, ROOM_MAX - room).min(axis=1)
    assert np.abs(to_face).max() < 1e-4
    centre, radius = scene.object_centers[0, 0], scene.object_radii[0]
    sphere = pts.coord[scene.object_ids.reshape(-1)[pts.pixel] == 1]
    assert np.abs(np.linalg.norm(sphere - centre, axis=1) - radius).max() < 1e-4
    t, v, u = np.unravel_index(pts.pixel, scene.depth.shape)
    np.testing.assert_array_equal(pts.color, scene.frames[t, v, u])
    np.testing.assert_array_equal(pts.frame, t)


def test_normals_of_a_tilted_plane_face_the_camera():
    """Camera at the origin looking down +z at the plane z = 2 + 0.5 x."""
    height, width, focal = 40, 50, 45.0
    v, u = np.mgrid[0:height, 0:width]
    ray_x = (u + 0.5 - width / 2) / focal
    depth = (2.0 / (1.0 - 0.5 * ray_x))[None]
    world = np.stack([ray_x * depth[0], (v + 0.5 - height / 2) / focal * depth[0], depth[0]],
                     axis=-1)[None]
    normals = estimate_normals(world, depth, np.ones_like(depth, bool), np.zeros((1, 3)), 0.05)
    expected = np.array([0.5, 0.0, -1.0]) / np.linalg.norm([0.5, 0.0, -1.0])
    np.testing.assert_allclose(normals[0, 1:-1, 1:-1], np.broadcast_to(
        expected, normals[0, 1:-1, 1:-1].shape), atol=1e-5)
    assert not normals[0, 0].any() and not normals[0, :, -1].any()


def test_z_up_puts_the_floor_lowest_with_upward_normals(scene):
    cloud = scene_points(scene.depth, np.ones_like(scene.depth), scene.frames, scene.intrinsics,
                         scene.extrinsics, all_pixels(), "metric")
    pts = cloud.points
    world_y = -pts.coord[:, 2]  # z up = −y down
    floor = np.isclose(world_y, ROOM_MAX[1], atol=1e-4)
    ceiling = np.isclose(world_y, ROOM_MIN[1], atol=1e-4)
    assert floor.sum() > 100 and ceiling.sum() > 100
    # away from the walls, where a pixel's neighbours may lie on another face
    inner = ((np.abs(pts.coord[:, 0]) < ROOM_MAX[0] - 0.6) & (pts.coord[:, 1] > ROOM_MIN[2] + 0.6)
             & (pts.coord[:, 1] < ROOM_MAX[2] - 0.6))
    has_normal = (np.linalg.norm(pts.normal, axis=1) > 0.5) & inner
    assert np.abs(pts.normal[floor & has_normal] - [0, 0, 1]).max() < 1e-3
    assert np.abs(pts.normal[ceiling & has_normal] - [0, 0, -1]).max() < 1e-3
    np.testing.assert_allclose(cloud.world_to_scene[:3, :3],
                               [[1, 0, 0], [0, 0, 1], [0, -1, 0]])


def test_up_from_the_cameras_finds_the_rooms_vertical_in_a_tilted_world():
    """The synthetic cameras never roll and change heading; in a randomly rotated world
    (X' = Q X) the rooms's up, −y before the rotation, must come out as +z."""
    moving = render_scene(SyntheticConfig(num_frames=8, width=48, height=36))
    for seed in range(3):
        tilt = Rotation.random(random_state=seed).as_matrix()
        extrinsics = moving.extrinsics.astype(np.float64)
        extrinsics[:, :, :3] = extrinsics[:, :, :3] @ tilt.T
        rotation = camera_vertical(extrinsics)
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
        assert np.isclose(np.linalg.det(rotation), 1.0)
        np.testing.assert_allclose(rotation @ tilt @ [0.0, -1.0, 0.0], [0, 0, 1], atol=1e-9)
    cloud = scene_points(moving.depth, np.ones_like(moving.depth), moving.frames,
                         moving.intrinsics, extrinsics, all_pixels(up="cameras"), "metric")
    floor = np.isclose(-(tilt.T @ (cloud.world_to_scene[:3, :3].T @ cloud.points.coord.T))[1],
                       ROOM_MAX[1], atol=1e-4)
    assert floor.sum() > 50 and np.ptp(cloud.points.coord[floor, 2]) < 1e-4  # a level floor


def _hand_held(frames: int, heading_deg: float, roll_deg: float, pitch_deg: float, seed: int
               ) -> np.ndarray:
    """(frames, 3, 4) world-to-camera of a camera in an OpenCV world (y down) turning by a
    heading spread of ``heading_deg`` (std), rolling randomly by ``roll_deg`` (std), pitched
    down by ``pitch_deg``."""
    rng = np.random.default_rng(seed)
    extrinsics = np.zeros((frames, 3, 4))
    for t in range(frames):
        c2w = Rotation.from_euler("YXZ", [rng.normal(0, heading_deg), -pitch_deg,
                                          rng.normal(0, roll_deg)], degrees=True).as_matrix()
        extrinsics[t, :, :3] = c2w.T
    return extrinsics


@pytest.mark.parametrize(("frames", "heading", "roll", "pitch"), [
    (60, 20.0, 1.0, 15.0), (10, 20.0, 1.0, 15.0), (10, 4.0, 3.0, 5.0), (60, 4.0, 3.0, 5.0),
    (60, 2.0, 0.5, 5.0)])
def test_up_from_hand_held_cameras_stays_near_the_vertical(frames, heading, roll, pitch):
    """Whatever the heading spread and roll noise, the estimate is never worse than the cameras'
    common pitch (the fallback's bias), and exact-ish when the heading changes a lot (10 frames
    with roll 3/4 of the heading spread put the plane's normal some 40° off)."""
    worst = []
    for seed in range(5):
        rotation = camera_vertical(_hand_held(frames, heading, roll, pitch, seed))
        cos = np.clip(rotation[2] @ [0.0, -1.0, 0.0], -1, 1)  # R_up maps u to e_z: u = row 2
        worst.append(np.degrees(np.arccos(cos)))
    plane_found = heading >= 10 and heading >= 10 * roll
    assert max(worst) < (3.0 if plane_found else pitch + 2.0), worst


def test_up_from_cameras_of_one_heading_falls_back_with_a_warning(caplog):
    upright = np.zeros((3, 3, 4))
    upright[:, :, :3] = np.eye(3)
    with caplog.at_level(logging.WARNING):
        np.testing.assert_allclose(camera_vertical(upright), Y_DOWN_TO_Z_UP, atol=1e-12)
    assert "one heading" in caplog.text


def test_median_depth_scale_and_metric_only_for_metric_models(scene):
    cloud = scene_points(scene.depth, np.ones_like(scene.depth), scene.frames, scene.intrinsics,
                         scene.extrinsics, all_pixels(median_depth=3.0), "median_depth")
    assert cloud.scale == pytest.approx(3.0 / np.median(scene.depth))
    assert PointsConfig().scale_mode("da3nested-giant-large") == "metric"
    assert PointsConfig().scale_mode("da3-small") == "median_depth"
    with pytest.raises(UserError, match=r"points\.scale=metric needs a metric model"):
        PointsConfig(scale="metric").scale_mode("da3-small")


def test_confidence_percentile_and_sky_filter_exactly_those_pixels(scene):
    rng = np.random.default_rng(0)
    conf = 1.0 + np.exp(rng.normal(size=scene.depth.shape))  # DA3's range: always >= 1
    sky = rng.uniform(size=scene.depth.shape)
    cloud = scene_points(scene.depth, conf, scene.frames, scene.intrinsics, scene.extrinsics,
                         PointsConfig(conf_percentile=20.0, sky_threshold=0.7), "metric",
                         sky=sky)
    ranked = np.sort(conf[sky < 0.7])
    expected = (sky < 0.7) & (conf >= ranked[int(np.ceil(0.2 * (len(ranked) - 1)))])
    np.testing.assert_array_equal(cloud.kept, expected)
    np.testing.assert_array_equal(np.flatnonzero(expected), cloud.points.pixel)


def test_subsample_keeps_at_most_n_per_frame_reproducibly(scene):
    cloud = scene_points(scene.depth, np.ones_like(scene.depth), scene.frames, scene.intrinsics,
                         scene.extrinsics, all_pixels(), "metric")
    first = cloud.points.subsample(500, seed=3)
    again = cloud.points.subsample(500, seed=3)
    np.testing.assert_array_equal(np.bincount(first.frame), [500, 500, 500])
    np.testing.assert_array_equal(first.pixel, again.pixel)
    assert not np.array_equal(first.pixel, cloud.points.subsample(500, seed=4).pixel)


def test_nothing_left_after_filtering_is_one_clear_error(scene):
    with pytest.raises(UserError, match="no point is left after filtering"):
        scene_points(scene.depth, np.ones_like(scene.depth), scene.frames, scene.intrinsics,
                     scene.extrinsics, PointsConfig(), "metric",
                     sky=np.ones_like(scene.depth))


@pytest.mark.parametrize(("key", "value"), [("conf_percentile", 100.0), ("sky_threshold", 0.0),
                                            ("max_per_frame", -1), ("median_depth", 0.0)])
def test_bad_points_settings_are_refused(key, value):
    with pytest.raises(UserError, match=f"points.{key}"):
        PointsConfig(**{key: value}).check()


def test_sky_of_the_nested_models_metric_branch_is_captured():
    class Branch(nn.Module):
        def forward(self, x):
            return {"depth": x, "sky": x * 2}

    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.da3_metric = Branch()

        def forward(self, x):
            return {"depth": self.da3_metric(x)["depth"]}

    net, x = Nested(), torch.rand(1, 2, 4, 4)
    with sky_capture(net) as captured:
        net(x)
    torch.testing.assert_close(captured["sky"], x * 2)
    assert not net.da3_metric._forward_hooks
