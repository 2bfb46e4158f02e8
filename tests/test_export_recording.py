"""scene.rrd read back with Rerun's own reader (``rerun.chunk.RrdReader``, rerun-sdk 0.41's
chunk processing API) and compared with the inputs."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import rerun as rr
import torch
from scipy.spatial.transform import Rotation

from tests.export_scene import export_scene
from vggt4d.errors import UserError
from vggt4d.export.recording import tokens_in_world, write_recording

PER_FRAME = {"/world/camera", "/world/camera/rgb", "/world/camera/depth",
             "/world/camera/dynamic_mask", "/world/camera/soft", "/world/points/static",
             "/world/points/dynamic"}
STATIC = {"/world", "/world/tokens/color", "/world/tokens/dynamic"}


def read_recording(path) -> dict:
    """{(entity, component): {frame: value}} of the file's recording (frame None = static)."""
    reader = rr.chunk.RrdReader(path)
    assert len(reader.recordings()) == 1
    values: dict = defaultdict(dict)
    for chunk in reader.stream().to_chunks():
        batch = chunk.to_record_batch()
        frames = (batch.column("frame").to_pylist() if "frame" in batch.schema.names
                  else [None] * batch.num_rows)
        for name in batch.schema.names:
            if ":" in name:
                for frame, value in zip(frames, batch.column(name).to_pylist(), strict=True):
                    values[(chunk.entity_path, name)][frame] = value
    return values


def blob(value, dtype, shape) -> np.ndarray:
    """An image buffer component (one blob of bytes) as an array."""
    return np.frombuffer(np.asarray(value[0], np.uint8).tobytes(), dtype).reshape(shape)


def points(value) -> np.ndarray:
    return np.asarray(value, np.float64).reshape(-1, 3)


def rgb(value) -> np.ndarray:
    """Rerun's packed 0xRRGGBBAA colours → (N, 3) uint8."""
    packed = np.asarray(value, np.uint64)
    return np.stack([(packed >> shift) & 255 for shift in (24, 16, 8)], axis=1).astype(np.uint8)


@pytest.fixture
def scene():
    scene = export_scene(frames=4, width=56, height=42)
    scene.depth[1, 0, :3] = [np.nan, -1.0, 0.0]  # no depth: 0 in the image, no point
    return scene


def test_cameras_images_and_masks_read_back(tmp_path, scene):
    soft = np.linspace(0, 1, scene.depth.size, dtype=np.float32).reshape(scene.depth.shape)
    path = tmp_path / "scene.rrd"
    write_recording(path, scene.frames, scene.depth, scene.extrinsics, scene.intrinsics,
                    scene.dynamic, soft, max_points_per_frame=300)
    values = read_recording(path)
    assert {entity for entity, _ in values} == PER_FRAME | {"/world", "/__properties"}
    count, (height, width) = len(scene.frames), scene.frames.shape[1:3]
    for entity in PER_FRAME:
        frames = {frame for (name, _), rows in values.items() if name == entity for frame in rows}
        assert frames == set(range(count)), entity
    assert values[("/world", "ViewCoordinates:xyz")][None] == [[3, 2, 5]]  # Right, Down, Fwd
    for t in range(count):
        rotation, translation = scene.extrinsics[t][:, :3], scene.extrinsics[t][:, 3]
        # Rerun stores 3×3 matrices column-major; the camera's pose is camera-to-world
        mat = np.asarray(values[("/world/camera", "Transform3D:mat3x3")][t][0]).reshape(3, 3).T
        np.testing.assert_allclose(mat, rotation.T, atol=1e-6)
        np.testing.assert_allclose(values[("/world/camera", "Transform3D:translation")][t][0],
                                   -rotation.T @ translation, atol=1e-5)
        k_mat = np.asarray(values[("/world/camera", "Pinhole:image_from_camera")][t][0])
        np.testing.assert_allclose(k_mat.reshape(3, 3).T, scene.intrinsics[t], rtol=1e-6)
        assert values[("/world/camera", "Pinhole:resolution")][t][0] == [width, height]
        image = values[("/world/camera/rgb", "Image:buffer")][t]
        np.testing.assert_array_equal(blob(image, np.uint8, (height, width, 3)), scene.frames[t])
        depth = blob(values[("/world/camera/depth", "DepthImage:buffer")][t], np.float32,
                     (height, width))
        valid = np.isfinite(scene.depth[t]) & (scene.depth[t] > 0)
        np.testing.assert_array_equal(depth, np.where(valid, scene.depth[t], 0))
        assert values[("/world/camera/depth", "DepthImage:meter")][t] == [1.0]
        mask = blob(values[("/world/camera/dynamic_mask", "SegmentationImage:buffer")][t],
                    np.uint8, (height, width))
        np.testing.assert_array_equal(mask, scene.dynamic[t].astype(np.uint8))
        shown_soft = blob(values[("/world/camera/soft", "Image:buffer")][t], np.uint8,
                          (height, width))
        np.testing.assert_array_equal(shown_soft, np.floor(soft[t] * 255 + 0.5))
    planted = blob(values[("/world/camera/depth", "DepthImage:buffer")][1], np.float32,
                   (height, width))[0, :4]
    assert planted[:3].tolist() == [0, 0, 0] and planted[3] == scene.depth[1, 0, 3] > 0


