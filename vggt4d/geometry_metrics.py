"""Depth and camera-pose accuracy of a predicted clip against ground truth.

Depth (:func:`depth_metrics`)
-----------------------------
Inputs are z-depth maps ``pred`` and ``gt`` of shape ``(T, H, W)``, same size (resize first;
a mismatch is a :class:`~vggt4d.errors.UserError`). The scored pixels are ``valid`` (default:
all) intersected with the pixels where the metrics are defined: ``gt`` finite and ``> 0`` and
``pred`` finite and ``> 0``.

Scale alignment, chosen by ``align``:

* ``"median"`` (video-depth convention): one scale for the whole sequence,
  ``s = median(gt[valid]) / median(pred[valid])`` over all scored pixels of all frames.
* ``"median_per_frame"``: ``s_t = median(gt_t[valid_t]) / median(pred_t[valid_t])`` per frame
  (``nan`` for a frame with no scored pixel; that frame contributes nothing).
* ``"none"``: ``s = 1``.

With ``d = s · pred`` the aligned depth, pooled over every scored pixel of the sequence
(not a mean of per-frame means):

* ``abs_rel = mean(|d − gt| / gt)``
* ``delta_1.25 = fraction of pixels with max(d / gt, gt / d) < 1.25``

Camera poses (:func:`pose_metrics`)
-----------------------------------
Inputs are **world-to-camera** extrinsics ``(T, 3, 4)`` (``(T, 4, 4)`` is accepted too),
``x_cam = R · x_world + t`` (camera-axis convention irrelevant as long as both inputs share it).
They are inverted to **camera-to-world** poses ``[Rᵀ | −Rᵀ t]`` (camera centre ``c = −Rᵀ t``)
and wrapped as evo ``PosePath3D`` trajectories (reference = ground truth, estimate =
prediction). Rotations are projected onto SO(3) (SVD) after a sanity check, since float32
predictions are only approximately orthonormal.

Alignment: the *prediction* is aligned onto the *ground truth* with a Sim(3) Umeyama fit of the
camera centres, ``c_gt ≈ s · Q · c_pred + u`` (evo ``traj_pred.align(traj_gt,
correct_scale=True)``); the aligned camera-to-world pose is ``[Q R_c2w | s Q c + u]``.
``sim3_scale`` is that ``s``: it maps prediction units to ground-truth units, so a prediction
that is the ground truth blown up by 3.7 gives ``sim3_scale = 1 / 3.7``.

* ``ate``: RMSE over frames of ``‖c_gt − c_pred_aligned‖`` (evo ``metrics.APE`` with
  ``PoseRelation.translation_part``, statistic ``rmse``).
* ``rpe_trans`` / ``rpe_rot_deg``: relative pose error between consecutive frames
  (evo ``metrics.RPE``, ``delta=1``, ``Unit.frames``, ``all_pairs=False``) on the aligned
  poses: with camera-to-world ``P_i`` (prediction) and ``G_i`` (ground truth),
  ``E_i = (G_i⁻¹ G_{i+1})⁻¹ (P_i⁻¹ P_{i+1})``; ``rpe_trans`` is the RMSE of ``‖trans(E_i)‖``
  (ground-truth units, ``PoseRelation.translation_part``) and ``rpe_rot_deg`` the RMSE of the
  rotation angle of ``E_i`` in degrees (``PoseRelation.rotation_angle_deg``). The rotation part
  is unaffected by the alignment; the translation part is measured after it.

Sim(3) needs at least 3 poses (``T < 3`` is a :class:`~vggt4d.errors.UserError`), and camera
centres that are not all on one line (evo refuses a degenerate fit; reported as a UserError).

Pose difference (:func:`pose_difference`)
-----------------------------------------
Two predictions of the same clip expressed in the *same* world frame (no alignment), both
world-to-camera: per frame, the rotation angle of ``R_a R_bᵀ`` in degrees and the distance
``‖c_a − c_b‖`` between the camera centres ``c = −Rᵀ t``, plus their means.
"""

from __future__ import annotations

import numpy as np

from vggt4d.errors import UserError

