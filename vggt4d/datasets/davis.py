"""DAVIS-2016 and DAVIS-2017 (video object segmentation) in their official layouts, read in place.

Layout (the released zips, root = the ``DAVIS`` folder or its parent)::

    JPEGImages/480p/<seq>/00000.jpg
    Annotations/480p/<seq>/00000.png               (semi-supervised annotations)
    Annotations_unsupervised/480p/<seq>/00000.png  (2017 unsupervised release, when present)
    ImageSets/2017/val.txt, ImageSets/2016/val.txt (2017 release: one sequence name per line)
    ImageSets/480p/val.txt                         (2016 release: "/JPEGImages/480p/<seq>/
                                                    00000.jpg /Annotations/480p/<seq>/00000.png"
                                                    per frame)

Annotations, decided by the PNG's own format:

* palette PNG (mode P, DAVIS-2017 and the 2016 sequences inside the 2017 release): the palette
  index is the object id, 0 = background, 255 = void (davis2017-evaluation's ``VOID_LABEL``);
* greyscale PNG (mode L or 1, the DAVIS-2016 release): binary 0 / 255, foreground = value > 0
  (the DAVIS-2016 toolkit's reading); no void.

Converted: every object of a frame is united into one dynamic mask (value > 0 and not void), as
the motion-segmentation papers score DAVIS; void pixels become ``void_masks``. DAVIS has no depth
or cameras. Frames are JPEG as released; nothing is resized. The 2016 sequences inside the 2017
release carry the 2017 (per-object) re-annotation; for DAVIS-2016's own masks point the root at
the 2016 release.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vggt4d.datasets.common import (
    Sequence,
    check_sizes,
    open_image,
    read_rgb,
    require_dir,
    require_file,
    select_indices,
)
from vggt4d.errors import UserError

VOID_LABEL = 255
ANNOTATION_FOLDERS = {"semi-supervised": "Annotations", "unsupervised": "Annotations_unsupervised"}


def davis_root(root: Path | str) -> Path:
    """The folder holding ``JPEGImages`` (``root`` itself or its ``DAVIS`` subfolder)."""
    root = Path(root).expanduser()
    for candidate in (root, root / "DAVIS"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise UserError(f"DAVIS root {root} has no JPEGImages folder (nor DAVIS/JPEGImages): point "
                    "it at the unpacked DAVIS folder")


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """Non-empty lines of a text file with their 1-based numbers."""
    require_file(path, "DAVIS sequence list")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)
            if line.strip()]


def _names_2017(path: Path) -> list[str]:
    """ImageSets/<year>/<split>.txt: one sequence name per line."""
    names = []
    for number, line in _read_lines(path):
        if len(line.split()) != 1:
            raise UserError(f"{path}, line {number}: expected one sequence name, got {line!r}")
        names.append(line)
    return names


def _names_2016(path: Path) -> list[str]:
    """ImageSets/480p/<split>.txt of the 2016 release: image and annotation path per frame;
    the sequences in order of first appearance."""
    names: list[str] = []
    for number, line in _read_lines(path):
        fields = line.split()
        parts = Path(fields[0]).parts if fields else ()
        if len(fields) != 2 or len(parts) < 3 or "JPEGImages" not in parts:
            raise UserError(f"{path}, line {number}: expected '/JPEGImages/<res>/<seq>/<frame>"
                            f".jpg /Annotations/<res>/<seq>/<frame>.png', got {line!r}")
        if parts[-2] not in names:
            names.append(parts[-2])
    return names


def list_sequences(root: Path | str, *, year: int, split: str = "val",
                   resolution: str = "480p") -> list[str]:
    """Sequence names of ``split`` from ImageSets: ``ImageSets/<year>/<split>.txt``; for 2016
    without it, the 2016 release's ``ImageSets/<resolution>/<split>.txt``."""
    base = davis_root(root)
    listed = base / "ImageSets" / str(year) / f"{split}.txt"
    if listed.is_file() or year != 2016:
        return _names_2017(listed)
    return _names_2016(base / "ImageSets" / resolution / f"{split}.txt")


def read_annotation(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic (union of all objects) and void masks (H, W) bool of one annotation PNG."""
    image = open_image(path)
    if image.mode == "P":
        ids = np.asarray(image)
        void = ids == VOID_LABEL
        return (ids > 0) & ~void, void
    if image.mode in ("L", "1"):
        values = np.asarray(image.convert("L"))
        return values > 0, np.zeros(values.shape, dtype=bool)
    raise UserError(f"{path}: annotation has mode {image.mode}; DAVIS annotations are palette "
                    "(P) or greyscale (L) PNGs")


def read_sequence(root: Path | str, name: str, *, year: int, start: int = 0,
                  stop: int | None = None, stride: int = 1, max_frames: int | None = None,
                  annotations: str = "semi-supervised", resolution: str = "480p") -> Sequence:
    """Frames, dynamic masks and void masks of DAVIS sequence ``name``.

    ``annotations``: ``semi-supervised`` (``Annotations/``) or ``unsupervised``
    (``Annotations_unsupervised/``, DAVIS-2017's unsupervised release). Every selected frame
    needs its annotation (``<frame stem>.png``).
    """
    if annotations not in ANNOTATION_FOLDERS:
        raise UserError(f"DAVIS annotations={annotations!r}: choose one of "
                        f"{', '.join(ANNOTATION_FOLDERS)}")
    base = davis_root(root)
    image_dir = base / "JPEGImages" / resolution / name
    if not image_dir.is_dir():
        raise UserError(f"DAVIS sequence {name!r} not found: no folder {image_dir}")
    paths = sorted(image_dir.glob("*.jpg"))
    if not paths:
        raise UserError(f"DAVIS sequence {name!r}: no .jpg frames in {image_dir}")
    indices = select_indices(len(paths), start, stop, stride, max_frames,
                             what=f"DAVIS sequence {name}")
    paths = [paths[i] for i in indices]
    frames = read_rgb(paths)
    mask_dir = require_dir(base / ANNOTATION_FOLDERS[annotations] / resolution / name,
                           f"DAVIS {annotations} annotations of {name!r}")
    mask_paths = [require_file(mask_dir / f"{path.stem}.png", "DAVIS annotation")
                  for path in paths]
    dynamic, void = zip(*(read_annotation(path) for path in mask_paths), strict=True)
    check_sizes(dynamic, mask_paths, frames.shape[1:3], "annotation")
    return Sequence(
        dataset=f"davis{year}", name=name, source=image_dir, frames=frames,
        frame_names=[path.stem for path in paths], frame_indices=indices,
        dynamic_masks=np.stack(dynamic), void_masks=np.stack(void),
    )
