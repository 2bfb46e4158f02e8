"""Depth and camera-pose accuracy of a predicted clip against ground truth.

Depth (:func:`depth_metrics`)
-----------------------------
Inputs are z-depth maps ``pred`` and ``gt`` of shape ``(T, H, W)``, same size (resize first;
a mismatch is a :class:`~vggt4d.errors.UserError`). The scored pixels are ``valid`` (default:
all) intersected with the pixels where the metrics are defined: ``gt`` finite and ``> 0`` and
``pred`` finite and ``> 0``.

``cap`` (the protocols' ``max_depth``: 70 m on Sintel and Bonn, none on KITTI) leaves out
ground truth at or beyond it: scored pixels have ``0 < gt < cap``. Predictions are positive
depths (DA3's are by construction); the published code does not test them, here a pixel with a
non-positive or non-finite prediction is not scored.

Alignment, chosen by ``align`` (:func:`align_depth`), over all scored pixels of all frames with
``p`` the prediction and ``g`` the truth there:

* ``"median"`` (video-depth convention): ``s = median(g) / median(p)``, ``t = 0``. NumPy's median
  (the mean of the two middle values; the published code's ``torch.median`` takes the lower one,
  a difference of one pixel's value in a sequence of millions).
* ``"median_per_frame"``: ``s_t = median(g_t) / median(p_t)`` per frame (``nan`` for a frame
  with no scored pixel; that frame contributes nothing).
* ``"scale_shift"`` (MonST3R ``dust3r/depth_eval.py::depth_evaluation(align_with_lad2=True)``,
  used by its ``depth_metric.ipynb`` and by CUT3R's ``eval/video_depth/eval_depth.py`` for
  "scale&shift"): minimise ``L(s, t) = Σ |s·p + t − g|`` with Adam (lr 1e-4, PyTorch's default
  betas and eps) from ``s = median(g) / median(p)``, ``t = 0``, at most 1000 steps, stopping once
  the loss changes by less than 1e-6 between steps. An Adam step moves s and t by about lr (a
  few lr at most), so this is the median scale corrected by a few tenths at most in s and in t,
  not the exact L1 optimum: it is kept as published because the published numbers were made
  with it.
* ``"scale"`` (CUT3R ``align_with_scale``): ``s₀ = mean(g) / mean(p)``, then 10 reweighted
  least-squares steps of the L1 fit of ``s·p``: ``w = 1 / (|s·p − g| + 1e-8)``,
  ``s = Σ w p g / Σ w p²``; finally ``s = max(s, 1e-3)``; ``t = 0``.
* ``"none"``: ``s = 1``, ``t = 0``.

With ``d = min(s · p + t, clip)`` the aligned depth (``clip`` = MonST3R's ``post_clip_max``, 70 on
Sintel; none = no clipping), pooled over every scored pixel of the sequence (not a mean of
per-frame means):

* ``abs_rel = mean(|d − g| / g)``
* ``delta_1.25 = fraction of pixels with max(d' / g, g / d') < 1.25`` where ``d' = max(d,
  1e-5)`` (the published code clamps before the ratio; only a shift can make d ≤ 0).

:func:`resize_depth` brings a prediction to the truth's size first, bicubic as the published
scripts do (``cv2.resize(..., INTER_CUBIC)``): PyTorch's bicubic with ``align_corners=False``
has the same kernel (a = −0.75) and pixel-centre convention, and replicates edge pixels.

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

This is the pose protocol of MonST3R's ``dust3r/utils/vo_eval.py::eval_metrics`` (evo's
``main_ape.ape`` and ``main_rpe.rpe`` with ``align=True, correct_scale=True``, Δ = 1 frame,
RMSE statistics); its ``all_pairs=True`` gives the same pairs (i, i+1) at Δ = 1. A table's
number is the plain mean over sequences.

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
import torch

from vggt4d.errors import UserError

ALIGN_MODES = ("median", "median_per_frame", "scale_shift", "scale", "none")
ADAM_LR = 1e-4  # MonST3R absolute_value_scaling2 defaults: lr, max_iters, tol
ADAM_STEPS = 1000
ADAM_TOL = 1e-6
IRLS_STEPS = 10  # CUT3R align_with_scale: iterations, residual floor, smallest scale
IRLS_EPS = 1e-8
MIN_SCALE = 1e-3
DELTA_FLOOR = 1e-5  # aligned depth is clamped to this before the δ ratio
_ORTHO_TOL = 1e-2  # max |RᵀR − I| accepted before projecting onto SO(3)


# --------------------------------------------------------------------------------------- depth
def resize_depth(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of ``(T, h, w)`` depth to ``size = (H, W)`` → float64 ``(T, H, W)`` (see
    the module docstring)."""
    depth = np.asarray(depth, dtype=np.float64)
    if depth.shape[1:] == tuple(size):
        return depth
    resized = torch.nn.functional.interpolate(torch.from_numpy(depth)[:, None], size=tuple(size),
                                              mode="bicubic", align_corners=False)
    return resized[:, 0].numpy()


