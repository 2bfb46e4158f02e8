"""The pictures stage draws a block of frames at a time: the same files as drawing the whole
clip at once, and memory that does not grow with the clip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tests.memory import MIB, anonymous_peak, in_fresh_process
from tests.test_masks_stage import SIZE, clip, run_config
from vggt4d import pictures
from vggt4d.masks import DynamicMasks
from vggt4d.pipeline import Context
from vggt4d.viz import colorize, overlay_mask


def pictures_context(out_dir: Path, num_frames: int, *overrides: str) -> Context:
    """The pictures stage's inputs for a clip of ``num_frames`` (a cue, the fused map, masks)."""
    prediction, maps = clip(num_frames)
    maps.cues = {"w_deep": maps.dynamic.flip(0)}
    binary = maps.dynamic.numpy().repeat(7, 1).repeat(7, 2) > 0.5
    return Context(run_config(*overrides), out_dir, None, artifacts={
        "prediction": prediction, "maps": maps,
        "masks": DynamicMasks(binary.astype(np.float32), binary, {})})


def test_blocks_of_frames_draw_the_pictures_of_the_whole_clip(tmp_path, monkeypatch):
    """Blocks of 2 frames against colouring each upsampled, blurred map of the whole clip."""
    monkeypatch.setattr(pictures, "BLOCK_PIXELS", 2 * SIZE[0] * SIZE[1])
    pictures.PicturesStage().run(pictures_context(tmp_path, 5, "viz.power=1.5", "viz.blur=0.05"))
    prediction, maps = clip(5)
    cfg = run_config().viz
    whole = pictures.heatmaps(maps.dynamic, SIZE, power=1.5, blur=0.05)
    binary = maps.dynamic.numpy().repeat(7, 1).repeat(7, 2) > 0.5
    for t in range(5):
        drawn = np.asarray(Image.open(tmp_path / "maps" / f"fused_frame{t:03d}_final_mask.png"))
        np.testing.assert_array_equal(drawn, colorize(whole[t], cfg.cmap))
        overlay = np.asarray(Image.open(tmp_path / "overlays" / f"mask_frame{t:03d}_overlay.png"))
        np.testing.assert_array_equal(overlay, overlay_mask(prediction.frames[t], binary[t]))
    for name in ("maps/fused_final_mask.mp4", "maps/cues_w_deep.mp4", "overlays/mask_overlay.mp4"):
        assert (tmp_path / "videos" / name).stat().st_size > 0


def pictures_stage_growth(num_frames: int, out: str) -> int:
    """Peak anonymous memory of the pictures stage (videos on) on a ``num_frames`` clip; run in
    a fresh process."""
    pictures.BLOCK_PIXELS = 8 * SIZE[0] * SIZE[1]
    pictures.PicturesStage().run(pictures_context(Path(out) / "warm", 2))  # imports, first use
    ctx = pictures_context(Path(out) / "job", num_frames)
    return anonymous_peak(lambda: pictures.PicturesStage().run(ctx))


def test_pictures_stage_memory_does_not_grow_with_the_clip(tmp_path):
    """16 times the frames: the same peak (within 4 MiB), where drawing each series whole (its
    uint8 RGB frames and float32 heatmaps, two series at once) added 11 MiB."""
    growth = {n: in_fresh_process("tests.test_pictures", "pictures_stage_growth", n,
                                  str(tmp_path / str(n))) for n in (32, 512)}
    assert growth[512] < growth[32] + 4 * MIB, growth
