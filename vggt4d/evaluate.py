"""DAVIS-2016-style scores for binary dynamic masks: region J, boundary F and their recalls.

Definitions (all masks are ``(H, W)`` bool, foreground = moving object):

* **J (region similarity)** = ``|P ∩ G| / |P ∪ G|``, the intersection over union of the
  predicted and ground-truth foreground.  When both masks are empty the union is empty and the
  ratio is undefined; the score is then the parameter ``empty_score``:

  - ``empty_score=1.0`` (default) follows the DAVIS toolkit, which counts "nothing predicted where
    nothing moves" as a perfect frame;
  - ``empty_score=0.0`` follows VGGT4D's evaluation code, which scores such frames 0.

* **Boundary map**: a foreground pixel is a boundary pixel when at least one of its four
  neighbours (up, down, left, right) is background; pixels outside the image count as
  background, so a mask touching the image border is closed off along the border.  This is the
  inner contour of the mask, one pixel thin and 8-connected, and symmetric under flips and
  transposes.  (The DAVIS toolkit's ``seg2bmap`` instead marks a pixel that differs from its
  right, bottom or bottom-right neighbour, which is also one pixel thin but shifted towards the
  bottom-right and treats only the right/bottom image edges as background.)  With this choice a
  mask's boundary is empty exactly when the mask is empty.

* **F (boundary F-measure)**: the match tolerance is
  ``bound_pix = ceil(bound_th · sqrt(H² + W²))`` pixels (``bound_th = 0.008`` as in DAVIS).
  Precision ``P`` is the fraction of predicted boundary pixels that lie within ``bound_pix`` of a
  ground-truth boundary pixel — "within" meaning inside the ground-truth boundary dilated by
  ``skimage.morphology.disk(bound_pix)``, i.e. Euclidean distance ``≤ bound_pix`` — and recall
  ``R`` is the converse.  ``F = 2PR / (P + R)``, and 0 when ``P + R = 0``.  When both boundaries
  are empty F is ``empty_score`` (the same convention as J; DAVIS gets 1 there); when exactly one
  is empty F is 0.

* **Recall statistics**: ``JR`` is the fraction of frames with ``J > 0.5`` and ``FR`` the fraction
  with ``F > 0.5`` (strictly greater).  Per sequence ``JM`` / ``FM`` are the means of J / F over the
  frames; across sequences the per-sequence numbers are averaged with equal weight per sequence
  (VGGT4D's convention, not a mean over all frames of all sequences).

Command line::

    python -m vggt4d.evaluate PRED GT [--bound-th 0.008] [--empty-score 1] [--out metrics.json]

``GT`` is a DAVIS root (``Annotations/480p/<seq>/*.png`` or ``Annotations/<seq>/*.png``), a folder
of sequence folders, or one sequence folder of PNGs; ``PRED`` mirrors it with ``<PRED>/<seq>/``
(or ``<PRED>/<seq>/masks/``) per sequence, or is one folder of PNGs (or a runner job folder
holding ``masks/``) for a single sequence.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.morphology import disk

from vggt4d.errors import UserError
from vggt4d.io import atomic_write
from vggt4d.stage import UncachedStage

log = logging.getLogger(__name__)

DEFAULT_BOUND_TH = 0.008
_CROSS = ndimage.generate_binary_structure(2, 1)  # the 4-neighbourhood plus the centre
_METRICS = ("JM", "JR", "FM", "FR")


def _as_mask(mask: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) mask, got shape {array.shape}")
    return array.astype(bool, copy=False)


def _check_same_shape(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")


def jaccard(pred: np.ndarray, gt: np.ndarray, empty_score: float = 1.0) -> float:
    """Region similarity J: IoU of two ``(H, W)`` bool masks; ``empty_score`` if both are empty."""
    pred, gt = _as_mask(pred, "pred"), _as_mask(gt, "gt")
    _check_same_shape(pred, gt)
    union = int(np.count_nonzero(pred | gt))
    if union == 0:
        return float(empty_score)
    return int(np.count_nonzero(pred & gt)) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a background 4-neighbour (outside the image is background)."""
    mask = _as_mask(mask, "mask")
    interior = ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)
    return mask & ~interior


