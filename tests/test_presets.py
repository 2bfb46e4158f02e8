"""Experiment presets: one per script of the user's (SEED_SCRIPTS.md) plus the VGGT4D paper."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from vggt4d.config import validate
from vggt4d.run import run_job

PRESETS = ["collect_spatial_features", "fused", "refined", "robust", "final_smooth", "grabcut",
           "any4dgs_v4", "vggt4d", "full", "full_strict"]

# What each script did (SEED_SCRIPTS.md), in the giant's layer numbers.
EXPECTED = {
    "collect_spatial_features": {"gram.window": "attended", "gram.engine": "chunked",
                                 "gram.scale": True, "maps.percentiles": [2.0, 98.0],
                                 "maps.normalize_scope": "sequence", "viz.power": 1.5,
                                 "bands.middle": [6, 13], "bands.deep": [30, 37]},
    "fused": {"maps.mix_inv_similarity": True, "maps.std_layers": [1, 9, 21],
              "masks.upsample": "guided", "masks.guide": "grey", "masks.guided_radius": 0.02},
    "refined": {"gram.offsets": [-2, -1, 1, 2], "gram.include_self": True,
                "maps.deep_form": "inverted", "maps.percentiles": [5.0, 95.0],
                "masks.morph_before": ["open:3"], "masks.guide": "grey_depth",
                "masks.guided_radius": 0.01, "masks.binarize": "otsu",
                "masks.empty_below_mean": 0.05},
    "robust": {"maps.fusion": "sum", "masks.temporal_sigma": 1.0, "masks.guide": "grey",
               "masks.binarize": "threshold", "masks.threshold": 0.4},
    "final_smooth": {"masks.temporal_sigma": 1.0, "masks.guided_eps": 1e-3,
                     "masks.binarize": "hysteresis", "masks.low": 0.3, "masks.high": 0.6},
    "grabcut": {"masks.morph_before": ["close:7"], "masks.morph_after": ["close:7"],
                "masks.binarize": "otsu"},
    "any4dgs_v4": {"maps.fusion": "sum", "maps.mix_inv_similarity": True,
                   "masks.temporal_sigma": 1.5, "masks.spatial_sigma": 0.5,
                   "masks.binarize": "mean_above", "masks.threshold": 0.1,
                   "masks.empty_below_max": 0.3},
    "vggt4d": {"gram.offsets": [-6, -4, -2, 2, 4, 6], "gram.include_self": False,
               "gram.scale": False, "gram.variance": "spatial", "maps.band_mode": "exact",
               "maps.global_only": True, "masks.kmeans": True, "masks.binarize": "multi_otsu",
               "bands.shallow": [13, 13], "bands.middle": [15, 21], "bands.deep": [31, 37]},
    "full": {"gram.variance": "spatial", "refine.tau": 0.1, "refine.clusters": 30,
             "refine.neighbours": 20, "refine.std_ratio": 2.5, "refine.close": 5,
             "refine.dilate": 3, "second_pass.layers": [0, 1, 2, 3, 4],
             "second_pass.patch_rule": "any"},
    "full_strict": {"gram.offsets": [-2, -1, 1, 2], "masks.binarize": "threshold",
                    "masks.threshold": 0.5, "refine.score": "gradient",
                    "refine.gradient_weight": 10.0, "refine.std_ratio": 2.0,
                    "refine.tau": 0.15, "second_pass.layers": [1, 2, 3, 4, 5, 6, 7, 8]},
}


def _compose(*overrides: str):
    with initialize_config_module("conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _get(run, dotted: str):
    value = run
    for part in dotted.split("."):
        value = getattr(value, part)
    return list(value) if isinstance(value, list | tuple) else value


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_reproduces_the_script_on_the_giant(preset):
    run = validate(_compose(f"experiment={preset}", "model.weights=random"))
    assert run.model.name == "da3nested-giant-large"
    assert run.model.hooked_network == "da3"  # statistics never come from the metric network
    for key, value in EXPECTED[preset].items():
        assert _get(run, key) == value, key


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_on_the_synthetic_scene_with_a_small_model(preset, tmp_path):
    overrides = [f"experiment={preset}", "model=da3-small", "model.weights=random",
                 "data.num_frames=7", "process_res=112", "pipeline=[masks,eval]",
                 f"cache_dir={tmp_path / 'cache'}"]
    run = validate(_compose(*overrides))
    blocks = run.model.num_blocks
    for band in (run.bands.shallow, run.bands.middle, run.bands.deep):
        assert 0 <= band[0] <= band[1] < blocks  # giant layer numbers mapped to 12 blocks
    run_job(_compose(*overrides), tmp_path / "job")
    metrics = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert 0.0 <= metrics["JM"] <= 1.0
    assert len(list((tmp_path / "job" / "masks").glob("dynamic_*.png"))) == 7


@pytest.mark.parametrize("preset", ["full", "full_strict"])
def test_full_pipeline_refines_reruns_da3_and_reports_both_passes(preset, tmp_path):
    overrides = [f"experiment={preset}", "model=da3-small", "model.weights=random",
                 "data.num_frames=7", "process_res=112", "logger=none", "viz.videos=false",
                 "latent.encoder=tiny", "latent.weights=random", f"cache_dir={tmp_path / 'cache'}"]
    run_job(_compose(*overrides), tmp_path / "job")
    job = tmp_path / "job"
    assert (job / "prediction_pass2.npz").is_file()
    report = json.loads((job / "latent.json").read_text())
    assert report["tokens"] > 0
    assert report["sources"] == {"prediction": "pass2", "masks": "refined"}
    steps = report["seconds_by_step"]
    assert set(steps) == {"points", "encoder_build", "tokens", "write"}
    assert sum(steps.values()) <= report["seconds"] + 0.01
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
