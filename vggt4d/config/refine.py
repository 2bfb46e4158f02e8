"""``refine.*``: the 3-D refinement of the coarse masks (:mod:`vggt4d.refine`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from vggt4d.errors import UserError


class Score(StrEnum):
    """``absolute``: mean |Δz| + mean Σ|Δrgb|/3 (VGGT4D); ``residual``: |Δz|/d relative;
    ``gradient``: the projection-gradient cue of the first full research script."""

    absolute = "absolute"
    residual = "residual"
    gradient = "gradient"


class Sampling(StrEnum):
    """``official``: sample at index x (half a pixel off the back-projection's pixel centres,
    zeros outside, as VGGT4D's code); ``consistent``: at x − 0.5, border repeated."""

    official = "official"
    consistent = "consistent"


class CloseKernel(StrEnum):
    ellipse = "ellipse"
    square = "square"


class Method(StrEnum):
    """``clusters``: VGGT4D's refinement (removes coarse pixels of static clusters);
    ``reprojection``: the "hooks" research script's per-pixel check, which adds the pixels whose
    depth disagrees with frames t ± 1 (:mod:`vggt4d.reprojection`)."""

    clusters = "clusters"
    reprojection = "reprojection"


@dataclass
class RefineConfig:
    """Settings of :func:`vggt4d.refine.refine_masks`; the defaults are VGGT4D's official
    refinement (its ``RefineDynMask`` and demo; see docs/method.md)."""

    method: Method = Method.clusters
    """With ``reprojection`` only ``tau`` applies."""
    neighbours: int = 20
    """Outlier removal: Open3D's ``nb_neighbors``, the point itself included."""
    std_ratio: float = 2.5
    """Inlier when the mean kNN distance < mean + std_ratio · std."""
    clusters: int = 30
    """k-means clusters per frame (fewer when the frame has fewer points)."""
    seed: int = 42
    """k-means ``random_state`` (VGGT4D: 42) and the ``max_points`` subsample seed."""
    window: int = 0
    """0 = project into every other frame; k = frames t−k..t+k only."""
    sampling: Sampling = Sampling.official
    visibility_margin: float = 0.01
    """A projection counts when z − margin < d (``absolute``), z < d·(1 + margin) otherwise."""
    min_valid: float = 0.05
    """Fewer counted projections than this fraction: the cluster stays dynamic."""
    tau: float = 0.1
    """A cluster stays dynamic when its score > tau (``reprojection``: a pixel is added when
    its mean relative depth error in t ± 1 > tau)."""
    score: Score = Score.absolute
    gradient_weight: float = 10.0
    """``gradient`` score: gradient × this + photometric × 1 (the research scripts: 10)."""
    close: int = 5
    """Close size after refinement (0 or 1: none)."""
    close_kernel: CloseKernel = CloseKernel.ellipse
    """``ellipse`` (OpenCV's MORPH_ELLIPSE, VGGT4D) or ``square``."""
    dilate: int = 3
    """Square dilation size after the close (0 or 1: none)."""
    max_points: int = 0
    """> 0: k-means on a seeded subsample of at most this many points per frame."""
    min_points: int = 0
    """Fewer usable coarse-dynamic pixels in the clip: the masks are kept unchanged."""

    def check(self) -> None:
        """Raise :class:`UserError` naming the first bad field, its value and the valid range."""
        for name, low in [("neighbours", 1), ("clusters", 1), ("seed", 0), ("window", 0),
                          ("close", 0), ("dilate", 0), ("max_points", 0), ("min_points", 0)]:
            value = getattr(self, name)
            if int(value) != value or value < low:
                raise UserError(f"refine.{name} = {value} is invalid: must be an integer >= {low}")
        if self.seed >= 2**32:
            raise UserError(f"refine.seed = {self.seed} is invalid: scikit-learn takes seeds "
                            "below 2**32")
        if not self.std_ratio > 0:
            raise UserError(f"refine.std_ratio = {self.std_ratio} is invalid: must be > 0")
        if not 0.0 <= self.min_valid <= 1.0:
            raise UserError(f"refine.min_valid = {self.min_valid} is invalid: must be in [0, 1]")
        if not math.isfinite(self.tau):
            raise UserError(f"refine.tau = {self.tau} is invalid: must be a finite number")
        for name in ("visibility_margin", "gradient_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"refine.{name} = {value} is invalid: must be a finite number "
                                ">= 0")
