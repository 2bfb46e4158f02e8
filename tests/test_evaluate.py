"""DAVIS-style J/F metrics, checked against hand counts and brute-force references."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from vggt4d import evaluate
from vggt4d.errors import UserError
from vggt4d.evaluate import (
    average_sequences,
    boundary_f,
    boundary_map,
    evaluate_folders,
    jaccard,
    main,
    read_mask_folder,
    score_sequence,
)

# ---------------------------------------------------------------- independent references


def reference_boundary(mask: np.ndarray) -> np.ndarray:
    """Explicit loops: foreground pixels with a background (or off-image) 4-neighbour."""
    h, w = mask.shape
    out = np.zeros_like(mask, dtype=bool)
    for y in range(h):
        for x in range(w):
            if not mask[y, x]:
                continue
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                ny, nx = y + dy, x + dx
                if not (0 <= ny < h and 0 <= nx < w) or not mask[ny, nx]:
                    out[y, x] = True
                    break
    return out


def reference_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    """Distance-transform reference: a boundary pixel matches when its Euclidean distance to
    the nearest boundary pixel of the other mask is ≤ ceil(bound_th · diagonal)."""
    h, w = gt.shape
    radius = math.ceil(bound_th * math.sqrt(h * h + w * w))
    pb, gb = reference_boundary(pred), reference_boundary(gt)
    if not pb.any() and not gb.any():
        return 1.0
    if not pb.any() or not gb.any():
        return 0.0
    dist_to_gt = ndimage.distance_transform_edt(~gb)
    dist_to_pred = ndimage.distance_transform_edt(~pb)
    precision = np.mean(dist_to_gt[pb] <= radius)
    recall = np.mean(dist_to_pred[gb] <= radius)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def rect(shape: tuple[int, int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def random_blobs(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=rng.uniform(2.0, 6.0))
    return noise > rng.uniform(-0.05, 0.1)


# ---------------------------------------------------------------- J


def test_jaccard_two_rectangles_hand_counted():
    shape = (40, 50)
    a = rect(shape, 5, 15, 10, 30)  # 10 x 20 = 200 pixels
    b = rect(shape, 10, 25, 20, 40)  # 15 x 20 = 300 pixels
    inter = 5 * 10  # rows 10..14, cols 20..29
    assert jaccard(a, b) == pytest.approx(inter / (200 + 300 - inter))
    assert jaccard(b, a) == pytest.approx(inter / 450)
    assert jaccard(a, a) == 1.0
    assert jaccard(a, rect(shape, 30, 35, 0, 5)) == 0.0
    assert jaccard(a, np.zeros(shape, bool)) == 0.0


def test_jaccard_both_empty_conventions():
    empty = np.zeros((8, 9), dtype=bool)
    assert jaccard(empty, empty) == 1.0  # DAVIS
    assert jaccard(empty, empty, empty_score=0.0) == 0.0  # VGGT4D


# ---------------------------------------------------------------- boundaries and F


def test_boundary_map_matches_loop_reference_on_random_blobs():
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = random_blobs(rng, (37, 53))
        np.testing.assert_array_equal(boundary_map(mask), reference_boundary(mask))


def test_boundary_map_of_rectangle_is_its_outline():
    mask = rect((10, 12), 2, 7, 3, 9)  # 5 x 6
    b = boundary_map(mask)
    assert b.sum() == 2 * 5 + 2 * 6 - 4
    assert not b[3:6, 4:8].any()
    full = np.ones((6, 7), bool)  # a mask touching the border is closed by the image frame
    assert boundary_map(full).sum() == 2 * 6 + 2 * 7 - 4
    assert not boundary_map(np.zeros((6, 7), bool)).any()


def test_boundary_f_agrees_with_brute_force_on_random_blobs():
    rng = np.random.default_rng(1)
    for i in range(8):
        shape = (60 + 7 * i, 90 - 5 * i)
        pred, gt = random_blobs(rng, shape), random_blobs(rng, shape)
        for th in (0.008, 0.03):
            assert boundary_f(pred, gt, bound_th=th) == pytest.approx(
                reference_f(pred, gt, th), abs=1e-12
            )


def test_boundary_f_shifted_square():
    shape = (200, 200)
    radius = math.ceil(0.008 * math.hypot(*shape))
    assert radius == 3
    gt = rect(shape, 70, 130, 70, 130)
    for k in range(radius + 1):
        assert boundary_f(rect(shape, 70, 130, 70 + k, 130 + k), gt) == 1.0
    # one pixel beyond the tolerance the far corner pixels no longer match
    assert boundary_f(rect(shape, 70, 130, 70 + radius + 1, 130 + radius + 1), gt) < 1.0
    shifted = rect(shape, 70, 130, 90, 150)
    assert boundary_f(shifted, gt) < 0.7
    assert boundary_f(shifted, gt) == pytest.approx(reference_f(shifted, gt))


def test_boundary_f_empty_cases():
    empty = np.zeros((30, 30), bool)
    square = rect((30, 30), 5, 15, 5, 15)
    assert boundary_f(empty, empty) == 1.0
    assert boundary_f(empty, empty, empty_score=0.0) == 0.0
    assert boundary_f(square, empty) == 0.0
    assert boundary_f(empty, square) == 0.0


# ---------------------------------------------------------------- sequences


def test_score_sequence_recall_thresholds_are_strict():
    shape = (10, 10)
    gt = rect(shape, 0, 1, 0, 1)
    half = rect(shape, 0, 1, 0, 2)  # J = 1/2 exactly: not counted
    two_thirds = rect(shape, 0, 1, 0, 3)
    gt3 = rect(shape, 0, 1, 0, 2)  # with two_thirds: J = 2/3
    preds = np.stack([half, two_thirds, gt])
    gts = np.stack([gt, gt3, gt])
    scores = score_sequence(preds, gts)
    assert scores["J"] == pytest.approx([0.5, 2 / 3, 1.0])
    assert scores["JM"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert scores["JR"] == pytest.approx(2 / 3)
    assert all(type(v) is float for v in scores["J"] + scores["F"])
    assert all(type(scores[k]) is float for k in ("JM", "JR", "FM", "FR"))


def test_score_sequence_f_recall_strict(monkeypatch):
    values = iter([0.5, 0.51, 0.2, 1.0])
    monkeypatch.setattr(evaluate, "boundary_f", lambda *args, **kwargs: next(values))
    masks = np.zeros((4, 5, 5), bool)
    scores = score_sequence(masks, masks)
    assert scores["F"] == [0.5, 0.51, 0.2, 1.0]
    assert scores["FR"] == pytest.approx(0.5)
    assert scores["FM"] == pytest.approx((0.5 + 0.51 + 0.2 + 1.0) / 4)


def test_score_sequence_resizes_with_one_warning(caplog):
    rng = np.random.default_rng(2)
    small = random_blobs(rng, (20, 30))[None].repeat(3, axis=0)
    small[1] = ~small[1]
    gts = small.repeat(2, axis=1).repeat(2, axis=2)  # exact 2x nearest-neighbour upsampling
    with caplog.at_level(logging.WARNING, logger="vggt4d.evaluate"):
        scores = score_sequence(small, gts)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "resiz" in warnings[0].getMessage()
    assert scores["J"] == [1.0, 1.0, 1.0]
    assert scores["F"] == [1.0, 1.0, 1.0]


def test_score_sequence_frame_count_mismatch():
    with pytest.raises(UserError, match=r"\b3\b.*\b4\b"):
        score_sequence(np.zeros((3, 5, 5), bool), np.zeros((4, 5, 5), bool))


def test_average_sequences_weighs_sequences_equally():
    per = {
        "a": {"JM": 1.0, "JR": 1.0, "FM": 0.5, "FR": 0.0, "J": [1.0] * 10, "F": [0.5] * 10},
        "b": {"JM": 0.0, "JR": 0.0, "FM": 1.0, "FR": 1.0, "J": [0.0], "F": [1.0]},
    }
    mean = average_sequences(per)
    assert mean == {"JM": 0.5, "JR": 0.5, "FM": 0.75, "FR": 0.5, "sequences": 2}


# ---------------------------------------------------------------- folders and command


def save_gray(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def save_palette(path: Path, labels: np.ndarray) -> None:
    """Palette PNG whose index 1 is *black*: only the index may decide foreground."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette([0, 0, 0, 0, 0, 0, 200, 0, 0] + [0] * (3 * 253))
    image.save(path)


