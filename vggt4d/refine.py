"""3-D refinement of coarse dynamic masks (VGGT4D, DESIGN.md §3 "Refinement").

The coarse mask from the attention cues marks some static pixels as dynamic. Refinement checks
each group of coarse-dynamic pixels geometrically: a *static* 3-D point, seen from another frame,
lands on a surface at the same depth and with the same colour; a *moving* point lands on whatever
static background is there now, at a different depth and colour.

Steps of :func:`refine_masks` (pure numpy; torch only for ``score="gradient"``):

1. :func:`backproject` the coarse-dynamic pixels of every frame to world points, remembering
   each point's source frame, pixel and colour (a seeded random subsample of at most
   ``max_points`` of them is used for the statistics; the rest follow the subsample).
2. :func:`statistical_inliers` removes isolated points (``neighbours``, ``std_ratio``).
3. k-means (scikit-learn, ``random_state=seed``) splits the inliers into ``clusters`` clusters.
4. :func:`cluster_scores` projects every point into every other frame ``s`` (or ``|s − t| <=
   window``) and scores each cluster over its *valid* projection samples (rule below).
5. A cluster stays dynamic when ``score > tau`` or when fewer than ``min_valid`` of its samples
   are valid (it cannot be checked). The refined mask keeps the coarse pixels of the dynamic
   clusters only (outliers and pixels of static clusters are removed; pixels whose depth is not
   positive and finite cannot be back-projected and are kept), then each frame is closed
   ``close×close`` and dilated ``dilate×dilate`` (:func:`vggt4d.postprocess.morphology`).

Conventions (as in :mod:`vggt4d.synthetic` and DA3's outputs): ``extrinsics`` are OpenCV
world-to-camera ``[R | t]`` (``X_cam = R X + t``), ``intrinsics`` are pinhole ``K`` in pixels of
the frames given, ``depth`` is z-depth, and pixel ``(u, v)`` (column, row) is the ray through the
continuous image point ``(u + 0.5, v + 0.5)``.

Validity (visibility) rule of a projection sample of point ``X`` (from frame ``t``) into frame
``s`` at continuous image point ``(x, y)``, camera depth ``z`` and pixel ``(floor x, floor y)``:

* inside the image: ``0 <= x < W`` and ``0 <= y < H``; in front of the camera: ``z > 0``;
* the pixel is static in frame ``s``'s coarse mask and its depth ``d = depth_s`` is finite, > 0;
* not occluded: ``z <= d · (1 + occlusion_tolerance)`` (default 0.05). A point *behind* the
  observed surface is hidden by something (for a static point the residual would be
  meaningless), so it is not counted. A point *in front of* the observed surface, however far, is
  always counted: that is exactly what a moving point looks like (it floats in space that is
  empty in frame ``s``, in front of the background), so that residual stays observable.

Scores (over the valid samples of a cluster; ``mean`` = mean over those samples):

* ``"residual"``: ``mean |z − d| / d  +  mean (1/3) Σ_c |rgb_t,c − rgb_s,c| / 255`` with ``d``
  and ``rgb_s`` read at the landing pixel. VGGT4D's criterion is ``mean |Δdepth| + mean
  |Δrgb| / 3 > 0.1`` with depth in VGGT's normalised scene scale (mean depth ≈ 1) and colours in
  [0, 1]; dividing the depth difference by the observed depth makes the first term independent
  of DA3's arbitrary depth scale and equal to VGGT4D's at depth 1, and the second term is
  VGGT4D's ``|Δrgb| / 3`` (sum of the three channel differences in [0, 1], divided by 3).
* ``"gradient"`` (the user's "strict" script's projection-gradient cue):
  ``gradient_weight · mean ‖∇_X ½ (z_proj(X) − z_obs(X))²‖ / scale  +  photometric term``,
  ``z_proj`` the camera-``s`` depth of ``X``, ``z_obs`` the depth of frame ``s`` sampled
  *bilinearly* at the projection of ``X`` (so it depends on ``X`` too), the gradient taken by
  torch autograd. The norm scales with the depth unit, so it is divided by ``scale``, the median
  positive depth of the clip. Its value is ``|z_proj − z_obs| · ‖r3_s − ∇_X z_obs‖ / scale``
  (``r3_s`` the camera's optical axis), so with the weight 10 it is roughly ten times a relative
  depth error: noise of 1 % in the depths already gives static clusters ≈ 0.15, above the
  default ``tau`` (the user's script kept clusters whose mean weighted gradient was > 0.15);
  depth steps inside the bilinear footprint make it large. Prefer ``"residual"`` on real depths.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from scipy.spatial import cKDTree

from vggt4d.cameras import backproject, check_cameras, project
from vggt4d.errors import UserError
from vggt4d.postprocess import morphology
from vggt4d.stage import UncachedStage

SCORES = ("residual", "gradient")

#: relative depth margin of the occlusion test: a sample is hidden when z > d · (1 + this)
OCCLUSION_TOLERANCE = 0.05


@dataclass
class RefineSettings:
    """Settings of :func:`refine_masks`; the defaults are VGGT4D's (DESIGN.md §3)."""

    neighbours: int = 20  # statistical outlier removal: k nearest neighbours
    std_ratio: float = 2.5  # ... keep mean kNN distance <= mean + std_ratio · std
    clusters: int = 30  # k-means on the coarse-dynamic points (fewer if fewer points)
    window: int = 0  # 0 = project each point into all other frames; k = frames t−k..t+k
    tau: float = 0.1  # a cluster stays dynamic when score > tau
    min_valid: float = 0.05  # ... or when fewer than this fraction of its samples are valid
    score: str = "residual"  # "residual" | "gradient"
    gradient_weight: float = 10.0  # the user's script: grad ×10 + photometric ×1
    close: int = 5  # morphological close size after refinement
    dilate: int = 3  # morphological dilation size after refinement
    max_points: int = 200_000  # random subsample of dynamic points for speed (seeded)
    min_points: int = 50  # fewer coarse-dynamic points: skip refinement with a note
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`UserError` naming the first bad field, its value and the valid range."""
        positive = [
            ("neighbours", self.neighbours), ("clusters", self.clusters),
            ("max_points", self.max_points),
        ]
        for name, value in positive:
            if int(value) != value or value < 1:
                raise UserError(f"refine.{name} = {value} is invalid: must be an integer >= 1")
        for name, value in [("window", self.window), ("close", self.close),
                            ("dilate", self.dilate), ("min_points", self.min_points)]:
            if int(value) != value or value < 0:
                raise UserError(f"refine.{name} = {value} is invalid: must be an integer >= 0")
        if not self.std_ratio > 0:
            raise UserError(f"refine.std_ratio = {self.std_ratio} is invalid: must be > 0")
        if not 0.0 <= self.min_valid <= 1.0:
            raise UserError(f"refine.min_valid = {self.min_valid} is invalid: must be in [0, 1]")
        if not math.isfinite(self.tau):
            raise UserError(f"refine.tau = {self.tau} is invalid: must be a finite number")
        if not self.gradient_weight >= 0:
            raise UserError(
                f"refine.gradient_weight = {self.gradient_weight} is invalid: must be >= 0"
            )
        if self.score not in SCORES:
            raise UserError(f"refine.score = {self.score!r} is invalid: choose one of "
                            f"{', '.join(SCORES)}")


# --------------------------------------------------------------------------------------------
# statistical outlier removal
# --------------------------------------------------------------------------------------------


def _knn_mean_distance(tree: cKDTree, queries: np.ndarray, neighbours: int, self_query: bool
                       ) -> np.ndarray:
    """Mean Euclidean distance (M,) of each query to its ``neighbours`` nearest tree points.

    ``self_query``: the queries are the tree's own points, so the nearest hit (the point
    itself, distance 0) is skipped.
    """
    extra = 1 if self_query else 0
    k = neighbours + extra
    dist, _ = tree.query(queries, k=k)
    dist = dist.reshape(len(queries), k)
    return dist[:, extra:].mean(axis=1)


def _sor_threshold(points: np.ndarray, neighbours: int, std_ratio: float
                   ) -> tuple[cKDTree, int, np.ndarray, float]:
    tree = cKDTree(points)
    k = min(int(neighbours), len(points) - 1)
    mean_dist = _knn_mean_distance(tree, points, k, self_query=True)
    threshold = float(mean_dist.mean() + std_ratio * mean_dist.std())
    return tree, k, mean_dist, threshold


def statistical_inliers(points: np.ndarray, neighbours: int = 20, std_ratio: float = 2.5
                        ) -> np.ndarray:
    """Statistical outlier removal: (N, 3) points → bool (N,), True for inliers.

    For every point, ``m_i`` = mean Euclidean distance to its ``k = min(neighbours, N − 1)``
    nearest *other* points (``scipy.spatial.cKDTree``; a duplicate of the point counts as a
    neighbour at distance 0). A point is an inlier when ``m_i <= mean(m) + std_ratio · std(m)``
    (population std, ddof = 0, over all N points) — Open3D's ``remove_statistical_outlier`` rule.
    Fewer than 2 points: all inliers.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(pts) < 2:
        return np.ones(len(pts), dtype=bool)
    _, _, mean_dist, threshold = _sor_threshold(pts, neighbours, std_ratio)
    return mean_dist <= threshold


