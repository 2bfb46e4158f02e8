"""Soft dynamic maps at patch resolution → binary dynamic masks at frame resolution.

Pure, vectorised functions; every map stack is ``(T, H, W)`` (frames first) and no function
mixes frames unless its name says so (:func:`temporal_gaussian`, :func:`kmeans_smooth`, and the
whole-sequence :func:`adaptive_multi_otsu`).

Where the steps come from (docs/method.md):

- VGGT4D (arXiv 2511.19971): k-means (64 clusters) over the patch features of all frames, each
  patch takes its cluster's mean Dyn (:func:`kmeans_smooth`); bilinear upsampling
  (:func:`upsample_bilinear`); one adaptive multi-Otsu threshold per sequence
  (:func:`adaptive_multi_otsu`); the refinement's elliptic close and dilation live in
  :mod:`vggt4d.refine`.
- The AnyDynamics research scripts: guided filter with a grey guide (box 0.02·W, eps 1e-4) or
  an "RGB-D" guide 0.7·grey + 0.3·depth (:func:`guided_filter`, :func:`guide_from_frames`),
  temporal Gaussian σ 1 over 9 taps (:func:`temporal_gaussian`), 3×3 spatial Gaussian σ 0.5
  (:func:`spatial_gaussian` with ``truncate=2``), per-frame Otsu (:func:`otsu_per_frame`), fixed
  threshold, hysteresis 0.3 / 0.6 8-connected (:func:`hysteresis`), open 3×3 / close 7×7.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from vggt4d.errors import UserError

log = logging.getLogger(__name__)

GUIDE_MODES = ("grey", "rgb", "rgbd", "grey_depth")
BINARIZE_METHODS = ("multi_otsu", "otsu", "threshold", "hysteresis", "mean_above")
MORPHOLOGY_OPS = ("open", "close", "dilate", "erode")
GUIDED_BORDERS = ("reflect", "count")

# ITU-R BT.601 luma weights, the ones cv2.cvtColor(..., COLOR_RGB2GRAY) uses
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _maps3(maps: np.ndarray, name: str = "maps") -> np.ndarray:
    array = np.asarray(maps)
    if array.ndim != 3:
        raise UserError(f"{name} must have shape (T, H, W), got {array.shape}")
    return array


# --------------------------------------------------------------------------------------------
# upsampling and filtering
# --------------------------------------------------------------------------------------------


def upsample_bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of patch maps to the frame size.

    ``maps`` (T, h, w) float → (T, H, W) float32 with ``size = (H, W)``.

    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``, no antialiasing:
    output pixel centre x maps to source coordinate ``(x + 0.5)·w/W − 0.5``, clamped to
    ``[0, w − 1]``, then linear interpolation of the two neighbours in each axis. VGGT4D
    upsamples its (k-means smoothed) Dyn map bilinearly before thresholding (docs/method.md).
    """
    array = _maps3(maps)
    if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
        raise UserError(f"upsample size must be two positive integers (H, W), got {size}")
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[:, None]
    out = F.interpolate(tensor, size=(int(size[0]), int(size[1])), mode="bilinear",
                        align_corners=False)
    return out[:, 0].numpy()


