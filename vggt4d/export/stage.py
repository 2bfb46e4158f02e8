"""The export stage: the run's prediction, masks and scene tokens → ``scene.rrd`` and ``export/``.

Inputs, as the scene tokens use them (:func:`vggt4d.latent.latent_inputs`): the second pass's
prediction when it ran (else the first), the refined masks when refine ran (else the coarse
ones) with the masks stage's soft map, and ``scene_latent.pt`` when latent ran. The recording's
points are the pixels ``points.*`` keeps (:func:`vggt4d.points.keep_mask`). Outputs in the job
directory, by ``export.formats``::

    scene.rrd                    rerun: :mod:`vggt4d.export.recording`
    export/images/<name>         colmap, nerfstudio: the frames (frame_0000.png, …)
    export/masks/<name>.png      … static masks (dynamic pixels 0 = ignore), COLMAP's naming
    export/dynamic_masks/<name>  … dynamic masks (255 = dynamic)
    export/sparse/0/             colmap: :mod:`vggt4d.export.colmap`
    export/transforms.json       nerfstudio: :mod:`vggt4d.export.nerfstudio`
    export/tum/                  tum: :mod:`vggt4d.export.tum`
"""

from __future__ import annotations

import logging

from vggt4d.config.export import ExportFormat
from vggt4d.stage import Stage

log = logging.getLogger(__name__)

RECORDING = "scene.rrd"
FOLDER = "export"


class ExportStage(Stage):
    """Prediction and masks (and scene tokens) → ``scene.rrd`` and the ``export/`` folder."""

    name = "export"
    requires = ("prediction", "masks")
    optional = ("prediction_pass2", "refined_masks", "scene_latent")
    provides = ("export",)

    def check(self, ctx) -> None:
        ctx.cfg.model.require_cameras("export")

    def run(self, ctx) -> None:
        from vggt4d.latent import latent_inputs

        cfg = ctx.cfg.export
        prediction, masks, sources = latent_inputs(ctx)
        written: list[str] = []
        if ExportFormat.rerun in cfg.formats:
            written.append(self._recording(ctx, prediction, masks))
        if ExportFormat.colmap in cfg.formats or ExportFormat.nerfstudio in cfg.formats:
            written += self._trainer_inputs(ctx, prediction, masks)
        if ExportFormat.tum in cfg.formats:
            from vggt4d.export.tum import write_tum_folder

            write_tum_folder(ctx.out_dir / FOLDER / "tum", prediction.frames, prediction.depth,
                             masks.binary, prediction.extrinsics, prediction.intrinsics,
                             cfg.tum_depth_scale)
            written.append(f"{FOLDER}/tum/")
        ctx.artifacts["export"] = {"files": written, "sources": sources}
        log.info("export: %s (%s prediction, %s masks)", ", ".join(written),
                 sources["prediction"], sources["masks"])

    @staticmethod
    def _recording(ctx, prediction, masks) -> str:
        from vggt4d.export.recording import tokens_in_world, write_recording
        from vggt4d.latent import OUTPUT, read_latent
        from vggt4d.points import keep_mask

        cfg = ctx.cfg.export
        valid = keep_mask(prediction.depth, prediction.conf, prediction.sky, ctx.cfg.points)
        tokens = (tokens_in_world(read_latent(ctx.out_dir / OUTPUT))
                  if "scene_latent" in ctx.artifacts else None)
        summary = write_recording(ctx.out_dir / RECORDING, prediction.frames, prediction.depth,
                                  prediction.extrinsics, prediction.intrinsics, masks.binary,
                                  masks.soft, valid, tokens, cfg.max_points_per_frame, cfg.seed)
        points = [a + b for a, b in zip(summary.static_points, summary.dynamic_points,
                                        strict=True)]
        log.info("export: %s with %d frames, %d-%d points per frame (at most %s), %d tokens",
                 RECORDING, len(points), min(points), max(points),
                 cfg.max_points_per_frame or "all", summary.tokens)
        return RECORDING

    @staticmethod
    def _trainer_inputs(ctx, prediction, masks) -> list[str]:
        """Images and masks shared by COLMAP and nerfstudio, then their camera files; returns
        what was written."""
        from vggt4d.export.colmap import write_colmap_model
        from vggt4d.export.files import (
            DYNAMIC_MASKS,
            IMAGES,
            MASKS,
            frame_names,
            mask_name,
            write_images,
            write_trainer_masks,
        )
        from vggt4d.export.nerfstudio import write_transforms

        cfg, root = ctx.cfg.export, ctx.out_dir / FOLDER
        names = frame_names(len(prediction.frames))
        size = prediction.frames.shape[1:3]
        write_images(root / IMAGES, prediction.frames, names)
        write_trainer_masks(root, masks.binary, names)
        written = [f"{FOLDER}/{folder}/" for folder in (IMAGES, MASKS, DYNAMIC_MASKS)]
        if ExportFormat.colmap in cfg.formats:
            write_colmap_model(root / "sparse" / "0", names, prediction.extrinsics,
                               prediction.intrinsics, size, cfg.colmap_format)
            written.append(f"{FOLDER}/sparse/0/")
        if ExportFormat.nerfstudio in cfg.formats:
            write_transforms(root / "transforms.json", [f"{IMAGES}/{name}" for name in names],
                             prediction.extrinsics, prediction.intrinsics, size,
                             [f"{MASKS}/{mask_name(name)}" for name in names])
            written.append(f"{FOLDER}/transforms.json")
        return written
