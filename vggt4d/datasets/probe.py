"""How many frames a sequence selection gives and their size, without decoding frames.

:func:`probe_sequence` lists the same files :func:`vggt4d.datasets.read_sequence` would read
(the frame list of each layout, after TUM/Bonn timestamp association), applies the frame
selection and opens only the first selected frame's header (Pillow reads the size lazily). The
runner uses it to check a clip and plan its memory before anything is decoded. The listing
follows each reader's module docstring; the readers read only the text files and headers of the
frames they select, so a sequence that probes cleanly still fails at read time on a corrupt or
missing ground-truth file, with the reader's one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from vggt4d.datasets import dataset_reader, davis, kitti, options_of, sintel, tum
from vggt4d.datasets.common import require_dir, select_indices
from vggt4d.errors import UserError

__all__ = ["SequenceInfo", "probe_sequence"]


@dataclass(frozen=True)
class SequenceInfo:
    """A selection's frame count and the frames' size ``(H, W)``."""

    num_frames: int
    size: tuple[int, int]


def _davis_frames(root: Path | str, name: str, resolution: str = "480p",
                  **_: Any) -> list[Path]:
    image_dir = davis.davis_root(root) / "JPEGImages" / resolution / name
    if not image_dir.is_dir():
        raise UserError(f"DAVIS sequence {name!r} not found: no folder {image_dir}")
    return sorted(image_dir.glob("*.jpg"))


def _sintel_frames(root: Path | str, name: str, pass_name: str = "final",
                   **_: Any) -> list[Path]:
    if pass_name not in sintel.PASSES:
        raise UserError(f"Sintel pass_name={pass_name!r}: choose one of "
                        f"{', '.join(sintel.PASSES)}")
    image_dir = sintel.training_root(root) / pass_name / name
    if not image_dir.is_dir():
        raise UserError(f"Sintel sequence {name!r} not found: no folder {image_dir}")
    return sorted(image_dir.glob("frame_*.png"))


def _kitti_frames(root: Path | str, name: str, split: str = "val", camera: str = "image_02",
                  raw_root: str | None = None, **_: Any) -> list[Path]:
    if camera not in kitti.CAMERAS:
        raise UserError(f"KITTI camera={camera!r}: choose one of {', '.join(kitti.CAMERAS)}")
    root = Path(root).expanduser()
    depth_dir = root / split / name / "proj_depth" / "groundtruth" / camera
    if not depth_dir.is_dir():
        raise UserError(f"KITTI drive {name!r} not found: no folder {depth_dir}")
    image_dir = (Path(raw_root).expanduser() if raw_root else root) / name[:10] / name / camera
    require_dir(image_dir / "data", f"raw KITTI frames of {name!r}")
    return [image_dir / "data" / path.name for path in sorted(depth_dir.glob("*.png"))]


def _tum_frames(root: Path | str, name: str, dataset: str,
                associate_with: tuple[str, ...] | list[str] = tum.STREAMS,
                max_difference: float = tum.MAX_DIFFERENCE, **_: Any) -> list[Path]:
    """RGB frames that every stream in ``associate_with`` matched (``rgb.txt``, ``depth.txt``,
    ``groundtruth.txt`` timestamps, :func:`vggt4d.datasets.tum.associate`)."""
    found = tum.associate_streams(root, name, dataset, associate_with, max_difference)
    return [found.folder / found.rgb_rows[i][0] for i in found.kept]


def _frame_list(dataset: str, root: Path | str, name: str, options: dict) -> list[Path]:
    if dataset in ("davis2016", "davis2017"):
        return _davis_frames(root, name, **options)
    if dataset == "sintel":
        return _sintel_frames(root, name, **options)
    if dataset == "kitti":
        return _kitti_frames(root, name, **options)
    return _tum_frames(root, name, dataset, **options)


def probe_sequence(dataset: str, root: Path | str, sequence: str, *, start: int = 0,
                   stop: int | None = None, stride: int = 1, max_frames: int | None = None,
                   **options: Any) -> SequenceInfo:
    """Frame count of ``[start:stop:stride][:max_frames]`` and the first selected frame's
    ``(H, W)``, from file lists and one image header; one-line errors as the readers give."""
    reader = dataset_reader(dataset)
    unknown = sorted(set(options) - set(options_of(reader.read_sequence)))
    if unknown:
        raise UserError(f"{dataset} has no option {unknown[0]!r}: valid options are "
                        f"{', '.join(options_of(reader.read_sequence)) or 'none'}")
    paths = _frame_list(dataset, root, sequence, options)
    if not paths:
        raise UserError(f"{dataset} sequence {sequence!r} under {root} has no frames")
    indices = select_indices(len(paths), start, stop, stride, max_frames,
                             what=f"{dataset} sequence {sequence}")
    first = paths[indices[0]]
    try:
        with Image.open(first) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"cannot read image {first}: {err}") from None
    return SequenceInfo(len(indices), (height, width))
