"""4-D scene tokens: the clip's points → voxels → per-voxel aggregates and PTv3 (Concerto) features.

Steps (Concerto's default transform, docs/method.md, applied once to the whole clip):

1. CenterShift: ``X_enc = X_scene − shift`` with ``shift`` = the bounding box centre in x, y and
   the minimum in z over *all* frames (per-frame shifts would make cross-frame distances
   meaningless: the research scripts' defect 7 in docs/method.md §11).
2. GridSample (:mod:`vggt4d.gridsample`): ``coord = floor(X_enc / g) − min`` (integer voxel
   coordinates, the research scripts' defect 6), keys hashed with ``latent.hash``. With
   ``latent.dynamic_voxels`` the dynamic points are keyed by ``(x, y, z, b)`` with time bin
   ``b = 1 + ⌊t / time_bin⌋`` and static ones by ``(x, y, z, 0)``: a moving object's tokens keep
   their time, the background does not grow with the number of frames.
3. Per voxel ``v`` with member points ``P_v`` (:func:`aggregate`): ``count``, mean position and
   colour, first/last frame, number of distinct frames, the fraction of dynamic members, and the
   mean time and camera embeddings, ``mean_{p ∈ P_v} e(t_p)`` (computed from the (voxel, frame)
   histogram, so it costs O(pairs), not O(points · D)).
4. Geometry features: the PTv3 encoder on the *spatial* voxels (one Pointcept train-mode point per
   voxel: feat = ``[X_enc, rgb/255, normal]``), the chosen levels brought back to the voxels
   through the pooling chain (:func:`vggt4d.ptv3.model.features_at_input`). A token of
   ``(x, y, z, b)`` takes the features of its spatial voxel ``(x, y, z)``.

Embeddings (defaults reproduce the AnyDynamics token script, docs/method.md):

* ``time_emb``, width ``D = time_dim`` (even): ``t = i / (T − 1)``,
  ``[sin ω₀t, cos ω₀t, sin ω₁t, cos ω₁t, …]`` with ``ω_k = 10^{2 − 3k / (D/2 − 1)}``,
  i.e. ω = 100, 10, 1, 0.1 for D = 8 (D = 2: ω = 100).
* ``cam_emb``: ``c2w`` (16-D): the 12 entries of camera-to-world ``[R | C]`` row-major, zero-padded
  to 16; ``centre_direction_fov`` (8-D): ``[C, R e_z, fov_x, fov_y]`` (camera centre, unit
  viewing direction, fields of view in radians). In the encoder frame ``X_enc`` of the tokens'
  positions (``camera_frame=encoder``), or in DA3's world (``camera_frame=world``: the token
  script's ``inverse(w2c)``, whose translation ignores the centre shift of its points).
Averaged sin/cos codes are mixtures, not unit vectors (defect 8): ``first_frame``,
``last_frame``, ``frames_seen`` and ``count`` sit beside them so a decoder can tell a static voxel
from a moving one.

Long videos (:func:`scene_latent_blocks`, what the stage runs): the points come a block of
frames at a time (:class:`vggt4d.points.ClipPoints`), in the common world of the prediction
(a chunked prediction is already in the first chunk's world). A first pass measures the centre
shift and the grid's extent over every voxelised point; a second groups each block's points into
voxels and merges them into the clip's table (keys in uint64 order, sums added, first/last frame
by min/max, the encoder's candidate member by the largest random priority); a third locates every
kept pixel's token. Memory follows the number of voxels, not of frames, and the encoder runs once
on the final voxels. The result is the same as grouping all points at once (one block), down to
the random draws (``torch.rand`` on the CPU gives the same numbers in pieces as at once;
checked in the tests).
"""

from __future__ import annotations

import functools
import json
import logging
import pickle
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vggt4d.cameras import camera_to_world
from vggt4d.config.latent import Encoder, LatentConfig, SaveDtype
from vggt4d.errors import UserError
from vggt4d.gridsample import (
    Voxels,
    cell_index,
    fnv_hash,
    group_by_key,
    ravel_hash,
    unsigned_order,
    voxelize,
)
from vggt4d.io import atomic_write, write_json
from vggt4d.points import PointCloud, ScenePoints
from vggt4d.stage import Stage

log = logging.getLogger(__name__)

OUTPUT = "scene_latent.pt"
PLY = "scene_latent.ply"
REPORT = "latent.json"
CAMERA_EMBEDDINGS = {"c2w": 16, "centre_direction_fov": 8}
FORMAT_VERSION = 1
"""``scene_latent.pt``'s ``format_version``: raised whenever a key changes meaning."""
SAVE_DTYPES = {SaveDtype.fp16: torch.float16, SaveDtype.fp32: torch.float32}


# ------------------------------------------------------------------------------------------
# embeddings
# ------------------------------------------------------------------------------------------


def time_frequencies(dim: int) -> Tensor:
    """(dim/2,) float64 ``ω_k = 10^{2 − 3k / (dim/2 − 1)}`` (100, 10, 1, 0.1 for dim 8)."""
    pairs = dim // 2
    if pairs == 1:
        return torch.tensor([100.0], dtype=torch.float64)
    return 10.0 ** (2.0 - 3.0 * torch.arange(pairs, dtype=torch.float64) / (pairs - 1))


def time_embedding(times: Tensor, dim: int) -> Tensor:
    """(F,) times in [0, 1] → (F, dim) float64 ``[sin ω₀t, cos ω₀t, sin ω₁t, …]``."""
    angles = times.double()[:, None] * time_frequencies(dim)[None, :]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(len(times), dim)


def frame_times(num_frames: int) -> Tensor:
    """(T,) ``t = i / (T − 1)`` (0 for a single frame)."""
    return torch.arange(num_frames, dtype=torch.float64) / max(num_frames - 1, 1)


