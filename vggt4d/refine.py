"""3-D refinement of coarse dynamic masks, as VGGT4D's official code computes it.

The coarse mask from the attention cues marks some static pixels as dynamic. Refinement checks
each group of coarse-dynamic pixels geometrically: a *static* 3-D point, seen from another frame,
lands on a surface at the same depth and with the same colour; a *moving* point lands on whatever
is there now, at another depth and colour.

Source: ``RefineDynMask`` in VGGT4D's official repository (``vggt4d/masks/refine_dyn_mask.py``)
and the order of its demo: coarse masks → second pass with the coarse masks → refinement with the
first pass's depth and intrinsics and the *second* pass's cameras (only the poses come from the
second pass; :func:`refine_masks` therefore takes depth, intrinsics and extrinsics as separate
arguments). With the default :class:`RefineConfig`, :func:`refine_masks` follows it rule by rule,
**each frame t on its own**:

1. Back-project every pixel ``(u, v)`` through ``(u + 0.5, v + 0.5)`` with its depth, ``K_t`` and
   frame ``t``'s camera (:func:`vggt4d.cameras.backproject`; float32 points, as the official
   code's torch tensors).
2. Statistical outlier removal over the frame's *whole* point cloud, Open3D's
   ``remove_statistical_outlier(nb_neighbors=20, std_ratio=2.5)`` (:func:`statistical_inliers`).
3. k-means of the frame's coarse-dynamic inliers: scikit-learn ``KMeans(n_clusters=30,
   random_state=42)``, otherwise defaults (scikit-learn ≥ 1.4: ``n_init="auto"``, i.e. one
   k-means++ run, passed here as ``n_init=1``), fitted on the float32 points.
4. Each cluster is projected into every other frame ``s`` (:func:`cluster_scores`). A projection
   at continuous image point ``(x, y)`` with camera depth ``z`` *counts* when it is inside
   (``0 < x < W``, ``0 < y < H``), ``z > 0``, visible (``z − 0.01 < d``, ``d`` frame ``s``'s depth
   sampled there) and lands on static ground (frame ``s``'s coarse mask sampled there ≤ 0.5).
   Sampling (:func:`sample_frames`) is torch ``grid_sample`` with ``align_corners=True`` at index
   ``(x, y)``: *nearest* for the depth, *bilinear* for the mask and the colour, zeros outside the
   image. Index ``x`` is pixel ``x``'s centre, whereas the back-projection puts pixel ``u``'s
   centre at ``u + 0.5``: the official sampling is half a pixel off its own back-projection
   (``sampling="official"`` reproduces this, ``"consistent"`` corrects it).
5. A cluster with fewer than 5 % of its ``(T − 1) · points`` projections counted stays dynamic (it
   cannot be checked; the fraction is computed as the official code does, in float32 with
   ``+ 1e-6`` in the denominator). Otherwise it stays dynamic when ``mean |z − d| + mean
   Σ_c |rgb_t,c − rgb_s,c| / 3 > 0.1`` over its counted projections (absolute depth difference in
   the depth's own units, nearest-sampled ``d``; colours in [0, 1], ``rgb_s`` bilinear).
6. The refined frame holds the coarse-dynamic inlier pixels of the dynamic clusters (outliers and
   static clusters leave the mask), then a 5×5 *elliptic* close (OpenCV's ``MORPH_ELLIPSE``
   element, :func:`elliptic_kernel`) and a 3×3 square dilation (:func:`close_and_dilate`).

Named alternatives (:class:`RefineConfig`): ``sampling="consistent"`` samples at ``(x − 0.5,
y − 0.5)`` with the border value repeated outside (pixel ``u``'s value at its centre ``u + 0.5``,
the back-projection's convention); ``score="residual"`` divides the depth difference by ``d``,
and with it (and ``"gradient"``) the visibility margin is relative (``z < d · (1 + margin)``), so
nothing depends on the depth's unit (VGGT's depth is normalised, DA3's is not);
``score="gradient"`` is the AnyDynamics research scripts' projection-gradient cue (below);
``window=k`` projects into frames ``t − k … t + k`` only; ``close_kernel="square"``;
``max_points`` clusters and scores a seeded subsample of a large frame's points (the other
points take their nearest centre).

``score="gradient"``: depth term ``gradient_weight · mean ‖∇_X ½ (z(X) − z_obs(X))²‖ / scale``,
``z_obs`` frame ``s``'s depth sampled *bilinearly* at the projection of ``X`` (centres at
``(u + 0.5, v + 0.5)``, clamped to the outermost centres), the gradient by torch autograd,
``scale`` the clip's median positive depth. Its value is ``|z − z_obs| · ‖r3_s − ∇_X z_obs‖ /
scale`` (``r3_s`` the optical axis), roughly ten times a relative depth error with the weight 10.

Where the official code has no rule: pixels whose depth is not positive and finite are left out
of the cloud and keep their coarse value; a frame with fewer coarse-dynamic inliers than
``clusters`` uses one cluster per point and a frame with none is left empty (scikit-learn refuses
both, so the official code stops there); a clip with fewer usable coarse-dynamic pixels than
``min_points``, or a single frame, is returned unchanged. The official code computes in float32,
here projections and scores are float64: decisions within ~1e-6 of a threshold may differ.

Hand-written, and why: Open3D (a large wheel with OpenGL system libraries, used nowhere else in
vggt4d) is not a dependency, so its outlier rule is written here over ``scipy.spatial.cKDTree``;
OpenCV is a test-only dependency, so its elliptic element is written here (the tests compare both
with the libraries' results or definitions).

Conventions (as in :mod:`vggt4d.cameras`): ``extrinsics`` are OpenCV world-to-camera ``[R | t]``,
``intrinsics`` pinhole ``K`` in pixels of the frames given, ``depth`` z-depth.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from vggt4d.cameras import backproject, check_cameras
from vggt4d.config.refine import CloseKernel, Method, RefineConfig, Sampling, Score
from vggt4d.errors import UserError
from vggt4d.reprojection import reprojection_refine
from vggt4d.stage import Stage

SCORES = tuple(Score)
SAMPLINGS = tuple(Sampling)
CLOSE_KERNELS = tuple(CloseKernel)

#: projections processed at once by :func:`cluster_scores` (bounds its memory)
SAMPLE_CHUNK = 2_000_000


# --------------------------------------------------------------------------------------------
# statistical outlier removal (Open3D's rule)
# --------------------------------------------------------------------------------------------


def statistical_inliers(points: np.ndarray, neighbours: int = 20, std_ratio: float = 2.5
                        ) -> np.ndarray:
    """Open3D's ``remove_statistical_outlier``: (N, 3) points → bool (N,), True for inliers.

    ``m_i`` = mean Euclidean distance from point ``i`` to its ``k = min(neighbours, N)`` nearest
    points of the cloud, *the point itself included* (distance 0; Open3D searches the cloud it
    filters). Over all N points, with the sums taken over the points with ``m_i > 0`` only but
    divided by N: ``mean = Σ m_i / N``, ``std = sqrt(Σ (m_i − mean)² / (N − 1))`` (Bessel's
    correction). Inlier: ``0 < m_i < mean + std_ratio · std`` (strict; a point whose k nearest
    all coincide with it is removed). N = 1: no inlier. Source: ``PointCloud::
    RemoveStatisticalOutliers`` in Open3D's ``cpp/open3d/geometry/PointCloud.cpp``.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    count = len(pts)
    if count < 2:
        return np.zeros(count, dtype=bool)
    k = min(int(neighbours), count)
    dist, _ = cKDTree(pts).query(pts, k=k, workers=-1)
    mean_dist = dist.reshape(count, k).mean(axis=1)
    positive = mean_dist > 0
    cloud_mean = mean_dist[positive].sum() / count
    std = math.sqrt(((mean_dist[positive] - cloud_mean) ** 2).sum() / (count - 1))
    return positive & (mean_dist < cloud_mean + std_ratio * std)


