"""The masks stage: fused dynamic map (patch grid) → soft map and binary masks per frame.

Steps, each from config (``masks``): optional k-means cluster smoothing over patch features
(VGGT4D: the encoder's tokens, 64 clusters, seed 42, every frame rescaled to [0, 1] after),
temporal / spatial Gaussian smoothing of the patch map, upsampling to the processed frame
(bilinear, or a guided filter with the grey / RGB / RGB-D frame as guide) with optional grey
morphology before and after it, then binarisation (adaptive multi-Otsu per sequence as VGGT4D,
Otsu per frame, a fixed threshold, hysteresis, or the mean of the strong values) and the guards
of the AnyDynamics research scripts that empty frames with a weak map.
Masks are at the processing resolution, like ``prediction.npz``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vggt4d import postprocess
from vggt4d.chunks import ChunkedTap, FrameRows
from vggt4d.config.masks import KMeansFeatures, MasksConfig, Upsample
from vggt4d.config.model import ModelConfig
from vggt4d.errors import UserError
from vggt4d.io import (
    atomic_write,
    read_safetensors,
    scratch_array,
    write_json,
    write_safetensors,
)
from vggt4d.points import frame_blocks
from vggt4d.stage import ForwardTap, Stage

log = logging.getLogger(__name__)

FEATURES_FILE = "patch_features.safetensors"


@dataclass
class DynamicMasks:
    """``soft`` (T, H, W) float32 and ``binary`` (T, H, W) bool at processing resolution
    (from the masks stage: memory-mapped scratch arrays, read a frame or block at a time)."""

    soft: np.ndarray
    binary: np.ndarray
    thresholds: dict


def write_mask_png(path, mask: np.ndarray) -> None:
    """A (H, W) bool mask as a 0/255 greyscale PNG, atomically."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", compress_level=1))


SPATIAL_TRUNCATE = 2.0
"""Patch-level spatial Gaussian reaches 2σ: 3×3 taps at σ = 0.5 (the any4dgs v4 script)."""


def grey_morphology(soft: np.ndarray, steps: list[str]) -> np.ndarray:
    """Apply ``op:size`` steps (e.g. ``close:7``) of grey-scale morphology to (T, H, W) maps."""
    for step in steps:
        op, _, size = step.partition(":")
        soft = postprocess.morphology(soft, op, int(size))
    return soft


def patch_steps(dynamic: np.ndarray, settings: MasksConfig,
                features: np.ndarray | None = None) -> np.ndarray:
    """The steps on the patch grid, which may mix frames: (T, h, w) → (T, h, w) float32.

    In order, as ``settings`` says: k-means smoothing over ``features`` (T, h, w, C) and the
    per-frame rescale after it; temporal and spatial Gaussians (before upsampling, where they
    commute with the bilinear step).
    """
    if settings.kmeans and features is not None:
        dynamic = postprocess.kmeans_smooth(dynamic, features, settings.kmeans_clusters,
                                            settings.kmeans_seed)
        if settings.kmeans_rescale:
            dynamic = postprocess.rescale_frames(dynamic)
    if settings.temporal_sigma > 0:
        dynamic = postprocess.temporal_gaussian(dynamic, settings.temporal_sigma)
    if settings.spatial_sigma > 0:
        dynamic = postprocess.spatial_gaussian(dynamic, settings.spatial_sigma, SPATIAL_TRUNCATE)
    return np.asarray(dynamic, dtype=np.float32)


def frame_steps(patch: np.ndarray, frames: np.ndarray, depth: np.ndarray,
                settings: MasksConfig) -> np.ndarray:
    """The steps at frame resolution, each frame on its own: patch maps (F, h, w) of frames
    (F, H, W, 3) with depth (F, H, W) → soft maps (F, H, W) float32.

    Bilinear upsampling, grey morphology, the guided filter (box radius a fraction of the
    longer side), grey morphology again.
    """
    soft = grey_morphology(postprocess.upsample_bilinear(patch, frames.shape[1:3]),
                           settings.morph_before)
    if settings.upsample == Upsample.guided:
        radius = max(1, round(settings.guided_radius * max(frames.shape[1:3])))
        guide = postprocess.guide_from_frames(frames, depth, settings.guide)
        soft = postprocess.guided_filter(guide, soft, radius, settings.guided_eps)
    return grey_morphology(soft, settings.morph_after).astype(np.float32)


def soft_masks(dynamic: np.ndarray, frames: np.ndarray, depth: np.ndarray,
               settings: MasksConfig, features: np.ndarray | None = None) -> np.ndarray:
    """The masks stage's recipe on a whole clip held in memory: patch-level map (T, h, w) →
    frame-level soft map (T, H, W), :func:`patch_steps` then :func:`frame_steps`."""
    return frame_steps(patch_steps(dynamic, settings, features), frames, depth, settings)


BLOCK_PIXELS = 1 << 20
"""Frame pixels the masks stage works on at once (1 M: 4 MiB per float32 map; multi-Otsu's
float64 values and labels take about 30 bytes a pixel)."""


