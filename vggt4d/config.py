"""Structured configs for the Hydra tree in ``conf/`` and their semantic validation.

Hydra validates keys and types at compose time against the dataclasses registered here (a typo'd
key or a wrong type fails with Hydra's own message). :func:`validate` then checks what types cannot
express (known model, bands inside the network, sizes) and returns plain dataclass objects, so every
stage after start-up works on typed, checked values.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from vggt4d.errors import UserError
from vggt4d.synthetic import SyntheticConfig

log = logging.getLogger(__name__)

PATCH_SIZE = 14
"""DA3 patch size in pixels: processing sizes are multiples of it."""

GIANT_BANDS = {"shallow": (1, 5), "middle": (6, 15), "deep": (18, 21)}
"""The user's layer bands for the 40-block DA3-giant (0-indexed, inclusive)."""

GIANT_DEPTH = 40

KNOWN_STAGES = ("predict",)
"""Stages the runner knows, in the order they may appear in ``pipeline``."""


def scale_band(band: tuple[int, int], num_blocks: int) -> tuple[int, int]:
    """Map a 40-block band to a network of ``num_blocks`` blocks at the same fraction of depth.

    The band is the half-open block interval ``[a, b + 1)`` of the giant; scaled by
    ``num_blocks / 40`` and floored it becomes ``[floor(a·n/40), floor((b+1)·n/40) − 1]``, kept at
    least one block wide. Consecutive giant bands stay disjoint and in order after scaling.
    """
    first, last = band
    start = math.floor(first * num_blocks / GIANT_DEPTH)
    end = max(start, math.floor((last + 1) * num_blocks / GIANT_DEPTH) - 1)
    return start, end


@dataclass
class BandsConfig:
    """Layer bands of the VGGT4D cues: 0-indexed backbone blocks, inclusive ``[first, last]``."""

    shallow: list[int] = field(default_factory=lambda: list(GIANT_BANDS["shallow"]))
    middle: list[int] = field(default_factory=lambda: list(GIANT_BANDS["middle"]))
    deep: list[int] = field(default_factory=lambda: list(GIANT_BANDS["deep"]))


@dataclass
class ModelConfig:
    """One DA3 variant and the depth table of the network whose attention is hooked.

    ``hooked_network`` is the attribute path from the DA3 network to the ``DepthAnything3Net``
    whose backbone is hooked: empty for plain variants, ``da3`` (the any-view giant) for the
    nested model, so no statistics are computed in its metric network.
    """

    name: str = MISSING
    preset: str = MISSING
    num_blocks: int = MISSING
    embed_dim: int = MISSING
    num_heads: int = MISSING
    head_dim: int = 64
    alt_start: int = -1
    global_blocks: list[int] = field(default_factory=list)
    out_layers: list[int] = field(default_factory=list)
    patch_start_idx: int = 1
    hooked_network: str = ""
    weights: str = MISSING
    ref_view_strategy: str = "saddle_balanced"
    bands: BandsConfig = field(default_factory=BandsConfig)


@dataclass
class ImagesData:
    """A folder of jpg/png frames, sorted by file name."""

    source: str = "images"
    path: str = MISSING
    stride: int = 1
    max_frames: int = 0


@dataclass
class VideoData:
    """A video file decoded by imageio-ffmpeg (no system ffmpeg needed), resampled to ``fps``."""

    source: str = "video"
    path: str = MISSING
    fps: float = 10.0
    max_frames: int = 0


@dataclass
class SyntheticData(SyntheticConfig):
    """The project's own rendered scene with ground truth (see :mod:`vggt4d.synthetic`)."""

    source: str = "synthetic"


@dataclass
class RunConfig:
    """Top level of ``conf/config.yaml``."""

    model: ModelConfig = MISSING
    data: Any = MISSING
    process_res: int = 504
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    pipeline: list[str] = field(default_factory=lambda: list(KNOWN_STAGES))
    cache_dir: str = "outputs/cache"
    memory_limit_gb: float | None = None


