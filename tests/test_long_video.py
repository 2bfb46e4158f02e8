"""Long videos in chunks: one world frame recovered exactly from a planted geometry, the
prediction file written chunk by chunk, statistics across chunks against independent references,
chunked against single-forward runs (masks, tokens), and memory that does not grow with the
number of chunks.

The planted geometry: a stand-in for the DA3 forward returns the synthetic scene's exact depth
and cameras, each chunk in its own world (a similarity drawn per chunk), so the chunks agree on
the geometry of every shared frame up to that similarity and the alignment must bring every frame
back into the first chunk's world to float32 precision.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image
from scipy.spatial.transform import Rotation

import vggt4d.predict as predict_module
from tests.memory import MIB, in_fresh_process, rss_growth
from vggt4d.align import Sim3, transform_extrinsics
from vggt4d.cameras import camera_centres
from vggt4d.chunks import ChunkedTap, plan_chunks, window_chunks
from vggt4d.config.gram import GramConfig
from vggt4d.errors import UserError
from vggt4d.gram import GramCollector, dense_statistics, group_heads, similarity_factor
from vggt4d.io import write_npz
from vggt4d.predict import (
    NpzWriter,
    Prediction,
    predict_chunks,
    read_npz,
    run_forward,
)
from vggt4d.run import run_job
from vggt4d.synthetic import SyntheticConfig, render_scene

SCENE = SyntheticConfig(num_frames=30, width=84, height=56, num_objects=2, object_speed=1.0)
"""84×56 is its own processing size at ``process_res=84``: the planted maps need no resize."""
CPU = torch.device("cpu")
RANDOM = ("model=da3-small", "model.weights=random")


def compose_run(tmp_path: Path, job: str, *overrides: str):
    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", f"cache_dir={tmp_path / 'cache'}",
                                           *overrides])
    return run_job(cfg, tmp_path / job)


def planted_similarity(seed: int) -> Sim3:
    rng = np.random.default_rng(seed)
    return Sim3(float(rng.uniform(0.5, 2.0)), Rotation.random(random_state=seed).as_matrix(),
                rng.normal(size=3) * 2.0)


class PlantedForward:
    """Stands in for :func:`vggt4d.predict.run_forward`: the scene's exact maps of the frames
    given, in the world ``X_chunk = S_start(X)`` of a similarity planted for the chunk's first
    frame (depth ``× s``); ``corrupt`` scales the depth of moving pixels in every chunk but the
    first (a network that gets moving objects wrong differently in each chunk)."""

    def __init__(self, scene, corrupt: float = 1.0) -> None:
        self.scene, self.corrupt = scene, corrupt
        self.index = {hashlib.sha256(frame.tobytes()).hexdigest(): t
                      for t, frame in enumerate(scene.frames)}
        self.calls: list[range] = []

    def world(self, start: int) -> Sim3:
        return planted_similarity(1000 + start)

    def __call__(self, net, frames, **_kwargs) -> Prediction:
        start = self.index[hashlib.sha256(frames[0].tobytes()).hexdigest()]
        rows = slice(start, start + len(frames))
        self.calls.append(range(rows.start, rows.stop))
        sim = self.world(start)
        depth = self.scene.depth[rows] * sim.scale
        if start and self.corrupt != 1.0:
            depth = np.where(self.scene.dynamic_masks[rows], depth * self.corrupt, depth)
        conf = 1.0 + 4.0 * np.exp(-self.scene.depth[rows] / 3.0)
        return Prediction(
            depth=depth.astype(np.float32), conf=conf.astype(np.float32),
            extrinsics=transform_extrinsics(self.scene.extrinsics[rows], sim).astype(np.float32),
            intrinsics=self.scene.intrinsics[rows].astype(np.float32), frames=frames,
            grid=(frames.shape[1] // 14, frames.shape[2] // 14))


@pytest.fixture(scope="module")
def scene():
    return render_scene(SCENE)


def expected_in_first_world(scene, planted: PlantedForward):
    """Depth and world-to-camera of every frame in the first chunk's world."""
    first = planted.world(0)
    return scene.depth * first.scale, transform_extrinsics(scene.extrinsics, first)


