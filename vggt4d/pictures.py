"""The pictures stages: colour-mapped maps per frame, overlays, contact sheets and videos.

Written under the job directory, named like the AnyDynamics research scripts' files:
- ``maps/layer_{L:02d}_frame{t:03d}_{similarity,inv_similarity,variance,stability}.png``
  (Easi3R maps of the chosen layers), ``maps/cues_frame{t:03d}_{w_shallow,w_middle,w_deep}.png``,
  ``maps/fused_frame{t:03d}_final_mask.png`` (the soft dynamic map);
- ``overlays/mask_frame{t:03d}_overlay.png``: the binary mask over the frame;
- ``contact/frame{t:03d}_{statistic}.png``: every layer side by side for one frame — the picture
  to look at first when choosing bands;
- ``videos/<folder>/<series>.mp4``: one video per PNG series.
The per-layer pictures (``layer_viz``) depend on the statistics but not on bands, fusion or
masks, so they are cached layer by layer: a band sweep draws each layer once.
"""

from __future__ import annotations

import collections
import hashlib
import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from torch import Tensor

from vggt4d.cache import content_key
from vggt4d.config.maps import Cue
from vggt4d.config.model import band_layers
from vggt4d.gram import PAIRS, STATS, stat_key
from vggt4d.maps import EASI3R_MAPS, normalize, per_frame_maps
from vggt4d.points import frame_blocks
from vggt4d.postprocess import spatial_gaussian, upsample_bilinear
from vggt4d.stage import Stage
from vggt4d.viz import colorize, contact_sheet, overlay_mask, write_png, write_video

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
    blurred with σ = ``blur``·W (the research scripts' heatmaps: power 1.5, σ ≈ 0.02·W)."""
    frames = upsample_bilinear(maps.clamp(0, 1).numpy() ** power, size)
    return spatial_gaussian(frames, blur * size[1]) if blur > 0 else frames


def write_series(out: Path, folder: str, prefix: str, suffix: str,
                 images: Iterable[np.ndarray], viz) -> None:
    """``images`` ((H, W, 3) uint8 frames, consumed once) →
    ``<folder>/{prefix}_frame{t:03d}_{suffix}.png`` and, with ``viz.videos``,
    ``videos/<folder>/{prefix}_{suffix}.mp4`` from the same frames, each frame written to both
    as it comes."""
    def each_frame() -> Iterator[np.ndarray]:
        for t, image in enumerate(images):
            write_png(out / folder / f"{prefix}_frame{t:03d}_{suffix}.png", image)
            yield image

    if viz.videos:
        write_video(out / "videos" / folder / f"{prefix}_{suffix}.mp4", each_frame(), viz.fps)
    else:
        collections.deque(each_frame(), maxlen=0)


def write_all(out: Path, series: list[tuple[str, str, str, Iterable[np.ndarray]]],
              viz) -> None:
    """:func:`write_series` for each (folder, prefix, suffix, images), two at a time: zlib and
    the ffmpeg pipes release the GIL, so a second core overlaps the encoding."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        for done in [pool.submit(write_series, out, *item, viz) for item in series]:
            done.result()


BLOCK_PIXELS = 1 << 20
"""Frame pixels drawn at once (1 M: 4 MiB per float32 heatmap)."""


def map_images(maps: Tensor, size: tuple[int, int], viz) -> Iterator[np.ndarray]:
    """(T, h, w) maps → (H, W, 3) colour-mapped uint8 frames, made a block of frames at a time
    (:func:`heatmaps` works frame by frame)."""
    for frames in frame_blocks(len(maps), size[0] * size[1], BLOCK_PIXELS):
        for values in heatmaps(maps[frames.start:frames.stop], size, viz.power, viz.blur):
            yield colorize(values, viz.cmap)


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


def _layers_in(stats: dict[str, Tensor]) -> list[int]:
    return sorted({int(key.rsplit(".L", 1)[1]) for key in stats if key.startswith("qk.mean.L")})


class LayerPicturesStage(Stage):
    """Per-layer Easi3R map series, contact sheets and their videos. Each layer's series and
    the contact sheets are cached on their own (they depend on the statistics and picture
    settings, not on bands, fusion or masks): a band sweep draws every layer once, whichever
    band shows it."""

    name = "layer_viz"
    requires = ("gram_stats", "maps", "prediction")
    provides = ("layer_pictures",)

    @staticmethod
    def _plan(ctx) -> tuple[list[int], list[int]]:
        stats = ctx.artifacts["gram_stats"]
        frames = len(ctx.artifacts["prediction"].frames)
        layers = [i for i in picture_layers(ctx.cfg.viz.layers, ctx.cfg.bands)
                  if i in _layers_in(stats)]
        return layers, sheet_frames(ctx.cfg.viz.sheet_frames, frames)

    @staticmethod
    def _layer_files(ctx, layer: int) -> tuple[str, ...]:
        frames = len(ctx.artifacts["prediction"].frames)
        files = [f"maps/layer_{layer:02d}_frame{t:03d}_{name}.png"
                 for name in EASI3R_MAPS for t in range(frames)]
        if ctx.cfg.viz.videos:
            files += [f"videos/maps/layer_{layer:02d}_{name}.mp4" for name in EASI3R_MAPS]
        return tuple(files)

    @staticmethod
    def _sheet_files(ctx, sheets: list[int]) -> tuple[str, ...]:
        """The sheets depend on which statistics exist."""
        stats = ctx.artifacts["gram_stats"]
        names = [*EASI3R_MAPS, *(f"{p}_{s}" for p in PAIRS for s in STATS
                                 if any(k.startswith(f"{p}.{s}.L") for k in stats))]
        return tuple(f"contact/frame{t:03d}_{name}.png" for t in sheets for name in names)

    @staticmethod
    def _common_key(ctx) -> str:
        """Statistics file, frame size, normalisation and picture settings."""
        cfg = ctx.cfg
        statistics = hashlib.sha256((ctx.out_dir / "gram_stats.safetensors").read_bytes())
        return content_key(statistics.hexdigest(), ctx.artifacts["prediction"].frames.shape,
                           cfg.maps.normalize, list(cfg.maps.percentiles),
                           cfg.maps.normalize_scope, cfg.viz.cmap, cfg.viz.power, cfg.viz.blur,
                           cfg.viz.videos, cfg.viz.fps)

    def run(self, ctx) -> None:
        cfg = ctx.cfg
        size = ctx.artifacts["prediction"].frames.shape[1:3]
        easi3r = ctx.artifacts["maps"].easi3r
        layers, sheets = self._plan(ctx)
        common = self._common_key(ctx)

        def draw_layer(layer: int) -> None:
            write_all(ctx.out_dir, [("maps", f"layer_{layer:02d}", name,
                                     map_images(easi3r[layer][name], size, cfg.viz))
                                    for name in EASI3R_MAPS], cfg.viz)

        def draw_sheets() -> None:
            stats = ctx.artifacts["gram_stats"]
            for t in sheets:
                for name, sheet in statistic_sheets(stats, easi3r, t, cfg.viz.cmap).items():
                    write_png(ctx.out_dir / "contact" / f"frame{t:03d}_{name}.png", sheet)

        files, reused = [], []
        for layer in layers:
            names = self._layer_files(ctx, layer)
            if ctx.cache.reuse_or_compute(self.name, content_key(common, "layer", layer), names,
                                          ctx.out_dir, lambda layer=layer: draw_layer(layer)):
                reused.append(f"L{layer:02d}")
            files += names
        names = self._sheet_files(ctx, sheets)
        if ctx.cache.reuse_or_compute(self.name, content_key(common, "sheets", sheets), names,
                                      ctx.out_dir, draw_sheets):
            reused.append("contact sheets")
        ctx.artifacts["layer_pictures"] = [ctx.out_dir / name for name in (*files, *names)]
        if reused:
            log.info("layer_viz: reused cached pictures of %s", ", ".join(reused))


class PicturesStage(Stage):
    """Cue, fused-map and overlay series with their videos (the per-layer ones come from
    :class:`LayerPicturesStage`)."""

    name = "viz"
    requires = ("maps", "masks", "prediction", "layer_pictures")

    def reads(self, cfg) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Per-layer pictures come from the Gram statistics, which ``maps.cue=query_cosine``
        does not compute: then only the cue, fused-map and overlay series are drawn."""
        if cfg.maps.cue == Cue.query_cosine:
            return ("maps", "masks", "prediction"), ()
        return self.requires, self.optional

    def run(self, ctx) -> None:
        cfg = ctx.cfg.viz
        maps, masks = ctx.artifacts["maps"], ctx.artifacts["masks"]
        frames = ctx.artifacts["prediction"].frames
        size = frames.shape[1:3]
        series = [("maps", "cues", name, map_images(cue, size, cfg))
                  for name, cue in maps.cues.items()]
        series.append(("maps", "fused", "final_mask", map_images(maps.dynamic, size, cfg)))
        series.append(("overlays", "mask", "overlay",
                       (overlay_mask(frame, mask)
                        for frame, mask in zip(frames, masks.binary, strict=True))))
        write_all(ctx.out_dir, series, cfg)
        log.info("viz: cue, fused-map and overlay series%s -> %s",
                 " with videos" if cfg.videos else "", ctx.out_dir)