# --------------------------------------------------------------------------------------------
# cluster scores
# --------------------------------------------------------------------------------------------


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


def cluster_scores(
    points: np.ndarray,
    labels: np.ndarray,
    source_frames: np.ndarray,
    colours: np.ndarray,
    depth: np.ndarray,
    frames: np.ndarray,
    coarse: np.ndarray,
    intrinsics: np.ndarray,
    extrinsics: np.ndarray,
    *,
    score: str = "residual",
    window: int = 0,
    tau: float = 0.1,
    min_valid: float = 0.05,
    gradient_weight: float = 10.0,
    occlusion_tolerance: float = OCCLUSION_TOLERANCE,
    num_clusters: int | None = None,
) -> list[dict]:
    """Score each cluster of world points by projecting it into the other frames.

    Inputs: ``points`` (N, 3) world points, ``labels`` (N,) cluster ids in ``[0, C)``,
    ``source_frames`` (N,) the frame each point came from, ``colours`` (N, 3) its RGB (0–255);
    ``depth`` (T, H, W), ``frames`` (T, H, W, 3) uint8, ``coarse`` (T, H, W) bool (True =
    dynamic), ``intrinsics`` (T, 3, 3), ``extrinsics`` (T, 3, 4) world-to-camera.

    Every point from frame ``t`` is projected into every frame ``s != t`` (``window > 0``: only
    ``|s − t| <= window``); each projection is one *sample*, valid by the module's rule (inside,
    ``z > 0``, landing pixel static in ``coarse[s]`` with positive finite depth ``d``, ``z <= d ·
    (1 + occlusion_tolerance)``). Over the valid samples of a cluster:

    * ``depth_term``: ``mean |z − d| / d`` (``"residual"``) or ``gradient_weight · mean
      ‖∇_X ½ (z − z_obs)²‖ / scale`` (``"gradient"``, see the module docstring; ``scale`` = the
      median positive finite depth of the clip);
    * ``photometric_term``: ``mean (1/3) Σ_c |colour_c − frames[s, pixel, c]| / 255``;
    * ``score = depth_term + photometric_term`` (None when no sample is valid).

    Returns one dict per cluster id ``0 … C − 1`` (``C = num_clusters`` or ``max(labels) + 1``)
    with plain Python values: ``cluster``, ``points``, ``samples`` (projections tried),
    ``valid`` (valid samples), ``valid_fraction`` (valid / samples, 0 when no samples),
    ``depth_term``, ``photometric_term``, ``score`` and ``dynamic`` =
    ``valid_fraction < min_valid or valid == 0 or score > tau``.
    """
    if score not in SCORES:
        raise UserError(f"unknown refinement score {score!r}; choose one of {', '.join(SCORES)}")
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    source = np.asarray(source_frames, dtype=np.int64).reshape(-1)
    cols = np.asarray(colours, dtype=np.float64).reshape(-1, 3)
    depth = np.asarray(depth, dtype=np.float64)
    frames = np.asarray(frames)
    coarse = np.asarray(coarse, dtype=bool)
    if not (len(pts) == len(labels) == len(source) == len(cols)):
        raise UserError("points, labels, source_frames and colours must have the same length")
    if depth.ndim != 3 or coarse.shape != depth.shape or frames.shape != (*depth.shape, 3):
        raise UserError(f"depth (T, H, W), coarse (T, H, W) and frames (T, H, W, 3) must agree, "
                        f"got {depth.shape}, {coarse.shape} and {frames.shape}")
    k_mats, w2c = check_cameras(intrinsics, extrinsics, len(depth))
    count = int(num_clusters) if num_clusters is not None else int(labels.max(initial=-1)) + 1
    t_count, height, width = depth.shape
    finite = np.isfinite(depth) & (depth > 0)
    scale = float(np.median(depth[finite])) if finite.any() else 1.0

    samples = np.zeros(count)
    valid = np.zeros(count)
    depth_sum = np.zeros(count)
    photo_sum = np.zeros(count)
    for s in range(t_count):
        eligible = source != s
        if window > 0:
            eligible &= np.abs(source - s) <= window
        index = np.flatnonzero(eligible)
        if index.size == 0:
            continue
        samples += np.bincount(labels[index], minlength=count)
        pixel, z = project(pts[index], k_mats[s], w2c[s])
        with np.errstate(invalid="ignore"):
            ok = ((z > 0) & (pixel[:, 0] >= 0) & (pixel[:, 0] < width)
                  & (pixel[:, 1] >= 0) & (pixel[:, 1] < height))
        col = np.floor(np.where(ok, pixel[:, 0], 0)).astype(np.int64)
        row = np.floor(np.where(ok, pixel[:, 1], 0)).astype(np.int64)
        d = depth[s, row, col]
        ok &= finite[s, row, col] & ~coarse[s, row, col]
        with np.errstate(invalid="ignore"):
            ok &= z <= d * (1.0 + occlusion_tolerance)
        if not ok.any():
            continue
        keep = index[ok]
        lab = labels[keep]
        row, col, z, d = row[ok], col[ok], z[ok], d[ok]
        valid += np.bincount(lab, minlength=count)
        seen = frames[s, row, col].astype(np.float64)
        photo = np.abs(cols[keep] - seen).mean(axis=1) / 255.0
        photo_sum += np.bincount(lab, weights=photo, minlength=count)
        if score == "residual":
            term = np.abs(z - d) / d
        else:
            term = gradient_weight * _gradient_norms(pts[keep], depth[s], k_mats[s], w2c[s])
            term = term / scale
        depth_sum += np.bincount(lab, weights=term, minlength=count)

    point_counts = np.bincount(labels, minlength=count) if len(labels) else np.zeros(count)
    results = []
    for c in range(count):
        fraction = float(valid[c] / samples[c]) if samples[c] > 0 else 0.0
        if valid[c] > 0:
            depth_term = float(depth_sum[c] / valid[c])
            photo_term = float(photo_sum[c] / valid[c])
            total: float | None = depth_term + photo_term
        else:
            depth_term = photo_term = total = None
        dynamic = bool(fraction < min_valid or total is None or total > tau)
        results.append({
            "cluster": c,
            "points": int(point_counts[c]),
            "samples": int(samples[c]),
            "valid": int(valid[c]),
            "valid_fraction": fraction,
            "depth_term": depth_term,
            "photometric_term": photo_term,
            "score": total,
            "dynamic": dynamic,
        })
    return results


