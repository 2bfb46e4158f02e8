"""Experiment presets: every file in conf/experiment/ is discovered, composed, run end to end on
a small model and checked for what it does (outputs of each stage, its binarisation rule), plus
deeper checks of the VGGT4D pipeline order and the token script."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from scipy import ndimage
from skimage.filters import threshold_otsu

import conf
from vggt4d.config import validate
from vggt4d.run import run_job

PRESETS = sorted(path.stem for path in (Path(conf.__file__).parent / "experiment").glob("*.yaml"))

SMALL = ["model=da3-small", "data.num_frames=7", "data.width=112", "data.height=84",
         "process_res=112", "logger=none", "viz.videos=false", "latent.encoder=tiny",
         "latent.weights=random", "export.max_points_per_frame=500"]

STAGE_OUTPUTS = {
    "predict": "prediction.npz", "gram": "gram_stats.safetensors",
    "maps": "dynamic_maps.safetensors", "masks": "masks/binarize.json",
    "second_pass": "prediction_pass2.npz", "refine": "refine.json",
    "viz": "overlays/mask_frame000_overlay.png", "eval": "metrics.json",
    "latent": "scene_latent.pt",
}
"""One file each stage must have written."""


def _compose(*overrides: str):
    with initialize_config_module("conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_presets_are_discovered():
    assert {"vggt4d", "full", "demo", "concerto_tokens"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_says_what_it_reproduces(preset):
    lines = (Path(conf.__file__).parent / "experiment" / f"{preset}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    description = [line for line in lines[1:] if line.startswith("#")]
    assert len(" ".join(description)) > 80, "a preset says what it reproduces in its comment"


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_for_its_own_model(preset):
    run = validate(_compose(f"experiment={preset}", "model.weights=random"))
    if run.model.name == "da3nested-giant-large":
        assert run.model.hooked_network == "da3"  # statistics never from the metric network


def _expected_binary(soft: np.ndarray, info: dict, settings) -> np.ndarray:
    """The masks the preset's binarisation rule gives, computed here independently."""
    method = settings.binarize
    if method == "threshold":
        binary = soft > settings.threshold
    elif method == "otsu":
        binary = np.stack([frame > threshold_otsu(frame.astype(np.float64)) for frame in soft])
    elif method == "mean_above":
        binary = np.stack([frame > (frame[frame > settings.threshold].mean()
                                    if (frame > settings.threshold).any() else np.inf)
                           for frame in soft])
    elif method == "hysteresis":
        binary = np.zeros(soft.shape, bool)
        for t, frame in enumerate(soft):
            labels, _ = ndimage.label(frame > settings.low, structure=np.ones((3, 3)))
            strong = np.unique(labels[(frame > settings.high) & (labels > 0)])
            binary[t] = np.isin(labels, strong) & (labels > 0)
    else:
        threshold = info["threshold"]
        binary = soft > (np.inf if threshold is None else threshold)
    binary[info["emptied_frames"]] = False
    return binary


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_on_the_synthetic_scene_with_a_small_model(preset, tmp_path):
    overrides = [f"experiment={preset}", *SMALL, f"cache_dir={tmp_path / 'cache'}"]
    if preset != "demo":
        overrides.append("model.weights=random")
    run = validate(_compose(*overrides))
    for band in (run.bands.shallow, run.bands.middle, run.bands.deep, run.bands.deep_var):
        assert 0 <= band[0] <= band[1] < run.model.num_blocks  # giant numbers mapped to 12
    ctx = run_job(_compose(*overrides), tmp_path / "job")
    ran = [stage.name for stage in ctx.stages]
    for stage, output in STAGE_OUTPUTS.items():
        assert (stage in ran) == (tmp_path / "job" / output).is_file(), (stage, output)
    if "masks" in ran:
        masks = ctx.artifacts["masks"]
        expected = _expected_binary(masks.soft, masks.thresholds, run.masks)
        assert np.array_equal(masks.binary, expected)
        assert len(list((tmp_path / "job" / "masks").glob("dynamic_*.png"))) == 7


