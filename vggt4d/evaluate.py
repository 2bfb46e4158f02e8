"""DAVIS region (J) and boundary (F) scores of binary dynamic masks, computed as the official
DAVIS code computes them, under three named protocols.

Sources: the DAVIS-2016 toolkit (github.com/fperazzi/davis, ``python/lib/davis/measures/``
``jaccard.py`` and ``f_boundary.py``, ``dataset/utils.py::db_statistics``, ``dataset/loader.py``)
and davis2017-evaluation (github.com/davisvideochallenge/davis2017-evaluation, ``davis2017/``
``metrics.py``, ``utils.py::db_statistics``, ``davis.py``, ``evaluation.py``). Neither is on PyPI
(the 2016 toolkit is Python 2, the 2017 one installs from GitHub only), so the definitions below
are written here from their description, with NumPy/SciPy and ``skimage.morphology.disk``; no
library offers DAVIS's boundary map (``skimage.segmentation.find_boundaries`` marks other pixels).

Per frame, for ``(H, W)`` bool masks P (prediction), G (ground truth) and V (void, optional):

* **J** = ``|P ∩ G \\ V| / |(P ∪ G) \\ V|``; when that union is empty, J is the protocol's
  ``empty_union_j`` (1 in both DAVIS codes, 0 in VGGT4D's evaluation).
* **Boundary map** (DAVIS's ``seg2bmap``): pixel (y, x) is a boundary pixel when the mask differs
  there from its east (y, x+1), south (y+1, x) or south-east (y+1, x+1) neighbour; in the last
  row only the east neighbour is compared, in the last column only the south one, and the
  bottom-right pixel never is one. Background pixels can be boundary pixels (a one-pixel object at
  (y, x) marks (y, x−1), (y−1, x), (y−1, x−1) and itself), and a mask filling the whole image has
  no boundary at all.
* **F**: the tolerance ``bound_pix`` is ``bound_th`` pixels when ``bound_th ≥ 1``, else
  ``ceil(bound_th · sqrt(H² + W²))`` (0.008 → 8 px at 854×480, 5 px at 518×294). Each boundary map
  is dilated by ``skimage.morphology.disk(bound_pix)`` (Euclidean distance ≤ bound_pix);
  precision = |B_P ∩ dilate(B_G)| / |B_P|, recall = |B_G ∩ dilate(B_P)| / |B_G|, except
  (precision, recall) = (1, 0) when only B_P is empty, (0, 1) when only B_G is, (1, 1) when both
  are. ``F = 2PR / (P + R)``, 0 when ``P + R = 0``: F = 1 when both boundaries are empty (also for
  a full mask against an empty one, where J = 0) and F = 0 when exactly one is. With void pixels
  both masks are cleared on V before their boundaries are taken (davis2017 ``f_measure``), so the
  edge of a void region can be a boundary. F is the same in every protocol.
* **Statistics** of a sequence's per-frame values x (``db_statistics``): mean ``M = nanmean(x)``,
  recall ``R = mean(x > 0.5)`` (strictly greater), decay ``D = mean(bin₁) − mean(bin₄)`` with bin
  edges ``e_k = round(1 + k(n − 1)/4) − 1`` (halves rounded up), k = 0…4, and bin i holding
  ``x[e_i], …, x[e_{i+1}]`` — both ends included, so neighbouring bins share a frame; these are
  not four equal parts (``np.array_split``). The official code stores the edges in uint8, which
  breaks sequences of 256 frames or more (an empty last bin, D = NaN); here they do not wrap
  (DAVIS sequences have at most 104 frames, where both agree bit for bit).
  A set of sequences is summarised by the plain mean of each statistic over sequences (every
  sequence weighs the same; davis2017 ``evaluation_method.py`` also reports J&F = (JM + FM)/2).

Protocols (:func:`protocol_rules`; every result records the name):

=========  ===============  ====================================  ==============================
name       J, empty union   label 255 of a palette annotation     frames scored
=========  ===============  ====================================  ==============================
davis2016  1                foreground (no void)                  all but the first and the last
davis2017  1                void: left out of J and F             all (the unsupervised task)
vggt4d     0                foreground (no void)                  all
=========  ===============  ====================================  ==============================

davis2016 follows the 2016 toolkit (annotations read as grey values ≠ 0, per-frame values NaN on
the first and last frame); davis2017 the 2017 code's unsupervised task with all objects of an
annotation united into one foreground; vggt4d VGGT4D's DAVIS script (annotations read as
value > 0, every frame, J = 0 on an empty union, F as DAVIS, per-sequence statistics averaged
over sequences). Excluded frames appear as ``None`` in the per-frame lists.

Command line::

    python -m vggt4d.evaluate PRED GT [--protocol davis2017] [--bound-th 0.008] [--out m.json]

``GT`` is a DAVIS root (``Annotations/480p/<seq>/*.png`` or ``Annotations/<seq>/*.png``), a folder
of sequence folders (e.g. ``DAVIS/Annotations_unsupervised/480p``), or one sequence folder of
PNGs; ``PRED`` mirrors it with ``<PRED>/<seq>/`` (or ``<PRED>/<seq>/masks/``) per sequence, or is
one folder of PNGs (or a runner job folder holding ``masks/``) for a single sequence.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.morphology import disk

from vggt4d.errors import UserError
from vggt4d.io import atomic_write, write_json
from vggt4d.stage import Stage

log = logging.getLogger(__name__)

DEFAULT_BOUND_TH = 0.008
DEFAULT_PROTOCOL = "davis2017"
VOID_LABEL = 255
"""DAVIS's void label: palette index 255 of an annotation PNG."""
_STATISTICS = ("JM", "JR", "JD", "FM", "FR", "FD")


