"""Post-processing of soft dynamic maps, checked against independent computations.

References: OpenCV's guided filter, explicit per-pixel loops, hand-computed interpolation,
analytic Gaussian weights, an exhaustive multi-Otsu search, a breadth-first flood fill.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections import deque

import cv2
import numpy as np
import pytest

from vggt4d.errors import UserError
from vggt4d.postprocess import (
    adaptive_multi_otsu,
    adaptive_multi_otsu_details,
    binarize,
    guide_from_frames,
    guided_filter,
    hysteresis,
    kmeans_smooth,
    morphology,
    multi_otsu_over_blocks,
    otsu_per_frame,
    spatial_gaussian,
    temporal_gaussian,
    upsample_bilinear,
)

# ------------------------------------------------------------------------------ upsampling


def test_upsample_bilinear_hand_computed():
    # align_corners=False: output centres map to source x = (i + 0.5)/2 − 0.5 = −.25, .25, .75,
    # 1.25 → clamped 0, .25, .75, 1; value = 2·y + x on the source [[0, 1], [2, 3]]
    maps = np.array([[[0.0, 1.0], [2.0, 3.0]], [[1.0, 1.0], [1.0, 1.0]]])
    expected = np.array([
        [0.0, 0.25, 0.75, 1.0],
        [0.5, 0.75, 1.25, 1.5],
        [1.5, 1.75, 2.25, 2.5],
        [2.0, 2.25, 2.75, 3.0],
    ])
    out = upsample_bilinear(maps, (4, 4))
    assert out.shape == (2, 4, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], expected, atol=1e-6)
    np.testing.assert_allclose(out[1], 1.0, atol=1e-6)


def test_upsample_bilinear_non_square():
    maps = np.random.default_rng(0).random((3, 5, 7))
    out = upsample_bilinear(maps, (10, 21))
    assert out.shape == (3, 10, 21)
    # factor 2 in H, 3 in W: output (1, 1) sits at source (0.25, 0.0)
    np.testing.assert_allclose(out[:, 1, 1], 0.75 * maps[:, 0, 0] + 0.25 * maps[:, 1, 0],
                               atol=1e-6)


# ------------------------------------------------------------------------------ guided filter

OPENCV_TOL = 5e-5  # measured: ≤ 6.3e-6 (grey), ≤ 1.2e-7 (RGB) on every pixel, borders included


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("radius", [3, 5])
@pytest.mark.parametrize("eps", [1e-3, 1e-2])
def test_guided_filter_matches_opencv(channels, radius, eps):
    rng = np.random.default_rng(radius * 10 + channels)
    guide = rng.random((2, 40, 50, channels)).astype(np.float32)
    src = rng.random((2, 40, 50)).astype(np.float32)
    out = guided_filter(guide, src, radius, eps)
    assert out.shape == (2, 40, 50) and out.dtype == np.float32
    for t in range(2):
        cv_guide = guide[t, ..., 0] if channels == 1 else guide[t]
        ref = cv2.ximgproc.guidedFilter(cv_guide, src[t], radius, eps)
        assert np.abs(out[t] - ref).max() < OPENCV_TOL  # borders included (BORDER_REFLECT)


def test_guided_filter_radius_larger_than_image_matches_opencv():
    rng = np.random.default_rng(3)
    guide = rng.random((1, 9, 11, 3)).astype(np.float32)
    src = rng.random((1, 9, 11)).astype(np.float32)
    ref = cv2.ximgproc.guidedFilter(guide[0], src[0], 12, 1e-3)
    assert np.abs(guided_filter(guide, src, 12, 1e-3)[0] - ref).max() < OPENCV_TOL


def test_guided_filter_count_border_differs_from_opencv_only_near_borders():
    rng = np.random.default_rng(4)
    radius = 3
    guide = rng.random((1, 40, 50, 1)).astype(np.float32)
    src = rng.random((1, 40, 50)).astype(np.float32)
    out = guided_filter(guide, src, radius, 1e-3, border="count")[0]
    ref = cv2.ximgproc.guidedFilter(guide[0, ..., 0], src[0], radius, 1e-3)
    inner = slice(2 * radius, -2 * radius)  # a, b are averaged again: 2r from the border
    assert np.abs(out[inner, inner] - ref[inner, inner]).max() < OPENCV_TOL
    assert np.abs(out - ref).max() > 1e-3


def _reflect(index: int, n: int) -> int:
    while index < 0 or index >= n:  # BORDER_REFLECT: …cba|abc…|cba…
        index = -index - 1 if index < 0 else 2 * n - 1 - index
    return index


def _brute_guided(guide, src, radius, eps, border):
    """Per-pixel loops in float64: a = (Σ + eps·U)⁻¹ cov(I, p), b = p̄ − aᵀμ, q = āᵀI + b̄."""
    height, width, channels = guide.shape

    def window(i, j):
        if border == "count":
            return [(y, x) for y in range(i - radius, i + radius + 1)
                    for x in range(j - radius, j + radius + 1)
                    if 0 <= y < height and 0 <= x < width]
        return [(_reflect(y, height), _reflect(x, width))
                for y in range(i - radius, i + radius + 1)
                for x in range(j - radius, j + radius + 1)]

    a = np.zeros((height, width, channels))
    b = np.zeros((height, width))
    for i in range(height):
        for j in range(width):
            pixels = window(i, j)
            guides = np.array([guide[y, x] for y, x in pixels])
            values = np.array([src[y, x] for y, x in pixels])
            mu = guides.mean(axis=0)
            mean_p = values.mean()
            sigma = (guides[:, :, None] * guides[:, None, :]).mean(axis=0) - np.outer(mu, mu)
            cov = (guides * values[:, None]).mean(axis=0) - mu * mean_p
            a[i, j] = np.linalg.inv(sigma + eps * np.eye(channels)) @ cov
            b[i, j] = mean_p - a[i, j] @ mu
    out = np.zeros((height, width))
    for i in range(height):
        for j in range(width):
            pixels = window(i, j)
            mean_a = np.mean([a[y, x] for y, x in pixels], axis=0)
            mean_b = np.mean([b[y, x] for y, x in pixels])
            out[i, j] = mean_a @ guide[i, j] + mean_b
    return out


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("border", ["reflect", "count"])
def test_guided_filter_matches_brute_force_loops(channels, border):
    rng = np.random.default_rng(channels)
    guide = rng.random((12, 14, channels))
    src = rng.random((12, 14))
    expected = _brute_guided(guide, src, 2, 1e-2, border)
    out = guided_filter(guide[None], src[None], 2, 1e-2, border=border)[0]
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_guided_filter_sharpens_edges_beyond_bilinear():
    # the object edge (guide) is at column 45, inside patch 5 of an 8-pixel patch grid
    height, width, patch = 16, 96, 8
    guide = np.zeros((1, height, width, 1))
    guide[..., 45:, 0] = 1.0
    coarse = np.zeros((1, height // patch, width // patch))
    coarse[..., 6:] = 1.0
    coarse[..., 5] = 3.0 / 8.0  # the patch holding the edge is 3/8 object
    blurry = upsample_bilinear(coarse, (height, width))
    sharp = guided_filter(guide, blurry, 8, 1e-3)
    jumps_blurry = np.diff(blurry[0], axis=1)
    jumps_sharp = np.diff(sharp[0], axis=1)
    # bilinear: a ramp over ~16 px, no step above 0.1; guided: one step of > 0.45 at the edge
    assert jumps_blurry.max() < 0.1
    assert jumps_sharp.max(axis=1).min() > 0.45 and (jumps_sharp.argmax(axis=1) == 44).all()
    assert jumps_sharp.max() > 5 * jumps_blurry.max()
    truth = guide[..., 0] > 0.5
    assert ((blurry > 0.5) != truth).sum() == height  # the 0.5 level is one column off
    assert ((sharp > 0.5) != truth).sum() == 0  # and lands on the guide's edge here


def test_guided_filter_errors():
    guide, src = np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 4))
    with pytest.raises(UserError, match="eps"):
        guided_filter(guide, src, 2, 0.0)
    with pytest.raises(UserError, match="radius"):
        guided_filter(guide, src, -1, 1e-3)
    with pytest.raises(UserError, match="border"):
        guided_filter(guide, src, 1, 1e-3, border="wrap")
    with pytest.raises(UserError, match="same T, H, W"):
        guided_filter(guide, np.zeros((1, 4, 5)), 1, 1e-3)


# ------------------------------------------------------------------------------ guides


def test_guide_from_frames_modes():
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 256, (2, 6, 7, 3), dtype=np.uint8)
    depth = rng.uniform(1.0, 5.0, (2, 6, 7))
    depth[0, 0, 0] = 0.0  # invalid
    depth[1] = 2.0  # flat frame

    grey = guide_from_frames(frames, None, "grey")
    cv_grey = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]) / 255.0
    assert grey.shape == (2, 6, 7, 1) and grey.dtype == np.float32
    np.testing.assert_allclose(grey[..., 0], cv_grey, atol=0.6 / 255)  # cv2 rounds to uint8

    rgb = guide_from_frames(frames, None, "rgb")
    np.testing.assert_allclose(rgb, frames / 255.0, atol=1e-6)

    inverse = 1.0 / depth[0][depth[0] > 0]
    expected = (1.0 / np.where(depth[0] > 0, depth[0], np.inf) - inverse.min()) / np.ptp(inverse)
    rgbd = guide_from_frames(frames, depth, "rgbd")
    assert rgbd.shape == (2, 6, 7, 4)
    np.testing.assert_allclose(rgbd[..., :3], rgb)
    np.testing.assert_allclose(rgbd[0, ..., 3], np.where(depth[0] > 0, expected, 0.0), atol=1e-6)
    assert rgbd[0, 0, 0, 3] == 0.0 and rgbd[0, ..., 3].max() == pytest.approx(1.0)
    np.testing.assert_array_equal(rgbd[1, ..., 3], 0.0)

    mixed = guide_from_frames(frames, depth, "grey_depth")
    np.testing.assert_allclose(mixed[..., 0], 0.7 * grey[..., 0] + 0.3 * rgbd[..., 3], atol=1e-6)
    half = guide_from_frames(frames, depth, "grey_depth", depth_weight=0.5)
    np.testing.assert_allclose(half[..., 0], 0.5 * grey[..., 0] + 0.5 * rgbd[..., 3], atol=1e-6)


def test_guide_from_frames_errors():
    frames = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    with pytest.raises(UserError, match="grey, rgb, rgbd, grey_depth"):
        guide_from_frames(frames, None, "hsv")
    for mode in ("rgbd", "grey_depth"):
        with pytest.raises(UserError, match="needs depth"):
            guide_from_frames(frames, None, mode)
    with pytest.raises(UserError, match="depth_weight"):
        guide_from_frames(frames, np.ones((1, 4, 4)), "grey_depth", depth_weight=1.5)
    with pytest.raises(UserError, match="does not match"):
        guide_from_frames(frames, np.ones((1, 4, 5)), "rgbd")


# ------------------------------------------------------------------------------ smoothing


@pytest.mark.parametrize(("sigma", "truncate"), [(1.0, 4.0), (1.5, 4.0), (2.0, 2.0)])
def test_temporal_gaussian_impulse_gives_normalised_weights(sigma, truncate):
    maps = np.zeros((31, 3, 4))
    maps[15, 1, 2] = 1.0
    out = temporal_gaussian(maps, sigma, truncate)
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-(offsets**2) / (2 * sigma**2))
    weights /= weights.sum()
    expected = np.zeros(31)
    expected[15 - radius: 15 + radius + 1] = weights
    np.testing.assert_allclose(out[:, 1, 2], expected, atol=1e-7)
    out[:, 1, 2] = 0.0
    np.testing.assert_array_equal(out, 0.0)  # no spatial spreading


def test_temporal_gaussian_ends_and_zero_sigma():
    ramp = np.broadcast_to(np.arange(6.0)[:, None, None], (6, 2, 2))
    out = temporal_gaussian(ramp, 1.0)
    offsets = np.arange(-4, 5)
    weights = np.exp(-(offsets**2) / 2.0)
    weights /= weights.sum()
    # "nearest": beyond the ends the first / last frame repeats
    expected = [weights @ np.clip(t + offsets, 0, 5) for t in range(6)]
    np.testing.assert_allclose(out[:, 1, 0], expected, atol=1e-6)
    # "nearest": frame 0 sees frame 0 repeated before it, so it moves up, not down
    assert out[0, 0, 0] > 0.0 and out[-1, 0, 0] < 5.0
    np.testing.assert_allclose(out[2:4], ramp[2:4], atol=0.02)  # a linear ramp is kept inside
    copy = temporal_gaussian(ramp, 0.0)
    np.testing.assert_array_equal(copy, ramp)
    copy[0] = 9.0
    assert ramp[0, 0, 0] == 0.0


def test_spatial_gaussian_per_frame():
    maps = np.zeros((2, 11, 11))
    maps[0, 5, 5] = 1.0
    out = spatial_gaussian(maps, 0.5, truncate=2.0)  # 3×3 taps, the any4dgs v4 blur
    np.testing.assert_array_equal(out[1], 0.0)
    reference = cv2.GaussianBlur(maps[0], (3, 3), 0.5)
    np.testing.assert_allclose(out[0], reference, atol=1e-6)
    assert np.count_nonzero(out[0]) == 9
    assert np.array_equal(spatial_gaussian(maps, 0.0), maps)


# ------------------------------------------------------------------------------ thresholds


def _half_bin(values, bins=256):
    """skimage returns a bin centre: the lower class's top half bin may lie above it."""
    return float(np.ptp(values)) / bins / 2