# --------------------------------------------------------------------------------------------
# sampling and scores
# --------------------------------------------------------------------------------------------


def sample_frames(images: np.ndarray, x: np.ndarray, y: np.ndarray, mode: str,
                  sampling: str = "official") -> np.ndarray:
    """Sample images (S, H, W, C) at continuous image points ``x``, ``y`` (S, P) → (S, P, C).

    torch ``grid_sample`` (``mode`` "nearest" — ties to even — or "bilinear", float64,
    ``align_corners=True``) at index ``(x, y)`` with zeros outside the image (``"official"``), or
    at ``(x − 0.5, y − 0.5)`` with the border repeated (``"consistent"``: pixel ``(u, v)``'s value
    sits at ``(u + 0.5, v + 0.5)``, as in :func:`vggt4d.cameras.backproject`). ``x``, ``y`` must be
    finite; H, W ≥ 2.
    """
    import torch
    import torch.nn.functional as F

    if sampling not in SAMPLINGS:
        raise UserError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}")
    _, height, width, _ = images.shape
    shift = 0.0 if sampling == "official" else 0.5
    grid = np.stack([2.0 * (x - shift) / (width - 1) - 1.0,
                     2.0 * (y - shift) / (height - 1) - 1.0], axis=-1)[:, None]
    source = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2),
                                                   dtype=np.float64))
    out = F.grid_sample(source, torch.from_numpy(grid), mode=mode, align_corners=True,
                        padding_mode="zeros" if sampling == "official" else "border")
    return out[:, :, 0].permute(0, 2, 1).numpy()


