"""``data=``: where the frames come from (an image folder, a video file, the synthetic scene)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from vggt4d.errors import UserError
from vggt4d.synthetic import SyntheticConfig


@dataclass
class ImagesData:
    """A folder of ``.jpg/.jpeg/.png`` frames in natural name order (``frame_2`` before
    ``frame_10``), every ``stride``-th, at most ``max_frames`` (0 = all)."""

    source: str = "images"
    path: str = MISSING
    stride: int = 1
    max_frames: int = 0

    def check(self) -> None:
        _check_max_frames(self.max_frames)
        if self.stride < 1:
            raise UserError(f"data.stride={self.stride} must be >= 1")


@dataclass
class VideoData:
    """A video file decoded by imageio-ffmpeg (no system ffmpeg needed), resampled to ``fps``
    (capped at the video's own rate), at most ``max_frames`` (0 = all)."""

    source: str = "video"
    path: str = MISSING
    fps: float = 10.0
    max_frames: int = 0

    def check(self) -> None:
        _check_max_frames(self.max_frames)
        if not self.fps > 0:
            raise UserError(f"data.fps={self.fps} must be > 0")


@dataclass
class SyntheticData(SyntheticConfig):
    """The project's own rendered scene with ground truth (see :mod:`vggt4d.synthetic`)."""

    source: str = "synthetic"

    def check(self) -> None:
        self.validate()


def _check_max_frames(max_frames: int) -> None:
    if max_frames < 0:
        raise UserError(f"data.max_frames={max_frames} must be >= 0 (0 = all frames)")


DataConfig = ImagesData | VideoData | SyntheticData
