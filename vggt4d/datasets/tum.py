"""TUM RGB-D and Bonn RGB-D Dynamic in their official layout (the TUM text formats), read in place.

Layout (one folder per sequence: ``rgbd_dataset_freiburg3_walking_xyz/`` for TUM,
``rgbd_bonn_balloon2/`` inside ``rgbd_bonn_dataset/`` for Bonn)::

    rgb.txt          "timestamp filename"   (e.g. "1341846313.592026 rgb/1341846313.592026.png")
    depth.txt        "timestamp filename"
    groundtruth.txt  "timestamp tx ty tz qx qy qz qw"
    rgb/*.png, depth/*.png

Text files as TUM's ``associate.py`` reads them: ``#`` starts a comment line, fields are
separated by spaces, commas or tabs. Depth PNGs are 16-bit, metres = value / 5000, 0 = no
measurement. ``groundtruth.txt`` is the colour camera's optical centre in the motion-capture world:
position ``t`` and unit quaternion in the order ``qx qy qz qw`` (scalar last), i.e.
camera-to-world ``X_world = R(q) X_cam + t`` with OpenCV camera axes.

Association (TUM's ``associate.py`` with offset 0, max_difference 0.02 s): every pair of an RGB
timestamp ``a`` and a stream timestamp ``b`` with ``|a − b| < 0.02`` is a candidate; candidates
are taken greedily by increasing ``|a − b|`` (ties by ``a``, then ``b``), each timestamp at most
once. Each stream named in ``associate_with`` is associated with the RGB list on its own; an
RGB frame is kept when every one of them matched it, and frame selection applies to the kept
frames (MonST3R's TUM protocol: associate RGB with the ground truth, then every 3rd frame,
first 90).

Converted: quaternion ``(qx, qy, qz, qw)`` and position → rotation matrix (scipy, which
normalises the quaternion), camera-to-world → world-to-camera ``[Rᵀ | −Rᵀ t]``; depth / 5000
with 0 → NaN; intrinsics (not in the files) from the datasets' published calibration,
``cx``/``cy`` + 0.5: TUM freiburg1/2/3 by the ``freiburgN`` in the folder name, Bonn's one
camera, or ``intrinsics=[fx, fy, cx, cy]`` in the datasets' own convention (pixel centres at
integers). Lens distortion (freiburg1/2, Bonn) is not undone: the frames are as recorded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from scipy.spatial.transform import Rotation

from vggt4d.datasets.common import (
    Sequence,
    check_sizes,
    pixel_centre_intrinsics,
    read_depth_png,
    read_rgb,
    repeat_intrinsics,
    require_dir,
    require_file,
    select_indices,
)
from vggt4d.errors import UserError

DEPTH_SCALE = 5000.0
MAX_DIFFERENCE = 0.02  # seconds, associate.py's default
STREAMS = ("depth", "pose")
# fx, fy, cx, cy from the TUM RGB-D website's calibration table (pixel centres at integers)
TUM_INTRINSICS = {
    "1": (517.3, 516.5, 318.6, 255.3),
    "2": (520.9, 521.0, 325.1, 249.7),
    "3": (535.4, 539.2, 320.1, 247.6),
}
# the Bonn RGB-D Dynamic Dataset website's calibration of its one camera
BONN_INTRINSICS = (542.822841, 542.576870, 315.593520, 237.756098)
TUM_PREFIX = "rgbd_dataset_"
BONN_PREFIX = "rgbd_bonn_"
BONN_FOLDER = "rgbd_bonn_dataset"


def read_text_table(path: Path, columns: int, what: str
                    ) -> tuple[np.ndarray, list[list[str]], list[int]]:
    """Timestamps (N,) float64, the other fields and the line numbers of the entries of a TUM
    text file, ``columns`` fields per entry (timestamp included); comment and blank lines are
    skipped, a bad line is one error."""
    require_file(path, what)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    stamps, rows, numbers = [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.replace(",", " ").replace("\t", " ").split()
        if not fields or line.lstrip().startswith("#"):
            continue
        if len(fields) != columns:
            raise UserError(f"{path}, line {number}: expected {columns} fields, got "
                            f"{len(fields)}: {line.strip()!r}")
        try:
            stamps.append(float(fields[0]))
        except ValueError:
            raise UserError(f"{path}, line {number}: timestamp {fields[0]!r} is not a "
                            "number") from None
        rows.append(fields[1:])
        numbers.append(number)
    if not stamps:
        raise UserError(f"{path} lists no entries")
    stamps_array = np.array(stamps)
    if not np.isfinite(stamps_array).all():
        raise UserError(f"{path}: non-finite timestamp")
    return stamps_array, rows, numbers


def read_trajectory(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``groundtruth.txt``: timestamps (N,) and camera-to-world poses (N, 3, 4) float64."""
    stamps, rows, numbers = read_text_table(path, 8, "ground-truth trajectory")
    poses = np.empty((len(rows), 3, 4))
    for index, (row, number) in enumerate(zip(rows, numbers, strict=True)):
        try:
            values = np.array([float(value) for value in row])
            if not np.isfinite(values).all():
                raise ValueError("non-finite value")
            rotation = Rotation.from_quat(values[3:]).as_matrix()  # (qx, qy, qz, qw)
        except ValueError as err:
            raise UserError(f"{path}, line {number}: bad pose {' '.join(row)!r}: {err}") from None
        poses[index] = np.concatenate([rotation, values[:3, None]], axis=1)
    return stamps, poses


