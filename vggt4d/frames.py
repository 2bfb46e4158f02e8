"""Frame sources (image folder, video, synthetic scene, benchmark dataset sequence) and DA3's
input preprocessing.

Frames of different sizes in one folder are resized to the first frame's size with a warning
(DA3 needs one size per clip; refusing would make mixed-camera folders unusable).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vggt4d.config import PATCH_SIZE
from vggt4d.config.data import DataConfig, DatasetData, ImagesData, SyntheticData, VideoData
from vggt4d.errors import UserError
from vggt4d.stage import Stage

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_FRAMES = 2


@dataclass
class GroundTruth:
    """Known answers of a clip at its own resolution; a kind the source lacks is ``None`` (DAVIS
    has masks only, KITTI depth only, TUM depth and poses, the synthetic scene all but void)."""

    depth: np.ndarray | None = None  # (T, H, W) float32 z-depth, NaN = no measurement
    dynamic_masks: np.ndarray | None = None  # (T, H, W) bool
    intrinsics: np.ndarray | None = None  # (T, 3, 3) pixels of the (H, W) frames
    extrinsics: np.ndarray | None = None  # (T, 3, 4) world-to-camera, OpenCV
    void_masks: np.ndarray | None = None  # (T, H, W) bool, pixels left out of mask scores

    def has_any(self) -> bool:
        return any(value is not None for value in vars(self).values())


@dataclass
class Clip:
    """Decoded frames ``(T, H, W, 3)`` uint8 with their names and optional ground truth."""

    frames: np.ndarray
    names: list[str]
    ground_truth: GroundTruth | None = None


def to_rgb8(image: Image.Image) -> np.ndarray:
    """Any Pillow image as (H, W, 3) uint8 RGB with the full range kept.

    16- and 32-bit integer images (``I;16*``, ``I``) are scaled from their bit depth (values
    above 65535 clip), float images (``F``) from [0, 1] when their values lie there, else from
    [0, 255]; alpha is ignored (``LA``, ``RGBA``, ``PA``); palette, CMYK, YCbCr, LAB and
    1-bit images go through Pillow's own conversion. ``convert("RGB")`` alone would clip 16-bit
    values to 255, turning a 16-bit grey frame white.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        top = 1.0 if finite.size and finite.min() >= 0 and finite.max() <= 1 else 255.0
        grey = np.clip(np.round(np.nan_to_num(values) * 255.0 / top), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "LA":
        image = image.convert("L")
    return np.asarray(image.convert("RGB"))


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return to_rgb8(image)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"cannot read image {path}: {err}") from None


