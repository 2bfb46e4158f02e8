"""Deterministic synthetic scenes: a textured room, a moving camera and moving spheres.

The scene is rendered by vectorised numpy ray casting (one batch of rays per frame, no per-pixel
Python loops), so it needs no GPU and no data files. It exists to give the dynamic-mask pipeline an
input whose ground truth (depth, camera poses, which pixels move) is known exactly.

Scene layout (world units are metres):

* **Room**: the inside of the axis-aligned box ``x in [-3, 3]``, ``y in [-1.5, 1.5]``,
  ``z in [-2, 5]`` (6 m wide, 3 m high, 7 m deep; centre ``(0, 0, 1.5)``). The world frame follows
  the camera convention: ``y`` points *down*, so the ceiling is ``y = -1.5`` and the floor is
  ``y = +1.5``. Each of the six faces has its own procedural texture: a smooth two-colour gradient,
  a checkerboard with a face-specific period and 5-8 discs and rectangles, all in muted
  (low-saturation) colours so that the objects stand out.
* **Camera**: moves along a horizontal arc of radius about 3 m around the room centre, starting
  behind it (``z`` about -1.5) and looking at a point near the centre that sways sideways a little,
  so the camera both translates and yaws. The arc spans ``+-0.2 * camera_motion`` radians over the
  whole clip (``camera_motion = 0``: static camera). Seed-dependent jitter moves the arc slightly.
* **Objects**: ``num_objects`` spheres (radius 0.35-0.5 m) near the room centre, each in its own
  saturated colour with a darker checker pattern fixed to the sphere. Object ``k`` follows a curved
  path: a straight segment of length ``1.2 * object_speed`` m, mostly sideways to the camera, plus
  a perpendicular bulge of up to ``0.25 * object_speed`` m. Paths span the whole clip whatever the
  number of frames. Objects occlude the room and each other (nearest hit wins).

Conventions:

* Camera frame: OpenCV (x right, y down, z forward).
* ``extrinsics[t]`` is the ``3x4`` world-to-camera matrix ``[R | t]``: ``X_cam = R @ X_world + t``.
* ``intrinsics[t]`` is the pinhole matrix ``K`` with ``fx = fy = (W / 2) / tan(fov_deg / 2)`` and
  principal point ``(W / 2, H / 2)``.
* Pixel centres: pixel ``(u, v)`` (column ``u``, row ``v``, integer indices) is rendered with the
  ray through the continuous image point ``(u + 0.5, v + 0.5)``; a camera point ``X_cam`` projects
  to ``K @ X_cam / z`` and lands in pixel ``(floor(x), floor(y))``.
* ``depth`` is z-depth (the ``z`` coordinate in the camera frame), not distance along the ray.
* ``dynamic_masks`` marks pixels whose visible surface is an object that moves during the clip
  (none when ``object_speed = 0`` or ``num_objects = 0``); ``object_ids`` marks every object.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field

import numpy as np

from vggt4d.errors import UserError

ROOM_MIN = np.array([-3.0, -1.5, -2.0])
ROOM_MAX = np.array([3.0, 1.5, 5.0])
ROOM_CENTER = (ROOM_MIN + ROOM_MAX) / 2.0

MAX_OBJECTS = 8
MAX_MOTION = 3.0  # upper bound for camera_motion and object_speed: keeps the camera in the room

#: Built-in object colours (saturated, far from the muted room palette), used in this order.
OBJECT_PALETTE = np.array(
    [
        [0.95, 0.08, 0.08],  # red
        [0.10, 0.85, 0.10],  # green
        [0.10, 0.30, 1.00],  # blue
        [1.00, 0.85, 0.00],  # yellow
        [0.90, 0.10, 0.90],  # magenta
        [0.00, 0.90, 0.90],  # cyan
        [1.00, 0.50, 0.00],  # orange
        [0.55, 0.10, 1.00],  # violet
    ]
)

_LIGHT_DIR = np.array([0.3, -0.8, -0.5]) / np.linalg.norm([0.3, -0.8, -0.5])  # towards the light
_CHECKER_PERIODS = np.array([0.22, 0.28, 0.35, 0.42, 0.5, 0.6, 0.75])  # metres, one per face
_FACE_AXES = ((2, 1), (0, 2), (0, 1))  # surface coordinates (a, b) of faces normal to x, y, z


@dataclass
class SyntheticConfig:
    """Settings of :func:`render_scene` (OmegaConf structured-config compatible)."""

    num_frames: int = 12
    width: int = 280
    height: int = 210
    num_objects: int = 1
    seed: int = 0  # textures, object paths and camera jitter derive from it
    fov_deg: float = 60.0  # horizontal field of view
    camera_motion: float = 1.0  # scales how far the camera travels, 0 (static) to 3
    object_speed: float = 1.0  # scales object displacement over the clip, 0 (static) to 3
    object_colors: list[float] = field(default_factory=list)  # flat RGB in [0, 1], 3 per object

    def validate(self) -> None:
        """Raise :class:`UserError` naming the first bad field, its value and the valid range."""
        checks = [
            ("num_frames", self.num_frames, 2, None),
            ("width", self.width, 28, None),
            ("height", self.height, 28, None),
            ("num_objects", self.num_objects, 0, MAX_OBJECTS),
            ("camera_motion", self.camera_motion, 0.0, MAX_MOTION),
            ("object_speed", self.object_speed, 0.0, MAX_MOTION),
        ]
        for name, value, low, high in checks:
            if value < low or (high is not None and value > high):
                valid = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise UserError(f"synthetic.{name} = {value} is invalid: must be {valid}")
        if not 10.0 < self.fov_deg < 150.0:
            raise UserError(
                f"synthetic.fov_deg = {self.fov_deg} is invalid: must be in (10, 150) degrees"
            )
        colors = list(self.object_colors)
        if colors:
            if len(colors) != 3 * self.num_objects:
                raise UserError(
                    f"synthetic.object_colors has {len(colors)} values: must be empty or "
                    f"3 per object (3 * num_objects = {3 * self.num_objects})"
                )
            bad = [c for c in colors if not 0.0 <= c <= 1.0]
            if bad:
                raise UserError(
                    f"synthetic.object_colors value {bad[0]} is invalid: must be in [0, 1]"
                )


@dataclass
class SyntheticScene:
    """A rendered clip and its exact ground truth (T frames of H x W pixels, K objects)."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    depth: np.ndarray  # (T, H, W) float32 z-depth in metres, > 0 everywhere
    dynamic_masks: np.ndarray  # (T, H, W) bool, True where a moving object is the visible surface
    intrinsics: np.ndarray  # (T, 3, 3) float32 pinhole K (pixel (u, v) centre at (u+.5, v+.5))
    extrinsics: np.ndarray  # (T, 3, 4) float32 world-to-camera [R | t], OpenCV camera axes
    object_ids: np.ndarray  # (T, H, W) int16, 0 = room, k = object k (1-based)
    object_centers: np.ndarray = field(  # (T, K, 3) float32 world sphere centres per frame
        default_factory=lambda: np.zeros((0, 0, 3), np.float32)
    )
    object_radii: np.ndarray = field(  # (K,) float32 sphere radii in metres
        default_factory=lambda: np.zeros((0,), np.float32)
    )


