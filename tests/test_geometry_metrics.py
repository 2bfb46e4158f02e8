"""Tests for vggt4d.geometry_metrics against hand-computed numbers and an independent numpy
Umeyama / RPE reference (the references below never call the module under test)."""

import math

import numpy as np
import pytest

from vggt4d.errors import UserError
from vggt4d.geometry_metrics import depth_metrics, pose_difference, pose_metrics

# ------------------------------------------------------------------------------ test helpers


def rot(axis, angle_rad):
    """Rodrigues rotation matrix about ``axis`` by ``angle_rad``."""
    k = np.asarray(axis, dtype=float)
    k = k / np.linalg.norm(k)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle_rad) * kx + (1 - math.cos(angle_rad)) * kx @ kx


def gt_path(n=10):
    """Smooth synthetic camera path: camera-to-world rotations (n,3,3) and centres (n,3)."""
    i = np.arange(n, dtype=float)
    centres = np.stack([2 * np.cos(0.3 * i), 2 * np.sin(0.3 * i), 0.2 * i], axis=1)
    rots = np.stack([rot([0.2, 1.0, 0.1], 0.1 * k) @ rot([1, 0, 0], 0.03 * k) for k in i])
    return rots, centres


def to_w2c(rots_c2w, centres):
    """World-to-camera (n,3,4): R = R_c2wᵀ, t = −R c."""
    r = np.swapaxes(rots_c2w, 1, 2)
    t = -np.einsum("nij,nj->ni", r, centres)
    return np.concatenate([r, t[:, :, None]], axis=2)


def umeyama(x, y):
    """Closed-form Sim(3) with y ≈ s R x + t (x, y: (n,3)). Returns s, R, t."""
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    cov = yc.T @ xc / len(x)
    u, d, vt = np.linalg.svd(cov)
    sign = np.eye(3)
    sign[2, 2] = np.sign(np.linalg.det(u) * np.linalg.det(vt))
    r = u @ sign @ vt
    s = np.trace(np.diag(d) @ sign) / (np.sum(xc**2) / len(x))
    return s, r, my - s * r @ mx


def se3(r, c):
    """4×4 pose from a rotation and a translation."""
    p = np.eye(4)
    p[:3, :3], p[:3, 3] = r, c
    return p


def angle_deg(r):
    return math.degrees(math.acos(np.clip((np.trace(r) - 1) / 2, -1, 1)))


def reference_pose_errors(pred_rots, pred_centres, gt_rots, gt_centres):
    """Independent ATE / RPE (consecutive frames) after Sim(3) of pred onto gt, plain numpy."""
    s, r, t = umeyama(pred_centres, gt_centres)
    aligned_c = (s * (r @ pred_centres.T)).T + t
    aligned_r = r @ pred_rots
    ate = math.sqrt(np.mean(np.sum((aligned_c - gt_centres) ** 2, axis=1)))

    gt = [se3(rr, c) for rr, c in zip(gt_rots, gt_centres, strict=True)]
    pr = [se3(rr, c) for rr, c in zip(aligned_r, aligned_c, strict=True)]
    trans_err, rot_err = [], []
    for i in range(len(gt) - 1):
        g_rel = np.linalg.inv(gt[i]) @ gt[i + 1]
        p_rel = np.linalg.inv(pr[i]) @ pr[i + 1]
        e = np.linalg.inv(g_rel) @ p_rel
        trans_err.append(np.linalg.norm(e[:3, 3]))
        rot_err.append(angle_deg(e[:3, :3]))
    return {
        "ate": ate,
        "rpe_trans": math.sqrt(np.mean(np.square(trans_err))),
        "rpe_rot_deg": math.sqrt(np.mean(np.square(rot_err))),
        "scale": s,
    }


# ------------------------------------------------------------------------------------ depth


def test_depth_exact_multiple_scale_0_4():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 10.0, size=(3, 8, 9))
    out = depth_metrics(2.5 * gt, gt)
    assert out["scale"] == pytest.approx(0.4, abs=1e-12)
    assert out["abs_rel"] == pytest.approx(0.0, abs=1e-12)
    assert out["delta_1.25"] == 1.0
    assert out["pixels"] == 3 * 8 * 9
    assert all(type(out[k]) is float for k in ("abs_rel", "delta_1.25", "scale"))
    assert type(out["pixels"]) is int


def test_depth_planted_errors_hand_computed():
    # gt = 2 everywhere; pred = 2.5·gt·f with f = 0.9 on 10 %, 1.0 on 50 %, 1.5 on 40 % of pixels.
    # Sorted pred: the median lies in the f = 1 group, so s = 2 / (2.5·2) = 0.4 and s·pred = gt·f.
    # abs_rel = 0.1·|0.9−1| + 0.5·0 + 0.4·|1.5−1| = 0.01 + 0.2 = 0.21
    # delta:  f = 0.9 → max ratio 1/0.9 ≈ 1.11 < 1.25 passes; f = 1 passes; 1.5 fails → 0.6
    factors = np.array([0.9] * 20 + [1.0] * 100 + [1.5] * 80)
    np.random.default_rng(1).shuffle(factors)
    gt = np.full((2, 10, 10), 2.0)
    pred = 2.5 * gt * factors.reshape(2, 10, 10)
    out = depth_metrics(pred, gt)
    assert out["scale"] == pytest.approx(0.4, abs=1e-12)
    assert out["abs_rel"] == pytest.approx(0.21, abs=1e-12)
    assert out["delta_1.25"] == pytest.approx(0.6, abs=1e-12)
    assert out["pixels"] == 200


