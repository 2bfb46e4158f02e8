"""Turn per-frame map PNGs into videos: one mp4 per series of ``<prefix>_frameNNN_<suffix>.png``.

Runs as a pipeline step or on an existing output folder::

    python -m vggt4d.videos FOLDER [--fps 10] [--out DIR]

PNGs are searched recursively (skipping any ``videos`` folder). Files in a subfolder form their
own series: their prefix carries the relative folder (``seq1/layer_05``), and the video is
written to the same subfolder under the output directory (``videos/seq1/layer_05_sim.mp4``).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vggt4d.errors import UserError
from vggt4d.viz import write_video

SERIES = re.compile(r"^(?P<prefix>.+)_frame(?P<frame>\d+)_(?P<suffix>.+)\.png$")
VIDEOS_DIR = "videos"


def find_series(folder: Path) -> dict[tuple[str, str], list[Path]]:
    """Group the series PNGs under ``folder`` by ``(prefix, suffix)``, each sorted by frame.

    Series with fewer than 2 frames are left out, as are files under a ``videos`` folder and
    hidden files. ``prefix`` is relative to ``folder`` (``"seq1/layer_05"`` for a subfolder).
    """
    folder = Path(folder)
    found: dict[tuple[str, str], list[tuple[int, str, Path]]] = {}
    for path in folder.rglob("*.png"):
        relative = path.relative_to(folder)
        if VIDEOS_DIR in relative.parts[:-1] or path.name.startswith(".") or not path.is_file():
            continue
        match = SERIES.match(path.name)
        if match is None:
            continue
        prefix = (relative.parent / match["prefix"]).as_posix()
        key = (prefix, match["suffix"])
        found.setdefault(key, []).append((int(match["frame"]), path.name, path))
    return {key: [path for _, _, path in sorted(entries)]
            for key, entries in sorted(found.items()) if len(entries) >= 2}


def _read_frames(paths: list[Path]) -> Iterator[np.ndarray]:
    """Read PNGs one at a time as (H, W, 3) uint8; frames of another size are resized to the
    first's."""
    size: tuple[int, int] | None = None
    for path in paths:
        try:
            with Image.open(path) as image:
                picture = image.convert("RGB")
        except OSError as err:
            raise UserError(f"cannot read {path}: {err}") from err
        if size is None:
            size = picture.size
        elif picture.size != size:
            picture = picture.resize(size, Image.Resampling.BILINEAR)
        yield np.asarray(picture, dtype=np.uint8)


def make_all_videos(folder: Path, fps: float = 10.0, out_dir: Path | None = None,
                    progress: bool = True) -> list[Path]:
    """Write one mp4 per map series under ``folder`` to ``out_dir`` (default ``folder/videos``)
    as ``<prefix>_<suffix>.mp4``; returns the written paths."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"folder not found: {folder}")
    if not fps > 0:
        raise UserError(f"fps must be > 0, got {fps}")
    out_dir = Path(out_dir) if out_dir is not None else folder / VIDEOS_DIR
    series = find_series(folder)
    if not series:
        raise UserError(f"no map series (*_frameNNN_*.png, at least 2 frames each) under "
                        f"{folder}; run vggt4d.run first or point at its output folder")
    written: list[Path] = []
    for (prefix, suffix), paths in tqdm(series.items(), desc="videos", unit="video",
                                        disable=not progress):
        target = out_dir / f"{prefix}_{suffix}.mp4"
        written.append(write_video(target, _read_frames(paths), fps))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vggt4d.videos",
        description="Make one mp4 per *_frameNNN_*.png map series found under FOLDER.")
    parser.add_argument("folder", type=Path, help="an output folder of vggt4d.run")
    parser.add_argument("--fps", type=float, default=10.0, help="frames per second (default 10)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the videos go (default FOLDER/videos)")
    args = parser.parse_args(argv)
    try:
        paths = make_all_videos(args.folder, fps=args.fps, out_dir=args.out)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
