"""The masks stage: fused dynamic map (patch grid) → soft map and binary masks per frame.

Steps, each from config (``masks``): optional k-means cluster smoothing over the last block's
patch features (VGGT4D), temporal / spatial Gaussian smoothing of the patch map, upsampling to
the processed frame (bilinear, or a guided filter with the grey / RGB / RGB-D frame as guide)
with optional grey morphology before and after it, then binarisation (adaptive multi-Otsu per
sequence as VGGT4D, Otsu per frame, a fixed threshold, hysteresis, or the mean of the strong
values) and the user's guards that empty frames with a weak map.
Masks are at the processing resolution, like ``prediction.npz``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vggt4d import postprocess
from vggt4d.io import atomic_write
from vggt4d.stage import UncachedStage

log = logging.getLogger(__name__)

FEATURES_FILE = "patch_features.safetensors"


@dataclass
class DynamicMasks:
    """``soft`` (T, H, W) float32 and ``binary`` (T, H, W) bool at processing resolution."""

    soft: np.ndarray
    binary: np.ndarray
    thresholds: dict


def write_mask_png(path, mask: np.ndarray) -> None:
    """A (H, W) bool mask as a 0/255 greyscale PNG, atomically."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", compress_level=1))


SPATIAL_TRUNCATE = 2.0
"""Patch-level spatial Gaussian reaches 2σ: 3×3 taps at σ = 0.5 (the user's v4 script)."""


def grey_morphology(soft: np.ndarray, steps: list[str]) -> np.ndarray:
    """Apply ``op:size`` steps (e.g. ``close:7``) of grey-scale morphology to (T, H, W) maps."""
    for step in steps:
        op, _, size = step.partition(":")
        soft = postprocess.morphology(soft, op, int(size))
    return soft


def soft_masks(dynamic: np.ndarray, frames: np.ndarray, depth: np.ndarray, cfg,
               features: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Patch-level map (T, h, w) → frame-level soft map (T, H, W) following ``cfg`` (masks):
    k-means smoothing, temporal and spatial Gaussians (patch level, before upsampling, where
    they commute with the bilinear step), upsampling, grey morphology around the guided filter.
    """
    if cfg.kmeans and features is not None:
        dynamic = postprocess.kmeans_smooth(dynamic, features, cfg.kmeans_clusters, seed)
    if cfg.temporal_sigma > 0:
        dynamic = postprocess.temporal_gaussian(dynamic, cfg.temporal_sigma)
    if cfg.spatial_sigma > 0:
        dynamic = postprocess.spatial_gaussian(dynamic, cfg.spatial_sigma, SPATIAL_TRUNCATE)
    soft = grey_morphology(postprocess.upsample_bilinear(dynamic, frames.shape[1:3]),
                           cfg.morph_before)
    if cfg.upsample == "guided":
        radius = max(1, round(cfg.guided_radius * max(frames.shape[1:3])))
        guide = postprocess.guide_from_frames(frames, depth, cfg.guide)
        soft = postprocess.guided_filter(guide, soft, radius, cfg.guided_eps)
    return grey_morphology(soft, cfg.morph_after).astype(np.float32)


def empty_weak_frames(binary: np.ndarray, soft: np.ndarray, cfg) -> list[int]:
    """Clear (in place) the masks of frames whose soft map is weak; returns their indices."""
    flat = soft.reshape(len(soft), -1)
    weak = (flat.mean(axis=1) < cfg.empty_below_mean) | (flat.max(axis=1) < cfg.empty_below_max)
    binary[weak] = False
    return np.flatnonzero(weak).tolist()


class MasksStage(UncachedStage):
    """Maps → ``masks/dynamic_{t:04d}.png`` (0/255), ``masks/soft_{t:04d}.png`` and the
    thresholds used in ``masks/binarize.json``."""

    name = "masks"
    requires = ("maps", "prediction")
    provides = ("masks",)

    def forward_tap(self, ctx):
        """With ``masks.kmeans``: the last block's output patch tokens, (T, h, w, C) float16."""
        if not ctx.cfg.masks.kmeans:
            return None
        from safetensors.torch import save_file

        from vggt4d.pipeline import ForwardTap

        last = ctx.cfg.model.num_blocks - 1
        kept: dict[str, torch.Tensor] = {}
        start = ctx.cfg.model.patch_start_idx

        def keep(tokens) -> None:
            grid = tokens.layout.grid
            patches = tokens.tokens_out[:, start:]
            kept["features"] = patches.reshape(len(patches), *grid, -1).half().cpu()

        def save(out_dir) -> None:
            atomic_write(out_dir / FEATURES_FILE,
                         lambda tmp: save_file({k: v.contiguous() for k, v in kept.items()},
                                               str(tmp)))

        return ForwardTap(key={"patch_features": last}, files=(FEATURES_FILE,), save=save,
                          on_tokens=keep, token_layers=frozenset({last}))

    def run(self, ctx) -> None:
        cfg = ctx.cfg.masks
        prediction = ctx.artifacts["prediction"]
        dynamic = ctx.artifacts["maps"].dynamic.numpy()
        features = None
        if cfg.kmeans:
            from safetensors.torch import load_file

            features = load_file(str(ctx.out_dir / FEATURES_FILE))["features"].float().numpy()
        soft = soft_masks(dynamic, prediction.frames, prediction.depth, cfg, features,
                          ctx.cfg.seed)
        binary, thresholds = postprocess.binarize(soft, cfg.binarize, threshold=cfg.threshold,
                                                  low=cfg.low, high=cfg.high)
        thresholds["emptied_frames"] = empty_weak_frames(binary, soft, cfg)
        folder = ctx.out_dir / "masks"
        for t in range(len(binary)):
            write_mask_png(folder / f"dynamic_{t:04d}.png", binary[t])
            soft_png = Image.fromarray((np.clip(soft[t], 0, 1) * 255).round().astype(np.uint8))
            atomic_write(folder / f"soft_{t:04d}.png",
                         lambda tmp, image=soft_png: image.save(tmp, format="PNG",
                                                                compress_level=1))
        atomic_write(folder / "binarize.json",
                     lambda tmp: tmp.write_text(json.dumps(thresholds, indent=2) + "\n"))
        ctx.artifacts["masks"] = DynamicMasks(soft, binary, thresholds)
        log.info("masks: %s, %.1f%% of pixels dynamic -> %s", cfg.binarize,
                 100 * binary.mean(), folder)
