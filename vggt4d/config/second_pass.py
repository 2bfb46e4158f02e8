"""``second_pass.*``: DA3 again with the dynamic patches' keys/values hidden
(:mod:`vggt4d.second_pass`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from vggt4d.errors import UserError


class PatchRule(StrEnum):
    """A patch is dynamic when ``any`` of its pixels is (VGGT4D) or when more than
    ``area_fraction`` of them are (``area``, the grabcut script)."""

    any = "any"
    area = "area"


class LayerRule(StrEnum):
    """``vggt``: ``layers`` are VGGT aggregator layers (a per-frame and a global block each),
    mapped to DA3's alternating blocks from ``alt_start`` on; ``blocks``: DA3 block numbers."""

    vggt = "vggt"
    blocks = "blocks"


@dataclass
class SecondPassConfig:
    layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """Layers whose dynamic keys/values are hidden (VGGT4D: 0-4), read by ``layer_rule``."""
    layer_rule: LayerRule = LayerRule.vggt
    patch_rule: PatchRule = PatchRule.any
    area_fraction: float = 0.1

    def check(self) -> None:
        if not self.layers or min(self.layers) < 0:
            raise UserError(f"second_pass.layers={list(self.layers)} must be a non-empty list "
                            f"of layers >= 0")
        if not 0 <= self.area_fraction < 1:
            raise UserError(f"second_pass.area_fraction={self.area_fraction} must be in [0, 1)")
