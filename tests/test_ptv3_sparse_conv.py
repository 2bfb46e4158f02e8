"""Submanifold convolution against spconv 2.3.8, a dense conv3d and brute-force neighbours."""

from __future__ import annotations

import pytest
import spconv.pytorch as spconv
import torch
import torch.nn.functional as F

from vggt4d.errors import UserError
from vggt4d.ptv3.sparse_conv import (
    SubMConv3d,
    kernel_offsets,
    neighbour_index,
    submanifold_conv3d,
)


def random_sites(n: int, box: int, batches: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` distinct voxels of a ``box³`` grid per batch element, rows in random order."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.cat([torch.randperm(box**3, generator=g)[:n] for _ in range(batches)])
    coord = torch.stack([cells // box**2, cells // box % box, cells % box], dim=1)
    batch = torch.arange(batches).repeat_interleave(n)
    rows = torch.randperm(n * batches, generator=g)
    return coord[rows], batch[rows]


def test_kernel_offsets_are_row_major():
    offsets = kernel_offsets(3)
    assert offsets.dtype == torch.int64
    assert offsets.tolist() == [
        [a - 1, b - 1, c - 1] for a in range(3) for b in range(3) for c in range(3)
    ]
    assert kernel_offsets(1).tolist() == [[0, 0, 0]]
    with pytest.raises(ValueError):
        kernel_offsets(2)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_neighbour_index_matches_dict_lookup(kernel_size):
    coord, batch = random_sites(60, box=6, batches=2, seed=0)
    coord = coord + torch.tensor([3, -2, 7])  # not anchored at 0
    site = {(int(b), *map(int, c)): i for i, (c, b) in enumerate(zip(coord, batch, strict=True))}
    r = kernel_size // 2
    steps = range(-r, r + 1)
    expected = [
        [site.get((b, x + dx, y + dy, z + dz), -1) for dx in steps for dy in steps for dz in steps]
        for (b, x, y, z) in site
    ]
    nbr = neighbour_index(coord, batch, kernel_size)
    assert nbr.dtype == torch.int64
    assert nbr.tolist() == expected
    assert (nbr >= 0).sum() > 2 * len(coord)  # the cloud is dense enough to have neighbours


def test_neighbour_index_without_batch_and_duplicates():
    coord = torch.tensor([[0, 0, 0], [0, 0, 1], [5, 5, 5]])
    nbr = neighbour_index(coord, None)
    assert nbr[0].tolist() == [-1] * 13 + [0, 1] + [-1] * 12
    assert nbr[:, 13].tolist() == [0, 1, 2]  # the centre is the site itself
    with pytest.raises(UserError, match="duplicate"):
        neighbour_index(torch.tensor([[1, 2, 3], [0, 0, 0], [1, 2, 3]]), None)
    # the same cell in different batch elements is fine
    assert neighbour_index(coord[[0, 0]], torch.tensor([0, 1])).ge(0).sum() == 2


def spconv_reference(coord, batch, feat, weight, bias):
    """spconv 2.3.8 on CPU, which refuses eval mode with a bias and has no CPU backward: so train
    mode under no_grad. Single-threaded: with several torch threads its CPU kernels race and now
    and then return garbage rows (traveller59/spconv#679, Pointcept/Pointcept#405)."""
    conv = spconv.SubMConv3d(feat.shape[1], weight.shape[0], kernel_size=3, bias=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
            indices = torch.cat([batch[:, None], coord], dim=1).int()
            shape = (coord.max(dim=0).values + 1).tolist()
            x = spconv.SparseConvTensor(feat, indices, shape, int(batch.max()) + 1)
            y = conv.train()(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y.indices, indices)  # submanifold: output sites are the input sites
    return y.features


def test_matches_spconv():
    coord, batch = random_sites(400, box=10, batches=2, seed=1)
    g = torch.Generator().manual_seed(2)
    feat = torch.randn(len(coord), 16, generator=g)
    conv = SubMConv3d(16, 24)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(24, 3, 3, 3, 16, generator=g))
        conv.bias.copy_(torch.randn(24, generator=g))
    assert list(conv.state_dict()) == ["weight", "bias"]
    SubMConv3d(16, 24).load_state_dict(spconv.SubMConv3d(16, 24, 3).state_dict())  # same keys
    reference = spconv_reference(coord, batch, feat, conv.weight, conv.bias)
    out = conv(feat, neighbour_index(coord, batch))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5 * reference.abs().max())


def dense_reference(coord, batch, feat, weight, bias):
    """Scatter into a dense float64 grid, cross-correlate with padding 1, read back at the sites.

    ``conv3d`` computes ``out[p] = Σ_{a,b,c} w[:, :, a, b, c] · in[p + (a, b, c) − 1]``, the
    submanifold formula with spconv's ``(out, a, b, c, in)`` kernel moved to ``(out, in, a, b, c)``.
    """
    shape = (coord.max(dim=0).values + 1).tolist()
    grid = torch.zeros(int(batch.max()) + 1, feat.shape[1], *shape, dtype=torch.float64)
    grid[batch, :, coord[:, 0], coord[:, 1], coord[:, 2]] = feat.double()
    dense = F.conv3d(grid, weight.double().permute(0, 4, 1, 2, 3), bias.double(), padding=1)
    return dense[batch, :, coord[:, 0], coord[:, 1], coord[:, 2]]


def test_matches_dense_convolution():
    coord, batch = random_sites(150, box=7, batches=2, seed=3)
    g = torch.Generator().manual_seed(4)
    feat = torch.randn(len(coord), 5, generator=g, dtype=torch.float64)
    weight = torch.randn(6, 3, 3, 3, 5, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    out = submanifold_conv3d(feat, neighbour_index(coord, batch), weight, bias)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, dense_reference(coord, batch, feat, weight, bias))
    without_bias = submanifold_conv3d(feat, neighbour_index(coord, batch), weight, None)
    torch.testing.assert_close(without_bias + bias, out)


def test_gradients():
    coord, batch = random_sites(6, box=2, batches=2, seed=5)
    nbr = neighbour_index(coord, batch)
    g = torch.Generator().manual_seed(6)
    feat = torch.randn(len(coord), 2, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 3, 3, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda f, w, b: submanifold_conv3d(f, nbr, w, b), (feat, weight, bias)
    )


def test_module_initialisation():
    torch.manual_seed(7)
    conv = SubMConv3d(8, 4, bias=False)
    assert conv.weight.shape == (4, 3, 3, 3, 8)
    assert conv.bias is None and list(conv.state_dict()) == ["weight"]
    assert 0.015 < conv.weight.std() < 0.025 and conv.weight.mean().abs() < 0.005
    assert torch.equal(SubMConv3d(8, 4).bias, torch.zeros(4))
