"""``model=``: one DA3 variant, the depth table of its hooked network, and layer bands.

The values live in ``conf/model/<variant>.yaml``; this schema only types them. Layer bands are
0-indexed, inclusive ``[first, last]`` backbone blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from omegaconf import MISSING

from vggt4d.errors import UserError

GIANT_DEPTH = 40
"""Blocks of DA3-giant's any-view backbone: presets write their layer numbers for it."""

GIANT_BANDS = {"shallow": (1, 5), "middle": (6, 15), "deep": (18, 21)}
"""The AnyDynamics notes' cue bands for the 40-block giant (0-indexed, inclusive)."""

CUE_BANDS = ("shallow", "middle", "deep", "deep_var")
"""Cue bands of the VGGT4D maps: ``deep_var`` is the band of the deep cue's V^QQ (VGGT4D takes
S^QQ and V^QQ over different layers; by default it is the ``deep`` band)."""


class Preset(StrEnum):
    vit_small = "vit_small"
    vit_base = "vit_base"
    vit_large = "vit_large"
    vit_giant2 = "vit_giant2"


class RefViewStrategy(StrEnum):
    """DA3's choice of the reference view it moves to position 0 (≥ 3 frames, no poses)."""

    first = "first"
    middle = "middle"
    saddle_balanced = "saddle_balanced"
    saddle_sim_range = "saddle_sim_range"


@dataclass
class ModelBands:
    """A model's default cue bands (``conf/model/*.yaml``)."""

    shallow: list[int] = MISSING
    middle: list[int] = MISSING
    deep: list[int] = MISSING


@dataclass
class ModelConfig:
    """One DA3 variant and the depth table of the network whose attention is hooked.

    ``hooked_network`` is the attribute path from the DA3 network to the ``DepthAnything3Net``
    whose backbone is hooked: empty for plain variants, ``da3`` (the any-view giant) for the
    nested model, so no statistics are computed in its metric network. The table is checked
    against the built network at start-up (:func:`vggt4d.model.check_depth_table`).
    """

    name: str = MISSING
    preset: Preset = MISSING
    num_blocks: int = MISSING
    embed_dim: int = MISSING
    num_heads: int = MISSING
    head_dim: int = 64
    alt_start: int = -1
    """First block with RoPE, qk-norm and alternating attention (−1: none)."""
    global_blocks: list[int] = field(default_factory=list)
    out_layers: list[int] = field(default_factory=list)
    patch_start_idx: int = 1
    hooked_network: str = ""
    camera_head: bool = True
    """Whether the hooked network predicts cameras and a depth confidence (the mono and metric
    models predict depth, and sky, only)."""
    weights: str = MISSING
    """Hub repo id, a local folder in the hub layout, a ``.safetensors`` file, ``random`` or
    ``demo`` (the built-in hand-made da3-small weights, :mod:`vggt4d.demo_weights`)."""
    ref_view_strategy: RefViewStrategy = RefViewStrategy.saddle_balanced
    bands: ModelBands = field(default_factory=ModelBands)

    def check(self) -> None:
        from depth_anything_3.registry import MODEL_REGISTRY

        if self.name not in MODEL_REGISTRY:
            raise UserError(f"unknown model.name '{self.name}'; known: "
                            f"{', '.join(MODEL_REGISTRY)}")
        check_bands(self.bands, ("shallow", "middle", "deep"), self.num_blocks, "model.bands")
        if self.weights == "demo":
            from vggt4d.demo_weights import check_demo_model

            check_demo_model(self.name)

    def require_cameras(self, stage: str) -> None:
        """Raise :class:`UserError` when ``stage`` needs DA3's cameras and this model predicts
        none."""
        if not self.camera_head:
            raise UserError(f"{stage} needs camera poses, but {self.name} predicts depth only "
                            f"(no camera head): use da3-small, da3-base, da3-large, da3-giant "
                            f"or da3nested-giant-large, or remove {stage} from the pipeline")


@dataclass
class BandsConfig:
    """``bands.*``: the cue bands of this run, 0-indexed inclusive ``[first, last]`` blocks;
    by default the model's (``deep_var``: the ``deep`` band)."""

    shallow: list[int] = MISSING
    middle: list[int] = MISSING
    deep: list[int] = MISSING
    deep_var: list[int] = MISSING


def default_bands() -> BandsConfig:
    """The run's bands follow the model's unless overridden (interpolations, resolved late)."""
    return BandsConfig(shallow="${model.bands.shallow}", middle="${model.bands.middle}",
                       deep="${model.bands.deep}", deep_var="${bands.deep}")


def scale_band(band: tuple[int, int], num_blocks: int) -> tuple[int, int]:
    """Map a 40-block band to a network of ``num_blocks`` blocks at the same fraction of depth.

    The band is the half-open block interval ``[a, b + 1)`` of the giant; scaled by
    ``num_blocks / 40`` and floored it becomes ``[floor(a·n/40), floor((b+1)·n/40) − 1]``, kept at
    least one block wide. Consecutive giant bands stay disjoint and in order after scaling.
    """
    first, last = band
    start = math.floor(first * num_blocks / GIANT_DEPTH)
    end = max(start, math.floor((last + 1) * num_blocks / GIANT_DEPTH) - 1)
    return start, end


def scale_layer(layer: int, depth: int, num_blocks: int) -> int:
    """A single block of a ``depth``-block network at the same fraction of a ``num_blocks`` one."""
    return min(num_blocks - 1, math.floor(layer * num_blocks / depth))


def check_bands(bands: BandsConfig | ModelBands, names: tuple[str, ...], num_blocks: int,
                prefix: str = "bands") -> None:
    """Each band is ``[first, last]`` with ``0 <= first <= last < num_blocks``."""
    for name in names:
        band = list(getattr(bands, name))
        if len(band) != 2 or not 0 <= band[0] <= band[1] < num_blocks:
            raise UserError(
                f"{prefix}.{name}={band} is not a band of this model: give [first, last] with "
                f"0 <= first <= last <= {num_blocks - 1} (0-indexed blocks, inclusive)"
            )


def band_layers(bands: BandsConfig,
                global_blocks: list[int] | None = None) -> dict[str, tuple[int, ...]]:
    """Band name → the blocks it spans; with ``global_blocks``, only those (a band holding none
    takes the first global block after its start, or the last one)."""
    layers = {}
    for name in CUE_BANDS:
        first, last = getattr(bands, name)
        span = tuple(range(first, last + 1))
        if global_blocks:
            chosen = tuple(i for i in span if i in global_blocks)
            later = [i for i in global_blocks if i >= first] or [max(global_blocks)]
            span = chosen or (later[0],)
        layers[name] = span
    return layers
