"""``eval.*``: scoring masks, depth and camera poses against ground truth (:mod:`vggt4d.evaluate`,
:mod:`vggt4d.geometry_metrics`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from vggt4d.errors import UserError


class Protocol(StrEnum):
    """Every convention of a mask benchmark at once (:func:`vggt4d.evaluate.protocol_rules`):
    ``davis2016`` (first/last frame left out, both-empty frames score 1), ``davis2017``
    (all frames, void 255 left out), ``vggt4d`` (all frames, an empty union scores J = 0)."""

    davis2016 = "davis2016"
    davis2017 = "davis2017"
    vggt4d = "vggt4d"


class DepthAlignment(StrEnum):
    """How predicted depth is brought to the ground truth's scale before scoring, once per
    sequence over all its frames unless named per frame (:func:`vggt4d.geometry_metrics.
    align_depth`): ``median`` (s = median ratio), ``median_per_frame``, ``scale_shift``
    (MonST3R's and CUT3R's "scale&shift": L1 fit of s·d + t by Adam from the median scale, as
    their code does it), ``scale`` (CUT3R's "scale": L1 fit of s·d by 10 reweighted least
    squares steps), ``none``."""

    median = "median"
    median_per_frame = "median_per_frame"
    scale_shift = "scale_shift"
    scale = "scale"
    none = "none"


class MetricFamily(StrEnum):
    """What the eval stage scores when the clip has that ground truth: ``masks`` (J, F),
    ``depth`` (Abs Rel, δ<1.25), ``pose`` (ATE, RPE)."""

    masks = "masks"
    depth = "depth"
    pose = "pose"


@dataclass
class EvalConfig:
    gt_path: str = ""
    """A DAVIS-style folder of ground-truth mask PNGs for real clips (synthetic: built in)."""
    protocol: Protocol = Protocol.davis2017
    bound_th: float = 0.008
    """Boundary tolerance: a fraction of the image diagonal, or pixels when >= 1."""
    metrics: list[MetricFamily] = field(
        default_factory=lambda: [MetricFamily.masks, MetricFamily.depth, MetricFamily.pose])
    """Families scored when the clip has their ground truth (the others are skipped)."""
    depth_alignment: DepthAlignment = DepthAlignment.median
    depth_cap: float | None = None
    """Ground-truth depth counts only below this (metres; MonST3R's ``max_depth``, 70 on
    Sintel and Bonn); null = no cap."""
    depth_clip: float | None = None
    """Aligned predicted depth is clipped to at most this (MonST3R's ``post_clip_max``, 70 on
    Sintel); null = no clip."""

    def check(self) -> None:
        if not self.bound_th > 0 or (self.bound_th >= 1 and self.bound_th != int(self.bound_th)):
            raise UserError(f"eval.bound_th={self.bound_th} must be a fraction of the diagonal "
                            f"in (0, 1) or a whole number of pixels >= 1")
        for name in ("depth_cap", "depth_clip"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UserError(f"eval.{name}={value} must be a depth > 0 in metres (or null)")
        if len(set(self.metrics)) != len(self.metrics):
            raise UserError(f"eval.metrics={[str(m) for m in self.metrics]} lists a family "
                            "twice")