def bound_pixels(shape: tuple[int, ...], bound_th: float = DEFAULT_BOUND_TH) -> int:
    """The match tolerance in pixels: ``ceil(bound_th · sqrt(H² + W²))``."""
    height, width = shape[-2], shape[-1]
    return math.ceil(bound_th * math.hypot(height, width))


def boundary_f(
    pred: np.ndarray,
    gt: np.ndarray,
    bound_th: float = DEFAULT_BOUND_TH,
    empty_score: float = 1.0,
) -> float:
    """Boundary F-measure of two ``(H, W)`` bool masks (see the module docstring)."""
    pred, gt = _as_mask(pred, "pred"), _as_mask(gt, "gt")
    _check_same_shape(pred, gt)
    pred_b, gt_b = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = int(np.count_nonzero(pred_b)), int(np.count_nonzero(gt_b))
    if n_pred == 0 and n_gt == 0:
        return float(empty_score)
    if n_pred == 0 or n_gt == 0:
        return 0.0
    radius = bound_pixels(pred.shape, bound_th)
    footprint = disk(radius).astype(bool)
    gt_near = ndimage.binary_dilation(gt_b, structure=footprint)
    pred_near = ndimage.binary_dilation(pred_b, structure=footprint)
    precision = np.count_nonzero(pred_b & gt_near) / n_pred
    recall = np.count_nonzero(gt_b & pred_near) / n_gt
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


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
    gts: np.ndarray,
    *,
    bound_th: float = DEFAULT_BOUND_TH,
    empty_score: float = 1.0,
) -> dict:
    """Score a ``(T, H, W)`` prediction against ``(T, H, W)`` ground truth.

    Returns plain floats ``JM, JR, FM, FR`` and the per-frame lists ``J`` and ``F``.  Predictions of
    another frame size are resized to the ground truth's with nearest neighbour (one warning); a
    different frame count is a :class:`UserError`.
    """
    preds, gts = np.asarray(preds), np.asarray(gts)
    if preds.ndim != 3 or gts.ndim != 3:
        raise UserError(
            f"masks must be (T, H, W): predictions {preds.shape}, ground truth {gts.shape}"
        )
    if preds.shape[0] != gts.shape[0]:
        raise UserError(
            f"frame counts differ: {preds.shape[0]} predicted masks, "
            f"{gts.shape[0]} ground-truth masks"
        )
    if preds.shape[0] == 0:
        raise UserError("no frames to score")
    preds, gts = preds.astype(bool, copy=False), gts.astype(bool, copy=False)
    height, width = gts.shape[1:]
    if preds.shape[1:] != gts.shape[1:]:
        log.warning(
            "predicted masks are %dx%d, ground truth %dx%d: resizing predictions "
            "(nearest neighbour)",
            preds.shape[2],
            preds.shape[1],
            width,
            height,
        )
        preds = resize_masks(preds, height, width)
    j = [float(jaccard(p, g, empty_score)) for p, g in zip(preds, gts, strict=True)]
    f = [float(boundary_f(p, g, bound_th, empty_score)) for p, g in zip(preds, gts, strict=True)]
    j_arr, f_arr = np.asarray(j), np.asarray(f)
    return {
        "JM": float(j_arr.mean()),
        "JR": float(np.mean(j_arr > 0.5)),
        "FM": float(f_arr.mean()),
        "FR": float(np.mean(f_arr > 0.5)),
        "J": j,
        "F": f,
    }


