"""Multirun sweeps: DA3 runs once per clip and model, launchers, sweep summaries, sweeps
refused before launch and failed jobs named at the end."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError
from PIL import Image

from experiments.sweep_summary import main as summary_main
from experiments.sweep_summary import summarize
from tests.clips import write_noise_frames
from vggt4d.errors import UserError
from vggt4d.sweeps import JobFailure, failed_jobs, failure_summary, refusals, shared_overrides

SWEEP = ["model.weights=random", "data.num_frames=3", "process_res=112", "logger=none",
         "pipeline=[masks,eval]"]


def _sweep(cwd: Path, *overrides: str, base: list[str] = SWEEP) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "vggt4d.run", "-m", *base, *overrides],
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


def _run_sweep(cwd: Path, *overrides: str, base: list[str] = SWEEP) -> tuple[int, str]:
    process = _sweep(cwd, *overrides, base=base)
    out, err = process.communicate(timeout=600)
    return process.returncode, out + err


@pytest.mark.parametrize("launcher", ["basic", "local"])
def test_one_invalid_value_refuses_the_sweep_before_any_job_runs(tmp_path, launcher):
    sweep_dir = tmp_path / "sweep"
    code, output = _run_sweep(tmp_path, f"hydra/launcher={launcher}",
                              "bands.middle=[1,3],[1,30]", "bands.deep=[5,5],[4,5]",
                              f"hydra.sweep.dir={sweep_dir}", f"cache_dir={tmp_path / 'cache'}")
    assert code == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    # jobs 2 and 3 hold the bad band; one line names the first and the other
    assert errors == ["error: job 2 (bands.middle=[1,30] bands.deep=[5,5]) (also jobs 3): "
                      "bands.middle=[1, 30] is not a band of this model: give [first, last] with "
                      "0 <= first <= last <= 11 (0-indexed blocks, inclusive)"]
    assert "Launching" not in output
    assert not sweep_dir.exists()
    assert not (tmp_path / "cache").exists()


def test_a_failing_job_under_joblib_is_named_and_the_others_kept(tmp_path):
    frames = write_noise_frames(tmp_path / "frames", 2, 42, 56)
    missing = tmp_path / "missing"
    sweep_dir = tmp_path / "sweep"
    code, output = _run_sweep(tmp_path, "hydra/launcher=local", "cluster.local_jobs=2",
                              "data=images", f"data.path={missing},{frames}", "process_res=56",
                              f"hydra.sweep.dir={sweep_dir}", f"cache_dir={tmp_path / 'cache'}",
                              base=[o for o in SWEEP if not o.startswith("data.")])
    assert code == 1, output[-3000:]
    # a job's progress bar may end without a newline: the summary can follow it on its line
    errors = re.findall(r"error: job .*", output)
    assert errors == [f"error: job 0 (data.path={missing}) failed: data.path={missing}: "
                      f"no such directory"]
    assert f"error: 1 of 2 sweep job(s) failed; the 1 finished job(s) are in {sweep_dir}" \
        in output
    assert [job.name for job in _jobs(sweep_dir)] == ["1"]
    assert not (sweep_dir / "0").exists()


def test_failure_summary_names_recorded_failures_and_crashed_jobs(tmp_path):
    batch = [["model=da3-small", "bands.deep=[5,5]"], ["model=da3-small", "bands.deep=[4,5]"],
             ["model=da3-small", "bands.deep=[3,5]"]]
    results = [
        JobReturn(status=JobStatus.COMPLETED, _return_value=None),
        JobReturn(status=JobStatus.COMPLETED,
                  _return_value=JobFailure(tuple(batch[1]), "data.path=x: no such directory",
                                           kept=False)),
        JobReturn(status=JobStatus.FAILED,
                  _return_value=RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")),
    ]
    failed = failed_jobs(results, batch, first_num=10)
    assert [(job.num, job.error) for job in failed] == [
        (11, "data.path=x: no such directory"), (12, "RuntimeError: CUDA out of memory.")]
    lines = failure_summary(failed, 13, tmp_path, shared_overrides(batch))
    assert lines == [
        "error: job 11 (bands.deep=[4,5]) failed: data.path=x: no such directory",
        "error: job 12 (bands.deep=[3,5]) failed: RuntimeError: CUDA out of memory.",
        f"error: 2 of 13 sweep job(s) failed; the 11 finished job(s) are in {tmp_path}",
    ]
    assert failure_summary(failed[:1], 1, tmp_path) == [
        "error: job 11 (model=da3-small bands.deep=[4,5]) failed: data.path=x: no such directory",
        "error: 1 of 1 sweep job(s) failed",
    ]


def test_refusals_group_jobs_with_the_same_error():
    def check(overrides):
        if "a=bad" in overrides:
            raise UserError("a=bad is not allowed")
        if "b=2" in overrides:
            raise UserError("b=2 is too large")
        if "b=x" in overrides:
            raise ConfigCompositionException("Error merging override b=x") from ValidationError(
                "Value 'x' could not be converted to Integer\n    full_key: b")

    jobs = [["a=ok", "b=1"], ["a=bad", "b=1"], ["a=ok", "b=2"], ["a=bad", "b=2"],
            ["a=ok", "b=x"]]
    assert refusals(jobs, check) == [
        "error: job 1 (a=bad b=1) (also jobs 3): a=bad is not allowed",
        "error: job 2 (a=ok b=2): b=2 is too large",
        "error: job 4 (a=ok b=x): Error merging override b=x: Value 'x' could not be converted "
        "to Integer"]
    assert refusals(jobs[:1], check) == []