def natural_key(name: str) -> list:
    """Sort key of a file name with its digit runs compared as numbers (``frame_2`` before
    ``frame_10``)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower())
            for part in re.split(r"(\d+)", name) if part]


def _same_size(frames: list[np.ndarray], names: list[str]) -> np.ndarray:
    """Stack frames, resizing any that differ from the first frame (with one warning)."""
    height, width = frames[0].shape[:2]
    odd = [name for frame, name in zip(frames, names, strict=True)
           if frame.shape[:2] != (height, width)]
    if odd:
        log.warning("%d frame(s) differ in size from the first (%dx%d), e.g. %s; resizing them",
                    len(odd), width, height, odd[0])
        frames = [f if f.shape[:2] == (height, width) else
                  np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC))
                  for f in frames]
    return np.stack(frames)


def _check_count(count: int, source: str) -> None:
    if count < MIN_FRAMES:
        raise UserError(f"{source} gives {count} frame(s); vggt4d needs at least {MIN_FRAMES}")


def image_paths(data: ImagesData) -> list[Path]:
    """The frames of an image folder in natural name order (``stride``, ``max_frames``
    applied); warns when plain name order would differ."""
    folder = Path(data.path).expanduser()
    if not folder.is_dir():
        raise UserError(f"data.path={data.path}: no such directory")
    paths = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not paths:
        raise UserError(f"data.path={data.path} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    paths.sort(key=lambda p: natural_key(p.name))
    if [p.name for p in paths] != sorted(p.name for p in paths):
        log.warning("frames in %s are taken in numeric order (%s, %s, ...), which differs from "
                    "plain name order; zero-pad the numbers to make both agree", folder,
                    paths[0].name, paths[1].name if len(paths) > 1 else "")
    paths = paths[:: data.stride]
    if data.max_frames:
        paths = paths[: data.max_frames]
    _check_count(len(paths), f"data.path={data.path}")
    return paths


def load_images(data: ImagesData) -> Clip:
    paths = image_paths(data)
    names = [p.name for p in paths]
    return Clip(_same_size([_read_image(p) for p in paths], names), names)


def video_metadata(path: Path) -> dict:
    """imageio-ffmpeg's description of a video (``fps``, ``duration``, ``size``), without
    decoding it."""
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        reader.close()
    except (RuntimeError, OSError, StopIteration) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot decode video {path}: {reason}") from None
    return meta


def video_rate(data: VideoData, meta: dict) -> float:
    """The sampling rate: ``data.fps``, capped at the video's own rate (above it frames would
    only repeat), with a warning when capped."""
    source = float(meta.get("fps") or 0)
    if source > 0 and data.fps > source:
        log.warning("data.fps=%g is above the video's %g frames/s: using %g (a higher rate "
                    "would only repeat frames)", data.fps, source, source)
        return source
    return data.fps


def video_frame_count(data: VideoData, meta: dict) -> int:
    """Frames :func:`load_video` will return, from the metadata (duration × rate)."""
    duration = float(meta.get("duration") or 0)
    count = max(1, math.floor(duration * video_rate(data, meta) + 0.5))
    return min(count, data.max_frames) if data.max_frames else count


def load_video(data: VideoData) -> Clip:
    import imageio_ffmpeg

    path = Path(data.path).expanduser()
    if not path.is_file():
        raise UserError(f"data.path={data.path}: no such file")
    rate = video_rate(data, video_metadata(path))
    frames = []
    try:
        reader = imageio_ffmpeg.read_frames(str(path), output_params=["-vf", f"fps={rate}"])
        width, height = next(reader)["size"]
        for raw in reader:
            frames.append(np.frombuffer(raw, np.uint8).reshape(height, width, 3))
            if data.max_frames and len(frames) == data.max_frames:
                reader.close()
                break
    except (RuntimeError, OSError, StopIteration, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot decode video {path}: {reason}") from None
    _check_count(len(frames), f"video {path} at data.fps={rate}")
    return Clip(np.stack(frames), [f"{path.stem}_{i:05d}" for i in range(len(frames))])


@dataclass(frozen=True)
class ClipInfo:
    """What a source will give, known before decoding: frame count, source and processing
    size ``(H, W)``."""

    num_frames: int
    source_size: tuple[int, int]
    size: tuple[int, int]


def _selection(data: DatasetData) -> dict:
    """``read_sequence`` / ``probe_sequence`` arguments of a dataset source."""
    return {"start": data.start, "stop": data.stop, "stride": data.stride,
            "max_frames": data.max_frames or None, **dict(data.options)}


def probe_clip(data: DataConfig, process_res: int) -> ClipInfo:
    """Frame count and sizes from the source's metadata (image headers, the video container,
    the synthetic settings, a dataset's file lists) without decoding frames; raises
    :class:`UserError` for a missing or unreadable source."""
    if isinstance(data, ImagesData):
        paths = image_paths(data)
        try:
            with Image.open(paths[0]) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"cannot read image {paths[0]}: {err}") from None
        count = len(paths)
    elif isinstance(data, VideoData):
        path = Path(data.path).expanduser()
        if not path.is_file():
            raise UserError(f"data.path={data.path}: no such file")
        meta = video_metadata(path)
        width, height = meta["size"]
        count = video_frame_count(data, meta)
        _check_count(count, f"video {path} at data.fps={video_rate(data, meta)}")
    elif isinstance(data, DatasetData):
        from vggt4d.datasets.probe import probe_sequence

        info = probe_sequence(str(data.dataset), data.root, data.sequence, **_selection(data))
        count, (height, width) = info.num_frames, info.size
        _check_count(count, f"{data.dataset} sequence {data.sequence}")
    else:
        data.validate()
        width, height, count = data.width, data.height, data.num_frames
    return ClipInfo(count, (height, width), processing_size(height, width, process_res))


@functools.lru_cache(maxsize=2)
def _rendered(settings: str):
    """Rendered scenes are pure functions of their config (given as JSON): a sweep in one
    process renders once. The arrays are made read-only so no stage can alter the shared copy."""
    from vggt4d.synthetic import render_scene

    scene = render_scene(SyntheticData(**json.loads(settings)))
    for array in vars(scene).values():
        if isinstance(array, np.ndarray):
            array.flags.writeable = False
    return scene


def load_synthetic(data: SyntheticData) -> Clip:
    data.validate()
    scene = _rendered(json.dumps(dataclasses.asdict(data), sort_keys=True))
    truth = GroundTruth(depth=scene.depth, dynamic_masks=scene.dynamic_masks,
                        intrinsics=scene.intrinsics, extrinsics=scene.extrinsics)
    names = [f"synthetic_{i:05d}" for i in range(len(scene.frames))]
    return Clip(scene.frames, names, truth)


def load_dataset(data: DatasetData) -> Clip:
    """One benchmark sequence (:func:`vggt4d.datasets.read_sequence`) with its ground truth;
    frame names are the dataset's file stems."""
    from vggt4d.datasets import read_sequence

    sequence = read_sequence(str(data.dataset), data.root, data.sequence, **_selection(data))
    _check_count(len(sequence.frames), f"{data.dataset} sequence {data.sequence}")
    truth = GroundTruth(depth=sequence.depth, dynamic_masks=sequence.dynamic_masks,
                        intrinsics=sequence.intrinsics, extrinsics=sequence.extrinsics,
                        void_masks=sequence.void_masks)
    return Clip(sequence.frames, list(sequence.frame_names), truth if truth.has_any() else None)