def camera_embedding(c2w: np.ndarray, intrinsics: np.ndarray, image_size: tuple[int, int],
                     kind: str) -> Tensor:
    """(T, 3, 4) camera-to-world, (T, 3, 3) K, (H, W) → (T, D_cam) float64.

    ``c2w``: the 12 entries of ``c2w`` row-major, zero-padded to 16. ``centre_direction_fov``:
    ``[C, R e_z, 2 atan(W / 2f_x), 2 atan(H / 2f_y)]``.
    """
    c2w = torch.as_tensor(c2w, dtype=torch.float64)
    if kind == "c2w":
        flat = c2w.reshape(len(c2w), 12)
        return torch.cat([flat, flat.new_zeros(len(c2w), 4)], dim=1)
    k_mats = torch.as_tensor(intrinsics, dtype=torch.float64)
    height, width = image_size
    fov = torch.stack([2 * torch.atan(width / (2 * k_mats[:, 0, 0])),
                       2 * torch.atan(height / (2 * k_mats[:, 1, 1]))], dim=1)
    return torch.cat([c2w[:, :, 3], c2w[:, :, 2], fov], dim=1)


# ------------------------------------------------------------------------------------------
# voxels
# ------------------------------------------------------------------------------------------


def center_shift(coord: Tensor) -> Tensor:
    """(N, 3) → (3,) Concerto's CenterShift: bbox centre in x and y, minimum in z."""
    low, high = coord.amin(dim=0), coord.amax(dim=0)
    centre = (low + high) / 2
    return torch.stack([centre[0], centre[1], low[2]])


def time_bins(frame: Tensor, dynamic: Tensor, time_bin: int) -> Tensor:
    """(N,) ``1 + ⌊t / time_bin⌋`` for dynamic points, 0 for static ones."""
    return torch.where(dynamic, 1 + torch.div(frame, time_bin, rounding_mode="floor"), 0)


@dataclass
class TokenGrid:
    """Voxels (their ``keys`` and ``grid_coord``), and how to find the voxel of any point."""

    voxels: Voxels
    cell_min: Tensor  # (3,) int64 floor(X_enc / g) of grid coordinate 0
    bins: Tensor | None  # (V,) time bin of each voxel (dynamic_voxels), else None


def locate(grid: TokenGrid, coord: Tensor, grid_size: float, hash_type: str,
           frame: Tensor | None = None, dynamic: Tensor | None = None,
           time_bin: int = 1) -> Tensor:
    """(N,) voxel of each (N, 3) point in ``grid``, −1 when its cell holds no voxel.

    The point's cell ``floor(X / g) − cell_min`` (and bin) is hashed as the voxels' keys were,
    found among the voxel keys by binary search in their unsigned order, and accepted only when
    the voxel's grid coordinate equals the cell (so hash collisions and cells outside the grid
    give −1). A ravel key depends on the grid's extent, so ravel grids are located by fnv keys
    of the same cells.
    """
    voxels = grid.voxels
    cells = cell_index(coord, grid_size) - grid.cell_min
    bins = None if grid.bins is None else time_bins(frame, dynamic, time_bin)
    voxel_cells = voxels.grid_coord
    if grid.bins is not None:
        cells = torch.cat([cells, bins[:, None]], dim=1)
        voxel_cells = torch.cat([voxel_cells, grid.bins[:, None]], dim=1)
    if hash_type == "fnv":
        sorted_keys, position = unsigned_order(voxels.keys), torch.arange(len(voxels.keys))
    else:
        keys = unsigned_order(fnv_hash(voxel_cells))
        sorted_keys, position = torch.sort(keys)
    query = unsigned_order(fnv_hash(cells))
    slot = torch.searchsorted(sorted_keys, query).clamp(max=len(sorted_keys) - 1)
    found = position.to(slot.device)[slot]
    hit = (sorted_keys[slot] == query) & (voxel_cells[found] == cells).all(dim=1)
    return torch.where(hit, found, -1)


@dataclass
class VoxelAggregates:
    """Per-voxel statistics of the member points (V voxels)."""

    count: Tensor  # (V,) int64
    position: Tensor  # (V, 3) float32 mean encoder-frame position
    color: Tensor  # (V, 3) float32 mean RGB in [0, 1]
    first_frame: Tensor  # (V,) int64
    last_frame: Tensor  # (V,) int64
    frames_seen: Tensor  # (V,) int64 distinct frames among the members
    dynamic: Tensor  # (V,) float32 fraction of dynamic members
    dynamic_prob: Tensor  # (V,) float32 mean soft dynamic probability
    time_emb: Tensor  # (V, D_time) float32 mean time embedding
    cam_emb: Tensor  # (V, D_cam) float32 mean camera embedding


def _segment_sums(values: Tensor, order: Tensor, lengths: Tensor) -> Tensor:
    """(S, C) float64 sums of the rows of ``values`` (N, C) taken in ``order`` (N,) and cut
    into consecutive segments of ``lengths`` (S,): no atomics, so the same bits on every run."""
    return torch.segment_reduce(values.double()[order], "sum", lengths=lengths, axis=0)


def aggregate(voxels: Voxels, position: Tensor, color: Tensor, frame: Tensor, dynamic: Tensor,
              dynamic_prob: Tensor, time_emb: Tensor, cam_emb: Tensor) -> VoxelAggregates:
    """Per-voxel aggregates of N points grouped in ``voxels`` (their ``order`` and ``counts``):
    ``position`` (N, 3), ``color`` (N, 3) uint8, ``frame`` (N,) int64, ``dynamic`` (N,) bool,
    ``dynamic_prob`` (N,) float; per-frame embeddings ``time_emb`` (T, D_time) and ``cam_emb``
    (T, D_cam).

    Frame-dependent means use the (voxel, frame) histogram:
    ``mean_e(v) = Σ_t n(v, t) e(t) / Σ_t n(v, t)``.
    """
    return finish_aggregates(voxel_sums(voxels, position, color, frame, dynamic, dynamic_prob,
                                        time_emb, cam_emb))


