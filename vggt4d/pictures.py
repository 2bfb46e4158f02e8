"""The pictures stage: colour-mapped maps per frame, overlays, contact sheets and videos.

Written under the job directory, named like the user's files so their habits carry over:
- ``maps/layer_{L:02d}_frame{t:03d}_{similarity,inv_similarity,variance,stability}.png``
  (Easi3R maps of the chosen layers), ``maps/cues_frame{t:03d}_{w_shallow,w_middle,w_deep}.png``,
  ``maps/fused_frame{t:03d}_final_mask.png`` (the soft dynamic map);
- ``overlays/mask_frame{t:03d}_overlay.png``: the binary mask over the frame;
- ``contact/frame{t:03d}_{statistic}.png``: every layer side by side for one frame — the picture
  to look at first when choosing bands;
- ``videos/<folder>/<series>.mp4``: one video per PNG series (:mod:`vggt4d.videos`).
"""

from __future__ import annotations

import logging

import numpy as np
from torch import Tensor
from tqdm import tqdm

from vggt4d.config import band_layers
from vggt4d.gram import PAIRS, STATS, stat_key
from vggt4d.maps import CUES, EASI3R_MAPS, normalize, per_frame_maps
from vggt4d.postprocess import spatial_gaussian, upsample_bilinear
from vggt4d.videos import make_all_videos
from vggt4d.viz import colorize, contact_sheet, overlay_mask, write_png

log = logging.getLogger(__name__)


def picture_layers(layers: list[int], bands) -> list[int]:
    """Layers that get per-frame PNGs: the configured ones, or the first block of each band."""
    return sorted(set(layers) or {band[0] for band in band_layers(bands).values()})


def sheet_frames(frames: list[int], num_frames: int) -> list[int]:
    """Frames that get contact sheets: the configured ones (in range), or the middle frame."""
    chosen = [t for t in frames if 0 <= t < num_frames] or [num_frames // 2]
    return sorted(set(chosen))


def heatmaps(maps: Tensor, size: tuple[int, int], power: float = 1.0,
             blur: float = 0.0) -> np.ndarray:
    """(T, h, w) maps in [0, 1] → (T, H, W) for display: raised to ``power``, upsampled, and
    blurred with σ = ``blur``·W (the user's heatmaps: power 1.5, σ ≈ 0.02·W)."""
    frames = upsample_bilinear(maps.clamp(0, 1).numpy() ** power, size)
    return spatial_gaussian(frames, blur * size[1]) if blur > 0 else frames


def write_series(folder, prefix: str, suffix: str, maps: Tensor, size: tuple[int, int],
                 viz) -> None:
    """One colour-mapped PNG per frame at ``size`` (H, W)."""
    for t, values in enumerate(heatmaps(maps, size, viz.power, viz.blur)):
        write_png(folder / f"{prefix}_frame{t:03d}_{suffix}.png", colorize(values, viz.cmap))


def statistic_sheets(stats: dict[str, Tensor], easi3r: dict[int, dict[str, Tensor]],
                     frame: int, cmap: str) -> dict[str, np.ndarray]:
    """One contact sheet per statistic for ``frame``: Easi3R maps and each normalised raw
    Gram statistic, all layers side by side."""
    layers = sorted(easi3r)
    labels = [f"L{layer:02d}" for layer in layers]
    sheets = {}
    for name in EASI3R_MAPS:
        panels = [colorize(easi3r[layer][name][frame].numpy(), cmap) for layer in layers]
        sheets[name] = contact_sheet(panels, labels, f"{name}, frame {frame}")
    for pair in PAIRS:
        for stat in STATS:
            if stat_key(pair, stat, layers[0]) not in stats:
                continue
            panels = [colorize(normalize(per_frame_maps(stats, stat_key(pair, stat, layer)))
                               [frame].numpy(), cmap) for layer in layers]
            sheets[f"{pair}_{stat}"] = contact_sheet(panels, labels,
                                                     f"{pair} {stat}, frame {frame}")
    return sheets


class PicturesStage:
    """Maps and masks → PNGs, contact sheets and videos (nothing here feeds later stages)."""

    name = "viz"
    requires = ("gram_stats", "maps", "masks", "prediction")
    provides: tuple[str, ...] = ()
    files: tuple[str, ...] = ()

    def check(self, ctx) -> None:
        """Layers and fps are checked with the config."""

    def cache_key(self, ctx) -> None:
        return None

    def run(self, ctx) -> None:
        cfg = ctx.cfg.viz
        out = ctx.out_dir
        maps, masks = ctx.artifacts["maps"], ctx.artifacts["masks"]
        frames = ctx.artifacts["prediction"].frames
        size = frames.shape[1:3]
        layers = [layer for layer in picture_layers(cfg.layers, ctx.cfg.bands)
                  if layer in maps.easi3r]
        series = [(f"layer_{layer:02d}", name, maps.easi3r[layer][name])
                  for layer in layers for name in EASI3R_MAPS]
        series += [("cues", name, maps.cues[name]) for name in CUES]
        series.append(("fused", "final_mask", maps.dynamic))
        for prefix, suffix, values in tqdm(series, desc="pictures", unit="series", leave=False):
            write_series(out / "maps", prefix, suffix, values, size, cfg)
        for t, (frame, mask) in enumerate(zip(frames, masks.binary, strict=True)):
            write_png(out / "overlays" / f"mask_frame{t:03d}_overlay.png",
                      overlay_mask(frame, mask))
        for t in sheet_frames(cfg.sheet_frames, len(frames)):
            sheets = statistic_sheets(ctx.artifacts["gram_stats"], maps.easi3r, t, cfg.cmap)
            for name, sheet in sheets.items():
                write_png(out / "contact" / f"frame{t:03d}_{name}.png", sheet)
        if cfg.videos:
            make_all_videos(out, cfg.fps, out / "videos", progress=False)
        log.info("viz: %d map series, overlays, contact sheets%s -> %s", len(series),
                 ", videos" if cfg.videos else "", out)

    def load(self, ctx) -> None:
        self.run(ctx)