def invert_poses(poses: np.ndarray) -> np.ndarray:
    """Invert rigid ``[R | t]`` (N, 3, 4) → ``[Rᵀ | −Rᵀ t]``."""
    rot_t = np.transpose(poses[:, :, :3], (0, 2, 1))
    return np.concatenate([rot_t, -rot_t @ poses[:, :, 3:]], axis=2)


def associate(first: np.ndarray, second: np.ndarray, max_difference: float = MAX_DIFFERENCE,
              offset: float = 0.0) -> np.ndarray:
    """Index pairs (M, 2) matching timestamps ``first`` (N,) to ``second`` (K,), as TUM's
    ``associate.py``: candidates ``|a − (b + offset)| < max_difference``, taken greedily by
    difference (ties by ``a``, then ``b``), one-to-one; sorted by ``a``, then ``b``."""
    first = np.asarray(first, dtype=np.float64)
    shifted = np.asarray(second, dtype=np.float64) + offset
    order = np.argsort(shifted, kind="stable")
    lo = np.searchsorted(shifted[order], first - max_difference, side="left")
    hi = np.searchsorted(shifted[order], first + max_difference, side="right")
    counts = hi - lo
    rows = np.repeat(np.arange(len(first)), counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    cols = order[np.repeat(lo, counts) + within]
    diff = np.abs(first[rows] - shifted[cols])
    keep = diff < max_difference
    rows, cols, diff = rows[keep], cols[keep], diff[keep]
    used_first = np.zeros(len(first), dtype=bool)
    used_second = np.zeros(len(shifted), dtype=bool)
    pairs = []
    for k in np.lexsort((shifted[cols], first[rows], diff)):
        i, j = rows[k], cols[k]
        if not (used_first[i] or used_second[j]):
            used_first[i] = used_second[j] = True
            pairs.append((i, j))
    matched = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return matched[np.lexsort((shifted[matched[:, 1]], first[matched[:, 0]]))]


def resolve_folder(root: Path | str, name: str, prefix: str, dataset: str) -> Path:
    """The sequence folder ``root/name`` or ``root/<prefix><name>`` (short names such as
    ``balloon2``); for Bonn also inside ``root/rgbd_bonn_dataset``."""
    root = Path(root).expanduser()
    bases = [root, root / BONN_FOLDER] if dataset == "bonn" else [root]
    for base in bases:
        for folder in (base / name, base / f"{prefix}{name}"):
            if (folder / "rgb.txt").is_file():
                return folder
    raise UserError(f"{dataset} sequence {name!r} not found: no {name}/rgb.txt or "
                    f"{prefix}{name}/rgb.txt under {root}")


def list_sequences(root: Path | str, *, dataset: str = "tum") -> list[str]:
    """Sequence folders (those holding ``rgb.txt``) under ``root``, sorted."""
    root = require_dir(Path(root).expanduser(), f"{dataset} root")
    base = root / BONN_FOLDER if dataset == "bonn" and (root / BONN_FOLDER).is_dir() else root
    return sorted(path.parent.name for path in base.glob("*/rgb.txt"))


def _intrinsics(folder: Path, dataset: str, intrinsics: list[float] | None
                ) -> tuple[float, float, float, float] | None:
    """fx, fy, cx, cy (pixel centres at integers): given, Bonn's, TUM's by freiburg number."""
    if intrinsics is not None:
        values = tuple(float(v) for v in intrinsics)
        if len(values) != 4:
            raise UserError(f"intrinsics={list(intrinsics)}: give [fx, fy, cx, cy]")
        return values
    if dataset == "bonn":
        return BONN_INTRINSICS
    match = re.search(r"freiburg([123])", folder.name)
    return TUM_INTRINSICS[match[1]] if match else None


class Association(NamedTuple):
    """The RGB frames of a sequence folder that every asked-for stream matched."""

    folder: Path
    rgb_stamps: np.ndarray
    rgb_rows: list
    tables: dict[str, tuple[np.ndarray, Any]]
    """stream → (timestamps, rows or camera-to-world poses)."""
    partner: dict[str, np.ndarray]
    """stream → index of each RGB frame's match, or −1."""
    kept: np.ndarray
    """Indices of the RGB frames matched by every stream."""


def associate_streams(root: Path | str, name: str, dataset: str,
                      associate_with: tuple[str, ...] | list[str] = STREAMS,
                      max_difference: float = MAX_DIFFERENCE) -> Association:
    """Read the sequence's text files and associate RGB with ``associate_with`` (module
    docstring); only the RGB list and the asked-for streams are read."""
    streams = tuple(associate_with)
    unknown = [stream for stream in streams if stream not in STREAMS]
    if unknown:
        raise UserError(f"associate_with={list(streams)}: {unknown[0]!r} is not one of "
                        f"{', '.join(STREAMS)}")
    folder = resolve_folder(root, name, BONN_PREFIX if dataset == "bonn" else TUM_PREFIX,
                            dataset)
    rgb_stamps, rgb_rows, _ = read_text_table(folder / "rgb.txt", 2, "RGB list")
    kept = np.arange(len(rgb_stamps))
    tables: dict[str, tuple[np.ndarray, Any]] = {}
    if "depth" in streams:
        tables["depth"] = read_text_table(folder / "depth.txt", 2, "depth list")[:2]
    if "pose" in streams:
        tables["pose"] = read_trajectory(folder / "groundtruth.txt")
    partner: dict[str, np.ndarray] = {}
    for stream, (stamps, _) in tables.items():
        pairs = associate(rgb_stamps, stamps, max_difference)
        lookup = np.full(len(rgb_stamps), -1)
        lookup[pairs[:, 0]] = pairs[:, 1]
        partner[stream] = lookup
        kept = kept[lookup[kept] >= 0]
    if len(kept) == 0:
        raise UserError(f"{folder}: no RGB frame has a {' and '.join(streams)} entry within "
                        f"{max_difference} s")
    return Association(folder, rgb_stamps, rgb_rows, tables, partner, kept)


def read_sequence(root: Path | str, name: str, *, dataset: str = "tum", start: int = 0,
                  stop: int | None = None, stride: int = 1, max_frames: int | None = None,
                  associate_with: tuple[str, ...] | list[str] = STREAMS,
                  max_difference: float = MAX_DIFFERENCE,
                  intrinsics: list[float] | None = None) -> Sequence:
    """RGB frames of a TUM / Bonn sequence with the streams in ``associate_with`` (``depth``,
    ``pose``; the others are ``None``), associated as in the module docstring."""
    found = associate_streams(root, name, dataset, associate_with, max_difference)
    folder, rgb_stamps, rgb_rows = found.folder, found.rgb_stamps, found.rgb_rows
    tables, partner, kept = found.tables, found.partner, found.kept
    indices = select_indices(len(kept), start, stop, stride, max_frames,
                             what=f"{dataset} sequence {name} after association")
    chosen = kept[indices]
    paths = [folder / rgb_rows[i][0] for i in chosen]
    frames = read_rgb(paths)
    sequence = Sequence(
        dataset=dataset, name=folder.name, source=folder, frames=frames,
        frame_names=[path.stem for path in paths], frame_indices=indices,
        timestamps=rgb_stamps[chosen],
    )
    if "depth" in tables:
        depth_rows = tables["depth"][1]
        depth_paths = [folder / depth_rows[j][0] for j in partner["depth"][chosen]]
        depth = [read_depth_png(path, DEPTH_SCALE) for path in depth_paths]
        check_sizes(depth, depth_paths, frames.shape[1:3], "depth")
        sequence.depth = np.stack(depth)
    if "pose" in tables:
        sequence.extrinsics = invert_poses(tables["pose"][1][partner["pose"][chosen]])
    calibration = _intrinsics(folder, dataset, intrinsics)
    if calibration is not None:
        sequence.intrinsics = repeat_intrinsics(pixel_centre_intrinsics(*calibration),
                                                len(chosen))
    return sequence