@dataclass(frozen=True)
class ProtocolRules:
    """Every convention of one evaluation protocol (see the module docstring for the sources)."""

    name: str
    empty_union_j: float
    """J of a frame where prediction and truth (void left out) are both empty."""
    void: bool
    """Palette index 255 of an annotation is void (left out of J and F); else it is foreground."""
    skip_ends: bool
    """The first and last frame of every sequence are not scored."""
    at_prediction_size: bool = False
    """Score at the predictions' (processing) size, the annotations resized to it by nearest
    neighbour (VGGT4D scores at its 518-wide processing size); else at the annotations' size."""


_PROTOCOLS = {
    "davis2016": ProtocolRules("davis2016", empty_union_j=1.0, void=False, skip_ends=True),
    "davis2017": ProtocolRules("davis2017", empty_union_j=1.0, void=True, skip_ends=False),
    "vggt4d": ProtocolRules("vggt4d", empty_union_j=0.0, void=False, skip_ends=False,
                            at_prediction_size=True),
}
PROTOCOLS = tuple(_PROTOCOLS)


def protocol_rules(name: str) -> ProtocolRules:
    """The rules of protocol ``name`` (``davis2016``, ``davis2017`` or ``vggt4d``)."""
    rules = _PROTOCOLS.get(str(name))
    if rules is None:
        raise UserError(f"unknown evaluation protocol {name!r}: use one of {', '.join(PROTOCOLS)}")
    return rules


# ---------------------------------------------------------------- one frame


def _as_mask(mask: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) mask, got shape {array.shape}")
    return array.astype(bool, copy=False)