@pytest.mark.parametrize("centres", [(0.1, 0.9), (0.2, 0.8), (0.1, 0.3, 0.9), (0.1, 0.2, 0.8)])
def test_adaptive_multi_otsu_planted_clusters(centres):
    rng = np.random.default_rng(6)
    sizes = rng.integers(300, 700, len(centres))
    clusters = [rng.normal(c, 0.02, n) for c, n in zip(centres, sizes, strict=True)]
    values = np.concatenate(clusters)
    threshold = adaptive_multi_otsu(values)
    assert clusters[-2].max() - _half_bin(values) <= threshold < clusters[-1].min()


def test_adaptive_multi_otsu_scores_pick_the_bottom_split_when_it_wins():
    # clusters at .15 / .55 / .9 with equal sizes: Var of means / √n gives
    # n=2 {.15 | .55 .9}: 0.0574 > n=3: 0.0542 > n=2 {.15 .55 | .9}: 0.0535
    rng = np.random.default_rng(12)
    clusters = [rng.normal(c, 0.01, 500) for c in (0.15, 0.55, 0.9)]
    details = adaptive_multi_otsu_details(np.concatenate(clusters))
    assert details["classes"] == 2
    slack = _half_bin(np.concatenate(clusters))
    assert clusters[0].max() - slack <= details["threshold"] < clusters[1].min()
    assert details["scores"][2] > details["scores"][3]


