"""The second masked DA3 pass (VGGT4D §3.4): the dynamic patches' keys and values are removed in
the first layers, so the cameras are estimated from the static scene.

A patch is dynamic when any of its pixels is (VGGT4D, ``patch_rule=any``) or when more than
``area_fraction`` of them are (the AnyDynamics grabcut script, ``area``). In the chosen blocks every
token still queries, but no query sees a dynamic patch's key/value — within its frame in
per-frame blocks, across the clip in global ones; special tokens are never removed, so a frame
whose patches are all dynamic still has one key and no row of the softmax is empty. The pass goes
through the same hooked forward as the first (:func:`vggt4d.hook.capture_attention` with a
:class:`vggt4d.hook.KeyMask`). Outputs: ``prediction_pass2.npz`` (same layout as
``prediction.npz``), ``depth_compare/frame{t:03d}.png`` (pass 1 | pass 2, one colour scale) and
the per-frame pose difference between the passes in ``second_pass.json``.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch

from vggt4d.cache import content_key
from vggt4d.config.second_pass import LayerRule
from vggt4d.errors import UserError
from vggt4d.geometry_metrics import pose_difference
from vggt4d.hook import PATCH_SIZE, KeyMask
from vggt4d.io import write_json
from vggt4d.predict import (
    chunk_plan,
    chunk_report_path,
    forward_identity,
    job_device,
    load_prediction,
    predict_to_file,
)
from vggt4d.stage import Stage
from vggt4d.viz import colorize, side_by_side, write_png

log = logging.getLogger(__name__)

OUTPUT = "prediction_pass2.npz"
REPORT = "second_pass.json"


def patch_drop(masks: np.ndarray, grid: tuple[int, int], patch_start_idx: int,
               rule: str = "any", area_fraction: float = 0.1) -> torch.Tensor:
    """Pixel masks (T, H, W) with H = 14·h, W = 14·w → (T, patch_start_idx + h·w) bool tokens to
    hide: the patch grid row-major after the special tokens, which are never hidden."""
    frames, height, width = masks.shape
    rows, cols = grid
    if (height, width) != (rows * PATCH_SIZE, cols * PATCH_SIZE):
        raise UserError(f"masks of size {width}x{height} do not match the {cols}x{rows} patch "
                        f"grid ({cols * PATCH_SIZE}x{rows * PATCH_SIZE} pixels)")
    coverage = masks.reshape(frames, rows, PATCH_SIZE, cols, PATCH_SIZE).mean(axis=(2, 4))
    dynamic = coverage > 0 if rule == "any" else coverage > area_fraction
    special = np.zeros((frames, patch_start_idx), dtype=bool)
    return torch.from_numpy(np.concatenate([special, dynamic.reshape(frames, -1)], axis=1))


def depth_comparison(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Pass-1 and pass-2 depth of one frame side by side, inverse depth on one shared scale."""
    inverse = [1.0 / np.maximum(d, 1e-6) for d in (first, second)]
    low, high = np.percentile(np.concatenate([i.ravel() for i in inverse]), [2, 98])
    return side_by_side([colorize(i, "turbo", low, max(high, low + 1e-6)) for i in inverse])


def hidden_blocks(layers: list[int], rule: str, alt_start: int, num_blocks: int) -> list[int]:
    """DA3 blocks whose dynamic keys/values are hidden.

    ``rule=vggt``: ``layers`` are VGGT aggregator layers, each a per-frame attention block
    followed by a global one. DA3's global blocks are the odd ones from ``alt_start`` on, with a
    per-frame block before each, so VGGT layer i ↦ DA3's i-th global block g_i and the
    per-frame block g_i − 1 (VGGT4D's layers 0–4 ↦ DA3-giant blocks 12–21, da3-small 4–11).
    ``rule=blocks``: ``layers`` are DA3 blocks as they are.
    """
    if rule == LayerRule.blocks:
        return sorted(set(layers))
    if alt_start < 0:
        raise UserError("second_pass.layer_rule=vggt needs a model with global attention "
                        "blocks; use second_pass.layer_rule=blocks with DA3 block numbers")
    first_global = alt_start if alt_start % 2 else alt_start + 1
    pairs = (num_blocks - first_global + 1) // 2
    beyond = sorted({layer for layer in layers if layer >= pairs})
    if beyond:
        log.warning("second_pass.layers %s are beyond this model's %d per-frame/global block "
                    "pairs (blocks %d-%d); hiding keys in the others", beyond, pairs,
                    first_global - 1, num_blocks - 1)
    kept = [layer for layer in layers if layer < pairs]
    if not kept:
        raise UserError(f"second_pass.layers={list(layers)}: this model has VGGT-style layers "
                        f"0-{pairs - 1} only; use some of those")
    return sorted({first_global + 2 * layer - offset for layer in kept for offset in (0, 1)})


