"""``temporal.*``: the cross-frame query cosine computed inside the DA3 forward
(:mod:`vggt4d.temporal`), read by ``maps.cue=query_cosine``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TemporalConfig:
    """Which blocks' pre-RoPE queries are compared across frames."""

    layers: list[int] = field(default_factory=list)
    """DA3 blocks whose statistic is computed and averaged; empty = the model's global blocks
    (DA3-giant: 13, 15, …, 39, as the AnyDynamics "hooks" research script)."""
