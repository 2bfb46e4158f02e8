"""``chunk.*``: long videos as overlapping chunks, one DA3 forward each, aligned into the first
chunk's world (:mod:`vggt4d.chunks`, :mod:`vggt4d.align`, the predict stage)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from vggt4d.errors import UserError


class AlignMode(StrEnum):
    """How consecutive chunks are aligned on their shared frames (:mod:`vggt4d.align`):
    similarity (``sim3``), rigid (``se3``: scale 1) or rigid after the median depth ratio
    (``scale_se3``, DA3-Streaming's ``scale+se3``)."""

    sim3 = "sim3"
    se3 = "se3"
    scale_se3 = "scale+se3"


@dataclass
class ChunkConfig:
    """``chunk.*``: how a clip is split into DA3 forwards (off by default)."""

    length: int = 0
    """Frames per DA3 forward; 0 = the whole clip in one forward (no chunks). With ``auto``: the
    longest chunk allowed (0 = no cap)."""
    overlap: int = 12
    """Frames consecutive chunks share, the alignment's evidence; with ``gram.window=offsets``
    at least the window's span ``max(0, offsets) − min(0, offsets)`` (12 for ±2, ±4, ±6)."""
    auto: bool = False
    """Chunk length = the longest whose forward fits the device by the memory estimate
    (``memory_limit_gb`` when set, else the memory free now), capped by ``length`` when > 0."""
    align: AlignMode = AlignMode.sim3
    huber_delta: float = 0.1
    """Huber threshold of the alignment, relative to the overlap's scene scale (DA3-Streaming:
    0.1)."""
    iterations: int = 5
    """Huber reweighting steps after the closed form."""
    max_points: int = 1_000_000
    """Correspondences per overlap at most (every k-th confident pixel beyond it)."""

    @property
    def enabled(self) -> bool:
        """Whether the clip may be split (a clip that fits one chunk is still one forward)."""
        return self.auto or self.length > 0

    def check(self) -> None:
        if self.length < 0 or self.length == 1:
            raise UserError(f"chunk.length={self.length} must be 0 (off) or at least 2 frames")
        if self.overlap < 1:
            raise UserError(f"chunk.overlap={self.overlap} must be >= 1 (chunks are aligned on "
                            f"shared frames)")
        if self.length and self.overlap >= self.length:
            raise UserError(f"chunk.overlap={self.overlap} must be below chunk.length="
                            f"{self.length}")
        if not self.huber_delta > 0 or self.iterations < 0:
            raise UserError(f"chunk.huber_delta={self.huber_delta} must be > 0 and "
                            f"chunk.iterations={self.iterations} >= 0")
        if self.max_points < 3:
            raise UserError(f"chunk.max_points={self.max_points} must be >= 3")