def _box_mean(x: np.ndarray, radius: int, border: str) -> np.ndarray:
    """Mean over a (2r+1)² window of ``x`` (H, W, K) float64, via cumulative sums.

    ``border="reflect"``: the image is extended symmetrically with the edge pixel repeated
    (``…cba|abc…``, OpenCV's BORDER_REFLECT, ``np.pad(mode="symmetric")``) and every window
    is divided by (2r+1)². ``border="count"``: outside pixels are absent and each window is
    divided by the number of pixels it really covers (He et al.'s reference MATLAB code).
    """
    size = 2 * radius + 1
    pad = ((radius, radius), (radius, radius), (0, 0))
    if border == "reflect":
        padded = np.pad(x, pad, mode="symmetric")
    else:
        padded = np.pad(x, pad, mode="constant")
    # window sums along H, then along W: S[i] = C[i + size] − C[i] with C the prefix sums
    csum = np.cumsum(padded, axis=0)
    csum = np.concatenate([np.zeros_like(csum[:1]), csum], axis=0)
    rows = csum[size:] - csum[:-size]
    csum = np.cumsum(rows, axis=1)
    csum = np.concatenate([np.zeros_like(csum[:, :1]), csum], axis=1)
    sums = csum[:, size:] - csum[:, :-size]
    if border == "reflect":
        return sums / float(size * size)
    height, width = x.shape[:2]

    def counts(n: int) -> np.ndarray:
        index = np.arange(n)
        return (np.minimum(index + radius, n - 1) - np.maximum(index - radius, 0) + 1)

    area = counts(height)[:, None] * counts(width)[None, :]
    return sums / area[:, :, None].astype(np.float64)


def _guided_frame(guide: np.ndarray, src: np.ndarray, radius: int, eps: float,
                  border: str) -> np.ndarray:
    """One frame of the guided filter: guide (H, W, C), src (H, W), both float64."""
    height, width, channels = guide.shape
    rows, cols = np.triu_indices(channels)  # Σ is symmetric: box only its upper triangle
    pairs = len(rows)
    stack = np.concatenate([
        guide, src[..., None], guide[..., rows] * guide[..., cols], guide * src[..., None],
    ], axis=-1)
    means = _box_mean(stack, radius, border)
    mean_i = means[..., :channels]
    mean_p = means[..., channels]
    corr_pairs = means[..., channels + 1: channels + 1 + pairs]
    corr_ip = means[..., channels + 1 + pairs:]
    cov_ip = corr_ip - mean_i * mean_p[..., None]
    cov_pairs = corr_pairs - mean_i[..., rows] * mean_i[..., cols]
    cov_ii = np.empty((height, width, channels, channels))
    cov_ii[..., rows, cols] = cov_pairs
    cov_ii[..., cols, rows] = cov_pairs
    if channels == 1:
        a = cov_ip / (cov_ii[..., 0] + eps)
    else:
        system = torch.from_numpy(cov_ii.reshape(-1, channels, channels))
        system = system + eps * torch.eye(channels, dtype=torch.float64)
        rhs = torch.from_numpy(np.ascontiguousarray(cov_ip.reshape(-1, channels, 1)))
        a = torch.linalg.solve(system, rhs).reshape(height, width, channels).numpy()
    b = mean_p - np.sum(a * mean_i, axis=-1)
    coef = _box_mean(np.concatenate([a, b[..., None]], axis=-1), radius, border)
    return np.sum(coef[..., :channels] * guide, axis=-1) + coef[..., channels]


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float, *,
                  border: str = "reflect") -> np.ndarray:
    """Guided filter (He, Sun & Tang, "Guided Image Filtering", ECCV 2010 / TPAMI 2013).

    ``guide`` (T, H, W, C) float in [0, 1], C = 1 (grey), 3 (RGB) or 4 (RGB + depth) — any
    C ≥ 1 works, a (T, H, W) guide is taken as C = 1; ``src`` (T, H, W) float;
    returns (T, H, W) float32. Each frame is filtered on its own.

    With window means ``mean(·)`` over the (2r+1)² box ω_k centred on pixel k:

    - grey: ``a_k = (mean(I·p) − μ_k p̄_k) / (σ_k² + eps)``, ``b_k = p̄_k − a_k μ_k``;
    - colour (the paper's colour extension): ``a_k = (Σ_k + eps·U)⁻¹ (mean(I·p) − μ_k p̄_k)``
      with Σ_k the C×C covariance of the guide in ω_k and U the identity (a batched
      ``torch.linalg.solve`` in float64), ``b_k = p̄_k − a_kᵀ μ_k``;
    - output ``q_i = mean(a)_iᵀ I_i + mean(b)_i``.

    ``eps`` is added to the variance as is (not squared), as in the paper and in
    ``cv2.ximgproc.guidedFilter``; the research scripts use eps 1e-4 (or 1e-3) and a box of
    0.02·W (0.01·W in the refined script); ``radius`` here is the half-width r.

    Box means are computed in float64 from cumulative sums. Borders: ``border="reflect"``
    (default) extends the images symmetrically with the edge pixel repeated and divides by
    (2r+1)², which is what ``cv2.ximgproc.guidedFilter`` does (its box filter uses
    BORDER_REFLECT) — the result matches OpenCV everywhere, borders included and for radii
    beyond the image size, up to OpenCV's float32 arithmetic (measured ≤ 6.3e-6 grey,
    ≤ 1.2e-7 RGB; OpenCV takes at most 3 guide channels). ``border="count"`` instead drops
    outside pixels and divides by the number of pixels in the clipped window, as in He et al.'s
    MATLAB code; it differs from OpenCV only within 2r pixels of the border (a and b are
    averaged a second time).
    """
    guide_array = np.asarray(guide)
    if guide_array.ndim == 3:
        guide_array = guide_array[..., None]
    src_array = _maps3(src, "guided filter src")
    if guide_array.ndim != 4 or guide_array.shape[:3] != src_array.shape:
        raise UserError(f"guide {np.shape(guide)} and src {src_array.shape} must be "
                        "(T, H, W, C) and (T, H, W) with the same T, H, W")
    if int(radius) != radius or radius < 0:
        raise UserError(f"guided filter radius must be an integer >= 0, got {radius}")
    if not eps > 0:
        raise UserError(f"guided filter eps must be > 0, got {eps}")
    if border not in GUIDED_BORDERS:
        raise UserError(f"guided filter border must be one of {', '.join(GUIDED_BORDERS)}, "
                        f"got {border!r}")
    out = np.empty(src_array.shape, dtype=np.float32)
    for t in range(src_array.shape[0]):  # one frame at a time keeps memory at O(H·W·C²)
        out[t] = _guided_frame(guide_array[t].astype(np.float64),
                               src_array[t].astype(np.float64), int(radius), float(eps),
                               border)
    return out