def _l1_scale_shift(pred: np.ndarray, gt: np.ndarray, device: str) -> tuple[float, float]:
    """MonST3R's ``absolute_value_scaling2``: Adam on ``Σ|s·p + t − g|`` (module docstring);
    float64 on ``device``, the gradient ``(Σ sign(r)·p, Σ sign(r))`` written out (the same
    autograd gives, without its per-step graph)."""
    p = torch.as_tensor(pred, dtype=torch.float64, device=device)
    g = torch.as_tensor(gt, dtype=torch.float64, device=device)
    scale = torch.tensor([np.median(gt) / np.median(pred)], dtype=torch.float64, device=device,
                         requires_grad=True)
    shift = torch.zeros(1, dtype=torch.float64, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([scale, shift], lr=ADAM_LR)
    previous = None
    with torch.no_grad():
        for _ in range(ADAM_STEPS):
            residual = scale * p + shift - g
            sign = torch.sign(residual)  # the gradient of |r| autograd gives (0 at 0)
            scale.grad, shift.grad = (sign * p).sum().reshape(1), sign.sum().reshape(1)
            optimizer.step()
            value = residual.abs().sum().item()  # the loss before the step, as published
            if previous is not None and abs(previous - value) < ADAM_TOL:
                break
            previous = value
    return float(scale.item()), float(shift.item())


def _l1_scale(pred: np.ndarray, gt: np.ndarray) -> float:
    """CUT3R's ``align_with_scale``: reweighted least squares of the L1 fit ``s·p ≈ g``."""
    scale = gt.mean() / pred.mean()
    for _ in range(IRLS_STEPS):
        weight = 1.0 / (np.abs(scale * pred - gt) + IRLS_EPS)
        scale = np.sum(weight * pred * gt) / np.sum(weight * pred * pred)
    return float(max(scale, MIN_SCALE))


def align_depth(pred: np.ndarray, gt: np.ndarray, mode: str,
                device: str = "cpu") -> tuple[float, float]:
    """Scale ``s`` and shift ``t`` mapping scored predictions ``pred`` (N,) onto ``gt`` (N,) by
    ``mode`` (``median``, ``scale_shift``, ``scale`` or ``none``; module docstring)."""
    if mode == "median":
        return float(np.median(gt) / np.median(pred)), 0.0
    if mode == "scale_shift":
        return _l1_scale_shift(pred, gt, device)
    if mode == "scale":
        return _l1_scale(pred, gt), 0.0
    return 1.0, 0.0


def depth_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    align: str = "median",
    cap: float | None = None,
    clip: float | None = None,
    device: str = "cpu",
) -> dict:
    """Aligned AbsRel and δ<1.25 of ``pred`` against ``gt`` (see the module docstring).

    Returns ``{"abs_rel", "delta_1.25", "scale", "shift", "pixels"}`` as plain Python numbers;
    ``scale`` is a float, or a list of per-frame floats for ``align="median_per_frame"``.
    ``device`` runs the ``scale_shift`` fit (the published code fits on the GPU).
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
    if cap is not None:
        mask &= gt < cap
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != gt.shape:
            raise UserError(f"valid mask shape {valid.shape} differs from depth shape {gt.shape}")
        mask &= valid
    pixels = int(mask.sum())
    if pixels == 0:
        raise UserError("no valid depth pixels to score (gt > 0 and below the cap, pred > 0, "
                        "both finite, in mask)")

    shift = 0.0
    if align == "median_per_frame":
        scale_map = np.full(pred.shape[0], np.nan)
        for t in range(pred.shape[0]):
            m = mask[t]
            if m.any():
                scale_map[t] = np.median(gt[t][m]) / np.median(pred[t][m])
        scale_out: float | list[float] = [float(v) for v in scale_map]
    else:
        scale, shift = align_depth(pred[mask], gt[mask], align, device)
        scale_map = np.full(pred.shape[0], scale)
        scale_out = scale

    aligned = pred * scale_map[:, None, None] + shift
    d, g = aligned[mask], gt[mask]
    if clip is not None:
        d = np.minimum(d, clip)
    abs_rel = float(np.mean(np.abs(d - g) / g))
    floored = np.maximum(d, DELTA_FLOOR)
    delta = float(np.mean(np.maximum(floored / g, g / floored) < 1.25))
    return {"abs_rel": abs_rel, "delta_1.25": delta, "scale": scale_out, "shift": float(shift),
            "pixels": pixels}


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
