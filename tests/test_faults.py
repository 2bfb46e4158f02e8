"""Faults a run meets as a user would: output folders that cannot be made or written and full
disks (one ``error:`` line naming the path, exit status 2, ``run.log`` ending with it when the
job folder stays, no traceback, no half-written files), caches that cannot be written (a warning,
the job completes) and non-finite scene tokens (refused naming where, or kept in float32).

Real faults (tmpfs, read-only bind mounts) where ``mount`` is permitted; the simulated variants
(refused writes through an audit hook, :mod:`tests.filesystems`) always run.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from tests.filesystems import INJECT, fault_env, read_only, refuse_writes, tiny_disk
from vggt4d.errors import UserError
from vggt4d.latent import SceneLatent, VoxelAggregates, write_latent

REPO = Path(__file__).resolve().parents[1]
BASE = ["model=da3-small", "model.weights=random", "process_res=42", "data.num_frames=2",
        "logger=none"]
MASKS = [*BASE, "pipeline=[predict,gram,maps,masks]"]
LATENT = [*BASE, "pipeline=[predict,gram,maps,masks,latent]", "latent.encoder=tiny",
          "latent.weights=random"]


def run_cli(tmp_path: Path, job: Path, *overrides: str, cache: Path | None = None,
            faults: tuple = ()) -> subprocess.CompletedProcess:
    """``python -m vggt4d.run`` (with ``faults``: the same runner with those writes refused)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "HF_HOME": str(tmp_path / "hf"), **fault_env(*faults)}
    command = ["-c", INJECT] if faults else ["-m", "vggt4d.run"]
    args = [sys.executable, *command, f"hydra.run.dir={job}",
            f"cache_dir={cache or tmp_path / 'cache'}", *overrides]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The run's one ``error:`` line (exit status 2, no traceback)."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output and "Logging error" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


def temporary_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")] if folder.exists() else []


def warning_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if "[WARNING]" in line]


# --------------------------------------------------------------------------------------------
# output folders
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["read_only_mounted", "unwritable_simulated",
                                  "existing_read_only_mounted", "existing_unwritable_simulated",
                                  "full_mounted", "full_at_hydra_config_simulated"])
def test_an_output_folder_that_cannot_take_the_first_result_is_one_line(tmp_path, case):
    """Before any result is written (Hydra's own files included): one line naming the path and
    what to do, no job folder left (nothing half-written)."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    job = outputs / "job"
    pipeline = "pipeline=[predict]"
    if case == "read_only_mounted":
        with read_only(outputs):
            line = error_line(run_cli(tmp_path, job, *BASE, pipeline))
        assert f"cannot write {job}: not writable" in line
    elif case == "unwritable_simulated":
        line = error_line(run_cli(tmp_path, job, *BASE, pipeline,
                                  faults=((outputs, errno.EACCES, ""),)))
        assert f"cannot write {job}: not writable" in line
    elif case.startswith("existing"):  # the folder exists: Hydra cannot open run.log in it
        job.mkdir()
        if case == "existing_read_only_mounted":
            with read_only(job):
                line = error_line(run_cli(tmp_path, job, *BASE, pipeline))
        else:
            line = error_line(run_cli(tmp_path, job, *BASE, pipeline,
                                      faults=((job, errno.EACCES, ""),)))
        assert f"cannot write {job / 'run.log'}: not writable" in line
        assert not any(job.iterdir())
        job.rmdir()
    elif case == "full_mounted":
        with tiny_disk(outputs, 12):  # room for Hydra's config files at most
            line = error_line(run_cli(tmp_path, job, *BASE, pipeline))
            assert not list(outputs.iterdir())
        assert f"cannot write {job}" in line and "the disk is full" in line
    else:
        line = error_line(run_cli(tmp_path, job, *BASE, pipeline,
                                  faults=((job, errno.ENOSPC, "hydra.yaml"),)))
        assert f"cannot write {job}" in line and "the disk is full" in line
    assert "hydra.run.dir=" in line  # what to do
    assert not job.exists()


@pytest.mark.parametrize(("code", "reason"), [(errno.ENOSPC, "the disk is full"),
                                              (errno.EACCES, "not writable")])
def test_a_result_that_cannot_be_written_is_an_output_error_without_leftovers(
        tmp_path, code, reason):
    """Simulated in the job itself: the error names prediction.npz and what to do, and its
    temporary file is gone."""
    from vggt4d.io import OutputError
    from vggt4d.run import run_job

    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose("config", overrides=[*BASE, "pipeline=[predict]",
                                           f"cache_dir={tmp_path / 'cache'}"])
    job = tmp_path / "job"
    with refuse_writes((job, code, "prediction.npz")), pytest.raises(OutputError) as info:
        run_job(cfg, job)
    assert str(info.value).startswith(f"cannot write {job / 'prediction.npz'}: {reason}")
    assert "\n" not in str(info.value) and "hydra.run.dir=" in str(info.value)
    assert not temporary_files(job) and not (job / "prediction.npz").exists()


@pytest.mark.parametrize("case", ["full_mounted", "unwritable_simulated"])
def test_an_output_write_failure_after_results_keeps_them_and_ends_run_log(tmp_path, case):
    """The masks folder fills up (a 4 KiB disk mounted there) or refuses writes after
    prediction.npz and the statistics were written: they stay, run.log ends with the error."""
    job = tmp_path / "job"
    masks = job / "masks"
    if case == "full_mounted":
        with tiny_disk(masks, 4):
            line = error_line(run_cli(tmp_path, job, *MASKS))
            assert not temporary_files(masks)
        assert "the disk is full" in line
    else:
        line = error_line(run_cli(tmp_path, job, *MASKS, faults=((masks, errno.EACCES, ""),)))
        assert "not writable" in line
    assert f"cannot write {masks}" in line and "hydra.run.dir=" in line
    assert (job / "prediction.npz").is_file() and (job / "dynamic_maps.safetensors").is_file()
    assert not temporary_files(job)
    last = (job / "run.log").read_text().strip().splitlines()[-1]
    assert "ERROR" in last and line.removeprefix("error: ") in last


def test_a_job_log_that_cannot_be_written_is_one_warning_not_a_traceback_per_record(
        tmp_path, capsys):
    """Hydra's run.log on a full disk: the first failed record warns once on the console."""
    from vggt4d.run import report_log_write_failures

    class FullDisk(io.StringIO):
        def flush(self) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    handler = logging.FileHandler(tmp_path / "run.log")
    handler.setStream(FullDisk()).close()  # the log file's writes now fail as on a full disk
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        report_log_write_failures()
        for number in range(3):
            root.error("record %d", number)
    finally:
        root.removeHandler(handler)
        handler.stream = None
        handler.close()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    assert err.count(f"warning: cannot write {tmp_path / 'run.log'}: the disk is full") == 1