DTYPES = ("auto", "fp32", "bf16", "fp16")
REF_VIEW_STRATEGIES = ("first", "middle", "saddle_balanced", "saddle_sim_range")
PRESETS = ("vit_small", "vit_base", "vit_large", "vit_giant2")


def register_configs() -> None:
    """Register the schemas that the YAML files in ``conf/`` extend (``defaults: [*_schema]``)."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    store.store(group="model", name="model_schema", node=ModelConfig)
    store.store(group="data", name="images_schema", node=ImagesData)
    store.store(group="data", name="video_schema", node=VideoData)
    store.store(group="data", name="synthetic_schema", node=SyntheticData)


register_configs()


def round_process_res(process_res: int) -> int:
    """Nearest multiple of the patch size (at least one patch); warns when it changes."""
    if process_res < PATCH_SIZE:
        raise UserError(f"process_res={process_res} is too small: use at least {PATCH_SIZE}")
    rounded = max(PATCH_SIZE, round(process_res / PATCH_SIZE) * PATCH_SIZE)
    if rounded != process_res:
        log.warning("process_res=%d is not a multiple of %d; using %d", process_res,
                    PATCH_SIZE, rounded)
    return rounded


def check_bands(bands: BandsConfig, num_blocks: int) -> None:
    """Each band is ``[first, last]`` with ``0 <= first <= last < num_blocks``."""
    for name in ("shallow", "middle", "deep"):
        band = list(getattr(bands, name))
        if len(band) != 2 or not 0 <= band[0] <= band[1] < num_blocks:
            raise UserError(
                f"bands.{name}={band} is not a band of this model: give [first, last] with "
                f"0 <= first <= last <= {num_blocks - 1} (0-indexed blocks, inclusive)"
            )


def _check_model(model: ModelConfig) -> None:
    from depth_anything_3.registry import MODEL_REGISTRY

    if model.name not in MODEL_REGISTRY:
        raise UserError(
            f"unknown model.name '{model.name}'; known: {', '.join(MODEL_REGISTRY)}"
        )
    if model.preset not in PRESETS:
        raise UserError(f"model.preset='{model.preset}' is not one of {', '.join(PRESETS)}")
    if model.ref_view_strategy not in REF_VIEW_STRATEGIES:
        raise UserError(
            f"model.ref_view_strategy='{model.ref_view_strategy}' is not one of "
            f"{', '.join(REF_VIEW_STRATEGIES)}"
        )
    check_bands(model.bands, model.num_blocks)


def _check_data(data: Any) -> None:
    if isinstance(data, SyntheticData):
        data.validate()
    elif isinstance(data, ImagesData | VideoData):
        if data.max_frames < 0:
            raise UserError(f"data.max_frames={data.max_frames} must be >= 0 (0 = all frames)")
        if isinstance(data, ImagesData) and data.stride < 1:
            raise UserError(f"data.stride={data.stride} must be >= 1")
        if isinstance(data, VideoData) and not data.fps > 0:
            raise UserError(f"data.fps={data.fps} must be > 0")
    else:
        raise UserError("data must be one of data=images, data=video, data=synthetic")


def validate(cfg: DictConfig) -> RunConfig:
    """Turn a composed config into checked dataclasses; raises :class:`UserError` on bad values."""
    try:
        run: RunConfig = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        key = err.full_key
        raise UserError(f"{key} is required: set it on the command line, e.g. {key}=...") from None
    _check_model(run.model)
    _check_data(run.data)
    run.process_res = round_process_res(run.process_res)
    if run.dtype not in DTYPES:
        raise UserError(f"dtype='{run.dtype}' is not one of {', '.join(DTYPES)}")
    unknown = [stage for stage in run.pipeline if stage not in KNOWN_STAGES]
    if unknown:
        raise UserError(f"unknown pipeline stage(s) {unknown}; known: {', '.join(KNOWN_STAGES)}")
    if run.memory_limit_gb is not None and not run.memory_limit_gb > 0:
        raise UserError(f"memory_limit_gb={run.memory_limit_gb} must be > 0 (or null = device)")
    return run
