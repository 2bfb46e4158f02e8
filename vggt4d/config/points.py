"""``points.*``: which pixels of the prediction become scene points, and in which frame
(:mod:`vggt4d.points`)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from vggt4d.errors import UserError

METRIC_MODELS = ("da3nested-giant-large",)
"""Models whose depth is in metres (the nested model scales its any-view depth by the metric
branch; da3metric-large alone has no camera head)."""


class Scale(StrEnum):
    """metric | median_depth | auto (metric for metric models, else median_depth) | raw (DA3's
    own depth units, unscaled, as the token script used them)."""

    auto = "auto"
    metric = "metric"
    median_depth = "median_depth"
    raw = "raw"


class Up(StrEnum):
    """z: DA3's OpenCV world rotated to z-up (right when the first camera is upright); cameras:
    the vertical estimated from all cameras; none: DA3's world as it is."""

    z = "z"
    cameras = "cameras"
    none = "none"


@dataclass
class PointsConfig:
    """``points.*``: which pixels become points and in which frame (see the module docstring)."""

    conf_percentile: float = 5.0
    """Drop pixels whose DA3 confidence is below this percentile of the clip's (0 = keep all)."""
    sky_threshold: float = 0.3
    """Drop pixels whose sky probability is ≥ this (DA3's own threshold); models without a sky
    head keep every pixel."""
    max_depth: float = 0.0
    """Drop pixels whose DA3 depth is not below this (in DA3's depth units, before scaling; the
    token script's 50); 0 = no limit."""
    max_per_frame: int = 0
    """Seeded random subsample of at most this many points per frame builds the voxels (the
    token script's 50000); 0 = all. Every kept pixel still gets its voxel index."""
    scale: Scale = Scale.auto
    """metric | median_depth | auto (metric for metric models, else median_depth) | raw (DA3's
    own depth units, unscaled, as the token script used them)."""
    median_depth: float = 2.0
    """Median depth in metres after ``scale=median_depth``."""
    up: Up = Up.z
    """z: rotate DA3's OpenCV world to z-up (Concerto's convention; right when the first camera
    is upright); cameras: the vertical estimated from all cameras (:func:`camera_vertical`);
    none: keep DA3's world."""
    normals: bool = True
    """Estimate normals from the depth map; false = zero normals (the token script's choice)."""
    normal_max_jump: float = 0.05
    """No normal where a neighbour's depth differs by more than this fraction."""
    seed: int = 0
    """Seeds the per-frame subsample (the run's ``seed`` unless set)."""

    def check(self) -> None:
        if not 0 <= self.conf_percentile < 100:
            raise UserError(f"points.conf_percentile={self.conf_percentile} must be in [0, 100)")
        if not 0 < self.sky_threshold <= 1:
            raise UserError(f"points.sky_threshold={self.sky_threshold} must be in (0, 1]")
        if not self.max_depth >= 0:
            raise UserError(f"points.max_depth={self.max_depth} must be >= 0 (0 = no limit)")
        if self.max_per_frame < 0:
            raise UserError(f"points.max_per_frame={self.max_per_frame} must be >= 0 (0 = all)")
        if not self.median_depth > 0:
            raise UserError(f"points.median_depth={self.median_depth} must be > 0 (metres)")
        if not self.normal_max_jump > 0:
            raise UserError(f"points.normal_max_jump={self.normal_max_jump} must be > 0")

    def scale_mode(self, model_name: str) -> str:
        """The scale actually used for ``model_name`` (``auto`` resolved)."""
        metric = model_name in METRIC_MODELS
        if self.scale == "auto":
            return "metric" if metric else "median_depth"
        if self.scale == "metric" and not metric:
            raise UserError(f"points.scale=metric needs a metric model ({', '.join(METRIC_MODELS)}"
                            f"); {model_name}'s depth has no unit: use points.scale=median_depth")
        return self.scale
