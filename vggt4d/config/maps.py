"""``maps.*``: Easi3R maps and VGGT4D cues from the Gram statistics (:mod:`vggt4d.maps`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from vggt4d.errors import UserError


class BandMode(StrEnum):
    """``mean_of_layers``: a band's statistic is the mean of its layers' statistics;
    ``exact``: the statistic of the layer-averaged similarities (VGGT4D's order)."""

    mean_of_layers = "mean_of_layers"
    exact = "exact"


class Normalize(StrEnum):
    minmax = "minmax"
    percentile = "percentile"


class NormalizeScope(StrEnum):
    frame = "frame"
    sequence = "sequence"


class ShallowForm(StrEnum):
    """``official``: (1 − S^KK)·V^QK (VGGT4D's code); ``notes``: 1 − S^KK·V^QK."""

    official = "official"
    notes = "notes"


class DeepForm(StrEnum):
    """``official``: S^QQ·(1 − V^QQ); ``inverted``: 1 − S^QQ·(1 − V^QQ)."""

    official = "official"
    inverted = "inverted"


class Fusion(StrEnum):
    product = "product"
    sum = "sum"


class Cue(StrEnum):
    """``vggt4d``: the fused VGGT4D cues from the Gram statistics; ``query_cosine``: 1 − the
    mean cosine of each patch's pre-RoPE query with the same patch in the other frames
    (:mod:`vggt4d.temporal`, the AnyDynamics "hooks" research script)."""

    vggt4d = "vggt4d"
    query_cosine = "query_cosine"


@dataclass
class MapsConfig:
    """How the statistics become cue maps and the fused dynamic map."""

    cue: Cue = Cue.vggt4d
    """The dynamic map's source; with ``query_cosine`` only the normalisation settings apply."""
    band_mode: BandMode = BandMode.mean_of_layers
    global_only: bool = False
    """Keep only the global (cross-frame) blocks of each band, as VGGT4D uses VGGT's."""
    normalize: Normalize = Normalize.minmax
    percentiles: list[float] = field(default_factory=lambda: [5.0, 95.0])
    """[low, high] of ``normalize=percentile``."""
    normalize_scope: NormalizeScope = NormalizeScope.frame
    """``frame`` (each frame on its own, VGGT4D) or ``sequence`` (all frames together)."""
    shallow_form: ShallowForm = ShallowForm.official
    deep_form: DeepForm = DeepForm.official
    fusion: Fusion = Fusion.product
    mix_inv_similarity: bool = False
    """Average the fused map with 1 − S^QK over ``std_layers`` (the fused/refined scripts)."""
    std_layers: list[int] = field(default_factory=list)
    """Layers of the 1 − S^QK map; empty = all band layers."""

    def check(self) -> None:
        low, high = self.percentiles if len(self.percentiles) == 2 else (1, 0)
        if not 0 <= low < high <= 100:
            raise UserError(f"maps.percentiles={list(self.percentiles)} must be [low, high] "
                            f"with 0 <= low < high <= 100")
