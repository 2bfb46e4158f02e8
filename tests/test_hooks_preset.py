"""experiment=hooks: the configuration it resolves to on the giant, the refine stage's reprojection
wiring on ground-truth geometry, and the preset end to end on da3-small with random weights (the
coarse masks, the refined masks and the TUM-like folder recomputed here from the run's files)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from hydra import compose, initialize_config_module
from PIL import Image
from scipy.spatial.transform import Rotation
from skimage.filters import threshold_otsu

from vggt4d.config import validate
from vggt4d.io import read_safetensors
from vggt4d.masks import DynamicMasks
from vggt4d.pipeline import Context, execute
from vggt4d.predict import Prediction
from vggt4d.refine import RefineStage
from vggt4d.reprojection import reprojection_error
from vggt4d.run import run_job
from vggt4d.second_pass import config_blocks
from vggt4d.synthetic import SyntheticConfig, render_scene
from vggt4d.temporal import cosine_key, temporal_layers

TINY = ["model=da3-small", "model.weights=random", "data.num_frames=4", "data.width=84",
        "data.height=56", "process_res=84"]


def _compose(*overrides: str):
    with initialize_config_module("conf", version_base="1.3"):
        return compose("config", overrides=["experiment=hooks", *overrides])


def test_hooks_preset_on_the_giant_is_the_script():
    run = validate(_compose("model.weights=random"))
    assert run.model.name == "da3nested-giant-large" and run.model.hooked_network == "da3"
    assert temporal_layers(run) == list(range(13, 40, 2))  # the script's global blocks
    assert config_blocks(Context(run, None, None)) == [0, 1, 2, 3, 4]
    assert (run.maps.cue, run.masks.upsample, run.masks.binarize) == (
        "query_cosine", "bilinear", "otsu")
    assert (run.refine.method, run.refine.tau, list(run.export.formats)) == (
        "reprojection", 0.1, ["tum"])


def _prediction(depth: np.ndarray, scene, extrinsics: np.ndarray) -> Prediction:
    return Prediction(depth=depth, conf=np.full(depth.shape, 2.0, np.float32),
                      extrinsics=extrinsics, intrinsics=scene.intrinsics, frames=scene.frames,
                      grid=(3, 4))


def test_refine_reprojection_uses_first_pass_depth_and_second_pass_cameras(tmp_path):
    """Pass 1 carries the true depth with wrong cameras, pass 2 the true cameras with wrong
    depth: only the script's combination flags the planted sphere and nothing of the room."""
    scene = render_scene(SyntheticConfig(num_frames=4, width=96, height=72, object_speed=3.0))
    wrong_cameras = scene.extrinsics.copy()
    wrong_cameras[:, :, 3] += np.array([0.4, -0.2, 0.3], np.float32) * np.arange(4)[:, None]
    coarse = np.zeros(scene.depth.shape, bool)
    coarse[:, :5, :5] = True  # a coarse corner the union keeps
    run = validate(_compose("model=da3-small", "model.weights=random"))
    artifacts = {"prediction": _prediction(scene.depth, scene, wrong_cameras),
                 "prediction_pass2": _prediction(scene.depth * 1.7, scene, scene.extrinsics),
                 "masks": DynamicMasks(coarse.astype(np.float32), coarse, {})}
    ctx = Context(run, tmp_path, None, artifacts=artifacts)
    execute([RefineStage()], ctx)
    refined = ctx.artifacts["refined_masks"].binary
    truth = np.nan_to_num(reprojection_error(scene.depth, scene.intrinsics,
                                             scene.extrinsics)) > 0.1
    assert np.array_equal(refined, coarse | truth)
    assert refined[scene.dynamic_masks].mean() > 0.9
    for depth, cameras in ((scene.depth * 1.7, scene.extrinsics), (scene.depth, wrong_cameras)):
        other = np.nan_to_num(reprojection_error(depth, scene.intrinsics, cameras)) > 0.1
        assert not np.array_equal(refined, coarse | other)  # the other combinations differ
    assert (tmp_path / "refine.json").is_file()
    assert len(list((tmp_path / "masks_refined").glob("dynamic_*.png"))) == 4


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_hooks_preset_end_to_end(tmp_path, caplog):
    overrides = [*TINY, f"cache_dir={tmp_path / 'cache'}"]
    job = tmp_path / "job"
    caplog.set_level(logging.INFO)
    ctx = run_job(_compose(*overrides), job)
    assert "dynamic keys/values hidden in blocks [0, 1]" in caplog.text  # giant 0-4 at 12/40
    ran = [stage.name for stage in ctx.stages]
    assert ran == ["frames", "predict", "temporal", "maps", "masks", "second_pass", "refine",
                   "eval", "export"]
    assert not (job / "gram_stats.safetensors").exists()  # no Gram statistics computed
    first = Prediction.load(job / "prediction.npz")
    second = Prediction.load(job / "prediction_pass2.npz")
    frames, height, width = first.depth.shape
    assert (frames, height, width) == (4, 56, 84)

    # the statistic: one map per global block of da3-small, cosines in [-1, 1]
    stats = read_safetensors(job / "temporal_stats.safetensors")
    assert sorted(stats) == [cosine_key(layer) for layer in (5, 7, 9, 11)]
    for value in stats.values():
        assert tuple(value.shape) == (4, 4, 6) and float(value.abs().max()) <= 1 + 1e-6

    # coarse masks: 1 - mean cosine, per-frame min-max, bilinear up, Otsu per frame
    cue = 1 - torch.stack(list(stats.values())).double().mean(dim=0)
    low = cue.flatten(1).min(dim=1).values[:, None, None]
    high = cue.flatten(1).max(dim=1).values[:, None, None]
    soft = torch.nn.functional.interpolate(((cue - low) / (high - low + 1e-6)).float()[:, None],
                                           size=(height, width), mode="bilinear",
                                           align_corners=False)[:, 0].numpy()
    coarse = np.stack([frame > threshold_otsu(frame.astype(np.float64)) for frame in soft])
    np.testing.assert_allclose(ctx.artifacts["masks"].soft, soft, rtol=0, atol=1e-5)
    assert np.array_equal(ctx.artifacts["masks"].binary, coarse)
    for t in range(frames):
        assert np.array_equal(_png(job / "masks" / f"dynamic_{t:04d}.png") > 0, coarse[t])

    # refined: coarse ∪ reprojection flags (pass-1 depth, pass-2 cameras)
    error = reprojection_error(first.depth, second.intrinsics, second.extrinsics)
    refined = coarse | (np.nan_to_num(error) > 0.1)
    assert np.array_equal(ctx.artifacts["refined_masks"].binary, refined)

    # the TUM-like folder: pass-2 depth and poses, the refined masks
    tum = job / "export" / "tum"
    for folder in ("rgb", "depth", "dynamic_mask"):
        assert sorted(p.name for p in (tum / folder).iterdir()) == [
            f"{t:06d}.png" for t in range(frames)]
    for t in range(frames):
        assert np.array_equal(_png(tum / "rgb" / f"{t:06d}.png"), second.frames[t])
        assert np.array_equal(_png(tum / "dynamic_mask" / f"{t:06d}.png"),
                              np.where(refined[t], 255, 0))
        depth_png = _png(tum / "depth" / f"{t:06d}.png").astype(np.float64)
        np.testing.assert_allclose(depth_png / 1000, second.depth[t], rtol=0, atol=5e-4 + 1e-9)
    poses = [line.split() for line in (tum / "poses.txt").read_text().splitlines()
             if not line.startswith("#")]
    assert len(poses) == frames
    for t, fields in enumerate(poses):
        values = np.array(fields[1:], dtype=np.float64)
        rotation = second.extrinsics[t, :, :3].astype(np.float64)
        centre = -rotation.T @ second.extrinsics[t, :, 3]
        np.testing.assert_allclose(values[:3], centre, atol=1e-6)
        np.testing.assert_allclose(Rotation.from_quat(values[3:]).as_matrix(), rotation.T,
                                   atol=1e-6)
    intrinsic = [line.split() for line in (tum / "intrinsic.txt").read_text().splitlines()
                 if not line.startswith("#")]
    np.testing.assert_allclose([float(v) for v in intrinsic[0][1:]],
                               second.intrinsics[0][[0, 1, 0, 1], [0, 1, 2, 2]], rtol=1e-6)

    # a later job that changes only the refinement reuses the forward and its statistic
    caplog.clear()
    run_job(_compose(*overrides, "refine.tau=0.2"), tmp_path / "again")
    assert "predict: reused cached result" in caplog.text
    assert (tmp_path / "again" / "temporal_stats.safetensors").read_bytes() == (
        job / "temporal_stats.safetensors").read_bytes()


def test_pictures_show_the_query_cosine_cue_without_gram_statistics(tmp_path):
    ctx = run_job(_compose(*TINY, "pipeline=[masks,viz]", "viz.videos=false",
                           f"cache_dir={tmp_path}"), tmp_path / "job")
    ran = [stage.name for stage in ctx.stages]
    assert "gram" not in ran and "layer_viz" not in ran  # no Gram statistics computed for it
    job = tmp_path / "job"
    assert (job / "maps" / "cues_frame000_query_cosine.png").is_file()
    assert (job / "maps" / "fused_frame003_final_mask.png").is_file()
    assert not (job / "gram_stats.safetensors").exists()