def assert_same_cameras(found: np.ndarray, expected: np.ndarray, scale: float,
                        tol: float) -> None:
    """Rotations (Frobenius) and centres (relative to the scene's ``scale``) within ``tol``."""
    assert np.abs(found[:, :, :3] - expected[:, :, :3]).max() < tol
    centres = np.abs(camera_centres(found) - camera_centres(expected)).max()
    assert centres < tol * scale, centres


@pytest.mark.parametrize(("chunk", "overlap"), [(0, 12), (10, 4), (12, 6)])
def test_alignment_recovers_the_first_chunks_world_on_planted_geometry(
        tmp_path, scene, monkeypatch, chunk, overlap):
    """Every frame's depth and camera equal the scene's in the first chunk's world, whatever
    similarity each chunk was given; chunk.length=0 is one forward (one planted world)."""
    planted = PlantedForward(scene)
    monkeypatch.setattr(predict_module, "run_forward", planted)
    compose_run(tmp_path, "job", *RANDOM, "pipeline=[predict]", "process_res=84",
                *(f"data.{key}={value}" for key, value in vars(SCENE).items()
                  if key in ("num_frames", "width", "height", "num_objects", "object_speed")),
                f"chunk.length={chunk}", f"chunk.overlap={overlap}")
    if chunk:
        plan = plan_chunks(SCENE.num_frames, chunk, overlap)
        assert planted.calls == [range(*r) for r in plan.ranges]
        report = json.loads((tmp_path / "job" / "chunks.json").read_text())
        assert report["summary"]["overlaps"] == len(plan) - 1
        assert report["summary"]["max_rms"] < 1e-5  # relative to the overlap's scene scale
        assert report["summary"]["min_inlier_fraction"] == 1.0
        for entry in report["overlaps"]:  # each pairwise map is S_prev ∘ S_next⁻¹
            i, j = (plan.ranges[k][0] for k in entry["chunks"])
            truth = planted.world(i).compose(planted.world(j).inverse())
            assert abs(entry["pairwise"]["scale"] - truth.scale) < 1e-5 * truth.scale
            np.testing.assert_allclose(entry["pairwise"]["rotation"], truth.rotation,
                                       atol=1e-5)
    else:
        assert planted.calls == [range(SCENE.num_frames)]
        assert not (tmp_path / "job" / "chunks.json").exists()
    depth, extrinsics = expected_in_first_world(scene, planted)
    result = Prediction.load(tmp_path / "job" / "prediction.npz")
    np.testing.assert_allclose(result.depth, depth, rtol=2e-5)
    assert_same_cameras(result.extrinsics, extrinsics, float(np.median(depth)), 2e-5)
    np.testing.assert_array_equal(result.frames, scene.frames)


def test_known_dynamic_pixels_are_left_out_of_the_alignment(tmp_path, scene, monkeypatch):
    """Moving pixels whose depth each chunk gets wrong: excluded (masks known, as in a second
    pass) the static scene aligns exactly; left in, the robust fit still holds to ~1 %."""
    planted = PlantedForward(scene, corrupt=1.4)
    monkeypatch.setattr(predict_module, "run_forward", planted)
    plan = plan_chunks(SCENE.num_frames, 12, 6)
    depth, extrinsics = expected_in_first_world(scene, planted)
    static = ~scene.dynamic_masks
    scale = float(np.median(depth))
    errors = {}
    for name, exclude in (("excluded", scene.dynamic_masks), ("robust", None)):
        report = predict_chunks(None, scene.frames, plan, tmp_path / f"{name}.npz",
                                device=CPU, dtype=torch.float32, exclude=exclude,
                                progress=False)
        result = Prediction.load(tmp_path / f"{name}.npz")
        errors[name] = np.abs(result.depth - depth)[static].max() / scale
        assert report["excluded"].startswith("given" if exclude is not None else "none")
        if exclude is not None:
            assert_same_cameras(result.extrinsics, extrinsics, scale, 2e-5)
    assert errors["excluded"] < 2e-5 and errors["robust"] < 0.02, errors
    assert errors["robust"] > 10 * errors["excluded"]