def test_points_are_the_frames_pixels_subsampled_and_split_by_the_mask(tmp_path, scene):
    """At most max_points_per_frame points per frame; each lies on the ray of a pixel with
    depth, at that depth, static ones in that pixel's colour, dynamic ones on dynamic pixels
    pulled 60 % towards magenta (255, 0, 255)."""
    path = tmp_path / "scene.rrd"
    limit = 500
    summary = write_recording(path, scene.frames, scene.depth, scene.extrinsics,
                              scene.intrinsics, scene.dynamic, max_points_per_frame=limit)
    values = read_recording(path)
    for t in range(len(scene.frames)):
        usable = np.isfinite(scene.depth[t]) & (scene.depth[t] > 0)
        rotation, translation = scene.extrinsics[t][:, :3], scene.extrinsics[t][:, 3]
        seen = []
        for kind, moving in (("static", False), ("dynamic", True)):
            xyz = points(values[(f"/world/points/{kind}", "Points3D:positions")][t])
            camera = xyz @ rotation.T + translation
            image = camera @ scene.intrinsics[t].T
            u, v = np.floor(image[:, :2] / image[:, 2:]).astype(int).T
            np.testing.assert_allclose(camera[:, 2], scene.depth[t, v, u], rtol=1e-5)
            assert (scene.dynamic[t, v, u] == moving).all() and usable[v, u].all()
            colours = rgb(values[(f"/world/points/{kind}", "Points3D:colors")][t]).astype(float)
            want = scene.frames[t, v, u].astype(float)
            if moving:
                want = 0.4 * want + 0.6 * np.array([255, 0, 255])
            np.testing.assert_allclose(colours, want, atol=0.5 + 1e-9)
            seen += list(v * scene.depth.shape[2] + u)
        assert len(seen) == len(set(seen)) == min(limit, usable.sum())
        assert summary.static_points[t] + summary.dynamic_points[t] == len(seen)
        assert summary.dynamic_points[t] > 0
    assert values[("/world/points/dynamic", "Points3D:class_ids")][0] == \
        [1] * summary.dynamic_points[0]


