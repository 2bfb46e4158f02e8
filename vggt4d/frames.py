"""Frame sources (image folder, video, synthetic scene) and DA3's input preprocessing.

Frames of different sizes in one folder are resized to the first frame's size with a warning
(DA3 needs one size per clip; refusing would make mixed-camera folders unusable).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vggt4d.config import PATCH_SIZE, ImagesData, SyntheticData, VideoData
from vggt4d.errors import UserError
from vggt4d.stage import UncachedStage

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_FRAMES = 2


@dataclass
class GroundTruth:
    """Known answers of a synthetic clip, at the clip's own resolution."""

    depth: np.ndarray  # (T, H, W) float32 z-depth
    dynamic_masks: np.ndarray  # (T, H, W) bool
    intrinsics: np.ndarray  # (T, 3, 3) pixels of the (H, W) frames
    extrinsics: np.ndarray  # (T, 3, 4) world-to-camera, OpenCV


@dataclass
class Clip:
    """Decoded frames ``(T, H, W, 3)`` uint8 with their names and optional ground truth."""

    frames: np.ndarray
    names: list[str]
    ground_truth: GroundTruth | None = None


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"cannot read image {path}: {err}") from None


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


def load_images(data: ImagesData) -> Clip:
    folder = Path(data.path).expanduser()
    if not folder.is_dir():
        raise UserError(f"data.path={data.path}: no such directory")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"data.path={data.path} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    paths = paths[:: data.stride]
    if data.max_frames:
        paths = paths[: data.max_frames]
    _check_count(len(paths), f"data.path={data.path}")
    names = [p.name for p in paths]
    return Clip(_same_size([_read_image(p) for p in paths], names), names)


def load_video(data: VideoData) -> Clip:
    import imageio_ffmpeg

    path = Path(data.path).expanduser()
    if not path.is_file():
        raise UserError(f"data.path={data.path}: no such file")
    frames = []
    try:
        reader = imageio_ffmpeg.read_frames(str(path), output_params=["-vf", f"fps={data.fps}"])
        width, height = next(reader)["size"]
        for raw in reader:
            frames.append(np.frombuffer(raw, np.uint8).reshape(height, width, 3))
            if data.max_frames and len(frames) == data.max_frames:
                reader.close()
                break
    except (RuntimeError, OSError, StopIteration, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot decode video {path}: {reason}") from None
    _check_count(len(frames), f"video {path} at data.fps={data.fps}")
    return Clip(np.stack(frames), [f"{path.stem}_{i:05d}" for i in range(len(frames))])


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
    truth = GroundTruth(scene.depth, scene.dynamic_masks, scene.intrinsics, scene.extrinsics)
    names = [f"synthetic_{i:05d}" for i in range(len(scene.frames))]
    return Clip(scene.frames, names, truth)


def load_clip(data: ImagesData | VideoData | SyntheticData) -> Clip:
    """Decode the configured source."""
    if isinstance(data, ImagesData):
        return load_images(data)
    if isinstance(data, VideoData):
        return load_video(data)
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


class FramesStage(UncachedStage):
    """Decode the clip and resize it to DA3's processing size (no files: decoding is cheap)."""

    name = "frames"
    requires: tuple[str, ...] = ()
    provides = ("clip", "processed_frames")

    def run(self, ctx) -> None:
        clip = load_clip(ctx.cfg.data)
        size = processing_size(*clip.frames.shape[1:3], ctx.cfg.process_res)
        ctx.artifacts["clip"] = clip
        ctx.artifacts["processed_frames"] = resize_frames(clip.frames, size)
        log.info("frames: %d frames %dx%d -> processing size %dx%d", len(clip.frames),
                 clip.frames.shape[2], clip.frames.shape[1], size[1], size[0])
