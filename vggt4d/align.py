"""Similarity alignment of consecutive chunks on the point maps of their shared frames.

Convention: a :class:`Sim3` ``S = (s, R, t)`` maps chunk b's world into chunk a's,
``X_a = s · R X_b + t``. Chunk b's outputs follow from it:

* camera: with ``X_c = R_c X_b + t_c`` (OpenCV world-to-camera, :mod:`vggt4d.cameras`),
  ``X_b = Rᵀ (X_a − t) / s``; chunk a's units are ``s`` times chunk b's, so the camera frame is
  scaled too (``X_c' = s X_c``: same ray, ``s`` times the depth), giving
  ``[R_c | t_c] ↦ [R_c Rᵀ | s t_c − R_c Rᵀ t]``, camera centre ``C ↦ s R C + t``;
* depth ``↦ s · depth``; intrinsics unchanged (pixels do not change);
* composition ``(S₁ ∘ S₂)(X) = s₁s₂ R₁R₂ X + s₁ R₁ t₂ + t₁``; with ``S_k`` mapping chunk
  ``k + 1`` into chunk ``k``, chunk ``k``'s world goes into the first chunk's by
  ``S_0 ∘ … ∘ S_{k−1}`` (:func:`chain_to_first`).

Correspondences (:func:`overlap_correspondences`, the scheme of DA3-Streaming's dense
alignment): every pixel of a shared frame gives the pair of its back-projected points in both
chunks. DA3's confidence is ``1 + exp(x) ≥ 1``, so ``c = conf − 1``; a pixel is kept when both
``c`` exceed ``conf_ratio`` (0.1) times the smaller of the two chunks' medians of ``c`` (medians
over the pixels with valid depth and not excluded) and it is not excluded (dynamic pixels: they
break a rigid alignment); its weight is ``√(c_a c_b)``.

Estimation (:func:`estimate_sim3`) minimises ``Σ w_i ρ(‖dst_i − (s R src_i + t)‖)`` with ρ
Huber's loss:

1. closed form for squared residuals (Umeyama 1991, weighted): weighted centroids ``μ``,
   rotation by Kabsch on the centred points (``scipy``'s ``Rotation.align_vectors``, reflections
   excluded), scale ``s = Σ w (dst_c · R src_c) / Σ w ‖src_c‖²`` (the least-squares scale;
   DA3-Streaming takes the ratio of weighted RMS spreads, equal on exact data but not the
   weighted least-squares minimiser each reweighting step needs, and under Huber weights
   ``δ / r`` a far outlier's pull on a spread grows with ``r`` while on the cross term it
   stays bounded), ``t = μ_dst − s R μ_src``. ``se3``: ``s = 1``; ``scale+se3``: ``s`` given
   (:func:`align_overlap` takes the weighted median of the depth ratios ``depth_a / depth_b``, as
   DA3-Streaming precomputes its scale from depth), then the rigid fit of ``s · src``;
2. Huber IRLS: weights ``w_i · min(1, δ / r_i)`` (Huber's ψ(r)/r), each step the weighted
   closed form again (a majorise–minimise iteration: the Huber cost never increases), at most
   ``iterations`` steps, stopping once ``|Δs|/s + ‖ΔR‖_F + ‖Δt‖/scale`` falls below ``tol``.

Scale-free δ: ``δ = huber_delta × scene scale``, the scene scale being the weighted median
distance of the ``dst`` points from their coordinate-wise weighted median (robust to up to half
the weight in outliers), so the same ``huber_delta`` (0.1, DA3-Streaming's value, there in
absolute DA3 units) means the same tolerance for a room or a street and for any model's units.
The residual report gives the confidence-weighted RMS, the weighted median and the inlier
fraction (residual ≤ δ) of the aligned residuals relative to that scale, over all
correspondences (outliers included: a chunk seam shows there).

Written here because no installed library fits a weighted similarity with a robust loss (evo's
Umeyama is unweighted); the rotation step is scipy's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from vggt4d.cameras import backproject, check_cameras
from vggt4d.errors import UserError

MODES = ("sim3", "se3", "scale+se3")
MIN_POINTS = 3


@dataclass(frozen=True)
class Sim3:
    """``X ↦ s · R X + t`` (chunk b's world into chunk a's); ``rotation`` (3, 3),
    ``translation`` (3,)."""

    scale: float
    rotation: np.ndarray
    translation: np.ndarray

    @classmethod
    def identity(cls) -> Sim3:
        return cls(1.0, np.eye(3), np.zeros(3))

    def apply(self, points: np.ndarray) -> np.ndarray:
        """(..., 3) → (..., 3) float64."""
        pts = np.asarray(points, dtype=np.float64)
        return self.scale * pts @ self.rotation.T + self.translation

    def compose(self, other: Sim3) -> Sim3:
        """``self ∘ other``: ``other`` first."""
        return Sim3(self.scale * other.scale, self.rotation @ other.rotation,
                    self.scale * self.rotation @ other.translation + self.translation)

    def inverse(self) -> Sim3:
        """``X ↦ Rᵀ (X − t) / s``."""
        return Sim3(1.0 / self.scale, self.rotation.T,
                    -(self.rotation.T @ self.translation) / self.scale)

    def as_dict(self) -> dict:
        """JSON-ready: scale, rotation (row-major 3×3 lists), translation."""
        return {"scale": float(self.scale), "rotation": self.rotation.tolist(),
                "translation": self.translation.tolist()}


def chain_to_first(pairwise: Sequence[Sim3]) -> list[Sim3]:
    """``pairwise[k]`` maps chunk ``k + 1`` into chunk ``k`` → for every chunk ``k`` the map of
    its world into the first chunk's (``k + 1`` transforms, the first the identity)."""
    chained = [Sim3.identity()]
    for step in pairwise:
        chained.append(chained[-1].compose(step))
    return chained