def _minmax(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-frame (x − min)/(max − min) over ``valid`` pixels; invalid pixels and flat frames → 0."""
    big = np.where(valid, x, np.inf).reshape(len(x), -1).min(axis=1)
    small = np.where(valid, x, -np.inf).reshape(len(x), -1).max(axis=1)
    lo = np.where(np.isfinite(big), big, 0.0)[:, None, None]
    span = np.where(np.isfinite(small), small, 0.0)[:, None, None] - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(span > 0, (x - lo) / np.where(span > 0, span, 1.0), 0.0)
    return np.where(valid, out, 0.0)


def guide_from_frames(frames: np.ndarray, depth: np.ndarray | None, mode: str,
                      depth_weight: float = 0.3) -> np.ndarray:
    """Guide image for :func:`guided_filter`.

    ``frames`` (T, H, W, 3) RGB uint8 (divided by 255; a float array is taken as already in
    [0, 1]); ``depth`` (T, H, W) float z-depth or None. Returns float32 in [0, 1]:

    - ``"grey"`` → (T, H, W, 1): luma Y = 0.299 R + 0.587 G + 0.114 B (BT.601, as
      ``cv2.COLOR_RGB2GRAY``; the research scripts' grey guide);
    - ``"rgb"`` → (T, H, W, 3);
    - ``"rgbd"`` → (T, H, W, 4): RGB and D̂;
    - ``"grey_depth"`` → (T, H, W, 1): ``(1 − depth_weight)·Y + depth_weight·D̂``, the
      research scripts' "RGB-D" guide 0.7·grey + 0.3·depth (refined / final_smooth / grabcut).

    D̂ is the per-frame min–max normalised *inverse* depth 1/z (near = 1, far = 0): inverse depth
    is what a monocular network resolves well, it is bounded where z is not (sky, far
    background), and it gives the near objects that usually move the strongest contrast.
    Pixels with non-finite or non-positive depth get D̂ = 0 (as far away); a frame with a
    single valid depth value gets D̂ = 0.
    """
    if mode not in GUIDE_MODES:
        raise UserError(f"unknown guide mode {mode!r}; choose one of {', '.join(GUIDE_MODES)}")
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise UserError(f"frames must have shape (T, H, W, 3), got {array.shape}")
    rgb = array / 255.0 if array.dtype == np.uint8 else array.astype(np.float64)
    grey = rgb @ np.asarray(LUMA_WEIGHTS)
    if mode == "grey":
        return grey[..., None].astype(np.float32)
    if mode == "rgb":
        return rgb.astype(np.float32)
    if depth is None:
        raise UserError(f"guide mode {mode!r} needs depth; use 'grey' or 'rgb' without it")
    depth_array = np.asarray(depth, dtype=np.float64)
    if depth_array.shape != array.shape[:3]:
        raise UserError(f"depth shape {depth_array.shape} does not match frames "
                        f"{array.shape[:3]}")
    valid = np.isfinite(depth_array) & (depth_array > 0)
    with np.errstate(divide="ignore"):
        inverse = np.where(valid, 1.0 / np.where(valid, depth_array, 1.0), 0.0)
    disparity = _minmax(inverse, valid)
    if mode == "rgbd":
        return np.concatenate([rgb, disparity[..., None]], axis=-1).astype(np.float32)
    if not 0.0 <= depth_weight <= 1.0:
        raise UserError(f"depth_weight must be in [0, 1], got {depth_weight}")
    mixed = (1.0 - depth_weight) * grey + depth_weight * disparity
    return mixed[..., None].astype(np.float32)


def temporal_gaussian(maps: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Gaussian smoothing over frames (axis 0), each pixel separately; (T, H, W) → float32.

    ``out[t] = Σ_k w_k · maps[clip(t + k)]`` with ``w_k ∝ exp(−k²/2σ²)`` for
    ``|k| ≤ int(truncate·σ + 0.5)``, normalised to sum 1 (``scipy.ndimage.gaussian_filter1d``,
    ``mode="nearest"``: the first / last frame is repeated beyond the ends). The robust /
    final_smooth scripts use σ 1 over 9 taps (truncate 4), v4 uses σ 1.5. ``sigma <= 0``
    returns a float32 copy.
    """
    array = _maps3(maps)
    if sigma <= 0:
        return np.array(array, dtype=np.float32, copy=True)
    out = ndimage.gaussian_filter1d(array.astype(np.float64), float(sigma), axis=0,
                                    mode="nearest", truncate=float(truncate))
    return out.astype(np.float32)


def spatial_gaussian(maps: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """2-D Gaussian blur of each frame; (T, H, W) → float32, no mixing across frames.

    ``scipy.ndimage.gaussian_filter`` with σ = (0, sigma, sigma), separable taps
    ``∝ exp(−k²/2σ²)`` for ``|k| ≤ int(truncate·σ + 0.5)``, border ``"reflect"`` (edge pixel
    repeated, OpenCV's BORDER_REFLECT; ``cv2.GaussianBlur`` defaults to BORDER_REFLECT_101).
    The any4dgs v4 script blurs 3×3 with σ 0.5, which is ``truncate=2``. ``sigma <= 0`` returns a
    float32 copy.
    """
    array = _maps3(maps)
    if sigma <= 0:
        return np.array(array, dtype=np.float32, copy=True)
    out = ndimage.gaussian_filter(array.astype(np.float64), (0.0, float(sigma), float(sigma)),
                                  mode="reflect", truncate=float(truncate))
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------------------------


def adaptive_multi_otsu_details(values: np.ndarray, classes: tuple[int, ...] = (2, 3, 4),
                                bins: int = 256) -> dict:
    """:func:`adaptive_multi_otsu` with its working: threshold, chosen n and every score.

    Returns ``{"threshold": float (+inf when nothing works), "classes": n or None,
    "thresholds": list of the chosen n's thresholds, "scores": {n: score}}`` (only the n that
    could be scored appear in ``scores``).
    """
    return multi_otsu_over_blocks(lambda: [values], classes, bins)


def _finite_values(block: np.ndarray) -> np.ndarray:
    flat = np.asarray(block, dtype=np.float64).ravel()
    return flat[np.isfinite(flat)]


def multi_otsu_over_blocks(blocks: Callable[[], Iterable[np.ndarray]],
                           classes: tuple[int, ...] = (2, 3, 4), bins: int = 256) -> dict:
    """:func:`adaptive_multi_otsu_details` of the values of every block ``blocks()`` yields
    (any shapes; called three times, so a long clip's maps are read a block at a time).

    Pass 1 finds the range, pass 2 the ``bins``-bin histogram over it — the counts and bin
    centres ``skimage.exposure.histogram`` gives the values as one array (``np.histogram`` bins
    each value on its own) — which ``threshold_multiotsu(hist=…)`` splits for each n; pass 3
    sums every class's count and values for the scores. With one block this is exactly the
    one-array computation; over several, the class sums (float64) differ only by rounding.
    """
    if not classes or any(int(n) != n or n < 2 for n in classes):
        raise UserError(f"multi-Otsu classes must be integers >= 2, got {classes}")
    if int(bins) != bins or bins < 2:
        raise UserError(f"multi-Otsu bins must be an integer >= 2, got {bins}")
    from skimage.filters import threshold_multiotsu

    best: dict = {"threshold": math.inf, "classes": None, "thresholds": [], "scores": {}}
    low, high, size = math.inf, -math.inf, 0
    for block in blocks():
        flat = _finite_values(block)
        if flat.size:
            low, high, size = min(low, flat.min()), max(high, flat.max()), size + flat.size
    if size == 0 or low == high:
        return best
    counts = np.zeros(int(bins), dtype=np.int64)
    for block in blocks():
        counts += np.histogram(_finite_values(block), bins=int(bins), range=(low, high))[0]
    edges = np.histogram_bin_edges(np.array([low, high]), bins=int(bins), range=(low, high))
    histogram = (counts / np.sum(counts), (edges[:-1] + edges[1:]) / 2.0)
    splits = {}
    for n in classes:
        try:
            splits[int(n)] = threshold_multiotsu(classes=int(n), hist=histogram)
        except ValueError:  # fewer distinct (binned) values than classes
            continue
    # class j holds t_{j-1} < v <= t_j, consistent with "dynamic = value > threshold"
    members = {n: np.zeros(n, dtype=np.int64) for n in splits}
    sums = {n: np.zeros(n) for n in splits}
    for block in blocks():
        flat = _finite_values(block)
        for n, thresholds in splits.items():
            labels = np.digitize(flat, thresholds, right=True)
            members[n] += np.bincount(labels, minlength=n)
            sums[n] += np.bincount(labels, weights=flat, minlength=n)
    best_score = -math.inf
    for n, thresholds in splits.items():
        if np.any(members[n] == 0):
            continue
        score = float(np.var(sums[n] / members[n]) / math.sqrt(n))
        best["scores"][n] = score
        if score > best_score:
            best_score = score
            best.update(threshold=float(thresholds[-1]), classes=n,
                        thresholds=[float(t) for t in thresholds])
    return best


def adaptive_multi_otsu(values: np.ndarray, classes: tuple[int, ...] = (2, 3, 4),
                        bins: int = 256) -> float:
    """VGGT4D's adaptive multi-Otsu threshold of a whole sequence (docs/method.md).

    ``values`` any shape (flattened; non-finite values dropped). For each n in ``classes``:
    thresholds t_1 < … < t_{n−1} = ``skimage.filters.threshold_multiotsu(values, classes=n,
    nbins=bins)``; class j = {v : t_j < v ≤ t_{j+1}}; ``score_n = Var(class means) / √n``
    (population variance of the n unweighted class means). Returns the highest threshold
    t_{n−1} of the n with the highest score; dynamic = value > threshold.

    An n that cannot be computed (fewer distinct binned values than n, or an empty class) is
    skipped; if none works — e.g. constant input — the result is ``+inf``: nothing is dynamic.

    The thresholds are skimage's histogram bin centres, used as returned: values in the upper
    half of the threshold's bin (at most (max − min)/(2·bins) above it) count as the upper
    class, as with skimage's own ``np.digitize(values, thresholds)``. Where an empty gap
    separates two classes, skimage takes the first bin of the gap, just above the lower class.
    """
    return float(adaptive_multi_otsu_details(values, classes, bins)["threshold"])


def otsu_per_frame(maps: np.ndarray) -> np.ndarray:
    """Otsu's threshold of each frame (Otsu 1979; the AnyDynamics hooks script).

    ``maps`` (T, H, W) → (T,) float64: ``skimage.filters.threshold_otsu`` (256 bins) of each
    frame's finite values; a constant (or all non-finite) frame gets +inf (nothing dynamic).
    The threshold is a bin centre, as in :func:`adaptive_multi_otsu`.
    """
    from skimage.filters import threshold_otsu

    array = _maps3(maps)
    out = np.full(array.shape[0], np.inf)
    for t, frame in enumerate(array):
        flat = frame[np.isfinite(frame)].astype(np.float64)
        if flat.size and flat.min() < flat.max():
            out[t] = float(threshold_otsu(flat))
    return out


def _frame_structure(connectivity: int) -> np.ndarray:
    """3-D structuring element joining pixels within a frame only (nothing along axis 0)."""
    if connectivity not in (1, 2):
        raise UserError(f"connectivity must be 1 (4-neighbour) or 2 (8-neighbour), "
                        f"got {connectivity}")
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, connectivity)
    return structure


def hysteresis(maps: np.ndarray, low: float, high: float, connectivity: int = 2) -> np.ndarray:
    """Hysteresis thresholding of each frame; (T, H, W) → (T, H, W) bool.

    A pixel is kept when ``value > low`` and it is connected, through pixels with
    ``value > low`` in the same frame, to a pixel with ``value > high`` (the semantics of
    ``skimage.filters.apply_hysteresis_threshold``). ``connectivity`` 1 = 4-neighbour,
    2 = 8-neighbour (the final_smooth script: 0.3 / 0.6, 8-connected). One
    ``scipy.ndimage.label`` call over the stack whose structure has no links between frames.
    """
    array = _maps3(maps)
    if low > high:
        raise UserError(f"hysteresis low ({low}) must not exceed high ({high})")
    structure = _frame_structure(connectivity)
    mask_low = array > low
    labels, count = ndimage.label(mask_low, structure=structure)
    seeded = np.zeros(count + 1, dtype=bool)
    seeded[labels[mask_low & (array > high)]] = True
    seeded[0] = False
    return seeded[labels]


def binarize(maps: np.ndarray, method: str, *, threshold: float = 0.5, low: float = 0.3,
             high: float = 0.6, classes: tuple[int, ...] = (2, 3, 4),
             multi_otsu: dict | None = None) -> tuple[np.ndarray, dict]:
    """Soft maps (T, H, W) → (T, H, W) bool masks and a JSON-serialisable description.

    - ``"multi_otsu"``: one :func:`adaptive_multi_otsu` threshold t for the whole sequence,
      mask = maps > t (VGGT4D). Info: threshold, chosen classes, per-n scores. When ``maps``
      is a part of the sequence, ``multi_otsu`` gives the sequence's details instead
      (:func:`binarize_in_blocks`).
    - ``"otsu"``: per-frame :func:`otsu_per_frame` thresholds t_f, mask_f = maps_f > t_f.
    - ``"threshold"``: maps > ``threshold`` (the robust script: 0.4).
    - ``"hysteresis"``: :func:`hysteresis` with ``low`` / ``high``, 8-connected.
    - ``"mean_above"``: per frame, t_f = mean of the values above ``threshold``; mask_f =
      maps_f > t_f (the any4dgs v4 script: 0.1); a frame with no such value is empty.

    A threshold of +inf (constant input: nothing is dynamic) is written as ``None`` in the
    info dict so it stays strict JSON.
    """
    if method not in BINARIZE_METHODS:
        raise UserError(f"unknown binarize method {method!r}; choose one of "
                        f"{', '.join(BINARIZE_METHODS)}")
    array = _maps3(maps)

    def finite(value: float) -> float | None:
        return float(value) if math.isfinite(value) else None

    if method == "multi_otsu":
        details = multi_otsu or adaptive_multi_otsu_details(array, classes)
        masks = array > details["threshold"]
        info = {"method": method, "threshold": finite(details["threshold"]),
                "classes": details["classes"],
                "thresholds": [float(t) for t in details["thresholds"]],
                "scores": {str(n): float(s) for n, s in details["scores"].items()}}
    elif method == "otsu":
        per_frame = otsu_per_frame(array)
        masks = array > per_frame[:, None, None]
        info = {"method": method, "thresholds": [finite(t) for t in per_frame]}
    elif method == "threshold":
        masks = array > threshold
        info = {"method": method, "threshold": float(threshold)}
    elif method == "mean_above":
        above = array > threshold
        counts = above.reshape(len(array), -1).sum(axis=1)
        sums = np.where(above, array, 0).reshape(len(array), -1).sum(axis=1)
        per_frame = np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)
        masks = array > per_frame[:, None, None]
        info = {"method": method, "floor": float(threshold),
                "thresholds": [finite(t) for t in per_frame]}
    else:
        masks = hysteresis(array, low, high, connectivity=2)
        info = {"method": method, "low": float(low), "high": float(high), "connectivity": 2}
    return masks, info


def binarize_in_blocks(maps: np.ndarray, method: str, blocks: list[slice], out: np.ndarray,
                       **settings) -> dict:
    """:func:`binarize` of ``maps`` (T, H, W), read one block of frames at a time, into ``out``
    (T, H, W) bool; returns the description. ``blocks`` are slices covering frames 0…T−1 in
    order; ``settings`` are binarize's keywords. Every method but ``multi_otsu`` works frame by
    frame, so the masks and per-frame thresholds are those of one call on the whole array; the
    ``multi_otsu`` threshold comes from :func:`multi_otsu_over_blocks` over every block.
    """
    details = None
    if method == "multi_otsu":
        details = multi_otsu_over_blocks(lambda: (maps[block] for block in blocks),
                                         settings.get("classes", (2, 3, 4)))
    info: dict = {}
    for block in blocks:
        out[block], part = binarize(np.asarray(maps[block]), method, multi_otsu=details,
                                    **settings)
        if info and method in ("otsu", "mean_above"):  # per-frame thresholds
            info["thresholds"] += part["thresholds"]
        else:
            info = part
    return info


# --------------------------------------------------------------------------------------------
# cluster smoothing and morphology
# --------------------------------------------------------------------------------------------


def kmeans_smooth(dyn: np.ndarray, features: np.ndarray, clusters: int = 64,
                  seed: int = 0) -> np.ndarray:
    """VGGT4D cluster smoothing of the patch-level dynamic map (docs/method.md).

    ``dyn`` (T, h, w), ``features`` (T, h, w, C) → (T, h, w) float32. k-means
    (``sklearn.cluster.KMeans``, k-means++, ``n_init=1``, ``random_state=seed``) on the
    features of all T·h·w patches at once (used as given, no normalisation); each patch takes
    its cluster's mean: ``out_p = Σ_{q ∈ c(p)} dyn_q / |c(p)|``. ``clusters`` larger than
    the number of patches is capped at that number (with a warning).
    """
    from sklearn.cluster import KMeans

    dyn_array = _maps3(dyn, "dyn")
    feats = np.asarray(features)
    if feats.ndim != 4 or feats.shape[:3] != dyn_array.shape:
        raise UserError(f"features {feats.shape} must be (T, h, w, C) matching dyn "
                        f"{dyn_array.shape}")
    if int(clusters) != clusters or clusters < 1:
        raise UserError(f"k-means clusters must be an integer >= 1, got {clusters}")
    points = feats.reshape(-1, feats.shape[-1]).astype(np.float32)
    values = dyn_array.reshape(-1).astype(np.float64)
    k = int(clusters)
    if k > len(points):
        log.warning("k-means: %d clusters for %d patches; using %d", k, len(points),
                    len(points))
        k = len(points)
    labels = KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(points)
    counts = np.bincount(labels, minlength=k)
    sums = np.bincount(labels, weights=values, minlength=k)
    means = sums / np.maximum(counts, 1)
    return means[labels].reshape(dyn_array.shape).astype(np.float32)


def rescale_frames(maps: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Each frame min–max rescaled, ``(x − min) / (max − min + eps)``; (T, h, w) → float32.

    VGGT4D's code applies it after k-means smoothing, before upsampling and the sequence-wide
    multi-Otsu threshold: frames with different maxima are put on one scale first.
    """
    array = _maps3(maps).astype(np.float64)
    low = array.min(axis=(1, 2), keepdims=True)
    high = array.max(axis=(1, 2), keepdims=True)
    return ((array - low) / (high - low + eps)).astype(np.float32)


def morphology(masks: np.ndarray, op: str, size: int) -> np.ndarray:
    """Binary (bool input) or grey-scale (float input) morphology of each frame with a
    size×size square; (T, H, W) → the input's kind (bool or float32).

    erode: ``out(x) = min over the window``, dilate: ``max``; open = dilate(erode),
    close = erode(dilate). Window offsets ``−⌊size/2⌋ … size − 1 − ⌊size/2⌋`` (OpenCV's default
    anchor, so even sizes match ``cv2.erode`` / ``cv2.dilate`` too) and, as in OpenCV, the
    outside of the frame never changes the result (erosion sees 1, dilation sees 0 there), so
    closing never eats a mask touching the border. ``scipy.ndimage.minimum_filter`` /
    ``maximum_filter`` with size (1, size, size): no effect across frames. VGGT4D closes 5×5 and
    dilates 3×3 after refinement; the research scripts open 3×3 / close 7×7. ``size <= 1``
    returns a copy.
    """
    if op not in MORPHOLOGY_OPS:
        raise UserError(f"unknown morphology op {op!r}; choose one of "
                        f"{', '.join(MORPHOLOGY_OPS)}")
    array = _maps3(masks, "masks")
    grey = array.dtype != bool
    array = array.astype(np.float32) if grey else array
    outside_min, outside_max = (np.inf, -np.inf) if grey else (True, False)
    if int(size) != size:
        raise UserError(f"morphology size must be an integer, got {size}")
    if size <= 1:
        return array.copy()
    window = (1, int(size), int(size))

    def erode(x: np.ndarray) -> np.ndarray:
        return ndimage.minimum_filter(x, size=window, mode="constant", cval=outside_min)

    def dilate(x: np.ndarray) -> np.ndarray:
        return ndimage.maximum_filter(x, size=window, mode="constant", cval=outside_max)

    if op == "erode":
        return erode(array)
    if op == "dilate":
        return dilate(array)
    if op == "open":
        return dilate(erode(array))
    return erode(dilate(array))
