"""``data=``: where the frames come from (an image folder, a video file, the synthetic scene,
one sequence of a benchmark dataset)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

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


class DatasetName(StrEnum):
    """The benchmark datasets :mod:`vggt4d.datasets` reads in their official layouts."""

    davis2016 = "davis2016"
    davis2017 = "davis2017"
    sintel = "sintel"
    tum = "tum"
    bonn = "bonn"
    kitti = "kitti"


@dataclass
class DatasetData:
    """One sequence of a benchmark dataset read in place (:func:`vggt4d.datasets.read_sequence`),
    with whatever ground truth it has (masks, void, depth, cameras), frames
    ``[start:stop:stride][:max_frames]`` (0 = all); ``options`` are the reader's keyword options
    (e.g. ``{pass_name: clean}`` for Sintel, ``{associate_with: [pose]}`` for TUM)."""

    source: str = "dataset"
    dataset: DatasetName = MISSING
    root: str = MISSING
    sequence: str = MISSING
    start: int = 0
    stop: int | None = None
    stride: int = 1
    max_frames: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Ranges and option names (the files are looked at when the frames stage checks)."""
        from vggt4d.datasets import DATASETS, options_of

        _check_max_frames(self.max_frames)
        if self.start < 0 or (self.stop is not None and self.stop <= self.start):
            raise UserError(f"data.start={self.start}, data.stop={self.stop}: need 0 <= start "
                            f"< stop (stop null = to the end)")
        if self.stride < 1:
            raise UserError(f"data.stride={self.stride} must be >= 1")
        if not str(self.root).strip() or not str(self.sequence).strip():
            raise UserError("data.root and data.sequence must name the dataset folder and one "
                            "of its sequences")
        valid = options_of(DATASETS[str(self.dataset)].read_sequence)
        unknown = sorted(set(self.options) - set(valid))
        if unknown:
            raise UserError(f"data.options.{unknown[0]}: {self.dataset} has no such option; "
                            f"valid options are {', '.join(valid) or 'none'}")


def _check_max_frames(max_frames: int) -> None:
    if max_frames < 0:
        raise UserError(f"data.max_frames={max_frames} must be >= 0 (0 = all frames)")


DataConfig = ImagesData | VideoData | SyntheticData | DatasetData