def _brute_force_choice(values, classes=(2, 3, 4)):
    """Exhaustive multi-Otsu over contiguous splits of the distinct values, then the score."""
    distinct, counts = np.unique(values, return_counts=True)
    total_mean = values.mean()
    best_n, best_score, best_groups = None, -math.inf, None
    for n in classes:
        best_between, groups = -math.inf, None
        for cuts in itertools.combinations(range(1, len(distinct)), n - 1):
            bounds = (0, *cuts, len(distinct))
            parts = [(distinct[lo:hi], counts[lo:hi]) for lo, hi in itertools.pairwise(bounds)]
            means = [float(v @ c / c.sum()) for v, c in parts]
            between = sum(c.sum() * (m - total_mean) ** 2 for (_, c), m in zip(parts, means,
                                                                               strict=True))
            if between > best_between:
                best_between, groups = between, (parts, means)
        score = float(np.var(groups[1]) / math.sqrt(n))
        if score > best_score:
            best_n, best_score, best_groups = n, score, groups[0]
    return best_n, best_score, best_groups


@pytest.mark.parametrize("seed", range(6))
def test_adaptive_multi_otsu_matches_exhaustive_search(seed):
    # integers 0..16 with 256 bins: every value sits at a bin's left edge, so the binned
    # search and the exact one pick the same split
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 40, 17) * (rng.random(17) < 0.7)
    counts[0], counts[16] = max(counts[0], 1), max(counts[16], 1)
    values = np.repeat(np.arange(17.0), counts)
    rng.shuffle(values)
    n, score, groups = _brute_force_choice(values)
    details = adaptive_multi_otsu_details(values)
    assert details["classes"] == n
    assert details["scores"][n] == pytest.approx(score, rel=1e-9)
    top, below = groups[-1][0], groups[-2][0]
    assert below.max() <= details["threshold"] < top.min()
    assert adaptive_multi_otsu(values) == details["threshold"]


