"""Weights & Biases logging of one job (the ``log`` stage; ``logger=wandb``, offline by default).

One W&B run per job: the resolved config, job type = model, tags (model, window, bands), the
sweep id as group in a multirun and the overrides as run name. Keys are grouped for the
dashboard; one history step per frame, so W&B's step slider scrubs through the clip:
- ``maps/{w_shallow,w_middle,w_deep,dynamic}``: colour-mapped cue and fused maps (uint8 RGB:
  wandb ≥ 0.30 renders raw float maps black; the pictures stage's PNGs are reused when present);
- ``masks/overlay`` (the frame with the mask — and the ground truth when known — as W&B mask
  layers with class labels static / dynamic), ``masks/soft``;
- ``metrics/{J,F,area_fraction}`` per frame; ``metrics/{JM,JR,FM,FR,...}`` in the summary with a
  per-frame table ``metrics/per_frame``;
- ``maps/contact/<statistic>`` contact sheets and ``videos/<series>`` from the pictures stage;
- ``latent/{tokens,channels,dynamic_tokens}`` and ``latent/voxels`` (a 3-D point cloud of at most
  :data:`MAX_CLOUD_POINTS` coloured voxel centres) when the latent stage ran.
Logging never fails a job: a W&B error is reported once as a warning, the run is finished, and
the files on disk are complete either way. With ``logger.background`` (default) the run is
written by one background thread, so in a sweep a job's logging overlaps the next job's work;
:func:`wait_for_logging` (called at the end of every job that is not followed by another in the
same process, and at interpreter exit) waits for it.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from vggt4d.postprocess import upsample_bilinear
from vggt4d.stage import Stage
from vggt4d.viz import colorize

log = logging.getLogger(__name__)

CLASS_LABELS = {0: "static", 1: "dynamic"}

MAX_CLOUD_POINTS = 100_000
"""W&B's 3-D viewer stays responsive up to about this many points."""

_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wandb-log")
_PENDING: list[Future] = []


def wait_for_logging() -> None:
    """Block until every W&B run handed to the background writer is finished."""
    while _PENDING:
        _PENDING.pop(0).result()


def run_tags(cfg) -> list[str]:
    """Model, window and bands as tags, plus the configured ones."""
    bands = "-".join(f"{band[0]}..{band[1]}"
                     for band in (cfg.bands.shallow, cfg.bands.middle, cfg.bands.deep))
    return [cfg.model.name, f"window={cfg.gram.window}", f"bands={bands}", *cfg.logger.tags]


def map_image(ctx, png: Path, values) -> object:
    """A W&B image of a map: the PNG the pictures stage wrote (no second encoding) when it
    exists, else the colour-mapped values."""
    import wandb

    if png.is_file():
        return wandb.Image(str(png))
    return wandb.Image(colorize(values(), ctx.cfg.viz.cmap))


def frame_records(ctx) -> list[dict]:
    """One dict of W&B values per frame."""
    import wandb

    maps, masks = ctx.artifacts["maps"], ctx.artifacts["masks"]
    prediction, metrics = ctx.artifacts["prediction"], ctx.artifacts["metrics"]
    clip = ctx.artifacts.get("clip")
    frames = prediction.frames
    size = frames.shape[1:3]
    series = {name: (f"cues_frame{{t:03d}}_{name}.png", cue) for name, cue in maps.cues.items()}
    series["dynamic"] = ("fused_frame{t:03d}_final_mask.png", maps.dynamic)
    truth = None
    if clip is not None and getattr(clip.ground_truth, "dynamic_masks", None) is not None:
        from vggt4d.evaluate import resize_masks

        truth = resize_masks(clip.ground_truth.dynamic_masks, *size)
    per_frame = metrics.get("per_frame", {})
    area = metrics["unsupervised"]["area_fraction_per_frame"]
    records = []
    for t, frame in enumerate(frames):
        layers = {"dynamic": {"mask_data": masks.binary[t].astype(np.uint8),
                              "class_labels": CLASS_LABELS}}
        if truth is not None:
            layers["ground_truth"] = {"mask_data": truth[t].astype(np.uint8),
                                      "class_labels": CLASS_LABELS}
        record = {
            f"maps/{name}": map_image(
                ctx, ctx.out_dir / "maps" / pattern.format(t=t),
                lambda grid=grid, t=t: upsample_bilinear(grid[t:t + 1].numpy(), size)[0])
            for name, (pattern, grid) in series.items()}
        record["masks/overlay"] = wandb.Image(frame, masks=layers)
        record["masks/soft"] = map_image(ctx, ctx.out_dir / "masks" / f"soft_{t:04d}.png",
                                         lambda t=t: masks.soft[t])
        record["metrics/area_fraction"] = area[t]
        for key in ("J", "F"):
            if key in per_frame and per_frame[key][t] is not None:  # None: frame not scored
                record[f"metrics/{key}"] = per_frame[key][t]
        records.append(record)
    return records