def test_prediction_written_by_chunks_is_the_npz_of_the_whole_arrays(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"grid": np.array([4, 6], np.int64),
              "depth": rng.random((11, 8, 9), dtype=np.float32),
              "frames": rng.integers(0, 256, (11, 8, 9, 3), dtype=np.uint8),
              "extrinsics": rng.random((11, 3, 4), dtype=np.float32)}
    write_npz(tmp_path / "whole.npz", arrays)
    with NpzWriter(tmp_path / "rows.npz", {k: (v.shape, v.dtype) for k, v in arrays.items()}) \
            as writer:
        for name, array in reversed(arrays.items()):  # any order of rows and members
            for start, stop in ((6, 11), (0, 3), (3, 6)):
                writer.write(name, start, array[start:stop])
        writer.finish()
    assert (tmp_path / "rows.npz").read_bytes() == (tmp_path / "whole.npz").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.npz", "whole.npz"]  # no parts
    mapped = read_npz(tmp_path / "rows.npz")
    assert isinstance(mapped["depth"], np.memmap)
    for name, array in arrays.items():
        np.testing.assert_array_equal(mapped[name], array)
    mapped["depth"][0] = -1  # copy-on-write: private to this process
    np.testing.assert_array_equal(read_npz(tmp_path / "rows.npz")["depth"], arrays["depth"])
    np.savez_compressed(tmp_path / "compressed.npz", **arrays)
    for name, array in read_npz(tmp_path / "compressed.npz").items():
        np.testing.assert_array_equal(array, arrays[name])


# ------------------------------------------------------------------------------------------
# statistics across chunks, on the real (random-weight) da3-small
# ------------------------------------------------------------------------------------------

LAYERS = (3, 5)  # a per-frame block and a global one (alt_start 4)


@pytest.fixture(scope="module")
def small_clip():
    scene = render_scene(SyntheticConfig(num_frames=14, width=70, height=56, num_objects=1,
                                         object_speed=1.5))
    return scene.frames


def gram_tap(settings: GramConfig) -> tuple[GramCollector, ChunkedTap]:
    collector = GramCollector(settings, frozenset(LAYERS), patch_start_idx=1)
    tap = ChunkedTap(key={}, files=(), save=lambda _out: None, on_qk=collector,
                     qk_layers=frozenset(LAYERS), start_chunk=collector.start_chunk,
                     check_plan=collector.check_plan,
                     sweeps=2 if settings.window == "all" else 1)
    return collector, tap


