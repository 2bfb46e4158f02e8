"""The second masked DA3 pass (VGGT4D §3.4): the dynamic patches' keys and values are removed in
the first blocks, so the cameras are estimated from the static scene.

A patch is dynamic when any of its pixels is (VGGT4D, ``patch_rule=any``) or when more than
``area_fraction`` of them are (the user's grabcut script, ``area``). In the chosen blocks every
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
import json
import logging

import numpy as np
import torch

from vggt4d.cache import content_key
from vggt4d.errors import UserError
from vggt4d.geometry_metrics import pose_difference
from vggt4d.hook import PATCH_SIZE, KeyMask
from vggt4d.io import atomic_write
from vggt4d.predict import Prediction, forward_identity, prepare_network, run_forward
from vggt4d.resources import resolve_device, resolve_dtype
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


class SecondPassStage:
    """Rerun DA3 with the dynamic patches hidden in ``second_pass.layers`` (cached by masks).

    Uses the refined masks when the refine stage ran before it, else the coarse masks."""

    name = "second_pass"
    requires = ("masks", "prediction", "processed_frames")
    provides = ("prediction_pass2",)
    files = (OUTPUT,)

    def check(self, ctx) -> None:
        cfg = ctx.cfg.second_pass
        bad = [layer for layer in cfg.layers if not 0 <= layer < ctx.cfg.model.num_blocks]
        if bad or not cfg.layers:
            raise UserError(f"second_pass.layers={list(cfg.layers)} must be a non-empty list of "
                            f"blocks 0-{ctx.cfg.model.num_blocks - 1}")
        if cfg.patch_rule not in ("any", "area"):
            raise UserError(f"second_pass.patch_rule='{cfg.patch_rule}' is not one of any, area")
        if not 0 <= cfg.area_fraction < 1:
            raise UserError(f"second_pass.area_fraction={cfg.area_fraction} must be in [0, 1)")
        self.device = resolve_device(ctx.cfg.device, ctx.job.num)
        self.dtype = resolve_dtype(ctx.cfg.dtype, self.device)

    def _drop(self, ctx) -> torch.Tensor:
        cfg = ctx.cfg.second_pass
        masks = ctx.artifacts.get("refined_masks", ctx.artifacts["masks"]).binary
        prediction = ctx.artifacts["prediction"]
        if masks.shape != prediction.depth.shape:
            raise UserError(f"second pass: {masks.shape[0]} masks of {masks.shape[1:]} do not "
                            f"match the prediction's {prediction.depth.shape[0]} frames of "
                            f"{prediction.depth.shape[1:]}")
        drop = patch_drop(masks, prediction.grid, ctx.cfg.model.patch_start_idx, cfg.patch_rule,
                          cfg.area_fraction)
        full = [t for t in range(len(drop))
                if bool(drop[t, ctx.cfg.model.patch_start_idx:].all())]
        if full:
            log.warning("second pass: every patch of frame(s) %s is dynamic; only their special "
                        "token stays attendable in blocks %s", full, list(cfg.layers))
        return drop

    def cache_key(self, ctx) -> str:
        frames = ctx.artifacts["processed_frames"]
        self.drop = drop = self._drop(ctx)
        return content_key(*forward_identity(ctx, frames, self.device, self.dtype),
                           hashlib.sha256(drop.numpy().tobytes()).hexdigest(),
                           sorted(ctx.cfg.second_pass.layers))

    def run(self, ctx) -> None:
        frames = ctx.artifacts["processed_frames"]
        key_mask = KeyMask(self.drop, frozenset(ctx.cfg.second_pass.layers))
        net = prepare_network(ctx, frames, self.device, self.dtype, "second pass")
        prediction = run_forward(net, frames, device=self.device, dtype=self.dtype,
                                 hooked_network=ctx.cfg.model.hooked_network,
                                 ref_view_strategy=ctx.cfg.model.ref_view_strategy,
                                 key_mask=key_mask)
        prediction.save(ctx.out_dir / OUTPUT)
        self.load(ctx)

    def load(self, ctx) -> None:
        first = ctx.artifacts["prediction"]
        second = Prediction.load(ctx.out_dir / OUTPUT)
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
        atomic_write(ctx.out_dir / REPORT,
                     lambda tmp: tmp.write_text(json.dumps(difference, indent=2) + "\n"))
        ctx.artifacts["prediction_pass2"] = second
