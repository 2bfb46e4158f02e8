"""Submanifold sparse 3-D convolution (spconv's ``SubMConv3d``) with plain torch gathers.

PTv3's conditional positional encoding is a 3×3×3 ``spconv.SubMConv3d``. spconv is no use here:
its CPU build refuses eval mode with a bias ("cpu don't support act and bias") and has no CPU
backward, and CUDA builds are separate wheels. A submanifold convolution is simple enough to
compute directly, and matches spconv 2.3.8 (``tests/test_ptv3_sparse_conv.py`` compares both).

Semantics: active sites ``p`` (integer voxel coordinates within a batch element) are both the
inputs and the outputs, and with the kernel ``W`` of shape ``(C_out, k, k, k, C_in)`` (spconv's
layout, so checkpoints load unchanged) and ``r = k // 2``::

    out(p) = Σ_{a, b, c ∈ 0 … k−1}  W[:, a, b, c, :] · f(p + (a − r, b − r, c − r)) + bias

where ``f`` is zero at inactive sites and the three offsets run along the coordinate columns in
the order given (spconv's index columns after the batch column). The neighbour table is built
once per voxel set (:func:`neighbour_index`) and shared by every convolution on that set, as
spconv's ``indice_key`` does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vggt4d.errors import UserError

__all__ = ["SubMConv3d", "kernel_offsets", "neighbour_index", "submanifold_conv3d"]


def kernel_offsets(kernel_size: int = 3) -> Tensor:
    """``(k³, 3)`` int64 offsets ``(a − r, b − r, c − r)`` in the row-major ``(a, b, c)`` order of
    the flattened kernel, ``r = k // 2`` (odd ``k`` only: a submanifold kernel needs a centre)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"submanifold kernel size must be odd and positive, got {kernel_size}")
    steps = torch.arange(kernel_size) - kernel_size // 2
    return torch.cartesian_prod(steps, steps, steps)


def neighbour_index(grid_coord: Tensor, batch: Tensor | None, kernel_size: int = 3) -> Tensor:
    """Row of the active site at every kernel offset of every site, ``−1`` where there is none.

    Args:
        grid_coord: ``(N, 3)`` integer voxel coordinates, unique within each batch element
            (duplicates are not supported and raise :class:`UserError`).
        batch: ``(N,)`` batch index of every site, or ``None`` for a single element.
        kernel_size: odd kernel size ``k``.

    Returns:
        ``(N, k³)`` int64 ``nbr`` with ``grid_coord[nbr[i, j]] == grid_coord[i] + offsets[j]`` in
        the same batch element (``offsets = kernel_offsets(k)``), or ``nbr[i, j] == −1``.

    Each site gets an integer key ``((b·Dx + x)·Dy + y)·Dz + z`` over a box padded by ``r`` on
    every side, so the key of ``p + o`` is ``key(p) + key(o)`` with no carry between axes; the
    neighbours are then found by ``searchsorted`` in the sorted keys.
    """
    offsets = kernel_offsets(kernel_size).to(grid_coord.device)
    n = grid_coord.shape[0]
    if n == 0:
        return torch.empty(0, len(offsets), dtype=torch.long, device=grid_coord.device)
    pad = kernel_size // 2
    coord = grid_coord.long()
    coord = coord - coord.min(dim=0).values + pad
    dims = (coord.max(dim=0).values + pad + 1).tolist()
    b = torch.zeros(n, dtype=torch.long, device=coord.device) if batch is None else batch.long()
    if (int(b.max()) + 1) * math.prod(dims) >= 2**63:
        raise UserError(
            f"voxel grid {dims} is too large to index neighbours: use a larger grid size"
        )
    strides = torch.tensor([dims[1] * dims[2], dims[2], 1], device=coord.device)
    key = b * math.prod(dims) + (coord * strides).sum(dim=1)
    sorted_key, rows = torch.sort(key)
    if bool((sorted_key[1:] == sorted_key[:-1]).any()):
        raise UserError("duplicate voxel coordinates in one point cloud: voxelise the points first")
    wanted = key[:, None] + (offsets * strides).sum(dim=1)
    slot = torch.searchsorted(sorted_key, wanted).clamp_(max=n - 1)
    found = sorted_key[slot] == wanted
    return torch.where(found, rows[slot], -1)


def submanifold_conv3d(
    feat: Tensor, neighbours: Tensor, weight: Tensor, bias: Tensor | None
) -> Tensor:
    """Submanifold convolution ``out(p) = Σ_j W_j · f(nbr(p, j)) + bias`` over a neighbour table.

    Args:
        feat: ``(N, C_in)`` features of the active sites.
        neighbours: ``(N, k³)`` table from :func:`neighbour_index` (``−1`` = no site).
        weight: ``(C_out, k, k, k, C_in)`` kernel in spconv's layout; ``W_j`` is
            ``weight[:, a, b, c, :]`` for the ``j``-th row-major ``(a, b, c)``.
        bias: ``(C_out,)`` or ``None``.

    Returns:
        ``(N, C_out)`` in ``feat``'s dtype and device. The offsets are visited one at a time,
        each adding ``f(rows with a neighbour) @ W_jᵀ``, so memory stays ``O(N·C)``.
    """
    c_out, c_in = weight.shape[0], weight.shape[-1]
    kernels = weight.to(feat.dtype).reshape(c_out, -1, c_in)
    if kernels.shape[1] != neighbours.shape[1]:
        raise ValueError(
            f"kernel has {kernels.shape[1]} offsets, the neighbour table {neighbours.shape[1]}"
        )
    out = feat.new_zeros(feat.shape[0], c_out)
    for j in range(kernels.shape[1]):
        column = neighbours[:, j]
        rows = torch.nonzero(column >= 0).squeeze(1)
        out.index_add_(0, rows, feat[column[rows]] @ kernels[:, j].T)
    return out if bias is None else out + bias.to(feat.dtype)


class SubMConv3d(nn.Module):
    """Drop-in for ``spconv.SubMConv3d`` (stride 1) whose state dict has spconv's keys and shapes:
    ``weight`` ``(C_out, k, k, k, C_in)`` and ``bias`` ``(C_out,)``.

    Initialised as PTv3 initialises its sparse convolutions (``_init_weights``): weight from a
    normal with std 0.02 truncated at ±2, bias zero; checkpoints overwrite both.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True
    ) -> None:
        super().__init__()
        kernel_offsets(kernel_size)  # validates the size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        k = kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, k, k, k, in_channels))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_channels)) if bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, feat: Tensor, neighbours: Tensor) -> Tensor:
        """``(N, C_in)`` features and a ``(N, k³)`` :func:`neighbour_index` → ``(N, C_out)``."""
        return submanifold_conv3d(feat, neighbours, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"bias={self.bias is not None}"
        )