def captured_patches(net, frames) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Q and K patch tokens (T, H, P, d) of :data:`LAYERS` in one forward over ``frames``."""
    kept = {}

    def keep(capture) -> None:
        start = capture.layout.patch_start_idx
        kept[capture.layer] = (capture.q[:, :, start:].float().clone(),
                               capture.k[:, :, start:].float().clone())

    run_forward(net, frames, device=CPU, dtype=torch.float32, on_qk=keep, qk_layers=LAYERS,
                progress=False)
    return kept


@pytest.mark.parametrize("window", ["offsets", "attended"])
def test_windowed_statistics_are_those_of_the_chunk_holding_the_window(
        tmp_path, small_net, small_clip, window):
    """Each frame's offset-window statistics equal a forward over the chunk that holds its
    whole window (attended: over its owner chunk), computed alone."""
    settings = GramConfig(window=window, offsets=[-3, -1, 1, 3])
    plan = plan_chunks(len(small_clip), 9, 6 if window == "offsets" else 3)
    collector, tap = gram_tap(settings)
    predict_chunks(small_net, small_clip, plan, tmp_path / "p.npz", device=CPU,
                   dtype=torch.float32, taps=[tap], progress=False)
    source = window_chunks(plan, settings.offsets) if window == "offsets" else plan.owner
    assert len(set(source.tolist())) > 1
    for index, (start, stop) in enumerate(plan.ranges):
        alone = GramCollector(settings, frozenset(LAYERS), patch_start_idx=1)
        run_forward(small_net, small_clip[start:stop], device=CPU, dtype=torch.float32,
                    on_qk=alone, qk_layers=LAYERS, progress=False)
        frames = np.flatnonzero(source == index)
        for key, value in collector.maps.items():
            torch.testing.assert_close(value[frames], alone.maps[key][frames - start],
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("variance", "include_self"), [("pairs", True), ("spatial", False)])
def test_whole_video_statistics_against_a_dense_float64_reference(
        tmp_path, small_net, small_clip, variance, include_self):
    """window=all over chunks: every frame's Q/K (from its owner chunk) against every frame's
    sources, by the full similarity matrix in float64."""
    settings = GramConfig(window="all", variance=variance, include_self=include_self)
    plan = plan_chunks(len(small_clip), 6, 2)
    collector, tap = gram_tap(settings)
    predict_chunks(small_net, small_clip, plan, tmp_path / "p.npz", device=CPU,
                   dtype=torch.float32, taps=[tap], progress=False)
    owned = {layer: ([], []) for layer in LAYERS}
    for index, (start, stop) in enumerate(plan.ranges):
        frames = plan.owned_frames(index)
        for layer, (q, k) in captured_patches(small_net, small_clip[start:stop]).items():
            owned[layer][0].append(q[frames.start - start:frames.stop - start])
            owned[layer][1].append(k[frames.start - start:frames.stop - start])
    num_frames = len(small_clip)
    windows = [tuple(s for s in range(num_frames) if include_self or s != t)
               for t in range(num_frames)]
    for layer, (qs, ks) in owned.items():
        q, k = torch.cat(qs), torch.cat(ks)
        factor = similarity_factor(q.shape[1], q.shape[-1], scale=False, heads="mean")
        vectors = {"q": group_heads(q, "mean"), "k": group_heads(k, "mean")}
        for pair in ("qq", "kk", "qk"):
            mean, var = dense_statistics(vectors[pair[0]], vectors[pair[1]], windows,
                                         factor=factor, variance=variance)
            grid = collector.maps[f"{pair}.mean.L{layer:02d}"].shape[1:]
            torch.testing.assert_close(collector.maps[f"{pair}.mean.L{layer:02d}"],
                                       mean[:, 0].reshape(-1, *grid), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(collector.maps[f"{pair}.var.L{layer:02d}"],
                                       var[:, 0].reshape(-1, *grid), rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------------
# chunked against one forward, end to end
# ------------------------------------------------------------------------------------------


def test_masks_of_the_demo_weights_agree_with_one_forward(tmp_path):
    """The demo checkpoint's cues live in per-frame blocks, so the whole-video statistics over
    chunks are those of one forward up to summation order: the masks agree."""
    common = ["experiment=demo", "data.num_frames=20", "process_res=210",
              "pipeline=[predict,gram,maps,masks,eval]"]
    compose_run(tmp_path, "one", *common)
    compose_run(tmp_path, "chunks", *common, "chunk.length=8", "chunk.overlap=3")
    masks = {job: np.stack([np.asarray(Image.open(p)) > 0 for p in
                            sorted((tmp_path / job / "masks").glob("dynamic_*.png"))])
             for job in ("one", "chunks")}
    union = (masks["one"] | masks["chunks"]).sum()
    iou = (masks["one"] & masks["chunks"]).sum() / union
    assert masks["one"].any() and iou > 0.99, iou
    metrics = {job: json.loads((tmp_path / job / "metrics.json").read_text())
               for job in ("one", "chunks")}
    assert metrics["one"]["JM"] > 0.5
    assert abs(metrics["chunks"]["JM"] - metrics["one"]["JM"]) < 0.01
    assert metrics["chunks"]["chunks"]["overlaps"] == 3 and "chunks" not in metrics["one"]


def test_tokens_of_chunks_are_those_of_one_forward(tmp_path, scene, monkeypatch):
    """On the planted geometry the chunked prediction is the single one up to float32 rounding,
    so the tokens agree: the static room seen by every chunk adds no duplicate voxels."""
    coords = {}
    for job, chunk in (("one", 0), ("chunks", 8)):
        monkeypatch.setattr(predict_module, "run_forward", PlantedForward(scene))
        compose_run(tmp_path, job, *RANDOM, "pipeline=[predict,latent]", "process_res=84",
                    "data.num_frames=30", "data.width=84", "data.height=56",
                    "data.num_objects=2", "data.object_speed=1.0", "latent.encoder=none",
                    "latent.grid_size=0.1", "points.scale=raw", f"chunk.length={chunk}",
                    "chunk.overlap=3")
        latent = torch.load(tmp_path / job / "scene_latent.pt", weights_only=True)
        coords[job] = {tuple(row) for row in latent["coord"].tolist()}
    same = len(coords["one"] & coords["chunks"]) / len(coords["one"] | coords["chunks"])
    assert len(coords["one"]) > 500 and same > 0.995, same


# ------------------------------------------------------------------------------------------
# memory: the chunk loop and the token builder do not grow with the clip
# ------------------------------------------------------------------------------------------


class SlopeForward:
    """Stands in for the DA3 forward on a clip of any length without rendering it: cameras
    (no rotation) sliding along x in front of the slope ``z = 4 + 0.2 x``, each chunk in a
    planted world; a frame's index is written in its first pixel."""

    def __init__(self, height: int, width: int) -> None:
        self.k_mat = np.array([[width * 0.8, 0, width / 2], [0, width * 0.8, height / 2],
                               [0, 0, 1]], np.float32)
        ray_x = (np.arange(width) + 0.5 - width / 2) / (width * 0.8)
        self.ray_x = np.broadcast_to(ray_x, (height, width))

    def maps(self, frames: range) -> tuple[np.ndarray, np.ndarray]:
        """Depth (F, H, W) and world-to-camera (F, 3, 4) of ``frames`` in the true world."""
        centre_x = 0.5 * np.sin(2 * np.pi * np.asarray(frames) / 24.0)
        depth = (4.0 + 0.2 * centre_x[:, None, None]) / (1.0 - 0.2 * self.ray_x[None])
        extrinsics = np.zeros((len(frames), 3, 4))
        extrinsics[:, :, :3] = np.eye(3)
        extrinsics[:, 0, 3] = -centre_x
        return depth.astype(np.float32), extrinsics

    @staticmethod
    def clip(num_frames: int, height: int, width: int) -> np.ndarray:
        frames = np.zeros((num_frames, height, width, 3), np.uint8)
        frames[:, 0, 0, 0] = np.arange(num_frames) % 256
        frames[:, 0, 0, 1] = np.arange(num_frames) // 256
        return frames

    def __call__(self, net, frames, **_kwargs) -> Prediction:
        start = int(frames[0, 0, 0, 0]) + 256 * int(frames[0, 0, 0, 1])
        depth, extrinsics = self.maps(range(start, start + len(frames)))
        sim = planted_similarity(start)
        return Prediction(
            depth=depth * np.float32(sim.scale), conf=np.full_like(depth, 2.0),
            extrinsics=transform_extrinsics(extrinsics, sim).astype(np.float32),
            intrinsics=np.repeat(self.k_mat[None], len(frames), 0), frames=frames,
            grid=(frames.shape[1] // 14, frames.shape[2] // 14))


CHUNK_LOOP_SIZE = (210, 280)


def chunk_loop_growth(num_frames: int, out: str) -> int:
    """Peak resident growth of the chunk loop over a ``num_frames`` slope clip (the DA3 forward
    stood in for), written to ``out``; run in a fresh process so earlier work in the same
    process cannot shift the allocator's peak."""
    forward = SlopeForward(*CHUNK_LOOP_SIZE)
    predict_module.run_forward = forward
    frames = SlopeForward.clip(num_frames, *CHUNK_LOOP_SIZE)
    return rss_growth(lambda: predict_chunks(None, frames, plan_chunks(num_frames, 16, 4),
                                             Path(out), device=CPU, dtype=torch.float32,
                                             progress=False))


def test_chunk_loop_memory_does_not_grow_with_the_clip(tmp_path):
    """4 times the frames (16 instead of 4 chunks): the same peak (mostly the alignment's
    float64 work on ~0.5 M correspondences), where holding the clip's depth and confidence
    would add 68 MiB."""
    growth, whole = {}, {}
    for num_frames in (48, 192):
        out = tmp_path / f"{num_frames}.npz"
        growth[num_frames] = in_fresh_process("tests.test_long_video", "chunk_loop_growth",
                                             num_frames, str(out))
        whole[num_frames] = 8 * num_frames * CHUNK_LOOP_SIZE[0] * CHUNK_LOOP_SIZE[1]
        result = Prediction.load(out)
        depth, _ = SlopeForward(*CHUNK_LOOP_SIZE).maps(range(num_frames))
        np.testing.assert_allclose(result.depth, depth * planted_similarity(0).scale, rtol=1e-4)
    # holding the clip's depth and confidence would add 4 times the 16 MiB allowed
    assert whole[192] - whole[48] > 4 * 16 * MIB
    assert growth[192] < growth[48] + 16 * MIB, growth


def slope_inputs(forward: SlopeForward, num_frames: int, height: int, width: int) -> tuple:
    """Depth, confidence, frames, intrinsics and extrinsics of the slope seen by
    ``num_frames`` cameras."""
    depth, extrinsics = forward.maps(range(num_frames))
    intrinsics = np.repeat(forward.k_mat[None], num_frames, 0)
    return (depth, np.full_like(depth, 2.0), SlopeForward.clip(num_frames, height, width),
            intrinsics, extrinsics)


def slope_tokens(inputs: tuple, pixel_voxel: np.ndarray) -> torch.Tensor:
    """Voxel coordinates of the slope from its :func:`slope_inputs`, built block by block
    (every kept pixel's token into ``pixel_voxel``)."""
    from vggt4d.config.latent import LatentConfig
    from vggt4d.config.points import PointsConfig
    from vggt4d.latent import scene_latent_blocks
    from vggt4d.points import ClipPoints

    depth, conf, frames, intrinsics, extrinsics = inputs
    num_frames, height, width = depth.shape
    clip = ClipPoints.measure(depth, conf, frames, intrinsics, extrinsics,
                              PointsConfig(conf_percentile=5.0), "raw", block_pixels=100_000)
    return scene_latent_blocks(clip.point_blocks, num_frames, (height, width), extrinsics,
                               intrinsics, clip.world_to_scene, 1.0, "raw",
                               LatentConfig(grid_size=0.05, encoder="none"), CPU,
                               pixel_voxel=pixel_voxel).coord


TOKEN_SIZE = (105, 140)


def token_builder_growth(num_frames: int, out: str) -> int:
    """Peak resident growth of building the slope's tokens over ``num_frames`` frames (voxel
    coordinates saved to ``out``), in a fresh process like :func:`chunk_loop_growth`."""
    forward = SlopeForward(*TOKEN_SIZE)
    slope_tokens(slope_inputs(forward, 2, *TOKEN_SIZE),  # imports and first-use buffers
                 np.full((2, *TOKEN_SIZE), -1, np.int32))
    inputs = slope_inputs(forward, num_frames, *TOKEN_SIZE)
    pixel_voxel = np.full((num_frames, *TOKEN_SIZE), -1, np.int32)  # the output, made first
    tokens = {}
    growth = rss_growth(lambda: tokens.setdefault("coord", slope_tokens(inputs, pixel_voxel)))
    assert (pixel_voxel >= 0).all()  # the slope is fully kept (constant confidence)
    torch.save(tokens["coord"], out)
    return growth


def test_token_builder_memory_does_not_grow_with_the_clip(tmp_path):
    """A static surface seen again and again: the same voxels and the same peak whatever the
    number of frames, far below the points of the whole clip (inputs and the pixel map, the
    output, allocated beforehand)."""
    growth, tokens = {}, {}
    for num_frames in (48, 384):
        out = tmp_path / f"{num_frames}.pt"
        growth[num_frames] = in_fresh_process("tests.test_long_video", "token_builder_growth",
                                             num_frames, str(out))
        tokens[num_frames] = torch.load(out)
    assert torch.equal(tokens[48], tokens[384])  # every 24 frames the cameras come back
    height, width = TOKEN_SIZE
    points = 384 * height * width
    assert growth[384] < growth[48] + 16 * MIB, growth
    assert growth[384] < 48 * points / 3, (growth, points)  # ~48 B per point held at once


# ------------------------------------------------------------------------------------------
# settings: refused before DA3 runs, the automatic length
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    (["chunk.length=1"], "chunk.length=1 must be 0"),
    (["chunk.length=8", "chunk.overlap=8"], "must be below chunk.length=8"),
    (["chunk.length=20", "chunk.overlap=6", "gram.window=offsets"],
     "set the overlap to at least 12"),
    (["chunk.length=20", "gram.engine=chunked"], "use gram.engine=moments"),
    (["chunk.length=20", "model=da3mono-large", "pipeline=[predict]"],
     "which da3mono-large does not predict"),
])
def test_bad_chunk_settings_are_refused_before_da3_runs(tmp_path, monkeypatch, overrides,
                                                        message):
    def no_model(*_args, **_kwargs):
        raise AssertionError("the network was built before the settings were checked")

    monkeypatch.setattr(predict_module, "prepare_network", no_model)
    with pytest.raises(UserError, match=message):
        compose_run(tmp_path, "job", "model.weights=random", "data.num_frames=40",
                    "pipeline=[predict,gram]", *overrides)