@pytest.mark.parametrize("seed", range(4))
def test_multi_otsu_over_blocks_is_skimage_on_all_the_values(seed):
    """Blocks of uneven sizes (NaN among them): every class count's thresholds are
    scikit-image's on the whole array, and each score is Var(class means) / sqrt(n) of the
    classes those thresholds make, computed here from all the values at once."""
    from skimage.filters import threshold_multiotsu

    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.normal(centre, 0.05, size) for centre, size in
                             ((0.1, 3000), (0.45, 900), (0.8, 400))]).astype(np.float32)
    rng.shuffle(values)
    blocks = np.split(values, np.sort(rng.choice(np.arange(1, len(values)), 5, replace=False)))
    blocks[2] = np.append(blocks[2], np.float32(np.nan))
    details = multi_otsu_over_blocks(lambda: iter(blocks))
    flat = values.astype(np.float64)
    for n, score in details["scores"].items():
        thresholds = threshold_multiotsu(flat, classes=n)
        labels = np.digitize(flat, thresholds, right=True)
        means = [flat[labels == j].mean() for j in range(n)]
        assert score == pytest.approx(np.var(means) / math.sqrt(n), rel=1e-12)
        if n == details["classes"]:
            assert details["thresholds"] == [float(t) for t in thresholds]
            assert details["threshold"] == float(thresholds[-1])
    assert details["classes"] in (2, 3, 4) and len(details["scores"]) == 3