@dataclass
class _FaceTexture:
    """Procedural texture of one room face, in the face's surface coordinates (a, b) in metres."""

    color0: np.ndarray  # (3,) gradient start colour
    color1: np.ndarray  # (3,) gradient end colour
    grad_dir: np.ndarray  # (2,) unit direction of the gradient in (a, b)
    grad_freq: float  # radians per metre of the gradient's cosine
    grad_phase: float
    period: float  # checkerboard cell size in metres
    offset: np.ndarray  # (2,) checkerboard offset in metres
    shapes: list[tuple[bool, np.ndarray, np.ndarray, np.ndarray]]  # (is_disc, centre, size, rgb)


def _muted_color(rng: np.random.Generator) -> np.ndarray:
    """A random low-saturation colour, shape (3,), values in [0, 1]."""
    hue, sat, val = rng.uniform(0.0, 1.0), rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.9)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val))


def _face_bounds(face: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper corner, each shape (2,), of face ``face`` in its (a, b) coordinates."""
    a_axis, b_axis = _FACE_AXES[face // 2]
    return ROOM_MIN[[a_axis, b_axis]], ROOM_MAX[[a_axis, b_axis]]


def _make_textures(rng: np.random.Generator) -> list[_FaceTexture]:
    """Six distinct face textures (order: -x, +x, -y, +y, -z, +z faces)."""
    periods = rng.permutation(_CHECKER_PERIODS)[:6]
    textures = []
    for face in range(6):
        low, high = _face_bounds(face)
        shapes = []
        for _ in range(int(rng.integers(5, 9))):
            centre = rng.uniform(low, high)
            size = rng.uniform(0.2, 0.7, size=2)
            shapes.append((bool(rng.integers(2)), centre, size, _muted_color(rng)))
        angle = rng.uniform(0.0, 2.0 * np.pi)
        textures.append(
            _FaceTexture(
                color0=_muted_color(rng),
                color1=_muted_color(rng),
                grad_dir=np.array([np.cos(angle), np.sin(angle)]),
                grad_freq=2.0 * np.pi / rng.uniform(3.0, 6.0),
                grad_phase=rng.uniform(0.0, 2.0 * np.pi),
                period=float(periods[face]),
                offset=rng.uniform(0.0, 1.0, size=2),
                shapes=shapes,
            )
        )
    return textures


def _face_color(tex: _FaceTexture, ab: np.ndarray) -> np.ndarray:
    """Albedo of surface points ``ab`` (N, 2) on a face; returns (N, 3) in [0, 1]."""
    g = 0.5 + 0.5 * np.cos(tex.grad_freq * (ab @ tex.grad_dir) + tex.grad_phase)
    color = tex.color0 + (tex.color1 - tex.color0) * g[:, None]
    cells = np.floor((ab + tex.offset) / tex.period).astype(np.int64)
    checker = (cells[:, 0] + cells[:, 1]) % 2
    color = color * (0.75 + 0.5 * checker)[:, None]
    for is_disc, centre, size, rgb in tex.shapes:
        rel = (ab - centre) / size
        inside = (rel**2).sum(axis=1) <= 1.0 if is_disc else np.abs(rel).max(axis=1) <= 1.0
        color[inside] = rgb
    return np.clip(color, 0.0, 1.0)


def _look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-world rotation (3, 3) whose columns are the camera x (right), y (down), z axes."""
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(np.array([0.0, 1.0, 0.0]), forward)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.stack([right, down, forward], axis=1)


def _camera_path(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Camera-to-world rotations (T, 3, 3) and camera centres (T, 3) in world coordinates."""
    radius = 3.0 + rng.uniform(-0.2, 0.2)
    height = -0.3 + rng.uniform(-0.1, 0.1)
    phase = rng.uniform(-0.1, 0.1)
    target_offset = np.array([rng.uniform(-0.15, 0.15), 0.15, rng.uniform(-0.2, 0.2)])
    s = np.linspace(-0.5, 0.5, cfg.num_frames)
    phi = phase + 0.4 * cfg.camera_motion * s
    rotations, centres = [], []
    for phi_t, s_t in zip(phi, s, strict=True):
        eye = ROOM_CENTER + np.array([radius * np.sin(phi_t), height, -radius * np.cos(phi_t)])
        sway = np.array([0.3 * cfg.camera_motion * s_t, 0.0, 0.0])
        rotations.append(_look_at(eye, ROOM_CENTER + target_offset + sway))
        centres.append(eye)
    return np.stack(rotations), np.stack(centres)


def _object_paths(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sphere centres (T, K, 3) in world coordinates and radii (K,)."""
    k = cfg.num_objects
    radii = rng.uniform(0.35, 0.5, size=k)
    slots = 1.6 * ((np.arange(k) + 0.5) / max(k, 1) - 0.5)
    base = ROOM_CENTER + np.stack(
        [
            slots + rng.uniform(-0.2, 0.2, size=k),
            rng.uniform(-0.3, 0.4, size=k),
            rng.uniform(-0.6, 0.6, size=k),
        ],
        axis=1,
    )
    psi = rng.uniform(-0.6, 0.6, size=k) + np.pi * rng.integers(0, 2, size=k)
    zeros = np.zeros(k)
    direction = np.stack([np.cos(psi), zeros, np.sin(psi)], axis=1)
    side = np.stack([-np.sin(psi), zeros, np.cos(psi)], axis=1)
    beta = rng.uniform(0.0, 2.0 * np.pi, size=k)
    bulge = np.cos(beta)[:, None] * np.array([0.0, -1.0, 0.0]) + np.sin(beta)[:, None] * side
    u = np.linspace(0.0, 1.0, cfg.num_frames)[:, None, None]
    offsets = 0.6 * (2.0 * u - 1.0) * direction + 0.25 * np.sin(np.pi * u) * bulge
    return base + cfg.object_speed * offsets, radii


def _intrinsics(cfg: SyntheticConfig) -> np.ndarray:
    """Pinhole matrix (3, 3): square pixels, principal point at the image centre."""
    focal = (cfg.width / 2.0) / np.tan(np.deg2rad(cfg.fov_deg) / 2.0)
    return np.array([[focal, 0.0, cfg.width / 2.0], [0.0, focal, cfg.height / 2.0], [0, 0, 1.0]])


def _camera_rays(k_mat: np.ndarray, width: int, height: int) -> np.ndarray:
    """Camera-frame ray directions (H * W, 3) with z = 1 through pixel centres (u+.5, v+.5)."""
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    pix = np.stack([u.ravel() + 0.5, v.ravel() + 0.5, np.ones(u.size)], axis=1)
    return pix @ np.linalg.inv(k_mat).T


def _intersect_room(eye: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exit distance (N,) along ``dirs`` (N, 3) from ``eye`` (3,) inside the room, and face (N,).

    Faces are numbered ``2 * axis + (1 if the ray leaves through the max side else 0)``.
    """
    positive = dirs > 0
    bound = np.where(positive, ROOM_MAX, ROOM_MIN)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_axes = np.where(dirs != 0, (bound - eye) / dirs, np.inf)
    axis = np.argmin(t_axes, axis=1)
    rows = np.arange(len(dirs))
    return t_axes[rows, axis], 2 * axis + positive[rows, axis]


def _intersect_spheres(
    eye: np.ndarray, dirs: np.ndarray, centres: np.ndarray, radii: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit distance (N,) (inf for none) and sphere index (N,) for rays ``dirs`` (N, 3).

    ``centres`` is (K, 3) and ``radii`` is (K,); only hits in front of ``eye`` count.
    """
    best_t = np.full(len(dirs), np.inf)
    best_k = np.full(len(dirs), -1)
    a = (dirs**2).sum(axis=1)
    for k, (centre, radius) in enumerate(zip(centres, radii, strict=True)):
        rel = eye - centre
        half_b = dirs @ rel
        disc = half_b**2 - a * (rel @ rel - radius**2)
        with np.errstate(invalid="ignore"):
            t = (-half_b - np.sqrt(disc)) / a
        hit = (disc >= 0) & (t > 0) & (t < best_t)
        best_t[hit] = t[hit]
        best_k[hit] = k
    return best_t, best_k


def _lambert(normals: np.ndarray) -> np.ndarray:
    """Mild Lambert shading factor (N,) in [0.6, 1] for unit normals (N, 3)."""
    return 0.6 + 0.4 * np.clip(normals @ _LIGHT_DIR, 0.0, None)


def _shade_room(points: np.ndarray, faces: np.ndarray, textures: list[_FaceTexture]) -> np.ndarray:
    """Shaded colour (N, 3) of room points (N, 3) lying on ``faces`` (N,)."""
    color = np.zeros_like(points)
    for face, tex in enumerate(textures):
        sel = faces == face
        if not sel.any():
            continue
        axis = face // 2
        normal = np.zeros(3)
        normal[axis] = -1.0 if face % 2 else 1.0  # pointing into the room
        ab = points[sel][:, list(_FACE_AXES[axis])]
        color[sel] = _face_color(tex, ab) * _lambert(normal[None])[0]
    return color


def _shade_sphere(
    points: np.ndarray, centre: np.ndarray, radius: float, rgb: np.ndarray
) -> np.ndarray:
    """Shaded colour (N, 3) of points (N, 3) on a sphere: ``rgb`` with a darker checker."""
    normals = (points - centre) / radius
    lon = np.arctan2(normals[:, 2], normals[:, 0])
    lat = np.arcsin(np.clip(normals[:, 1], -1.0, 1.0))
    checker = (np.floor(lon / (np.pi / 4)) + np.floor(lat / (np.pi / 6))).astype(np.int64) % 2
    return rgb * (0.55 + 0.45 * checker)[:, None] * _lambert(normals)[:, None]


def render_scene(cfg: SyntheticConfig) -> SyntheticScene:
    """Render the clip described by ``cfg`` (validated first); deterministic in ``cfg``."""
    cfg.validate()
    tex_rng, cam_rng, obj_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(3)
    )
    textures = _make_textures(tex_rng)
    cam_rot, cam_centres = _camera_path(cfg, cam_rng)
    obj_centres, radii = _object_paths(cfg, obj_rng)
    colors = (
        np.asarray(list(cfg.object_colors), dtype=np.float64).reshape(-1, 3)
        if len(cfg.object_colors)
        else OBJECT_PALETTE[: cfg.num_objects]
    )
    moving = np.abs(obj_centres - obj_centres[:1]).max(axis=(0, 2)) > 0
    k_mat = _intrinsics(cfg)
    rays_cam = _camera_rays(k_mat, cfg.width, cfg.height)

    t_count, h, w = cfg.num_frames, cfg.height, cfg.width
    frames = np.zeros((t_count, h * w, 3))
    depth = np.zeros((t_count, h * w))
    ids = np.zeros((t_count, h * w), dtype=np.int16)
    for t in range(t_count):
        eye = cam_centres[t]
        dirs = rays_cam @ cam_rot[t].T  # world directions; the ray parameter is z-depth
        t_room, faces = _intersect_room(eye, dirs)
        t_obj, k_obj = _intersect_spheres(eye, dirs, obj_centres[t], radii)
        on_obj = t_obj < t_room
        depth[t] = np.where(on_obj, t_obj, t_room)
        points = eye + dirs * depth[t][:, None]
        room = ~on_obj
        frames[t, room] = _shade_room(points[room], faces[room], textures)
        for k in range(cfg.num_objects):
            sel = on_obj & (k_obj == k)
            frames[t, sel] = _shade_sphere(points[sel], obj_centres[t, k], radii[k], colors[k])
            ids[t, sel] = k + 1

    rotation = np.transpose(cam_rot, (0, 2, 1))  # world-to-camera
    translation = -np.einsum("tij,tj->ti", rotation, cam_centres)
    moving_ids = np.concatenate([[False], moving])
    return SyntheticScene(
        frames=np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8).reshape(-1, h, w, 3),
        depth=depth.astype(np.float32).reshape(-1, h, w),
        dynamic_masks=moving_ids[ids].reshape(-1, h, w),
        intrinsics=np.repeat(k_mat[None], t_count, axis=0).astype(np.float32),
        extrinsics=np.concatenate([rotation, translation[:, :, None]], axis=2).astype(np.float32),
        object_ids=ids.reshape(-1, h, w),
        object_centers=obj_centres.astype(np.float32),
        object_radii=radii.astype(np.float32),
    )