def test_auto_takes_the_longest_chunk_the_memory_limit_allows():
    """chunk.auto: the plan's chunk against a scan of the forward estimate."""
    from types import SimpleNamespace

    from vggt4d.chunks import forward_bytes
    from vggt4d.config import validate
    from vggt4d.model import build_network, depth_table, head_features, parameter_count
    from vggt4d.pipeline import JobInfo
    from vggt4d.predict import chunk_plan

    empty = build_network("da3-small", empty=True)
    estimate = forward_bytes(num_params=parameter_count(empty), height=378, width=504,
                             embed_dim=depth_table(empty, "")["embed_dim"],
                             head_features=head_features("da3-small"), dtype=torch.float32)
    for limit_gb, cap in ((3.0, 0), (6.0, 0), (6.0, 40)):
        with initialize_config_module("conf", version_base="1.3"):
            cfg = compose("config", overrides=[
                "chunk.auto=true", f"chunk.length={cap}", f"memory_limit_gb={limit_gb}"])
        ctx = SimpleNamespace(cfg=validate(cfg), job=JobInfo())
        plan = chunk_plan(ctx, 400, (378, 504))
        longest = max(n for n in range(13, 401) if estimate(n) <= limit_gb * 2**30)
        assert plan.chunk == (min(longest, cap) if cap else longest), (limit_gb, cap)
        assert plan.ranges[-1][1] == 400 and plan.overlap == 12