def save_rgb(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((*mask.shape, 3), np.uint8)
    rgb[mask, 1] = 255  # green only: "> 0 on any channel"
    Image.fromarray(rgb).save(path)


SHAPE = (40, 60)
A_FRAMES = [rect(SHAPE, 5, 20, 5 + 3 * t, 25 + 3 * t) for t in range(3)]
B_GT = [rect(SHAPE, 10, 20, 10, 20), np.zeros(SHAPE, bool)]
B_PRED = [rect(SHAPE, 10, 20, 15, 25), np.zeros(SHAPE, bool)]  # J = 50 / 150, then empty


@pytest.fixture
def davis_tree(tmp_path):
    gt_root, pred_root = tmp_path / "DAVIS", tmp_path / "pred"
    for t, mask in enumerate(A_FRAMES):
        labels = mask.astype(np.uint8)
        labels[mask & (np.arange(SHAPE[1]) % 2 == 0)] = 2  # two object ids, both foreground
        save_palette(gt_root / "Annotations/480p/seqA" / f"{t:05d}.png", labels)
        save_rgb(pred_root / "seqA" / f"{t:05d}.png", mask)
    for t, (g, p) in enumerate(zip(B_GT, B_PRED, strict=True)):
        save_gray(gt_root / "Annotations/480p/seqB" / f"{t:05d}.png", g)
        save_gray(pred_root / "seqB" / f"{t:05d}.png", p)
    (gt_root / "JPEGImages/480p/seqA").mkdir(parents=True)
    return gt_root, pred_root


def test_read_mask_folder_palette_rgb_and_order(tmp_path):
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:5, 3:9] = 1
    labels[10:12, 10:12] = 2
    save_palette(tmp_path / "gt" / "frame_10.png", labels)
    save_palette(tmp_path / "gt" / "frame_2.png", np.zeros(SHAPE, np.uint8))
    masks = read_mask_folder(tmp_path / "gt")
    assert masks.shape == (2, *SHAPE) and masks.dtype == bool
    assert not masks[0].any()  # frame_2 comes before frame_10
    np.testing.assert_array_equal(masks[1], labels > 0)
    save_rgb(tmp_path / "rgb" / "0.png", A_FRAMES[0])
    np.testing.assert_array_equal(read_mask_folder(tmp_path / "rgb")[0], A_FRAMES[0])
    with pytest.raises(UserError):
        read_mask_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError):
        read_mask_folder(tmp_path / "empty")


