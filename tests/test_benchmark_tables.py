"""``python -m vggt4d.benchmark`` end to end on the synthetic scene exported in the official
layouts (random da3-small weights, tiny frames, logger=none): a mask, a depth and a pose table,
each number recomputed here from the job's own files and the rendered scene (float64, OpenCV's
bicubic resize, a NumPy Adam and Umeyama), resume after a crash, a failed sequence listed and not
averaged, and the demo's planted weights scoring the same JM through the DAVIS layout as on the
embedded scene."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image
from test_benchmark_protocol import adam_l1_reference

from vggt4d.benchmark import cli
from vggt4d.benchmark.jobs import is_finished, plan
from vggt4d.datasets.export import export_synthetic
from vggt4d.synthetic import SyntheticConfig, render_scene

SCENE = SyntheticConfig(num_frames=7, width=56, height=42)
SEQUENCES = 2


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("datasets")
    manifest = export_synthetic(out, ["davis2016", "sintel", "tum"], SCENE, SEQUENCES)
    scenes = [render_scene(SyntheticConfig(**{**vars(SCENE), "seed": i}))
              for i in range(SEQUENCES)]
    return out, manifest, scenes


def common(tmp_path: Path) -> list[str]:
    return ["model=da3-small", "model.weights=random", "process_res=112", "logger=none",
            f"cache_dir={tmp_path / 'cache'}"]


def run_table(table, root, out, *extra):
    return cli.main([f"table={table}", f"root={root}", f"out={out}", *extra])


def read_table(out: Path) -> dict:
    return json.loads((out / "table.json").read_text())


def job_metrics(out: Path, sequence: str) -> dict:
    return json.loads((out / "sequences" / sequence / "metrics.json").read_text())


def test_mask_table_recomputed_from_the_masks_and_resumed(exported, tmp_path, monkeypatch):
    root, manifest, scenes = exported
    out = tmp_path / "davis"
    davis = root / manifest["datasets"]["davis2016"]["root"]
    names = manifest["datasets"]["davis2016"]["sequences"]
    extra = ["sequences=all", *common(tmp_path)]
    assert run_table("davis2016_masks", davis, out, *extra) == 0
    table = read_table(out)
    assert [row["sequence"] for row in table["sequences"]] == names and table["failed"] == []
    assert table["protocol"]["eval"]["protocol"] == "vggt4d"
    for row, scene in zip(table["sequences"], scenes, strict=True):
        # J recomputed from the written masks against the rendered truth (VGGT4D: every frame,
        # J = 0 on an empty union, scored at the prediction's size: truth resized, nearest)
        masks = [np.asarray(Image.open(out / "sequences" / row["sequence"] / "masks"
                                       / f"dynamic_{t:04d}.png")) > 0
                 for t in range(SCENE.num_frames)]
        truths = [np.asarray(Image.fromarray(truth.astype(np.uint8) * 255).resize(
            masks[0].shape[::-1], Image.NEAREST)) > 0 for truth in scene.dynamic_masks]
        jaccards = []
        for pred, truth in zip(masks, truths, strict=True):
            union = np.logical_or(pred, truth).sum()
            jaccards.append(np.logical_and(pred, truth).sum() / union if union else 0.0)
        assert row["JM"] == pytest.approx(100 * np.mean(jaccards), abs=1e-9)
        assert row["frames"] == SCENE.num_frames
    # the average is the plain mean over sequences of the per-sequence files' numbers, in %
    for key in ("JM", "JR", "JD", "FM", "FR", "FD"):
        expected = np.mean([100 * job_metrics(out, name)[key] for name in names])
        assert table["average"][key] == pytest.approx(expected, abs=1e-12)
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert [r["kind"] for r in rows] == ["sequence", "sequence", "average", *(
        ["published"] * 5)]
    assert float(rows[2]["JM"]) == table["average"]["JM"]
    markdown = (out / "table.md").read_text()
    assert "| VGGT4D | 62.12 | 76.80 | – | 56.04 | 67.49 | – |" in markdown
    assert (out / "table.png").read_bytes().startswith(b"\x89PNG")

    # rerun: nothing is launched, the same table comes back
    launched = []

    def relaunch(plan_, sequences):
        """Stands in for the sweep: records what would run and finishes it as the job would."""
        launched.append(list(sequences))
        for sequence in sequences:
            (plan_.job_dir(sequence) / "timings.json").write_text("{}")
        return 0, {}

    monkeypatch.setattr(cli, "launch", relaunch)
    assert run_table("davis2016_masks", davis, out, *extra) == 0
    assert launched == [] and read_table(out)["sequences"] == table["sequences"]

    # a crash before the second sequence finished: only that one is launched again
    kept = out / "sequences" / names[0] / "metrics.json"
    stamp = kept.stat().st_mtime_ns
    (out / "sequences" / names[1] / "timings.json").unlink()
    assert run_table("davis2016_masks", davis, out, *extra) == 0
    assert launched == [[names[1]]] and kept.stat().st_mtime_ns == stamp
    assert read_table(out)["average"]["JM"] == pytest.approx(table["average"]["JM"], abs=1e-12)

    # other settings are other results: nothing counts as finished
    same = plan("davis2016_masks", str(davis), common(tmp_path), out=str(out), sequences="all")
    changed = plan("davis2016_masks", str(davis), [*common(tmp_path), "eval.bound_th=3"],
                   out=str(out), sequences="all")
    assert all(is_finished(same, name) for name in names)
    assert not any(is_finished(changed, name) for name in names)


def cv2_resize(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    return np.stack([cv2.resize(frame.astype(np.float64), size[::-1],
                                interpolation=cv2.INTER_CUBIC) for frame in depth])


def test_depth_table_recomputed_from_the_predictions(exported, tmp_path):
    pytest.importorskip("cv2")
    root, manifest, scenes = exported
    out = tmp_path / "sintel"
    assert run_table("sintel_depth", root / manifest["datasets"]["sintel"]["root"], out,
                     "sequences=all", *common(tmp_path)) == 0
    table = read_table(out)
    assert {"depth_alignment": "scale_shift", "depth_cap": 70.0,
            "depth_clip": 70.0}.items() <= table["protocol"]["eval"].items()
    pixels, abs_rels, deltas = [], [], []
    for row, scene in zip(table["sequences"], scenes, strict=True):
        with np.load(out / "sequences" / row["sequence"] / "prediction.npz") as data:
            pred = cv2_resize(data["depth"], (42, 56))
        gt = scene.depth.astype(np.float64)
        valid = (gt > 0) & (gt < 70)
        s, t = adam_l1_reference(pred[valid], gt[valid])
        d = np.minimum(s * pred[valid] + t, 70.0)
        g = gt[valid]
        abs_rel = np.mean(np.abs(d - g) / g)
        delta = 100 * np.mean(np.maximum(np.maximum(d, 1e-5) / g, g / np.maximum(d, 1e-5)) < 1.25)
        assert row["abs_rel"] == pytest.approx(abs_rel, rel=1e-6)
        assert row["delta_1.25"] == pytest.approx(delta, abs=1e-9)
        assert row["pixels"] == valid.sum() and row["geometry_pass"] == "pass1"
        pixels.append(valid.sum())
        abs_rels.append(job_metrics(out, row["sequence"])["geometry"]["pass1"]["depth"][
            "abs_rel"])
        deltas.append(100 * job_metrics(out, row["sequence"])["geometry"]["pass1"]["depth"][
            "delta_1.25"])
    assert table["average"]["abs_rel"] == pytest.approx(
        sum(p * a for p, a in zip(pixels, abs_rels, strict=True)) / sum(pixels), abs=1e-12)
    assert table["average"]["delta_1.25"] == pytest.approx(
        sum(p * d for p, d in zip(pixels, deltas, strict=True)) / sum(pixels), abs=1e-12)


def umeyama_ate(pred_w2c: np.ndarray, gt_w2c: np.ndarray) -> float:
    """ATE (RMSE of camera centres) after the closed-form Sim(3) of predicted onto true centres."""
    def centres(w2c):
        return -np.einsum("tji,tj->ti", w2c[:, :, :3], w2c[:, :, 3])

    x, y = centres(pred_w2c.astype(np.float64)), centres(gt_w2c.astype(np.float64))
    xc, yc = x - x.mean(0), y - y.mean(0)
    u, d, vt = np.linalg.svd(yc.T @ xc / len(x))
    sign = np.diag([1.0, 1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt))])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(d) @ sign) / (np.sum(xc**2) / len(x))
    aligned = scale * xc @ rotation.T + y.mean(0)
    return math.sqrt(np.mean(np.sum((aligned - y) ** 2, axis=1)))


def test_pose_table_recomputed_and_a_failed_sequence_listed(exported, tmp_path):
    root, manifest, scenes = exported
    out = tmp_path / "tum"
    names = manifest["datasets"]["tum"]["sequences"]
    status = run_table("tum_pose", root / manifest["datasets"]["tum"]["root"], out,
                       f"sequences={','.join([*names, 'rgbd_dataset_missing'])}",
                       *common(tmp_path))
    assert status == cli.EXIT_FAILED_SEQUENCES
    table = read_table(out)
    assert [item["sequence"] for item in table["failed"]] == ["rgbd_dataset_missing"]
    assert "not found" in table["failed"][0]["error"]
    assert table["average"]["sequences"] == 2
    atez = []
    for row, scene in zip(table["sequences"], scenes, strict=True):
        assert row["frames"] == 3  # every 3rd of 7 associated frames: 0, 3, 6
        with np.load(out / "sequences" / row["sequence"] / "prediction.npz") as data:
            ate = umeyama_ate(data["extrinsics"], scene.extrinsics[::3])
        assert row["ate"] == pytest.approx(ate, rel=1e-6, abs=1e-9)
        atez.append(job_metrics(out, row["sequence"])["geometry"]["pass1"]["pose"]["ate"])
    assert table["average"]["ate"] == pytest.approx(np.mean(atez), abs=1e-15)
    markdown = (out / "table.md").read_text()
    assert "- `rgbd_dataset_missing`:" in markdown and "| VGGT4D | 0.0160 |" in markdown


def test_planted_weights_score_the_same_jm_through_the_davis_layout(tmp_path):
    from vggt4d.demo_weights import plant
    from vggt4d.model import build_network, save_hub_checkpoint
    from vggt4d.run import run_job

    scene = SyntheticConfig(num_frames=8, object_speed=2.5)  # experiment=demo's clip
    export_synthetic(tmp_path / "data", ["davis2017"], scene, 1)
    torch.manual_seed(0)
    save_hub_checkpoint(plant(build_network("da3-small")), tmp_path / "planted", "da3-small")
    settings = ["model=da3-small", f"model.weights={tmp_path / 'planted'}",
                "model.ref_view_strategy=middle", "bands.shallow=[2,2]", "bands.middle=[3,3]",
                "bands.deep=[1,1]", "gram.layers=[1,2,3]", "process_res=280", "logger=none",
                f"cache_dir={tmp_path / 'cache'}"]
    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose("config", overrides=[*settings, "data.num_frames=8",
                                           "data.object_speed=2.5", "eval.protocol=vggt4d",
                                           "pipeline=[predict,gram,maps,masks,eval]"])
    run_job(cfg, tmp_path / "embedded")
    embedded = json.loads((tmp_path / "embedded" / "metrics.json").read_text())["JM"]
    out = tmp_path / "table"
    assert run_table("davis2017_masks", tmp_path / "data" / "davis2017" / "DAVIS", out,
                     "sequences=all", *settings) == 0
    through_davis = read_table(out)["sequences"][0]["JM"] / 100
    assert embedded >= 0.7  # the planted answer is found (JR 1 at this size)
    # the DAVIS copy differs only by JPEG (quality 95) frames: the masks barely move
    assert through_davis == pytest.approx(embedded, abs=0.02)