ALIGN_MODES = ("median", "median_per_frame", "none")
_ORTHO_TOL = 1e-2  # max |RᵀR − I| accepted before projecting onto SO(3)


# --------------------------------------------------------------------------------------- depth
def depth_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    align: str = "median",
) -> dict:
    """Scale-aligned AbsRel and δ<1.25 of ``pred`` against ``gt`` (see the module docstring).

    Returns ``{"abs_rel", "delta_1.25", "scale", "pixels"}`` as plain Python numbers;
    ``scale`` is a float, or a list of per-frame floats for ``align="median_per_frame"``.
    """
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape:
        raise UserError(
            f"depth shapes differ: pred {pred.shape} vs gt {gt.shape}; "
            "resize the prediction to the ground-truth size first"
        )
    if pred.ndim != 3:
        raise UserError(f"depth maps must be (T, H, W), got shape {pred.shape}")
    if align not in ALIGN_MODES:
        raise UserError(f"unknown depth alignment {align!r}; choose one of {ALIGN_MODES}")

    mask = np.isfinite(gt) & (gt > 0) & np.isfinite(pred) & (pred > 0)
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != gt.shape:
            raise UserError(f"valid mask shape {valid.shape} differs from depth shape {gt.shape}")
        mask &= valid
    pixels = int(mask.sum())
    if pixels == 0:
        raise UserError("no valid depth pixels to score (gt > 0, pred > 0, both finite, in mask)")

    if align == "median":
        s = float(np.median(gt[mask]) / np.median(pred[mask]))
        scale_map = np.full(pred.shape[0], s)
        scale_out: float | list[float] = s
    elif align == "median_per_frame":
        scale_map = np.full(pred.shape[0], np.nan)
        for t in range(pred.shape[0]):
            m = mask[t]
            if m.any():
                scale_map[t] = np.median(gt[t][m]) / np.median(pred[t][m])
        scale_out = [float(v) for v in scale_map]
    else:
        scale_map = np.ones(pred.shape[0])
        scale_out = 1.0

    aligned = pred * scale_map[:, None, None]
    d, g = aligned[mask], gt[mask]
    abs_rel = float(np.mean(np.abs(d - g) / g))
    delta = float(np.mean(np.maximum(d / g, g / d) < 1.25))
    return {"abs_rel": abs_rel, "delta_1.25": delta, "scale": scale_out, "pixels": pixels}


