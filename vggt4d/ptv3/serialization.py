"""Space-filling-curve serialisation of voxel grids, bit for bit as Pointcept's PTv3 does it.

PTv3 orders the voxels of a point cloud along space-filling curves and attends inside fixed-size
patches of that order. A released checkpoint only reproduces its features when the patches are
the same, so the codes here must equal Pointcept's exactly (``tests/test_ptv3_serialization.py``
holds a known-answer table produced by Pointcept's own ``encode``).

Codes, for ``grid_coord`` ``(x, y, z)`` with ``depth`` bits per axis (each axis is first reduced to
its low ``depth`` bits, as Pointcept does):

* ``"z"``: Morton key; bit ``i`` of ``x``, ``y``, ``z`` goes to bit ``3i + 2``, ``3i + 1``, ``3i``.
* ``"hilbert"``: Skilling's Hilbert index ("Programming the Hilbert curve", 2004) with axis 0 as
  the most significant axis: the coordinates are transformed level by level from the top bit
  down (at level ``q`` and for each axis ``i`` in order: if bit ``q`` of axis ``i`` is set, invert
  the low ``q`` bits of axis 0, else exchange the low ``q`` bits of axes 0 and ``i``), interleaved
  as in the z key, and the resulting Gray code is decoded to binary (prefix XOR from the top bit).
* ``"z-trans"``, ``"hilbert-trans"``: the same with ``x`` and ``y`` swapped first.
* The batch index goes above the curve key: ``code = batch << 3·depth | key``.

Everything is integer arithmetic on int64 tensors (no per-point Python), so it runs on CPU and
CUDA alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vggt4d.errors import UserError

__all__ = ["MAX_DEPTH", "ORDERS", "Serialization", "encode", "serialize", "serialized_depth"]

#: The space-filling curves PTv3 knows; "-trans" swaps x and y before encoding.
ORDERS: tuple[str, ...] = ("z", "z-trans", "hilbert", "hilbert-trans")

#: Most bits per axis Pointcept serialises (48 bits of key, leaving 15 for the batch index).
MAX_DEPTH = 16


def serialized_depth(grid_coord: Tensor) -> int:
    """Bits per axis Pointcept uses when no depth is given: ``bit_length(max(grid_coord) + 1)``.

    ``grid_coord`` is ``(N, 3)`` non-negative integers; the maximum is over all axes together.
    Raises :class:`UserError` when the grid is empty or needs more than :data:`MAX_DEPTH` bits.
    """
    if grid_coord.numel() == 0:
        raise UserError("cannot serialise an empty point cloud: there are no voxels")
    cells = int(grid_coord.max()) + 1
    if cells.bit_length() > MAX_DEPTH:
        raise UserError(
            f"grid spans {cells} cells on an axis; PTv3 serialises at most {MAX_DEPTH} bits per "
            f"axis ({2**MAX_DEPTH - 1} cells): use a larger grid size"
        )
    return cells.bit_length()


def _spread_bits(v: Tensor) -> Tensor:
    """Insert two zero bits above each of the low 21 bits of ``v``: bit ``i`` moves to ``3i``."""
    v = v & 0x1FFFFF
    v = (v | v << 32) & 0x1F00000000FFFF
    v = (v | v << 16) & 0x1F0000FF0000FF
    v = (v | v << 8) & 0x100F00F00F00F00F
    v = (v | v << 4) & 0x10C30C30C30C30C3
    return (v | v << 2) & 0x1249249249249249


def _interleave(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Bit ``i`` of ``a``, ``b``, ``c`` → bit ``3i + 2``, ``3i + 1``, ``3i`` of the result."""
    return _spread_bits(a) << 2 | _spread_bits(b) << 1 | _spread_bits(c)


