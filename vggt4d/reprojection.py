"""Per-pixel reprojection check of the AnyDynamics "hooks" research script: a pixel whose depth,
carried into the neighbouring frames with the cameras, disagrees with the depth seen there is
dynamic.

For frame t and each neighbour n ∈ {t − 1, t + 1} inside the clip, pixel (u, v) of depth D_t is
back-projected to the world (:func:`vggt4d.cameras.backproject`, ray through (u + ½, v + ½)) and
projected into camera n (:func:`vggt4d.cameras.project`) at continuous point (x, y), camera depth
z. The neighbour's depth there, d = D_n sampled bilinearly at index (x − ½, y − ½) (pixel centres
in the same convention), gives the relative error e_n = |z − d| / d. A projection counts when it
lands between the outermost pixel centres (0 ≤ x − ½ ≤ W − 1, 0 ≤ y − ½ ≤ H − 1, to within
:data:`EDGE`), in front of the camera (z > ``near``, the script's 0.1 in the depth's units) and
on a finite d > 0. The pixel's error is the mean of e_n over the neighbours that count; the
pixel is dynamic when it exceeds ``threshold`` (0.1); a pixel no neighbour counts for, or without
a finite positive depth of its own, is not flagged. The refined mask is the coarse mask united
with these pixels.

Differences from the script, each deliberate: it back-projected integer pixel coordinates and
sampled with ``grid_sample(align_corners=True)`` at those coordinates, a convention of its own;
here both steps use the project's pixel-centre convention, so a static pixel reprojects exactly
onto itself. It divided by d + 10⁻⁴; here by d (with d > 0 required), independent of the depth
unit. The masks it united were in DA3's internal frame order (see :mod:`vggt4d.temporal`); here
they are in input order.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from vggt4d.cameras import backproject, check_cameras, project
from vggt4d.errors import UserError

NEIGHBOURS = (-1, 1)
"""Frame offsets the depth is carried into (the script's t ± 1)."""
NEAR = 0.1
"""Smallest camera depth of a counted projection (the script's ``z > 0.1``)."""
EDGE = 1e-3
"""Pixels a projection may pass the outermost centres by and still count: the back-projected
points are float32, so a pixel that lands on its own centre in the last column is off by ~1e-6."""


def reprojection_error(depth: np.ndarray, intrinsics: np.ndarray, extrinsics: np.ndarray,
                       neighbours: tuple[int, ...] = NEIGHBOURS, near: float = NEAR
                       ) -> np.ndarray:
    """Mean relative depth error of every pixel carried into its neighbour frames.

    ``depth`` (T, H, W) z-depth, ``intrinsics`` (T, 3, 3), ``extrinsics`` (T, 3, 4) OpenCV
    world-to-camera → (T, H, W) float64 mean of e_n (module docstring); NaN where no neighbour
    counts.
    """
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim != 3:
        raise UserError(f"depth must have shape (T, H, W), got {depth.shape}")
    k_mats, w2c = check_cameras(intrinsics, extrinsics, len(depth))
    frames, height, width = depth.shape
    points = backproject(depth, k_mats, w2c).astype(np.float64).reshape(frames, -1, 3)
    own = (np.isfinite(depth) & (depth > 0)).reshape(frames, -1)
    total = np.zeros((frames, height * width))
    counts = np.zeros((frames, height * width))
    for t in range(frames):
        for n in (t + offset for offset in neighbours):
            if not 0 <= n < frames:
                continue
            pixel, z = project(points[t], k_mats[n], w2c[n])
            col, row = pixel[:, 0] - 0.5, pixel[:, 1] - 0.5
            inside = ((col >= -EDGE) & (col <= width - 1 + EDGE)
                      & (row >= -EDGE) & (row <= height - 1 + EDGE))
            counted = own[t] & inside & (z > near)
            observed = np.full(z.shape, np.nan)
            observed[counted] = ndimage.map_coordinates(
                depth[n], [row[counted], col[counted]], order=1, mode="nearest")
            counted &= np.isfinite(observed) & (observed > 0)
            total[t, counted] += np.abs(z[counted] - observed[counted]) / observed[counted]
            counts[t, counted] += 1
    with np.errstate(invalid="ignore"):
        mean = np.where(counts > 0, total / np.maximum(counts, 1), np.nan)
    return mean.reshape(frames, height, width)


def reprojection_refine(coarse: np.ndarray, depth: np.ndarray, intrinsics: np.ndarray,
                        extrinsics: np.ndarray, threshold: float = 0.1
                        ) -> tuple[np.ndarray, dict]:
    """Coarse masks (T, H, W) bool ∪ pixels whose :func:`reprojection_error` exceeds
    ``threshold`` → refined (T, H, W) bool and a JSON-ready report (pixels added per frame)."""
    coarse = np.asarray(coarse, dtype=bool)
    if coarse.shape != np.shape(depth):
        raise UserError(f"masks of shape {coarse.shape} do not match depth of shape "
                        f"{np.shape(depth)}")
    error = reprojection_error(depth, intrinsics, extrinsics)
    with np.errstate(invalid="ignore"):
        flagged = error > threshold
    refined = coarse | flagged
    added = (refined & ~coarse).reshape(len(coarse), -1).sum(axis=1)
    report = {"method": "reprojection", "threshold": float(threshold),
              "neighbours": list(NEIGHBOURS), "near": NEAR,
              "flagged_pixels": int(flagged.sum()), "pixels_added": int(added.sum()),
              "pixels_added_per_frame": added.tolist(),
              "unchecked_pixels": int(np.isnan(error).sum())}
    return refined, report