def _frame_pair(
    pred: np.ndarray, truth: np.ndarray, void: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Both masks as ``(H, W)`` bool, and ``~void`` (None without void)."""
    pred, truth = _as_mask(pred, "pred"), _as_mask(truth, "truth")
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {truth.shape}")
    if void is None:
        return pred, truth, None
    void = _as_mask(void, "void")
    if void.shape != truth.shape:
        raise ValueError(f"void shape {void.shape} differs from ground truth {truth.shape}")
    return pred, truth, ~void


def jaccard(
    pred: np.ndarray,
    truth: np.ndarray,
    void: np.ndarray | None = None,
    *,
    empty_union: float = 1.0,
) -> float:
    """Region similarity J of ``(H, W)`` masks: ``|P ∩ G \\ V| / |(P ∪ G) \\ V|``, and
    ``empty_union`` when that union is empty (DAVIS 1, VGGT4D 0)."""
    pred, truth, valid = _frame_pair(pred, truth, void)
    inter, union = pred & truth, pred | truth
    if valid is not None:
        inter &= valid
        union &= valid
    n_union = int(np.count_nonzero(union))
    if n_union == 0:
        return float(empty_union)
    return int(np.count_nonzero(inter)) / n_union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """DAVIS's ``seg2bmap`` of an ``(H, W)`` mask → ``(H, W)`` bool: pixels that differ from their
    east, south or south-east neighbour (last row: east only; last column: south only; the
    bottom-right pixel never)."""
    mask = _as_mask(mask, "mask")
    inner = mask[:-1, :-1]
    boundary = np.zeros_like(mask)
    boundary[:-1, :-1] = (
        (inner != mask[:-1, 1:]) | (inner != mask[1:, :-1]) | (inner != mask[1:, 1:])
    )
    boundary[-1, :-1] = mask[-1, :-1] != mask[-1, 1:]
    boundary[:-1, -1] = mask[:-1, -1] != mask[1:, -1]
    return boundary


def bound_pixels(shape: tuple[int, ...], bound_th: float = DEFAULT_BOUND_TH) -> int:
    """Match radius in pixels for frames of ``shape`` (…, H, W): ``bound_th`` when ≥ 1 (a whole
    number of pixels), else ``ceil(bound_th · sqrt(H² + W²))``."""
    if not (math.isfinite(bound_th) and bound_th >= 0):
        raise UserError(f"bound_th={bound_th} must be >= 0 (a fraction of the image diagonal, "
                        f"or pixels when >= 1)")
    if bound_th >= 1:
        if bound_th != int(bound_th):
            raise UserError(f"bound_th={bound_th} is >= 1, so it is a radius in pixels: give a "
                            f"whole number (or a fraction of the diagonal below 1)")
        return int(bound_th)
    height, width = shape[-2], shape[-1]
    return math.ceil(bound_th * math.sqrt(height * height + width * width))


def boundary_precision_recall(
    pred: np.ndarray,
    truth: np.ndarray,
    void: np.ndarray | None = None,
    *,
    bound_th: float = DEFAULT_BOUND_TH,
) -> tuple[float, float]:
    """Boundary precision and recall of ``(H, W)`` masks, with DAVIS's values when a boundary is
    empty: (1, 0) when only the prediction's is, (0, 1) when only the truth's is, (1, 1) when
    both are. Void pixels are cleared from both masks first."""
    pred, truth, valid = _frame_pair(pred, truth, void)
    radius = bound_pixels(truth.shape, bound_th)
    if valid is not None:
        pred, truth = pred & valid, truth & valid
    pred_b, truth_b = boundary_map(pred), boundary_map(truth)
    n_pred, n_truth = int(np.count_nonzero(pred_b)), int(np.count_nonzero(truth_b))
    if n_pred == 0 or n_truth == 0:
        return (1.0 if n_pred == 0 else 0.0), (1.0 if n_truth == 0 else 0.0)
    # dilated maps are read only at boundary pixels, and every boundary pixel lies inside the
    # boundaries' bounding box: dilating that box alone gives the same counts, faster
    both = pred_b | truth_b
    rows, cols = np.flatnonzero(both.any(axis=1)), np.flatnonzero(both.any(axis=0))
    box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    pred_b, truth_b = pred_b[box], truth_b[box]
    footprint = disk(radius).astype(bool)
    truth_near = ndimage.binary_dilation(truth_b, structure=footprint)
    pred_near = ndimage.binary_dilation(pred_b, structure=footprint)
    precision = int(np.count_nonzero(pred_b & truth_near)) / n_pred
    recall = int(np.count_nonzero(truth_b & pred_near)) / n_truth
    return precision, recall


def boundary_f(
    pred: np.ndarray,
    truth: np.ndarray,
    void: np.ndarray | None = None,
    *,
    bound_th: float = DEFAULT_BOUND_TH,
) -> float:
    """Boundary F-measure ``2PR / (P + R)`` (0 when P + R = 0) of ``(H, W)`` masks, with
    :func:`boundary_precision_recall`."""
    precision, recall = boundary_precision_recall(pred, truth, void, bound_th=bound_th)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------- sequences


def decay_bins(n: int) -> list[tuple[int, int]]:
    """The four decay bins of ``n`` per-frame values as (first, last) frame, both included:
    edges ``e_k = round(1 + k(n − 1)/4) − 1`` with halves rounded up, k = 0…4."""
    if n < 1:
        raise ValueError("decay needs at least one value")
    edges = [(2 + k * (n - 1)) // 4 for k in range(5)]  # floor(1 + k(n-1)/4 + 1/2) - 1
    return [(edges[i], edges[i + 1]) for i in range(4)]


def frame_statistics(values: Sequence[float | None]) -> tuple[float, float, float]:
    """Mean, recall (fraction > 0.5) and decay of one sequence's per-frame values (``None``: a
    frame left out), as DAVIS's ``db_statistics``."""
    array = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    scored = array[~np.isnan(array)]
    if scored.size == 0:
        raise ValueError("no scored frames")
    mean = float(np.nanmean(array))
    recall = float(np.mean(scored > 0.5))
    bins = [scored[first:last + 1] for first, last in decay_bins(scored.size)]
    decay = float(np.mean(bins[0]) - np.mean(bins[3]))
    return mean, recall, decay


