"""Scene tokens: embeddings, voxel aggregates and token counts against independent answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from vggt4d.config.latent import LatentConfig
from vggt4d.config.points import PointsConfig
from vggt4d.errors import UserError
from vggt4d.gridsample import group_by_key
from vggt4d.latent import (
    aggregate,
    build_encoder,
    camera_embedding,
    cameras_in_frame,
    read_latent,
    scene_latent,
    time_embedding,
    write_latent,
)
from vggt4d.points import scene_points
from vggt4d.ptv3.checkpoint import save_checkpoint
from vggt4d.synthetic import SyntheticConfig, render_scene

CPU = torch.device("cpu")
NO_ENCODER = {"encoder": "none"}


def tilted(extrinsics: np.ndarray, seed: int = 0) -> np.ndarray:
    """The same cameras in a randomly rotated world, so the room's faces are not grid planes
    (a face lying exactly on a cell boundary splits into two layers by rounding)."""
    rotation = Rotation.random(random_state=seed).as_matrix()
    out = extrinsics.astype(np.float64)
    out[:, :, :3] = out[:, :, :3] @ rotation.T
    return out


def tokens_of(scene, frames: np.ndarray | slice = slice(None), all_dynamic: bool = False,
              **settings):
    extrinsics = tilted(scene.extrinsics)[frames]
    dynamic = scene.dynamic_masks[frames] | all_dynamic
    cloud = scene_points(scene.depth[frames], np.ones_like(scene.depth[frames]),
                         scene.frames[frames], scene.intrinsics[frames], extrinsics,
                         PointsConfig(conf_percentile=0.0), "metric", dynamic=dynamic)
    return scene_latent(cloud, extrinsics, scene.intrinsics[frames],
                        LatentConfig(**{**NO_ENCODER, **settings}), CPU), cloud


def test_time_embedding_is_the_token_scripts_sinusoid():
    times = torch.tensor([0.0, 0.25, 1.0])
    expected = [[f(w * t) for w in (100, 10, 1, 0.1) for f in (math.sin, math.cos)]
                for t in times.tolist()]
    torch.testing.assert_close(time_embedding(times, 8), torch.tensor(expected,
                                                                      dtype=torch.float64))
    wide = time_embedding(times, 12)
    assert wide.shape == (3, 12)
    torch.testing.assert_close(wide[:, :2], time_embedding(times, 8)[:, :2])  # ω₀ = 100 first


def test_camera_embeddings_from_the_inverse_extrinsics():
    rng = np.random.default_rng(0)
    rot = Rotation.random(2, random_state=1).as_matrix()
    w2c = np.concatenate([rot, rng.normal(size=(2, 3, 1))], axis=2)
    c2w = np.stack([np.linalg.inv(np.vstack([m, [0, 0, 0, 1]]))[:3] for m in w2c])
    flat = camera_embedding(cameras_in_frame(w2c, np.eye(4), 1.0), np.eye(3)[None].repeat(2, 0),
                            (10, 20), "c2w")
    np.testing.assert_allclose(flat[:, :12].numpy(), c2w.reshape(2, 12), atol=1e-12)
    assert not flat[:, 12:].any()
    k_mat = np.array([[10.0, 0, 10], [0, 5.0, 5], [0, 0, 1]])[None].repeat(2, 0)
    view = camera_embedding(c2w, k_mat, (10, 20), "centre_direction_fov").numpy()
    np.testing.assert_allclose(view[:, :3], c2w[:, :, 3])
    np.testing.assert_allclose(view[:, 3:6], c2w[:, :, 2])  # optical axis R^T e_z
    np.testing.assert_allclose(view[:, 6:], [[math.pi / 2, math.pi / 2]] * 2)


def test_aggregates_match_a_loop_over_voxels():
    gen = torch.Generator().manual_seed(0)
    num_points, num_voxels, num_frames = 400, 30, 5
    inverse = torch.randint(0, num_voxels, (num_points,), generator=gen)
    inverse[:num_voxels] = torch.arange(num_voxels)  # no empty voxel
    position = torch.randn(num_points, 3, generator=gen, dtype=torch.float64)
    color = torch.randint(0, 256, (num_points, 3), generator=gen, dtype=torch.uint8)
    frame = torch.randint(0, num_frames, (num_points,), generator=gen)
    prob = torch.rand(num_points, generator=gen)
    dynamic = prob > 0.7
    time_emb = torch.randn(num_frames, 8, generator=gen, dtype=torch.float64)
    cam_emb = torch.randn(num_frames, 16, generator=gen, dtype=torch.float64)
    voxels = group_by_key(inverse, torch.zeros(num_points, 3, dtype=torch.int64),
                          torch.zeros(3))  # keys 0..V-1: voxel v is key v
    assert torch.equal(voxels.inverse, inverse)
    agg = aggregate(voxels, position, color, frame, dynamic, prob, time_emb, cam_emb)
    for v in range(num_voxels):
        members = [i for i in range(num_points) if int(inverse[i]) == v]
        frames = [int(frame[i]) for i in members]
        assert int(agg.count[v]) == len(members)
        assert (int(agg.first_frame[v]), int(agg.last_frame[v])) == (min(frames), max(frames))
        assert int(agg.frames_seen[v]) == len(set(frames))
        assert agg.dynamic[v].item() == pytest.approx(sum(bool(dynamic[i]) for i in members)
                                                      / len(members))
        assert agg.dynamic_prob[v].item() == pytest.approx(
            sum(float(prob[i]) for i in members) / len(members), rel=1e-6)
        np.testing.assert_allclose(agg.color[v].numpy(), np.mean(
            [color[i].numpy() / 255.0 for i in members], axis=0), rtol=1e-6)
        np.testing.assert_allclose(agg.position[v].numpy(), np.mean(
            [position[i].numpy() for i in members], axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(agg.time_emb[v].numpy(), np.mean(
            [time_emb[f].numpy() for f in frames], axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(agg.cam_emb[v].numpy(), np.mean(
            [cam_emb[f].numpy() for f in frames], axis=0), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def static_scene():
    return render_scene(SyntheticConfig(num_frames=36, width=200, height=150, object_speed=0.0,
                                        num_objects=1))


def test_static_scene_token_count_does_not_grow_with_frames(static_scene):
    counts = {n: tokens_of(static_scene, np.linspace(0, 35, n).round().astype(int),
                           grid_size=0.2)[0].meta["tokens"] for n in (18, 24, 36)}
    assert max(counts.values()) <= 1.01 * min(counts.values()), counts
    # the same points keyed per frame (every point dynamic) grow with the frames: the test
    # can fail
    per_frame = {n: tokens_of(static_scene, np.linspace(0, 35, n).round().astype(int),
                              grid_size=0.2, dynamic_voxels=True, all_dynamic=True)[0]
                 .meta["tokens"] for n in (18, 36)}
    assert per_frame[36] > 1.8 * per_frame[18]


def test_every_kept_pixel_lies_in_its_voxel(static_scene):
    latent, cloud = tokens_of(static_scene, slice(0, 8), grid_size=0.1)
    pts = cloud.points
    voxel = latent.pixel_voxel.reshape(-1)[torch.from_numpy(pts.pixel)]
    assert bool((voxel >= 0).all())
    world = np.linalg.inv(cloud.world_to_scene) @ np.c_[pts.coord, np.ones(len(pts))].T
    cell = np.floor((latent.world_to_grid.numpy() @ world)[:3].T).astype(np.int64)
    agree = (cell == latent.coord[voxel].numpy()).all(axis=1)
    assert agree.mean() > 0.999  # rounding at cell boundaries only
    # voxels built from a subsample: the other pixels still find their voxel
    sub = scene_latent(cloud, tilted(static_scene.extrinsics)[:8], static_scene.intrinsics[:8],
                       LatentConfig(grid_size=0.1, **NO_ENCODER), CPU, max_per_frame=2000)
    located = sub.pixel_voxel.reshape(-1)[torch.from_numpy(pts.pixel)]
    assert sub.meta["points_voxelised"] == 16000 and int((located >= 0).sum()) > 5 * 16000
    found = (located >= 0).numpy()
    sub_cell = np.floor((sub.world_to_grid.numpy() @ world)[:3].T).astype(np.int64)
    assert (sub_cell[found] == sub.coord[located[found]].numpy()).all(axis=1).mean() > 0.999


def test_a_moving_object_adds_tokens_in_proportion_to_its_path():
    extra, lengths = [], []
    base = None
    for speed in (0.0, 1.0, 1.5, 2.0):
        scene = render_scene(SyntheticConfig(num_frames=24, width=200, height=150,
                                             object_speed=speed, num_objects=1))
        tokens = tokens_of(scene, grid_size=0.1)[0].meta["tokens"]
        base = tokens if base is None else base
        extra.append(tokens - base)
        lengths.append(np.linalg.norm(np.diff(scene.object_centers[:, 0], axis=0), axis=1).sum())
    steps = np.diff(extra[1:]) / np.diff(lengths[1:])  # tokens per metre of path
    assert extra[1] > 0 and (steps > 0).all() and steps.max() <= 1.15 * steps.min(), extra


def test_dynamic_voxels_keep_the_moving_objects_time_and_not_the_backgrounds():
    scene = render_scene(SyntheticConfig(num_frames=16, object_speed=2.0, num_objects=1))
    plain = tokens_of(scene, grid_size=0.1)[0]
    timed = tokens_of(scene, grid_size=0.1, dynamic_voxels=True, time_bin=4)[0]
    static = timed.time_bin == 0
    assert set(timed.time_bin[~static].tolist()) == {1, 2, 3, 4}
    bins = timed.time_bin[~static] - 1
    assert bool(((timed.aggregates.first_frame[~static] // 4) == bins).all())
    assert bool(((timed.aggregates.last_frame[~static] // 4) == bins).all())
    assert bool((timed.aggregates.dynamic[~static] == 1).all())
    assert bool((timed.aggregates.dynamic[static] == 0).all())
    assert int(static.sum()) <= plain.meta["tokens"] < timed.meta["tokens"]


@pytest.mark.parametrize(("settings", "needle"), [
    ({"grid_size": 0.0}, "latent.grid_size"),
    ({"time_dim": 7}, "latent.time_dim"),
    ({"levels": [0, 5]}, "latent.levels"),
    ({"encoder": "small", "weights": "concerto_large"}, "set latent.encoder=large"),
    ({"weights": "/no/such/file.pth"}, "no such file"),
])
def test_bad_latent_settings_are_refused(settings, needle):
    with pytest.raises(UserError, match=needle):
        LatentConfig(**settings).check()


def test_a_grid_too_fine_for_16_bit_serialisation_names_a_grid_that_fits(static_scene):
    with pytest.raises(UserError, match=r"on axis [xyz]: .* use a grid size >= "):
        tokens_of(static_scene, slice(0, 2), grid_size=1e-4)


@pytest.fixture(scope="module")
def small_scene():
    return render_scene(SyntheticConfig(num_frames=6, width=96, height=72, object_speed=2.0,
                                        num_objects=1))


def encoded(scene, **settings):
    settings = LatentConfig(**{"encoder": "tiny", "weights": "random", "grid_size": 0.05,
                                 **settings})
    extrinsics = tilted(scene.extrinsics)
    cloud = scene_points(scene.depth, np.ones_like(scene.depth), scene.frames, scene.intrinsics,
                         extrinsics, PointsConfig(conf_percentile=0.0), "metric",
                         dynamic=scene.dynamic_masks)
    return scene_latent(cloud, extrinsics, scene.intrinsics, settings, CPU,
                        None if settings.encoder == "none" else build_encoder(settings, CPU))


def test_same_seed_gives_an_identical_scene_latent_file(small_scene, tmp_path):
    paths = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        latent = encoded(small_scene, seed=seed)
        paths.append(tmp_path / f"{name}.pt")
        write_latent(paths[-1], latent, torch.float16)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    first, other = (torch.load(path) for path in (paths[0], paths[2]))  # weights_only loads
    assert first["geo_feat"].shape == (len(first["coord"]), 16 + 16 + 32 + 32 + 64)
    assert first["coord"].dtype == torch.int64 and first["geo_feat"].dtype == torch.float16
    assert not torch.equal(first["geo_feat"], other["geo_feat"])


def test_the_file_carries_intrinsics_and_its_format_and_refuses_newer_ones(small_scene, tmp_path):
    latent = encoded(small_scene)
    write_latent(tmp_path / "a.pt", latent, torch.float32)
    data = read_latent(tmp_path / "a.pt")
    assert data["format_version"] == 1
    np.testing.assert_array_equal(data["intrinsics"].numpy(), small_scene.intrinsics)
    data["format_version"] = 99
    torch.save(data, tmp_path / "b.pt")
    with pytest.raises(UserError, match="format 99"):
        read_latent(tmp_path / "b.pt")
    torch.save({"tokens": torch.zeros(3)}, tmp_path / "c.pt")
    with pytest.raises(UserError, match=r"not a scene_latent\.pt"):
        read_latent(tmp_path / "c.pt")
    with pytest.raises(UserError, match="cannot read"):
        read_latent(tmp_path / "missing.pt")


def test_camera_codes_in_the_encoder_frame_or_in_das_world(small_scene):
    """cam_emb of a token seen in one frame: c2w of that frame, in the tokens' frame by default,
    in DA3's world (the inverse of the world-to-camera extrinsics) with camera_frame=world."""
    extrinsics = tilted(small_scene.extrinsics)
    c2w_world = np.stack([np.linalg.inv(np.vstack([m, [0, 0, 0, 1]]))[:3] for m in extrinsics])
    for frame_name in ("encoder", "world"):
        latent = encoded(small_scene, camera_frame=frame_name, encoder="none")
        single = latent.aggregates.first_frame == latent.aggregates.last_frame
        frame = latent.aggregates.first_frame[single].numpy()
        want = latent.c2w.numpy() if frame_name == "encoder" else c2w_world
        np.testing.assert_allclose(latent.aggregates.cam_emb[single, :12].numpy(),
                                   want[frame].reshape(-1, 12), atol=1e-5)
        assert latent.meta["camera_frame"] == frame_name
    # the encoder frame differs from DA3's world (z up, centre shift): the two codes differ
    assert not np.allclose(latent.c2w.numpy(), c2w_world, atol=1e-3)


