"""Pointcept-style grid sampling (voxelisation) of point clouds, vectorised in torch.

Semantics (Pointcept's ``GridSample`` transform; docs/method.md):

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
* :func:`sample_train`: one pseudo-random member per voxel, seeded by a ``torch.Generator``.
  Pointcept takes member ``randint(0, count.max()) % count`` of its (unstable, so
  implementation-defined) sort order; here every member is equally likely (the member with the
  largest random priority), which needs no per-point sort.
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

FNV collisions (two different cells with one key) merge the cells, as in Pointcept; the
``grid_coord`` stored per voxel is that of the voxel's first member.

Speed
-----
Pointcept sorts all N keys. When the grid's bounding box holds at most :data:`DENSE_CELLS_PER_POINT`
cells per point (any scene sampled densely enough to be worth voxelising), :func:`group` instead
counts the points per cell of the box (``bincount`` of the row-major cell index), hashes and
sorts only the V occupied cells, and maps every point to its voxel through a cell → voxel table:
O(N + cells + V log V) instead of O(N log N), with the same keys, counts, inverse and voxel
coordinates. The point order inside voxels (:attr:`Voxels.order`) is only computed (one stable
sort) when asked for; the latent stage asks, for its per-voxel sums (a sorted segment reduction
gives the same bits on every run and device, where scattered float additions on CUDA do not).
Larger boxes, and the rare grids whose occupied cells share an FNV key, take the sorting path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vggt4d.errors import UserError

__all__ = [
    "DENSE_CELLS_PER_POINT",
    "MAX_CELLS",
    "Voxels",
    "cell_index",
    "fnv_hash",
    "group",
    "group_by_key",
    "group_sorted",
    "ravel_hash",
    "sample_test",
    "sample_train",
    "unsigned_order",
    "voxelize",
]

#: Most cells per axis: PTv3 serialises each axis of ``grid_coord`` in 16 bits.
MAX_CELLS = 2**16 - 1

#: :func:`group` counts points per cell of the bounding box when the box has at most this many
#: cells per point (its tables then cost about as much memory as the sort they replace).
DENSE_CELLS_PER_POINT = 4

_FNV_OFFSET = 14695981039346656037 - 2**64  # the uint64 offset basis as an int64 bit pattern
_FNV_PRIME = 1099511628211
_SIGN_BIT = -(2**63)
_AXES = "xyz"


def _check_coord(coord: Tensor) -> None:
    """Raise :class:`UserError` unless ``coord`` is a non-empty float (N, 3) tensor (finiteness is
    checked on the way, by :func:`_grid_box`)."""
    if coord.ndim != 2 or coord.shape[1] != 3:
        raise UserError(f"point coordinates must have shape (N, 3), got {tuple(coord.shape)}")
    if coord.shape[0] == 0:
        raise UserError("cannot grid-sample an empty point set")
    if not coord.is_floating_point():
        raise UserError(f"point coordinates must be floating point, got {coord.dtype}")


def _axis_major(coord: Tensor) -> Tensor:
    """A checked (N, 3) point set as a (3, N) float64 working copy: contiguous per axis, so the
    in-place steps and per-axis reductions that follow are single passes (on 8 M points a
    fraction of the time the (N, 3) layout takes)."""
    _check_coord(coord)
    rows = torch.empty((3, coord.shape[0]), dtype=torch.float64, device=coord.device)
    return rows.copy_(coord.t())


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


def _grid_box(rows: Tensor, grid_size: float) -> tuple[list[int], list[int]]:
    """(3, N) float64 coordinates → the smallest cell ``floor(min / g)`` and the number of cells
    per axis.

    ``x ↦ floor(x / g)`` (float64 division, ``g > 0``) is non-decreasing, so the extreme cells are
    those of the extreme coordinates (NaN and inf reach the extremes too). Raises
    :class:`UserError` for non-finite points and beyond :data:`MAX_CELLS` cells on an axis,
    naming a grid size that fits.
    """
    _check_grid_size(grid_size)
    low, high = rows.amin(dim=1), rows.amax(dim=1)  # two reductions beat one aminmax on CPU
    if not bool(torch.isfinite(low).all() & torch.isfinite(high).all()):
        raise UserError("point coordinates contain NaN or infinite values")
    g = float(grid_size)
    cell_min = torch.floor(low / g).long().tolist()
    counts = [hi - lo + 1 for lo, hi in
              zip(cell_min, torch.floor(high / g).long().tolist(), strict=True)]
    for axis, n in enumerate(counts):
        if n > MAX_CELLS:
            extent = float(high[axis] - low[axis])
            raise UserError(
                f"point cloud spans {extent:.6g} m on axis {_AXES[axis]}: {n} cells of "
                f"{grid_size} m, more than the {MAX_CELLS} PTv3 serialises; use a grid size "
                f">= {_fitting_grid_size(extent):.6g} m"
            )
    return cell_min, counts


def _min_coord(cell_min: list[int], grid_size: float, like: Tensor) -> Tensor:
    """Pointcept's ``min_coord``: the world position of cell 0's corner, in ``like``'s dtype."""
    return (torch.tensor(cell_min, dtype=torch.float64, device=like.device)
            * float(grid_size)).to(like.dtype)