def test_kmeans_features_over_chunks_come_from_each_frames_owner(tmp_path):
    """The masks stage's k-means features (a token tap; the last block, a global one): frame
    f's rows are those of a forward over the chunk that owns it."""
    from vggt4d.io import read_safetensors, safetensors_metadata
    from vggt4d.model import build_network

    compose_run(tmp_path, "job", *RANDOM, "data.num_frames=20", "data.width=70",
                "data.height=56", "process_res=70", "pipeline=[predict,gram,maps,masks]",
                "masks.kmeans=true", "masks.kmeans_features=last_block", "chunk.length=8",
                "chunk.overlap=3")
    path = tmp_path / "job" / "patch_features.safetensors"
    features, block = read_safetensors(path)["features"], safetensors_metadata(path)["block"]
    torch.manual_seed(0)  # the job's seed: the same random weights
    net = build_network("da3-small")
    frames = render_scene(SyntheticConfig(num_frames=20, width=70, height=56)).frames
    plan = plan_chunks(20, 8, 3)
    assert features.shape[:3] == (20, 4, 5)
    for index, (start, stop) in enumerate(plan.ranges):
        kept = {}

        def keep(tokens, kept=kept) -> None:
            kept["rows"] = tokens.tokens_out[:, 1:].unflatten(1, (4, 5)).half()

        run_forward(net, frames[start:stop], device=CPU, dtype=torch.float32, on_tokens=keep,
                    token_layers=[block], progress=False)
        owned = plan.owned_frames(index)
        torch.testing.assert_close(features[owned.start:owned.stop],
                                   kept["rows"][owned.start - start:owned.stop - start])