def resize_masks(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """(T, h, w) bool masks → (T, height, width), nearest neighbour."""
    frames = [
        np.asarray(
            Image.fromarray(frame.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
        )
        > 0
        for frame in masks
    ]
    return np.stack(frames)


def score_sequence(
    preds: np.ndarray,
    truth: np.ndarray,
    void: np.ndarray | None = None,
    *,
    rules: ProtocolRules,
    bound_th: float = DEFAULT_BOUND_TH,
) -> dict:
    """Score ``(T, H, W)`` predicted masks against ``(T, H, W)`` ground truth under ``rules``.

    ``void`` (T, H, W) marks the annotation's void pixels (label 255): left out of J and F when
    ``rules.void``, else counted as foreground. Returns ``protocol``, the floats ``JM JR JD FM FR
    FD`` and the per-frame lists ``J`` and ``F`` (``None`` on frames the protocol leaves out).
    Predictions of another frame size are resized to the truth's (nearest neighbour, one
    warning); a different frame count is a :class:`UserError`.
    """
    preds, truth = np.asarray(preds), np.asarray(truth)
    if preds.ndim != 3 or truth.ndim != 3:
        raise UserError(
            f"masks must be (T, H, W): predictions {preds.shape}, ground truth {truth.shape}"
        )
    count = truth.shape[0]
    if preds.shape[0] != count:
        raise UserError(
            f"frame counts differ: {preds.shape[0]} predicted masks, {count} ground-truth masks"
        )
    if count == 0:
        raise UserError("no frames to score")
    if rules.skip_ends and count < 3:
        raise UserError(f"protocol {rules.name} leaves out the first and last frame: a sequence "
                        f"needs at least 3 frames, got {count}")
    bound_pixels(truth.shape, bound_th)  # a bad bound_th fails before any frame is scored
    preds, truth = preds.astype(bool, copy=False), truth.astype(bool, copy=False)
    if void is not None:
        void = np.asarray(void).astype(bool, copy=False)
        if void.shape != truth.shape:
            raise UserError(f"void masks {void.shape} differ from ground truth {truth.shape}")
        if not rules.void:
            truth, void = truth | void, None
    height, width = truth.shape[1:]
    if preds.shape[1:] != truth.shape[1:]:
        log.warning(
            "predicted masks are %dx%d, ground truth %dx%d: resizing predictions "
            "(nearest neighbour)",
            preds.shape[2],
            preds.shape[1],
            width,
            height,
        )
        preds = resize_masks(preds, height, width)
    frames = range(1, count - 1) if rules.skip_ends else range(count)
    j: list[float | None] = [None] * count
    f: list[float | None] = [None] * count
    for t in frames:
        frame_void = None if void is None else void[t]
        j[t] = jaccard(preds[t], truth[t], frame_void, empty_union=rules.empty_union_j)
        f[t] = boundary_f(preds[t], truth[t], frame_void, bound_th=bound_th)
    scores: dict = {"protocol": rules.name}
    for key, values in (("J", j), ("F", f)):
        scores[key + "M"], scores[key + "R"], scores[key + "D"] = frame_statistics(values)
    scores.update({"J": j, "F": f})
    return scores


def average_sequences(per_sequence: dict[str, dict]) -> dict:
    """Mean of ``JM JR JD FM FR FD`` over sequences (each weighs the same), ``J&F`` =
    (JM + FM)/2, the sequence count and the protocol they were scored under."""
    if not per_sequence:
        raise UserError("no sequences to average")
    protocols = {scores.get("protocol") for scores in per_sequence.values()}
    if len(protocols) > 1:
        names = ", ".join(sorted(map(str, protocols)))
        raise ValueError(f"sequences scored under different protocols: {names}")
    mean = {
        key: float(np.mean([scores[key] for scores in per_sequence.values()]))
        for key in _STATISTICS
    }
    mean["J&F"] = (mean["JM"] + mean["FM"]) / 2
    mean["sequences"] = len(per_sequence)
    mean["protocol"] = protocols.pop()
    return mean


# ---------------------------------------------------------------- folders


class Annotations(NamedTuple):
    """Masks read from a folder of PNGs, each ``(T, H, W)`` bool."""

    foreground: np.ndarray
    """Value > 0 on any colour channel (alpha ignored); for palette PNGs index > 0 except 255."""
    void: np.ndarray
    """Palette index 255 (DAVIS's void label); all False in PNGs without a palette."""

    def labelled(self) -> np.ndarray:
        """Every non-zero pixel, void included: how predictions are read."""
        return self.foreground | self.void


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _pngs(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png"),
        key=_natural_key,
    )


def _read_mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, void) of one PNG, each (H, W) bool."""
    with Image.open(path) as image:
        if image.mode == "P":  # palette: the index is the object id, 0 background, 255 void
            labels = np.asarray(image)
            void = labels == VOID_LABEL
            return (labels > 0) & ~void, void
        if image.mode in ("RGBA", "LA", "PA"):  # the alpha channel is not a label
            image = image.convert("RGB" if image.mode == "RGBA" else "L")
        array = np.asarray(image)
    foreground = np.any(array > 0, axis=2) if array.ndim == 3 else array > 0
    return foreground, np.zeros_like(foreground)


def read_mask_folder(path: Path) -> Annotations:
    """Read the PNGs of a folder, in natural name order, as foreground and void ``(T, H, W)``
    masks (see :class:`Annotations`)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"mask folder not found: {path}")
    files = _pngs(path)
    if not files:
        raise UserError(f"no PNG masks in {path}")
    masks = []
    for file in files:
        try:
            masks.append(_read_mask(file))
        except OSError as exc:
            raise UserError(f"cannot read mask {file}: {exc}") from exc
    shapes = {foreground.shape for foreground, _ in masks}
    if len(shapes) > 1:
        raise UserError(f"masks in {path} have different sizes: {sorted(shapes)}")
    return Annotations(np.stack([m[0] for m in masks]), np.stack([m[1] for m in masks]))