# --------------------------------------------------------------------------------------------
# the whole refinement
# --------------------------------------------------------------------------------------------


def _kmeans(points: np.ndarray, clusters: int, seed: int):
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    model = KMeans(n_clusters=clusters, n_init=1, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct points than k
        model.fit(points)
    return model


def refine_masks(
    coarse: np.ndarray,
    depth: np.ndarray,
    frames: np.ndarray,
    intrinsics: np.ndarray,
    extrinsics: np.ndarray,
    settings: RefineSettings | None = None,
) -> tuple[np.ndarray, dict]:
    """VGGT4D's 3-D refinement of coarse dynamic masks (module docstring for the method).

    ``coarse`` (T, H, W) bool, ``depth`` (T, H, W) z-depth, ``frames`` (T, H, W, 3) uint8 RGB,
    ``intrinsics`` (T, 3, 3) and ``extrinsics`` (T, 3, 4) world-to-camera, all at the same
    resolution → refined (T, H, W) bool and a JSON-serialisable report: ``settings``,
    ``skipped`` (None, or the sentence saying why the coarse mask was returned unchanged),
    ``points`` (coarse-dynamic pixels with usable depth), ``points_used`` (after subsampling),
    ``unusable_depth`` (coarse pixels kept because their depth is not positive and finite),
    ``outliers_removed`` (pixels dropped as statistical outliers), ``clusters`` (the per-cluster
    dicts of :func:`cluster_scores`, plus ``kept``), ``clusters_kept``, ``clusters_removed``,
    ``pixels_removed`` (coarse pixels of static clusters), ``pixels_coarse``, ``pixels_refined``.

    Skipped (mask returned unchanged, no morphology) when there are fewer than ``min_points``
    usable coarse-dynamic pixels or fewer than two frames.
    """
    settings = settings or RefineSettings()
    settings.validate()
    coarse = np.asarray(coarse)
    if coarse.ndim != 3:
        raise UserError(f"coarse masks must have shape (T, H, W), got {coarse.shape}")
    coarse = coarse.astype(bool)
    depth = np.asarray(depth, dtype=np.float64)
    frames = np.asarray(frames)
    if depth.shape != coarse.shape or frames.shape != (*coarse.shape, 3):
        raise UserError(f"coarse {coarse.shape}, depth {depth.shape} and frames {frames.shape} "
                        "must be (T, H, W), (T, H, W) and (T, H, W, 3) of the same size")
    k_mats, w2c = check_cameras(intrinsics, extrinsics, len(coarse))
    t_count = len(coarse)

    usable = coarse & np.isfinite(depth) & (depth > 0)
    n_points = int(usable.sum())
    report: dict = {
        "settings": asdict(settings),
        "skipped": None,
        "points": n_points,
        "points_used": 0,
        "unusable_depth": int((coarse & ~usable).sum()),
        "outliers_removed": 0,
        "clusters": [],
        "clusters_kept": 0,
        "clusters_removed": 0,
        "pixels_removed": 0,
        "pixels_coarse": int(coarse.sum()),
        "pixels_refined": int(coarse.sum()),
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

    # 1. back-project the usable coarse pixels (only those: no full (T, H, W, 3) point map)
    frame_idx, rows, cols = np.nonzero(usable)
    points = np.empty((n_points, 3), dtype=np.float64)
    for t in range(t_count):
        sel = frame_idx == t
        if not sel.any():
            continue
        # back-project frame t alone, then gather its coarse pixels
        world = backproject(depth[t : t + 1], k_mats[t : t + 1], w2c[t : t + 1])[0]
        points[sel] = world[rows[sel], cols[sel]]
    colours = frames[frame_idx, rows, cols].astype(np.float64)

    rng = np.random.default_rng(settings.seed)
    if n_points > settings.max_points:
        sample = np.sort(rng.choice(n_points, size=settings.max_points, replace=False))
    else:
        sample = np.arange(n_points)
    report["points_used"] = int(sample.size)
    in_sample = np.zeros(n_points, dtype=bool)
    in_sample[sample] = True

    # 2. statistical outliers: the sample against itself, the rest against the sample
    tree, k, mean_dist, threshold = _sor_threshold(points[sample], settings.neighbours,
                                                   settings.std_ratio)
    inlier = np.zeros(n_points, dtype=bool)
    inlier[sample] = mean_dist <= threshold
    rest = np.flatnonzero(~in_sample)
    if rest.size:
        inlier[rest] = _knn_mean_distance(tree, points[rest], k, self_query=False) <= threshold
    report["outliers_removed"] = int((~inlier).sum())

    # 3. k-means on the inliers of the sample; every inlier pixel takes its nearest centre
    fit_index = sample[inlier[sample]]
    n_clusters = int(min(settings.clusters, fit_index.size))
    model = _kmeans(points[fit_index], n_clusters, settings.seed)
    labels = np.full(n_points, -1, dtype=np.int64)
    labels[fit_index] = model.labels_
    others = np.flatnonzero(inlier & ~in_sample)
    if others.size:
        labels[others] = model.predict(points[others])

    # 4. scores over the sampled inliers
    scores = cluster_scores(
        points[fit_index], labels[fit_index], frame_idx[fit_index], colours[fit_index],
        depth, frames, coarse, k_mats, w2c,
        score=settings.score, window=settings.window, tau=settings.tau,
        min_valid=settings.min_valid, gradient_weight=settings.gradient_weight,
        num_clusters=n_clusters,
    )
    dynamic_cluster = np.array([entry["dynamic"] for entry in scores], dtype=bool)
    for entry in scores:
        entry["kept"] = entry["dynamic"]  # kept in the mask = still dynamic
    report["clusters"] = scores
    report["clusters_kept"] = int(dynamic_cluster.sum())
    report["clusters_removed"] = int((~dynamic_cluster).sum())

    # 5. refined mask: coarse pixels of the dynamic clusters (+ unusable-depth pixels)
    keep = inlier & dynamic_cluster[np.maximum(labels, 0)]
    report["pixels_removed"] = int((inlier & ~keep).sum())
    refined = coarse & ~usable
    refined[frame_idx[keep], rows[keep], cols[keep]] = True
    refined = morphology(refined, "close", settings.close)
    refined = morphology(refined, "dilate", settings.dilate)
    report["pixels_refined"] = int(refined.sum())
    return refined, report


class RefineStage(UncachedStage):
    """Coarse masks → 3-D refined masks: ``masks_refined/dynamic_{t:04d}.png`` (0/255) and the
    report ``refine.json`` (uses the first pass's depth and cameras at processing size)."""

    name = "refine"
    requires = ("masks", "prediction")
    provides = ("refined_masks",)

    def check(self, ctx) -> None:
        from vggt4d.config import require_cameras

        require_cameras(ctx.cfg.model, "refine")
        ctx.cfg.refine.validate()

    def run(self, ctx) -> None:
        import json
        import logging

        from vggt4d.io import atomic_write
        from vggt4d.masks import DynamicMasks, write_mask_png

        prediction, coarse = ctx.artifacts["prediction"], ctx.artifacts["masks"]
        refined, report = refine_masks(coarse.binary, prediction.depth, prediction.frames,
                                       prediction.intrinsics, prediction.extrinsics,
                                       ctx.cfg.refine)
        log = logging.getLogger(__name__)
        if report["skipped"]:
            log.info("refine: skipped (%s); the coarse masks are kept", report["skipped"])
        else:
            log.info("refine: %d of %d clusters stay dynamic, %d pixels removed",
                     report["clusters_kept"], report["clusters_kept"]
                     + report["clusters_removed"], report["pixels_removed"])
        for t, mask in enumerate(refined):
            write_mask_png(ctx.out_dir / "masks_refined" / f"dynamic_{t:04d}.png", mask)
        atomic_write(ctx.out_dir / "refine.json",
                     lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
        ctx.artifacts["refined_masks"] = DynamicMasks(coarse.soft, refined, {"refine": report})