def _hilbert_key(axes: list[Tensor], depth: int) -> Tensor:
    """Skilling's transform to the Hilbert transpose, interleaved and Gray-decoded to an index."""
    axes = list(axes)
    for q in range(depth - 1, 0, -1):
        low = (1 << q) - 1
        for i in range(3):
            bit_set = (axes[i] >> q) & 1 == 1
            # exchange the low bits of axes 0 and i where the bit is clear (a no-op for i = 0) ...
            swap = torch.where(bit_set, 0, (axes[0] ^ axes[i]) & low)
            axes[i] = axes[i] ^ swap
            # ... and invert the low bits of axis 0 where it is set
            axes[0] = axes[0] ^ torch.where(bit_set, low, swap)
    key = _interleave(*axes)
    for shift in (1, 2, 4, 8, 16, 32):  # prefix XOR from the top bit: Gray code → binary
        key = key ^ (key >> shift)
    return key


def encode(grid_coord: Tensor, batch: Tensor, depth: int, order: str) -> Tensor:
    """Serialisation code of every voxel along one curve of :data:`ORDERS`.

    Args:
        grid_coord: ``(N, 3)`` non-negative integer voxel coordinates.
        batch: ``(N,)`` integer batch index of every voxel.
        depth: bits per axis (1 … :data:`MAX_DEPTH`); higher coordinate bits are ignored.
        order: one of :data:`ORDERS`.

    Returns:
        ``(N,)`` int64 ``code = batch << 3·depth | key``, equal to Pointcept's
        ``encode(grid_coord, batch, depth, order)``.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown serialisation order {order!r}; expected one of {ORDERS}")
    coord = grid_coord.long() & ((1 << depth) - 1)
    axes = list(coord.unbind(dim=1))
    if order.endswith("-trans"):
        axes[0], axes[1] = axes[1], axes[0]
    key = _interleave(*axes) if order.startswith("z") else _hilbert_key(axes, depth)
    return batch.long() << (3 * depth) | key


@dataclass
class Serialization:
    """Codes and orders of a point cloud along several curves (one row per curve).

    Attributes:
        code: ``(O, N)`` int64 codes from :func:`encode`.
        order: ``(O, N)`` int64 ``argsort`` of ``code`` per row: the voxel at serial position ``j``.
        inverse: ``(O, N)`` int64 inverse permutation: ``order[o, inverse[o, i]] == i``.
    """

    code: Tensor
    order: Tensor
    inverse: Tensor


def serialize(
    grid_coord: Tensor,
    batch: Tensor,
    orders: Sequence[str],
    depth: int | None = None,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> Serialization:
    """Serialise voxels along each curve in ``orders``, as Pointcept's ``Point.serialization``.

    Args:
        grid_coord: ``(N, 3)`` non-negative integer voxel coordinates, unique within a batch.
        batch: ``(N,)`` integer batch index of every voxel.
        orders: curve names from :data:`ORDERS`, one row of the result each.
        depth: bits per axis; ``None`` picks :func:`serialized_depth` (what PTv3 does).
        shuffle: permute the rows (``shuffle_orders``): row ``o`` of the result is curve
            ``orders[perm[o]]`` with ``perm = torch.randperm(len(orders), generator=generator)``.
        generator: CPU generator for that permutation; ``None`` draws from torch's global
            generator, exactly as Pointcept does (so ``torch.manual_seed`` reproduces its draw).

    Codes are unique when coordinates are unique per batch, so the sort order is well defined
    (Pointcept's unstable ``argsort`` gives the same permutation).
    """
    if depth is None:
        depth = serialized_depth(grid_coord)
    if not 1 <= depth <= MAX_DEPTH:
        raise UserError(f"serialisation depth must be 1 … {MAX_DEPTH} bits per axis, got {depth}")
    n_batches = int(batch.max()) + 1 if batch.numel() else 1
    if 3 * depth + n_batches.bit_length() > 63:
        raise UserError(
            f"{n_batches} point clouds in one batch do not fit a 64-bit serialisation code at "
            f"{depth} bits per axis: split the batch"
        )
    code = torch.stack([encode(grid_coord, batch, depth, order) for order in orders])
    order = torch.argsort(code, dim=1, stable=True)
    positions = torch.arange(code.shape[1], device=code.device).expand_as(order)
    inverse = torch.empty_like(order).scatter_(1, order, positions)
    if shuffle:
        perm = torch.randperm(len(orders), generator=generator).to(code.device)
        code, order, inverse = code[perm], order[perm], inverse[perm]
    return Serialization(code=code, order=order, inverse=inverse)