def test_tokens_get_the_encoder_levels_asked_for_and_share_their_voxels_features(small_scene):
    three = encoded(small_scene, levels=[2, 3, 4])
    assert three.geo_feat.shape[1] == 32 + 32 + 64
    timed = encoded(small_scene, dynamic_voxels=True)
    assert bool((timed.time_bin > 0).any())
    # tokens of one spatial voxel at different times carry that voxel's features
    cells = {}
    for row, cell in enumerate(map(tuple, timed.coord.tolist())):
        cells.setdefault(cell, []).append(row)
    shared = [rows for rows in cells.values() if len(rows) > 1]
    assert shared
    for rows in shared:
        assert all(torch.equal(timed.geo_feat[rows[0]], timed.geo_feat[r]) for r in rows)


def test_a_saved_checkpoint_gives_the_random_encoders_features(small_scene, tmp_path):
    settings = LatentConfig(encoder="tiny", weights="random", seed=5)
    path = save_checkpoint(tmp_path / "tiny.pth", build_encoder(settings, CPU))
    from_random = encoded(small_scene, seed=5)
    from_file = encoded(small_scene, seed=5, weights=str(path))
    torch.testing.assert_close(from_file.geo_feat, from_random.geo_feat, rtol=0, atol=0)
    with pytest.raises(UserError, match="small"):
        encoded(small_scene, encoder="small", weights=str(path))


