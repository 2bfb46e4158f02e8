"""NumPy reference for the ``gridsample`` benchmark: Pointcept's ``GridSample`` as Pointcept writes
it, and the synthetic point cloud the benchmark grid-samples.

:func:`grid_sample_train` follows ``pointcept/datasets/transform.py`` (``GridSample.__call__`` in
train mode with ``return_inverse`` and ``return_grid_coord``, and its ``fnv_hash_vec`` /
``ravel_hash_vec``) line for line, copies included, so that it costs what Pointcept costs. Only
what feeds outputs the benchmark does not use is left out (``scaled_coord -= min_coord``, used
for ``return_displacement``, and ``index_operator`` over the other point attributes). It is
written independently of :mod:`vggt4d.gridsample` so that it can check it.
"""

from __future__ import annotations

import numpy as np


def fnv_hash_vec(arr: np.ndarray) -> np.ndarray:
    """FNV64-1A over the columns of an (N, D) integer array, in uint64 (wraps modulo 2**64)."""
    assert arr.ndim == 2
    arr = arr.copy()
    arr = arr.astype(np.uint64, copy=False)
    hashed_arr = np.uint64(14695981039346656037) * np.ones(arr.shape[0], dtype=np.uint64)
    for j in range(arr.shape[1]):
        hashed_arr *= np.uint64(1099511628211)
        hashed_arr = np.bitwise_xor(hashed_arr, arr[:, j])
    return hashed_arr


def ravel_hash_vec(arr: np.ndarray) -> np.ndarray:
    """Row-major ravel of ``arr − min`` over ``max + 1`` cells per axis, in uint64."""
    assert arr.ndim == 2
    arr = arr.copy()
    arr -= arr.min(0)
    arr = arr.astype(np.uint64, copy=False)
    arr_max = arr.max(0).astype(np.uint64) + 1
    keys = np.zeros(arr.shape[0], dtype=np.uint64)
    for j in range(arr.shape[1] - 1):  # "Fortran style indexing", as Pointcept calls it
        keys += arr[:, j]
        keys *= arr_max[j + 1]
    keys += arr[:, -1]
    return keys


def grid_sample_train(coord: np.ndarray, grid_size: float, hash_type: str = "fnv",
                      rng: np.random.RandomState | None = None) -> dict[str, np.ndarray]:
    """Pointcept ``GridSample(mode="train", return_inverse=True, return_grid_coord=True)``.

    Returns the sorted unique ``keys`` (uint64), ``count`` per voxel, ``inverse`` (N,) voxel of
    every point, ``idx_unique`` (V,) the point picked in every voxel, ``grid_coord`` (V, 3) of
    the picked points and ``min_coord`` (3,). ``rng`` stands in for the global ``np.random``.
    """
    rng = np.random if rng is None else rng
    scaled_coord = coord / np.array(grid_size)  # float64 under NumPy 2 promotion
    grid_coord = np.floor(scaled_coord).astype(int)
    min_coord = grid_coord.min(0)
    grid_coord -= min_coord
    min_coord = min_coord * np.array(grid_size)
    key = fnv_hash_vec(grid_coord) if hash_type == "fnv" else ravel_hash_vec(grid_coord)
    idx_sort = np.argsort(key)
    key_sort = key[idx_sort]
    keys, inverse, count = np.unique(key_sort, return_inverse=True, return_counts=True)
    idx_select = (
        np.cumsum(np.insert(count, 0, 0)[0:-1])
        + rng.randint(0, count.max(), count.size) % count
    )
    idx_unique = idx_sort[idx_select]
    point_inverse = np.zeros_like(inverse)
    point_inverse[idx_sort] = inverse
    return {"keys": keys, "count": count, "inverse": point_inverse, "idx_unique": idx_unique,
            "grid_coord": grid_coord[idx_unique], "min_coord": min_coord}


def synthetic_cloud(points: int = 8_000_000, frames: int = 8, seed: int = 0) -> np.ndarray:
    """(points, 3) float32: ``frames`` depth frames of a furnished room, back-projected.

    A 6 × 5 × 3 m room (walls, floor, ceiling) with a few spheres and boxes in it, seen by pinhole
    cameras (1000 px wide, 70° field of view) at random places inside it looking roughly
    horizontally; each pixel's ray hits the nearest surface, and the depth gets noise that grows
    with its square (1.5 mm at 1 m), as a depth sensor's or a depth network's would. Points are
    dense near the cameras and sparse far away, and overlapping frames pile up in the same cells.
    """
    rng = np.random.default_rng(seed)
    room = np.array([6.0, 5.0, 3.0])
    spheres = [(np.array([1.5, 1.2, 0.5]), 0.5), (np.array([4.2, 3.5, 0.8]), 0.8),
               (np.array([3.0, 1.0, 1.6]), 0.3)]
    boxes = [(np.array([0.2, 3.8, 0.0]), np.array([1.4, 4.8, 0.9])),  # a table-sized block
             (np.array([4.5, 0.2, 0.0]), np.array([5.8, 0.8, 2.0]))]  # a wardrobe
    width = 1000
    per_frame = [points // frames + (i < points % frames) for i in range(frames)]
    clouds = []
    for count in per_frame:
        height = -(-count // width)
        centre = rng.uniform([1.5, 1.5, 1.2], [4.5, 3.5, 1.8])
        yaw, pitch = rng.uniform(0, 2 * np.pi), rng.uniform(-0.3, 0.1)
        forward = np.array([np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch),
                            np.sin(pitch)])
        right = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
        up = np.cross(right, forward)
        focal = width / 2 / np.tan(np.radians(35))
        pixel = np.arange(count)
        u = (pixel % width - width / 2 + 0.5) / focal
        v = (pixel // width - height / 2 + 0.5) / focal
        rays = forward + u[:, None] * right - v[:, None] * up
        rays /= np.linalg.norm(rays, axis=1, keepdims=True)
        with np.errstate(divide="ignore"):
            inverse_rays = 1 / rays
        exits = np.where(rays > 0, room - centre, -centre) * inverse_rays
        depth = np.min(np.where(rays != 0, exits, np.inf), axis=1)  # the room from inside
        for middle, radius in spheres:
            offset = centre - middle
            b = rays @ offset
            disc = b * b - (offset @ offset - radius * radius)
            t = -b - np.sqrt(np.maximum(disc, 0))
            depth = np.where((disc > 0) & (t > 0), np.minimum(depth, t), depth)
        for low, high in boxes:
            with np.errstate(invalid="ignore"):
                t0, t1 = (low - centre) * inverse_rays, (high - centre) * inverse_rays
            near = np.nanmax(np.minimum(t0, t1), axis=1)
            far = np.nanmin(np.maximum(t0, t1), axis=1)
            depth = np.where((near <= far) & (near > 0), np.minimum(depth, near), depth)
        depth = depth * (1 + 0.0015 * depth * rng.standard_normal(count))
        clouds.append((centre + depth[:, None] * rays).astype(np.float32))
    return np.concatenate(clouds)
