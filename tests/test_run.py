"""The runner as a user meets it: ``python -m vggt4d.run`` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
MODEL = ["model=da3-small", "model.weights=random", "process_res=140", "latent.encoder=tiny",
         "latent.weights=random"]
FAST = [*MODEL, "data.num_frames=4"]


def run_cli(tmp_path: Path, *overrides: str, job: str = "job",
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m vggt4d.run`` offline, with an empty Hugging Face cache of its own (so weights
    a developer has downloaded do not change what the hub tests see)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "HF_HOME": str(tmp_path / "hf"), **(env or {})}
    args = [sys.executable, "-m", "vggt4d.run", f"hydra.run.dir={tmp_path / job}",
            f"cache_dir={tmp_path / 'cache'}", *overrides]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def assert_user_error(result: subprocess.CompletedProcess, needle: str, job_dir: Path) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], output
    assert not job_dir.exists(), "a failed job must not leave a job directory"


def test_synthetic_run_writes_prediction_then_reuses_the_cache(tmp_path):
    first = run_cli(tmp_path, *FAST, job="first")
    assert first.returncode == 0, first.stderr
    assert f"outputs: {tmp_path / 'first'}" in first.stdout
    with np.load(tmp_path / "first" / "prediction.npz") as data:
        assert data["depth"].shape == (4, 112, 140)  # 280×210 → longest side 140
        assert data["conf"].min() >= 1.0  # DA3's confidence is 1 + exp(x)
        assert data["extrinsics"].shape == (4, 3, 4)
        assert data["intrinsics"].shape == (4, 3, 3)
        assert data["frames"].dtype == np.uint8 and data["frames"].shape == (4, 112, 140, 3)
        assert tuple(data["grid"]) == (8, 10)
        depth = data["depth"]

    second = run_cli(tmp_path, *FAST, job="second")
    assert second.returncode == 0, second.stderr
    assert "predict: reused cached result" in second.stdout
    with np.load(tmp_path / "second" / "prediction.npz") as data:
        assert np.array_equal(data["depth"], depth)
    assert "latent: reused cached result" in second.stdout
    tokens = torch.load(tmp_path / "second" / "scene_latent.pt")
    assert tokens["pixel_voxel"].shape == (4, 112, 140)
    assert tokens["geo_feat"].shape == (len(tokens["coord"]), 160)  # tiny: all 5 levels
    assert tokens["meta"]["sources"] == {"prediction": "pass1", "masks": "coarse"}
    assert (tmp_path / "second" / "scene_latent.ply").read_bytes().startswith(b"ply")

    other = run_cli(tmp_path, *FAST, "model.ref_view_strategy=first", job="third")
    assert "reused cached" not in other.stdout


def test_full_pipeline_writes_every_output_and_band_sweeps_reuse_the_forward(tmp_path):
    first = run_cli(tmp_path, *FAST, job="first")
    assert first.returncode == 0, first.stderr
    job = tmp_path / "first"
    for name in ("prediction.npz", "gram_stats.safetensors", "dynamic_maps.safetensors",
                 "metrics.json", "masks/dynamic_0000.png", "masks/soft_0003.png",
                 "masks/binarize.json", "overlays/mask_frame000_overlay.png",
                 "maps/fused_frame000_final_mask.png", "maps/cues_frame002_w_deep.png",
                 "maps/layer_00_frame001_similarity.png", "contact/frame002_similarity.png",
                 "videos/maps/fused_final_mask.mp4"):
        assert (job / name).is_file(), name
    metrics = json.loads((job / "metrics.json").read_text())
    assert {"JM", "JR", "FM", "FR", "unsupervised"} <= metrics.keys()
    with safe_open(job / "gram_stats.safetensors", "pt") as stats:
        keys = set(stats.keys())
        assert json.loads(stats.metadata()["vggt4d"])["gram"]["window"] == "all"
        assert tuple(stats.get_tensor("qk.var.L05").shape) == (4, 8, 10)
    assert keys == {f"{p}.{s}.L{layer:02d}" for p in ("qq", "kk", "qk") for s in ("mean", "var")
                    for layer in range(12)}

    # a sweep point that changes bands, fusion and binarisation only: DA3 does not run again
    swept = run_cli(tmp_path, *FAST, "bands.middle=[2,4]", "maps.fusion=sum",
                    "masks.binarize=threshold", job="swept")
    assert swept.returncode == 0, swept.stderr
    assert "predict: reused cached result" in swept.stdout
    assert "predict: da3-small" not in swept.stdout + swept.stderr  # DA3 not built again
    # pictures of the first block of each band: layers 0 and 5 and the sheets drawn once
    assert "layer_viz: reused cached pictures of L00, L05, contact sheets" in swept.stdout
    for name in ("maps/layer_00_frame001_variance.png", "maps/layer_05_frame003_stability.png",
                 "contact/frame002_qk_var.png", "videos/maps/layer_05_similarity.mp4"):
        assert (tmp_path / "swept" / name).read_bytes() == (job / name).read_bytes(), name
    assert not (job / "maps/layer_02_frame000_similarity.png").exists()
    assert (tmp_path / "swept" / "maps/layer_02_frame000_similarity.png").is_file()


def test_kmeans_guided_temporal_and_exact_bands_run_through(tmp_path):
    result = run_cli(tmp_path, *FAST, "masks.kmeans=true", "masks.kmeans_clusters=8",
                     "masks.upsample=guided", "masks.guide=rgbd", "masks.temporal_sigma=1",
                     "masks.binarize=hysteresis", "maps.band_mode=exact",
                     "maps.normalize=percentile", "pipeline=[masks,eval]")
    assert result.returncode == 0, result.stderr
    job = tmp_path / "job"
    with safe_open(job / "patch_features.safetensors", "pt") as features:
        assert tuple(features.get_tensor("features").shape) == (4, 8, 10, 384)
    with safe_open(job / "gram_stats.safetensors", "pt") as stats:
        assert {"qq.var.band_deep", "kk.mean.band_shallow"} <= set(stats.keys())
    assert len(list((job / "masks").glob("dynamic_*.png"))) == 4
    assert not (job / "maps").exists()  # viz was not asked for


def test_real_frames_without_ground_truth_get_unsupervised_figures(tmp_path):
    folder = _images(tmp_path / "clip", 3)
    result = run_cli(tmp_path, *MODEL, "data=images", f"data.path={folder}", "viz.videos=false")
    assert result.returncode == 0, result.stderr
    assert "no ground truth" in result.stdout
    metrics = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert "JM" not in metrics and "area_fraction" in metrics["unsupervised"]


def _images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((28, 42, 3), 40 * i, np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.parametrize(("case", "needle"), [
    ("missing_folder", "no such directory"),
    ("empty_folder", "holds no"),
    ("unreadable_image", "001.png"),
    ("one_frame", "at least 2"),
    ("weights_path", "no such file or directory"),
    ("hub_unreachable", "model.weights=random"),
    ("bad_video", "cannot decode video"),
    ("too_much_memory", "GiB is available"),
    ("window_longer_than_clip", "without source frames"),
    ("empty_band", "bands.deep=[5, 3]"),
    ("eval_gt_missing", "eval.gt_path"),
    ("pairs_for_maps", "needs qq, kk and qk"),
    ("layers_for_bands", "lacks layers [0, 5]"),
    ("area_fraction", "second_pass.area_fraction=2.0"),
    ("latent_grid", "latent.grid_size=0.0 must be > 0"),
    ("concerto_unreachable", "cannot download concerto_large.pth"),
    ("dynamic_voxels_without_masks", "latent.dynamic_voxels=true needs dynamic masks"),
    ("latent_without_cameras", "da3mono-large predicts depth only"),
])
def test_bad_input_is_one_clear_line(tmp_path, case, needle):
    overrides = {
        "missing_folder": ["data=images", f"data.path={tmp_path / 'nope'}"],
        "empty_folder": ["data=images", f"data.path={_images(tmp_path / 'empty', 0)}"],
        "unreadable_image": ["data=images", f"data.path={_images(tmp_path / 'broken', 3)}"],
        "one_frame": ["data=images", f"data.path={_images(tmp_path / 'one', 1)}"],
        "weights_path": [f"model.weights={tmp_path / 'weights'}"],
        "hub_unreachable": ["model.weights=depth-anything/DA3-SMALL"],
        "bad_video": ["data=video", f"data.path={tmp_path / 'bad.mp4'}"],
        "too_much_memory": ["memory_limit_gb=0.05"],
        "window_longer_than_clip": ["gram.window=offsets", "gram.offsets=[-6,6]",
                                    "gram.include_self=false"],
        "empty_band": ["bands.deep=[5,3]"],
        "eval_gt_missing": [f"eval.gt_path={tmp_path / 'no_annotations'}"],
        "pairs_for_maps": ["gram.pairs=[qq,kk]"],
        "layers_for_bands": ["gram.layers=[1,2,3]"],
        "area_fraction": ["pipeline=[second_pass]", "second_pass.area_fraction=2"],
        "latent_grid": ["latent.grid_size=0"],
        "concerto_unreachable": ["latent.encoder=large", "latent.weights=concerto_large"],
        "dynamic_voxels_without_masks": ["pipeline=[latent]", "latent.dynamic_voxels=true"],
        "latent_without_cameras": ["model=da3mono-large", "pipeline=[predict,latent]"],
    }[case]
    if case == "unreadable_image":
        (tmp_path / "broken" / "001.png").write_bytes(b"garbage")
    if case == "bad_video":
        (tmp_path / "bad.mp4").write_bytes(b"\x00" * 4096)
    base = MODEL if overrides[0].startswith("data=") else FAST
    if case in {"weights_path", "hub_unreachable"}:
        base = [o for o in base if not o.startswith("model.weights")]
    if case == "concerto_unreachable":
        base = [o for o in base if not o.startswith("latent.")]
    if case == "latent_without_cameras":
        base = [o for o in base if not o.startswith("model=")]
    # the concerto package's download folder lies under HOME
    home = {"HOME": str(tmp_path / "home")} if case == "concerto_unreachable" else None
    result = run_cli(tmp_path, *base, *overrides, env=home)
    assert_user_error(result, needle, tmp_path / "job")


def test_a_bad_encoder_checkpoint_is_refused_before_da3_runs(tmp_path):
    from vggt4d.ptv3.checkpoint import save_checkpoint
    from vggt4d.ptv3.model import VARIANTS, PTv3Encoder

    path = save_checkpoint(tmp_path / "tiny.pth", PTv3Encoder(VARIANTS["tiny"]))
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["state_dict"]["enc.enc2.block0.attn.qkv.weight"]
    torch.save(checkpoint, path)
    result = run_cli(tmp_path, *[o for o in FAST if not o.startswith("latent.")],
                     "latent.encoder=tiny", f"latent.weights={path}")
    assert_user_error(result, "missing keys enc.enc2.block0.attn.qkv.weight", tmp_path / "job")
    assert "predict: da3-small" not in result.stdout + result.stderr  # refused before DA3 built


def test_an_error_after_results_keeps_them_and_ends_the_log(tmp_path):
    """A grid too fine for the clip is only known once DA3 has run: the prediction stays (and is
    cached), the log ends with the error line, no partial scene_latent.pt is left."""
    result = run_cli(tmp_path, *FAST, "latent.grid_size=1e-6")
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "use a grid size >=" in errors[0], result.stderr
    job = tmp_path / "job"
    assert (job / "prediction.npz").is_file() and not (job / "scene_latent.pt").exists()
    assert not [p for p in job.rglob("*") if ".tmp" in p.name]
    last = (job / "run.log").read_text().strip().splitlines()[-1]
    assert "ERROR" in last and errors[0].removeprefix("error: ") in last


def test_depth_only_models_run_without_cameras(tmp_path):
    """da3mono-large has no camera head: no conf/extrinsics/intrinsics in prediction.npz, poses
    not scored, the second pass compares depth only."""
    result = run_cli(tmp_path, "model=da3mono-large", "model.weights=random", "process_res=112",
                     "data.num_frames=3", "logger=none",
                     "pipeline=[predict,gram,maps,masks,second_pass,eval]",
                     "second_pass.layer_rule=blocks")
    assert result.returncode == 0, result.stderr
    job = tmp_path / "job"
    with np.load(job / "prediction.npz") as data:
        assert data["depth"].shape == data["sky"].shape == (3, 84, 112)
        assert not {"conf", "extrinsics", "intrinsics"} & set(data.files)
    metrics = json.loads((job / "metrics.json").read_text())
    for name in ("pass1", "pass2"):
        assert "predicts no cameras" in metrics["geometry"][name]["pose"]["skipped"]
        assert 0 < metrics["geometry"][name]["depth"]["abs_rel"] < 1
    assert "skipped" in json.loads((job / "second_pass.json").read_text())


def test_unknown_model_lists_the_known_ones(tmp_path):
    result = run_cli(tmp_path, "model=da3-tiny")
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert "da3nested-giant-large" in result.stderr


def test_process_res_not_multiple_of_14_is_rounded_with_a_warning(tmp_path):
    result = run_cli(tmp_path, *[o for o in FAST if not o.startswith("process_res")],
                     "process_res=150")
    assert result.returncode == 0, result.stderr
    assert "not a multiple of 14; using 154" in result.stdout + result.stderr