@pytest.mark.parametrize("preset", ["full", "full_strict"])
def test_full_pipeline_runs_in_vggt4ds_order(preset, tmp_path):
    """The second pass hides the coarse masks' patches; refinement runs after it with its
    cameras; scene tokens come from pass 2 and the refined masks."""
    overrides = [f"experiment={preset}", *SMALL, "model.weights=random",
                 f"cache_dir={tmp_path / 'cache'}"]
    ctx = run_job(_compose(*overrides), tmp_path / "job")
    job = tmp_path / "job"
    ran = [stage.name for stage in ctx.stages]
    assert ran.index("masks") < ran.index("second_pass") < ran.index("refine") < ran.index(
        "eval") < ran.index("latent")
    assert json.loads((job / "refine.json").read_text())["cameras"] == "pass2"
    report = json.loads((job / "latent.json").read_text())
    assert report["tokens"] > 0
    assert report["sources"] == {"prediction": "pass2", "masks": "refined"}
    timings = json.loads((job / "timings.json").read_text())
    assert {"latent.points", "latent.tokens"} <= timings.keys()
    assert len(list((job / "depth_compare").glob("frame*.png"))) == 7
    assert len(list((job / "masks_refined").glob("dynamic_*.png"))) == 7
    metrics = json.loads((job / "metrics.json").read_text())
    assert {"coarse", "refined"} <= metrics.keys()
    for name in ("pass1", "pass2"):
        geometry = metrics["geometry"][name]
        assert geometry["depth"]["abs_rel"] >= 0 and 0 <= geometry["depth"]["delta_1.25"] <= 1
        assert geometry["pose"]["ate"] >= 0
    difference = json.loads((job / "second_pass.json").read_text())
    assert len(difference["rotation_deg"]) == 7


def test_token_script_preset_keeps_das_world_and_the_scripts_camera_code(tmp_path):
    """experiment=concerto_tokens: DA3-GIANT settings; run small, the tokens' cells are those of
    the back-projected pixels in DA3's own world and units (only shifted), and a voxel seen in
    one frame carries that frame's inverse(w2c)[:3, :4] as its camera code."""
    run = validate(_compose("experiment=concerto_tokens", "model.weights=random"))
    assert run.model.name == "da3-giant" and run.pipeline == ["predict", "latent"]
    assert (run.points.max_per_frame, run.points.max_depth, run.points.conf_percentile) == (
        50000, 50.0, 0.0)
    assert (run.latent.encoder, run.latent.weights, run.latent.levels) == (
        "large", "concerto_large", None)
    overrides = ["experiment=concerto_tokens", "model=da3-small", "model.weights=random",
                 "data.num_frames=4", "process_res=112", "points.max_per_frame=3000",
                 "latent.encoder=tiny", "latent.weights=random", "latent.grid_size=0.05",
                 f"cache_dir={tmp_path / 'cache'}"]
    run_job(_compose(*overrides), tmp_path / "job")
    with np.load(tmp_path / "job" / "prediction.npz") as data:
        depth, w2c, k_mats = data["depth"], data["extrinsics"], data["intrinsics"]
    tokens = torch.load(tmp_path / "job" / "scene_latent.pt", weights_only=True)
    assert tokens["geo_feat"].shape[1] == 160  # tiny: all five levels
    # independent back-projection: X = R^T (z K^-1 (u + 1/2, v + 1/2, 1) - t)
    frames, height, width = depth.shape
    v, u = np.mgrid[0:height, 0:width] + 0.5
    rays = np.stack([u, v, np.ones_like(u)], axis=-1)
    cells, voxel = [], []
    shift = np.array(tokens["meta"]["center_shift"])
    for t in range(frames):
        cam = depth[t][..., None] * (rays @ np.linalg.inv(k_mats[t]).T)
        world = (cam - w2c[t, :, 3]) @ w2c[t, :, :3]
        index = tokens["pixel_voxel"][t].numpy()
        found = index >= 0
        cells.append(np.floor((world[found] - shift) / 0.05))
        voxel.append(index[found])
    offset = np.concatenate(cells) - tokens["coord"][np.concatenate(voxel)].numpy()
    most = np.median(offset, axis=0)
    assert (offset == most).all(axis=1).mean() > 0.999  # one lattice, cell boundaries aside
    c2w = np.stack([np.linalg.inv(np.vstack([m, [0, 0, 0, 1]]))[:3] for m in w2c])
    single = (tokens["first_frame"] == tokens["last_frame"]).numpy()
    assert single.any()
    frame = tokens["first_frame"][single].numpy()
    np.testing.assert_allclose(tokens["cam_emb"][single, :12].float().numpy(),
                               c2w[frame].reshape(-1, 12), atol=2e-3)  # fp16 file
