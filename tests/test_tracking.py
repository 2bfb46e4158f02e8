"""W&B logging, read back from the offline run files with ``wandb leet inspect --json``."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from PIL import Image

from vggt4d.pipeline import JobInfo
from vggt4d.run import run_job
from vggt4d.tracking import wait_for_logging

FAST = ["model=da3-small", "model.weights=random", "data.num_frames=3", "process_res=112",
        "viz.fps=5", "latent.encoder=tiny", "latent.weights=random"]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def _job(tmp_path: Path, *overrides: str, job: JobInfo | None = None, name: str = "job"):
    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose("config", overrides=[*FAST, f"cache_dir={tmp_path / 'cache'}",
                                           *overrides])
    ctx = run_job(cfg, tmp_path / name, job)
    wait_for_logging()
    return ctx


def _records(run_dir: Path) -> list[dict]:
    leet = shutil.which("wandb", path=str(Path(__import__("sys").executable).parent))
    output = subprocess.run([leet, "leet", "inspect", "--json", str(run_dir)],
                            capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_one_offline_run_per_job_with_grouped_keys_and_real_images(wandb_env):
    job = JobInfo(name="bands.middle=[1,2]", group="sweep_2026-11-21_12-00-00")
    _job(wandb_env, "bands.middle=[1,2]", job=job)
    runs = list((wandb_env / "job" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = _records(runs[0])
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["run_group"] == "sweep_2026-11-21_12-00-00"
    assert run["display_name"] == "bands.middle=[1,2]"
    assert run["job_type"] == "da3-small"
    assert "window=all" in run["tags"] and "bands=0..0-1..2-5..5" in run["tags"]
    config = {}
    for record in records:
        if record["type"] in ("run", "config"):
            config.update((record[record["type"]].get("config") or {}).get("update", {}))
    assert config["bands"]["middle"] == [1, 2] and config["model"]["name"] == "da3-small"

    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [h["_step"] for h in history] == [0, 1, 2, 3]
    frame = history[0]
    for key in ("maps/w_shallow", "maps/w_middle", "maps/w_deep", "maps/dynamic",
                "masks/overlay", "masks/soft"):
        assert frame[f"{key}._type"] == "image-file", key
    assert "metrics/J" in frame and "metrics/area_fraction" in frame
    assert frame["masks/overlay.masks.dynamic._type"] == "mask"
    assert frame["masks/overlay.masks.ground_truth._type"] == "mask"
    labels = [r["config"]["update"]["_wandb"]["mask/class_labels"]
              for r in records if r["type"] == "config"
              and "mask/class_labels" in r["config"]["update"].get("_wandb", {})]
    dynamic = labels[-1]["masks/overlay_wandb_delimeter_dynamic"]
    assert dynamic["value"] == {"0": "static", "1": "dynamic"}
    final = history[-1]
    assert any(k.startswith("videos/") and k.endswith("._type") and v == "video-file"
               for k, v in final.items())
    assert any(k.startswith("maps/contact/") and k.endswith("._type") for k in final)
    assert final["metrics/per_frame._type"] == "table-file"
    assert final["latent/voxels._type"] == "object3D-file"
    summary = {}
    for record in records:
        if record["type"] == "summary":
            summary.update(record["summary"].get("update", {}))
    assert "metrics/JM" in summary and "metrics/temporal_iou" in summary
    assert summary["latent/tokens"] > 0 and summary["latent/channels"] > 0
    assert any(r["type"] == "exit" for r in records)  # the run was finished

    images = list((runs[0] / "files" / "media" / "images").rglob("*.png"))
    assert len(images) >= 18
    for path in images:
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert pixels.std() > 0 and pixels.max() > 0, path  # not blank (raw floats render black)


def test_wandb_failure_warns_once_and_the_job_completes(wandb_env, monkeypatch, caplog):
    import wandb

    def broken(*_args, **_kwargs):
        raise RuntimeError("wandb is down")

    monkeypatch.setattr(wandb, "init", broken)
    with caplog.at_level(logging.WARNING):
        _job(wandb_env)
    warnings = [r for r in caplog.records if "W&B logging failed" in r.getMessage()]
    assert len(warnings) == 1
    assert (wandb_env / "job" / "metrics.json").is_file()


def test_run_is_finished_when_logging_breaks_midway(wandb_env, monkeypatch):
    import vggt4d.tracking as tracking

    def broken(_ctx):
        raise ValueError("bad record")

    monkeypatch.setattr(tracking, "summary", broken)
    _job(wandb_env)
    run_dir = next((wandb_env / "job" / "wandb").glob("offline-run-*"))
    assert any(r["type"] == "exit" for r in _records(run_dir))


def test_logger_none_writes_no_run(wandb_env):
    _job(wandb_env, "logger=none")
    assert not (wandb_env / "job" / "wandb").exists()
    assert (wandb_env / "job" / "metrics.json").is_file()