def patch_mask_of(ctx) -> torch.Tensor:
    """The (T, N) tokens to hide for this job: the coarse masks' dynamic patches."""
    settings = ctx.cfg.second_pass
    masks = ctx.artifacts["masks"].binary
    prediction = ctx.artifacts["prediction"]
    if masks.shape != prediction.depth.shape:
        raise UserError(f"second pass: {masks.shape[0]} masks of {masks.shape[1:]} do not "
                        f"match the prediction's {prediction.depth.shape[0]} frames of "
                        f"{prediction.depth.shape[1:]}")
    start = ctx.cfg.model.patch_start_idx
    drop = patch_drop(masks, prediction.grid, start, settings.patch_rule,
                      settings.area_fraction)
    full = [t for t in range(len(drop)) if bool(drop[t, start:].all())]
    if full:
        log.warning("second pass: every patch of frame(s) %s is dynamic; only their special "
                    "token stays attendable", full)
    return drop


def config_blocks(ctx) -> list[int]:
    """:func:`hidden_blocks` of this job's settings and model."""
    model, settings = ctx.cfg.model, ctx.cfg.second_pass
    return hidden_blocks(list(settings.layers), settings.layer_rule, model.alt_start,
                         model.num_blocks)


class SecondPassStage(Stage):
    """Rerun DA3 with the coarse masks' dynamic patches hidden (VGGT4D's order: the second pass
    takes the coarse masks; refinement runs after it with its cameras). Cached by the masks."""

    name = "second_pass"
    requires = ("masks", "prediction", "processed_frames")
    provides = ("prediction_pass2",)

    def check(self, ctx) -> None:
        config_blocks(ctx)
        job_device(ctx)

    def outputs(self, ctx) -> tuple[str, ...]:
        """``prediction_pass2.npz``, and its chunk report when the clip runs in chunks."""
        frames = ctx.artifacts["processed_frames"]
        chunked = chunk_plan(ctx, len(frames), frames.shape[1:3]) is not None
        return (OUTPUT, chunk_report_path(ctx.out_dir / OUTPUT).name) if chunked else (OUTPUT,)

    def cache_key(self, ctx) -> str:
        frames = ctx.artifacts["processed_frames"]
        device, dtype = job_device(ctx)
        drop = patch_mask_of(ctx)
        # chunk alignment leaves out the masks' pixels: with chunks they matter pixel by pixel
        chunked = chunk_plan(ctx, len(frames), frames.shape[1:3]) is not None
        pixels = ctx.artifacts["masks"].binary if chunked else b""
        return content_key(*forward_identity(ctx, frames, device, dtype),
                           hashlib.sha256(drop.numpy().tobytes()).hexdigest(),
                           config_blocks(ctx), pixels)

    def run(self, ctx) -> None:
        blocks = config_blocks(ctx)
        key_mask = KeyMask(patch_mask_of(ctx), frozenset(blocks))
        log.info("second pass: dynamic keys/values hidden in blocks %s", blocks)
        # chunks of a long clip are aligned without the dynamic pixels, known by now
        predict_to_file(ctx, ctx.artifacts["processed_frames"], ctx.out_dir / OUTPUT,
                        "second pass", key_mask=key_mask,
                        exclude=ctx.artifacts["masks"].binary)
        self.load(ctx)

    def load(self, ctx) -> None:
        first = ctx.artifacts["prediction"]
        second = load_prediction(ctx.out_dir / OUTPUT)
        for t in range(len(second.depth)):
            write_png(ctx.out_dir / "depth_compare" / f"frame{t:03d}.png",
                      depth_comparison(first.depth[t], second.depth[t]))
        if first.extrinsics is None:
            difference = {"skipped": f"{ctx.cfg.model.name} predicts no cameras"}
            log.info("second pass: depth only (%s)", difference["skipped"])
        else:
            difference = pose_difference(first.extrinsics, second.extrinsics)
            log.info("second pass: mean pose change %.3f deg, %.4f (units of the scene)",
                     difference["mean_rotation_deg"], difference["mean_translation"])
        write_json(ctx.out_dir / REPORT, difference)
        ctx.artifacts["prediction_pass2"] = second
