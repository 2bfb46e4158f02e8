"""Benchmark datasets read in their official layouts: one sequence at a time, by name.

Registry names: ``davis2016``, ``davis2017``, ``sintel``, ``tum``, ``bonn``, ``kitti``.
A benchmark runner calls::

    from vggt4d.datasets import list_sequences, read_sequence
    names = list_sequences("sintel", root)                       # options, e.g. pass_name=
    seq = read_sequence("sintel", root, "alley_2", start=0, stop=None, stride=1,
                        max_frames=None)                          # + the dataset's options

and gets a :class:`~vggt4d.datasets.common.Sequence` (frames plus whatever ground truth the
dataset has, in the framework's conventions; see :mod:`vggt4d.datasets.common`). Each module's
docstring gives its layout, file formats and what was converted. Options per dataset (keyword
arguments of its reader; an unknown one is refused with the valid ones listed):

* ``davis2016`` / ``davis2017``: ``annotations`` (semi-supervised | unsupervised),
  ``resolution`` (480p); listing: ``split`` (val), ``resolution``.
* ``sintel``: ``pass_name`` (final | clean).
* ``tum`` / ``bonn``: ``associate_with`` ([depth, pose]), ``max_difference`` (0.02 s),
  ``intrinsics`` ([fx, fy, cx, cy], default the datasets' published calibration).
* ``kitti``: ``split`` (val), ``camera`` (image_02), ``raw_root`` (default the root).

``python -m vggt4d.datasets.export OUT`` writes the synthetic scene in all these layouts.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vggt4d.datasets import davis, kitti, sintel, tum
from vggt4d.datasets.common import Sequence, select_indices
from vggt4d.errors import UserError

__all__ = ["DATASETS", "DatasetReader", "Sequence", "list_sequences", "read_sequence",
           "select_indices"]

SELECTION = ("start", "stop", "stride", "max_frames")


@dataclass(frozen=True)
class DatasetReader:
    """A dataset's two entry points: ``list_sequences(root, **options)`` and
    ``read_sequence(root, name, *, start, stop, stride, max_frames, **options)``."""

    name: str
    description: str
    list_sequences: Callable[..., list[str]]
    read_sequence: Callable[..., Sequence]


DATASETS: dict[str, DatasetReader] = {
    reader.name: reader
    for reader in (
        DatasetReader("davis2016", "DAVIS-2016 masks (JPEGImages, Annotations, ImageSets)",
                      functools.partial(davis.list_sequences, year=2016),
                      functools.partial(davis.read_sequence, year=2016)),
        DatasetReader("davis2017", "DAVIS-2017 masks, objects united, void kept apart",
                      functools.partial(davis.list_sequences, year=2017),
                      functools.partial(davis.read_sequence, year=2017)),
        DatasetReader("sintel", "MPI-Sintel training: images, .dpt depth, .cam cameras",
                      sintel.list_sequences, sintel.read_sequence),
        DatasetReader("tum", "TUM RGB-D: rgb/depth/groundtruth.txt, associated timestamps",
                      functools.partial(tum.list_sequences, dataset="tum"),
                      functools.partial(tum.read_sequence, dataset="tum")),
        DatasetReader("bonn", "Bonn RGB-D Dynamic: TUM formats, Bonn's calibration",
                      functools.partial(tum.list_sequences, dataset="bonn"),
                      functools.partial(tum.read_sequence, dataset="bonn")),
        DatasetReader("kitti", "KITTI depth: annotated 16-bit PNG depth with raw frames",
                      kitti.list_sequences, kitti.read_sequence),
    )
}


def dataset_reader(dataset: str) -> DatasetReader:
    """The registry entry of ``dataset``, or one line listing the known names."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[dataset]


def options_of(function: Callable[..., Any]) -> list[str]:
    """Keyword options a reader function accepts (frame selection and the arguments its
    registry entry fixes left out)."""
    fixed = function.keywords if isinstance(function, functools.partial) else {}
    return [name for name, parameter in inspect.signature(function).parameters.items()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY
            and name not in SELECTION and name not in fixed]


def _check_options(reader: DatasetReader, function: Callable[..., Any], options: dict) -> None:
    valid = options_of(function)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UserError(f"{reader.name} has no option {unknown[0]!r}: valid options are "
                        f"{', '.join(valid) or 'none'}")


def list_sequences(dataset: str, root: Path | str, **options: Any) -> list[str]:
    """Sequence names of ``dataset`` under ``root`` (see the module docstring for options)."""
    reader = dataset_reader(dataset)
    _check_options(reader, reader.list_sequences, options)
    return reader.list_sequences(root, **options)


def read_sequence(dataset: str, root: Path | str, sequence: str, *, start: int = 0,
                  stop: int | None = None, stride: int = 1, max_frames: int | None = None,
                  **options: Any) -> Sequence:
    """Sequence ``sequence`` of ``dataset`` under ``root``, frames
    ``[start:stop:stride][:max_frames]``, with the dataset's ``options``."""
    reader = dataset_reader(dataset)
    _check_options(reader, reader.read_sequence, options)
    return reader.read_sequence(root, sequence, start=start, stop=stop, stride=stride,
                                max_frames=max_frames, **options)