def transform_extrinsics(extrinsics: np.ndarray, sim: Sim3) -> np.ndarray:
    """(T, 3, 4) world-to-camera ``[R_c | t_c]`` of chunk b → chunk a's world:
    ``[R_c Rᵀ | s t_c − R_c Rᵀ t]`` (float64)."""
    w2c = np.asarray(extrinsics, dtype=np.float64)
    if w2c.ndim != 3 or w2c.shape[1:] != (3, 4):
        raise UserError(f"extrinsics must have shape (T, 3, 4), got {w2c.shape}")
    rot = w2c[:, :, :3] @ sim.rotation.T
    trans = sim.scale * w2c[:, :, 3] - rot @ sim.translation
    return np.concatenate([rot, trans[:, :, None]], axis=2)


def transform_depth(depth: np.ndarray, sim: Sim3) -> np.ndarray:
    """Depth of chunk b in chunk a's units: ``s · depth`` (same shape and dtype)."""
    depth = np.asarray(depth)
    return (depth * sim.scale).astype(depth.dtype, copy=False)


@dataclass(frozen=True)
class Correspondences:
    """Pixels of the shared frames kept for alignment: (N, 3) float64 points in each chunk's
    world, (N,) weights ``√(c_a c_b)`` and depths, the confidence threshold on ``conf − 1`` and
    the number of candidate pixels (valid depth, not excluded)."""

    points_a: np.ndarray
    points_b: np.ndarray
    weights: np.ndarray
    depth_a: np.ndarray
    depth_b: np.ndarray
    threshold: float
    candidates: int


