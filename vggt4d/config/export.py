"""``export.*``: what the export stage writes (:mod:`vggt4d.export.stage`) and how."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from vggt4d.errors import UserError


class ExportFormat(StrEnum):
    """rerun: ``scene.rrd``; tum: ``export/tum/``; colmap: ``export/sparse/0/`` beside
    ``export/images/`` and the masks; nerfstudio: ``export/transforms.json`` beside them."""

    rerun = "rerun"
    tum = "tum"
    colmap = "colmap"
    nerfstudio = "nerfstudio"


class ColmapFormat(StrEnum):
    """COLMAP's binary (``*.bin``) or text (``*.txt``) model files."""

    binary = "binary"
    text = "text"


@dataclass
class ExportConfig:
    """Which exports the export stage writes and how (see :mod:`vggt4d.export`)."""

    formats: list[ExportFormat] = field(default_factory=lambda: [ExportFormat.rerun])
    max_points_per_frame: int = 20_000
    """Points per frame in ``scene.rrd``: a seeded uniform subsample of the frame's pixels with
    depth that ``points.*`` keeps; 0 = every such pixel."""
    seed: int = 0
    """Seed of that subsample."""
    colmap_format: ColmapFormat = ColmapFormat.binary
    tum_depth_scale: float = 1000.0
    """Depth PNG value per DA3 depth unit in ``export/tum/depth`` (1000: millimetres for a
    metric model, the research script's convention; TUM's own datasets use 5000)."""

    def check(self) -> None:
        """Raise :class:`UserError` naming the first bad value and what it accepts."""
        if not self.formats:
            raise UserError(f"export.formats=[] exports nothing: list one or more of "
                            f"{', '.join(ExportFormat)} (or drop export from the pipeline)")
        if self.max_points_per_frame < 0:
            raise UserError(f"export.max_points_per_frame={self.max_points_per_frame} must be "
                            f">= 0 (0 = every pixel)")
        if not (math.isfinite(self.tum_depth_scale) and self.tum_depth_scale > 0):
            raise UserError(f"export.tum_depth_scale={self.tum_depth_scale} must be a positive "
                            f"number (PNG value per depth unit, e.g. 1000)")
