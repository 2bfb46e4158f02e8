"""Pointcept-style grid sampling (voxelisation) of point clouds, vectorised in torch.

Semantics (Pointcept's ``GridSample`` transform, DESIGN.md §4):

* :func:`voxelize`: ``grid_coord = floor(coord / g) − min(floor(coord / g))`` per axis (int64),
  i.e. the lattice is anchored at integer multiples of ``g`` and shifted so the smallest cell
  index is 0. The division is done in float64 (Pointcept divides by a float64 array).
* :func:`fnv_hash`: ``h = 14695981039346656037``; for each axis ``x, y, z`` in order
  ``h = h · 1099511628211 (mod 2**64)`` then ``h ^= coord``.
* :func:`ravel_hash`: row-major ravel of ``grid_coord − min`` over ``D = max + 1`` per axis,
  ``key = (x·Dy + y)·Dz + z`` (``min`` is 0 for the output of :func:`voxelize`).
* :func:`group`: points are grouped by key; voxels are ordered by the key read as an **unsigned**
  64-bit integer (as numpy ``uint64`` sorts), members of a voxel by a stable sort (so in order of
  their input index).
* :func:`sample_train`: one pseudo-random member per voxel (Pointcept's
  ``start + randint(0, count.max()) % count``), seeded by a ``torch.Generator``.
* :func:`sample_test`: ``count.max()`` parts, part ``i`` taking member ``i mod count`` of every
  voxel.

uint64 emulation
----------------
torch has no uint64 arithmetic, so 64-bit hash values are carried in int64 tensors holding the
same bit pattern (``value_int64 = value_uint64 − 2**64`` when the top bit is set; read back with
``int(v) % 2**64``). Multiplication modulo ``2**64`` is the same bit operation for signed and
unsigned two's-complement integers, and torch's int64 multiply wraps on overflow on CPU and CUDA
(it compiles to the plain machine multiply; ``tests/test_gridsample.py`` checks the result bit
for bit against Python integers with ``& (2**64 − 1)``, including coordinates large enough that
every product overflows). XOR is bitwise and needs no care. Sorting as unsigned is done by
flipping the sign bit (``key ^ −2**63``), which maps unsigned order onto signed order.

FNV collisions (two different cells with one key) are not detected, as in Pointcept; the
``grid_coord`` stored per voxel is that of the voxel's first member.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vggt4d.errors import UserError

__all__ = [
    "MAX_CELLS",
    "Voxels",
    "cell_index",
    "fnv_hash",
    "group",
    "group_by_key",
    "ravel_hash",
    "sample_test",
    "sample_train",
    "unsigned_order",
    "voxelize",
]

#: Most cells per axis: PTv3 serialises each axis of ``grid_coord`` in 16 bits.
MAX_CELLS = 2**16 - 1

_FNV_OFFSET = 14695981039346656037 - 2**64  # the uint64 offset basis as an int64 bit pattern
_FNV_PRIME = 1099511628211
_SIGN_BIT = -(2**63)
_AXES = "xyz"


def _check_coord(coord: Tensor) -> None:
    if coord.ndim != 2 or coord.shape[1] != 3:
        raise UserError(f"point coordinates must have shape (N, 3), got {tuple(coord.shape)}")
    if coord.shape[0] == 0:
        raise UserError("cannot grid-sample an empty point set")
    if not coord.is_floating_point():
        raise UserError(f"point coordinates must be floating point, got {coord.dtype}")
    low, high = coord.aminmax(dim=0)  # NaN and inf reach the extremes: one pass, no bool copy
    if not bool(torch.isfinite(low).all() & torch.isfinite(high).all()):
        raise UserError("point coordinates contain NaN or infinite values")


def _check_grid_size(grid_size: float) -> None:
    g = float(grid_size)
    if not math.isfinite(g) or g <= 0:
        raise UserError(f"grid size must be a positive finite number, got {grid_size}")


def _fitting_grid_size(extent: float) -> float:
    """A grid size (rounded up to 3 significant digits) for which ``extent`` surely fits.

    With the lattice anchored at multiples of ``g`` an interval of length ``E`` touches fewer
    than ``E / g + 2`` cells, so ``g ≥ E / (MAX_CELLS − 1)`` guarantees at most ``MAX_CELLS``.
    """
    g = extent / (MAX_CELLS - 1)
    scale = 10.0 ** (math.floor(math.log10(g)) - 2)
    return math.ceil(g / scale * (1 + 1e-12)) * scale


def cell_index(coord: Tensor, grid_size: float) -> Tensor:
    """(N, 3) float → (N, 3) int64 ``floor(coord / g)`` (division in float64): the lattice cell
    of every point, anchored at integer multiples of ``g``."""
    return torch.floor(coord.double() / float(grid_size)).long()


def voxelize(coord: Tensor, grid_size: float) -> tuple[Tensor, Tensor]:
    """Integer cell of every point and the world position of cell 0's corner.

    ``coord`` (N, 3) float → ``grid_coord`` (N, 3) int64 ``≥ 0`` and ``min_coord`` (3,) in
    ``coord``'s dtype, ``min_coord = min(floor(coord / g)) · g``. Raises :class:`UserError` for a
    bad grid size, an empty or non-finite point set, or more than :data:`MAX_CELLS` cells on an
    axis.
    """
    _check_grid_size(grid_size)
    _check_coord(coord)
    # axis-major (3, N) working copy: contiguous per axis, updated in place (8 M points: a
    # fraction of the time the (N, 3) temporaries took); the result is its (N, 3) view
    cells = torch.empty((coord.shape[1], coord.shape[0]), dtype=torch.float64,
                        device=coord.device)
    cells.copy_(coord.t()).div_(float(grid_size)).floor_()
    cell_min = cells.amin(dim=1)
    grid_coord = cells.sub_(cell_min[:, None]).long().t()
    cell_min = cell_min.long()
    counts = (grid_coord.amax(dim=0) + 1).tolist()
    for axis, n in enumerate(counts):
        if n > MAX_CELLS:
            column = coord[:, axis].double()
            extent = float(column.max() - column.min())
            raise UserError(
                f"point cloud spans {extent:.6g} m on axis {_AXES[axis]}: {n} cells of "
                f"{grid_size} m, more than the {MAX_CELLS} PTv3 serialises; use a grid size "
                f">= {_fitting_grid_size(extent):.6g} m"
            )
    min_coord = (cell_min.double() * float(grid_size)).to(coord.dtype)
    return grid_coord, min_coord


def fnv_hash(grid_coord: Tensor) -> Tensor:
    """FNV-1a-style 64-bit hash of integer coordinates (N, D) → (N,) int64 (uint64 bits)."""
    if grid_coord.ndim != 2:
        raise UserError(f"grid coordinates must have shape (N, D), got {tuple(grid_coord.shape)}")
    coords = grid_coord.long()
    h = torch.full((coords.shape[0],), _FNV_OFFSET, dtype=torch.int64, device=coords.device)
    for j in range(coords.shape[1]):  # over axes, not points
        h.mul_(_FNV_PRIME).bitwise_xor_(coords[:, j])  # the multiply wraps modulo 2**64
    return h


def ravel_hash(grid_coord: Tensor) -> Tensor:
    """Row-major ravel of ``grid_coord − min`` over ``max + 1`` cells per axis → (N,) int64."""
    if grid_coord.ndim != 2 or grid_coord.shape[0] == 0:
        raise UserError(
            f"grid coordinates must have shape (N, D) with N > 0, got {tuple(grid_coord.shape)}"
        )
    coords = grid_coord.long()
    low, high = coords.aminmax(dim=0)
    dims = (high - low + 1).tolist()
    if math.prod(dims) >= 2**63:
        raise UserError(f"grid of {dims} cells is too large to ravel into 64-bit keys")
    key = coords[:, 0] - low[0]
    for j in range(1, coords.shape[1]):  # over axes, not points; in place after the first
        key.mul_(dims[j]).add_(coords[:, j]).sub_(low[j])
    return key


@dataclass
class Voxels:
    """Points grouped by voxel; voxels in order of their key read as uint64."""

    keys: Tensor  # (V,) sorted unique hash keys (uint64 bit patterns in int64)
    inverse: Tensor  # (N,) voxel index of each point
    counts: Tensor  # (V,) points per voxel
    order: Tensor  # (N,) point indices sorted by key (stable)
    grid_coord: Tensor  # (V, 3) int64 voxel coordinate of each voxel
    min_coord: Tensor  # (3,) world position of cell 0's corner

    @property
    def starts(self) -> Tensor:
        """(V,) position in :attr:`order` of each voxel's first member."""
        return torch.cumsum(self.counts, 0) - self.counts