def average_sequences(per_sequence: dict[str, dict]) -> dict:
    """Average ``JM, JR, FM, FR`` over sequences (each sequence weighs the same)."""
    if not per_sequence:
        raise UserError("no sequences to average")
    mean = {
        key: float(np.mean([scores[key] for scores in per_sequence.values()])) for key in _METRICS
    }
    mean["sequences"] = len(per_sequence)
    return mean


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _pngs(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png"),
        key=_natural_key,
    )


def _read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        if image.mode == "P":  # palette: the index is the object id, 0 is background
            return np.asarray(image) > 0
        if image.mode in ("RGBA", "LA", "PA"):  # the alpha channel is not a label
            image = image.convert("RGB" if image.mode == "RGBA" else "L")
        array = np.asarray(image)
    if array.ndim == 3:
        return np.any(array > 0, axis=2)
    return array > 0


def read_mask_folder(path: Path) -> np.ndarray:
    """Read the PNGs of a folder, in natural name order, as a ``(T, H, W)`` bool array.

    A pixel is foreground when it is > 0 on any colour channel (alpha ignored); for palette PNGs
    when its palette index is > 0.
    """
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
    shapes = {m.shape for m in masks}
    if len(shapes) > 1:
        raise UserError(f"masks in {path} have different sizes: {sorted(shapes)}")
    return np.stack(masks)


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
    bound_th: float = DEFAULT_BOUND_TH,
    empty_score: float = 1.0,
) -> dict:
    """Score every ground-truth sequence against its predictions.

    Returns ``{"sequences": {name: score_sequence(...)}, "mean": average_sequences(...)}``.
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
    per_sequence = {
        name: score_sequence(
            read_mask_folder(pred_folders[name]),
            read_mask_folder(gt_folder),
            bound_th=bound_th,
            empty_score=empty_score,
        )
        for name, gt_folder in gt_sequences.items()
    }
    return {"sequences": per_sequence, "mean": average_sequences(per_sequence)}


def _table(result: dict) -> str:
    rows = [(name, *(s[k] for k in _METRICS)) for name, s in result["sequences"].items()]
    rows.append(("mean", *(result["mean"][k] for k in _METRICS)))
    width = max(8, *(len(row[0]) for row in rows))
    lines = [f"{'sequence':<{width}}" + "".join(f"{k:>8}" for k in _METRICS)]
    for name, *values in rows:
        lines.append(f"{name:<{width}}" + "".join(f"{v:>8.3f}" for v in values))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: score predicted mask folders against DAVIS-style ground truth."""
    parser = argparse.ArgumentParser(
        prog="python -m vggt4d.evaluate",
        description="DAVIS-2016 J/F scores of predicted dynamic masks.",
    )
    parser.add_argument("pred", type=Path, help="predicted masks (folder of PNGs or of sequences)")
    parser.add_argument("gt", type=Path, help="ground truth (DAVIS root or folder of PNGs)")
    parser.add_argument(
        "--bound-th",
        type=float,
        default=DEFAULT_BOUND_TH,
        help="boundary tolerance as a fraction of the image diagonal",
    )
    parser.add_argument(
        "--empty-score",
        type=float,
        default=1.0,
        help="score of frames where both masks are empty (DAVIS 1, VGGT4D 0)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the scores as JSON here")
    args = parser.parse_args(argv)
    try:
        result = evaluate_folders(
            args.pred, args.gt, bound_th=args.bound_th, empty_score=args.empty_score
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
    consecutive = [jaccard(masks[t], masks[t + 1], empty_score=1.0)
                   for t in range(len(masks) - 1)]
    return {"area_fraction": float(area.mean()), "area_fraction_per_frame": area.tolist(),
            "temporal_iou": float(np.mean(consecutive)) if consecutive else 1.0}


def geometry_scores(ctx, truth) -> dict:
    """Depth (AbsRel, δ<1.25 after median scaling) and poses (ATE, RPE after Sim(3)) of the first
    and, when it ran, the second pass, at the ground truth's resolution."""
    from vggt4d.geometry_metrics import depth_metrics, pose_metrics
    from vggt4d.postprocess import upsample_bilinear

    passes = {"pass1": ctx.artifacts["prediction"]}
    if "prediction_pass2" in ctx.artifacts:
        passes["pass2"] = ctx.artifacts["prediction_pass2"]
    scores = {}
    for name, prediction in passes.items():
        depth = upsample_bilinear(prediction.depth, truth.depth.shape[1:3])
        scores[name] = {"depth": depth_metrics(depth, truth.depth)}
        try:
            scores[name]["pose"] = pose_metrics(prediction.extrinsics, truth.extrinsics) \
                if prediction.extrinsics is not None else {
                    "skipped": f"{ctx.cfg.model.name} predicts no cameras"}
        except UserError as err:  # too few frames or a degenerate predicted path
            scores[name]["pose"] = {"skipped": str(err)}
        pose = scores[name]["pose"]
        poses = f"; poses not scored ({pose['skipped']})" if "skipped" in pose \
            else f", ATE {pose['ate']:.4f}"
        log.info("eval %s: depth AbsRel %.3f, delta<1.25 %.3f%s", name,
                 scores[name]["depth"]["abs_rel"], scores[name]["depth"]["delta_1.25"], poses)
    return scores


class EvalStage(UncachedStage):
    """Masks against ground truth (the synthetic scene's, or ``eval.gt_path``) → metrics.json.

    Coarse and (when the refine stage ran) refined masks are scored; the top-level JM, JR, FM, FR
    are the final masks'. Predicted masks are resized (nearest) to the ground truth's resolution
    before scoring, so the scores are at the annotation's own size. With the synthetic scene's
    depth and cameras, ``geometry`` holds depth and pose errors of each DA3 pass. Without ground
    truth only the unsupervised figures are written, with a note in the log.
    """

    name = "eval"
    requires = ("masks", "clip")
    provides = ("metrics",)

    def check(self, ctx) -> None:
        gt_path = ctx.cfg.eval.gt_path
        if gt_path and not Path(gt_path).expanduser().is_dir():
            raise UserError(f"eval.gt_path={gt_path}: no such directory")

    def run(self, ctx) -> None:
        cfg = ctx.cfg.eval
        clip = ctx.artifacts["clip"]
        stages = {"coarse": ctx.artifacts["masks"].binary}
        if "refined_masks" in ctx.artifacts:
            stages["refined"] = ctx.artifacts["refined_masks"].binary
        final = stages.get("refined", stages["coarse"])
        metrics: dict = {"unsupervised": unsupervised_figures(final)}
        truth = None
        if cfg.gt_path:
            truth = read_mask_folder(Path(cfg.gt_path).expanduser())
        elif clip.ground_truth is not None:
            truth = clip.ground_truth.dynamic_masks
        if truth is None:
            log.info("eval: no ground truth (set eval.gt_path to a mask folder); "
                     "wrote unsupervised figures only")
        else:
            for name, masks in stages.items():
                scores = score_sequence(resize_masks(masks, *truth.shape[1:3]), truth,
                                        bound_th=cfg.bound_th, empty_score=cfg.empty_score)
                metrics[name] = {key: scores[key] for key in ("JM", "JR", "FM", "FR")}
                metrics[name]["per_frame"] = {"J": scores["J"], "F": scores["F"]}
            chosen = metrics["refined" if "refined" in stages else "coarse"]
            metrics.update({key: chosen[key] for key in ("JM", "JR", "FM", "FR", "per_frame")})
            log.info("eval: JM %.3f JR %.3f FM %.3f FR %.3f", *(metrics[k] for k in
                                                                 ("JM", "JR", "FM", "FR")))
        if clip.ground_truth is not None:
            metrics["geometry"] = geometry_scores(ctx, clip.ground_truth)
        atomic_write(ctx.out_dir / "metrics.json",
                     lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
        ctx.artifacts["metrics"] = metrics