def _has_pngs(folder: Path) -> bool:
    return folder.is_dir() and any(
        p.is_file() and p.suffix.lower() == ".png" for p in folder.iterdir()
    )


def _gt_sequences(gt_dir: Path) -> dict[str, Path]:
    """Map sequence name → ground-truth folder for the supported layouts."""
    if not gt_dir.is_dir():
        raise UserError(f"ground-truth folder not found: {gt_dir}")
    for root in (gt_dir / "Annotations" / "480p", gt_dir / "Annotations"):
        if root.is_dir():
            sequences = {d.name: d for d in sorted(root.iterdir()) if _has_pngs(d)}
            if sequences:
                return sequences
    if _has_pngs(gt_dir):
        return {gt_dir.name: gt_dir}
    sequences = {d.name: d for d in sorted(gt_dir.iterdir()) if _has_pngs(d)}
    if sequences:
        return sequences
    raise UserError(f"no ground-truth masks found in {gt_dir}")


def _pred_folder(folder: Path) -> Path | None:
    """A folder of predicted PNGs, or a runner job folder holding them in ``masks/``."""
    if _has_pngs(folder):
        return folder
    if _has_pngs(folder / "masks"):
        return folder / "masks"
    return None


def evaluate_folders(
    pred_dir: Path,
    gt_dir: Path,
    *,
    rules: ProtocolRules,
    bound_th: float = DEFAULT_BOUND_TH,
) -> dict:
    """Score every ground-truth sequence against its predictions under ``rules``.

    Returns ``{"protocol", "bound_th", "sequences": {name: score_sequence(...)},
    "mean": average_sequences(...)}``.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if not pred_dir.is_dir():
        raise UserError(f"prediction folder not found: {pred_dir}")
    gt_sequences = _gt_sequences(gt_dir)
    pred_folders: dict[str, Path] = {}
    missing = []
    single = _pred_folder(pred_dir) if len(gt_sequences) == 1 else None
    for name in gt_sequences:
        folder = single or _pred_folder(pred_dir / name)
        if folder is None:
            missing.append(name)
        else:
            pred_folders[name] = folder
    if missing:
        raise UserError(
            f"no predicted masks in {pred_dir} for {len(missing)} sequence(s): "
            + ", ".join(missing)
        )
    per_sequence = {}
    for name, gt_folder in gt_sequences.items():
        truth = read_mask_folder(gt_folder)
        per_sequence[name] = score_sequence(
            read_mask_folder(pred_folders[name]).labelled(),
            truth.foreground,
            truth.void,
            rules=rules,
            bound_th=bound_th,
        )
    return {
        "protocol": rules.name,
        "bound_th": bound_th,
        "sequences": per_sequence,
        "mean": average_sequences(per_sequence),
    }


def _table(result: dict) -> str:
    rows = [(name, *(s[k] for k in _STATISTICS)) for name, s in result["sequences"].items()]
    rows.append(("mean", *(result["mean"][k] for k in _STATISTICS)))
    width = max(8, *(len(row[0]) for row in rows))
    lines = [
        f"protocol {result['protocol']}, bound_th {result['bound_th']}, "
        f"J&F {result['mean']['J&F']:.3f}",
        f"{'sequence':<{width}}" + "".join(f"{k:>8}" for k in _STATISTICS),
    ]
    for name, *values in rows:
        lines.append(f"{name:<{width}}" + "".join(f"{v:>8.3f}" for v in values))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: score predicted mask folders against DAVIS-style ground truth."""
    parser = argparse.ArgumentParser(
        prog="python -m vggt4d.evaluate",
        description="DAVIS J/F scores (mean, recall, decay) of predicted dynamic masks.",
    )
    parser.add_argument("pred", type=Path, help="predicted masks (folder of PNGs or of sequences)")
    parser.add_argument("gt", type=Path, help="ground truth (DAVIS root or folder of PNGs)")
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=DEFAULT_PROTOCOL,
        help="davis2016: first/last frame left out, no void; davis2017: all frames, void 255 "
        "left out; vggt4d: all frames, an empty union scores J = 0",
    )
    parser.add_argument(
        "--bound-th",
        type=float,
        default=DEFAULT_BOUND_TH,
        help="boundary tolerance: a fraction of the image diagonal, or pixels when >= 1",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the scores as JSON here")
    args = parser.parse_args(argv)
    try:
        result = evaluate_folders(
            args.pred, args.gt, rules=protocol_rules(args.protocol), bound_th=args.bound_th
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(_table(result))
    if args.out is not None:
        text = json.dumps(result, indent=2) + "\n"
        atomic_write(args.out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def unsupervised_figures(masks: np.ndarray) -> dict:
    """Figures that need no ground truth, from (T, H, W) bool masks: the dynamic area fraction
    per frame and the IoU of consecutive frames' masks (temporal stability)."""
    area = masks.reshape(len(masks), -1).mean(axis=1)
    consecutive = [jaccard(masks[t], masks[t + 1], empty_union=1.0)
                   for t in range(len(masks) - 1)]
    return {"area_fraction": float(area.mean()), "area_fraction_per_frame": area.tolist(),
            "temporal_iou": float(np.mean(consecutive)) if consecutive else 1.0}


def geometry_protocol(families: Sequence[str], alignment: str, cap: float | None,
                      clip: float | None) -> dict:
    """The depth and pose conventions applied, recorded beside the numbers
    (:mod:`vggt4d.geometry_metrics`)."""
    record: dict = {}
    if "depth" in families:
        record["depth"] = {"alignment": alignment, "cap": cap, "clip": clip,
                           "resize": "bicubic to the ground truth's size",
                           "pooled": "all scored pixels of all frames"}
    if "pose" in families:
        record["pose"] = {"alignment": "sim3 (Umeyama with scale, evo)", "rpe_delta_frames": 1,
                          "statistic": "rmse"}
    return record


def geometry_scores(passes: dict, truth, *, families: Sequence[str], alignment: str,
                    cap: float | None, clip: float | None, model_name: str,
                    device: str = "cpu") -> dict:
    """Depth (AbsRel, δ<1.25 after ``alignment``, ``cap``, ``clip``) and poses (ATE, RPE after
    Sim(3)) of each DA3 pass in ``passes`` (name → prediction), at the ground truth's resolution,
    for the ``families`` asked for whose truth exists (``truth.depth``, ``truth.extrinsics``).
    A pass that cannot be scored (too few frames, a degenerate path, no valid depth pixel, no
    predicted cameras) gets ``{"skipped": reason}`` for that family."""
    from vggt4d.geometry_metrics import depth_metrics, pose_metrics, resize_depth

    score_depth = "depth" in families and truth.depth is not None
    score_pose = "pose" in families and truth.extrinsics is not None
    scores: dict = {"protocol": geometry_protocol(
        [name for name, on in (("depth", score_depth), ("pose", score_pose)) if on],
        alignment, cap, clip)}
    for name, prediction in passes.items():
        entry: dict = {}
        if score_depth:
            try:
                entry["depth"] = depth_metrics(
                    resize_depth(prediction.depth, truth.depth.shape[1:3]), truth.depth,
                    align=alignment, cap=cap, clip=clip, device=device)
            except UserError as err:  # no scored pixel (all beyond the cap, say)
                entry["depth"] = {"skipped": str(err)}
        if score_pose:
            try:
                entry["pose"] = pose_metrics(prediction.extrinsics, truth.extrinsics) \
                    if prediction.extrinsics is not None else {
                        "skipped": f"{model_name} predicts no cameras"}
            except UserError as err:  # too few frames or a degenerate predicted path
                entry["pose"] = {"skipped": str(err)}
        scores[name] = entry
        log.info("eval %s: %s", name, "; ".join(_geometry_line(family, values)
                                               for family, values in entry.items()))
    return scores


def _geometry_line(family: str, values: dict) -> str:
    if "skipped" in values:
        return f"{family} not scored ({values['skipped']})"
    if family == "depth":
        return f"depth AbsRel {values['abs_rel']:.3f}, delta<1.25 {values['delta_1.25']:.3f}"
    return (f"ATE {values['ate']:.4f}, RPE {values['rpe_trans']:.4f} / "
            f"{values['rpe_rot_deg']:.3f} deg")


def mask_scores(stages: dict[str, np.ndarray], truth: np.ndarray, void: np.ndarray | None,
                rules: ProtocolRules, bound_th: float) -> dict:
    """Scores of each named set of (T, h, w) masks against (T, H, W) truth, at the truth's size
    (predictions resized, nearest) or, with ``rules.at_prediction_size``, at the predictions'
    (truth and void resized). The last set gives the top-level figures."""
    metrics: dict = {}
    for name, masks in stages.items():
        if rules.at_prediction_size:
            size = masks.shape[1:3]
            scores = score_sequence(masks, resize_masks(truth, *size),
                                    None if void is None else resize_masks(void, *size),
                                    rules=rules, bound_th=bound_th)
        else:
            scores = score_sequence(resize_masks(masks, *truth.shape[1:3]), truth, void,
                                    rules=rules, bound_th=bound_th)
        metrics[name] = {key: scores[key] for key in ("protocol", *_STATISTICS)}
        metrics[name]["per_frame"] = {"J": scores["J"], "F": scores["F"]}
    metrics.update(metrics[name])
    return metrics


class EvalStage(Stage):
    """Masks, depth and cameras against whatever ground truth the clip has (the synthetic scene's,
    a dataset sequence's, or ``eval.gt_path`` for masks) → metrics.json.

    Masks (when the truth has them and ``masks`` is in ``eval.metrics``): coarse and (when the
    refine stage ran) refined masks are scored under ``eval.protocol``, void pixels left out as
    the protocol says; the top-level JM, JR, JD, FM, FR, FD are the final masks'. Predicted
    masks are resized (nearest) to the ground truth's resolution before scoring, so the scores
    are at the annotation's own size. Depth and poses (when the truth has them and they are in
    ``eval.metrics``): ``geometry`` holds each DA3 pass's errors under ``eval.depth_alignment``,
    ``eval.depth_cap``, ``eval.depth_clip`` and the conventions applied
    (``geometry.protocol``). Without any ground truth only the unsupervised figures are written,
    with a note in the log.
    """

    name = "eval"
    requires = ("masks", "clip", "prediction")
    optional = ("refined_masks", "prediction_pass2")
    provides = ("metrics",)

    def check(self, ctx) -> None:
        gt_path = ctx.cfg.eval.gt_path
        if gt_path and not Path(gt_path).expanduser().is_dir():
            raise UserError(f"eval.gt_path={gt_path}: no such directory")

    def run(self, ctx) -> None:
        settings = ctx.cfg.eval
        families = [str(family) for family in settings.metrics]
        clip = ctx.artifacts["clip"]
        stages = {"coarse": ctx.artifacts["masks"].binary}
        if "refined_masks" in ctx.artifacts:
            stages["refined"] = ctx.artifacts["refined_masks"].binary
        metrics: dict = {"unsupervised": unsupervised_figures(list(stages.values())[-1])}
        truth = void = None
        if settings.gt_path:
            annotations = read_mask_folder(Path(settings.gt_path).expanduser())
            truth, void = annotations.foreground, annotations.void
        elif clip.ground_truth is not None:
            truth, void = clip.ground_truth.dynamic_masks, clip.ground_truth.void_masks
        if truth is not None and "masks" in families:
            metrics.update(mask_scores(stages, truth, void, protocol_rules(settings.protocol),
                                       settings.bound_th))
            log.info("eval (%s): JM %.3f JR %.3f FM %.3f FR %.3f", settings.protocol,
                     *(metrics[k] for k in ("JM", "JR", "FM", "FR")))
        if clip.ground_truth is not None and ({"depth", "pose"} & set(families)):
            from vggt4d.resources import resolve_device

            passes = {"pass1": ctx.artifacts["prediction"]}
            if "prediction_pass2" in ctx.artifacts:
                passes["pass2"] = ctx.artifacts["prediction_pass2"]
            geometry = geometry_scores(
                passes, clip.ground_truth, families=families,
                alignment=str(settings.depth_alignment), cap=settings.depth_cap,
                clip=settings.depth_clip, model_name=ctx.cfg.model.name,
                device=str(resolve_device(ctx.cfg.device, ctx.job.num)))
            if any(geometry[name] for name in passes):
                metrics["geometry"] = geometry
        if truth is None and "geometry" not in metrics:
            log.info("eval: no ground truth (set eval.gt_path to a mask folder, or read a "
                     "dataset with data=dataset); wrote unsupervised figures only")
        alignment = getattr(ctx.artifacts["prediction"], "alignment", None)
        if alignment:  # a chunked prediction: the residuals at its seams (chunks.json)
            metrics["chunks"] = alignment["summary"]
        write_json(ctx.out_dir / "metrics.json", metrics)
        ctx.artifacts["metrics"] = metrics
