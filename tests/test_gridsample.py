"""Grid sampling against an independent brute-force Python implementation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vggt4d import gridsample
from vggt4d.errors import UserError
from vggt4d.gridsample import (
    MAX_CELLS,
    fnv_hash,
    group,
    group_sorted,
    ravel_hash,
    sample_test,
    sample_train,
    voxelize,
)

MASK64 = 2**64 - 1


# ---------------------------------------------------------------- brute force (Python ints)


def bf_fnv(cell: tuple[int, ...]) -> int:
    h = 14695981039346656037
    for c in cell:
        h = (h * 1099511628211) & MASK64
        h ^= c & MASK64
    return h


def bf_ravel(cells: list[tuple[int, ...]]) -> list[int]:
    mins = [min(c[j] for c in cells) for j in range(3)]
    dims = [max(c[j] for c in cells) - mins[j] + 1 for j in range(3)]
    return [
        ((c[0] - mins[0]) * dims[1] + (c[1] - mins[1])) * dims[2] + (c[2] - mins[2]) for c in cells
    ]


def bf_group(coord: torch.Tensor, g: float, hash_type: str):
    """Sorted unsigned keys, {key: [member indices in input order]}, per-point cells."""
    pts = coord.double().tolist()
    raw = [tuple(math.floor(v / g) for v in p) for p in pts]
    mins = [min(c[j] for c in raw) for j in range(3)]
    cells = [tuple(c[j] - mins[j] for j in range(3)) for c in raw]
    keys = [bf_fnv(c) for c in cells] if hash_type == "fnv" else bf_ravel(cells)
    members: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        members.setdefault(k, []).append(i)
    return sorted(members), members, keys, cells


def unsigned(t: torch.Tensor) -> list[int]:
    return [int(v) % 2**64 for v in t.tolist()]


def random_cloud(n: int = 2000, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # offset so floor(coord / g) is negative on some axes, varied scales per axis
    return torch.rand(n, 3, generator=gen) * torch.tensor([1.0, 0.6, 0.3]) - 0.25


# ---------------------------------------------------------------- hashes


def test_fnv_hash_bit_exact_including_overflow():
    gen = torch.Generator().manual_seed(0)
    small = torch.randint(0, 70, (500, 3), generator=gen)
    large = torch.randint(0, 2**62, (500, 3), generator=gen)
    negative = torch.randint(-(2**62), 0, (100, 3), generator=gen)
    grid = torch.cat([small, large, negative])
    got = unsigned(fnv_hash(grid))
    want = [bf_fnv(tuple(c)) for c in grid.tolist()]
    assert got == want
    # the high bit is set for some keys, so the int64 bit pattern really is negative there
    assert (fnv_hash(grid) < 0).any()


def test_ravel_hash_bit_exact():
    gen = torch.Generator().manual_seed(1)
    for high in (5, 300, 60000):
        grid = torch.randint(0, high, (1000, 3), generator=gen)
        got = ravel_hash(grid).tolist()
        assert got == bf_ravel([tuple(c) for c in grid.tolist()])


# ---------------------------------------------------------------- grouping


def assert_brute_force_grouping(vox, coord: torch.Tensor, grid_size: float, hash_type: str):
    keys, members, point_keys, cells = bf_group(coord, grid_size, hash_type)
    assert unsigned(vox.keys) == keys
    assert vox.counts.tolist() == [len(members[k]) for k in keys]
    # voxel of each point is that point's brute-force voxel
    voxel_index = {k: v for v, k in enumerate(keys)}
    assert vox.inverse.tolist() == [voxel_index[k] for k in point_keys]
    # stable order: voxels in key order, members in input order
    assert vox.order.tolist() == [i for k in keys for i in members[k]]
    assert vox.grid_coord.tolist() == [list(cells[members[k][0]]) for k in keys]
    assert vox.inverse.dtype == vox.counts.dtype == vox.grid_coord.dtype == torch.int64
    return cells


@pytest.mark.parametrize("hash_type", ["fnv", "ravel"])
@pytest.mark.parametrize("grid_size", [0.02, 0.07])
def test_group_matches_brute_force(hash_type, grid_size):
    coord = random_cloud(2000, seed=3)
    cells = assert_brute_force_grouping(group(coord, grid_size, hash_type), coord, grid_size,
                                        hash_type)
    grid_coord, min_coord = voxelize(coord, grid_size)
    assert grid_coord.dtype == torch.int64
    assert grid_coord.tolist() == [list(c) for c in cells]
    want_min = [math.floor(v / grid_size) * grid_size for v in coord.double().amin(0).tolist()]
    assert torch.allclose(min_coord.double(), torch.tensor(want_min, dtype=torch.float64))


@pytest.mark.parametrize("hash_type", ["fnv", "ravel"])
def test_counting_and_sorting_paths_agree_with_brute_force(hash_type, monkeypatch):
    """A dense cloud (the box has fewer cells than points) is grouped by counting per cell;
    the sorting path on the same points and the brute force must give the same voxels."""
    coord = random_cloud(3000, seed=13)
    calls = []
    counting = gridsample._group_dense
    monkeypatch.setattr(gridsample, "_group_dense", lambda *a: calls.append(1) or counting(*a))
    dense = group(coord, 0.09, hash_type)
    assert calls, "the counting path was not taken"
    sparse = group_sorted(coord, 0.09, hash_type)
    for vox in (dense, sparse):
        assert_brute_force_grouping(vox, coord, 0.09, hash_type)
    assert torch.equal(dense.min_coord, sparse.min_coord)


@pytest.mark.parametrize("hash_type", ["fnv", "ravel"])
def test_a_cloud_far_from_the_origin_is_counted_exactly(hash_type):
    """1e14 m away (floor(x / g) ~ 1e15, its products with the box strides beyond 2**53): the
    counting path must still match the brute force."""
    coord = random_cloud(3000, seed=15).double() + torch.tensor([1e14, -2e14, 5e13],
                                                                  dtype=torch.float64)
    assert_brute_force_grouping(group(coord, 0.09, hash_type), coord, 0.09, hash_type)


def test_sample_train_under_a_float64_default_dtype():
    vox = group(random_cloud(500, seed=16), 0.05)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pick = sample_train(vox, torch.Generator().manual_seed(0))
    finally:
        torch.set_default_dtype(previous)
    assert torch.equal(vox.inverse[pick], torch.arange(len(vox.keys)))


def test_cells_sharing_an_fnv_key_are_merged_as_pointcept_does(monkeypatch):
    """With a hash that collides (x + y + z), Pointcept groups by key, merging cells: the
    counting path must notice and give the same result as the brute force."""
    def weak_hash(grid_coord: torch.Tensor) -> torch.Tensor:
        return grid_coord.long().sum(dim=1)

    monkeypatch.setattr(gridsample, "fnv_hash", weak_hash)
    coord = random_cloud(3000, seed=14)
    vox = group(coord, 0.09, "fnv")
    raw = [tuple(math.floor(v / 0.09) for v in p) for p in coord.double().tolist()]
    mins = [min(c[j] for c in raw) for j in range(3)]
    keys = [sum(c[j] - mins[j] for j in range(3)) for c in raw]
    merged = sorted(set(keys))
    assert vox.keys.tolist() == merged
    assert vox.counts.tolist() == [keys.count(k) for k in merged]
    assert vox.inverse.tolist() == [merged.index(k) for k in keys]


def test_voxel_order_is_unsigned():
    # x spans ~60000 cells, so the x term (multiplied by the prime twice) reaches the top bit
    coord = random_cloud(2000, seed=4) * torch.tensor([600.0, 1.0, 1.0])
    vox = group(coord, 0.01, "fnv")
    assert (vox.keys < 0).any() and (vox.keys >= 0).any()  # both halves of uint64 present
    keys, _, _, _ = bf_group(coord, 0.01, "fnv")
    assert unsigned(vox.keys) == keys
    assert vox.inverse[vox.order].tolist() == sorted(vox.inverse.tolist())


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("hash_type", ["fnv", "ravel"])
def test_sample_train_one_member_per_voxel(hash_type):
    coord = random_cloud(2000, seed=5)
    vox = group(coord, 0.05, hash_type)
    keys, members, _, _ = bf_group(coord, 0.05, hash_type)
    pick = sample_train(vox, torch.Generator().manual_seed(7))
    assert pick.shape == (len(keys),)
    for v, (i, k) in enumerate(zip(pick.tolist(), keys, strict=True)):
        assert i in members[k]
        assert vox.inverse[i] == v
    again = sample_train(vox, torch.Generator().manual_seed(7))
    assert torch.equal(pick, again)
    other = sample_train(vox, torch.Generator().manual_seed(8))
    assert not torch.equal(pick, other)  # multi-member voxels exist, so the seed matters
    assert vox.counts.max() > 1


def test_sample_train_picks_every_member_equally_often():
    """Four points in one voxel, two in another: over 4000 seeds each member is picked a share
    of 1/4 (1/2) of the time (binomial 3-sigma bounds)."""
    coord = torch.tensor([[0.01, 0.01, 0.01], [0.5, 0.5, 0.5], [0.02, 0.03, 0.01],
                          [0.51, 0.52, 0.5], [0.03, 0.01, 0.04], [0.04, 0.04, 0.02]])
    vox = group(coord, 0.05, "fnv")
    picked = torch.zeros(len(coord), dtype=torch.int64)
    seeds = 4000
    for seed in range(seeds):
        picked[sample_train(vox, torch.Generator().manual_seed(seed))] += 1
    for members in ([0, 2, 4, 5], [1, 3]):
        share = 1 / len(members)
        sigma = math.sqrt(seeds * share * (1 - share))
        for i in members:
            assert abs(int(picked[i]) - seeds * share) < 3 * sigma, picked.tolist()


@pytest.mark.parametrize("hash_type", ["fnv", "ravel"])
def test_sample_test_parts_match_brute_force(hash_type):
    coord = random_cloud(2000, seed=6)
    vox = group(coord, 0.05, hash_type)
    keys, members, _, _ = bf_group(coord, 0.05, hash_type)
    parts = sample_test(vox)
    max_count = max(len(m) for m in members.values())
    assert len(parts) == max_count
    for i, part in enumerate(parts):
        assert part.tolist() == [members[k][i % len(members[k])] for k in keys]


# ---------------------------------------------------------------- planted scenes


def plane_frame(gen: torch.Generator, n: int = 20000) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * 2.0
    return torch.cat([xy, torch.full((n, 1), 0.01)], dim=1)


def ball_frame(gen: torch.Generator, centre: torch.Tensor, r: float, n: int = 3000):
    d = torch.randn(n, 3, generator=gen)
    d = d / d.norm(dim=1, keepdim=True)
    radius = r * torch.rand(n, 1, generator=gen) ** (1 / 3)
    return centre + d * radius


def test_static_plane_saturates():
    gen = torch.Generator().manual_seed(10)
    frames: list[torch.Tensor] = []
    counts = []
    for _ in range(6):
        frames.append(plane_frame(gen))
        counts.append(len(group(torch.cat(frames), 0.05).keys))
    assert counts[0] >= 1590  # 40 × 40 cells, nearly all hit by the first frame
    for c in counts[1:]:
        assert abs(c - counts[0]) <= 0.01 * counts[0]


def test_moving_ball_adds_voxels_in_proportion_to_path():
    g, r, step = 0.05, 0.15, 0.025
    gen = torch.Generator().manual_seed(11)
    plane = plane_frame(gen)
    base = len(group(plane, g).keys)
    frames = [plane]
    added = []
    for f in range(21):
        centre = torch.tensor([0.4 + f * step, 1.0, 0.6])
        frames.append(ball_frame(gen, centre, r))
        frames.append(plane_frame(gen))
        added.append(len(group(torch.cat(frames), g).keys) - base)
    ball_only = added[0]
    growth_10 = added[10] - ball_only  # path 0.25 m
    growth_20 = added[20] - ball_only  # path 0.50 m
    assert growth_10 > 0
    assert abs(growth_20 / growth_10 - 2.0) < 0.2
    # swept tube: about π r² per metre of path, in cells
    per_metre = growth_20 / (20 * step) * g**3
    assert 0.6 * math.pi * r**2 < per_metre < 1.6 * math.pi * r**2
    assert all(b >= a for a, b in itertools.pairwise(added))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("g", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_grid_size(g):
    with pytest.raises(UserError, match="grid size"):
        group(random_cloud(10), g)


def test_empty_points():
    with pytest.raises(UserError, match="empty"):
        group(torch.zeros(0, 3), 0.02)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_points(bad):
    coord = random_cloud(10)
    coord[3, 1] = bad
    with pytest.raises(UserError, match="NaN or infinite"):
        group(coord, 0.02)


def test_bad_shape():
    with pytest.raises(UserError, match="shape"):
        group(torch.zeros(5, 2), 0.02)


def test_extent_too_large_names_axis_and_a_fitting_size():
    coord = random_cloud(100)
    coord[0, 1] = 1500.0  # y spans ~1500 m: 75000 cells at 0.02 m
    with pytest.raises(UserError) as info:
        group(coord, 0.02)
    message = str(info.value)
    assert "\n" not in message
    assert "axis y" in message
    assert "m on axis" in message
    suggested = float(message.rsplit(">= ", 1)[1].split()[0])
    extent = float(coord[:, 1].max() - coord[:, 1].min())
    assert extent / MAX_CELLS < suggested < 1.01 * extent / (MAX_CELLS - 1)
    grid_coord, _ = voxelize(coord, suggested)  # the suggestion fits
    assert int(grid_coord.amax()) + 1 <= MAX_CELLS


def test_extent_at_limit_is_accepted():
    g = 1.0
    coord = torch.tensor([[0.5, 0.0, 0.0], [MAX_CELLS - 0.5, 0.0, 0.0]], dtype=torch.float64)
    grid_coord, _ = voxelize(coord, g)
    assert int(grid_coord[:, 0].max()) + 1 == MAX_CELLS
    coord[1, 0] = MAX_CELLS + 0.5
    with pytest.raises(UserError, match="axis x"):
        voxelize(coord, g)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    coord = random_cloud(2000, seed=12)
    for hash_type in ("fnv", "ravel"):
        cpu = group(coord, 0.03, hash_type)
        gpu = group(coord.cuda(), 0.03, hash_type)
        for name in ("keys", "inverse", "counts", "order", "grid_coord"):
            assert torch.equal(getattr(cpu, name), getattr(gpu, name).cpu()), name
        parts_cpu, parts_gpu = sample_test(cpu), sample_test(gpu)
        assert all(torch.equal(a, b.cpu()) for a, b in zip(parts_cpu, parts_gpu, strict=True))
        pick = sample_train(gpu, torch.Generator(device="cuda").manual_seed(0))
        assert torch.equal(gpu.inverse[pick], torch.arange(len(gpu.keys), device="cuda"))
