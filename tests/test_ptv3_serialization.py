"""Space-filling-curve codes against brute force, curve properties and Pointcept's own output."""

from __future__ import annotations

import pytest
import torch

from vggt4d.errors import UserError
from vggt4d.ptv3.serialization import ORDERS, encode, serialize, serialized_depth

# Known answers from Pointcept's own code: pointcept/models/utils/serialization/ (default.py,
# z_order.py, hilbert.py) at Pointcept/Pointcept commit d74c646db6abec569d0f23e0c34e7ddfce142789,
# copied to a scratch directory outside this repository and run with torch 2.13 (CPU):
#   g = torch.Generator().manual_seed(2024)
#   for depth in (3, 9, 16):
#       coord = torch.randint(0, 2**depth, (6, 3), generator=g)
#       batch = torch.randint(0, 3, (6,), generator=g)
#       encode(coord, batch, depth=depth, order="z"), encode(coord, batch, depth=depth,
#       order="hilbert")
# (facebookresearch/sonata's sonata/serialization is the same code.) Rows: depth, coord, batch,
# z codes, hilbert codes.
POINTCEPT_CODES = [
    (
        3,
        [[0, 2, 0], [0, 3, 4], [6, 7, 1], [7, 1, 4], [3, 2, 2], [0, 5, 4]],
        [0, 1, 2, 1, 0, 1],
        [16, 594, 1459, 870, 60, 706],
        [8, 639, 1300, 956, 43, 641],
    ),
    (
        9,
        [[351, 367, 11], [284, 91, 39], [54, 114, 183], [329, 358, 218], [244, 42, 287],
         [97, 150, 283]],
        [0, 0, 2, 1, 0, 2],
        [102322111, 67693915, 271315321, 238885532, 26433369, 290599581],
        [68876169, 127238326, 283940895, 216448215, 24527265, 301368292],
    ),
    (
        16,
        [[63798, 46980, 19001], [10838, 46390, 39934], [1428, 32126, 8328],
         [44818, 57441, 55130], [64458, 5511, 14000], [22248, 15797, 33374]],
        [0, 0, 1, 1, 2, 2],
        [236852921684897, 109103631692792, 292081510213520, 544367459521066, 724547811711154,
         617262681111242],
        [168418095014703, 71885977170792, 287056934718636, 468906108568103, 842445771545317,
         615650066376985],
    ),
]  # fmt: skip


def bf_morton(x: int, y: int, z: int, depth: int) -> int:
    key = 0
    for i in range(depth):
        key |= ((x >> i) & 1) << (3 * i + 2)
        key |= ((y >> i) & 1) << (3 * i + 1)
        key |= ((z >> i) & 1) << (3 * i)
    return key


def full_cube(depth: int) -> torch.Tensor:
    r = torch.arange(2**depth)
    return torch.cartesian_prod(r, r, r)


