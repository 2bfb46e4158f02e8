"""Scene points: the kept pixels of a DA3 prediction as one coloured, timed 3-D point cloud.

Per pixel ``(t, v, u)`` of the prediction (depth, colour and cameras all at processing size, so
colour indices are depth indices — the research scripts' resolution mix-up cannot happen here):

* position ``X = C_t + depth · R_t^T K_t^{-1} (u + ½, v + ½, 1)^T`` in DA3's world
  (:func:`vggt4d.cameras.backproject`); the whole clip shares one world, never per-frame shifts;
* colour of the processed frame; frame index ``t`` (also the camera index: one camera per frame
  of a monocular clip) and time ``t / (T − 1)``;
* normal ``n ∝ (P[v, u+1] − P[v, u−1]) × (P[v+1, u] − P[v−1, u])`` from the neighbouring
  pixels' points, flipped so that ``n · (C_t − X) > 0`` (facing its camera, as in Concerto's
  video-lifted demos); zero where a neighbour is missing or filtered out, and at depth
  discontinuities (a neighbour's depth differs by more than ``normal_max_jump`` relatively);
* dynamic probability (the masks stage's soft map) and dynamic flag (its binary mask, the
  refined one when present); zero without masks.

Filters: finite positive depth, below ``max_depth`` when set; confidence at least the clip's
``conf_percentile``-th percentile (DA3's confidence is ``1 + exp(x) ≥ 1``, so fixed thresholds such
as 0.7 filter nothing: the research scripts' defect 1, docs/method.md §11); sky probability
below ``sky_threshold`` when the model has a sky head.

Encoder frame (Concerto/PTv3 expects z up and metres): ``X_e = s · R_up X`` with ``R_up`` the
rotation by −90° about x, ``(x, y, z) ↦ (x, z, −y)`` (OpenCV's y points down, so −y is up: right
when DA3's world, the first camera's frame, is upright; ``up=cameras`` estimates the vertical
from all cameras instead, :func:`camera_vertical`), and
``s`` = 1 for a metric model (or ``scale=raw``: DA3's units as they are, as the token script did)
or ``median_depth / median(kept depth)`` (``scale=median_depth``): DA3's any-view models predict
depth up to scale, and the encoder's 2 cm grid needs a plausible metric size. ``s`` and ``R_up``
are recorded as the similarity ``world_to_scene``.

Long videos: the clip-wide quantities (the confidence percentile, the median kept depth, the
vertical) are measured first, a block of frames at a time (:class:`ClipPoints`); the points are
then produced block by block, so no step holds every frame's full-resolution maps. The
percentile and median are exact — the same values as NumPy's ``percentile`` (``linear``) and
``median`` of all the values at once — from order statistics found by a radix selection on the
floats' bit patterns (:class:`StreamedValues`: 16 bits per pass over the blocks, two passes for
float32; written here because NumPy selects only within one array in memory).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields

import numpy as np

from vggt4d.cameras import backproject, camera_centres
from vggt4d.config.points import PointsConfig, Up
from vggt4d.errors import UserError

log = logging.getLogger(__name__)

PLANAR_RIGHT_VECTORS = 0.005
"""Second / largest eigenvalue of the cameras' right-vector scatter above which they span a
plane (a heading spread of about 4° standard deviation), whose normal is then the vertical..."""
FLAT_RIGHT_VECTORS = 0.1
"""... provided the smallest eigenvalue is below this fraction of the second (the right vectors
lie close to that plane: roll noise small against the heading spread)."""
MAX_TILT_FROM_CAMERAS_DEG = 45.0
"""... and the normal lies within this angle of the cameras' mean up vector."""

#: ``R_up``: OpenCV (x right, y down, z forward) → z up, a −90° rotation about x.
Y_DOWN_TO_Z_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