def test_depth_global_vs_per_frame_vs_none():
    # gt = 2; frame 0 pred = 4, frame 1 pred = 8 (equal pixel counts).
    gt = np.full((2, 4, 5), 2.0)
    pred = np.stack([np.full((4, 5), 4.0), np.full((4, 5), 8.0)])
    # global: median(pred) = (4 + 8)/2 = 6 → s = 1/3; aligned 4/3 and 8/3 vs 2:
    # abs_rel = (|4/3−2|/2 + |8/3−2|/2)/2 = 1/3; ratios 1.5 and 4/3 both ≥ 1.25 → delta 0
    g = depth_metrics(pred, gt, align="median")
    assert g["scale"] == pytest.approx(1 / 3)
    assert g["abs_rel"] == pytest.approx(1 / 3)
    assert g["delta_1.25"] == 0.0
    # per frame: s = [0.5, 0.25] → exact
    f = depth_metrics(pred, gt, align="median_per_frame")
    assert f["scale"] == pytest.approx([0.5, 0.25])
    assert f["abs_rel"] == pytest.approx(0.0, abs=1e-12)
    assert f["delta_1.25"] == 1.0
    # none: abs_rel = (|4−2|/2 + |8−2|/2)/2 = 2, delta 0
    n = depth_metrics(pred, gt, align="none")
    assert n["scale"] == 1.0
    assert n["abs_rel"] == pytest.approx(2.0)
    assert n["delta_1.25"] == 0.0


def test_depth_valid_mask_respected():
    rng = np.random.default_rng(2)
    gt = rng.uniform(1.0, 5.0, size=(2, 6, 6))
    pred = 3.0 * gt
    pred[:, :2, :] = 1000.0  # garbage rows, masked out below
    valid = np.ones(gt.shape, dtype=bool)
    valid[:, :2, :] = False
    out = depth_metrics(pred, gt, valid)
    assert out["pixels"] == 2 * 4 * 6
    assert out["scale"] == pytest.approx(1 / 3)
    assert out["abs_rel"] == pytest.approx(0.0, abs=1e-12)
    assert out["delta_1.25"] == 1.0
    # without the mask the garbage counts
    assert depth_metrics(pred, gt)["abs_rel"] > 1.0


def test_depth_default_mask_drops_invalid_gt_and_pred():
    gt = np.full((1, 3, 3), 2.0)
    pred = np.full((1, 3, 3), 5.0)
    gt[0, 0, 0] = 0.0
    gt[0, 0, 1] = np.nan
    pred[0, 0, 2] = np.inf
    pred[0, 1, 0] = -1.0
    out = depth_metrics(pred, gt)
    assert out["pixels"] == 5
    assert out["abs_rel"] == pytest.approx(0.0, abs=1e-12)
    assert out["scale"] == pytest.approx(0.4)


def test_depth_errors():
    with pytest.raises(UserError, match="resize"):
        depth_metrics(np.ones((2, 4, 4)), np.ones((2, 4, 5)))
    with pytest.raises(UserError):
        depth_metrics(np.ones((2, 4, 4)), np.ones((2, 4, 4)), align="mean")
    with pytest.raises(UserError):
        depth_metrics(np.ones((2, 4, 4)), np.zeros((2, 4, 4)))


# ------------------------------------------------------------------------------------ poses


def test_pose_metrics_similarity_transform_is_zero_error():
    rots, centres = gt_path(10)
    a, q, b = 3.7, rot([0.3, -0.5, 0.8], 1.1), np.array([4.0, -2.0, 7.5])
    # world-space similarity X' = a·Q·X + b: c2w rotations Q·R, centres a·Q·c + b
    pred_rots = q @ rots
    pred_centres = (a * (q @ centres.T)).T + b
    out = pose_metrics(to_w2c(pred_rots, pred_centres), to_w2c(rots, centres))
    assert out["ate"] < 1e-6
    assert out["rpe_trans"] < 1e-6
    assert out["rpe_rot_deg"] < 1e-6
    # alignment maps prediction units onto ground truth units: 1/3.7, not 3.7
    assert out["sim3_scale"] == pytest.approx(1 / 3.7, rel=1e-9)
    assert set(out) == {"ate", "rpe_trans", "rpe_rot_deg", "sim3_scale"}
    assert all(type(v) is float for v in out.values())