def voxelize(coord: Tensor, grid_size: float) -> tuple[Tensor, Tensor]:
    """Integer cell of every point and the world position of cell 0's corner.

    ``coord`` (N, 3) float → ``grid_coord`` (N, 3) int64 ``≥ 0`` and ``min_coord`` (3,) in
    ``coord``'s dtype, ``min_coord = min(floor(coord / g)) · g``. Raises :class:`UserError` for a
    bad grid size, an empty or non-finite point set, or more than :data:`MAX_CELLS` cells on an
    axis.
    """
    rows = _axis_major(coord)
    cell_min, _ = _grid_box(rows, grid_size)
    return _grid_coord(rows, grid_size, cell_min), _min_coord(cell_min, grid_size, coord)


def _relative_cells(rows: Tensor, grid_size: float, cell_min: list[int]) -> Tensor:
    """(3, N) float64 coordinates → ``floor(x / g) − cell_min`` per axis, in place: small exact
    integers however far the cloud lies from the origin."""
    rows.div_(float(grid_size)).floor_()
    return rows.sub_(torch.tensor(cell_min, dtype=torch.float64, device=rows.device)[:, None])


def _grid_coord(rows: Tensor, grid_size: float, cell_min: list[int]) -> Tensor:
    """(3, N) float64 coordinates (consumed) → (N, 3) int64 ``floor(x / g) − cell_min``."""
    return _relative_cells(rows, grid_size, cell_min).long().t()


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


@dataclass(eq=False)
class Voxels:
    """Points grouped by voxel; voxels in order of their key read as uint64."""

    keys: Tensor  # (V,) sorted unique hash keys (uint64 bit patterns in int64)
    inverse: Tensor  # (N,) int64 voxel index of each point
    counts: Tensor  # (V,) int64 points per voxel
    grid_coord: Tensor  # (V, 3) int64 voxel coordinate of each voxel
    min_coord: Tensor  # (3,) world position of cell 0's corner
    sorted_members: Tensor | None = None
    """(N,) point indices grouped by voxel, members in input order (see :attr:`order`)."""

    @property
    def order(self) -> Tensor:
        """(N,) point indices sorted by voxel, members of a voxel in input order (a stable sort of
        :attr:`inverse`, made on first use and kept)."""
        if self.sorted_members is None:
            index = self.inverse.int() if len(self.keys) < 2**31 else self.inverse
            self.sorted_members = torch.sort(index, stable=True).indices
        return self.sorted_members

    @property
    def starts(self) -> Tensor:
        """(V,) position in :attr:`order` of each voxel's first member."""
        return torch.cumsum(self.counts, 0) - self.counts

    def to(self, device: torch.device | str) -> Voxels:
        """The same grouping with every tensor on ``device``."""
        return Voxels(**{name: None if value is None else value.to(device)
                         for name, value in vars(self).items()})


def group(coord: Tensor, grid_size: float, hash_type: str = "fnv") -> Voxels:
    """Voxelise ``coord`` (N, 3) at ``grid_size`` and group the points by hash key.

    ``hash_type`` is ``"fnv"``; anything else means ``"ravel"`` (as in Pointcept). Counts points
    per cell of the bounding box when it is small enough (module docstring, *Speed*), else sorts
    the points' keys (:func:`group_sorted`); both give the same result.
    """
    rows = _axis_major(coord)
    cell_min, counts = _grid_box(rows, grid_size)
    min_coord = _min_coord(cell_min, grid_size, coord)
    if math.prod(counts) <= DENSE_CELLS_PER_POINT * coord.shape[0]:
        voxels = _group_dense(_box_index(rows, grid_size, cell_min, counts), counts,
                              hash_type, min_coord)
        return group_sorted(coord, grid_size, hash_type) if voxels is None else voxels
    return _group_cells(_grid_coord(rows, grid_size, cell_min), min_coord, hash_type)


