"""``latent.*``: scene points → voxel tokens, embeddings and Concerto/PTv3 features
(:mod:`vggt4d.latent`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from vggt4d.errors import UserError

NUM_LEVELS = 5
"""PTv3 v3m2 encoder levels (stages)."""


class Hash(StrEnum):
    """Pointcept GridSample keys: FNV-1a over (x, y, z) or a row-major ravel."""

    fnv = "fnv"
    ravel = "ravel"


class CameraEmbedding(StrEnum):
    """``c2w``: the 12 entries of camera-to-world [R | C], zero-padded to 16 (the token script);
    ``centre_direction_fov``: centre, viewing direction and field of view (8)."""

    c2w = "c2w"
    centre_direction_fov = "centre_direction_fov"


class CameraFrame(StrEnum):
    """Frame of the cameras in ``cam_emb``: the tokens' encoder frame, or DA3's world."""

    encoder = "encoder"
    world = "world"


class Encoder(StrEnum):
    """PTv3 variant: tiny (tests and demo) | small | base | large | none (no features)."""

    none = "none"
    tiny = "tiny"
    small = "small"
    base = "base"
    large = "large"


class SaveDtype(StrEnum):
    fp16 = "fp16"
    fp32 = "fp32"


@dataclass
class LatentConfig:
    """Voxels, embeddings and the encoder (see :mod:`vggt4d.latent`)."""

    grid_size: float = 0.02
    """Voxel pitch in metres of the encoder frame (Concerto's grid size)."""
    hash: Hash = Hash.fnv
    dynamic_voxels: bool = False
    """Bin dynamic points in (x, y, z, t) and static ones in (x, y, z)."""
    time_bin: int = 1
    """Frames per time bin of dynamic voxels."""
    time_dim: int = 8
    """Width of the sin/cos time embedding (ω = 100, 10, 1, 0.1, ...)."""
    camera_embedding: CameraEmbedding = CameraEmbedding.c2w
    camera_frame: CameraFrame = CameraFrame.encoder
    encoder: Encoder = Encoder.large
    weights: str = "concerto_large"
    """A local .pth, a released name (concerto_small/base/large, from the hub Pointcept/Concerto)
    or random (seeded)."""
    levels: list[int] | None = None
    """Encoder levels concatenated per voxel (0 = finest); null = all (1728 channels for large),
    [2, 3, 4] = the official demo's three (1536)."""
    shuffle_orders: bool = False
    """Permute the serialization orders per pooling level as in training (seeded)."""
    save_dtype: SaveDtype = SaveDtype.fp16
    """Float tensors of ``scene_latent.pt``; tensors that overflow fp16 are kept in fp32."""
    ply: bool = True
    """Also write ``scene_latent.ply``: coloured voxel centres."""
    seed: int = 0
    """Seeds random encoder weights and voxel picks (the run's ``seed`` unless set)."""

    def check(self) -> None:
        from vggt4d.ptv3.checkpoint import RELEASED

        if not (math.isfinite(self.grid_size) and self.grid_size > 0):
            raise UserError(f"latent.grid_size={self.grid_size} must be > 0 (metres, e.g. 0.02)")
        if self.time_bin < 1:
            raise UserError(f"latent.time_bin={self.time_bin} must be >= 1 frame")
        if self.time_dim < 2 or self.time_dim % 2:
            raise UserError(f"latent.time_dim={self.time_dim} must be an even number >= 2 "
                            f"(sin/cos pairs)")
        levels = None if self.levels is None else list(self.levels)
        if levels is not None and (not levels or levels != sorted(set(levels))
                                   or not 0 <= levels[0] <= levels[-1] < NUM_LEVELS):
            raise UserError(f"latent.levels={levels} must be increasing encoder levels "
                            f"0-{NUM_LEVELS - 1} (or null = all)")
        if self.encoder == Encoder.none or self.weights == "random":
            return
        released = RELEASED.get(self.weights)
        if released is not None and released != self.encoder:
            raise UserError(f"latent.weights={self.weights} is the {released} encoder but "
                            f"latent.encoder={self.encoder}: set latent.encoder={released}")
        if released is None and not Path(self.weights).expanduser().is_file():
            raise UserError(f"latent.weights={self.weights}: no such file (use a local .pth, "
                            f"one of {', '.join(RELEASED)}, or random)")