def test_the_subsample_follows_the_seed_and_zero_keeps_every_pixel(tmp_path, scene):
    def positions(name, **kwargs):
        write_recording(tmp_path / name, scene.frames, scene.depth, scene.extrinsics,
                        scene.intrinsics, scene.dynamic, **kwargs)
        return points(read_recording(tmp_path / name)[("/world/points/static",
                                                       "Points3D:positions")][2])

    first = positions("a.rrd", seed=5, max_points_per_frame=200)
    np.testing.assert_array_equal(first, positions("b.rrd", seed=5, max_points_per_frame=200))
    other = positions("c.rrd", seed=6, max_points_per_frame=200)
    assert len(first) < 200 and not np.array_equal(first, other)
    everything = positions("d.rrd", max_points_per_frame=0)
    assert len(everything) == (~scene.dynamic[2]).sum()  # frame 2: every pixel has depth
    valid = np.zeros(scene.depth.shape, bool)
    valid[:, :10] = True
    kept = positions("e.rrd", max_points_per_frame=0, valid=valid)
    assert len(kept) == (~scene.dynamic[2, :10]).sum()


def planted_latent(seed: int = 0) -> tuple[dict, np.ndarray]:
    """A scene_latent.pt-like dict whose tokens sit at known DA3-world points, through a
    similarity X_enc = s R X − shift (s = 2.5), and those world points."""
    rng = np.random.default_rng(seed)
    world = rng.normal(size=(7, 3))
    scale, rotation = 2.5, Rotation.random(random_state=seed).as_matrix()
    shift = np.array([0.3, -4.0, 1.5])
    to_enc = np.eye(4)
    to_enc[:3, :3], to_enc[:3, 3] = scale * rotation, -shift
    latent = {"world_to_enc": torch.tensor(to_enc),
              "position": torch.tensor(world @ (scale * rotation).T - shift, dtype=torch.float32),
              "color": torch.tensor(rng.uniform(size=(7, 3)), dtype=torch.float16),
              "dynamic": torch.tensor([0, 0, 0.25, 0.5, 0.75, 1, 1], dtype=torch.float32),
              "grid_size": 0.05}
    return latent, world


def test_scene_tokens_are_static_points_in_das_world(tmp_path, scene):
    latent, world = planted_latent()
    tokens = tokens_in_world(latent)
    np.testing.assert_allclose(tokens.position, world, atol=1e-5)
    assert tokens.radius == pytest.approx(0.05 / 2 / 2.5)
    summary = write_recording(tmp_path / "scene.rrd", scene.frames, scene.depth,
                              scene.extrinsics, scene.intrinsics, tokens=tokens)
    values = read_recording(tmp_path / "scene.rrd")
    assert summary.tokens == 7 and {entity for entity, _ in values} >= STATIC
    for name in ("color", "dynamic"):
        rows = {key: rows for key, rows in values.items() if key[0] == f"/world/tokens/{name}"}
        assert all(list(frames) == [None] for frames in rows.values())  # static
        np.testing.assert_allclose(points(rows[(f"/world/tokens/{name}",
                                                "Points3D:positions")][None]), world, atol=1e-5)
        radii = rows[(f"/world/tokens/{name}", "Points3D:radii")][None]
        assert radii == pytest.approx([0.01], rel=1e-6)  # one radius for every token
    colours = rgb(values[("/world/tokens/color", "Points3D:colors")][None])
    np.testing.assert_allclose(colours, latent["color"].float().numpy() * 255, atol=0.5 + 1e-3)
    heat = rgb(values[("/world/tokens/dynamic", "Points3D:colors")][None]).astype(int)
    assert (heat[:2, 2] > heat[:2, 0]).all() and (heat[-2:, 0] > heat[-2:, 2]).all()
    assert not (heat[0] - heat[-1] == 0).all()
    # no masks given: every point is static
    assert read_recording(tmp_path / "scene.rrd")[("/world/points/dynamic",
                                                   "Points3D:positions")][0] == []


def test_bad_shapes_are_refused_and_leave_no_file(tmp_path, scene):
    with pytest.raises(UserError, match="depth must have the frames' shape"):
        write_recording(tmp_path / "scene.rrd", scene.frames, scene.depth[:, 1:],
                        scene.extrinsics, scene.intrinsics)
    assert list(tmp_path.iterdir()) == []