SUMS = ("count", "sums", "frames_seen", "time", "cam")
"""Columns of :func:`voxel_sums` that add up over blocks of points; ``first_frame`` and
``last_frame`` take the minimum and maximum."""


def voxel_sums(voxels: Voxels, position: Tensor, color: Tensor, frame: Tensor,
               dynamic: Tensor, dynamic_prob: Tensor, time_emb: Tensor,
               cam_emb: Tensor) -> dict[str, Tensor]:
    """What :func:`aggregate` divides, per voxel (arguments as there): ``count``, ``sums``
    (V, 8) float64 of ``[position, color / 255, dynamic, dynamic_prob]``, ``first_frame``,
    ``last_frame``, ``frames_seen`` and the (voxel, frame)-histogram sums ``time`` and ``cam``
    of the embeddings; blocks of points with distinct frames combine by adding the
    :data:`SUMS` and taking the min / max of the frames."""
    inverse, count = voxels.inverse, voxels.counts
    num_voxels, num_frames = len(count), len(time_emb)
    pair, pair_count = torch.unique(inverse * num_frames + frame, return_counts=True)
    pair_voxel, pair_frame = pair // num_frames, pair % num_frames  # sorted by voxel
    pairs_per_voxel = torch.bincount(pair_voxel, minlength=num_voxels)
    pair_starts = torch.cumsum(pairs_per_voxel, 0) - pairs_per_voxel
    last_pair = pair_starts + pairs_per_voxel - 1
    per_point = torch.cat([position.double(), color.double() / 255.0,
                           dynamic.double()[:, None], dynamic_prob.double()[:, None]], dim=1)
    weights = pair_count.double()[:, None]
    every_pair = torch.arange(len(pair), device=pair.device)

    def frame_sums(per_frame: Tensor) -> Tensor:
        weighted = weights * per_frame.to(pair.device)[pair_frame]
        return _segment_sums(weighted, every_pair, pairs_per_voxel)

    return {"count": count, "sums": _segment_sums(per_point, voxels.order, count),
            "first_frame": pair_frame[pair_starts], "last_frame": pair_frame[last_pair],
            "frames_seen": pairs_per_voxel, "time": frame_sums(time_emb),
            "cam": frame_sums(cam_emb)}


def finish_aggregates(sums: dict[str, Tensor]) -> VoxelAggregates:
    """:class:`VoxelAggregates` from :func:`voxel_sums` (the means divided out)."""
    count = sums["count"]
    means = (sums["sums"] / count[:, None]).float()
    return VoxelAggregates(
        count=count, position=means[:, 0:3], color=means[:, 3:6],
        first_frame=sums["first_frame"], last_frame=sums["last_frame"],
        frames_seen=sums["frames_seen"], dynamic=means[:, 6], dynamic_prob=means[:, 7],
        time_emb=(sums["time"] / count[:, None]).float(),
        cam_emb=(sums["cam"] / count[:, None]).float())


# ------------------------------------------------------------------------------------------
# encoder
# ------------------------------------------------------------------------------------------


def encoder_overrides(settings: LatentConfig) -> dict[str, object]:
    """Run-time PTv3 config fields set from ``latent.*`` (applied to released weights too)."""
    return {"shuffle_orders": settings.shuffle_orders}


