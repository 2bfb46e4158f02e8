"""``masks.*``: from the fused patch map to soft and binary masks (:mod:`vggt4d.masks`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from vggt4d.errors import UserError

MORPHOLOGY_OPS = ("open", "close", "dilate", "erode")


class KMeansFeatures(StrEnum):
    """Patch features k-means clusters: ``encoder`` = the tokens leaving the last per-frame
    block before ``alt_start``, through the backbone's final LayerNorm (DA3's counterpart of the
    normed DINO-encoder output VGGT4D clusters); ``last_block`` = the last block's raw output."""

    encoder = "encoder"
    last_block = "last_block"


class Upsample(StrEnum):
    bilinear = "bilinear"
    guided = "guided"


class Guide(StrEnum):
    """Guided-filter guide: grey, RGB, RGB + inverse depth, or 0.7·grey + 0.3·inverse depth."""

    grey = "grey"
    rgb = "rgb"
    rgbd = "rgbd"
    grey_depth = "grey_depth"


class Binarize(StrEnum):
    multi_otsu = "multi_otsu"
    otsu = "otsu"
    threshold = "threshold"
    hysteresis = "hysteresis"
    mean_above = "mean_above"


@dataclass
class MasksConfig:
    """Steps in order: k-means smoothing, temporal/spatial Gaussians (patch level), upsampling
    with grey morphology around the guided filter, binarisation, weak-frame guards."""

    kmeans: bool = False
    """VGGT4D's cluster smoothing: each patch takes its k-means cluster's mean score."""
    kmeans_clusters: int = 64
    kmeans_features: KMeansFeatures = KMeansFeatures.encoder
    kmeans_seed: int = 42
    """scikit-learn ``random_state`` of the k-means (VGGT4D's code fixes 42)."""
    kmeans_rescale: bool = True
    """Min–max rescale every frame after the cluster means (VGGT4D's code does)."""
    temporal_sigma: float = 0.0
    """Gaussian over frames (in frames) of the patch-level map; 0 = off."""
    spatial_sigma: float = 0.0
    """Gaussian over patches of the patch-level map (3×3 taps for σ 0.5); 0 = off."""
    upsample: Upsample = Upsample.bilinear
    guide: Guide = Guide.rgb
    guided_radius: float = 0.02
    """Guided-filter box radius as a fraction of the frame's longer side."""
    guided_eps: float = 1e-4
    morph_before: list[str] = field(default_factory=list)
    """Grey morphology on the soft map before the guided filter, e.g. ``["open:3"]``."""
    morph_after: list[str] = field(default_factory=list)
    """Grey morphology on the soft map after the guided filter, e.g. ``["close:7"]``."""
    binarize: Binarize = Binarize.multi_otsu
    threshold: float = 0.5
    """``threshold``: the cut; ``mean_above``: the floor of the values averaged."""
    low: float = 0.3
    high: float = 0.6
    """``hysteresis`` thresholds."""
    empty_below_mean: float = 0.0
    """Frames whose soft map averages below this get an empty mask."""
    empty_below_max: float = 0.0
    """Frames whose soft map never reaches this get an empty mask."""

    def check(self) -> None:
        for key in ("morph_before", "morph_after"):
            for step in getattr(self, key):
                op, _, size = step.partition(":")
                if op not in MORPHOLOGY_OPS or not size.isdigit():
                    raise UserError(f"masks.{key} entry '{step}' must be op:size with op in "
                                    f"{', '.join(MORPHOLOGY_OPS)} (e.g. close:7)")
        if self.kmeans_clusters < 1:
            raise UserError(f"masks.kmeans_clusters={self.kmeans_clusters} must be >= 1")
        if not 0 <= self.guided_radius < 1:
            raise UserError(f"masks.guided_radius={self.guided_radius} is a fraction of the "
                            f"frame's longer side: use 0 <= r < 1 (e.g. 0.01-0.02)")
        if not self.guided_eps > 0:
            raise UserError(f"masks.guided_eps={self.guided_eps} must be > 0")
        if self.low > self.high:
            raise UserError(f"masks.low={self.low} must not exceed masks.high={self.high}")