def test_pose_metrics_translation_noise_matches_numpy_umeyama():
    rots, centres = gt_path(10)
    i = np.arange(10)
    noise = 0.05 * np.stack([np.sin(1.7 * i), np.cos(2.3 * i), (-1.0) ** i], axis=1)
    q, a, b = rot([1, 2, 3], 0.4), 0.6, np.array([1.0, 0.5, -3.0])
    pred_rots = q @ rots
    pred_centres = (a * (q @ (centres + noise).T)).T + b
    out = pose_metrics(to_w2c(pred_rots, pred_centres), to_w2c(rots, centres))
    ref = reference_pose_errors(pred_rots, pred_centres, rots, centres)
    assert ref["ate"] > 0.01  # the noise is visible
    assert out["ate"] == pytest.approx(ref["ate"], abs=1e-6)
    assert out["sim3_scale"] == pytest.approx(ref["scale"], abs=1e-6)
    assert out["rpe_trans"] == pytest.approx(ref["rpe_trans"], abs=1e-6)
    assert out["rpe_rot_deg"] == pytest.approx(0.0, abs=1e-6)  # rotations untouched


def test_pose_metrics_planted_relative_rotation():
    rots, centres = gt_path(10)
    n = len(rots)
    # pred: chain the GT relative motions, with an extra 2° rotation (no translation) appended
    # to step k. The error of step k is then exactly that rotation (angle 2°) and every other
    # step has zero rotation error; the rotation part of the RPE does not depend on the Sim(3)
    # alignment, so RPE_rot = sqrt(2² / (n−1)) degrees.
    k, extra = 4, rot([0.3, 0.4, 1.0], math.radians(2.0))
    gt_poses = [se3(r, c) for r, c in zip(rots, centres, strict=True)]
    pred_poses = [gt_poses[0]]
    for i in range(n - 1):
        rel = np.linalg.inv(gt_poses[i]) @ gt_poses[i + 1]
        if i == k:
            rel = rel @ se3(extra, np.zeros(3))
        pred_poses.append(pred_poses[-1] @ rel)
    pred_rots = np.stack([p[:3, :3] for p in pred_poses])
    pred_centres = np.stack([p[:3, 3] for p in pred_poses])

    out = pose_metrics(to_w2c(pred_rots, pred_centres), to_w2c(rots, centres))
    expected = math.sqrt(2.0**2 / (n - 1))
    assert out["rpe_rot_deg"] == pytest.approx(expected, abs=1e-6)
    ref = reference_pose_errors(pred_rots, pred_centres, rots, centres)
    assert ref["rpe_rot_deg"] == pytest.approx(expected, abs=1e-6)
    assert out["rpe_trans"] == pytest.approx(ref["rpe_trans"], abs=1e-6)
    assert out["ate"] == pytest.approx(ref["ate"], abs=1e-6)
    assert out["ate"] > 1e-3  # the extra rotation bends the later path


def test_pose_metrics_needs_three_frames():
    rots, centres = gt_path(2)
    w2c = to_w2c(rots, centres)
    with pytest.raises(UserError, match="at least 3 frames"):
        pose_metrics(w2c, w2c)


def test_pose_metrics_bad_inputs():
    rots, centres = gt_path(5)
    w2c = to_w2c(rots, centres)
    with pytest.raises(UserError):
        pose_metrics(w2c[:4], w2c)
    with pytest.raises(UserError):
        pose_metrics(w2c[:, :3, :3], w2c)
    line = np.stack([np.zeros(5), np.zeros(5), np.arange(5.0)], axis=1)  # collinear centres
    with pytest.raises(UserError, match="degenerate"):
        pose_metrics(to_w2c(rots, line), to_w2c(rots, line))


# ---------------------------------------------------------------------------- pose difference


def test_pose_difference_identical_is_zero():
    rots, centres = gt_path(6)
    w2c = to_w2c(rots, centres)
    out = pose_difference(w2c, w2c)
    assert out["rotation_deg"] == pytest.approx([0.0] * 6, abs=1e-6)
    assert out["translation"] == pytest.approx([0.0] * 6, abs=1e-9)
    assert out["mean_rotation_deg"] == pytest.approx(0.0, abs=1e-6)
    assert out["mean_translation"] == pytest.approx(0.0, abs=1e-9)


def test_pose_difference_planted_rotation_and_shift():
    rots, centres = gt_path(6)
    w2c_b = to_w2c(rots, centres)
    rz = rot([0, 0, 1], math.radians(5.0))
    # R_a (w2c) = Rz · R_b (w2c) so R_a R_bᵀ = Rz(5°); centres moved 0.3 in per-frame directions
    dirs = np.random.default_rng(3).normal(size=(6, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    r_a = rz @ w2c_b[:, :, :3]
    c_a = centres + 0.3 * dirs
    t_a = -np.einsum("nij,nj->ni", r_a, c_a)
    w2c_a = np.concatenate([r_a, t_a[:, :, None]], axis=2)
    out = pose_difference(w2c_a, w2c_b)
    assert out["rotation_deg"] == pytest.approx([5.0] * 6, abs=1e-9)
    assert out["translation"] == pytest.approx([0.3] * 6, abs=1e-12)
    assert out["mean_rotation_deg"] == pytest.approx(5.0, abs=1e-9)
    assert out["mean_translation"] == pytest.approx(0.3, abs=1e-12)