def build_encoder(settings: LatentConfig, device: torch.device):
    """The PTv3 encoder of ``settings`` (released or local weights loaded strictly, or random
    weights drawn from ``settings.seed``), in eval mode on ``device``."""
    from dataclasses import replace

    from vggt4d.ptv3.checkpoint import load_encoder
    from vggt4d.ptv3.model import VARIANTS, PTv3Encoder

    overrides = encoder_overrides(settings)
    if settings.weights != "random":
        return load_encoder(settings.weights, settings.encoder, device, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        encoder = PTv3Encoder(replace(VARIANTS[settings.encoder], **overrides))
    return encoder.to(device).eval()


@torch.inference_mode()
def encode_voxels(encoder, coord: Tensor, grid_coord: Tensor, color: Tensor, normal: Tensor,
                  levels: list[int] | None, seed: int) -> Tensor:
    """PTv3 features of V voxels (one sampled point each): ``coord`` (V, 3) encoder-frame
    positions, ``grid_coord`` (V, 3) int64, ``color`` (V, 3) uint8, ``normal`` (V, 3) →
    (V, C) float32 with feat = ``[coord, color / 255, normal]``."""
    from vggt4d.ptv3.model import features_at_input

    feat = torch.cat([coord, color.float() / 255.0, normal], dim=1)
    generator = torch.Generator().manual_seed(seed)  # the curve-order shuffles draw on the CPU
    levels_out = encoder(coord, grid_coord, feat, generator=generator)
    return features_at_input(levels_out, levels).float()


# ------------------------------------------------------------------------------------------
# the whole computation and its files
# ------------------------------------------------------------------------------------------


@dataclass
class SceneLatent:
    """Everything written to ``scene_latent.pt`` (see :meth:`to_dict` for the file's keys)."""

    geo_feat: Tensor  # (V, C); C = 0 with encoder none
    coord: Tensor  # (V, 3) int64 voxel coordinates
    aggregates: VoxelAggregates
    time_bin: Tensor | None  # (V,) 0 static, 1 + ⌊t / time_bin⌋ dynamic (dynamic_voxels)
    pixel_voxel: Tensor  # (T, H, W) int32 voxel of every pixel, −1 filtered / not in a voxel
    world_to_grid: Tensor  # (4, 4) float64: voxel = floor((world_to_grid @ [X, 1])[:3])
    world_to_enc: Tensor  # (4, 4) float64: X_enc = s R_up X_world − shift
    c2w: Tensor  # (T, 3, 4) float64 cameras in the encoder frame
    intrinsics: Tensor  # (T, 3, 3) float64 pinhole K in pixels of the (H, W) prediction
    meta: dict = field(default_factory=dict)

    def to_dict(self, dtype: torch.dtype) -> dict:
        """The file's content; every tensor in its own compact storage (``torch.save`` writes
        whole storages: views or over-allocated outputs would add stray bytes)."""
        agg = self.aggregates
        floats = {"geo_feat": self.geo_feat, "color": agg.color, "time_emb": agg.time_emb,
                  "cam_emb": agg.cam_emb}
        exact = {"coord": self.coord, "position": agg.position, "counts": agg.count,
                 "first_frame": agg.first_frame, "last_frame": agg.last_frame,
                 "frames_seen": agg.frames_seen, "dynamic": agg.dynamic,
                 "dynamic_prob": agg.dynamic_prob, "time_bin": self.time_bin,
                 "pixel_voxel": self.pixel_voxel, "world_to_grid": self.world_to_grid,
                 "world_to_enc": self.world_to_enc, "c2w": self.c2w,
                 "intrinsics": self.intrinsics}
        for key, value in {**floats, **exact}.items():
            refuse_non_finite(key, value)
        tensors = {**{key: storable(key, value, dtype) for key, value in floats.items()},
                   **exact}
        return {**{key: None if value is None else _compact(value)
                   for key, value in tensors.items()},
                "grid_size": self.meta["grid_size"], "num_frames": self.meta["num_frames"],
                "format_version": FORMAT_VERSION,
                "meta": json.loads(json.dumps(self.meta))}  # plain types: weights_only loads


def _compact(values: Tensor) -> Tensor:
    """``values`` in a storage of exactly its own bytes (a copy unless it already is one: a
    memory-mapped ``pixel_voxel`` of a long video is written without being read into memory)."""
    if (values.is_contiguous() and values.storage_offset() == 0
            and values.untyped_storage().nbytes() == values.numel() * values.element_size()):
        return values
    return values.clone(memory_format=torch.contiguous_format)


def refuse_non_finite(name: str, values: Tensor | None) -> None:
    """Raise :class:`UserError` naming the tensor and where, when ``values`` holds NaN or inf
    (rows are tokens for (V, C) tensors)."""
    if values is None or not values.is_floating_point():
        return
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        rows = bad.reshape(len(values), -1).any(dim=1) if values.ndim else bad.reshape(1)
        raise UserError(f"scene_latent.pt not written: {name} holds {int(bad.sum())} NaN/inf "
                        f"values in {int(rows.sum())} of {len(rows)} rows (first: row "
                        f"{int(rows.nonzero()[0, 0])}); check latent.weights (an encoder "
                        f"checkpoint that overflows) and the prediction")


def storable(name: str, values: Tensor, dtype: torch.dtype) -> Tensor:
    """``values`` in ``dtype``, or kept in float32 with a warning when ``dtype`` cannot hold
    them (fp16 overflows beyond ±65504 to inf)."""
    converted = values.to(dtype)
    if bool(torch.isfinite(converted).all()):
        return converted
    log.warning("scene_latent.pt: %s exceeds %s's range (max |x| = %.3g); saved in float32",
                name, str(dtype).removeprefix("torch."), float(values.abs().max()))
    return values.float()


def affine(matrix_3x3: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """(4, 4) homogeneous matrix of ``X ↦ M X + o``."""
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = matrix_3x3, offset
    return out


def cameras_in_frame(extrinsics: np.ndarray, similarity: np.ndarray, scale: float) -> np.ndarray:
    """(T, 3, 4) world-to-camera → (T, 3, 4) camera-to-world ``[R' | C']`` in the frame
    ``X' = similarity @ [X, 1]`` (``similarity[:3, :3] = scale · rotation``)."""
    c2w = camera_to_world(extrinsics)
    rotation = similarity[:3, :3] / scale
    rot = np.einsum("ij,tjk->tik", rotation, c2w[:, :, :3])
    centre = c2w[:, :, 3] @ similarity[:3, :3].T + similarity[:3, 3]
    return np.concatenate([rot, centre[:, :, None]], axis=2)


def scene_latent(cloud: PointCloud, extrinsics: np.ndarray, intrinsics: np.ndarray,
                 settings: LatentConfig, device: torch.device, encoder=None,
                 max_per_frame: int = 0, subsample_seed: int = 0) -> SceneLatent:
    """Tokens of a point cloud held in memory: :func:`scene_latent_blocks` with one block."""
    return scene_latent_blocks(lambda normals=None: iter([cloud.points]), cloud.num_frames,
                               cloud.kept.shape[1:], extrinsics, intrinsics,
                               cloud.world_to_scene, cloud.scale, cloud.scale_mode, settings,
                               device, encoder, max_per_frame, subsample_seed)


# ------------------------------------------------------------------------------------------
# tokens built block by block
# ------------------------------------------------------------------------------------------


@dataclass
class VoxelTable:
    """Voxels in the order of their keys read as uint64, with per-voxel ``columns``
    (leading dimension V), combined block by block by :func:`merge_tables`."""

    keys: Tensor  # (V,) int64 holding uint64 bit patterns
    columns: dict[str, Tensor]


TOKEN_COLUMNS = {**dict.fromkeys(SUMS, "sum"), "first_frame": "amin", "last_frame": "amax",
                 "grid_coord": "first", "bin": "first"}
"""How token columns combine: added, smallest, largest, or the earlier block's (its first
member's)."""
PICK_COLUMNS = {"priority": "amax", "grid_coord": "first", "coord": "winner", "color": "winner",
                "normal": "winner"}
"""Encoder input per spatial voxel: the member with the largest priority wins (:data:`winner`
columns follow ``priority``)."""


def merge_tables(earlier: VoxelTable | None, later: VoxelTable,
                 rules: dict[str, str]) -> VoxelTable:
    """Union of two tables' voxels, each column combined by its rule (``sum``, ``amin``,
    ``amax``, ``first``: the earlier table's, ``winner``: the row with the larger
    ``priority``). Every key appears at most once per table, so a sum is ``a + b`` whatever
    the order of the additions: the result has the same bits on every run and device."""
    if earlier is None:
        return later
    keys = torch.cat([earlier.keys, later.keys])
    ordered, position = torch.sort(unsigned_order(keys), stable=True)
    unique, inverse_sorted = torch.unique_consecutive(ordered, return_inverse=True)
    inverse = torch.empty_like(inverse_sorted)
    inverse[position] = inverse_sorted
    rows = (inverse[:len(earlier.keys)], inverse[len(earlier.keys):])
    size = len(unique)
    columns: dict[str, Tensor] = {}
    for name, rule in rules.items():
        if name not in later.columns:
            continue
        parts = (earlier.columns[name], later.columns[name])
        out = parts[0].new_zeros((size, *parts[0].shape[1:]))
        if rule == "sum":
            for where, part in zip(rows, parts, strict=True):
                out.index_add_(0, where, part)
        elif rule in ("amin", "amax"):
            out.scatter_reduce_(0, inverse, torch.cat(parts), rule, include_self=False)
        elif rule == "first":
            out[rows[1]] = parts[1]
            out[rows[0]] = parts[0]
        columns[name] = out
    for name, rule in rules.items():
        if rule != "winner" or name not in later.columns:
            continue
        parts = (earlier.columns[name], later.columns[name])
        out = parts[0].new_zeros((size, *parts[0].shape[1:]))
        for where, part, table in zip(rows, parts, (earlier, later), strict=True):
            wins = table.columns["priority"] == columns["priority"][where]
            out[where[wins]] = part[wins]
        columns[name] = out
    return VoxelTable(unsigned_order(unique), columns)


@dataclass(frozen=True)
class GridFrame:
    """Where a clip's tokens lie, from all its voxelised points: the encoder frame's centre
    shift (3,), the cell of grid coordinate 0 (3,) and every key column's smallest and largest
    value (2, 3 or 4: the time bin last), which ravel keys depend on."""

    shift: Tensor
    cell_min: Tensor
    corners: Tensor
    points: int
    voxelised: int


def grid_frame(blocks, settings: LatentConfig, max_per_frame: int,
               subsample_seed: int) -> GridFrame:
    """Measure :class:`GridFrame` over the points ``blocks(normals=False)`` yields (the first
    pass); refuses an extent the PTv3 grid cannot hold, as :func:`vggt4d.gridsample.group`
    does."""
    rng = np.random.default_rng(subsample_seed)
    low, high = np.full(3, np.inf, np.float32), np.full(3, -np.inf, np.float32)
    bins = [np.iinfo(np.int64).max, np.iinfo(np.int64).min]
    points = voxelised = 0
    for block in blocks(normals=False):
        built = block.subsample(max_per_frame, rng)
        points, voxelised = points + len(block), voxelised + len(built)
        if not len(built):
            continue
        low, high = np.minimum(low, built.coord.min(0)), np.maximum(high, built.coord.max(0))
        if settings.dynamic_voxels:
            block_bins = time_bins(torch.from_numpy(built.frame), torch.from_numpy(built.dynamic),
                                   settings.time_bin)
            bins = [min(bins[0], int(block_bins.min())), max(bins[1], int(block_bins.max()))]
    if not voxelised:
        raise UserError("scene tokens: no point to voxelise (points.max_per_frame=0 keeps all; "
                        "check the points.* filters)")
    if voxelised >= 2**32:
        raise UserError(f"scene tokens: {voxelised} points exceed 2**32 - 1; set "
                        f"points.max_per_frame")
    extremes = torch.from_numpy(np.stack([low, high])).double()
    shift = center_shift(extremes)
    enc = extremes - shift
    voxelize(enc, settings.grid_size)  # the extent check of every grid sample
    cell_min = cell_index(enc[:1], settings.grid_size)[0]
    corners = torch.stack([torch.zeros(3, dtype=torch.int64),
                           cell_index(enc[1:], settings.grid_size)[0] - cell_min])
    if settings.dynamic_voxels:
        corners = torch.cat([corners, torch.tensor(bins)[:, None]], dim=1)
    return GridFrame(shift, cell_min, corners, points, voxelised)


def token_keys(cells: Tensor, hash_type: str, corners: Tensor) -> Tensor:
    """(N, D) int64 key columns → (N,) keys: FNV of the columns, or their row-major ravel over
    the clip's extent ``corners`` (2, D) (the same key :func:`vggt4d.gridsample.ravel_hash`
    gives when every point of the clip is hashed at once)."""
    if hash_type == "fnv":
        return fnv_hash(cells)
    return ravel_hash(torch.cat([cells, corners.to(cells.device)]))[:-2]


def _pick_table(voxels: Voxels, enc: Tensor, color: Tensor, normal: Tensor,
                generator: torch.Generator, offset: int) -> VoxelTable:
    """One candidate member per voxel for the encoder: every point draws ``r`` in [0, 1)
    (float32) and has priority ``bits(r) · 2³² + i`` with ``i`` its index in the clip's
    voxelised points (from ``offset``); the largest wins, as in
    :func:`vggt4d.gridsample.sample_train` — whose draw and pick these are for a clip of one
    block."""
    inverse = voxels.inverse.cpu()
    draw = torch.rand(len(inverse), generator=generator, dtype=torch.float32).view(torch.int32)
    priority = torch.arange(offset, offset + len(inverse)).add_(draw.long(), alpha=2**32)
    best = torch.full((len(voxels.keys),), -1, dtype=torch.int64)
    best.scatter_reduce_(0, inverse, priority, "amax")
    member = (best.bitwise_and(2**32 - 1) - offset).to(enc.device)
    return VoxelTable(voxels.keys, {"priority": best.to(enc.device),
                                    "grid_coord": voxels.grid_coord, "coord": enc[member],
                                    "color": color[member], "normal": normal[member]})


def _block_tables(built: ScenePoints, frame: GridFrame, settings: LatentConfig,
                  device: torch.device, time_emb: Tensor, cam_emb: Tensor,
                  picks: torch.Generator | None, offset: int
                  ) -> tuple[VoxelTable, VoxelTable | None]:
    """The token table of one block's voxelised points and, with an encoder (``picks``: its
    generator), the spatial voxels' candidate members."""
    pts = {name: torch.from_numpy(getattr(built, name)).to(device)
           for name in ("coord", "color", "normal", "frame", "dynamic", "dynamic_prob")}
    enc = pts["coord"].double() - frame.shift.to(device)
    cells = (torch.floor(enc / settings.grid_size)
             - frame.cell_min.to(device).double()).long()
    spatial_corners = frame.corners[:, :3]
    no_min = torch.zeros(3, dtype=enc.dtype, device=device)
    if settings.dynamic_voxels:
        bins = time_bins(pts["frame"], pts["dynamic"], settings.time_bin)
        key = token_keys(torch.cat([cells, bins[:, None]], dim=1), settings.hash, frame.corners)
    else:
        bins, key = None, token_keys(cells, settings.hash, spatial_corners)
    voxels = group_by_key(key, cells, no_min)
    columns = voxel_sums(voxels, enc, pts["color"], pts["frame"], pts["dynamic"],
                         pts["dynamic_prob"], time_emb, cam_emb)
    columns["grid_coord"] = voxels.grid_coord
    if bins is not None:
        columns["bin"] = bins[voxels.order[voxels.starts]]
    tokens = VoxelTable(voxels.keys, columns)
    if picks is None:
        return tokens, None
    spatial = voxels if bins is None else group_by_key(
        token_keys(cells, settings.hash, spatial_corners), cells, no_min)
    return tokens, _pick_table(spatial, enc, pts["color"], pts["normal"], picks, offset)


def scene_latent_blocks(blocks, num_frames: int, image_size: tuple[int, int],
                        extrinsics: np.ndarray, intrinsics: np.ndarray,
                        world_to_scene: np.ndarray, scale: float, scale_mode: str,
                        settings: LatentConfig, device: torch.device, encoder=None,
                        max_per_frame: int = 0, subsample_seed: int = 0,
                        pixel_voxel: np.ndarray | None = None) -> SceneLatent:
    """Tokens of a clip whose scene points come a block of frames at a time (module docstring;
    ``blocks(normals=None)`` yields :class:`vggt4d.points.ScenePoints` in frame order and is
    called three times: the grid's frame and every kept pixel's voxel, which read no normal
    (``normals=False`` spares their estimation), and the voxels).

    Voxels and their sums are merged block by block (:func:`merge_tables`), so memory follows
    the number of voxels, not of frames: a static surface seen again adds nothing. The encoder
    runs once, on the final spatial voxels, each represented by one member drawn uniformly
    (:func:`_pick_table`). ``pixel_voxel``: a (T, H, W) int32 buffer to fill (e.g. a memory
    map; default a new array). At most ``max_per_frame`` points per frame are voxelised (drawn
    with ``subsample_seed``, 0 = all); every kept pixel is then located in the voxels
    (:func:`locate`). One block gives the tokens of the points at once: the same keys, counts,
    sums and draws. Random draws are made on the CPU, so the result does not depend on
    ``device``.
    """
    height, width = image_size
    frame = grid_frame(blocks, settings, max_per_frame, subsample_seed)
    world_to_enc = affine(np.eye(3), -frame.shift.numpy()) @ world_to_scene
    c2w_enc = cameras_in_frame(extrinsics, world_to_enc, scale)
    time_emb = time_embedding(frame_times(num_frames), settings.time_dim)
    embedded = c2w_enc if settings.camera_frame == "encoder" else camera_to_world(extrinsics)
    cam_emb = camera_embedding(embedded, intrinsics, (height, width), settings.camera_embedding)
    picks = None if encoder is None else torch.Generator().manual_seed(settings.seed)
    rng = np.random.default_rng(subsample_seed)
    tokens = spatial = None
    offset = 0
    for block in blocks():
        built = block.subsample(max_per_frame, rng)
        if not len(built):
            continue
        block_tokens, block_picks = _block_tables(built, frame, settings, device, time_emb,
                                                  cam_emb, picks, offset)
        tokens = merge_tables(tokens, block_tokens, TOKEN_COLUMNS)
        if block_picks is not None:
            spatial = merge_tables(spatial, block_picks, PICK_COLUMNS)
        offset += len(built)
    columns = tokens.columns
    geo_feat = torch.zeros(len(tokens.keys), 0, device=device)
    if encoder is not None:
        features = encode_voxels(encoder, spatial.columns["coord"].float(),
                                 spatial.columns["grid_coord"], spatial.columns["color"],
                                 spatial.columns["normal"], settings.levels, settings.seed)
        if not settings.dynamic_voxels:
            geo_feat = features
        else:  # the spatial voxel of each token: its key without the time bin
            spatial_keys = unsigned_order(token_keys(columns["grid_coord"], settings.hash,
                                                     frame.corners[:, :3]))
            geo_feat = features[torch.searchsorted(unsigned_order(spatial.keys), spatial_keys)]
    grid = TokenGrid(Voxels(tokens.keys, torch.empty(0, dtype=torch.int64), columns["count"],
                            columns["grid_coord"], torch.zeros(3)), frame.cell_min.to(device),
                     columns.get("bin"))
    if pixel_voxel is None:
        pixel_voxel = np.empty((num_frames, height, width), np.int32)
    pixel_voxel.fill(-1)
    flat_voxel = pixel_voxel.reshape(-1)
    for block in blocks(normals=False):
        if not len(block):
            continue
        coord = torch.from_numpy(block.coord).to(device).double() - frame.shift.to(device)
        dynamic_all = (torch.from_numpy(block.frame).to(device),
                       torch.from_numpy(block.dynamic).to(device), settings.time_bin) \
            if settings.dynamic_voxels else ()
        located = locate(grid, coord, settings.grid_size, settings.hash, *dynamic_all)
        flat_voxel[block.pixel] = located.cpu().int().numpy()
    world_to_grid = affine(np.eye(3) / settings.grid_size,
                           -frame.cell_min.numpy().astype(np.float64)) @ world_to_enc
    meta = {
        "grid_size": settings.grid_size, "num_frames": num_frames,
        "image_size": [height, width], "hash": settings.hash,
        "dynamic_voxels": settings.dynamic_voxels, "time_bin": settings.time_bin,
        "time_dim": settings.time_dim, "time_frequencies": time_frequencies(
            settings.time_dim).tolist(), "camera_embedding": settings.camera_embedding,
        "camera_frame": settings.camera_frame,
        "encoder": settings.encoder if encoder is not None else "none",
        "weights": settings.weights if encoder is not None else None,
        "levels": settings.levels, "scale": scale, "scale_mode": scale_mode,
        "center_shift": frame.shift.tolist(), "points": frame.points,
        "points_voxelised": frame.voxelised, "max_per_frame": max_per_frame,
        "seed": settings.seed, "tokens": len(tokens.keys), "channels": int(geo_feat.shape[1]),
    }
    aggregates = finish_aggregates(columns)
    return SceneLatent(
        geo_feat=geo_feat.cpu(), coord=columns["grid_coord"].cpu(), aggregates=VoxelAggregates(
            **{name: getattr(aggregates, name).cpu() for name in aggregates.__dataclass_fields__}),
        time_bin=None if "bin" not in columns else columns["bin"].cpu(),
        pixel_voxel=torch.from_numpy(pixel_voxel),
        world_to_grid=torch.from_numpy(world_to_grid), world_to_enc=torch.from_numpy(world_to_enc),
        c2w=torch.from_numpy(c2w_enc), intrinsics=torch.from_numpy(
            np.asarray(intrinsics, dtype=np.float64)), meta=meta)


def write_latent(path: Path, latent: SceneLatent, dtype: torch.dtype) -> None:
    """``scene_latent.pt`` atomically (float features in ``dtype``); saved through a file handle,
    so the archive does not record the temporary file's name and equal contents give equal
    bytes."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            torch.save(latent.to_dict(dtype), handle)

    atomic_write(path, write)


def read_latent(path: str | Path) -> dict:
    """``scene_latent.pt`` as the dict :meth:`SceneLatent.to_dict` wrote (``weights_only``
    unpickling: reading a file runs no code), refused when it comes from a newer format."""
    try:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot read {path}: {reason}") from None
    if not isinstance(data, dict) or "geo_feat" not in data:
        raise UserError(f"{path} is not a scene_latent.pt (no dict with geo_feat)")
    version = data.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise UserError(f"{path} has format {version}; this vggt4d reads up to "
                        f"{FORMAT_VERSION}: update vggt4d")
    return data


def write_ply(path: Path, latent: SceneLatent) -> None:
    """A binary PLY of the voxel centres (encoder frame, metres) coloured by their mean colour."""
    from plyfile import PlyData, PlyElement

    grid_size = latent.meta["grid_size"]
    enc_to_grid = latent.world_to_grid.numpy() @ np.linalg.inv(latent.world_to_enc.numpy())
    centres = (latent.coord.double().numpy() + 0.5 - enc_to_grid[:3, 3]) * grid_size
    colors = np.clip(np.rint(latent.aggregates.color.float().numpy() * 255), 0, 255)
    vertex = np.empty(len(centres), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"),
                                          ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for axis, name in enumerate("xyz"):
        vertex[name] = centres[:, axis]
    for channel, name in enumerate(("red", "green", "blue")):
        vertex[name] = colors[:, channel]
    ply = PlyData([PlyElement.describe(vertex, "vertex")])
    atomic_write(path, lambda tmp: ply.write(str(tmp)))


def _file_identity(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


@functools.lru_cache(maxsize=4)
def encoder_weights_file(weights: str, encoder: str, shuffle_orders: bool) -> Path | None:
    """The checked encoder checkpoint of these settings (downloaded once, config, keys and
    shapes checked; memoised per process), None for random weights or no encoder."""
    if encoder == Encoder.none or weights == "random":
        return None
    from vggt4d.ptv3.checkpoint import check_checkpoint

    return check_checkpoint(weights, encoder, {"shuffle_orders": shuffle_orders})


def latent_inputs(ctx) -> tuple:
    """The prediction and masks the tokens are built from, and their names (``sources``): the
    second pass when it ran, the refined masks when refine ran, else the coarse masks."""
    second = "prediction_pass2" in ctx.artifacts
    prediction = ctx.artifacts["prediction_pass2" if second else "prediction"]
    masks, masks_name = None, None
    for artifact, name in (("refined_masks", "refined"), ("masks", "coarse")):
        if artifact in ctx.artifacts:
            masks, masks_name = ctx.artifacts[artifact], name
            break
    return prediction, masks, {"prediction": "pass2" if second else "pass1",
                               "masks": masks_name}


class LatentStage(Stage):
    """Prediction (the second pass when present) and masks → ``scene_latent.pt``, a PLY of the
    voxels and ``latent.json``; cached by the inputs' content and the settings."""

    name = "latent"
    requires = ("prediction",)
    optional = ("prediction_pass2", "masks", "refined_masks")
    provides = ("scene_latent",)

    def check(self, ctx) -> None:
        """Cameras, scale, masks for dynamic voxels, and the encoder checkpoint (downloaded and
        checked now: a bad file fails before DA3 runs)."""
        from vggt4d.resources import resolve_device

        cfg = ctx.cfg
        cfg.model.require_cameras("latent")
        cfg.points.scale_mode(cfg.model.name)
        resolve_device(cfg.device, ctx.job.num)
        if cfg.latent.dynamic_voxels and not ctx.has_stage("masks"):
            raise UserError("latent.dynamic_voxels=true needs dynamic masks: add masks to the "
                            "pipeline")
        encoder_weights_file(cfg.latent.weights, cfg.latent.encoder, cfg.latent.shuffle_orders)

    def outputs(self, ctx) -> tuple[str, ...]:
        return (OUTPUT, REPORT) + ((PLY,) if ctx.cfg.latent.ply else ())

    def cache_key(self, ctx) -> str:
        from vggt4d import __version__
        from vggt4d.cache import content_key
        from vggt4d.resources import resolve_device

        cfg = ctx.cfg
        prediction, masks, sources = latent_inputs(ctx)
        arrays = [prediction.depth, prediction.conf, prediction.extrinsics,
                  prediction.intrinsics, prediction.frames, prediction.sky]
        arrays += [None, None] if masks is None else [masks.soft, masks.binary]
        weights_file = encoder_weights_file(cfg.latent.weights, cfg.latent.encoder,
                                            cfg.latent.shuffle_orders)
        weights = None if weights_file is None else _file_identity(weights_file)
        return content_key(*(b"" if a is None else a for a in arrays), sources,
                           asdict(cfg.points), asdict(cfg.latent), weights,
                           cfg.points.scale_mode(cfg.model.name),
                           resolve_device(cfg.device, ctx.job.num).type, __version__)

    def run(self, ctx) -> None:
        from vggt4d.points import ClipPoints
        from vggt4d.resources import resolve_device

        cfg = ctx.cfg
        prediction, masks, sources = latent_inputs(ctx)
        points_cfg, settings = cfg.points, cfg.latent
        device = resolve_device(cfg.device, ctx.job.num)
        last = time.perf_counter()

        def lap(step: str) -> None:
            nonlocal last
            now = time.perf_counter()
            ctx.timings[f"latent.{step}"], last = round(now - last, 3), now

        clip = ClipPoints.measure(
            prediction.depth, prediction.conf, prediction.frames, prediction.intrinsics,
            prediction.extrinsics, points_cfg, points_cfg.scale_mode(cfg.model.name),
            sky=prediction.sky, dynamic_prob=None if masks is None else masks.soft,
            dynamic=None if masks is None else masks.binary)
        lap("points")
        encoder = None if settings.encoder == Encoder.none else build_encoder(settings, device)
        lap("encoder_build")
        with tempfile.TemporaryDirectory(dir=ctx.out_dir, prefix=".latent.") as scratch:
            # every pixel's token, filled block by block: mapped from a scratch file, so a long
            # video's (T, H, W) map is written to scene_latent.pt without being held in memory
            pixel_voxel = np.lib.format.open_memmap(Path(scratch) / "pixel_voxel.npy", "w+",
                                                    np.int32, prediction.depth.shape)
            latent = scene_latent_blocks(
                clip.point_blocks, clip.num_frames, prediction.depth.shape[1:],
                prediction.extrinsics, prediction.intrinsics, clip.world_to_scene, clip.scale,
                clip.scale_mode, settings, device, encoder, points_cfg.max_per_frame,
                points_cfg.seed, pixel_voxel)
            latent.meta["sources"] = sources
            lap("tokens")
            write_latent(ctx.out_dir / OUTPUT, latent, SAVE_DTYPES[settings.save_dtype])
            pixels_in_tokens = int((pixel_voxel >= 0).sum())
        if settings.ply:
            write_ply(ctx.out_dir / PLY, latent)
        lap("write")
        report = {**latent.meta, "dynamic_tokens": int((latent.aggregates.dynamic > 0.5).sum()),
                  "pixels_in_tokens": pixels_in_tokens, "device": device.type}
        write_json(ctx.out_dir / REPORT, report)
        log.info("latent: %d tokens x %d channels from %d points (%s encoder)",
                 report["tokens"], report["channels"], report["points"], report["encoder"])
        self.load(ctx)

    def load(self, ctx) -> None:
        ctx.artifacts["scene_latent"] = json.loads((ctx.out_dir / REPORT).read_text())