def test_adaptive_multi_otsu_degenerate_inputs():
    assert adaptive_multi_otsu(np.full(100, 0.4)) == math.inf
    assert adaptive_multi_otsu(np.array([])) == math.inf
    assert adaptive_multi_otsu(np.array([np.nan, 1.0, 1.0])) == math.inf
    two = adaptive_multi_otsu_details(np.array([0.0] * 5 + [1.0] * 7))
    assert two["classes"] == 2 and set(two["scores"]) == {2}  # 3 and 4 classes are skipped
    assert 0.0 <= two["threshold"] < 1.0
    with pytest.raises(UserError, match="classes"):
        adaptive_multi_otsu(np.arange(10.0), classes=(1, 2))


def test_otsu_per_frame():
    rng = np.random.default_rng(7)
    maps = np.full((3, 10, 10), 0.5)
    maps[0] = rng.normal(0.2, 0.02, (10, 10))
    maps[0, :4] = rng.normal(0.8, 0.02, (4, 10))
    maps[2] = 0.2 + 0.6 * (np.arange(10) >= 7)[None, :]
    thresholds = otsu_per_frame(maps)
    assert thresholds.shape == (3,)
    # any threshold in the empty gap is optimal; skimage takes the first bin above the lower
    assert maps[0, 4:].max() - _half_bin(maps[0]) <= thresholds[0] < maps[0, :4].min()
    assert thresholds[1] == math.inf
    assert 0.2 <= thresholds[2] < 0.8