def test_evaluate_folders_davis_layout(davis_tree):
    gt_root, pred_root = davis_tree
    result = evaluate_folders(pred_root, gt_root)
    assert set(result["sequences"]) == {"seqA", "seqB"}
    a, b = result["sequences"]["seqA"], result["sequences"]["seqB"]
    assert a["J"] == [1.0] * 3 and a["F"] == [1.0] * 3
    assert b["J"] == pytest.approx([50 / 150, 1.0])
    assert b["F"] == pytest.approx([reference_f(B_PRED[0], B_GT[0]), 1.0])
    assert b["JR"] == 0.5
    mean = result["mean"]
    assert mean["sequences"] == 2
    assert mean["JM"] == pytest.approx((1.0 + (50 / 150 + 1.0) / 2) / 2)
    assert mean["FM"] == pytest.approx((1.0 + (reference_f(B_PRED[0], B_GT[0]) + 1.0) / 2) / 2)
    vggt4d = evaluate_folders(pred_root, gt_root, empty_score=0.0)["sequences"]["seqB"]
    assert vggt4d["J"] == pytest.approx([50 / 150, 0.0])
    assert vggt4d["F"][1] == 0.0


def test_evaluate_folders_annotations_without_resolution(tmp_path):
    for t, mask in enumerate(A_FRAMES):
        save_gray(tmp_path / "gt/Annotations/seqA" / f"{t:05d}.png", mask)
        save_gray(tmp_path / "pred/seqA" / f"{t:05d}.png", mask)
    result = evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    assert list(result["sequences"]) == ["seqA"]
    assert result["mean"]["JM"] == 1.0


def test_evaluate_folders_single_sequence_layouts(tmp_path):
    gt_dir = tmp_path / "gt" / "walk"
    job = tmp_path / "job"
    for t, (g, p) in enumerate(zip(B_GT, B_PRED, strict=True)):
        save_gray(gt_dir / f"{t:05d}.png", g)
        save_gray(job / "masks" / f"dynamic_{t:04d}.png", p)
    for pred in (job, job / "masks"):
        result = evaluate_folders(pred, gt_dir)
        assert list(result["sequences"]) == ["walk"]
        assert result["sequences"]["walk"]["J"] == pytest.approx([50 / 150, 1.0])
        assert result["mean"]["sequences"] == 1


def test_evaluate_folders_missing_sequence(davis_tree):
    gt_root, pred_root = davis_tree
    for file in (pred_root / "seqB").iterdir():
        file.unlink()
    (pred_root / "seqB").rmdir()
    with pytest.raises(UserError, match="seqB"):
        evaluate_folders(pred_root, gt_root)


def test_main_writes_json(davis_tree, tmp_path, capsys):
    gt_root, pred_root = davis_tree
    out = tmp_path / "out" / "metrics.json"
    assert main([str(pred_root), str(gt_root), "--out", str(out), "--empty-score", "0"]) == 0
    data = json.loads(out.read_text())
    assert data["mean"]["sequences"] == 2
    assert data["sequences"]["seqB"]["J"] == pytest.approx([50 / 150, 0.0])
    printed = capsys.readouterr().out
    assert "seqA" in printed and "seqB" in printed and "mean" in printed
    assert not list(out.parent.glob("*.tmp"))


def test_main_missing_folder_exits_2(tmp_path, capsys):
    code = main([str(tmp_path / "nope"), str(tmp_path / "nothing")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