def load_clip(data: DataConfig) -> Clip:
    """Decode the configured source."""
    if isinstance(data, ImagesData):
        return load_images(data)
    if isinstance(data, VideoData):
        return load_video(data)
    if isinstance(data, DatasetData):
        return load_dataset(data)
    return load_synthetic(data)


def processing_size(height: int, width: int, process_res: int) -> tuple[int, int]:
    """DA3's ``upper_bound_resize`` size: longest side → ``process_res``, then each side to the
    nearest multiple of 14 (ties round up)."""
    scale = process_res / max(height, width)
    sides = []
    for side in (height, width):
        scaled = max(1, round(side * scale))
        down = scaled // PATCH_SIZE * PATCH_SIZE
        nearest = down + PATCH_SIZE if scaled - down >= PATCH_SIZE / 2 else down
        sides.append(max(PATCH_SIZE, nearest))
    return sides[0], sides[1]


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``(T, H, W, 3)`` uint8 frames to ``size = (h, w)``: bicubic when enlarging,
    area (box) filter when shrinking — the filters DA3's preprocessing uses, in one step."""
    height, width = size
    if frames.shape[1:3] == (height, width):
        return frames
    enlarge = height > frames.shape[1] or width > frames.shape[2]
    method = Image.Resampling.BICUBIC if enlarge else Image.Resampling.BOX
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), method))
                     for f in frames])


def normalize(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` → ImageNet-normalised float32 ``(T, 3, H, W)``."""
    images = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


ENLARGE_WARNING = 2.0
"""Enlarging frames by more than this factor gets a warning (DA3 then sees blurred pixels)."""


def warn_if_enlarged(source_size: tuple[int, int], size: tuple[int, int]) -> None:
    """A warning when the processing size enlarges the frames more than ENLARGE_WARNING×."""
    factor = max(size) / max(source_size)
    if factor > ENLARGE_WARNING:
        log.warning("frames of %dx%d are enlarged %.1fx to %dx%d: DA3 sees interpolated "
                    "pixels; use larger frames or lower process_res (e.g. process_res=%d)",
                    source_size[1], source_size[0], factor, size[1], size[0],
                    max(PATCH_SIZE, round(max(source_size) / PATCH_SIZE) * PATCH_SIZE))


class FramesStage(Stage):
    """Decode the clip and resize it to DA3's processing size (no files: decoding is cheap)."""

    name = "frames"
    provides = ("clip", "processed_frames")

    def check(self, ctx) -> None:
        """The source exists and gives enough frames (from its metadata)."""
        info = probe_clip(ctx.cfg.data, ctx.cfg.process_res)
        warn_if_enlarged(info.source_size, info.size)

    def run(self, ctx) -> None:
        clip = load_clip(ctx.cfg.data)
        size = processing_size(*clip.frames.shape[1:3], ctx.cfg.process_res)
        ctx.artifacts["clip"] = clip
        ctx.artifacts["processed_frames"] = resize_frames(clip.frames, size)
        log.info("frames: %d frames %dx%d -> processing size %dx%d", len(clip.frames),
                 clip.frames.shape[2], clip.frames.shape[1], size[1], size[0])