def summary(ctx) -> dict:
    """Scalar metrics, the per-frame table, contact sheets and videos already on disk."""
    import wandb

    metrics = ctx.artifacts["metrics"]
    values = {f"metrics/{key}": metrics[key] for key in ("JM", "JR", "FM", "FR") if key in metrics}
    values.update({f"metrics/{key}": value for key, value in metrics["unsupervised"].items()
                   if not isinstance(value, list)})
    per_frame = metrics.get("per_frame", {})
    area = metrics["unsupervised"]["area_fraction_per_frame"]
    columns = ["frame", "area_fraction", *per_frame]
    rows = [[t, area[t], *(per_frame[key][t] for key in per_frame)] for t in range(len(area))]
    values["metrics/per_frame"] = wandb.Table(columns=columns, data=rows)
    for sheet in sorted((ctx.out_dir / "contact").glob("*.png")):
        values[f"maps/contact/{sheet.stem}"] = wandb.Image(str(sheet))
    for video in sorted((ctx.out_dir / "videos").rglob("*.mp4")):
        series = video.relative_to(ctx.out_dir / "videos").with_suffix("").as_posix()
        values[f"videos/{series}"] = wandb.Video(str(video), format="mp4")
    values.update(latent_summary(ctx))
    return values


def latent_summary(ctx) -> dict:
    """Token counts and the coloured voxel cloud of ``scene_latent.ply`` (a seeded subsample of
    at most :data:`MAX_CLOUD_POINTS`)."""
    import wandb

    from vggt4d.latent import PLY

    report = ctx.artifacts.get("scene_latent")
    if report is None:
        return {}
    values = {f"latent/{key}": report[key] for key in ("tokens", "channels", "dynamic_tokens")}
    ply = ctx.out_dir / PLY
    if ply.is_file():
        from plyfile import PlyData

        vertex = PlyData.read(str(ply))["vertex"]
        cloud = np.stack([vertex[name] for name in ("x", "y", "z", "red", "green", "blue")],
                         axis=1).astype(np.float32)
        if len(cloud) > MAX_CLOUD_POINTS:
            keep = np.random.default_rng(0).choice(len(cloud), MAX_CLOUD_POINTS, replace=False)
            cloud = cloud[np.sort(keep)]
        values["latent/voxels"] = wandb.Object3D(cloud)
    return values


def log_job(ctx) -> None:
    """Create, fill and finish this job's W&B run."""
    import wandb

    cfg = ctx.cfg
    run = wandb.init(
        project=cfg.logger.project, entity=cfg.logger.entity, mode=cfg.logger.mode,
        dir=str(ctx.out_dir), group=ctx.job.group, job_type=cfg.model.name,
        name=ctx.job.name, tags=run_tags(cfg), config=dataclasses.asdict(cfg),
        reinit="finish_previous", settings=wandb.Settings(silent=True),
    )
    try:
        records = frame_records(ctx)
        for t, record in enumerate(records):
            run.log(record, step=t)
        final = summary(ctx)
        run.log(final, step=len(records))
        run.summary.update({key: value for key, value in final.items()
                            if isinstance(value, float | int)})
    finally:
        run.finish()


class TrackingStage(Stage):
    """Logs the job to W&B (``logger.kind=wandb``) after everything else; never fails the job."""

    name = "log"
    requires = ("maps", "masks", "metrics", "prediction")
    optional = ("clip", "scene_latent")

    def run(self, ctx) -> None:
        if ctx.cfg.logger.kind == "none":
            return
        if ctx.cfg.logger.background:
            _PENDING.append(_WRITER.submit(log_safely, ctx))
        else:
            log_safely(ctx)


def log_safely(ctx) -> None:
    """:func:`log_job`, turning any W&B failure into one warning."""
    try:
        log_job(ctx)
    except Exception as err:  # W&B must never cost the user the job's results
        log.warning("W&B logging failed (%s: %s); the files on disk are complete",
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return
    log.info("log: W&B run written (%s) under %s", ctx.cfg.logger.mode, ctx.out_dir / "wandb")