def overlap_correspondences(
    depth_a: np.ndarray, conf_a: np.ndarray, extrinsics_a: np.ndarray, intrinsics_a: np.ndarray,
    depth_b: np.ndarray, conf_b: np.ndarray, extrinsics_b: np.ndarray, intrinsics_b: np.ndarray,
    exclude: np.ndarray | None = None, conf_ratio: float = 0.1, max_points: int | None = None,
) -> Correspondences:
    """Point pairs of the shared frames as predicted by chunks a and b.

    ``depth_*``, ``conf_*`` and ``exclude`` (True: not used, e.g. dynamic pixels) are
    (O, H, W) over the O shared frames, ``extrinsics_*`` (O, 3, 4), ``intrinsics_*`` (O, 3, 3);
    selection and weights as in the module docstring. ``max_points``: keep every k-th selected
    pixel (k = ⌈N / max_points⌉) to bound the cost. Float inputs keep their precision until
    the kept pixels are taken (float64 from there; the points are back-projected in float32).
    """
    if max_points is not None and max_points < MIN_POINTS:
        raise UserError(f"max_points must be at least {MIN_POINTS}, got {max_points}")
    depth_a, conf_a, depth_b, conf_b = (np.asarray(x, dtype=np.result_type(x, np.float32))
                                        for x in (depth_a, conf_a, depth_b, conf_b))
    if depth_a.ndim != 3 or any(x.shape != depth_a.shape for x in (conf_a, depth_b, conf_b)):
        raise UserError(f"overlap depth and confidence must all be (O, H, W) of one shape, got "
                        f"{[x.shape for x in (depth_a, conf_a, depth_b, conf_b)]}")
    frames = len(depth_a)
    cameras_a = check_cameras(intrinsics_a, extrinsics_a, frames)
    cameras_b = check_cameras(intrinsics_b, extrinsics_b, frames)
    with np.errstate(invalid="ignore"):
        valid = ((depth_a > 0) & (depth_b > 0) & np.isfinite(depth_a + depth_b)
                 & np.isfinite(conf_a + conf_b))
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=bool)
        if exclude.shape != depth_a.shape:
            raise UserError(f"the exclusion mask must be {depth_a.shape}, got {exclude.shape}")
        valid &= ~exclude
    if not valid.any():
        raise UserError("no shared pixel has valid depth in both chunks (and is not excluded); "
                        "increase the chunk overlap")
    c_a, c_b = conf_a - 1.0, conf_b - 1.0
    threshold = conf_ratio * min(float(np.median(c_a[valid])), float(np.median(c_b[valid])))
    keep = valid & (c_a > threshold) & (c_b > threshold)
    if max_points is not None and keep.sum() > max_points:
        flat = np.flatnonzero(keep)
        keep = np.zeros_like(keep)
        keep.flat[flat[::math.ceil(len(flat) / max_points)]] = True
    if keep.sum() < MIN_POINTS:
        raise UserError(f"only {int(keep.sum())} confident shared pixels to align chunks on "
                        f"(need {MIN_POINTS}); increase the chunk overlap")
    points_a = _kept_points(depth_a, *cameras_a, keep)
    points_b = _kept_points(depth_b, *cameras_b, keep)
    weights = np.sqrt(c_a[keep].astype(np.float64) * c_b[keep])
    return Correspondences(points_a=points_a, points_b=points_b, weights=weights,
                           depth_a=depth_a[keep].astype(np.float64),
                           depth_b=depth_b[keep].astype(np.float64), threshold=threshold,
                           candidates=int(valid.sum()))


def _kept_points(depth: np.ndarray, intrinsics: np.ndarray, extrinsics: np.ndarray,
                 keep: np.ndarray) -> np.ndarray:
    """(N, 3) float64 world points of the ``keep`` pixels, back-projected one frame at a time
    (bounded float64 intermediates)."""
    return np.concatenate([
        backproject(depth[o:o + 1], intrinsics[o:o + 1], extrinsics[o:o + 1])[0][keep[o]]
        for o in range(len(depth))]).astype(np.float64)


@dataclass(frozen=True)
class AlignmentReport:
    """How well the aligned points agree; residuals relative to ``scene_scale``."""

    mode: str
    points: int
    scene_scale: float  # dst units
    delta: float  # absolute Huber δ, dst units
    iterations: int  # IRLS steps run
    converged: bool  # stopped on ``tol`` before ``iterations`` ran out
    initial_rms: float  # the closed form's, before reweighting
    rms: float  # √(Σ w r² / Σ w) / scene_scale, input weights, all points
    median: float  # weighted median residual / scene_scale
    inlier_fraction: float  # weight fraction with r ≤ δ

    def as_dict(self) -> dict:
        return asdict(self)


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The smallest value whose cumulative weight (values sorted) reaches half the total."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])


def scene_scale(points: np.ndarray, weights: np.ndarray) -> float:
    """Weighted median distance of (N, 3) points from their coordinate-wise weighted median."""
    centre = np.array([weighted_median(points[:, i], weights) for i in range(3)])
    return weighted_median(np.linalg.norm(points - centre, axis=1), weights)


def depth_ratio_scale(corr: Correspondences) -> float:
    """``scale+se3``'s scale: weighted median of ``depth_a / depth_b`` over the
    correspondences."""
    return weighted_median(corr.depth_a / corr.depth_b, corr.weights)


def _closed_form(src: np.ndarray, dst: np.ndarray, weights: np.ndarray,
                 scale: float | None) -> Sim3:
    """Weighted least-squares similarity (``scale`` None) or rigid fit of ``scale · src``."""
    total = weights.sum()
    mu_src = weights @ src / total
    mu_dst = weights @ dst / total
    src_c, dst_c = src - mu_src, dst - mu_dst
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        try:
            rotation = Rotation.align_vectors(dst_c, src_c, weights=weights)[0].as_matrix()
        except UserWarning:
            raise UserError("the alignment points are degenerate (all on one line or one "
                            "point): the rotation between chunks is undefined") from None
    if scale is None:
        scale = float(np.einsum("n,ni,ni->", weights, dst_c, src_c @ rotation.T)
                      / np.einsum("n,ni,ni->", weights, src_c, src_c))
    return Sim3(scale, rotation, mu_dst - scale * rotation @ mu_src)