# ---------------------------------------------------------------------------------------- poses
def _w2c_to_rt(w2c: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(T,3,4)/(T,4,4) world-to-camera → rotations (T,3,3) projected onto SO(3), translations."""
    w2c = np.asarray(w2c, dtype=np.float64)
    if w2c.ndim != 3 or w2c.shape[1:] not in ((3, 4), (4, 4)):
        raise UserError(f"{name} must be (T, 3, 4) world-to-camera extrinsics, got {w2c.shape}")
    if not np.isfinite(w2c[:, :3, :4]).all():
        raise UserError(f"{name} contains non-finite values")
    rot, trans = w2c[:, :3, :3], w2c[:, :3, 3]
    err = np.abs(np.swapaxes(rot, 1, 2) @ rot - np.eye(3)).max()
    if err > _ORTHO_TOL or (np.linalg.det(rot) <= 0).any():
        raise UserError(f"{name} rotations are not rotation matrices (|RᵀR − I| up to {err:.3g})")
    u, _, vt = np.linalg.svd(rot)
    fix = np.ones((len(rot), 3))
    fix[:, 2] = np.sign(np.linalg.det(u @ vt))
    rot = (u * fix[:, None, :]) @ vt
    return rot, trans


def _camera_centres(rot: np.ndarray, trans: np.ndarray) -> np.ndarray:
    """Camera centres c = −Rᵀ t, shape (T, 3)."""
    return -np.einsum("tji,tj->ti", rot, trans)


def _c2w_list(rot: np.ndarray, trans: np.ndarray) -> list[np.ndarray]:
    """Camera-to-world 4×4 matrices [Rᵀ | −Rᵀ t]."""
    centres = _camera_centres(rot, trans)
    poses = []
    for r, c in zip(rot, centres, strict=True):
        p = np.eye(4)
        p[:3, :3] = r.T
        p[:3, 3] = c
        poses.append(p)
    return poses


def pose_metrics(pred_w2c: np.ndarray, gt_w2c: np.ndarray) -> dict:
    """ATE and consecutive-frame RPE of ``pred_w2c`` after Sim(3) alignment onto ``gt_w2c``.

    Returns ``{"ate", "rpe_trans", "rpe_rot_deg", "sim3_scale"}`` as floats; ATE and
    ``rpe_trans`` are in ground-truth units, ``sim3_scale`` maps prediction units to them.
    """
    from evo.core import metrics
    from evo.core.geometry import GeometryException
    from evo.core.trajectory import PosePath3D

    rp, tp = _w2c_to_rt(pred_w2c, "pred_w2c")
    rg, tg = _w2c_to_rt(gt_w2c, "gt_w2c")
    if len(rp) != len(rg):
        raise UserError(f"pose counts differ: pred {len(rp)} vs gt {len(rg)} frames")
    if len(rp) < 3:
        raise UserError(f"pose metrics need at least 3 frames for a Sim(3) fit, got {len(rp)}")

    traj_gt = PosePath3D(poses_se3=_c2w_list(rg, tg))
    traj_pred = PosePath3D(poses_se3=_c2w_list(rp, tp))
    try:
        _, _, scale = traj_pred.align(traj_gt, correct_scale=True)
    except GeometryException as exc:
        raise UserError(
            "Sim(3) alignment impossible: camera centres are degenerate "
            f"(static or collinear camera path): {exc}"
        ) from None

    ate = metrics.APE(metrics.PoseRelation.translation_part)
    ate.process_data((traj_gt, traj_pred))

    def rpe(relation: metrics.PoseRelation) -> float:
        m = metrics.RPE(relation, delta=1, delta_unit=metrics.Unit.frames, all_pairs=False)
        m.process_data((traj_gt, traj_pred))
        return float(m.get_statistic(metrics.StatisticsType.rmse))

    return {
        "ate": float(ate.get_statistic(metrics.StatisticsType.rmse)),
        "rpe_trans": rpe(metrics.PoseRelation.translation_part),
        "rpe_rot_deg": rpe(metrics.PoseRelation.rotation_angle_deg),
        "sim3_scale": float(scale),
    }


def pose_difference(w2c_a: np.ndarray, w2c_b: np.ndarray) -> dict:
    """Per-frame rotation angle (deg) of ``R_a R_bᵀ`` and camera-centre distance, no alignment.

    Returns ``{"rotation_deg": [...], "translation": [...], "mean_rotation_deg",
    "mean_translation"}`` with plain floats.
    """
    ra, ta = _w2c_to_rt(w2c_a, "w2c_a")
    rb, tb = _w2c_to_rt(w2c_b, "w2c_b")
    if len(ra) != len(rb):
        raise UserError(f"pose counts differ: {len(ra)} vs {len(rb)} frames")
    if len(ra) == 0:
        raise UserError("pose_difference needs at least one frame")
    rel = ra @ np.swapaxes(rb, 1, 2)
    cos = np.clip((np.trace(rel, axis1=1, axis2=2) - 1.0) / 2.0, -1.0, 1.0)
    # arccos is ill-conditioned near 0: use atan2(|sin|, cos) from the skew part instead.
    skew = np.stack(
        [rel[:, 2, 1] - rel[:, 1, 2], rel[:, 0, 2] - rel[:, 2, 0], rel[:, 1, 0] - rel[:, 0, 1]],
        axis=1,
    )
    sin = np.linalg.norm(skew, axis=1) / 2.0
    rot_deg = np.degrees(np.arctan2(sin, cos))
    dist = np.linalg.norm(_camera_centres(ra, ta) - _camera_centres(rb, tb), axis=1)
    return {
        "rotation_deg": [float(v) for v in rot_deg],
        "translation": [float(v) for v in dist],
        "mean_rotation_deg": float(rot_deg.mean()),
        "mean_translation": float(dist.mean()),
    }
