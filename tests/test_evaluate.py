"""DAVIS J/F as the official code computes them: boundary maps and F values worked out by hand on
tiny masks, a loop reimplementation of ``seg2bmap`` and of the disk match from their textual
definitions, hand-made decay sequences, the official repository's own void test, and the three
protocols end to end."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from vggt4d.errors import UserError
from vggt4d.evaluate import (
    PROTOCOLS,
    average_sequences,
    bound_pixels,
    boundary_f,
    boundary_map,
    boundary_precision_recall,
    decay_bins,
    evaluate_folders,
    frame_statistics,
    jaccard,
    main,
    protocol_rules,
    read_mask_folder,
    score_sequence,
    unsupervised_figures,
)

DAVIS2016, DAVIS2017, VGGT4D = (protocol_rules(name) for name in PROTOCOLS)

# ---------------------------------------------------------------- independent references


def reference_bmap(mask: np.ndarray) -> np.ndarray:
    """Loops over pixels: boundary when different from the east, south or south-east
    neighbour; last row east only, last column south only, bottom-right never."""
    h, w = mask.shape
    out = np.zeros((h, w), dtype=bool)
    for y in range(h):
        for x in range(w):
            if y == h - 1 and x == w - 1:
                continue
            if y == h - 1:
                neighbours = [(y, x + 1)]
            elif x == w - 1:
                neighbours = [(y + 1, x)]
            else:
                neighbours = [(y, x + 1), (y + 1, x), (y + 1, x + 1)]
            out[y, x] = any(mask[n] != mask[y, x] for n in neighbours)
    return out


def reference_f(pred: np.ndarray, truth: np.ndarray, radius: int) -> float:
    """Pairwise distances: a boundary pixel matches when some boundary pixel of the other mask
    lies at squared distance ≤ radius² (the pixels of skimage's disk); DAVIS's edge cases."""
    pb, gb = np.argwhere(reference_bmap(pred)), np.argwhere(reference_bmap(truth))
    if len(pb) == 0 or len(gb) == 0:
        precision, recall = float(len(pb) == 0), float(len(gb) == 0)
    else:
        d2 = ((pb[:, None, :] - gb[None, :, :]) ** 2).sum(axis=2)
        precision = float(np.mean(d2.min(axis=1) <= radius * radius))
        recall = float(np.mean(d2.min(axis=0) <= radius * radius))
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def grid(rows: list[str]) -> np.ndarray:
    """A mask written as text: ``#`` foreground, ``.`` background."""
    return np.array([[c == "#" for c in row] for row in rows], dtype=bool)


def rect(shape: tuple[int, int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def random_blobs(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=rng.uniform(0.5, 3.0))
    return noise > rng.uniform(-0.2, 0.2)


EMPTY = np.zeros((6, 7), dtype=bool)

# ---------------------------------------------------------------- protocols


def test_protocol_rules_literal():
    assert PROTOCOLS == ("davis2016", "davis2017", "vggt4d")
    assert (DAVIS2016.empty_union_j, DAVIS2016.void, DAVIS2016.skip_ends) == (1.0, False, True)
    assert (DAVIS2017.empty_union_j, DAVIS2017.void, DAVIS2017.skip_ends) == (1.0, True, False)
    assert (VGGT4D.empty_union_j, VGGT4D.void, VGGT4D.skip_ends) == (0.0, False, False)
    assert [r.name for r in (DAVIS2016, DAVIS2017, VGGT4D)] == list(PROTOCOLS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        DAVIS2017.void = False
    with pytest.raises(UserError, match="davis2016, davis2017, vggt4d"):
        protocol_rules("davis2018")
    assert VGGT4D.at_prediction_size and not DAVIS2016.at_prediction_size


def test_vggt4d_protocol_scores_at_the_prediction_size():
    """A 4x4 prediction against an 8x8 annotation: davis2017 upsamples the prediction (F radius
    from the 8x8 diagonal: ceil(0.008·11.3) = 1 px), vggt4d downsamples the annotation."""
    from vggt4d.evaluate import mask_scores

    truth = np.zeros((1, 8, 8), bool)
    truth[0, 2:6, 2:6] = True  # a 4x4 square, exactly the 2x2 block of the prediction
    truth[0, 6, 6] = True  # one stray pixel nearest-neighbour downsampling does not sample
    pred = np.zeros((1, 4, 4), bool)
    pred[0, 1:3, 1:3] = True
    at_truth = mask_scores({"coarse": pred}, truth, None, DAVIS2017, 0.008)
    at_pred = mask_scores({"coarse": pred}, truth, None, VGGT4D, 0.008)
    assert at_truth["JM"] == pytest.approx(16 / 17)  # the stray pixel counts at 8x8
    assert at_pred["JM"] == 1.0  # 4x4: the truth is sampled at odd pixels, the stray one missed


# ---------------------------------------------------------------- boundary maps by hand


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        pytest.param(  # one pixel inside: itself, west, north and north-west are boundary
            [".....", "..#..", ".....", "....."],
            [".##..", ".##..", ".....", "....."],
            id="one-pixel-object",
        ),
        pytest.param(  # bottom-right pixel: never boundary itself; west, north, north-west are
            [".....", ".....", ".....", "....#"],
            [".....", ".....", "...##", "...#."],
            id="bottom-right-pixel",
        ),
        pytest.param(  # top-left pixel: only itself (nobody has it as east/south/south-east)
            ["#....", ".....", ".....", "....."],
            ["#....", ".....", ".....", "....."],
            id="top-left-pixel",
        ),
        pytest.param(  # touching the right border: the border itself is no boundary
            [".....", "...##", "...##", "....."],
            ["..###", "..#..", "..###", "....."],
            id="right-border",
        ),
        pytest.param(  # touching the bottom and left borders
            [".....", ".....", "##...", "##..."],
            [".....", "##...", ".#...", ".#..."],
            id="bottom-left-corner",
        ),
        pytest.param(["####", "####", "####"], ["....", "....", "...."], id="full-mask"),
        pytest.param(["....", "....", "...."], ["....", "....", "...."], id="empty-mask"),
        pytest.param([".##.#"], ["#.##."], id="single-row"),
        pytest.param([".", "#", "#", "."], ["#", ".", "#", "."], id="single-column"),
        pytest.param(["#"], ["."], id="one-pixel-image"),
    ],
)
def test_boundary_map_hand_computed(mask, expected):
    np.testing.assert_array_equal(boundary_map(grid(mask)), grid(expected))


def test_boundary_map_matches_loop_reference_on_random_masks():
    rng = np.random.default_rng(0)
    for i in range(40):
        shape = (int(rng.integers(1, 25)), int(rng.integers(1, 25)))
        mask = random_blobs(rng, shape) if i % 3 else rng.random(shape) < 0.5
        np.testing.assert_array_equal(boundary_map(mask), reference_bmap(mask))


# ---------------------------------------------------------------- F by hand


def test_bound_pixels():
    assert bound_pixels((480, 854)) == 8  # ceil(0.008 · 979.6)
    assert bound_pixels((294, 518)) == 5  # ceil(0.008 · 595.6)
    assert bound_pixels((3, 480, 854), 0.02) == 20  # (T, H, W) shapes use the last two
    assert bound_pixels((480, 854), 2) == 2  # ≥ 1: pixels, not a fraction of the diagonal
    assert bound_pixels((480, 854), 1.0) == 1
    assert bound_pixels((480, 854), 0) == 0
    for bad in (2.5, -0.1, float("nan"), float("inf")):
        with pytest.raises(UserError, match="bound_th"):
            bound_pixels((480, 854), bad)


def test_f_square_ring_against_one_pixel_by_hand():
    # truth: 2×2 square → boundary is the 3×3 ring minus its centre (8 pixels);
    # prediction: its bottom-right pixel → boundary (1,1) (1,2) (2,1) (2,2) (4 pixels)
    truth = grid([".....", ".##..", ".##..", ".....", "....."])
    pred = grid([".....", ".....", "..#..", ".....", "....."])
    np.testing.assert_array_equal(
        boundary_map(truth), grid(["###..", "#.#..", "###..", ".....", "....."])
    )
    # radius 0 (exact match): 3 shared pixels → P = 3/4, R = 3/8, F = 1/2
    assert boundary_precision_recall(pred, truth, bound_th=0) == (0.75, 0.375)
    assert boundary_f(pred, truth, bound_th=0) == pytest.approx(0.5, abs=1e-15)
    # radius 1 (a plus-shaped disk): (1,1) now matches, (0,0) is diagonal to (1,1) → R = 7/8
    assert boundary_precision_recall(pred, truth, bound_th=1) == (1.0, 0.875)
    assert boundary_f(pred, truth, bound_th=1) == pytest.approx(14 / 15, abs=1e-15)


def test_f_one_pixel_objects_by_hand():
    truth, near, diagonal, far = (np.zeros((5, 8), bool) for _ in range(4))
    truth[2, 2], near[2, 3], diagonal[3, 4], far[2, 5] = True, True, True, True
    assert boundary_f(near, truth, bound_th=1) == 1.0
    # boundaries {(1,1),(1,2),(2,1),(2,2)} and {(2,3),(2,4),(3,3),(3,4)}: one match each way
    assert boundary_precision_recall(diagonal, truth, bound_th=1) == (0.25, 0.25)
    assert boundary_f(diagonal, truth, bound_th=1) == 0.25
    assert boundary_precision_recall(far, truth, bound_th=1) == (0.0, 0.0)
    assert boundary_f(far, truth, bound_th=1) == 0.0


def test_f_empty_cases_follow_davis():
    one = np.zeros_like(EMPTY)
    one[2, 3] = True
    assert boundary_precision_recall(EMPTY, EMPTY) == (1.0, 1.0)
    assert boundary_precision_recall(EMPTY, one) == (1.0, 0.0)  # empty prediction
    assert boundary_precision_recall(one, EMPTY) == (0.0, 1.0)  # empty truth
    assert boundary_f(EMPTY, EMPTY) == 1.0
    assert boundary_f(EMPTY, one) == 0.0
    assert boundary_f(one, EMPTY) == 0.0
    full = np.ones_like(EMPTY)  # a full mask has no boundary either: F = 1 although J = 0
    assert boundary_f(full, EMPTY) == 1.0
    assert jaccard(full, EMPTY) == 0.0


def test_bound_th_two_is_a_two_pixel_radius():
    truth = rect((100, 100), 40, 60, 40, 60)  # boundary: the ring rows/cols 39..59 (80 px)
    assert boundary_f(np.roll(truth, 2, axis=1), truth, bound_th=2) == 1.0
    # shifted by 3: 21 pixels of the far column and 15 of the near column (rows 42..56) are
    # more than 2 px from the other ring, both ways → P = R = 44/80
    shifted = np.roll(truth, 3, axis=1)
    assert boundary_precision_recall(shifted, truth, bound_th=2) == (0.55, 0.55)
    assert boundary_f(shifted, truth, bound_th=2) == pytest.approx(0.55, abs=1e-15)


def test_objects_touching_the_border_are_not_closed_by_it():
    # boxes in the bottom-right corner: a box's boundary is only its top and left edge, one
    # pixel outside it (truth: row 9, cols 19..29 and col 19, rows 10..19: 21 px); along the
    # image border there is none
    truth = rect((20, 30), 10, 20, 20, 30)
    assert boundary_f(rect((20, 30), 8, 20, 20, 30), truth, bound_th=2) == 1.0
    # 2 px up and left: 25 px, of which (7,17), (7,18), (8,17) are more than 2 px from the
    # truth's corner (9,19) → P = 22/25, R = 1, F = 44/47
    up_left = rect((20, 30), 8, 20, 18, 30)
    assert boundary_precision_recall(up_left, truth, bound_th=2) == (22 / 25, 1.0)
    assert boundary_f(up_left, truth, bound_th=2) == pytest.approx(44 / 47, abs=1e-15)
    # 3 px up and left: every edge pixel is 3 px or more from the other box's edges
    assert boundary_f(rect((20, 30), 7, 20, 17, 30), truth, bound_th=2) == 0.0


def test_boundary_f_agrees_with_pairwise_reference_on_random_masks():
    rng = np.random.default_rng(1)
    for i in range(30):
        shape = (int(rng.integers(2, 30)), int(rng.integers(2, 30)))
        pred, truth = random_blobs(rng, shape), random_blobs(rng, shape)
        for th in (0.008, 0.1, 2):
            radius = bound_pixels(shape, th)
            assert boundary_f(pred, truth, bound_th=th) == pytest.approx(
                reference_f(pred, truth, radius), abs=1e-12
            ), (i, th)


# ---------------------------------------------------------------- J and void


def test_jaccard_by_hand_and_empty_union():
    a = rect((40, 50), 5, 15, 10, 30)  # 200 pixels
    b = rect((40, 50), 10, 25, 20, 40)  # 300 pixels, 50 shared
    assert jaccard(a, b) == 50 / 450
    assert jaccard(EMPTY, EMPTY) == 1.0  # DAVIS
    assert jaccard(EMPTY, EMPTY, empty_union=0.0) == 0.0  # VGGT4D
    assert jaccard(a, np.zeros_like(a), empty_union=0.0) == 0.0


def test_void_by_hand():
    truth = grid(["......", ".##...", ".##...", "......"])  # 4 pixels
    void = grid(["......", "...##.", "......", "......"])  # 2 pixels
    pred = grid(["......", ".####.", ".##...", ".##..."])  # 4 + 2 void + 2 extra
    assert jaccard(pred, truth, void) == 4 / 6
    assert jaccard(pred, truth | void) == 6 / 8  # void counted as foreground instead
    # void only: cleared, both masks empty → J = 1 (union empty), F = 1 (no boundaries)
    assert jaccard(void, np.zeros_like(void), void) == 1.0
    assert jaccard(void, np.zeros_like(void), void, empty_union=0.0) == 0.0
    assert boundary_f(void, np.zeros_like(void), void) == 1.0


def test_official_void_test_reproduced():
    """davis2017-evaluation ``pytest/test_evaluation.py::test_void_masks``: a prediction that
    spills only into void scores J = 1 and F = 1."""
    truth, pred, void = (np.zeros((200, 200), bool) for _ in range(3))
    truth[100:150, 100:150] = True
    void[50:100, 100:150] = True
    pred[50:150, 100:150] = True
    assert jaccard(pred, truth, void) == 1.0
    assert boundary_f(pred, truth, void) == 1.0
    assert jaccard(pred, truth) == 0.5  # without void: 2500 / 5000
    assert boundary_f(pred, truth) < 1.0


# ---------------------------------------------------------------- statistics


def test_decay_bins_literal():
    # edges round(linspace(1, n, 5)) - 1 with halves rounded up; bins include both edges
    assert decay_bins(1) == [(0, 0)] * 4
    assert decay_bins(3) == [(0, 1), (1, 1), (1, 2), (2, 2)]
    assert decay_bins(4) == [(0, 1), (1, 2), (2, 2), (2, 3)]
    assert decay_bins(5) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert decay_bins(8) == [(0, 2), (2, 4), (4, 5), (5, 7)]
    assert decay_bins(10) == [(0, 2), (2, 5), (5, 7), (7, 9)]
    assert decay_bins(104) == [(0, 26), (26, 52), (52, 77), (77, 103)]


def test_frame_statistics_hand_made_sequences():
    mean, recall, decay = frame_statistics([1, 1, 0, 0, 0, 0, 0, 0])
    assert (mean, recall) == (0.25, 0.25)
    assert decay == pytest.approx(2 / 3)  # frames 0..2 minus frames 5..7 (np.array_split: 1)
    # None = left out (davis2016's first and last frame); 0.5 is not above 0.5
    mean, recall, decay = frame_statistics([None, 1, 1, 0, 0.5, 0, 0, 0, 0, None])
    assert mean == 2.5 / 8
    assert recall == 0.25
    assert decay == pytest.approx(2 / 3)
    assert frame_statistics([0.2, 0.9, 0.6, 0.7]) == pytest.approx((0.6, 0.75, 0.55 - 0.65))


# ---------------------------------------------------------------- sequences and protocols


def protocol_sequence() -> tuple[np.ndarray, np.ndarray]:
    """5 frames: both empty, exact, both empty, prediction empty, truth empty."""
    square, dot = rect((6, 6), 1, 4, 1, 4), rect((6, 6), 2, 3, 2, 3)
    empty = np.zeros((6, 6), bool)
    preds = np.stack([empty, square, empty, empty, dot])
    truth = np.stack([empty, square, empty, square, empty])
    return preds, truth


def test_score_sequence_davis2017():
    scores = score_sequence(*protocol_sequence(), rules=DAVIS2017)
    assert scores["protocol"] == "davis2017"
    assert scores["J"] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert scores["F"] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert (scores["JM"], scores["JR"], scores["JD"]) == (0.6, 0.6, 1.0)
    assert (scores["FM"], scores["FR"], scores["FD"]) == (0.6, 0.6, 1.0)
    assert all(type(scores[k]) is float for k in ("JM", "JR", "JD", "FM", "FR", "FD"))


def test_score_sequence_vggt4d_zeroes_j_only():
    scores = score_sequence(*protocol_sequence(), rules=VGGT4D)
    assert scores["protocol"] == "vggt4d"
    assert scores["J"] == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert scores["F"] == [1.0, 1.0, 1.0, 0.0, 0.0]  # F unchanged: 1 where both are empty
    assert (scores["JM"], scores["JR"], scores["JD"]) == (0.2, 0.2, 0.5)
    assert scores["FM"] == 0.6


def test_score_sequence_davis2016_leaves_out_first_and_last():
    scores = score_sequence(*protocol_sequence(), rules=DAVIS2016)
    assert scores["J"] == [None, 1.0, 1.0, 0.0, None]
    assert scores["F"] == [None, 1.0, 1.0, 0.0, None]
    assert scores["JM"] == pytest.approx(2 / 3)
    assert scores["JR"] == pytest.approx(2 / 3)
    assert scores["JD"] == 1.0  # 3 values: bins (0,1) … (2,2) → mean(1, 1) − 0
    with pytest.raises(UserError, match="at least 3 frames"):
        score_sequence(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), rules=DAVIS2016)


def test_score_sequence_void_per_protocol():
    truth = grid(["......", ".##...", ".##...", "......"])[None].repeat(3, axis=0)
    void = grid(["......", "...##.", "......", "......"])[None].repeat(3, axis=0)
    pred = grid(["......", ".####.", ".##...", "......"])[None].repeat(3, axis=0)
    assert score_sequence(pred, truth, void, rules=DAVIS2017)["J"] == [1.0] * 3
    assert score_sequence(pred, truth, void, rules=DAVIS2017)["F"] == [1.0] * 3
    # no void: label 255 is foreground, so the prediction is exact too
    assert score_sequence(pred, truth, void, rules=VGGT4D)["J"] == [1.0] * 3
    with pytest.raises(UserError, match="void"):
        score_sequence(pred, truth, void[:2], rules=DAVIS2017)


def test_score_sequence_resizes_with_one_warning(caplog):
    rng = np.random.default_rng(2)
    small = random_blobs(rng, (20, 30))[None].repeat(3, axis=0)
    small[1] = ~small[1]
    truth = small.repeat(2, axis=1).repeat(2, axis=2)  # exact 2x nearest-neighbour upsampling
    with caplog.at_level(logging.WARNING, logger="vggt4d.evaluate"):
        scores = score_sequence(small, truth, rules=DAVIS2017)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "resiz" in warnings[0].getMessage()
    assert scores["J"] == [1.0] * 3 and scores["F"] == [1.0] * 3


def test_score_sequence_bad_input():
    with pytest.raises(UserError, match=r"\b3\b.*\b4\b"):
        score_sequence(np.zeros((3, 5, 5)), np.zeros((4, 5, 5)), rules=DAVIS2017)
    with pytest.raises(UserError, match="bound_th"):
        score_sequence(np.zeros((3, 5, 5)), np.zeros((3, 5, 5)), rules=DAVIS2017, bound_th=1.5)


def test_average_sequences_weighs_sequences_equally():
    keys = ("JM", "JR", "JD", "FM", "FR", "FD")
    per = {
        "a": dict(zip(keys, (1.0, 1.0, 0.0, 0.5, 0.0, 0.2), strict=True), protocol="vggt4d"),
        "b": dict(zip(keys, (0.0, 0.0, 0.4, 1.0, 1.0, 0.0), strict=True), protocol="vggt4d"),
    }
    mean = average_sequences(per)
    assert mean == {"JM": 0.5, "JR": 0.5, "JD": 0.2, "FM": 0.75, "FR": 0.5, "FD": 0.1,
                    "J&F": 0.625, "sequences": 2, "protocol": "vggt4d"}
    per["b"]["protocol"] = "davis2017"
    with pytest.raises(ValueError, match="different protocols"):
        average_sequences(per)


def test_unsupervised_figures():
    masks = np.stack([rect((4, 5), 0, 2, 0, 2), rect((4, 5), 0, 2, 0, 4), np.zeros((4, 5), bool),
                      np.zeros((4, 5), bool)])
    figures = unsupervised_figures(masks)
    assert figures["area_fraction_per_frame"] == [0.2, 0.4, 0.0, 0.0]
    assert figures["temporal_iou"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)


# ---------------------------------------------------------------- folders and command


def save_gray(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def save_palette(path: Path, labels: np.ndarray) -> None:
    """Palette PNG whose index 1 is *black*: only the index may decide foreground."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette([0, 0, 0, 0, 0, 0, 200, 0, 0] + [0] * (3 * 252) + [224, 224, 192])
    image.save(path)


def save_rgb(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((*mask.shape, 3), np.uint8)
    rgb[mask, 1] = 255  # green only: "> 0 on any channel"
    Image.fromarray(rgb).save(path)


SHAPE = (40, 60)
A_FRAMES = [rect(SHAPE, 5, 20, 5 + 3 * t, 25 + 3 * t) for t in range(3)]
A_VOID = rect(SHAPE, 25, 30, 0, 10)  # void in every frame of seqA's annotation
B_GT = [rect(SHAPE, 10, 20, 10, 20), np.zeros(SHAPE, bool)]
B_PRED = [rect(SHAPE, 10, 20, 15, 25), np.zeros(SHAPE, bool)]  # J = 50 / 150, then empty


@pytest.fixture
def davis_tree(tmp_path):
    gt_root, pred_root = tmp_path / "DAVIS", tmp_path / "pred"
    for t, mask in enumerate(A_FRAMES):
        labels = mask.astype(np.uint8)
        labels[mask & (np.arange(SHAPE[1]) % 2 == 0)] = 2  # two object ids, both foreground
        labels[A_VOID] = 255
        save_palette(gt_root / "Annotations/480p/seqA" / f"{t:05d}.png", labels)
        save_rgb(pred_root / "seqA" / f"{t:05d}.png", mask | A_VOID)  # spills into void
    for t, (g, p) in enumerate(zip(B_GT, B_PRED, strict=True)):
        save_gray(gt_root / "Annotations/480p/seqB" / f"{t:05d}.png", g)
        save_gray(pred_root / "seqB" / f"{t:05d}.png", p)
    (gt_root / "JPEGImages/480p/seqA").mkdir(parents=True)
    return gt_root, pred_root


def test_read_mask_folder_palette_void_rgb_and_order(tmp_path):
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:5, 3:9] = 1
    labels[10:12, 10:12] = 2
    labels[20:22, 0:3] = 255
    save_palette(tmp_path / "gt" / "frame_10.png", labels)
    save_palette(tmp_path / "gt" / "frame_2.png", np.zeros(SHAPE, np.uint8))
    read = read_mask_folder(tmp_path / "gt")
    assert read.foreground.shape == read.void.shape == (2, *SHAPE)
    assert read.foreground.dtype == read.void.dtype == bool
    assert not read.foreground[0].any() and not read.void[0].any()  # frame_2 before frame_10
    np.testing.assert_array_equal(read.foreground[1], (labels > 0) & (labels < 255))
    np.testing.assert_array_equal(read.void[1], labels == 255)
    np.testing.assert_array_equal(read.labelled()[1], labels > 0)
    save_gray(tmp_path / "grey" / "0.png", A_FRAMES[0])  # grey 255 is foreground, not void
    grey = read_mask_folder(tmp_path / "grey")
    np.testing.assert_array_equal(grey.foreground[0], A_FRAMES[0])
    assert not grey.void.any()
    save_rgb(tmp_path / "rgb" / "0.png", A_FRAMES[0])
    np.testing.assert_array_equal(read_mask_folder(tmp_path / "rgb").foreground[0], A_FRAMES[0])
    with pytest.raises(UserError):
        read_mask_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError):
        read_mask_folder(tmp_path / "empty")


def test_evaluate_folders_davis_layout(davis_tree):
    gt_root, pred_root = davis_tree
    result = evaluate_folders(pred_root, gt_root, rules=DAVIS2017)
    assert result["protocol"] == "davis2017" and result["bound_th"] == 0.008
    assert set(result["sequences"]) == {"seqA", "seqB"}
    a, b = result["sequences"]["seqA"], result["sequences"]["seqB"]
    assert a["J"] == [1.0] * 3 and a["F"] == [1.0] * 3  # the spill into void is not counted
    assert b["J"] == pytest.approx([50 / 150, 1.0])
    f0 = reference_f(B_PRED[0], B_GT[0], bound_pixels(SHAPE))
    assert b["F"] == pytest.approx([f0, 1.0])
    mean = result["mean"]
    assert mean["sequences"] == 2 and mean["protocol"] == "davis2017"
    assert mean["JM"] == pytest.approx((1.0 + (50 / 150 + 1.0) / 2) / 2)
    assert mean["FM"] == pytest.approx((1.0 + (f0 + 1.0) / 2) / 2)
    # vggt4d: no void (the void block is foreground, which the prediction covers), J = 0 on the
    # both-empty frame, F still 1 there
    vggt4d = evaluate_folders(pred_root, gt_root, rules=VGGT4D)
    assert vggt4d["protocol"] == "vggt4d"
    assert vggt4d["sequences"]["seqA"]["J"] == [1.0] * 3
    assert vggt4d["sequences"]["seqB"]["J"] == pytest.approx([50 / 150, 0.0])
    assert vggt4d["sequences"]["seqB"]["F"][1] == 1.0


def test_evaluate_folders_single_sequence_layouts(tmp_path):
    gt_dir = tmp_path / "gt" / "walk"
    job = tmp_path / "job"
    for t, (g, p) in enumerate(zip(B_GT, B_PRED, strict=True)):
        save_gray(gt_dir / f"{t:05d}.png", g)
        save_gray(job / "masks" / f"dynamic_{t:04d}.png", p)
    for pred in (job, job / "masks"):
        result = evaluate_folders(pred, gt_dir, rules=DAVIS2017)
        assert list(result["sequences"]) == ["walk"]
        assert result["sequences"]["walk"]["J"] == pytest.approx([50 / 150, 1.0])


def test_evaluate_folders_missing_sequence(davis_tree):
    gt_root, pred_root = davis_tree
    for file in (pred_root / "seqB").iterdir():
        file.unlink()
    (pred_root / "seqB").rmdir()
    with pytest.raises(UserError, match="seqB"):
        evaluate_folders(pred_root, gt_root, rules=DAVIS2017)


def test_main_writes_json_with_protocol(davis_tree, tmp_path, capsys):
    gt_root, pred_root = davis_tree
    out = tmp_path / "out" / "metrics.json"
    assert main([str(pred_root), str(gt_root), "--out", str(out), "--protocol", "vggt4d"]) == 0
    data = json.loads(out.read_text())
    assert data["protocol"] == "vggt4d" and data["mean"]["protocol"] == "vggt4d"
    assert data["sequences"]["seqB"]["protocol"] == "vggt4d"
    assert data["sequences"]["seqB"]["J"] == pytest.approx([50 / 150, 0.0])
    printed = capsys.readouterr().out
    assert "vggt4d" in printed and "seqA" in printed and "JD" in printed and "mean" in printed
    assert not list(out.parent.glob("*.tmp"))


def test_main_davis2016_writes_null_for_left_out_frames(tmp_path):
    for t, mask in enumerate(A_FRAMES):
        save_gray(tmp_path / "gt" / "seqA" / f"{t:05d}.png", mask)
        save_gray(tmp_path / "pred" / "seqA" / f"{t:05d}.png", mask)
    out = tmp_path / "m.json"
    args = [str(tmp_path / "pred"), str(tmp_path / "gt"), "--protocol", "davis2016"]
    assert main([*args, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["sequences"]["seqA"]["J"] == [None, 1.0, None]


def test_main_bad_input_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    with pytest.raises(SystemExit):
        main([str(tmp_path), str(tmp_path), "--protocol", "davis2018"])