def _bfs_hysteresis(frame, low, high, connectivity):
    height, width = frame.shape
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 2:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    out = np.zeros(frame.shape, dtype=bool)
    queue = deque((y, x) for y in range(height) for x in range(width) if frame[y, x] > high)
    for y, x in queue:
        out[y, x] = True
    while queue:
        y, x = queue.popleft()
        for dy, dx in steps:
            ny, nx = y + dy, x + dx
            if (0 <= ny < height and 0 <= nx < width and not out[ny, nx]
                    and frame[ny, nx] > low):
                out[ny, nx] = True
                queue.append((ny, nx))
    return out


@pytest.mark.parametrize("connectivity", [1, 2])
@pytest.mark.parametrize("seed", range(3))
def test_hysteresis_matches_flood_fill(connectivity, seed):
    maps = np.random.default_rng(seed).random((4, 13, 17))
    out = hysteresis(maps, 0.45, 0.9, connectivity)
    expected = np.stack([_bfs_hysteresis(f, 0.45, 0.9, connectivity) for f in maps])
    np.testing.assert_array_equal(out, expected)
    assert out.any() and (out != (maps > 0.45)).any()  # the test can tell the two apart


def test_hysteresis_frames_are_independent_and_connectivity_matters():
    maps = np.zeros((2, 5, 5))
    maps[:, 1, 1] = maps[:, 2, 2] = 0.5  # diagonal neighbours above low in both frames
    maps[1, 1, 1] = 0.9  # only frame 1 has a seed
    four = hysteresis(maps, 0.3, 0.6, connectivity=1)
    eight = hysteresis(maps, 0.3, 0.6, connectivity=2)
    assert not four[0].any() and not eight[0].any()
    assert four[1].sum() == 1 and eight[1].sum() == 2
    with pytest.raises(UserError, match="must not exceed"):
        hysteresis(maps, 0.7, 0.6)
    with pytest.raises(UserError, match="connectivity"):
        hysteresis(maps, 0.3, 0.6, connectivity=3)


def test_binarize_dispatch():
    rng = np.random.default_rng(8)
    maps = rng.random((3, 9, 11))
    masks, info = binarize(maps, "threshold", threshold=0.4)
    np.testing.assert_array_equal(masks, maps > 0.4)
    assert info == {"method": "threshold", "threshold": 0.4}

    masks, info = binarize(maps, "otsu")
    per_frame = otsu_per_frame(maps)
    np.testing.assert_array_equal(masks, maps > per_frame[:, None, None])
    assert info["thresholds"] == pytest.approx(list(per_frame))

    masks, info = binarize(maps, "multi_otsu")
    np.testing.assert_array_equal(masks, maps > info["threshold"])
    assert info["threshold"] == adaptive_multi_otsu(maps)
    assert info["classes"] in (2, 3, 4)

    masks, info = binarize(maps, "hysteresis", low=0.3, high=0.95)
    np.testing.assert_array_equal(masks, hysteresis(maps, 0.3, 0.95, connectivity=2))
    assert info["low"] == 0.3 and info["high"] == 0.95

    for method in ("multi_otsu", "otsu"):  # constant input: nothing dynamic, strict JSON
        masks, info = binarize(np.full((2, 4, 4), 0.3), method)
        assert not masks.any()
        json.dumps(info, allow_nan=False)
    assert info["thresholds"] == [None, None]

    with pytest.raises(UserError, match="multi_otsu, otsu, threshold, hysteresis"):
        binarize(maps, "kittler")
    with pytest.raises(UserError, match="must not exceed"):
        binarize(maps, "hysteresis", low=0.8, high=0.2)