@dataclass
class ScenePoints:
    """N points in the scene frame (``world_to_scene`` applied), one per kept pixel."""

    coord: np.ndarray  # (N, 3) float32 scene-frame position (``world_to_scene``)
    color: np.ndarray  # (N, 3) uint8 RGB
    normal: np.ndarray  # (N, 3) float32 unit normal facing the camera, or zeros
    frame: np.ndarray  # (N,) int64 frame (= camera) index, non-decreasing
    pixel: np.ndarray  # (N,) int64 flat pixel index t·H·W + v·W + u
    dynamic_prob: np.ndarray  # (N,) float32 soft dynamic map, 0 without masks
    dynamic: np.ndarray  # (N,) bool binary dynamic mask, False without masks

    def __len__(self) -> int:
        return len(self.coord)

    def take(self, index: np.ndarray) -> ScenePoints:
        """The points at ``index`` (an int array or a bool mask over the N points)."""
        return ScenePoints(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def subsample(self, max_per_frame: int, seed: int | np.random.Generator) -> ScenePoints:
        """At most ``max_per_frame`` points of every frame, drawn without replacement by a
        generator seeded with ``seed`` (or ``seed`` itself, a generator: frames drawn block by
        block with one generator give the points drawn at once), in their original order;
        0 = all."""
        if max_per_frame == 0:
            return self
        rng = np.random.default_rng(seed)
        keep = np.zeros(len(self), dtype=bool)
        _, starts, counts = np.unique(self.frame, return_index=True, return_counts=True)
        for start, count in zip(starts, counts, strict=True):  # points are in frame order
            members = np.arange(start, start + count)
            if len(members) > max_per_frame:
                members = rng.choice(members, size=max_per_frame, replace=False)
            keep[members] = True
        return self.take(keep)


@dataclass
class PointCloud:
    """What :func:`scene_points` returns: the points, the pixels they came from and the frame."""

    points: ScenePoints
    kept: np.ndarray  # (T, H, W) bool pixels that became points
    world_to_scene: np.ndarray  # (4, 4) float64 similarity X_scene = s · R_up · X_world
    scale: float  # s
    scale_mode: str  # metric | median_depth | raw
    num_frames: int


RADIX_BITS = 16
"""Bits of the float keys resolved per pass of :class:`StreamedValues`."""


def sortable_keys(values: np.ndarray) -> np.ndarray:
    """Float32/float64 values (no NaN) → unsigned integers in the same order: the sign bit set
    for positive floats, every bit flipped for negative ones (IEEE 754 ordering)."""
    unsigned = np.uint32 if values.dtype.itemsize == 4 else np.uint64
    bits = np.ascontiguousarray(values).view(unsigned)
    sign = unsigned(1) << unsigned(8 * values.dtype.itemsize - 1)
    return np.where(bits & sign, ~bits, bits | sign)


class StreamedValues:
    """Exact order statistics, percentile and median of float values seen a block at a time.

    ``blocks()`` yields 1-D arrays of the values (it is called once per pass). The first pass
    counts the values (NaN apart) and histograms the top 16 bits of their :func:`sortable_keys`;
    each further pass resolves the next 16 bits of the bins holding the wanted ranks, so float32
    needs two passes and float64 four, with 2¹⁶ counters each.
    """

    def __init__(self, blocks: Callable[[], Iterable[np.ndarray]], dtype=np.float32) -> None:
        self.blocks = blocks
        self.dtype = np.dtype(dtype)
        self.bits = 8 * self.dtype.itemsize
        self.count = self.nans = 0
        self._top = np.zeros(2**RADIX_BITS, np.int64)
        for values in self.blocks():
            values = np.asarray(values, dtype=self.dtype).ravel()
            keys = sortable_keys(values[~np.isnan(values)])
            self._top += np.bincount((keys >> (self.bits - RADIX_BITS)).astype(np.int64),
                                     minlength=2**RADIX_BITS)
            self.count += len(keys)
            self.nans += len(values) - len(keys)

    def _keys(self) -> Iterator[np.ndarray]:
        for values in self.blocks():
            values = np.asarray(values, dtype=self.dtype).ravel()
            yield sortable_keys(values[~np.isnan(values)])

    def order_statistics(self, ranks: list[int]) -> list:
        """The values of 0-based ``ranks`` in sorted order (NaN left out), as ``dtype``."""
        state = [_in_histogram(self._top, rank) for rank in ranks]  # (prefix, rank in bin)
        known = RADIX_BITS
        while known < self.bits:
            prefixes = sorted({prefix for prefix, _ in state})
            shift = self.bits - known - RADIX_BITS
            counts = {prefix: np.zeros(2**RADIX_BITS, np.int64) for prefix in prefixes}
            for keys in self._keys():
                high = (keys >> (self.bits - known)).astype(np.int64)
                for prefix in prefixes:
                    chosen = keys[high == prefix] >> shift
                    counts[prefix] += np.bincount((chosen & (2**RADIX_BITS - 1)).astype(
                        np.int64), minlength=2**RADIX_BITS)
            state = [(prefix << RADIX_BITS | low, rest) for prefix, rank in state
                     for low, rest in [_in_histogram(counts[prefix], rank)]]
            known += RADIX_BITS
        unsigned = np.uint32 if self.bits == 32 else np.uint64
        sign = unsigned(1) << unsigned(self.bits - 1)
        keys = np.array([prefix for prefix, _ in state], dtype=unsigned)
        bits = np.where(keys & sign, keys ^ sign, ~keys)
        return list(bits.view(self.dtype))

    def percentile(self, q: float):
        """``np.percentile(values, q)`` (``linear``; NaN when a value is NaN), bit for bit:
        virtual index ``(n − 1)·q/100``, NumPy's two-sided interpolation in ``dtype``."""
        if self.nans:
            return self.dtype.type(np.nan)
        virtual = (self.count - 1) * np.true_divide(q, 100)
        if virtual >= self.count - 1:
            return self.order_statistics([self.count - 1])[0]
        below = int(np.floor(virtual))
        gamma = float(virtual - below)
        low, high = self.order_statistics([below, below + 1])
        difference = high - low
        return high - difference * (1 - gamma) if gamma >= 0.5 else low + difference * gamma

    def median(self):
        """``np.median(values)``: the middle value, or the mean of the two middle ones computed
        in ``dtype`` as NumPy's ``mean`` does."""
        if self.nans:
            return self.dtype.type(np.nan)
        half = self.count // 2
        if self.count % 2:
            return self.order_statistics([half])[0]
        low, high = self.order_statistics([half - 1, half])
        return (low + high) / self.dtype.type(2)


def _in_histogram(counts: np.ndarray, rank: int) -> tuple[int, int]:
    """The bin of 0-based ``rank`` in a histogram and the rank within that bin."""
    cumulative = np.cumsum(counts)
    found = int(np.searchsorted(cumulative, rank, side="right"))
    return found, rank - (int(cumulative[found - 1]) if found else 0)


def valid_depth(depth: np.ndarray, sky: np.ndarray | None, settings: PointsConfig) -> np.ndarray:
    """(…, H, W) bool: finite positive depth (below ``max_depth`` when set), sky probability
    < ``sky_threshold``."""
    keep = np.isfinite(depth) & (depth > 0)
    if settings.max_depth > 0:
        keep &= depth < settings.max_depth
    if sky is not None:
        keep &= ~(sky >= settings.sky_threshold)
    return keep


def keep_mask(depth: np.ndarray, conf: np.ndarray, sky: np.ndarray | None,
              settings: PointsConfig) -> np.ndarray:
    """(T, H, W) bool: :func:`valid_depth`, confidence ≥ the clip's ``conf_percentile``-th
    percentile (over valid-depth pixels)."""
    blocks = [range(len(depth))]
    threshold = conf_threshold(depth, conf, sky, settings, blocks)
    keep = valid_depth(depth, sky, settings)
    return keep if threshold is None else keep & (conf >= threshold)


def conf_threshold(depth: np.ndarray, conf: np.ndarray, sky: np.ndarray | None,
                   settings: PointsConfig, blocks: list[range]):
    """The clip's ``conf_percentile``-th percentile of the confidence over its valid-depth
    pixels, measured over the frame ``blocks`` (None: no filter, or no valid pixel)."""
    if settings.conf_percentile <= 0:
        return None

    def values() -> Iterator[np.ndarray]:
        for block in blocks:
            rows = slice(block.start, block.stop)
            yield np.asarray(conf[rows])[valid_depth(np.asarray(depth[rows]), _rows(sky, rows),
                                                     settings)]

    streamed = StreamedValues(values, np.result_type(conf.dtype, np.float32))
    return streamed.percentile(settings.conf_percentile) if streamed.count else None


def _rows(array: np.ndarray | None, rows: slice) -> np.ndarray | None:
    return None if array is None else np.asarray(array[rows])


def estimate_normals(world: np.ndarray, depth: np.ndarray, valid: np.ndarray,
                     centres: np.ndarray, max_jump: float) -> np.ndarray:
    """Camera-facing unit normals from neighbouring pixels' points: (T, H, W, 3) world points,
    (T, H, W) depth, (T, H, W) bool valid, (T, 3) camera centres → (T, H, W, 3) float32.

    ``n ∝ (P[v, u+1] − P[v, u−1]) × (P[v+1, u] − P[v−1, u])``, flipped where ``n · (C − P) < 0``;
    zero at the border, where any of the four neighbours is invalid or its depth differs from
    the pixel's by more than ``max_jump`` relatively, and where the cross product vanishes.
    """
    world = world.astype(np.float64)
    normals = np.zeros_like(world)
    du = world[:, 1:-1, 2:] - world[:, 1:-1, :-2]
    dv = world[:, 2:, 1:-1] - world[:, :-2, 1:-1]
    cross = np.cross(du, dv)
    centre_depth = depth[:, 1:-1, 1:-1]
    ok = valid[:, 1:-1, 1:-1].copy()
    for rows, cols in ((slice(1, -1), slice(2, None)), (slice(1, -1), slice(None, -2)),
                       (slice(2, None), slice(1, -1)), (slice(None, -2), slice(1, -1))):
        neighbour = depth[:, rows, cols]
        with np.errstate(invalid="ignore"):
            ok &= valid[:, rows, cols] & (np.abs(neighbour - centre_depth)
                                          <= max_jump * centre_depth)
    length = np.linalg.norm(cross, axis=-1)
    ok &= length > 0
    unit = np.where(ok[..., None], cross / np.where(ok, length, 1.0)[..., None], 0.0)
    to_camera = centres[:, None, None, :] - world[:, 1:-1, 1:-1]
    facing = np.sign(np.einsum("thwc,thwc->thw", unit, to_camera))
    normals[:, 1:-1, 1:-1] = unit * np.where(facing < 0, -1.0, 1.0)[..., None]
    return normals.astype(np.float32)


def camera_vertical(extrinsics: np.ndarray) -> np.ndarray:
    """(T, 3, 4) world-to-camera → (3, 3) rotation ``R_up`` taking the cameras' vertical to +z and
    their mean heading to +y (for an upright first camera that is :data:`Y_DOWN_TO_Z_UP`).

    Hand-held and vehicle cameras barely roll, so each camera's right vector ``r_t = R_t^T e_x``
    is horizontal, whatever it pitches: when the right vectors span a plane (the heading
    changes, :data:`PLANAR_RIGHT_VECTORS`) and stay close to it (:data:`FLAT_RIGHT_VECTORS`),
    the vertical ``u`` is that plane's normal, the eigenvector of ``Σ r rᵀ`` with the smallest
    eigenvalue, signed to agree with the cameras' up vectors ``−R_t^T e_y``. Otherwise (one
    heading throughout, or roll comparable to the heading changes), or when that normal is more
    than :data:`MAX_TILT_FROM_CAMERAS_DEG` from the mean up vector, ``u`` is the mean up vector
    made orthogonal to the mean right vector (a common pitch then tilts it; a warning says so).
    """
    rot = np.asarray(extrinsics, dtype=np.float64)[:, :, :3]
    right, up, forward = rot[:, 0], -rot[:, 1], rot[:, 2]
    mean_up = up.mean(axis=0) / np.linalg.norm(up.mean(axis=0))
    values, vectors = np.linalg.eigh(right.T @ right / len(right))
    normal = vectors[:, 0] * (np.sign(vectors[:, 0] @ mean_up) or 1.0)
    if (values[1] > PLANAR_RIGHT_VECTORS * values[2] and values[0] < FLAT_RIGHT_VECTORS * values[1]
            and normal @ mean_up > np.cos(np.radians(MAX_TILT_FROM_CAMERAS_DEG))):
        vertical = normal
    else:
        log.warning("points.up=cameras: the cameras' right vectors do not span a clear "
                    "horizontal plane (one heading, or roll as large as the heading changes), so "
                    "the vertical is their mean up vector (tilted by any common pitch)")
        mean_right = right.mean(axis=0) / np.linalg.norm(right.mean(axis=0))
        vertical = mean_up - mean_up @ mean_right * mean_right
    vertical = vertical / np.linalg.norm(vertical)
    heading = forward.mean(axis=0) - forward.mean(axis=0) @ vertical * vertical
    if np.linalg.norm(heading) < 1e-6:  # looking straight up or down: any horizontal heading
        heading = np.cross(vertical, right.mean(axis=0))
    heading /= np.linalg.norm(heading)
    return np.stack([np.cross(heading, vertical), heading, vertical])


def world_to_scene(scale: float, up: str, extrinsics: np.ndarray | None = None) -> np.ndarray:
    """(4, 4) similarity ``X_scene = s · R_up · X_world``: ``R_up`` = :data:`Y_DOWN_TO_Z_UP` for
    ``up=z``, :func:`camera_vertical` of ``extrinsics`` for ``up=cameras``, identity for
    ``up=none``."""
    up = Up(up)
    rotation = camera_vertical(extrinsics) if up == "cameras" else (
        Y_DOWN_TO_Z_UP if up == "z" else np.eye(3))
    transform = np.eye(4)
    transform[:3, :3] = scale * rotation
    return transform


BLOCK_PIXELS = 1_000_000
"""Pixels per block of frames when a clip's points are produced block by block."""


def frame_blocks(num_frames: int, pixels_per_frame: int,
                 block_pixels: int = BLOCK_PIXELS) -> list[range]:
    """Consecutive frame ranges of about ``block_pixels`` pixels each (at least one frame)."""
    step = max(1, block_pixels // max(pixels_per_frame, 1))
    return [range(start, min(start + step, num_frames)) for start in range(0, num_frames, step)]


@dataclass
class ClipPoints:
    """A prediction's kept pixels as scene points, measured over the whole clip and produced a
    block of frames at a time (module docstring). The arrays may be memory maps: only the
    frames of one block are read at once.

    ``depth``, ``conf``, ``sky``, ``dynamic_prob``, ``dynamic`` are (T, H, W), ``frames``
    (T, H, W, 3), ``intrinsics`` (T, 3, 3), ``extrinsics`` (T, 3, 4); the rest is set by
    :meth:`measure`.
    """

    depth: np.ndarray
    conf: np.ndarray
    frames: np.ndarray
    intrinsics: np.ndarray
    extrinsics: np.ndarray
    settings: PointsConfig
    scale_mode: str
    sky: np.ndarray | None = None
    dynamic_prob: np.ndarray | None = None
    dynamic: np.ndarray | None = None
    blocks: list[range] | None = None
    threshold: float | None = None  # confidence threshold (None: no confidence filter)
    kept_count: int = 0
    scale: float = 1.0
    world_to_scene: np.ndarray | None = None  # (4, 4)

    @classmethod
    def measure(cls, depth: np.ndarray, conf: np.ndarray, frames: np.ndarray,
                intrinsics: np.ndarray, extrinsics: np.ndarray, settings: PointsConfig,
                scale_mode: str, sky: np.ndarray | None = None,
                dynamic_prob: np.ndarray | None = None, dynamic: np.ndarray | None = None,
                block_pixels: int = BLOCK_PIXELS) -> ClipPoints:
        """Check the arrays, then measure the confidence threshold, the kept pixels' median
        depth (scale) and the scene frame over blocks of about ``block_pixels`` pixels; raises
        :class:`UserError` when no pixel is kept."""
        num_frames, height, width = depth.shape
        for name, array in (("frames", frames), ("conf", conf), ("sky", sky),
                            ("dynamic_prob", dynamic_prob), ("dynamic", dynamic)):
            if array is not None and array.shape[:3] != depth.shape:
                raise UserError(f"{name} of shape {array.shape} does not match the depth maps "
                                f"{depth.shape}: they must come from the same prediction")
        clip = cls(depth, conf, frames, intrinsics, extrinsics, settings, scale_mode, sky,
                   dynamic_prob, dynamic, frame_blocks(num_frames, height * width, block_pixels))
        clip.threshold = conf_threshold(depth, conf, sky, settings, clip.blocks)
        kept_depth = StreamedValues(lambda: (np.asarray(depth[b.start:b.stop])[clip.kept(b)]
                                             for b in clip.blocks),
                                    np.result_type(depth.dtype, np.float32))
        clip.kept_count = kept_depth.count
        if not kept_depth.count:
            raise UserError(
                f"no point is left after filtering {num_frames} frames (conf_percentile="
                f"{settings.conf_percentile}, sky_threshold={settings.sky_threshold}, "
                f"max_depth={settings.max_depth}): lower points.conf_percentile, raise "
                f"points.sky_threshold or points.max_depth (0 = no limit)")
        if scale_mode == "median_depth":
            clip.scale = settings.median_depth / float(kept_depth.median())
        clip.world_to_scene = world_to_scene(clip.scale, settings.up, extrinsics)
        pixels = num_frames * height * width
        log.info("points: %d of %d pixels kept (%.1f%%), scale %.4g (%s)", kept_depth.count,
                 pixels, 100.0 * kept_depth.count / pixels, clip.scale, scale_mode)
        return clip

    @property
    def num_frames(self) -> int:
        return len(self.depth)

    def kept(self, frames: range) -> np.ndarray:
        """(F, H, W) bool pixels of ``frames`` that become points."""
        rows = slice(frames.start, frames.stop)
        keep = valid_depth(np.asarray(self.depth[rows]), _rows(self.sky, rows), self.settings)
        return keep if self.threshold is None else keep & (self.conf[rows] >= self.threshold)

    def points(self, frames: range, normals: bool | None = None) -> ScenePoints:
        """The points of ``frames`` (in frame order; ``normals`` False: zeros, default
        ``settings.normals``)."""
        settings = self.settings
        normals = settings.normals if normals is None else normals
        _, height, width = self.depth.shape
        rows = slice(frames.start, frames.stop)
        kept = self.kept(frames)
        transform = self.world_to_scene
        rotation, offset = transform[:3, :3], transform[:3, 3]
        centres = camera_centres(self.extrinsics[rows])
        coord, normal = [], []
        for t in range(len(kept)):  # one frame's (H, W, 3) maps at a time bounds the memory
            frame_kept = kept[t:t + 1]
            flat = np.flatnonzero(frame_kept)
            depth = np.asarray(self.depth[frames.start + t:frames.start + t + 1])
            cameras = slice(frames.start + t, frames.start + t + 1)
            world = backproject(np.where(frame_kept, depth, 0.0), self.intrinsics[cameras],
                                self.extrinsics[cameras])
            coord.append((world.reshape(-1, 3)[flat] @ rotation.T + offset).astype(np.float32))
            if normals:
                unit = estimate_normals(world, depth, frame_kept, centres[t:t + 1],
                                        settings.normal_max_jump)
                normal.append((unit.reshape(-1, 3)[flat] @ (rotation / self.scale).T)
                              .astype(np.float32))
            else:
                normal.append(np.zeros((len(flat), 3), np.float32))
        flat = np.flatnonzero(kept)
        prob = np.zeros(len(flat), np.float32) if self.dynamic_prob is None else \
            np.asarray(self.dynamic_prob[rows]).reshape(-1)[flat].astype(np.float32)
        moving = np.zeros(len(flat), bool) if self.dynamic is None else \
            np.asarray(self.dynamic[rows]).reshape(-1)[flat]
        offset_pixels = frames.start * height * width
        return ScenePoints(
            coord=np.concatenate(coord),
            color=np.asarray(self.frames[rows]).reshape(-1, 3)[flat],
            normal=np.concatenate(normal),
            frame=flat // (height * width) + frames.start,
            pixel=flat + offset_pixels,
            dynamic_prob=prob,
            dynamic=moving.astype(bool),
        )

    def point_blocks(self, normals: bool | None = None) -> Iterator[ScenePoints]:
        """:meth:`points` of every block in order."""
        for block in self.blocks:
            yield self.points(block, normals)


def scene_points(depth: np.ndarray, conf: np.ndarray, frames: np.ndarray,
                 intrinsics: np.ndarray, extrinsics: np.ndarray, settings: PointsConfig,
                 scale_mode: str, sky: np.ndarray | None = None,
                 dynamic_prob: np.ndarray | None = None,
                 dynamic: np.ndarray | None = None) -> PointCloud:
    """Every kept pixel of a prediction as a point in the scene frame, all at once.

    ``depth``, ``conf``, ``sky``, ``dynamic_prob`` (float) and ``dynamic`` (bool) are
    (T, H, W), ``frames`` (T, H, W, 3) uint8, ``intrinsics`` (T, 3, 3) in pixels of those
    frames, ``extrinsics`` (T, 3, 4) world-to-camera; ``scale_mode`` from
    :meth:`PointsConfig.scale_mode`. Raises :class:`UserError` when no pixel is kept.
    :class:`ClipPoints` gives the same points a block of frames at a time.
    """
    clip = ClipPoints.measure(depth, conf, frames, intrinsics, extrinsics, settings, scale_mode,
                              sky, dynamic_prob, dynamic)
    everything = range(len(depth))
    return PointCloud(clip.points(everything), clip.kept(everything), clip.world_to_scene,
                      clip.scale, scale_mode, len(depth))
