"""The result cache: restored outputs are the job's own, damaged entries are found and
recomputed, a cache that cannot be written only warns, identical runs give identical bytes.

Most cases use a stand-in stage whose result is known bytes (hashed here with hashlib, not with
the cache's own digest); the in-place edit and the byte-identical runs use the real pipeline.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from tests.filesystems import read_only, refuse_writes, tiny_disk
from vggt4d.cache import Cache, content_key
from vggt4d.io import atomic_write
from vggt4d.pipeline import Context, execute
from vggt4d.stage import Stage

REPO = Path(__file__).resolve().parents[1]
RESULT = np.random.default_rng(7).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
PART = b"second file of the result\n" * 40
FILES = {"result.bin": RESULT, "sub/part.bin": PART}
KEY = "k1"


class KnownBytes(Stage):
    """A cached stage whose result is :data:`FILES`; counts how often it really runs."""

    name = "fake"
    provides = ("payload",)

    def __init__(self) -> None:
        self.runs = 0

    def cache_key(self, ctx) -> str:
        return KEY

    def outputs(self, ctx) -> tuple[str, ...]:
        return tuple(FILES)

    def run(self, ctx) -> None:
        self.runs += 1
        for name, content in FILES.items():
            atomic_write(ctx.out_dir / name, lambda tmp, content=content: tmp.write_bytes(content))
        ctx.artifacts["payload"] = RESULT

    def load(self, ctx) -> None:
        ctx.artifacts["payload"] = (ctx.out_dir / "result.bin").read_bytes()


def job(root: Path, out_dir: Path) -> tuple[KnownBytes, Context]:
    """One job of the stand-in stage with a fresh :class:`Cache` on ``root`` (as a new
    process would have)."""
    stage = KnownBytes()
    ctx = Context(cfg=None, out_dir=out_dir, cache=Cache(root))
    out_dir.mkdir(parents=True, exist_ok=True)
    execute([stage], ctx)
    return stage, ctx


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def job_files(out_dir: Path) -> dict[str, bytes]:
    """Every file of a job folder (temporary files included) by relative path."""
    return {p.relative_to(out_dir).as_posix(): p.read_bytes()
            for p in sorted(out_dir.rglob("*")) if p.is_file()}


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its SHA-256 (a snapshot to compare)."""
    return {p.relative_to(root).as_posix(): sha(p) for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture
def stored(tmp_path) -> Path:
    """A cache root holding the stand-in stage's entry."""
    root = tmp_path / "cache"
    stage, _ = job(root, tmp_path / "first")
    assert stage.runs == 1 and (root / "fake" / KEY / "manifest.json").is_file()
    return root


# --------------------------------------------------------------------------------------------
# outputs never share storage with the cache
# --------------------------------------------------------------------------------------------


def test_restored_files_are_copies_an_edit_reaches_neither_the_cache_nor_other_jobs(
        stored, tmp_path, caplog):
    entry = stored / "fake" / KEY
    stage_b, ctx_b = job(stored, tmp_path / "b")
    stage_c, _ = job(stored, tmp_path / "c")
    assert stage_b.runs == stage_c.runs == 0 and ctx_b.artifacts["payload"] == RESULT
    for name in FILES:
        cached, b, c = (os.stat(folder / name) for folder in (entry, tmp_path / "b",
                                                               tmp_path / "c"))
        assert len({cached.st_ino, b.st_ino, c.st_ino}) == 3, name
        assert b.st_nlink == c.st_nlink == 1
    with open(tmp_path / "b" / "result.bin", "r+b") as handle:  # edit in place
        handle.seek(1000)
        handle.write(b"EDITED")
    assert (entry / "result.bin").read_bytes() == RESULT
    assert (tmp_path / "c" / "result.bin").read_bytes() == RESULT
    assert (tmp_path / "first" / "result.bin").read_bytes() == RESULT
    stage_d, _ = job(stored, tmp_path / "d")
    assert stage_d.runs == 0 and job_files(tmp_path / "d") == FILES
    assert not warnings_of(caplog)


def test_editing_real_outputs_changes_neither_the_cache_nor_another_job(tmp_path, caplog):
    """prediction.npz, gram_stats.safetensors and scene_latent.pt of a restored job edited in
    place: the cache, the job that computed them and a later job keep the original bytes."""
    from vggt4d.run import run_job

    overrides = ["model=da3-small", "model.weights=random", "process_res=56", "logger=none",
                 "data.num_frames=3", "pipeline=[predict,gram,latent]", "latent.encoder=tiny",
                 "latent.weights=random", f"cache_dir={tmp_path / 'cache'}"]
    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run_job(cfg, tmp_path / "a")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_job(cfg, tmp_path / "b")
    reused = [r.getMessage() for r in caplog.records if "reused cached result" in r.getMessage()]
    assert len(reused) == 2, reused  # predict (with the Gram statistics) and latent
    names = ("prediction.npz", "gram_stats.safetensors", "scene_latent.pt")
    entries = [p.parent for p in (tmp_path / "cache").rglob("manifest.json")]
    cache_before, original = tree(tmp_path / "cache"), {n: sha(tmp_path / "a" / n) for n in names}
    for name in names:
        path = tmp_path / "b" / name
        assert all(os.stat(e / name).st_ino != path.stat().st_ino for e in entries
                   if (e / name).exists())
        with open(path, "r+b") as handle:
            handle.seek(path.stat().st_size // 2)
            handle.write(b"\xff" * 16)
        assert sha(path) != original[name]
    assert tree(tmp_path / "cache") == cache_before
    assert {n: sha(tmp_path / "a" / n) for n in names} == original
    caplog.clear()
    run_job(cfg, tmp_path / "c")
    assert {n: sha(tmp_path / "c" / n) for n in names} == original
    assert not any(" is corrupt (" in m for m in warnings_of(caplog))


# --------------------------------------------------------------------------------------------
# damaged entries
# --------------------------------------------------------------------------------------------


def _truncate(entry: Path) -> None:
    (entry / "result.bin").write_bytes(RESULT[: len(RESULT) // 2])


def _flip_a_byte(entry: Path) -> None:
    data = bytearray(RESULT)
    data[len(data) // 2] ^= 0x01
    (entry / "result.bin").write_bytes(bytes(data))


def _no_manifest(entry: Path) -> None:
    (entry / "manifest.json").unlink()  # an interrupted write, or a cache of the old layout


def _garbled_manifest(entry: Path) -> None:
    (entry / "manifest.json").write_text('{"version": 1, "fil')


def _missing_file(entry: Path) -> None:
    (entry / "sub" / "part.bin").unlink()


def _other_files(entry: Path) -> None:
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["files"].pop("sub/part.bin")
    (entry / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(("damage", "reason"), [
    (_truncate, "result.bin differs from its manifest (150000 bytes, the manifest says 300000)"),
    (_flip_a_byte, "result.bin differs from its manifest (its SHA-256 differs)"),
    (_no_manifest, "no manifest (an interrupted or older write)"),
    (_garbled_manifest, "unreadable manifest"),
    (_missing_file, "part.bin is missing"),
    (_other_files, "its manifest lists other files"),
], ids=lambda f: f.__name__.strip("_") if callable(f) else "")
def test_a_damaged_entry_is_one_warning_then_recomputed_and_stored_again(
        stored, tmp_path, caplog, damage, reason):
    entry = stored / "fake" / KEY
    damage(entry)
    stage, ctx = job(stored, tmp_path / "job")
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and f"{entry} is corrupt ({reason}" in warnings[0], warnings
    assert warnings[0].endswith("removed; recomputing")
    assert stage.runs == 1 and ctx.artifacts["payload"] == RESULT
    assert job_files(tmp_path / "job") == FILES  # fresh, complete, no temporary files
    assert {p.name for p in (stored / "fake").iterdir()} == {KEY, f".{KEY}.lock"}
    caplog.clear()
    again, _ = job(stored, tmp_path / "later")
    assert again.runs == 0 and not warnings_of(caplog)
    assert job_files(tmp_path / "later") == FILES


def test_restoring_into_a_full_output_disk_is_an_output_error_without_leftovers(stored,
                                                                                 tmp_path):
    """The job's folder, not the cache, is full: that is the user's error to fix (one line),
    and the entry stays as it was."""
    from vggt4d.io import OutputError

    before = tree(stored)
    out = tmp_path / "job"
    with refuse_writes((str(out), errno.ENOSPC, "result.bin")), \
            pytest.raises(OutputError) as info:
        job(stored, out)
    assert str(info.value).startswith(f"cannot write {out / 'result.bin'}: the disk is full")
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert tree(stored) == before


# --------------------------------------------------------------------------------------------
# caches that cannot be written
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=["mounted", "simulated"])
def make_read_only(request):
    """Make a folder read-only: a real read-only bind mount, or refused writes (always)."""
    if request.param == "mounted":
        return read_only
    return lambda root: refuse_writes((str(root), errno.EROFS, ""))


def test_a_read_only_cache_holding_the_entry_is_used_as_it_is(stored, tmp_path, caplog,
                                                               make_read_only):
    before = tree(stored)
    with make_read_only(stored):
        stage, ctx = job(stored, tmp_path / "job")
    assert stage.runs == 0 and ctx.artifacts["payload"] == RESULT
    assert job_files(tmp_path / "job") == FILES
    assert not warnings_of(caplog)  # no lock was needed to read it
    assert tree(stored) == before


def test_a_read_only_cache_without_the_entry_warns_once_and_the_job_completes(
        tmp_path, caplog, make_read_only):
    root = tmp_path / "cache"
    root.mkdir()
    with make_read_only(root):
        stage, _ = job(root, tmp_path / "job")
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and str(root) in warnings[0] and "not stored" in warnings[0]
    assert "not writable" in warnings[0] or "Read-only" in warnings[0]
    assert stage.runs == 1 and job_files(tmp_path / "job") == FILES
    assert not any(root.iterdir())


def test_a_corrupt_entry_in_a_read_only_cache_is_left_and_the_job_recomputes(
        stored, tmp_path, caplog, make_read_only):
    entry = stored / "fake" / KEY
    _flip_a_byte(entry)
    with make_read_only(stored):
        stage, _ = job(stored, tmp_path / "job")
    corrupt = [m for m in warnings_of(caplog) if f"{entry} is corrupt (" in m]
    assert len(corrupt) == 1 and "left in place" in corrupt[0]
    assert stage.runs == 1 and job_files(tmp_path / "job") == FILES


@pytest.fixture(params=["mounted", "simulated"])
def full_cache_disk(request, tmp_path):
    """A cache root on a disk with room for 64 KiB (the result is 300 kB): a real tmpfs, or
    ENOSPC for every file of the result written under the root."""
    root = tmp_path / "cache"
    if request.param == "mounted":
        with tiny_disk(root, 64):
            yield root
    else:
        root.mkdir()
        with refuse_writes((str(root), errno.ENOSPC, ".bin")):
            yield root


def test_a_full_cache_disk_warns_once_and_the_job_completes(full_cache_disk, tmp_path, caplog):
    root = full_cache_disk
    stage, _ = job(root, tmp_path / "job")
    warnings = warnings_of(caplog)
    assert len(warnings) == 1, warnings
    assert str(root / "fake") in warnings[0] and "disk is full" in warnings[0]
    assert "without storing" in warnings[0]
    assert stage.runs == 1 and job_files(tmp_path / "job") == FILES
    assert [p.name for p in (root / "fake").iterdir()] == [f".{KEY}.lock"]  # nothing half-stored
    caplog.clear()
    again, _ = job(root, tmp_path / "again")  # nothing was stored: computed again, not reused
    assert again.runs == 1 and job_files(tmp_path / "again") == FILES


# --------------------------------------------------------------------------------------------
# identical inputs and seed, independent runs: identical bytes
# --------------------------------------------------------------------------------------------


BOOKKEEPING = {"run.log", "timings.json", "scene.rrd"}
"""Files that differ between identical runs by design: the log, the stage times, and the Rerun
recording, whose chunk and recording ids are made from the clock (Rerun's format); the
recording's content is compared instead."""


def test_two_independent_runs_write_byte_identical_results(tmp_path):
    """Every result file (prediction.npz, gram_stats.safetensors, masks, pictures, videos,
    scene_latent.pt, ...) of two runs with separate caches and hash seeds, compared with cmp;
    scene.rrd compared by what it holds."""
    from tests.test_export_recording import read_recording

    overrides = ["model=da3-small", "model.weights=random", "process_res=42", "logger=none",
                 "data.num_frames=2", "latent.encoder=tiny", "latent.weights=random", "seed=3",
                 "pipeline=[predict,gram,maps,masks,viz,eval,latent,export]",
                 "export.formats=[rerun,tum,colmap,nerfstudio]"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    runs = [subprocess.Popen([sys.executable, "-m", "vggt4d.run",
                              f"hydra.run.dir={tmp_path / name}",
                              f"cache_dir={tmp_path / f'cache_{name}'}", *overrides],
                             cwd=REPO, env={**env, "PYTHONHASHSEED": str(seed)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, seed in (("a", 1), ("b", 2))]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err

    def results(job: Path) -> set[str]:
        return {p.relative_to(job).as_posix() for p in job.rglob("*")
                if p.is_file() and ".hydra" not in p.parts and p.name not in BOOKKEEPING}

    files = results(tmp_path / "a")
    assert files == results(tmp_path / "b")
    for name in ("prediction.npz", "gram_stats.safetensors", "dynamic_maps.safetensors",
                 "scene_latent.pt", "metrics.json", "masks/dynamic_0000.png"):
        assert name in files
    assert any(name.endswith(".mp4") for name in files)
    differ = [name for name in sorted(files)
              if subprocess.run(["cmp", "-s", str(tmp_path / "a" / name),
                                 str(tmp_path / "b" / name)]).returncode != 0]
    assert not differ, f"files that differ between identical runs: {differ}"
    recordings = [read_recording(tmp_path / job / "scene.rrd") for job in ("a", "b")]
    for recording in recordings:
        assert recording.pop(("/__properties", "RecordingInfo:start_time"))  # the clock
    assert len(recordings[0]) > 20 and recordings[0] == recordings[1]


def test_a_half_filled_entry_of_a_killed_writer_is_removed_when_the_key_is_stored(tmp_path):
    """A writer killed while filling an entry leaves its temporary folder; the next job that
    stores the key (holding its lock) removes it, and leaves other keys' folders alone."""
    root = tmp_path / "cache"
    killed = root / "fake" / f".{KEY}.x1y2z3"
    other = root / "fake" / ".k2.a1b2c3"
    for folder in (killed, other):
        folder.mkdir(parents=True)
        (folder / "result.bin").write_bytes(RESULT[:1000])
    stage, _ = job(root, tmp_path / "job")
    assert stage.runs == 1
    assert not killed.exists() and other.is_dir()
    assert sorted(p.name for p in (root / "fake").iterdir()) == [".k1.lock", ".k2.a1b2c3", KEY]
    stored = job_files(root / "fake" / KEY)
    assert {name: stored[name] for name in FILES} == FILES


def test_an_array_in_a_key_counts_by_its_bytes_in_c_order(tmp_path):
    """An array, its bytes, a memory map of them and a strided view's copy give one key; one
    changed element gives another."""
    values = np.random.default_rng(3).random((4, 6, 5)).astype(np.float32)
    mapped = np.lib.format.open_memmap(tmp_path / "values.npy", mode="w+", dtype=np.float32,
                                       shape=values.shape)
    mapped[:] = values
    key = content_key("masks", values.tobytes())
    assert content_key("masks", values) == content_key("masks", mapped) == key
    assert content_key(values[:, ::2]) == content_key(values[:, ::2].copy().tobytes())
    changed = values.copy()
    changed[3, 5, 4] += 1
    assert content_key("masks", changed) != key