# ------------------------------------------------------------------------------ k-means, morphology


def test_kmeans_smooth_planted_clusters():
    rng = np.random.default_rng(9)
    labels = rng.integers(0, 3, (2, 6, 8))
    centres = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 5.0]])
    features = centres[labels] + rng.normal(0.0, 0.1, (2, 6, 8, 3))
    dyn = rng.random((2, 6, 8))
    out = kmeans_smooth(dyn, features, clusters=3, seed=0)
    assert out.shape == dyn.shape and out.dtype == np.float32
    expected = np.array([dyn[labels == k].mean() for k in range(3)])[labels]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_kmeans_smooth_caps_clusters(caplog):
    rng = np.random.default_rng(10)
    dyn = rng.random((2, 2, 2))
    features = rng.random((2, 2, 2, 4)) * 10
    with caplog.at_level(logging.WARNING, logger="vggt4d.postprocess"):
        out = kmeans_smooth(dyn, features, clusters=64)
    assert "using 8" in caplog.text
    np.testing.assert_allclose(out, dyn, rtol=1e-6)  # 8 clusters for 8 distinct patches
    with pytest.raises(UserError, match="clusters"):
        kmeans_smooth(dyn, features, clusters=0)
    with pytest.raises(UserError, match="matching dyn"):
        kmeans_smooth(dyn, features[:, :1], clusters=2)


@pytest.mark.parametrize(("op", "cv_op"), [
    ("open", cv2.MORPH_OPEN), ("close", cv2.MORPH_CLOSE),
    ("dilate", cv2.MORPH_DILATE), ("erode", cv2.MORPH_ERODE),
])
@pytest.mark.parametrize("size", [2, 3, 5])
def test_morphology_matches_opencv_per_frame(op, cv_op, size):
    masks = np.random.default_rng(size).random((3, 20, 23)) > 0.55
    masks[1] = False  # an empty frame between two busy ones stays as OpenCV makes it
    masks[2, :8, :8] = True  # touches the border: closing must not eat it
    kernel = np.ones((size, size), np.uint8)
    expected = np.stack([cv2.morphologyEx(m.astype(np.uint8), cv_op, kernel) for m in masks])
    out = morphology(masks, op, size)
    assert out.dtype == bool
    np.testing.assert_array_equal(out, expected.astype(bool))
    assert not out[1].any()  # nothing leaks across frames


def test_morphology_small_size_and_errors():
    masks = np.random.default_rng(11).random((2, 5, 5)) > 0.5
    copy = morphology(masks, "dilate", 1)
    np.testing.assert_array_equal(copy, masks)
    assert copy is not masks
    with pytest.raises(UserError, match="open, close, dilate, erode"):
        morphology(masks, "thin", 3)


def test_grey_morphology_matches_opencv_on_float_maps():
    import cv2

    from vggt4d.postprocess import morphology

    rng = np.random.default_rng(3)
    maps = rng.random((2, 20, 24)).astype(np.float32)
    kernel = np.ones((3, 3), np.uint8)
    for op, cv_op in (("open", cv2.MORPH_OPEN), ("close", cv2.MORPH_CLOSE)):
        got = morphology(maps, op, 3)
        assert got.dtype == np.float32
        for t in range(2):
            expected = cv2.morphologyEx(maps[t], cv_op, kernel)
            np.testing.assert_allclose(got[t], expected, atol=1e-6)


def test_mean_above_thresholds_each_frame_at_the_mean_of_its_strong_values():
    from vggt4d.postprocess import binarize

    maps = np.zeros((2, 4, 4), np.float32)
    maps[0, 0, :3] = [0.2, 0.5, 1.0]  # values above 0.1: mean 0.567 -> only 1.0 is kept
    masks, info = binarize(maps, "mean_above", threshold=0.1)
    assert masks[0].sum() == 1 and masks[0, 0, 2]
    assert not masks[1].any() and info["thresholds"][1] is None
    assert info["thresholds"][0] == pytest.approx(1.7 / 3)


