"""Multirun sweeps: DA3 runs once per clip and model, launchers, sweep summaries."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from experiments.sweep_summary import main as summary_main
from experiments.sweep_summary import summarize

SWEEP = ["model.weights=random", "data.num_frames=3", "process_res=112", "logger=none",
         "pipeline=[masks,eval]"]


def _sweep(cwd: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "vggt4d.run", "-m", *SWEEP, *overrides],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return out + err


def _jobs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if (p / "metrics.json").is_file())


def test_band_sweep_runs_da3_once_and_summarises(tmp_path):
    sweep_dir = tmp_path / "sweep"
    _finish(_sweep(tmp_path, "bands.middle=[1,2],[1,3],[2,4]", f"hydra.sweep.dir={sweep_dir}",
                   f"cache_dir={tmp_path / 'cache'}"))
    jobs = _jobs(sweep_dir)
    assert len(jobs) == 3
    logs = [(job / "run.log").read_text() for job in jobs]
    assert sum("predict: reused cached result" in text for text in logs) == 2
    assert len([p for p in (tmp_path / "cache" / "predict").iterdir() if p.is_dir()]) == 1

    csv_path, png_path = summarize(sweep_dir)
    rows = list(csv.DictReader(csv_path.open()))
    assert [row["bands.middle"] for row in rows] == ["[1,2]", "[1,3]", "[2,4]"]
    for row, job in zip(rows, jobs, strict=True):
        expected = json.loads((job / "metrics.json").read_text())["JM"]
        assert float(row["JM"]) == expected
    picture = np.asarray(Image.open(png_path).convert("L"))
    assert picture.std() > 0


def test_summary_of_planted_jobs_and_bad_folders(tmp_path, capsys):
    for index, (band, jm) in enumerate([("[1,2]", 0.25), ("[1,3]", 0.75)]):
        job = tmp_path / "sweep" / str(index)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump([f"bands.middle={band}", "model=da3-small"]))
        (job / "metrics.json").write_text(json.dumps(
            {"JM": jm, "unsupervised": {"area_fraction": 0.1, "temporal_iou": 0.9}}))
    csv_path, _ = summarize(tmp_path / "sweep")
    rows = list(csv.DictReader(csv_path.open()))
    assert list(rows[0]) == ["job", "bands.middle", "JM", "area_fraction", "temporal_iou"]
    assert [float(r["JM"]) for r in rows] == [0.25, 0.75]
    assert summary_main([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_submitit_local_launcher_shares_one_forward(tmp_path):
    sweep_dir = tmp_path / "sweep"
    output = _finish(_sweep(tmp_path, "hydra/launcher=submitit_local", "bands.deep=[5,5],[4,5]",
                            f"hydra.sweep.dir={sweep_dir}", f"cache_dir={tmp_path / 'cache'}"))
    jobs = _jobs(sweep_dir)
    assert len(jobs) == 2, output
    assert len([p for p in (tmp_path / "cache" / "predict").iterdir() if p.is_dir()]) == 1


def test_sweeps_started_together_do_not_share_a_folder(tmp_path):
    cache = f"cache_dir={tmp_path / 'cache'}"
    first = _sweep(tmp_path, "bands.deep=[5,5]", cache)
    second = _sweep(tmp_path, "bands.deep=[4,5]", cache)
    _finish(first)
    _finish(second)
    sweeps = [p for p in (tmp_path / "outputs" / "multirun").rglob("multirun.yaml")]
    assert len({p.parent for p in sweeps}) == 2
    overrides = sorted(item for sweep in sweeps for job in _jobs(sweep.parent)
                       for item in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
                       if item.startswith("bands.deep"))
    assert overrides == ["bands.deep=[4,5]", "bands.deep=[5,5]"]