def group_sorted(coord: Tensor, grid_size: float, hash_type: str = "fnv") -> Voxels:
    """:func:`group` by sorting all N keys, as Pointcept does (any grid)."""
    grid_coord, min_coord = voxelize(coord, grid_size)
    return _group_cells(grid_coord, min_coord, hash_type)


def _group_cells(grid_coord: Tensor, min_coord: Tensor, hash_type: str) -> Voxels:
    if hash_type == "fnv":
        return group_by_key(fnv_hash(grid_coord), grid_coord, min_coord, small_keys=False)
    key = ravel_hash(grid_coord)  # >= 0
    return group_by_key(key, grid_coord, min_coord, small_keys=int(key.max()) < 2**31)


def _box_index(rows: Tensor, grid_size: float, cell_min: list[int], counts: list[int]
               ) -> Tensor:
    """(3, N) float64 coordinates (consumed) → (N,) int64 row-major index of every point's cell
    in the grid's bounding box, ``((x − x₀)·D_y + (y − y₀))·D_z + (z − z₀)`` with
    ``(x, y, z) = floor(coord / g)``. Each axis is made relative (:func:`_relative_cells`) before
    the axes are combined, so the float64 sums are exact (the box holds far fewer than 2**53
    cells)."""
    rows = _relative_cells(rows, grid_size, cell_min)
    strides = (counts[1] * counts[2], counts[2], 1)
    index = rows[2].add_(rows[1], alpha=strides[1]).add_(rows[0], alpha=strides[0])
    return index.long()


def _group_dense(box_index: Tensor, counts: list[int], hash_type: str, min_coord: Tensor
                 ) -> Voxels | None:
    """:func:`group` from every point's (N,) bounding-box cell index through per-cell counts;
    ``None`` when two occupied cells share an FNV key (Pointcept merges them: left to the
    sorting path)."""
    per_cell = torch.bincount(box_index, minlength=math.prod(counts))
    cells = torch.nonzero(per_cell).squeeze(1)  # occupied cells in row-major (= ravel) order
    grid_coord = torch.stack([cells // (counts[1] * counts[2]), cells // counts[2] % counts[1],
                              cells % counts[2]], dim=1)
    if hash_type == "fnv":
        sorted_keys, rank = torch.sort(unsigned_order(fnv_hash(grid_coord)))
        if bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
            return None
        keys, cells, grid_coord = unsigned_order(sorted_keys), cells[rank], grid_coord[rank]
    else:
        keys = cells  # the ravel key over max + 1 cells per axis is the box index
    voxel_counts = per_cell[cells]
    voxel_of_cell = per_cell  # reused: only occupied cells are ever read back
    voxel_of_cell[cells] = torch.arange(len(cells), device=cells.device)
    inverse = voxel_of_cell.index_select(0, box_index)  # faster than [box_index] on the CPU
    return Voxels(keys=keys, inverse=inverse, counts=voxel_counts, grid_coord=grid_coord,
                  min_coord=min_coord)


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
        grid_coord=grid_coord[order[starts]],
        min_coord=min_coord,
        sorted_members=order,
    )


def sample_train(voxels: Voxels, generator: torch.Generator | None = None) -> Tensor:
    """(V,) one pseudo-random member (a point index) of every voxel.

    Every point draws a uniform ``r`` in ``[0, 1)`` (float32: 2**24 values); a voxel takes the
    member with the largest ``(r, index)``: one ``scatter_reduce`` of ``bits(r) · 2**32 + index``
    (the bit pattern of a non-negative float orders as the float), the same on every run and
    device for the same draws. Every member is equally likely up to ties of ``r`` (probability
    below ``count / 2**24`` per voxel). ``generator`` must live on the device of the voxels
    (``None``: torch's global generator).
    """
    inverse = voxels.inverse
    count = inverse.shape[0]
    if count >= 2**32:
        raise UserError(f"cannot sample among {count} points (at most 2**32 - 1)")
    draw = torch.rand(count, generator=generator, device=inverse.device,
                      dtype=torch.float32).view(torch.int32)
    priority = torch.arange(count, device=inverse.device).add_(draw.long(), alpha=2**32)
    best = torch.full((len(voxels.keys),), -1, dtype=torch.int64, device=inverse.device)
    best.scatter_reduce_(0, inverse, priority, "amax")
    return best.bitwise_and_(2**32 - 1)


def sample_test(voxels: Voxels) -> list[Tensor]:
    """``counts.max()`` tensors of (V,) point indices; part ``i`` takes member ``i mod count``."""
    counts = voxels.counts
    starts = voxels.starts
    return [voxels.order[starts + i % counts] for i in range(int(counts.max()))]