def group(coord: Tensor, grid_size: float, hash_type: str = "fnv") -> Voxels:
    """Voxelise ``coord`` (N, 3) at ``grid_size`` and group the points by hash key.

    ``hash_type`` is ``"fnv"``; anything else means ``"ravel"`` (as in Pointcept).
    """
    grid_coord, min_coord = voxelize(coord, grid_size)
    if hash_type == "fnv":
        return group_by_key(fnv_hash(grid_coord), grid_coord, min_coord, small_keys=False)
    key = ravel_hash(grid_coord)  # >= 0
    return group_by_key(key, grid_coord, min_coord, small_keys=int(key.max()) < 2**31)


def unsigned_order(key: Tensor) -> Tensor:
    """int64 keys holding uint64 bit patterns → int64 values whose signed order is the keys'
    unsigned order (the sign bit flipped)."""
    return torch.bitwise_xor(key, _SIGN_BIT)


def group_by_key(key: Tensor, grid_coord: Tensor, min_coord: Tensor,
                 small_keys: bool | None = None) -> Voxels:
    """Group points (N,) by hash ``key``; ``grid_coord`` (N, 3) and ``min_coord`` (3,) as
    :func:`voxelize` returns them. Voxels are ordered by the key read as uint64.

    ``small_keys``: whether every key is in ``[0, 2**31)`` (``None``: find out).
    """
    if small_keys is None:
        small_keys = bool(key.numel()) and int(key.min()) >= 0 and int(key.max()) < 2**31
    if small_keys:
        # small non-negative keys (ravel keys of most grids): unsigned order is signed order,
        # and torch sorts int32 about twice as fast as int64
        sorted_small, order = torch.sort(key.int(), stable=True)
        sorted_all = sorted_small.long()
    else:
        sorted_unsigned, order = torch.sort(unsigned_order(key), stable=True)
        sorted_all = unsigned_order(sorted_unsigned)
    sorted_keys, counts = torch.unique_consecutive(sorted_all, return_counts=True)
    n_voxels = sorted_keys.shape[0]
    inverse_sorted = torch.repeat_interleave(
        torch.arange(n_voxels, device=key.device), counts, output_size=key.shape[0]
    )
    inverse = torch.empty_like(inverse_sorted).scatter_(0, order, inverse_sorted)
    starts = torch.cumsum(counts, 0) - counts
    return Voxels(
        keys=sorted_keys,
        inverse=inverse,
        counts=counts,
        order=order,
        grid_coord=grid_coord[order[starts]],
        min_coord=min_coord,
    )


def sample_train(voxels: Voxels, generator: torch.Generator | None = None) -> Tensor:
    """(V,) one pseudo-random member (a point index) of every voxel.

    Member ``randint(0, counts.max()) % count`` of each voxel; ``generator`` must live on the
    device of the voxels (``None``: torch's global generator).
    """
    counts = voxels.counts
    draw = torch.randint(
        0,
        int(counts.max()),
        counts.shape,
        generator=generator,
        device=counts.device,
        dtype=torch.int64,
    )
    return voxels.order[voxels.starts + draw % counts]


def sample_test(voxels: Voxels) -> list[Tensor]:
    """``counts.max()`` tensors of (V,) point indices; part ``i`` takes member ``i mod count``."""
    counts = voxels.counts
    starts = voxels.starts
    return [voxels.order[starts + i % counts] for i in range(int(counts.max()))]