# --------------------------------------------------------------------------------------------
# caches that cannot be written, through the runner
# --------------------------------------------------------------------------------------------


def _fill_cache(tmp_path: Path, cache: Path) -> None:
    """The forward's entry of the :data:`LATENT` job (computed in this process), but not the
    scene tokens' entry."""
    from vggt4d.run import run_job

    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose("config", overrides=[*LATENT, f"cache_dir={cache}"])
    run_job(cfg, tmp_path / "filler")
    for entry in (cache / "latent").iterdir():
        if entry.is_dir():
            for path in sorted(entry.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            entry.rmdir()
    assert any((cache / "predict").iterdir())


def test_a_read_only_cache_serves_what_it_holds_and_the_job_completes(tmp_path, caplog):
    cache = tmp_path / "cache"
    with caplog.at_level(logging.ERROR):  # the filler's INFO lines are not this test's
        _fill_cache(tmp_path, cache)
    job = tmp_path / "job"
    with read_only(cache):
        result = run_cli(tmp_path, job, *LATENT, cache=cache)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output
    assert "predict: reused cached result" in output  # read without a lock
    warnings = warning_lines(result)
    assert len(warnings) == 1, warnings
    assert f"cache {cache} cannot be written" in warnings[0] and "not stored" in warnings[0]
    assert (job / "scene_latent.pt").is_file() and (job / "prediction.npz").is_file()
    assert not any(p.is_dir() for p in (cache / "latent").iterdir())  # nothing stored


def test_a_full_cache_disk_warns_once_and_the_job_completes(tmp_path):
    """(The simulated variant: tests/test_cache.py.)"""
    cache = tmp_path / "cache"
    job = tmp_path / "job"
    with tiny_disk(cache, 16):  # prediction.npz alone is larger
        result = run_cli(tmp_path, job, *MASKS, cache=cache)
        leftovers = [p for p in cache.rglob("*") if p.is_dir() and p.name.startswith(".")]
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output
    warnings = warning_lines(result)
    assert len(warnings) == 1, warnings
    assert f"cannot store predict result in {cache / 'predict'}" in warnings[0]
    assert "the disk is full" in warnings[0] and "without storing" in warnings[0]
    assert not leftovers  # no half-stored entry
    assert (job / "masks" / "dynamic_0001.png").is_file()


# --------------------------------------------------------------------------------------------
# non-finite scene tokens
# --------------------------------------------------------------------------------------------


def planted_latent(geo_feat: torch.Tensor, position: torch.Tensor | None = None) -> SceneLatent:
    """Four tokens of two frames with the given features (other fields plain)."""
    tokens = len(geo_feat)
    aggregates = VoxelAggregates(
        count=torch.ones(tokens, dtype=torch.int64),
        position=torch.zeros(tokens, 3) if position is None else position,
        color=torch.full((tokens, 3), 0.5), first_frame=torch.zeros(tokens, dtype=torch.int64),
        last_frame=torch.ones(tokens, dtype=torch.int64),
        frames_seen=torch.full((tokens,), 2, dtype=torch.int64),
        dynamic=torch.zeros(tokens), dynamic_prob=torch.zeros(tokens),
        time_emb=torch.zeros(tokens, 8), cam_emb=torch.zeros(tokens, 16))
    return SceneLatent(
        geo_feat=geo_feat, coord=torch.arange(tokens * 3).reshape(tokens, 3),
        aggregates=aggregates, time_bin=None,
        pixel_voxel=torch.zeros(2, 2, 2, dtype=torch.int32), world_to_grid=torch.eye(4).double(),
        world_to_enc=torch.eye(4).double(), c2w=torch.zeros(2, 3, 4).double(),
        intrinsics=torch.eye(3).double().expand(2, 3, 3).clone(),
        meta={"grid_size": 0.05, "num_frames": 2})


FEATURES = torch.tensor([[0.5, -1.0], [2.0, 3.0], [0.25, 7.0], [-4.0, 1.5]])


@pytest.mark.parametrize(("field", "row", "value"), [
    ("geo_feat", 2, float("nan")), ("geo_feat", 1, float("inf")),
    ("position", 3, float("-inf"))])
def test_non_finite_tokens_are_refused_naming_where(tmp_path, field, row, value):
    features, position = FEATURES.clone(), torch.zeros(4, 3)
    (features if field == "geo_feat" else position)[row, 0] = value
    path = tmp_path / "scene_latent.pt"
    with pytest.raises(UserError) as info:
        write_latent(path, planted_latent(features, position), torch.float16)
    message = str(info.value)
    assert "\n" not in message and message.startswith("scene_latent.pt not written")
    assert f"{field} holds 1 NaN/inf values in 1 of 4 rows (first: row {row})" in message
    assert not list(tmp_path.iterdir())  # nothing written, no temporary file


def test_values_beyond_fp16_are_kept_in_fp32_with_a_warning(tmp_path, caplog):
    features = FEATURES.clone()
    features[1, 1] = 70000.0  # fp16's largest finite value is 65504
    latent = planted_latent(features)
    path = tmp_path / "scene_latent.pt"
    write_latent(path, latent, torch.float16)
    saved = torch.load(path, weights_only=True)
    assert saved["geo_feat"].dtype == torch.float32
    assert saved["geo_feat"].tolist() == features.tolist()
    assert saved["color"].dtype == torch.float16  # only the tensor that overflows is kept
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "geo_feat exceeds float16's range" in warnings[0]
    assert "7e+04" in warnings[0] and "float32" in warnings[0]
    caplog.clear()
    as_dict = planted_latent(FEATURES.clone()).to_dict(torch.float16)  # within range: fp16
    assert as_dict["geo_feat"].dtype == torch.float16 and not caplog.records
    assert as_dict["geo_feat"].tolist() == FEATURES.tolist()  # exactly representable


def _planted_encoder(path: Path, plant) -> Path:
    from vggt4d.ptv3.checkpoint import save_checkpoint
    from vggt4d.ptv3.model import VARIANTS, PTv3Encoder

    torch.manual_seed(0)
    encoder = PTv3Encoder(VARIANTS["tiny"])
    with torch.no_grad():
        plant(encoder.state_dict())
    return save_checkpoint(path, encoder)


def test_an_encoder_checkpoint_that_overflows_through_the_runner(tmp_path):
    """A checkpoint whose residual MLP biases are 1e5 gives fp16-overflowing features (kept in
    fp32, one warning); one with a NaN bias gives NaN features (refused after DA3: the
    prediction stays, run.log ends with the line)."""
    def huge(state):
        for name in state:
            if name.endswith("mlp.0.fc2.bias"):
                state[name].fill_(1e5)

    def nan(state):
        state["embedding.stem.linear.bias"][3] = float("nan")

    base = [*BASE, "pipeline=[predict,latent]", "latent.encoder=tiny"]
    kept = run_cli(tmp_path, tmp_path / "huge", *base,
                   f"latent.weights={_planted_encoder(tmp_path / 'huge.pth', huge)}")
    assert kept.returncode == 0, kept.stderr
    warnings = [w for w in warning_lines(kept) if "scene_latent.pt" in w]
    assert len(warnings) == 1 and "geo_feat exceeds float16's range" in warnings[0]
    tokens = torch.load(tmp_path / "huge" / "scene_latent.pt", weights_only=True)
    assert tokens["geo_feat"].dtype == torch.float32
    assert tokens["geo_feat"].abs().max() > 65504 and torch.isfinite(tokens["geo_feat"]).all()

    job = tmp_path / "nan"
    line = error_line(run_cli(tmp_path, job, *base,
                              f"latent.weights={_planted_encoder(tmp_path / 'nan.pth', nan)}"))
    assert "scene_latent.pt not written: geo_feat holds" in line and "(first: row 0)" in line
    assert (job / "prediction.npz").is_file() and not (job / "scene_latent.pt").exists()
    assert not temporary_files(job)
    assert line.removeprefix("error: ") in (job / "run.log").read_text().splitlines()[-1]