def empty_weak_frames(binary: np.ndarray, soft: np.ndarray, below_mean: float,
                      below_max: float) -> list[int]:
    """Clear (in place) the masks of frames whose soft map averages below ``below_mean`` or
    never reaches ``below_max``; returns their indices."""
    flat = soft.reshape(len(soft), -1)
    weak = (flat.mean(axis=1) < below_mean) | (flat.max(axis=1) < below_max)
    binary[weak] = False
    return np.flatnonzero(weak).tolist()


def feature_block(model: ModelConfig, features: str) -> int:
    """The block whose output patch tokens k-means clusters: the last per-frame block before
    ``alt_start`` (``encoder``: DA3's counterpart of the DINO-encoder output VGGT4D clusters,
    read through the backbone's final LayerNorm as DA3 reads its intermediate layers, as VGGT
    takes DINOv2's normed patch tokens) or the last block (its raw output)."""
    if features == KMeansFeatures.last_block:
        return model.num_blocks - 1
    if model.alt_start < 1:
        raise UserError(f"masks.kmeans_features=encoder needs a model with alternating "
                        f"attention; {model.name} has none: use masks.kmeans_features="
                        f"last_block")
    return model.alt_start - 1


class MasksStage(Stage):
    """Maps → ``masks/dynamic_{t:04d}.png`` (0/255), ``masks/soft_{t:04d}.png`` and the
    thresholds used in ``masks/binarize.json``."""

    name = "masks"
    requires = ("maps", "prediction")
    provides = ("masks",)

    def check(self, ctx) -> None:
        if ctx.cfg.masks.kmeans:
            feature_block(ctx.cfg.model, ctx.cfg.masks.kmeans_features)

    def forward_tap(self, ctx) -> ForwardTap | None:
        """With ``masks.kmeans``: the chosen block's output patch tokens, (T, h, w, C) float16."""
        if not ctx.cfg.masks.kmeans:
            return None
        block = feature_block(ctx.cfg.model, ctx.cfg.masks.kmeans_features)
        kept = FrameRows()  # over chunks: each frame's rows from the chunk that owns it
        start = ctx.cfg.model.patch_start_idx

        normed = ctx.cfg.masks.kmeans_features == KMeansFeatures.encoder

        def keep(tokens) -> None:
            grid = tokens.layout.grid
            out = tokens.norm(tokens.tokens_out) if normed else tokens.tokens_out
            patches = out[:, start:]
            kept.put(patches.reshape(len(patches), *grid, -1).half().cpu())

        def save(out_dir) -> None:
            write_safetensors(out_dir / FEATURES_FILE, {"features": kept.value}, {"block": block})

        return ChunkedTap(key={"patch_features": block, "normed": normed},
                          files=(FEATURES_FILE,), save=save,
                          on_tokens=keep, token_layers=frozenset({block}),
                          start_chunk=kept.start)

    def run(self, ctx) -> None:
        """The soft maps and masks are made a block of frames at a time
        (:func:`vggt4d.points.frame_blocks`) into memory-mapped scratch arrays
        (:func:`vggt4d.io.scratch_array`), so a long clip's full-resolution maps are never all
        in memory."""
        settings = ctx.cfg.masks
        prediction = ctx.artifacts["prediction"]
        features = None
        if settings.kmeans:
            features = read_safetensors(ctx.out_dir / FEATURES_FILE)["features"].float().numpy()
        patch = patch_steps(ctx.artifacts["maps"].dynamic.numpy(), settings, features)
        folder = ctx.out_dir / "masks"
        shape = (len(patch), *prediction.frames.shape[1:3])
        blocks = [slice(frames.start, frames.stop)
                  for frames in frame_blocks(shape[0], shape[1] * shape[2], BLOCK_PIXELS)]
        soft = scratch_array(folder, shape, np.float32)
        for block in blocks:
            soft[block] = frame_steps(patch[block], prediction.frames[block],
                                      prediction.depth[block], settings)
        binary = scratch_array(folder, shape, np.bool_)
        thresholds = postprocess.binarize_in_blocks(
            soft, settings.binarize, blocks, binary, threshold=settings.threshold,
            low=settings.low, high=settings.high)
        thresholds["emptied_frames"] = empty_weak_frames(
            binary, soft, settings.empty_below_mean, settings.empty_below_max)
        for t in range(len(binary)):
            write_mask_png(folder / f"dynamic_{t:04d}.png", binary[t])
            soft_png = Image.fromarray((np.clip(soft[t], 0, 1) * 255).round().astype(np.uint8))
            atomic_write(folder / f"soft_{t:04d}.png",
                         lambda tmp, image=soft_png: image.save(tmp, format="PNG",
                                                                compress_level=1))
        write_json(folder / "binarize.json", thresholds)
        ctx.artifacts["masks"] = DynamicMasks(soft, binary, thresholds)
        log.info("masks: %s, %.1f%% of pixels dynamic -> %s", settings.binarize,
                 100 * binary.mean(), folder)
