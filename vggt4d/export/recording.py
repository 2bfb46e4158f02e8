"""A 4-D recording of a run for the Rerun viewer (``rerun scene.rrd``), written by rerun-sdk
without a viewer (``RecordingStream.save``, then renamed into place).

Entities (``world`` = DA3's world, the first camera's OpenCV frame: x right, y down, z forward)::

    world                      ViewCoordinates RDF; AnnotationContext 0 "static", 1 "dynamic"
    world/camera               Transform3D camera-to-world (translation C = −Rᵀt, mat3x3 Rᵀ)
                               and Pinhole (K, resolution W×H, camera axes RDF = OpenCV)
    world/camera/rgb           Image, the frame
    world/camera/depth         DepthImage float32 with meter = 1: one DA3 depth unit is shown
                               as one metre (metres for metric models; up to scale otherwise);
                               0 = no depth (non-finite or ≤ 0 in the prediction)
    world/camera/dynamic_mask  SegmentationImage, class 1 = dynamic
    world/camera/soft          Image, the soft dynamic map as uint8 round(255 · p)
    world/points/static        Points3D of the frame's static pixels, RGB
    world/points/dynamic       Points3D of its dynamic pixels, RGB blended with HIGHLIGHT,
                               class 1
    world/tokens/color         Points3D, scene tokens at their mean position, mean colour,
                               radius half a voxel (static: the whole clip)
    world/tokens/dynamic       the same tokens coloured by their dynamic fraction
                               (matplotlib's coolwarm: blue 0 … red 1)

Every per-frame entity is logged at ``frame = t`` on the ``frame`` sequence timeline (the
wall-clock ``log_time`` timeline is turned off). Points: the pixels with positive finite depth
(and ``valid``, when given) back-projected with :func:`vggt4d.cameras.backproject`; at most
``max_points_per_frame`` of them per frame (0 = all), drawn uniformly without replacement by one
generator seeded with ``seed`` for the whole clip, so the file size grows with T, not with H·W.
A default blueprint lays out 3-D views (seen from behind and above the first camera) beside the
frame with its mask, the depth and the soft map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vggt4d.cameras import backproject, camera_to_world
from vggt4d.export.files import check_clip
from vggt4d.io import atomic_write

APPLICATION_ID = "vggt4d"
TIMELINE = "frame"
HIGHLIGHT = np.array([255, 0, 255], np.float64)
"""Colour dynamic points are pulled towards (and the "dynamic" class colour)."""
HIGHLIGHT_WEIGHT = 0.6
"""Dynamic point colour = (1 − w) · RGB + w · HIGHLIGHT."""
TOKEN_COLORMAP = "coolwarm"


@dataclass
class SceneTokens:
    """Scene tokens in DA3's world: ``position`` (V, 3), ``color`` (V, 3) in [0, 1],
    ``dynamic`` (V,) fraction of their points in the dynamic masks, ``radius`` half a voxel."""

    position: np.ndarray
    color: np.ndarray
    dynamic: np.ndarray
    radius: float


@dataclass
class RecordingSummary:
    """What :func:`write_recording` logged: points per frame and the number of tokens."""

    static_points: list[int] = field(default_factory=list)
    dynamic_points: list[int] = field(default_factory=list)
    tokens: int = 0


def tokens_in_world(latent: dict) -> SceneTokens:
    """Tokens of a ``scene_latent.pt`` dict (:func:`vggt4d.latent.read_latent`) brought from
    the encoder frame to DA3's world: ``X = M⁻¹ [X_enc, 1]`` with ``M = world_to_enc`` (a
    similarity of scale ``s = det(M₃ₓ₃)^⅓``), radius ``grid_size / (2 s)``."""
    to_enc = latent["world_to_enc"].double().numpy()
    to_world = np.linalg.inv(to_enc)
    position = latent["position"].double().numpy() @ to_world[:3, :3].T + to_world[:3, 3]
    scale = float(np.cbrt(np.linalg.det(to_enc[:3, :3])))
    return SceneTokens(position=position.astype(np.float32),
                       color=latent["color"].float().numpy(),
                       dynamic=latent["dynamic"].float().numpy(),
                       radius=float(latent["grid_size"]) / (2 * scale))


def sample_pixels(valid: np.ndarray, max_points: int, rng: np.random.Generator) -> np.ndarray:
    """Flat indices (ascending) of at most ``max_points`` of the True pixels of ``valid``
    (H, W), drawn uniformly without replacement; all of them when ``max_points`` is 0."""
    index = np.flatnonzero(valid)
    if 0 < max_points < len(index):
        index = np.sort(rng.choice(index, size=max_points, replace=False))
    return index


def _blueprint(extrinsics: np.ndarray, depth: np.ndarray, tokens: bool):
    """The default layout: 3-D views (the frame's points and camera; the tokens by colour and by
    dynamic fraction when there are tokens) seen from behind and above the first camera,
    beside the frame with its mask, the depth and the soft map."""
    import rerun.blueprint as rrb

    c2w = camera_to_world(extrinsics[:1])[0]
    first = depth[0][np.isfinite(depth[0]) & (depth[0] > 0)]
    reach = float(np.median(first)) if first.size else 1.0
    centre, down, forward = c2w[:, 3], c2w[:, 1], c2w[:, 2]
    eye = rrb.EyeControls3D(position=centre - reach * (0.5 * forward + 0.4 * down),
                            look_target=centre + reach * forward, eye_up=-down)

    def scene_view(name: str, *contents: str):
        return rrb.Spatial3DView(origin="world", name=name, eye_controls=eye,
                                 contents=["+ world/camera", *contents])

    def image_view(name: str, *entities: str):
        return rrb.Spatial2DView(origin="world/camera", name=name,
                                 contents=[f"world/camera/{entity}" for entity in entities])

    views = [scene_view("frame points", "+ world/points/**", "+ world/camera/rgb",
                        "+ world/camera/dynamic_mask")]
    if tokens:
        views += [scene_view("scene tokens", "+ world/tokens/color"),
                  scene_view("tokens by dynamic fraction", "+ world/tokens/dynamic")]
    return rrb.Blueprint(rrb.Horizontal(
        rrb.Tabs(*views),
        rrb.Vertical(image_view("frame and dynamic mask", "rgb", "dynamic_mask"),
                     image_view("depth", "depth"), image_view("soft map", "soft")),
        column_shares=[2, 1]), collapse_panels=True)


def _log_static(rec, tokens: SceneTokens | None) -> int:
    import matplotlib
    import rerun as rr

    rec.log("world", rr.ViewCoordinates.RDF, static=True)
    rec.log("world", rr.AnnotationContext([(0, "static", (0, 0, 0, 0)),
                                          (1, "dynamic", (*HIGHLIGHT.astype(int), 255))]),
            static=True)
    if tokens is None:
        return 0
    colours = np.clip(np.rint(tokens.color * 255), 0, 255).astype(np.uint8)
    dynamic_colours = matplotlib.colormaps[TOKEN_COLORMAP](np.clip(tokens.dynamic, 0, 1),
                                                           bytes=True)[:, :3]
    for name, colour in (("color", colours), ("dynamic", dynamic_colours)):
        rec.log(f"world/tokens/{name}", rr.Points3D(tokens.position, colors=colour,
                                                    radii=tokens.radius), static=True)
    return len(tokens.position)


def _log_frame(rec, t: int, frame: np.ndarray, depth: np.ndarray, w2c: np.ndarray,
               k_mat: np.ndarray, dynamic: np.ndarray, soft: np.ndarray | None,
               sample: np.ndarray) -> tuple[int, int]:
    """Log frame ``t`` (shapes of one frame); returns the static and dynamic point counts."""
    import rerun as rr

    height, width = depth.shape
    c2w = camera_to_world(w2c[None])[0]
    rec.set_time(TIMELINE, sequence=t)
    rec.log("world/camera", rr.Transform3D(translation=c2w[:, 3], mat3x3=c2w[:, :3]))
    rec.log("world/camera", rr.Pinhole(image_from_camera=k_mat, resolution=[width, height]))
    rec.log("world/camera/rgb", rr.Image(frame))
    shown_depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0).astype(np.float32)
    rec.log("world/camera/depth", rr.DepthImage(shown_depth, meter=1.0))
    rec.log("world/camera/dynamic_mask", rr.SegmentationImage(dynamic.astype(np.uint8)))
    if soft is not None:
        quantised = np.rint(np.clip(soft, 0, 1) * 255).astype(np.uint8)
        rec.log("world/camera/soft", rr.Image(quantised, color_model="L"))
    points = backproject(depth[None], k_mat[None], w2c[None])[0].reshape(-1, 3)[sample]
    colours = frame.reshape(-1, 3)[sample]
    moving = dynamic.reshape(-1)[sample]
    highlighted = (1 - HIGHLIGHT_WEIGHT) * colours[moving] + HIGHLIGHT_WEIGHT * HIGHLIGHT
    rec.log("world/points/static", rr.Points3D(points[~moving], colors=colours[~moving]))
    rec.log("world/points/dynamic",
            rr.Points3D(points[moving], colors=np.rint(highlighted).astype(np.uint8),
                        class_ids=np.ones(int(moving.sum()), np.uint16)))
    return int((~moving).sum()), int(moving.sum())


def write_recording(path: Path, frames: np.ndarray, depth: np.ndarray, extrinsics: np.ndarray,
                    intrinsics: np.ndarray, dynamic: np.ndarray | None = None,
                    soft: np.ndarray | None = None, valid: np.ndarray | None = None,
                    tokens: SceneTokens | None = None, max_points_per_frame: int = 20_000,
                    seed: int = 0) -> RecordingSummary:
    """Write ``path`` (``.rrd``; module docstring) from (T, H, W, 3) uint8 frames, (T, H, W)
    depth, (T, 3, 4) world-to-camera, (T, 3, 3) intrinsics, optional (T, H, W) bool dynamic
    masks (none: every pixel static), soft maps in [0, 1], a (T, H, W) bool ``valid`` filter of
    the points, and scene tokens; atomically (a temporary file renamed into place)."""
    import rerun as rr

    w2c, k_mats = check_clip(frames, extrinsics, intrinsics, depth=depth, dynamic=dynamic,
                             soft=soft, valid=valid)
    if dynamic is None:
        dynamic = np.zeros(frames.shape[:3], dtype=bool)
    rng = np.random.default_rng(seed)
    summary = RecordingSummary()

    def write(tmp: Path) -> None:
        rec = rr.RecordingStream(APPLICATION_ID)
        rec.set_log_time_enabled(False)
        rec.save(tmp, default_blueprint=_blueprint(w2c, depth, tokens is not None))
        summary.tokens = _log_static(rec, tokens)
        for t in range(len(frames)):
            usable = np.isfinite(depth[t]) & (depth[t] > 0)
            if valid is not None:
                usable &= valid[t]
            counts = _log_frame(rec, t, frames[t], depth[t], w2c[t], k_mats[t], dynamic[t],
                                None if soft is None else soft[t],
                                sample_pixels(usable, max_points_per_frame, rng))
            summary.static_points.append(counts[0])
            summary.dynamic_points.append(counts[1])
        rec.flush()
        rec.disconnect()

    atomic_write(path, write)
    return summary