def _bilinear_reference(maps: np.ndarray, scale: int) -> np.ndarray:
    """Bilinear upsampling written out (align_corners=False: source x = (X + 0.5)/scale − 0.5,
    clamped to the grid), float64."""
    _, rows, cols = maps.shape
    ys = np.clip((np.arange(rows * scale) + 0.5) / scale - 0.5, 0, rows - 1)
    xs = np.clip((np.arange(cols * scale) + 0.5) / scale - 0.5, 0, cols - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, rows - 1), np.minimum(x0 + 1, cols - 1)
    wy, wx = (ys - y0)[None, :, None], (xs - x0)[None, None, :]
    top = maps[:, y0][:, :, x0] * (1 - wx) + maps[:, y0][:, :, x1] * wx
    bottom = maps[:, y1][:, :, x0] * (1 - wx) + maps[:, y1][:, :, x1] * wx
    return top * (1 - wy) + bottom * wy


def _vggt4d_chain_reference(dyn: np.ndarray, features: np.ndarray) -> np.ndarray:
    """VGGT4D's binarisation from its description: k-means (64 clusters, seed 42, scikit-learn
    defaults) over all patches' features, cluster means, every frame min–max rescaled with
    1e-6, bilinear ×14, one adaptive multi-Otsu threshold (n = 2, 3, 4; 256 bins; score =
    variance of the class means / √n; the top threshold of the best n); mask = map > t."""
    from skimage.filters import threshold_multiotsu
    from sklearn.cluster import KMeans

    labels = KMeans(n_clusters=64, random_state=42).fit_predict(
        features.reshape(-1, features.shape[-1]).astype(np.float32))
    flat = dyn.reshape(-1).astype(np.float64)
    means = np.array([flat[labels == c].mean() if (labels == c).any() else 0.0
                      for c in range(64)])
    smooth = means[labels].reshape(dyn.shape)
    low = smooth.min(axis=(1, 2), keepdims=True)
    high = smooth.max(axis=(1, 2), keepdims=True)
    soft = _bilinear_reference((smooth - low) / (high - low + 1e-6), 14)
    best, threshold = -np.inf, np.inf
    for n in (2, 3, 4):
        cuts = threshold_multiotsu(soft.ravel(), classes=n, nbins=256)
        classes = np.digitize(soft.ravel(), cuts, right=True)
        class_means = [soft.ravel()[classes == j].mean() for j in range(n)]
        score = np.var(class_means) / np.sqrt(n)
        if score > best:
            best, threshold = score, cuts[-1]
    return soft > threshold


def test_vggt4d_kmeans_rescale_multi_otsu_chain_matches_its_description():
    from vggt4d.config.masks import MasksConfig
    from vggt4d.masks import soft_masks

    rng = np.random.default_rng(5)
    frames, rows, cols = 4, 6, 7
    features = rng.normal(size=(frames, rows, cols, 16))
    dyn = rng.random((frames, rows, cols))
    dyn[2] *= 0.3  # a frame with a lower maximum: the per-frame rescale decides its masks
    settings = MasksConfig(kmeans=True)
    soft = soft_masks(dyn.astype(np.float32), np.zeros((frames, rows * 14, cols * 14, 3),
                                                       np.uint8), None, settings,
                      features.astype(np.float32))
    binary, _ = binarize(soft, "multi_otsu")
    expected = _vggt4d_chain_reference(dyn, features)
    assert (binary == expected).mean() > 0.999
    assert binary[2].any()  # rescaled: the weak frame still gets its own mask
    unscaled = soft_masks(dyn.astype(np.float32), np.zeros((frames, rows * 14, cols * 14, 3),
                                                           np.uint8), None,
                          MasksConfig(kmeans=True, kmeans_rescale=False),
                          features.astype(np.float32))
    assert not np.array_equal(binarize(unscaled, "multi_otsu")[0], binary)