@pytest.mark.parametrize("hash_type", ["fnv", "ravel"])
@pytest.mark.parametrize("dynamic_voxels", [False, True])
def test_pixel_voxels_count_each_tokens_points(small_scene, hash_type, dynamic_voxels):
    latent, cloud = tokens_of(small_scene, grid_size=0.05, hash=hash_type,
                              dynamic_voxels=dynamic_voxels)
    voxel = latent.pixel_voxel.reshape(-1)[torch.from_numpy(cloud.points.pixel)].long()
    assert bool((voxel >= 0).all()) and int((latent.pixel_voxel >= 0).sum()) == len(cloud.points)
    torch.testing.assert_close(torch.bincount(voxel, minlength=len(latent.coord)),
                               latent.aggregates.count)
    # a token's pixels come from its frames only
    frames = torch.from_numpy(cloud.points.frame)
    assert bool((frames >= latent.aggregates.first_frame[voxel]).all())
    assert bool((frames <= latent.aggregates.last_frame[voxel]).all())


def test_cameras_in_the_encoder_frame_project_points_back_to_their_pixels(small_scene):
    extrinsics = tilted(small_scene.extrinsics)
    cloud = scene_points(small_scene.depth, np.ones_like(small_scene.depth), small_scene.frames,
                         small_scene.intrinsics, extrinsics, PointsConfig(
                             conf_percentile=0.0, median_depth=3.0), "median_depth")
    latent = scene_latent(cloud, extrinsics, small_scene.intrinsics,
                          LatentConfig(grid_size=0.05, **NO_ENCODER), CPU)
    pts = cloud.points
    enc = pts.coord.astype(np.float64) - latent.meta["center_shift"]
    c2w = latent.c2w.numpy()[pts.frame]
    cam = np.einsum("nji,nj->ni", c2w[:, :, :3], enc - c2w[:, :, 3])  # R^T (X − C)
    t, v, u = np.unravel_index(pts.pixel, small_scene.depth.shape)
    np.testing.assert_allclose(cam[:, 2], cloud.scale * small_scene.depth[t, v, u], rtol=1e-5)
    pixel = np.einsum("nij,nj->ni", small_scene.intrinsics[t].astype(np.float64), cam)
    np.testing.assert_allclose(pixel[:, :2] / pixel[:, 2:], np.stack([u + 0.5, v + 0.5], 1),
                               atol=1e-3)