def _project(points: np.ndarray, k_mats: np.ndarray, w2c: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World points (P, 3) into S cameras → x, y, z (S, P): ``(x z, y z, z) = K (R X + t)``."""
    cam = np.einsum("sij,pj->spi", w2c[:, :, :3], points) + w2c[:, None, :, 3]
    hom = np.einsum("sij,spj->spi", k_mats, cam)
    z = hom[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        return hom[..., 0] / z, hom[..., 1] / z, z


def _gradient_norms(points: np.ndarray, depth_s: np.ndarray, k_mat: np.ndarray,
                    w2c: np.ndarray) -> np.ndarray:
    """‖∇_X ½ (z_proj(X) − z_obs(X))²‖ (M,) for world points (M, 3) seen by camera ``s``.

    ``z_obs`` is ``depth_s`` (H, W) sampled bilinearly at the projection, with pixel centres at
    ``(u + 0.5, v + 0.5)`` and coordinates clamped to the outermost centres; torch autograd.
    """
    import torch

    height, width = depth_s.shape
    x_world = torch.tensor(points, dtype=torch.float64, requires_grad=True)
    rot = torch.tensor(w2c[:, :3], dtype=torch.float64)
    trans = torch.tensor(w2c[:, 3], dtype=torch.float64)
    k_t = torch.tensor(k_mat, dtype=torch.float64)
    depth_t = torch.tensor(np.nan_to_num(depth_s, nan=0.0, posinf=0.0, neginf=0.0),
                           dtype=torch.float64)
    cam = x_world @ rot.T + trans
    z_proj = cam[:, 2]
    hom = cam @ k_t.T
    ix = (hom[:, 0] / z_proj - 0.5).clamp(0.0, width - 1.0)  # index space: centres at integers
    iy = (hom[:, 1] / z_proj - 0.5).clamp(0.0, height - 1.0)
    x0 = ix.detach().floor().clamp(max=max(width - 2, 0)).long()
    y0 = iy.detach().floor().clamp(max=max(height - 2, 0)).long()
    x1 = (x0 + 1).clamp(max=width - 1)
    y1 = (y0 + 1).clamp(max=height - 1)
    wx = ix - x0.to(torch.float64)
    wy = iy - y0.to(torch.float64)
    z_obs = ((1 - wy) * ((1 - wx) * depth_t[y0, x0] + wx * depth_t[y0, x1])
             + wy * ((1 - wx) * depth_t[y1, x0] + wx * depth_t[y1, x1]))
    loss = 0.5 * ((z_proj - z_obs) ** 2).sum()  # per-point terms are independent
    (grad,) = torch.autograd.grad(loss, x_world)
    return grad.norm(dim=1).numpy()


def _median_depth(depth: np.ndarray) -> float:
    usable = depth[np.isfinite(depth) & (depth > 0)].astype(np.float64)
    return float(np.median(usable)) if usable.size else 1.0


def cluster_scores(
    points: np.ndarray,
    labels: np.ndarray,
    colours: np.ndarray,
    source: int,
    depth: np.ndarray,
    images: np.ndarray,
    coarse: np.ndarray,
    intrinsics: np.ndarray,
    extrinsics: np.ndarray,
    settings: RefineConfig | None = None,
    num_clusters: int | None = None,
    depth_scale: float | None = None,
) -> list[dict]:
    """Decide, for each cluster of frame ``source``'s points, whether it stays dynamic.

    Inputs: ``points`` (N, 3) world points of frame ``source``, ``labels`` (N,) cluster ids in
    ``[0, C)``, ``colours`` (N, 3) their RGB in [0, 1]; ``depth`` (T, H, W), ``images``
    (T, H, W, 3) RGB uint8 (or float in [0, 1]), ``coarse`` (T, H, W) bool (True = dynamic),
    ``intrinsics`` (T, 3, 3) and ``extrinsics`` (T, 3, 4) world-to-camera. ``depth_scale``: the
    gradient score's ``scale`` (default: the median positive finite depth of ``depth``).

    Every point is projected into every frame ``s != source`` (``settings.window = k > 0``: only
    ``|s − source| <= k``): ``samples = points × frames``. A projection counts by the module's
    rule (inside, ``z > 0``, finite ``d``, ``z − margin < d`` for ``"absolute"`` or ``z < d ·
    (1 + margin)`` otherwise, sampled mask ≤ 0.5; sampling by ``settings.sampling``). Over the
    counted projections of a cluster (``mean`` = sum / counted):

    * ``depth_term``: ``mean |z − d|`` (``"absolute"``), ``mean |z − d| / d`` (``"residual"``)
      or ``gradient_weight · mean ‖∇_X ½ (z − z_obs)²‖ / scale`` (``"gradient"``);
    * ``photometric_term``: ``mean Σ_c |colour_c − rgb_s,c| / 3``;
    * ``score = depth_term + photometric_term``.

    ``dynamic`` = ``float32(counted) / float32(samples + 1e-6) < float32(min_valid)`` (then the
    terms and score are None: not checked), or no projection counted, or ``score > tau``.
    Returns one dict per cluster id ``0 … C − 1`` (``C = num_clusters`` or ``max(labels) + 1``)
    with plain Python values: ``frame``, ``cluster``, ``points``, ``samples``, ``counted``,
    ``counted_fraction`` (counted / samples, 0 without samples), ``depth_term``,
    ``photometric_term``, ``score``, ``dynamic``.
    """
    settings = settings or RefineConfig()
    settings.check()
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    cols = np.asarray(colours, dtype=np.float64).reshape(-1, 3)
    depth, images = np.asarray(depth), np.asarray(images)  # read a few views at a time
    coarse = np.asarray(coarse, dtype=bool)
    if not len(pts) == len(labels) == len(cols):
        raise UserError("points, labels and colours must have the same length")
    if depth.ndim != 3 or coarse.shape != depth.shape or images.shape != (*depth.shape, 3):
        raise UserError(f"depth (T, H, W), coarse (T, H, W) and images (T, H, W, 3) must agree, "
                        f"got {depth.shape}, {coarse.shape} and {images.shape}")
    k_mats, w2c = check_cameras(intrinsics, extrinsics, len(depth))
    t_count, height, width = depth.shape
    count = int(num_clusters) if num_clusters is not None else int(labels.max(initial=-1)) + 1
    targets = [s for s in range(t_count) if s != source
               and (settings.window == 0 or abs(s - source) <= settings.window)]
    if settings.score == "gradient" and depth_scale is None:
        depth_scale = _median_depth(depth)

    point_counts = np.bincount(labels, minlength=count)
    counted = np.zeros(count)
    depth_sum = np.zeros(count)
    photo_sum = np.zeros(count)
    chunk = max(1, SAMPLE_CHUNK // max(len(pts), 1))
    for start in range(0, len(targets) if len(pts) else 0, chunk):
        views = np.array(targets[start : start + chunk])
        x, y, z = _project(pts, k_mats[views], w2c[views])
        with np.errstate(invalid="ignore"):
            inside = (z > 0) & (x > 0) & (x < width) & (y > 0) & (y < height)
        x, y = np.where(inside, x, 0.0), np.where(inside, y, 0.0)
        d = sample_frames(depth[views, :, :, None].astype(np.float64), x, y, "nearest",
                          settings.sampling)[..., 0]
        mask = sample_frames(coarse[views, :, :, None].astype(np.float64), x, y, "bilinear",
                             settings.sampling)[..., 0]
        rgb = sample_frames(_unit_images(images[views]), x, y, "bilinear", settings.sampling)
        margin = settings.visibility_margin
        with np.errstate(invalid="ignore"):
            visible = z - margin < d if settings.score == "absolute" else z < d * (1.0 + margin)
        ok = inside & np.isfinite(d) & visible & (mask <= 0.5)
        view, index = np.nonzero(ok)
        lab = labels[index]
        counted += np.bincount(lab, minlength=count)
        photo_sum += np.bincount(lab, weights=np.abs(cols[index] - rgb[ok]).sum(axis=1),
                                 minlength=count)
        if settings.score == "gradient":
            term = np.empty(index.size)
            for i, s in enumerate(views):
                here = view == i
                term[here] = _gradient_norms(pts[index[here]], depth[s].astype(np.float64),
                                             k_mats[s], w2c[s])
            term *= settings.gradient_weight / depth_scale
        else:
            term = np.abs(z[ok] - d[ok])
            if settings.score == "residual":
                term /= d[ok]
        depth_sum += np.bincount(lab, weights=term, minlength=count)

    results = []
    for c in range(count):
        samples = int(point_counts[c]) * len(targets)
        unchecked = (np.float32(counted[c]) / np.float32(samples + 1e-6)
                     < np.float32(settings.min_valid)) or counted[c] == 0
        entry = {
            "frame": int(source), "cluster": c, "points": int(point_counts[c]),
            "samples": samples, "counted": int(counted[c]),
            "counted_fraction": float(counted[c] / samples) if samples else 0.0,
            "depth_term": None, "photometric_term": None, "score": None, "dynamic": True,
        }
        if not unchecked:
            entry["depth_term"] = float(depth_sum[c] / counted[c])
            entry["photometric_term"] = float(photo_sum[c] / counted[c] / 3.0)
            entry["score"] = entry["depth_term"] + entry["photometric_term"]
            entry["dynamic"] = bool(entry["score"] > settings.tau)
        results.append(entry)
    return results


# --------------------------------------------------------------------------------------------
# morphology
# --------------------------------------------------------------------------------------------


def elliptic_kernel(size: int) -> np.ndarray:
    """OpenCV's ``getStructuringElement(MORPH_ELLIPSE, (size, size))`` as a (size, size) bool.

    With ``r = c = size // 2``: row ``i`` (``dy = i − r``) is set on columns ``[max(c − dx, 0),
    min(c + dx + 1, size))`` with ``dx = round(c · sqrt((r² − dy²) / r²))`` (ties to even, as
    OpenCV's ``saturate_cast``; ``dx = 0`` when ``r = 0``). 5×5: a plus-shaped disc, the corners
    and the outer rows' off-centre cells empty.
    """
    size = int(size)
    r = c = size // 2
    dy = np.arange(size) - r
    dx = np.rint(c * np.sqrt((r * r - dy * dy) / (r * r))) if r else np.zeros(size)
    cols = np.arange(size)
    return (cols[None] >= c - dx[:, None]) & (cols[None] < c + dx[:, None] + 1)


def close_and_dilate(masks: np.ndarray, close: int = 5, dilate: int = 3,
                     close_kernel: str = "ellipse") -> np.ndarray:
    """Binary close with a ``close``×``close`` element, then a ``dilate``×``dilate`` square
    dilation, per frame: (T, H, W) bool → (T, H, W) bool.

    As OpenCV's ``morphologyEx(MORPH_CLOSE)`` / ``dilate`` with the default anchor (the element's
    cell ``(size // 2, size // 2)``; ``out(p) = max / min over the element's cells e of
    in(p + e − anchor)``) and default border (the outside never changes the result); erosion and
    dilation by ``scipy.ndimage.minimum_filter`` / ``maximum_filter``. Sizes ≤ 1 skip the step.
    """
    if close_kernel not in CLOSE_KERNELS:
        raise UserError(f"unknown close kernel {close_kernel!r}; choose one of "
                        f"{', '.join(CLOSE_KERNELS)}")
    out = np.asarray(masks, dtype=bool)

    def grow(x: np.ndarray, element: np.ndarray) -> np.ndarray:
        return ndimage.maximum_filter(x, footprint=element[None], mode="constant", cval=False)

    def shrink(x: np.ndarray, element: np.ndarray) -> np.ndarray:
        return ndimage.minimum_filter(x, footprint=element[None], mode="constant", cval=True)

    if close > 1:
        element = (elliptic_kernel(close) if close_kernel == "ellipse"
                   else np.ones((close, close), dtype=bool))
        out = shrink(grow(out, element), element)
    if dilate > 1:
        out = grow(out, np.ones((dilate, dilate), dtype=bool))
    return out.copy() if out is masks else out


# --------------------------------------------------------------------------------------------
# the whole refinement
# --------------------------------------------------------------------------------------------


def _cluster_labels(points: np.ndarray, settings: RefineConfig, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """k-means of one frame's points (N, 3) float32 → labels (N,), the indices the model was
    fitted on (all, or a ``max_points`` subsample) and the number of clusters."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    count = len(points)
    if 0 < settings.max_points < count:
        fit = np.sort(rng.choice(count, size=settings.max_points, replace=False))
    else:
        fit = np.arange(count)
    clusters = int(min(settings.clusters, fit.size))
    model = KMeans(n_clusters=clusters, random_state=settings.seed, n_init=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct points than k
        model.fit(points[fit])
    labels = model.predict(points) if fit.size < count else np.empty(count, dtype=np.int64)
    labels[fit] = model.labels_
    return labels, fit, clusters


def _unit_images(frames: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 → float64 in [0, 1]; float frames are taken as already in [0, 1]."""
    frames = np.asarray(frames)
    return frames / 255.0 if frames.dtype == np.uint8 else frames.astype(np.float64)


def refine_masks(
    coarse: np.ndarray,
    depth: np.ndarray,
    frames: np.ndarray,
    intrinsics: np.ndarray,
    extrinsics: np.ndarray,
    settings: RefineConfig | None = None,
) -> tuple[np.ndarray, dict]:
    """VGGT4D's 3-D refinement of coarse dynamic masks (module docstring for the rules).

    ``coarse`` (T, H, W) bool; ``depth`` (T, H, W) z-depth and ``intrinsics`` (T, 3, 3) of the
    first DA3 pass; ``extrinsics`` (T, 3, 4) world-to-camera — VGGT4D takes them from the second
    pass; ``frames`` (T, H, W, 3) uint8 RGB (or float in [0, 1]); all at the same resolution,
    H, W ≥ 2. Returns the refined (T, H, W) bool masks and a JSON-serialisable report:
    ``settings``, ``skipped`` (None, or the sentence saying why the coarse masks were returned
    unchanged), ``points`` (usable coarse-dynamic pixels), ``unusable_depth`` (coarse pixels kept
    because their depth is not positive and finite), ``outliers_removed`` (coarse pixels that are
    statistical outliers), ``frames`` (per frame: ``frame``, ``points`` in the cloud,
    ``outliers`` (None for a frame without coarse pixels: not computed), ``clustered``
    coarse-dynamic inliers, ``fitted`` (the k-means sample), ``clusters``), ``clusters`` (the
    dicts of :func:`cluster_scores`, all frames), ``clusters_kept``, ``clusters_removed``,
    ``pixels_removed`` (coarse pixels left out before the morphology), ``pixels_coarse``,
    ``pixels_refined``.
    """
    settings = settings or RefineConfig()
    settings.check()
    coarse = np.asarray(coarse)
    if coarse.ndim != 3:
        raise UserError(f"coarse masks must have shape (T, H, W), got {coarse.shape}")
    coarse = coarse.astype(bool, copy=False)
    # depth and frames stay as given (a memory map, uint8): read a frame or a few at a time
    depth, frames = np.asarray(depth), np.asarray(frames)
    if depth.shape != coarse.shape or frames.shape != (*coarse.shape, 3):
        raise UserError(f"coarse {coarse.shape}, depth {depth.shape} and frames {frames.shape} "
                        "must be (T, H, W), (T, H, W) and (T, H, W, 3) of the same size")
    if min(coarse.shape[1:]) < 2:
        raise UserError(f"frames of {coarse.shape[2]}x{coarse.shape[1]} pixels are too small "
                        "to refine: width and height must be >= 2")
    k_mats, w2c = check_cameras(intrinsics, extrinsics, len(coarse))
    t_count = len(coarse)

    usable = np.isfinite(depth) & (depth > 0)
    n_points = int((coarse & usable).sum())
    report: dict = {
        "settings": asdict(settings), "skipped": None, "points": n_points,
        "unusable_depth": int((coarse & ~usable).sum()), "outliers_removed": 0, "frames": [],
        "clusters": [], "clusters_kept": 0, "clusters_removed": 0, "pixels_removed": 0,
        "pixels_coarse": int(coarse.sum()), "pixels_refined": int(coarse.sum()),
    }
    if n_points < settings.min_points:
        report["skipped"] = (f"refinement skipped: only {n_points} coarse-dynamic pixels with "
                             f"valid depth (min_points = {settings.min_points}); "
                             "the coarse mask is used unchanged")
        return coarse.copy(), report
    if t_count < 2:
        report["skipped"] = ("refinement skipped: a single frame has no other view to check "
                             "the points in; the coarse mask is used unchanged")
        return coarse.copy(), report

    depth_scale = _median_depth(depth) if settings.score == "gradient" else None
    rng = np.random.default_rng(settings.seed)
    raw = coarse & ~usable
    for t in range(t_count):
        rows, cols = np.nonzero(usable[t])
        summary = {"frame": t, "points": int(rows.size), "outliers": None, "clustered": 0,
                   "fitted": 0, "clusters": 0}
        report["frames"].append(summary)
        in_coarse = coarse[t, rows, cols]
        if not in_coarse.any():  # nothing to refine: the outliers would change nothing
            continue
        world = backproject(depth[t : t + 1], k_mats[t : t + 1], w2c[t : t + 1])[0, rows, cols]
        inlier = statistical_inliers(world, settings.neighbours, settings.std_ratio)
        dyn = np.flatnonzero(inlier & in_coarse)
        summary["outliers"], summary["clustered"] = int((~inlier).sum()), int(dyn.size)
        report["outliers_removed"] += int((~inlier & in_coarse).sum())
        if dyn.size == 0:
            continue
        labels, fit, clusters = _cluster_labels(world[dyn], settings, rng)
        summary["fitted"], summary["clusters"] = int(fit.size), clusters
        scores = cluster_scores(
            world[dyn[fit]], labels[fit], _unit_images(frames[t])[rows[dyn[fit]], cols[dyn[fit]]],
            t, depth, frames, coarse, k_mats, w2c, settings, num_clusters=clusters,
            depth_scale=depth_scale,
        )
        report["clusters"].extend(scores)
        keep = dyn[np.array([entry["dynamic"] for entry in scores])[labels]]
        raw[t, rows[keep], cols[keep]] = True

    kept = sum(entry["dynamic"] for entry in report["clusters"])
    report["clusters_kept"] = int(kept)
    report["clusters_removed"] = len(report["clusters"]) - int(kept)
    report["pixels_removed"] = int((coarse & ~raw).sum())
    refined = close_and_dilate(raw, settings.close, settings.dilate, settings.close_kernel)
    report["pixels_refined"] = int(refined.sum())
    return refined, report


class RefineStage(Stage):
    """Coarse masks → 3-D refined masks: ``masks_refined/dynamic_{t:04d}.png`` (0/255) and the
    report ``refine.json``. As VGGT4D: the first pass's depth and intrinsics, and the cameras of
    the second pass when it ran (its only use of that pass), at processing size. With
    ``refine.method=reprojection`` (the "hooks" script): the first pass's depth and the second
    pass's intrinsics and cameras, :func:`vggt4d.reprojection.reprojection_refine`."""

    name = "refine"
    requires = ("masks", "prediction")
    optional = ("prediction_pass2",)
    provides = ("refined_masks",)

    def check(self, ctx) -> None:
        ctx.cfg.model.require_cameras("refine")

    def run(self, ctx) -> None:
        from vggt4d.io import write_json
        from vggt4d.masks import DynamicMasks, write_mask_png

        prediction, coarse = ctx.artifacts["prediction"], ctx.artifacts["masks"]
        cameras = ctx.artifacts.get("prediction_pass2", prediction)
        if ctx.cfg.refine.method == Method.reprojection:
            refined, report = reprojection_refine(coarse.binary, prediction.depth,
                                                  cameras.intrinsics, cameras.extrinsics,
                                                  ctx.cfg.refine.tau)
        else:
            refined, report = refine_masks(coarse.binary, prediction.depth, prediction.frames,
                                           prediction.intrinsics, cameras.extrinsics,
                                           ctx.cfg.refine)
        report["cameras"] = "pass2" if cameras is not prediction else "pass1"
        log = logging.getLogger(__name__)
        if report.get("skipped"):
            log.info("refine: skipped (%s); the coarse masks are kept", report["skipped"])
        elif "pixels_added" in report:
            log.info("refine: %d pixels added where the depth disagrees with t +- 1 (%s "
                     "cameras)", report["pixels_added"], report["cameras"])
        else:
            log.info("refine: %d of %d clusters stay dynamic, %d pixels removed (%s cameras)",
                     report["clusters_kept"], report["clusters_kept"]
                     + report["clusters_removed"], report["pixels_removed"], report["cameras"])
        for t, mask in enumerate(refined):
            write_mask_png(ctx.out_dir / "masks_refined" / f"dynamic_{t:04d}.png", mask)
        write_json(ctx.out_dir / "refine.json", report)
        ctx.artifacts["refined_masks"] = DynamicMasks(coarse.soft, refined, {"refine": report})