def _residuals(sim: Sim3, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    return np.linalg.norm(dst - sim.apply(src), axis=1)


def _checked_inputs(src, dst, weights, mode: str, huber_delta: float, iterations: int,
                    scale: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`estimate_sim3`'s arguments checked, arrays as float64."""
    src, dst, weights = (np.asarray(x, dtype=np.float64) for x in (src, dst, weights))
    if src.ndim != 2 or src.shape[1] != 3 or dst.shape != src.shape or weights.shape != (
            len(src),):
        raise UserError(f"alignment needs (N, 3) points twice and (N,) weights, got {src.shape}, "
                        f"{dst.shape}, {weights.shape}")
    if mode not in MODES:
        raise UserError(f"alignment mode '{mode}' is not one of {', '.join(MODES)}")
    if mode == "scale+se3" and not (scale is not None and scale > 0):
        raise UserError(f"alignment mode scale+se3 needs a positive fixed scale, got {scale}")
    if mode != "scale+se3" and scale is not None:
        raise UserError(f"alignment mode {mode} takes no fixed scale (only scale+se3 does)")
    if not (huber_delta > 0 and iterations >= 0):
        raise UserError(f"Huber delta must be > 0 and iterations >= 0, got {huber_delta}, "
                        f"{iterations}")
    if len(src) < MIN_POINTS or not (np.isfinite(weights).all() and (weights >= 0).all()
                                     and weights.sum() > 0):
        raise UserError(f"alignment needs at least {MIN_POINTS} points with finite weights >= 0 "
                        f"summing above 0, got {len(src)} points")
    return src, dst, weights


def estimate_sim3(src: np.ndarray, dst: np.ndarray, weights: np.ndarray, mode: str = "sim3",
                  huber_delta: float = 0.1, iterations: int = 5, scale: float | None = None,
                  tol: float = 1e-10) -> tuple[Sim3, AlignmentReport]:
    """The :class:`Sim3` with ``dst ≈ s R src + t`` for (N, 3) ``src`` (chunk b) and ``dst``
    (chunk a) and (N,) weights ≥ 0, by the weighted closed form then Huber IRLS (module
    docstring). ``mode``: ``sim3``, ``se3`` (s = 1), ``scale+se3`` (``scale`` given);
    ``huber_delta`` relative to the scene scale; ``iterations = 0``: the closed form alone."""
    src, dst, weights = _checked_inputs(src, dst, weights, mode, huber_delta, iterations, scale)
    fixed = 1.0 if mode == "se3" else scale
    sim = _closed_form(src, dst, weights, fixed)
    reference = scene_scale(dst, weights)
    delta = huber_delta * reference
    residuals = _residuals(sim, src, dst)
    initial_rms = _rms(residuals, weights) / reference
    steps, converged = 0, False
    while steps < iterations and not converged:
        huber = weights * np.minimum(1.0, delta / np.maximum(residuals, np.finfo(float).tiny))
        new = _closed_form(src, dst, huber, fixed)
        change = (abs(new.scale - sim.scale) / sim.scale
                  + np.linalg.norm(new.rotation - sim.rotation)
                  + np.linalg.norm(new.translation - sim.translation) / reference)
        sim, steps, converged = new, steps + 1, bool(change < tol)
        residuals = _residuals(sim, src, dst)
    report = AlignmentReport(
        mode=mode, points=len(src), scene_scale=reference, delta=delta, iterations=steps,
        converged=converged, initial_rms=initial_rms, rms=_rms(residuals, weights) / reference,
        median=weighted_median(residuals, weights) / reference,
        inlier_fraction=float(weights[residuals <= delta].sum() / weights.sum()))
    return sim, report


def _rms(residuals: np.ndarray, weights: np.ndarray) -> float:
    return float(np.sqrt(weights @ residuals**2 / weights.sum()))


def align_overlap(corr: Correspondences, mode: str = "sim3", huber_delta: float = 0.1,
                  iterations: int = 5) -> tuple[Sim3, AlignmentReport]:
    """Chunk b's world into chunk a's from their shared frames' correspondences
    (``scale+se3``: the scale from the depth ratios first)."""
    scale = depth_ratio_scale(corr) if mode == "scale+se3" else None
    return estimate_sim3(corr.points_b, corr.points_a, corr.weights, mode=mode,
                         huber_delta=huber_delta, iterations=iterations, scale=scale)