def no_batch(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


@pytest.mark.parametrize("depth", [1, 3, 8, 9, 16])
def test_z_order_is_bit_interleaving(depth):
    coord = torch.randint(0, 2**depth, (200, 3), generator=torch.Generator().manual_seed(depth))
    code = encode(coord, no_batch(200), depth, "z")
    assert code.dtype == torch.int64
    assert code.tolist() == [bf_morton(*c, depth) for c in coord.tolist()]


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_hilbert_is_a_face_adjacent_walk_through_the_cube(depth):
    cube = full_cube(depth)
    code = encode(cube, no_batch(len(cube)), depth, "hilbert")
    assert sorted(code.tolist()) == list(range(8**depth))  # a bijection onto 0 … 8^depth − 1
    walk = cube[torch.argsort(code)]
    steps = (walk[1:] - walk[:-1]).abs().sum(dim=1)
    assert steps.eq(1).all()  # consecutive codes are face neighbours
    assert walk[0].tolist() == [0, 0, 0]


@pytest.mark.parametrize("depth", [3, 9, 16])
@pytest.mark.parametrize("curve", ["z", "hilbert"])
def test_trans_swaps_x_and_y(depth, curve):
    coord = torch.randint(0, 2**depth, (100, 3), generator=torch.Generator().manual_seed(1))
    batch = torch.randint(0, 4, (100,), generator=torch.Generator().manual_seed(2))
    expected = encode(coord[:, [1, 0, 2]], batch, depth, curve)
    assert torch.equal(encode(coord, batch, depth, f"{curve}-trans"), expected)
    assert not torch.equal(encode(coord, batch, depth, curve), expected)


@pytest.mark.parametrize("order", ORDERS)
def test_batch_index_sits_above_the_curve_key(order):
    depth = 7
    coord = torch.randint(0, 2**depth, (100, 3), generator=torch.Generator().manual_seed(3))
    batch = torch.randint(0, 9, (100,), generator=torch.Generator().manual_seed(4))
    code = encode(coord, batch, depth, order)
    assert torch.equal(code >> (3 * depth), batch)
    assert torch.equal(code & (2 ** (3 * depth) - 1), encode(coord, no_batch(100), depth, order))


@pytest.mark.parametrize("row", POINTCEPT_CODES, ids=lambda r: f"depth{r[0]}")
def test_codes_equal_pointcepts(row):
    depth, coord, batch, z_codes, hilbert_codes = row
    coord, batch = torch.tensor(coord), torch.tensor(batch)
    assert encode(coord, batch, depth, "z").tolist() == z_codes
    assert encode(coord, batch, depth, "hilbert").tolist() == hilbert_codes
    assert encode(coord.int(), batch.int(), depth, "hilbert").tolist() == hilbert_codes


def random_cloud(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` distinct voxels per batch in a 40³ box, in 2 batches, in shuffled row order."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(40**3, generator=g)[: 2 * n]
    coord = torch.stack([cells // 1600, cells // 40 % 40, cells % 40], dim=1)
    batch = torch.arange(2 * n) % 2
    return coord, batch


def test_serialize_orders_and_inverses():
    coord, batch = random_cloud(300, seed=5)
    ser = serialize(coord, batch, ORDERS)
    depth = (int(coord.max()) + 1).bit_length()
    assert ser.code.shape == ser.order.shape == ser.inverse.shape == (4, 600)
    positions = torch.arange(600)
    for o, name in enumerate(ORDERS):
        assert torch.equal(ser.code[o], encode(coord, batch, depth, name))
        assert ser.code[o][ser.order[o]].diff().gt(0).all()
        assert torch.equal(ser.order[o][ser.inverse[o]], positions)
        assert torch.equal(ser.inverse[o][ser.order[o]], positions)
    assert batch[ser.order[0]].diff().ge(0).all()  # batches stay contiguous


def test_serialize_shuffle_is_seeded():
    coord, batch = random_cloud(100, seed=6)
    plain = serialize(coord, batch, ORDERS)
    first, again = (
        serialize(coord, batch, ORDERS, shuffle=True, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    )
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(perm, torch.arange(4))  # the seed does shuffle
    for field in ("code", "order", "inverse"):
        assert torch.equal(getattr(first, field), getattr(again, field))
        assert torch.equal(getattr(first, field), getattr(plain, field)[perm])


def test_depth_is_bit_length_of_max_plus_one():
    assert serialized_depth(torch.tensor([[0, 0, 0]])) == 1
    assert serialized_depth(torch.tensor([[7, 0, 2]])) == 4  # 8 cells need 4 bits, as in Pointcept
    assert serialized_depth(torch.tensor([[0, 6, 2]])) == 3
    assert serialized_depth(torch.tensor([[0, 65534, 2]])) == 16


def test_depth_limit_is_a_user_error():
    big = torch.tensor([[0, 0, 0], [3, 65535, 1]])
    with pytest.raises(UserError, match="65536 cells"):
        serialized_depth(big)
    with pytest.raises(UserError, match="65536 cells"):
        serialize(big, torch.zeros(2, dtype=torch.long), ORDERS)
    with pytest.raises(UserError, match="depth"):
        serialize(big % 8, torch.zeros(2, dtype=torch.long), ORDERS, depth=17)
