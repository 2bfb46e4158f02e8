"""The masks stage in blocks of frames: the masks of the whole-clip recipe, memory that does not
grow with the clip, a full disk as one line."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

from tests.memory import MIB, anonymous_peak, in_fresh_process
from vggt4d import masks as masks_module
from vggt4d.config import validate
from vggt4d.io import OutputError
from vggt4d.maps import DynamicMaps
from vggt4d.masks import MasksStage, soft_masks
from vggt4d.masks import frame_steps as soft_frame_steps
from vggt4d.pipeline import Context
from vggt4d.postprocess import binarize
from vggt4d.predict import Prediction

GRID = (6, 8)
SIZE = (42, 56)  # 7 pixels a patch


def run_config(*overrides: str):
    with initialize_config_module("conf", version_base="1.3"):
        return validate(compose("config", overrides=["model=da3-small", *overrides]))


def clip(num_frames: int, seed: int = 0) -> tuple[Prediction, DynamicMaps]:
    """Smooth random patch maps with a moving bright blob, random frames and depth."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:GRID[0], 0:GRID[1]]
    centre = np.stack([np.full(num_frames, 2.5), 1.0 + 6.0 * np.arange(num_frames)
                       / max(1, num_frames - 1)], axis=1)
    blob = np.exp(-((rows - centre[:, :1, None]) ** 2 + (cols - centre[:, 1:, None]) ** 2) / 2)
    dynamic = (0.8 * blob + 0.2 * rng.random((num_frames, *GRID))).astype(np.float32)
    frames = rng.integers(0, 256, (num_frames, *SIZE, 3), dtype=np.uint8)
    depth = (1.0 + rng.random((num_frames, *SIZE))).astype(np.float32)
    prediction = Prediction(depth=depth, conf=np.ones_like(depth), frames=frames,
                            extrinsics=np.zeros((num_frames, 3, 4), np.float32),
                            intrinsics=np.zeros((num_frames, 3, 3), np.float32), grid=GRID)
    return prediction, DynamicMaps(cues={}, dynamic=torch.from_numpy(dynamic), easi3r={})


def run_masks_stage(out_dir: Path, prediction: Prediction, maps: DynamicMaps, *overrides: str):
    ctx = Context(run_config(*overrides), out_dir, None,
                  artifacts={"prediction": prediction, "maps": maps})
    MasksStage().run(ctx)
    return ctx.artifacts["masks"]


SETTINGS = {
    "multi_otsu": ("masks.binarize=multi_otsu", "masks.upsample=guided", "masks.guide=rgbd",
                   "masks.temporal_sigma=1.0", "masks.morph_after=[close:3]"),
    "otsu": ("masks.binarize=otsu", "masks.upsample=guided", "masks.guide=grey_depth",
             "masks.empty_below_max=0.8"),
    "mean_above": ("masks.binarize=mean_above", "masks.threshold=0.2",
                   "masks.morph_before=[open:3]"),
    "hysteresis": ("masks.binarize=hysteresis", "masks.low=0.35", "masks.high=0.7",
                   "masks.spatial_sigma=0.5"),
}


@pytest.mark.parametrize("method", SETTINGS)
def test_blocks_of_frames_give_the_masks_of_the_whole_clip(tmp_path, monkeypatch, method):
    """Blocks of 3 frames (the last one short) against the recipe on the whole clip at once:
    the same soft maps, masks, pictures and thresholds (the multi-Otsu scores to rounding)."""
    monkeypatch.setattr(masks_module, "BLOCK_PIXELS", 3 * SIZE[0] * SIZE[1] + 5)
    block_sizes = []

    def frame_steps(patch, *args):
        block_sizes.append(len(patch))
        return soft_frame_steps(patch, *args)

    monkeypatch.setattr(masks_module, "frame_steps", frame_steps)
    prediction, maps = clip(11)
    result = run_masks_stage(tmp_path, prediction, maps, *SETTINGS[method])
    assert block_sizes == [3, 3, 3, 2]
    settings = run_config(*SETTINGS[method]).masks
    soft = soft_masks(maps.dynamic.numpy(), prediction.frames, prediction.depth, settings)
    binary, info = binarize(soft, settings.binarize, threshold=settings.threshold,
                            low=settings.low, high=settings.high)
    flat = soft.reshape(len(soft), -1)
    weak = (flat.mean(axis=1) < settings.empty_below_mean) | \
        (flat.max(axis=1) < settings.empty_below_max)
    binary[weak] = False
    np.testing.assert_array_equal(result.soft, soft)
    np.testing.assert_array_equal(result.binary, binary)
    assert 0 < binary.mean() < 0.5
    if method == "otsu":
        assert 0 < weak.sum() < len(weak)
    written = json.loads((tmp_path / "masks" / "binarize.json").read_text())
    scores = written.pop("scores", {})
    expected = {**info, "emptied_frames": np.flatnonzero(weak).tolist()}
    for n, score in expected.pop("scores", {}).items():
        assert scores[n] == pytest.approx(score, rel=1e-12)
    assert written == expected
    for t in range(len(binary)):
        png = np.asarray(Image.open(tmp_path / "masks" / f"dynamic_{t:04d}.png"))
        np.testing.assert_array_equal(png == 255, binary[t])
    assert sorted(p.name for p in (tmp_path / "masks").iterdir() if p.name.startswith(".")) \
        == []  # the scratch files have no names


def masks_stage_growth(num_frames: int, out: str) -> int:
    """Peak anonymous memory of the masks stage (multi-Otsu, guided RGB-D filter) on a
    ``num_frames`` clip made beforehand, in blocks of 8 frames; run in a fresh process."""
    masks_module.BLOCK_PIXELS = 8 * SIZE[0] * SIZE[1]
    prediction, maps = clip(2)
    overrides = SETTINGS["multi_otsu"]
    run_masks_stage(Path(out) / "warm", prediction, maps, *overrides)  # imports, first use
    prediction, maps = clip(num_frames)
    return anonymous_peak(lambda: run_masks_stage(Path(out) / "job", prediction, maps,
                                                  *overrides))


def test_masks_stage_memory_does_not_grow_with_the_clip(tmp_path):
    """32 times the frames: the same peak, where holding the clip's soft maps and the
    multi-Otsu's float64 values and labels (~20 bytes a pixel) would add 45 MiB."""
    growth = {num_frames: in_fresh_process("tests.test_masks_stage", "masks_stage_growth",
                                           num_frames, str(tmp_path / str(num_frames)))
              for num_frames in (32, 1024)}
    assert 20 * (1024 - 32) * SIZE[0] * SIZE[1] > 5 * 8 * MIB
    assert growth[1024] < growth[32] + 8 * MIB, growth


def test_a_full_disk_for_the_scratch_maps_is_one_line(tmp_path, monkeypatch):
    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("vggt4d.io.os.posix_fallocate", full)
    prediction, maps = clip(3)
    with pytest.raises(OutputError, match=r"cannot write .*masks/\.scratch: the disk is full"):
        run_masks_stage(tmp_path, prediction, maps)
