"""``viz.*``: pictures and videos of the maps and masks (:mod:`vggt4d.pictures`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vggt4d.errors import UserError


@dataclass
class VizConfig:
    layers: list[int] = field(default_factory=list)
    """Layers whose per-frame map PNGs are written; empty = the first block of each band."""
    cmap: str = "jet"
    """A matplotlib colour map name."""
    power: float = 1.0
    """Map values are raised to this power before colouring (the research heatmaps: 1.5)."""
    blur: float = 0.0
    """Gaussian blur of the upsampled maps, σ as a fraction of the frame width (e.g. 0.02)."""
    videos: bool = True
    fps: float = 10.0
    sheet_frames: list[int] = field(default_factory=list)
    """Frames that get a per-statistic contact sheet of all layers; empty = the middle frame."""

    def check(self) -> None:
        import matplotlib

        if self.cmap not in matplotlib.colormaps:
            raise UserError(f"viz.cmap='{self.cmap}' is not a matplotlib colour map "
                            f"(e.g. jet, turbo, viridis, magma)")
        if not self.fps > 0:
            raise UserError(f"viz.fps={self.fps} must be > 0")
        if not self.power > 0 or self.blur < 0:
            raise UserError(f"viz.power={self.power} must be > 0 and viz.blur={self.blur} >= 0")
